"""The main job, shortened: `citynerve demo --quick` tells the whole story, stops on SIGTERM with
nothing left running, and runs again at once on the same state folder."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from citynerve.operators.api.resources import KINDS
from citynerve.operators.localfed.federation import LocalFederation
from kubernetes import config

pytestmark = pytest.mark.e2e
KEEPING = "Everything keeps running"


def _demo(tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "citynerve.operators.cli", "demo", "--quick",
            "--state-dir", str(tmp_path / "federation"), *extra]


def _survivors(tmp_path: Path, pid: int | None = None) -> str:
    """Processes of that demo still running: control planes and MLflow (their command lines name
    the state folder) and Ray's (its session folder ends with the driver's process id)."""
    found = []
    for pattern in (str(tmp_path), *([f"session_.*_{pid}/"] if pid else [])):
        listed = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False)
        found += [line for line in listed.stdout.splitlines() if "pgrep" not in line]
    return "\n".join(found)


TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"
# Columns empty by meaning (docs/status-and-events.md), each with the test of that meaning.
EMPTY_BY_MEANING = {
    ("Incident", "Response"): lambda o: o["spec"]["state"] in ("Detected", "Dispatched"),  # nobody on site
    ("AnalyticsModel", "Alias"): lambda o: "alias" not in o["spec"] and "version" in o["spec"],  # pinned
    ("ModelPromotion", "Canary"): lambda o: not o["spec"].get("canaryCity"),
}


def _empty_printer_cells(state_dir: Path) -> tuple[list[str], set[str]]:
    """Every printer-column cell of every CityNerve object in every cluster of the running demo,
    as ``kubectl get`` shows them (the API server's Table): the empty ones, and the kinds seen."""
    local = LocalFederation(state_dir)
    empty: list[str] = []
    seen: set[str] = set()
    for cluster in local.names:
        api = config.new_client_from_config(str(local.kubeconfig), context=cluster)
        for info in KINDS:
            url = f"{api.configuration.host}/apis/{info.group}/{info.version}/{info.plural}"
            # includeObject=Object: the whole object beside its row, to judge an empty cell by
            response = api.call_api("GET", f"{url}?includeObject=Object", header_params={"Accept": TABLE},
                                    _request_timeout=30)
            if response.status == 404:  # a kind this cluster does not serve
                continue
            assert response.status == 200, f"{cluster}: GET {info.plural} answered {response.status}"
            table = json.loads(response.read())
            names = [c["name"] for c in table["columnDefinitions"]]
            for row in table.get("rows") or []:
                seen.add(info.kind)
                obj = row["object"]
                meta = obj["metadata"]
                for name, cell in zip(names, row["cells"], strict=True):
                    meaning = EMPTY_BY_MEANING.get((info.kind, name))
                    if cell in ("", None, "<none>") and not (meaning and meaning(obj)):
                        where = f"{meta.get('namespace', '')}/{meta['name']}".lstrip("/")
                        empty.append(f"{cluster}: {info.kind} {where} column {name}")
    return empty, seen


def _deletes_in_cities(state_dir: Path) -> list[str]:
    """SensorTypes and Scenarios deleted in a city during the demo (its audit log records every
    write): the demo removes nothing from the hub, so any is a deletion by surprise."""
    local = LocalFederation(state_dir)
    found = []
    for city in local.cities:
        audit = state_dir / city / "logs" / "audit.log"
        for line in audit.read_text().splitlines():
            event = json.loads(line)
            ref = event.get("objectRef") or {}
            if event.get("verb") == "delete" and ref.get("resource") in ("sensortypes", "scenarios"):
                found.append(f"{city}: {ref['resource']}/{ref.get('name')} by {event['user']['username']} "
                             f"at {event.get('stageTimestamp')}")
    return found


@pytest.mark.timeout(2000)
def test_the_quick_demo_stops_on_sigterm_and_runs_again(tmp_path: Path) -> None:
    # First run: kept running, then stopped as a supervisor would stop it.
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen(_demo(tmp_path, "--keep"), cwd=tmp_path, stdout=out,
                                 stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 900
        while KEEPING not in log.read_text() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert KEEPING in log.read_text(), log.read_text()[-6000:]
        # What a platform engineer sees with `kubectl get`: every column of every kind filled.
        try:
            empty, seen = _empty_printer_cells(tmp_path / "federation")
            deleted = _deletes_in_cities(tmp_path / "federation")
        finally:
            first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=180) == 0, log.read_text()[-6000:]
    text = log.read_text()
    assert not empty, "empty printer columns on the demo's objects:\n" + "\n".join(empty)
    assert not deleted, "deleted in a city although nobody removed it on the hub:\n" + "\n".join(deleted[:20])
    assert {"City", "SensorType", "SensorFleet", "Scenario", "Incident", "FederatedScenario",
            "ModelPromotion"} <= seen, seen
    assert "interrupted; tearing down" in text
    assert "local federation stopped" in text
    left = _survivors(tmp_path, first.pid)
    assert not left, f"processes left behind after SIGTERM:\n{left}"

    # Second run, right after, on the same state folder: starts afresh and tells the story.
    proc = subprocess.run(_demo(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=1100,
                          check=False)
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-6000:]
    for expected in ("Joined, Reachable, Ready", "SensorTypes present in chengdu", "terminals online across",
                     "promotion Promoted",
                     "duty officer: Resolved", "Reachable=False",
                     "roll-up caught up", "INCIDENTS", "PROMOTIONS", "FEDERATION (hub view)"):
        assert expected in out, f"{expected!r} missing from the demo's output:\n{out[-4000:]}"
    report = tmp_path / "demo-output" / "report.html"
    assert report.is_file()
    page = report.read_text()
    # A real page, its figures read from the recorded runs: no terminal text, a sortable incidents
    # table, every incident on the timeline, the burst's pressure and a flooded node's depth, each
    # incident linked to its MLflow run, and the map linked.
    assert "<pre" not in page
    assert '<table id="incidents" class="sortable">' in page
    assert page.count('<g class="incident"') == page.count("<tr data-name=") > 0
    assert 'id="data-water"' in page, "no pressure plot from the water drill's recorded run"
    assert 'id="data-flood"' in page, "no flood plot of a flooded node from the flood drill's recorded run"
    assert page.count('class="mlflow-run"') >= page.count("<tr data-name=")
    assert 'id="situation-map"' in page
    assert "local federation stopped" in out
    left = _survivors(tmp_path)
    assert not left, f"processes left behind: {left}"
