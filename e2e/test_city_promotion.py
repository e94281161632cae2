"""Governed model promotion end to end: real MLflow server, hub + two city control planes.

The hub operator and both cities' agents run in-process (``EmbeddedFederation``), and so does
each city's operator (watching the ``citynerve`` namespace, where agents apply the hub's work),
so a pinned AnalyticsModel is really resolved — and its artifact digest really verified — in
the city. A water-burst detector is trained once; its versions are:

* v1 — the trained detector, ``champion`` before the tests;
* v2 — the same artifact registered again (same run, same metrics): the version promoted;
* v3 — a copy registered with its digest and then changed in the server's artifact store.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from citynerve.models.registry import (
    alias_version,
    register_logged_artifact,
    register_model_version,
    set_model_alias,
)
from citynerve.models.training import MODEL_ARTIFACT_PATH, download_verified, train_water_detector
from citynerve.operators.city.config import CityOptions
from citynerve.operators.city.handlers import build_registry as build_city_registry
from citynerve.operators.cli import main as citynerve
from citynerve.operators.federation.embedded import EmbeddedFederation, city_condition
from citynerve.operators.federation.placement import MANIFEST_KEY, city_namespace
from citynerve.operators.hub.promotion import model_object_name, pin_work_name
from citynerve.operators.runtime import InProcessOperator, KubeTarget, OperatorOptions
from kubernetes import client

pytestmark = pytest.mark.e2e
GROUP, VERSION = "citynerve.io", "v1alpha1"
MODEL = "water-burst-detector-e2e"
HUB_NS = "citynerve-system"
CITY_NS = "citynerve"
CITIES = ("shanghai", "chengdu")


@dataclass
class Setup:
    federation: Any
    fed: EmbeddedFederation
    url: str
    versions: dict[str, str]  # v1, v2, v3 → registry version
    digests: dict[str, str]


def _ensure_namespace(api: client.ApiClient, name: str) -> None:
    try:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    except client.ApiException as exc:
        if exc.status != 409:
            raise


def _register_versions(url: str, root: Path, scratch: Path) -> tuple[dict[str, str], dict[str, str]]:
    trained = train_water_detector(url, MODEL, alias="champion")
    digest = trained.model.artifact_digest
    again = register_logged_artifact(url, MODEL, trained.run_id, MODEL_ARTIFACT_PATH, digest)
    local = download_verified(url, MODEL, trained.model.version, scratch / "v1")
    copy = scratch / "v3"
    shutil.copytree(local, copy)
    tampered = register_model_version(url, MODEL, copy, dict(trained.metrics))
    stored = next((root / "artifacts").rglob(f"{tampered.run_id}/artifacts/model/MLmodel"))
    stored.write_text(stored.read_text() + "\n# changed after registration\n")
    versions = {"v1": trained.model.version, "v2": again.version, "v3": tampered.version}
    digests = {"v1": digest, "v2": again.artifact_digest, "v3": tampered.artifact_digest}
    return versions, digests


@pytest.fixture(scope="module")
def setup(
    federation: Any, mlflow_server: Any, local_ray: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    url = mlflow_server.url
    versions, digests = _register_versions(url, mlflow_server.root, tmp_path_factory.mktemp("promotion"))
    saved_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = url  # what the hub operator reads its registry from
    fed = EmbeddedFederation(
        kubeconfig=federation.kubeconfig,
        hub_context="hub",
        city_contexts={c: c for c in CITIES},
        heartbeat_seconds=2,
        heartbeat_timeout_seconds=8,
        check_interval=1.0,
    )
    operators: list[InProcessOperator] = []
    try:
        fed.start()
        for city in CITIES:
            _ensure_namespace(federation.api_client(city), CITY_NS)
            options = OperatorOptions(
                f"city-{city}", KubeTarget(federation.kubeconfig, city), namespaces=(CITY_NS,)
            )
            city_options = CityOptions(city=city, mlflow_url=url, resync_seconds=2.0, model_cache_seconds=2.0)
            operators.append(InProcessOperator(options, build_city_registry(options, city_options)).start())
        deadline = time.monotonic() + 60
        while not all(city_condition(fed.hub, c, "Ready") == "True" for c in CITIES):
            assert time.monotonic() < deadline, "cities not Ready on the hub within 60 s"
            time.sleep(0.5)
        yield Setup(federation, fed, url, versions, digests)
    finally:
        _clean_up(federation, fed)
        for operator in operators:
            operator.stop()
        fed.stop()
        if saved_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri


def _clean_up(federation: Any, fed: EmbeddedFederation) -> None:
    hub = client.CustomObjectsApi(federation.api_client("hub"))
    for item in hub.list_namespaced_custom_object(GROUP, VERSION, HUB_NS, "modelpromotions").get("items", []):
        hub.delete_namespaced_custom_object(
            GROUP, VERSION, HUB_NS, "modelpromotions", item["metadata"]["name"]
        )
    for city in CITIES:
        try:
            client.CustomObjectsApi(federation.api_client(city)).delete_namespaced_custom_object(
                GROUP, VERSION, CITY_NS, "analyticsmodels", model_object_name(MODEL)
            )
        except client.ApiException as exc:
            if exc.status != 404:
                raise


# --- helpers -----------------------------------------------------------------------------------


def promote(s: Setup, name: str, version: str, *extra: str) -> int:
    return citynerve(
        [
            "models",
            "promote",
            MODEL,
            "--version",
            version,
            "--promotion-name",
            name,
            "--namespace",
            HUB_NS,
            "--kubeconfig",
            str(s.federation.kubeconfig),
            "--context",
            "hub",
            "--wait",
            "--wait-timeout",
            "200",
            *extra,
        ]
    )


def promotion(s: Setup, name: str) -> dict[str, Any]:
    obj: dict[str, Any] = client.CustomObjectsApi(
        s.federation.api_client("hub")
    ).get_namespaced_custom_object(GROUP, VERSION, HUB_NS, "modelpromotions", name)
    return obj


def city_outcomes(s: Setup, name: str) -> dict[str, str]:
    """City → outcome reason of a promotion ({} until it exists and has started)."""
    try:
        obj = promotion(s, name)
    except client.ApiException as exc:
        if exc.status == 404:
            return {}
        raise
    return {o["city"]: o["reason"] for o in (obj.get("status") or {}).get("cities") or []}


def condition(obj: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    return next(
        (c for c in ((obj or {}).get("status") or {}).get("conditions") or [] if c["type"] == kind), {}
    )


def city_model(s: Setup, city: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = client.CustomObjectsApi(
            s.federation.api_client(city)
        ).get_namespaced_custom_object(GROUP, VERSION, CITY_NS, "analyticsmodels", model_object_name(MODEL))
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj


def running_version(s: Setup, city: str) -> str | None:
    """The version the city resolved and verified (Ready, Resolved, for the current spec)."""
    obj = city_model(s, city)
    ready = condition(obj, "Ready")
    if (
        not obj
        or ready.get("status") != "True"
        or ready.get("observedGeneration") != obj["metadata"]["generation"]
    ):
        return None
    return str(obj["status"].get("resolvedVersion"))


def pinned_in_work(s: Setup, city: str) -> str | None:
    """The version the hub's work for ``city`` pins (None without a pin)."""
    import json  # noqa: PLC0415

    try:
        cm = client.CoreV1Api(s.federation.api_client("hub")).read_namespaced_config_map(
            pin_work_name(MODEL), city_namespace(city)
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return str(json.loads(cm.data[MANIFEST_KEY])["spec"]["version"])


def events(s: Setup, name: str) -> list[tuple[str, str, str]]:
    listed = client.CoreV1Api(s.federation.api_client("hub")).list_namespaced_event(
        HUB_NS, field_selector=f"involvedObject.name={name}"
    )
    return [(e.type, e.reason, e.message) for e in listed.items]


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_promote_to_the_east_region_with_shanghai_as_canary(setup: Setup, wait_for: Any) -> None:
    v2 = setup.versions["v2"]
    code = promote(
        setup,
        "east-v2",
        v2,
        "--alias",
        "champion",
        "--cities",
        "region=east",
        "--canary",
        "shanghai",
        "--gate",
        "detectionRate>=0.5",
        "--gate",
        "falseAlarmsPerDay<1",
        "--soak",
        "2",
    )
    obj = promotion(setup, "east-v2")
    assert code == 0, obj.get("status")
    assert condition(obj, "Complete")["reason"] == "Promoted"
    assert [(o["city"], o["reason"]) for o in obj["status"]["cities"]] == [("shanghai", "Promoted")]
    model = city_model(setup, "shanghai")
    assert model is not None
    assert model["spec"] == {"registeredModel": MODEL, "version": v2, "expectedDigest": setup.digests["v2"]}
    assert model["status"]["resolvedVersion"] == v2
    assert model["status"]["artifactDigest"] == setup.digests["v2"]
    assert city_model(setup, "chengdu") is None  # west: not selected
    assert alias_version(setup.url, MODEL, "champion") == v2
    audit = obj["status"]["audit"]
    assert audit[0]["action"] == "Started"
    assert audit[0]["actor"] != "unknown"
    assert setup.digests["v2"] in audit[0]["message"]
    assert audit[-1]["action"] == "Completed"
    reasons = {r for _, r, _ in wait_for(lambda: events(setup, "east-v2"), 20, what="events of east-v2")}
    assert {"Started", "Completed"} <= reasons


@pytest.mark.timeout(300)
def test_promote_to_both_cities_with_shanghai_first(setup: Setup) -> None:
    v2 = setup.versions["v2"]
    set_model_alias(setup.url, MODEL, "champion", setup.versions["v1"])  # chengdu's promotion starts from v1
    code = promote(setup, "all-v2", v2, "--cities", "", "--canary", "shanghai", "--soak", "2")
    obj = promotion(setup, "all-v2")
    assert code == 0, obj.get("status")
    assert {o["city"]: o["reason"] for o in obj["status"]["cities"]} == {
        "chengdu": "Promoted",
        "shanghai": "Promoted",
    }
    promoted_at = {o["city"]: o["updatedAt"] for o in obj["status"]["cities"]}
    assert promoted_at["shanghai"] <= promoted_at["chengdu"]
    for city in CITIES:
        assert running_version(setup, city) == v2
        model = city_model(setup, city)
        assert model is not None
        assert model["status"]["artifactDigest"] == setup.digests["v2"]
    assert alias_version(setup.url, MODEL, "champion") == v2


@pytest.mark.timeout(60)
def test_a_version_failing_its_gate_is_refused_with_metric_and_threshold(setup: Setup, wait_for: Any) -> None:
    code = promote(
        setup,
        "strict-v2",
        setup.versions["v2"],
        "--cities",
        "",
        "--canary",
        "shanghai",
        "--gate",
        "detectionRate>=0.99",
    )
    assert code == 3
    obj = promotion(setup, "strict-v2")
    gates = condition(obj, "GatesPassed")
    assert gates["status"] == "False"
    assert gates["reason"] == "GateFailed"
    assert "detectionRate is" in gates["message"]
    assert "detectionRate >= 0.99" in gates["message"]
    assert [a["action"] for a in obj["status"]["audit"]] == ["GateFailed"]
    assert not obj["status"].get("cities")
    warnings = wait_for(
        lambda: [e for e in events(setup, "strict-v2") if e[1] == "GateFailed"], 20, what="a GateFailed event"
    )
    assert warnings[0][0] == "Warning"
    assert "detectionRate >= 0.99" in warnings[0][2]


@pytest.mark.timeout(300)
def test_a_tampered_artifact_is_refused_by_the_canary_and_rolled_back(setup: Setup, wait_for: Any) -> None:
    v2, v3 = setup.versions["v2"], setup.versions["v3"]
    wait_for(lambda: all(running_version(setup, c) == v2 for c in CITIES), 30, what="both cities on v2")
    seen_in_chengdu: set[str | None] = set()
    code = None

    import threading  # noqa: PLC0415

    def run() -> None:
        nonlocal code
        code = promote(setup, "tampered-v3", v3, "--cities", "", "--canary", "shanghai", "--soak", "2")

    worker = threading.Thread(target=run)
    worker.start()
    in_use_in_shanghai: set[str | None] = set()
    while worker.is_alive():  # Chengdu's pin, and what Shanghai runs, all the while the promotion runs
        seen_in_chengdu.add(pinned_in_work(setup, "chengdu"))
        in_use_in_shanghai.add((city_model(setup, "shanghai").get("status") or {}).get("resolvedVersion"))
        time.sleep(0.2)
    worker.join()
    obj = promotion(setup, "tampered-v3")
    assert code == 3, obj.get("status")
    assert seen_in_chengdu == {v2}  # the other city never receives it
    assert in_use_in_shanghai == {v2}  # the canary refused v3 and kept running the verified v2
    canary = condition(obj, "CanaryPassed")
    assert canary["status"] == "False"
    assert canary["reason"] == "ArtifactDigestMismatch"
    assert condition(obj, "RolledBack")["status"] == "True"
    assert {o["city"]: o["reason"] for o in obj["status"]["cities"]} == {
        "chengdu": "Cancelled",
        "shanghai": "RolledBack",
    }
    actions = [(a["action"], a.get("city")) for a in obj["status"]["audit"]]
    assert ("GateFailed", "shanghai") in actions
    assert ("RolledBack", "shanghai") in actions
    # Shanghai is pinned back to the previous champion and runs it again, verified
    wait_for(lambda: running_version(setup, "shanghai") == v2, 30, what="Shanghai back on v2")
    assert running_version(setup, "chengdu") == v2
    assert alias_version(setup.url, MODEL, "champion") == v2
    assert any(r == "RolledBack" for _, r, _ in events(setup, "tampered-v3"))


def _incident(name: str, now: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Incident",
        "metadata": {"name": name},
        "spec": {
            "scenarioRef": {"name": "pudong-water-burst"},
            "kind": "water-burst",
            "severity": "alarm",
            "drill": True,
            "location": {"latitude": "31.2231", "longitude": "121.5440", "assetId": "pipe-DN600-PD-01872"},
            "detectedAt": now,
            "state": "Detected",
            "transitions": [{"state": "Detected", "time": now, "actor": "scenario/pudong-water-burst"}],
        },
    }


@pytest.mark.timeout(300)
def test_a_canary_raising_too_many_incidents_during_its_soak_rolls_back(setup: Setup, wait_for: Any) -> None:
    import datetime as dt  # noqa: PLC0415
    import threading  # noqa: PLC0415

    v1, v2 = setup.versions["v1"], setup.versions["v2"]
    wait_for(lambda: all(running_version(setup, c) == v2 for c in CITIES), 30, what="both cities on v2")
    code = None

    def run() -> None:
        nonlocal code
        code = promote(
            setup,
            "noisy-v1",
            v1,
            "--cities",
            "",
            "--canary",
            "shanghai",
            "--soak",
            "30",
            "--gate",
            "soakIncidents<=1",
        )

    worker = threading.Thread(target=run)
    worker.start()
    try:
        wait_for(
            lambda: city_outcomes(setup, "noisy-v1").get("shanghai") == "Soaking",
            120,
            what="the canary soaking",
        )
        custom = client.CustomObjectsApi(setup.federation.api_client("shanghai"))
        for i in range(2):
            now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            custom.create_namespaced_custom_object(
                GROUP, VERSION, CITY_NS, "incidents", _incident(f"soak-burst-{i}", now)
            )
    finally:
        worker.join()
    obj = promotion(setup, "noisy-v1")
    assert code == 3, obj.get("status")
    rolled_back = condition(obj, "RolledBack")
    assert rolled_back["status"] == "True"
    assert "2 incidents during the soak; the gate requires soakIncidents <= 1" in rolled_back["message"]
    assert condition(obj, "CanaryPassed")["reason"] == "TooManyIncidents"
    assert {o["city"]: o["reason"] for o in obj["status"]["cities"]} == {
        "chengdu": "Cancelled",
        "shanghai": "RolledBack",
    }
    assert pinned_in_work(setup, "chengdu") == v2
    wait_for(lambda: running_version(setup, "shanghai") == v2, 30, what="Shanghai back on v2")
    for i in range(2):
        client.CustomObjectsApi(setup.federation.api_client("shanghai")).delete_namespaced_custom_object(
            GROUP, VERSION, CITY_NS, "incidents", f"soak-burst-{i}"
        )
