"""Governed model promotion end to end: real MLflow server, hub + two city control planes.

The hub operator and both cities' agents run in-process (``EmbeddedFederation``), and so does
each city's operator (watching the ``citynerve`` namespace, where agents apply the hub's work),
so a pinned AnalyticsModel is really resolved — and its artifact digest really verified — in
the city. A water-burst detector is trained once; its versions are:

* v1 — the trained detector, ``champion`` before the tests;
* v2 — the same artifact registered again (same run, same metrics): the version promoted;
* v3 — a copy registered with its digest and then changed in the server's artifact store.

The MLflow server runs its basic-auth app; this process acts as the trainer (``mlflow_server``),
and a city's read identity is exercised by a process of its own. Trusted models
(docs/models-trust.md): the digest a city checks is the one the hub recorded at the gate.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from citynerve.models.registry import (
    CITY_IDENTITY,
    DIGEST_TAG,
    alias_version,
    artifact_digest,
    register_logged_artifact,
    register_model_version,
    registry_client,
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
    server: Any  # the LocalMlflow


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
        yield Setup(federation, fed, url, versions, digests, mlflow_server)
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


def promotion_names(s: Setup) -> set[str]:
    listed = client.CustomObjectsApi(s.federation.api_client("hub")).list_namespaced_custom_object(
        GROUP, VERSION, HUB_NS, "modelpromotions")
    return {item["metadata"]["name"] for item in listed.get("items") or []}


@pytest.mark.timeout(90)
def test_a_promotion_refused_for_its_input_leaves_nothing_behind(
    setup: Setup, capsys: pytest.CaptureFixture[str]
) -> None:
    before = promotion_names(setup)
    v2 = setup.versions["v2"]
    for name, version, extra, why in (
        ("no-such-version", "999", (), f"has no version 999 in the MLflow registry at {setup.url}"),
        ("unknown-metric", v2, ("--gate", "f1Permille>=800"),
         "its gates name f1Permille, which the version's run does not record"),
        ("no-city", v2, ("--cities", "region=north"), "the city selector picks no joined city"),
        ("canary-elsewhere", v2, ("--cities", "region=west", "--canary", "shanghai"),
         "canary city shanghai is not among the selected cities (chengdu)"),
    ):
        capsys.readouterr()
        code = promote(setup, name, version, *(extra or ("--cities", "")))
        err = capsys.readouterr().err
        assert code == 1, err
        assert why in err, err
        assert err.startswith(f"error: The promotion of {MODEL}")
    assert promotion_names(setup) == before  # nothing was created, so nothing is left behind
    assert alias_version(setup.url, MODEL, "champion") in (setup.versions["v1"], v2)


@pytest.mark.timeout(120)
def test_a_tampered_artifact_is_refused_at_the_gate_and_no_city_receives_it(setup: Setup) -> None:
    v2, v3 = setup.versions["v2"], setup.versions["v3"]
    code = promote(setup, "tampered-v3", v3, "--cities", "", "--canary", "shanghai", "--soak", "2")
    obj = promotion(setup, "tampered-v3")
    assert code == 3, obj.get("status")
    gates = condition(obj, "GatesPassed")
    assert (gates["status"], gates["reason"]) == ("False", "ArtifactDigestMismatch")
    assert "not the digest recorded at registration" in gates["message"]
    assert condition(obj, "Complete")["reason"] == "Refused"
    assert not obj["status"].get("cities")
    assert not obj["status"].get("artifactDigest")
    for city in CITIES:  # nobody was pinned to v3; both keep running the verified v2
        assert pinned_in_work(setup, city) == v2
        assert running_version(setup, city) == v2
    assert alias_version(setup.url, MODEL, "champion") == v2


def _refusing(s: Setup, city: str) -> dict[str, Any] | None:
    """The city's AnalyticsModel once it refuses the artifact as changed."""
    model = city_model(s, city)
    return model if condition(model, "Degraded").get("reason") == "ArtifactDigestMismatch" else None


def _source_of(s: Setup, version: str) -> Path:
    """The file of ``version``'s artifact in the server's store (what a registry writer can replace)."""
    source = registry_client(s.url).get_model_version(MODEL, version).source
    run_id = source.split("/")[2]
    return next((s.server.root / "artifacts").rglob(f"{run_id}/artifacts/model/MLmodel"))


