"""The main job, shortened: `citynerve demo --quick` tells the whole story, stops on SIGTERM with
nothing left running, and runs again at once on the same state folder."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=180) == 0, log.read_text()[-6000:]
    text = log.read_text()
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
