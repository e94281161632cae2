"""Pure builders of the city operator: children, payloads, incidents (no cluster)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from citynerve.operators.api import from_manifest
from citynerve.operators.city import children
from citynerve.operators.city.config import CityOptions

pytestmark = pytest.mark.timeout(10)
OPTIONS = CityOptions(city="shanghai")


def fleet(name: str = "pudong-pressure", count: int = 4200, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "citynerve.io/v1alpha1",
        "kind": "SensorFleet",
        "metadata": {"name": name, "namespace": "city", "uid": "uid-1", "generation": 1},
        "spec": {
            "sensorType": "pipe-pressure-gauge",
            "district": "pudong",
            "count": count,
            "owner": "operator",
            "samplingIntervalSeconds": 60,
            **spec,
        },
    }


def scenario(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "citynerve.io/v1alpha1",
        "kind": "Scenario",
        "metadata": {"name": "burst-drill", "namespace": "city", "uid": "uid-s", "generation": 1},
        "spec": {
            "kind": "water-burst",
            "mode": "drill",
            "fleets": [{"name": "pudong-pressure"}],
            "models": [{"name": "burst-detector"}],
            "thresholds": [{"metric": "pressureDropKpa", "unitCode": "KPA", "warning": 50, "alarm": 120}],
            "simulation": {"engine": "wntr", "network": "Net1", "event": "burst:22"},
            **spec,
        },
    }


MODELS = {
    "burst-detector": {
        "spec": {"registeredModel": "water-burst-detector", "alias": "champion"},
        "status": {
            "resolvedVersion": "2",
            "modelUri": "models:/water-burst-detector/2",
            "artifactDigest": "sha256:" + "a" * 64,
        },
    }
}


def test_ingest_deployment_is_deterministic_and_owned() -> None:
    first = children.desired_ingest_deployment(fleet(), OPTIONS)
    assert first == children.desired_ingest_deployment(fleet(), OPTIONS)
    assert first["metadata"]["name"] == "pudong-pressure-ingest"
    owner = first["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("SensorFleet", "uid-1", True)
    pod = first["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") or e["valueFrom"]["fieldRef"]["fieldPath"]
           for e in pod["containers"][0]["env"]}
    assert (env["POD_NAME"], env["POD_NAMESPACE"]) == ("metadata.name", "metadata.namespace")
    assert "serviceAccountName" not in pod  # the namespace's default unless the chart names one
    chart = children.desired_ingest_deployment(fleet(), replace(OPTIONS, ingest_service_account="feeds"))
    assert chart["spec"]["template"]["spec"]["serviceAccountName"] == "feeds"
    assert json.loads(env["CITYNERVE_FLEET_CONFIG"])["count"] == 4200
    assert env["CITYNERVE_ENCRYPT_AT_REST"] == "false"
    selector = first["spec"]["selector"]["matchLabels"]
    assert selector.items() <= first["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize(("count", "replicas"), [(0, 1), (4200, 1), (50_001, 2), (10**8, 16)])
def test_ingest_replicas_scale_with_terminals(count: int, replicas: int) -> None:
    assert children.ingest_replicas(count) == replicas


def test_long_names_stay_dns_labels() -> None:
    name = "x" * 60
    built = children.desired_ingest_deployment(fleet(name), OPTIONS)["metadata"]["name"]
    assert len(built) <= 63
    assert built.endswith("-ingest")


def test_drift_ignores_server_defaults_but_not_changes() -> None:
    desired = children.desired_ingest_deployment(fleet(), OPTIONS)
    observed = copy.deepcopy(desired)
    observed["spec"]["strategy"] = {"type": "RollingUpdate"}  # defaulted by the API server
    observed["metadata"]["resourceVersion"] = "7"
    assert not children.deployment_drifted(desired, observed)
    observed["spec"]["replicas"] = 5
    assert children.deployment_drifted(desired, observed)
    observed = copy.deepcopy(desired)
    observed["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "EXTRA", "value": "1"})
    assert children.deployment_drifted(desired, observed)
    changed = children.desired_ingest_deployment(fleet(count=10), OPTIONS)
    assert children.deployment_drifted(changed, desired)


def test_workload_revision_follows_spec_and_resolved_models() -> None:
    fleets = {"pudong-pressure": fleet()}
    base = children.scenario_payload(scenario(), fleets, MODELS, "shanghai")
    assert base["models"][0]["version"] == "2"
    assert children.workload_revision(base) == children.workload_revision(
        children.scenario_payload(scenario(), fleets, MODELS, "shanghai")
    )
    more = children.scenario_payload(scenario(replicas=3), fleets, MODELS, "shanghai")
    moved = copy.deepcopy(MODELS)
    moved["burst-detector"]["status"]["resolvedVersion"] = "3"
    promoted = children.scenario_payload(scenario(), fleets, moved, "shanghai")
    revisions = {children.workload_revision(p) for p in (base, more, promoted)}
    assert len(revisions) == 3


def test_rayjob_carries_payload_replicas_and_owner() -> None:
    payload = children.scenario_payload(
        scenario(replicas=3), {"pudong-pressure": fleet()}, MODELS, "shanghai"
    )
    job = children.desired_rayjob(scenario(replicas=3), payload, OPTIONS)
    revision = children.workload_revision(payload)
    assert job["metadata"]["name"] == f"burst-drill-{revision[:8]}"
    assert job["metadata"]["labels"][children.LABEL_REVISION] == revision
    assert job["metadata"]["ownerReferences"][0]["kind"] == "Scenario"
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    env_line = job["spec"]["runtimeEnvYAML"].split("CITYNERVE_SCENARIO: ", 1)[1]
    assert json.loads(json.loads(env_line)) == payload


def test_a_replace_keeps_what_other_controllers_put_in_the_metadata() -> None:
    live = scenario(mode="live")
    payload = children.scenario_payload(live, {"pudong-pressure": fleet()}, MODELS, "shanghai")
    job = children.desired_rayjob(live, payload, OPTIONS)
    # KubeRay drops a false shutdownAfterJobFinishes; stating it would be drift on every pass.
    assert "shutdownAfterJobFinishes" not in job["spec"]
    metadata = {**job["metadata"], "resourceVersion": "42", "finalizers": ["ray.io/rayjob-finalizer"],
                "annotations": {"ray.io/note": "kept"},
                "labels": {**job["metadata"]["labels"], "team": "ops"}}
    observed = {**job, "spec": {**job["spec"], "entrypointNumCpus": 1}, "metadata": metadata}
    body = children.replacement(job, observed)
    assert body["spec"] == job["spec"]
    assert body["metadata"]["resourceVersion"] == "42"
    assert body["metadata"]["finalizers"] == ["ray.io/rayjob-finalizer"]
    assert body["metadata"]["annotations"]["ray.io/note"] == "kept"
    assert body["metadata"]["labels"] == {**job["metadata"]["labels"], "team": "ops"}
    assert body["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]


def test_incident_manifest_is_a_valid_incident_with_a_stable_name() -> None:
    payload = children.scenario_payload(scenario(), {"pudong-pressure": fleet()}, MODELS, "shanghai")
    event = {
        "kind": "water-burst",
        "severity": "warning",
        "detected_at_s": 38700.0,
        "onset_s": 36000.0,
        "location": {"asset_id": "22", "lat": 40.0, "lon": 50.0},
        "evidence": {
            "cusum": 16.0,
            "threshold": 12.0,
            "pressure_drop_m": {"23": 14.2, "22": 15.0},
            "candidates": [["22", 0.99]],
        },
    }
    when = datetime(2026, 7, 12, 4, 15, tzinfo=UTC)
    manifest = children.incident_manifest(event, payload, when, OPTIONS.centre)
    incident = from_manifest("Incident", manifest)
    assert incident.spec.drill is True  # type: ignore[attr-defined]
    assert manifest["spec"]["severity"] == "alarm"  # 15 m of water is 147 kPa, above the 120 kPa alarm
    assert manifest["spec"]["location"]["latitude"] == "31.2304"  # drill coordinates are not geographic
    assert {e["metric"] for e in manifest["spec"]["evidence"]} == {
        "simulatedMinute", "detectionDelayMinutes", "cusum", "threshold", "pressureDropKpa"}
    timing = {e["metric"]: e["value"] for e in manifest["spec"]["evidence"] if e["unitCode"] == "MIN"}
    assert timing == {"simulatedMinute": "645", "detectionDelayMinutes": "45"}  # 38700 s; 2700 s after onset
    again = children.incident_manifest(event, payload, datetime.now(UTC), OPTIONS.centre)
    assert again["metadata"]["name"] == manifest["metadata"]["name"]
    other = children.incident_manifest({**event, "detected_at_s": 39600.0}, payload, when, OPTIONS.centre)
    assert other["metadata"]["name"] != manifest["metadata"]["name"]


def test_critical_detections_stay_critical() -> None:
    assert children.incident_severity("critical", {}, []) == "critical"
    assert children.incident_severity("warning", {"x": 1.0}, [{"metric": "x", "alarm": 5}]) == "warning"


def test_local_actor_names_round_trip() -> None:
    name = children.local_actor_name("shanghai", "city", "burst-drill", "abc")
    assert children.parse_local_actor_name(name) == ("shanghai", "city", "burst-drill", "abc")
    assert children.parse_local_actor_name("unrelated") is None


def test_runner_spec_translates_the_scenario_for_the_runner() -> None:
    from citynerve.operators.city.analytics import runner_spec  # noqa: PLC0415
    from citynerve.workloads.sim.water import LeakSpec  # noqa: PLC0415

    payload = children.scenario_payload(scenario(), {"pudong-pressure": fleet()}, MODELS, "shanghai")
    spec = runner_spec(payload)
    assert (spec["kind"], spec["mode"], spec["thresholds"]) == ("water-burst", "drill", {})
    assert spec["simulation"]["network"] == "Net1"
    (leak,) = spec["simulation"]["leaks"]
    assert LeakSpec(**leak).node == "22"
    assert spec["models"] == [
        {"name": "burst-detector", "role": "detector", "modelUri": "models:/water-burst-detector/2"}
    ]
    flood = runner_spec(
        {
            **payload,
            "spec": {
                **payload["spec"],
                "kind": "urban-flood",
                "simulation": {"engine": "swmm", "network": "x"},
            },
        }
    )
    assert flood["simulation"] == {}


def test_a_major_event_drill_names_its_surge() -> None:
    from citynerve.operators.city.analytics import runner_spec  # noqa: PLC0415

    payload = {"spec": {"kind": "major-event", "mode": "drill", "simulation": {"event": "surge:2.5"}},
               "fleets": [], "models": []}
    assert runner_spec(payload)["simulation"] == {"surge": {"peakFactor": 2.5}}
    payload["spec"]["simulation"] = {}
    assert runner_spec(payload)["simulation"] == {}