@pytest.mark.timeout(180)
def test_a_writer_swapping_artifact_and_tag_together_is_refused_by_the_city(
    setup: Setup, wait_for: Any, tmp_path: Path
) -> None:
    v2 = setup.versions["v2"]
    wait_for(lambda: all(running_version(setup, c) == v2 for c in CITIES), 60, what="both cities on v2")
    stored = _source_of(setup, v2)
    original = stored.read_text()
    # A registry writer replaces v2's artifact and records the new digest in the registry's tag.
    stored.write_text(original + "\n# swapped by a registry writer\n")
    swapped = artifact_digest(stored.parent)
    assert swapped != setup.digests["v2"]
    registry_client(setup.url).set_model_version_tag(MODEL, v2, DIGEST_TAG, swapped)
    try:
        for city in CITIES:
            degraded = wait_for(lambda c=city: _refusing(setup, c), 60, what=f"{city} refusing the swap")
            ready = condition(degraded, "Ready")
            assert (ready["status"], ready["reason"]) == ("True", "LastResolutionInUse")
            why = condition(degraded, "Degraded")["message"]
            assert f"not spec.expectedDigest ({setup.digests['v2']})" in why
            assert degraded["status"]["artifactDigest"] == setup.digests["v2"]  # the verified one runs on
            assert condition(degraded, "Verified")["status"] == "True"
        # ...and the hub, which recorded v2's digest, refuses to promote the swapped artifact again.
        code = promote(setup, "swapped-v2", v2, "--cities", "", "--canary", "shanghai", "--soak", "2")
        gates = condition(promotion(setup, "swapped-v2"), "GatesPassed")
        assert code == 3
        assert (gates["status"], gates["reason"]) == ("False", "ArtifactDigestMismatch")
        assert "ModelPromotion citynerve-system/" in gates["message"]
    finally:
        stored.write_text(original)
        registry_client(setup.url).set_model_version_tag(MODEL, v2, DIGEST_TAG, setup.digests["v2"])
    wait_for(
        lambda: all(condition(city_model(setup, c), "Ready").get("reason") == "Resolved" for c in CITIES),
        60,
        what="both cities verifying v2 again",
    )


def _mlflow_status(url: str, path: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url + path)  # noqa: S310 - http to the local server
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - as above
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.timeout(60)
def test_the_registry_refuses_requests_without_valid_credentials(setup: Setup) -> None:
    path = f"/api/2.0/mlflow/registered-models/get?name={MODEL}"
    assert _mlflow_status(setup.url, path) == 401
    assert _mlflow_status(setup.url, path, (CITY_IDENTITY, "not-the-password")) == 401
    city = setup.server.identity(CITY_IDENTITY)
    assert _mlflow_status(setup.url, path, (city.username, city.password)) == 200
    assert _mlflow_status(setup.url, "/health") == 200  # probes need no credentials


_AS_A_CITY = """
import json, sys
from citynerve.models.registry import (
    ModelResolutionError, registry_client, resolve_model_version, set_model_alias,
)
url, model, version, digest = sys.argv[1:]
out = {}
out["resolved"] = resolve_model_version(url, model, version=version, expected_digest=digest).verified
try:
    set_model_alias(url, model, "champion", version)
except ModelResolutionError as exc:
    out["alias"] = exc.reason
client = registry_client(url)
source = client.get_model_version(model, version)
for what, call in (
    ("register", lambda: client.create_model_version(model, source.source, run_id=source.run_id)),
    ("tag", lambda: client.set_model_version_tag(model, version, "citynerve.io/artifact-digest", digest)),
):
    try:
        call()
    except Exception as exc:
        out[what] = getattr(exc, "error_code", repr(exc))
print(json.dumps(out))
"""


@pytest.mark.timeout(120)
def test_a_city_identity_reads_and_verifies_but_cannot_write(setup: Setup) -> None:
    v2 = setup.versions["v2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(setup.server.identity(CITY_IDENTITY).env())
    proc = subprocess.run(
        [sys.executable, "-c", _AS_A_CITY, setup.url, MODEL, v2, setup.digests["v2"]],
        env=env, capture_output=True, text=True, timeout=110, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {
        "resolved": True,  # reads the version and downloads its artifact
        "alias": "RegistryPermissionDenied",  # 403: may not move an alias
        "register": "PERMISSION_DENIED",  # 403: may not register a version
        "tag": "PERMISSION_DENIED",  # 403: may not change the registry's digest tag
    }
    assert alias_version(setup.url, MODEL, "champion") == v2


@pytest.mark.timeout(150)
def test_a_version_whose_artifact_is_outside_the_registry_root_is_refused(
    setup: Setup, wait_for: Any
) -> None:
    elsewhere = "s3://another-bucket/water-burst-detector"  # the registry accepts such a source
    run_id = registry_client(setup.url).get_model_version(MODEL, setup.versions["v2"]).run_id
    outside = str(registry_client(setup.url).create_model_version(MODEL, elsewhere, run_id=run_id).version)
    # The hub refuses to promote it, before downloading anything...
    code = promote(setup, "outside-root", outside, "--cities", "", "--canary", "shanghai", "--soak", "2")
    gates = condition(promotion(setup, "outside-root"), "GatesPassed")
    assert code == 3
    assert (gates["status"], gates["reason"]) == ("False", "ArtifactOutsideRoot")
    assert elsewhere in gates["message"]
    assert "mlflow-artifacts:/" in gates["message"]
    # ...and so does a city told to run it, whatever digest it is told to expect.
    custom = client.CustomObjectsApi(setup.federation.api_client("shanghai"))
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AnalyticsModel",
        "metadata": {"name": "outside-root"},
        "spec": {"registeredModel": MODEL, "version": outside, "expectedDigest": setup.digests["v2"]},
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, CITY_NS, "analyticsmodels", manifest)
    try:
        def refused() -> dict[str, Any] | None:
            model = custom.get_namespaced_custom_object(
                GROUP, VERSION, CITY_NS, "analyticsmodels", "outside-root"
            )
            return condition(model, "Ready") or None

        ready = wait_for(refused, 60, what="the AnalyticsModel refusing the artifact")
        assert (ready["status"], ready["reason"]) == ("False", "ArtifactOutsideRoot")
        assert elsewhere in ready["message"]
    finally:
        custom.delete_namespaced_custom_object(GROUP, VERSION, CITY_NS, "analyticsmodels", "outside-root")


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
