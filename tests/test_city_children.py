"""Pure builders of the city operator: children, payloads, incidents (no cluster)."""

from __future__ import annotations

import copy
import json
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
    assert pod["serviceAccountName"] == children.desired_ingest_service_account(fleet())["metadata"]["name"]
    assert json.loads(env["CITYNERVE_FLEET_CONFIG"])["count"] == 4200
    assert env["CITYNERVE_ENCRYPT_AT_REST"] == "false"
    selector = first["spec"]["selector"]["matchLabels"]
    assert selector.items() <= first["spec"]["template"]["metadata"]["labels"].items()


def test_each_fleet_gets_an_ingest_identity_that_may_patch_its_own_report_only() -> None:
    account, role, binding = children.ingest_identity(fleet())
    assert children.ingest_identity(fleet()) == [account, role, binding]
    for child in (account, role, binding, children.desired_ingest_report(fleet())):
        meta = child["metadata"]
        assert meta["namespace"] == "city"
        assert meta["labels"]["citynerve.io/sensorfleet"] == "pudong-pressure"
        owner = meta["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "SensorFleet", "pudong-pressure", "uid-1", True)
    assert (account["kind"], account["metadata"]["name"]) == ("ServiceAccount", "pudong-pressure-ingest")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": ["pudong-pressure-ingest-report"], "verbs": ["patch"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "pudong-pressure-ingest",
                                    "namespace": "city"}]
    report = children.desired_ingest_report(fleet())
    config = children.fleet_config(fleet()["spec"], "pudong-pressure")
    assert report["metadata"]["name"] == config["reportConfigMap"]
    assert report["metadata"]["labels"]["citynerve.io/ingest-report"] == "pudong-pressure"
    assert "data" not in report  # the workers' keys; the operator never writes them
    other = children.ingest_identity(fleet("pudong-flow"))[1]
    assert other["rules"][0]["resourceNames"] == ["pudong-flow-ingest-report"]


def test_a_child_in_line_needs_no_patch_and_a_drifted_one_only_what_differs() -> None:
    role = children.desired_ingest_role(fleet())
    observed = copy.deepcopy(role)
    observed["metadata"] |= {"resourceVersion": "9", "uid": "r-1"}
    observed["metadata"]["labels"]["team"] = "water"  # another's label is kept
    assert children.child_patch(role, observed) is None
    observed["rules"][0]["verbs"] = ["patch", "update"]
    assert children.child_patch(role, observed) == {"rules": role["rules"]}
    report = children.desired_ingest_report(fleet())
    made_by_workers = {"metadata": {"name": report["metadata"]["name"], "labels": {
        "citynerve.io/ingest-report": "pudong-pressure"}}, "data": {"worker.a": "{}"}}
    assert children.child_conflict(report, made_by_workers) is None  # adopted
    assert children.child_patch(report, made_by_workers) == {"metadata": {
        "labels": report["metadata"]["labels"], "ownerReferences": report["metadata"]["ownerReferences"]}}


def test_a_child_of_someone_else_or_bound_elsewhere_is_left_alone() -> None:
    binding = children.desired_ingest_role_binding(fleet())
    foreign = copy.deepcopy(binding)
    foreign["metadata"]["ownerReferences"] = [{"kind": "SensorFleet", "name": "old", "uid": "uid-0",
                                               "controller": True}]
    conflict = children.child_conflict(binding, foreign)
    assert conflict is not None
    assert "RoleBinding pudong-pressure-ingest" in conflict
    assert "SensorFleet old" in conflict
    rebound = copy.deepcopy(binding)
    rebound["roleRef"]["name"] = "admin"
    assert "binds another role" in str(children.child_conflict(binding, rebound))
    assert children.child_conflict(binding, copy.deepcopy(binding)) is None


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
