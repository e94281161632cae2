"""compute_*_status of the city kinds and the shared condition helpers (no cluster)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from citynerve.models.registry import ModelResolutionError, ResolvedModel
from citynerve.operators.city.status import (
    WorkloadObservation,
    compute_fleet_status,
    compute_incident_status,
    compute_model_status,
    compute_scenario_status,
    measure_response_times,
    missing_references,
)
from citynerve.operators.conditions import find_condition, set_conditions, status_patch

pytestmark = pytest.mark.timeout(10)
NOW = datetime(2026, 7, 12, 4, 0, tzinfo=UTC)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def fleet(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "pudong-pressure", "namespace": "city", "generation": 2},
        "spec": {"sensorType": "pipe-pressure-gauge", "samplingIntervalSeconds": 60, "count": 10},
        "status": status,
    }


def deployment(available: int, wanted: int = 1, rolling: bool = False) -> dict[str, Any]:
    progressing = {"type": "Progressing", "status": "True",
                   "reason": "ReplicaSetUpdated" if rolling else "NewReplicaSetAvailable"}
    return {
        "metadata": {"name": "pudong-pressure-ingest", "generation": 2 if rolling else 1},
        "spec": {"replicas": wanted},
        "status": {"availableReplicas": available, "observedGeneration": 1, "conditions": [progressing],
                   "updatedReplicas": 0 if rolling else wanted},
    }


def test_fleet_ready_once_ingestion_is_available() -> None:
    status = compute_fleet_status(fleet(), deployment(0), None, NOW)
    assert find_condition(status, "Ready")["reason"] == "DeploymentProgressing"  # type: ignore[index]
    status = compute_fleet_status(fleet(), deployment(1), None, NOW)
    ready = find_condition(status, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("True", "IngestionReady", 2)
    assert find_condition(status, "DataFresh")["status"] == "Unknown"  # type: ignore[index]
    missing = compute_fleet_status(fleet(), None, None, NOW)
    assert "does not exist" in find_condition(missing, "Ready")["message"]  # type: ignore[index]


def test_fleet_report_gives_figures_and_freshness() -> None:
    report = {
        "reportedAt": _iso(NOW - timedelta(seconds=30)),
        "lastReadingTime": _iso(NOW - timedelta(seconds=45)),
        "terminalsOnline": "9",
        "acceptedReadings": "950",
        "rejectedReadings": "50",
        "quarantinedPayloads": "50",
        "lateReadings": "3",
    }
    status = compute_fleet_status(fleet(), deployment(1), report, NOW)
    assert (status["terminalsOnline"], status["qualityScore"], status["quarantinedPayloads"]) == (9, 95, 50)
    assert status["lateReadings"] == 3
    assert status["dataFreshnessSeconds"] == 15
    assert find_condition(status, "DataFresh")["status"] == "True"  # type: ignore[index]
    stale = compute_fleet_status(fleet(), deployment(1), report, NOW + timedelta(minutes=10))
    ready = find_condition(stale, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "ReadingsStale")


def test_a_worker_being_replaced_keeps_ingestion_available_and_a_new_one_does_not() -> None:
    running = compute_fleet_status(fleet(), deployment(1), None, NOW)
    later = NOW + timedelta(minutes=1)
    replacing = compute_fleet_status(fleet(running), deployment(0, rolling=True), None, later)
    assert status_patch(running, replacing) is None  # readings wait on the stream: no flap, no write
    never_ran = compute_fleet_status(fleet(), deployment(0, rolling=True), None, NOW)
    assert find_condition(never_ran, "IngestionAvailable")["status"] == "False"  # type: ignore[index]
    # the old worker stopped, the controller not yet saying it rolls: the new template has no pod
    stopped = deployment(0)
    stopped["status"]["updatedReplicas"] = 0
    assert status_patch(running, compute_fleet_status(fleet(running), stopped, None, later)) is None
    stuck = compute_fleet_status(fleet(running), deployment(0), None, NOW + timedelta(minutes=15))
    assert find_condition(stuck, "IngestionAvailable")["status"] == "False"  # type: ignore[index]


def test_recomputing_an_unchanged_status_is_a_no_op() -> None:
    first = compute_fleet_status(fleet(), deployment(1), None, NOW)
    again = compute_fleet_status(fleet(first), deployment(1), None, NOW + timedelta(hours=1))
    assert status_patch(first, again) is None
    flipped = compute_fleet_status(fleet(first), deployment(0), None, NOW + timedelta(hours=1))
    patch = status_patch(first, flipped)
    assert patch is not None
    assert set(patch) == {"conditions"}
    assert find_condition(flipped, "Ready")["lastTransitionTime"] == _iso(NOW + timedelta(hours=1))  # type: ignore[index]
    assert find_condition(flipped, "DataFresh")["lastTransitionTime"] == _iso(NOW)  # type: ignore[index]


def test_status_patch_removes_fields_no_longer_observed() -> None:
    assert status_patch({"a": 1, "b": 2}, {"a": 1}) == {"b": None}
    assert status_patch(None, {}) is None


def test_set_conditions_keeps_other_types() -> None:
    merged = set_conditions(
        [{"type": "Joined", "status": "True", "lastTransitionTime": "t0"}],
        [{"type": "Ready", "status": "True"}],
        "t1",
    )
    assert [c["type"] for c in merged] == ["Joined", "Ready"]


def model(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "burst-detector", "generation": 1},
        "status": status,
        "spec": {"registeredModel": "water-burst-detector", "alias": "champion"},
    }


RESOLVED = ResolvedModel(
    "water-burst-detector", "4", "models:/water-burst-detector/4", "sha256:" + "b" * 64, "run-1", {"f1": 0.91}
)


def test_model_status_reports_resolution_and_metrics() -> None:
    status = compute_model_status(model(), RESOLVED, None, NOW)
    assert status["resolvedVersion"] == "4"
    assert status["metrics"] == [{"name": "f1", "value": 0.91}]
    assert find_condition(status, "Degraded")["status"] == "False"  # type: ignore[index]


def test_missing_alias_degrades_with_its_reason() -> None:
    error = ModelResolutionError(
        "AliasNotFound", "registered model 'water-burst-detector' has no alias 'champion'"
    )
    status = compute_model_status(model(), None, error, NOW)
    ready, degraded = find_condition(status, "Ready"), find_condition(status, "Degraded")
    assert ready is not None
    assert degraded is not None
    assert (ready["status"], ready["reason"]) == ("False", "AliasNotFound")
    assert (degraded["status"], degraded["reason"]) == ("True", "AliasNotFound")
    assert "resolvedVersion" not in status


def test_unreachable_registry_keeps_the_verified_version() -> None:
    resolved = compute_model_status(model(), RESOLVED, None, NOW)
    error = ModelResolutionError("RegistryUnreachable", "no answer", permanent=False)
    status = compute_model_status(model(resolved), None, error, NOW)
    assert status["resolvedVersion"] == "4"
    assert find_condition(status, "Ready")["status"] == "True"  # type: ignore[index]
    assert find_condition(status, "Degraded")["reason"] == "RegistryUnreachable"  # type: ignore[index]


def test_a_refused_artifact_keeps_the_verified_version_running() -> None:
    from citynerve.operators.federation.agent import object_readiness  # noqa: PLC0415

    resolved = compute_model_status(model(), RESOLVED, None, NOW)
    error = ModelResolutionError("ArtifactDigestMismatch", "version 5's artifact does not match its digest")
    status = compute_model_status(model(resolved), None, error, NOW)
    assert status["resolvedVersion"] == "4"  # the scenario keeps running the verified version
    assert find_condition(status, "Ready")["reason"] == "LastResolutionInUse"  # type: ignore[index]
    assert find_condition(status, "Degraded")["reason"] == "ArtifactDigestMismatch"  # type: ignore[index]
    # ...and the hub learns that the version it sent is not the one running
    assert object_readiness({"kind": "AnalyticsModel", "status": status})[:2] == (
        "False", "ArtifactDigestMismatch")
    fresh = compute_model_status(model(), None, error, NOW)  # nothing verified before: nothing runs
    assert find_condition(fresh, "Ready")["status"] == "False"  # type: ignore[index]


def scenario(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "burst", "namespace": "city", "generation": 3},
        "status": status,
        "spec": {"fleets": [{"name": "pudong-pressure"}], "models": [{"name": "burst-detector"}], **spec},
    }


def test_missing_references_name_the_missing_object() -> None:
    unmet = missing_references(scenario(), {}, {})
    assert unmet is not None
    assert unmet[0] == "FleetNotFound"
    assert "pudong-pressure" in unmet[1]
    unmet = missing_references(scenario(), {"pudong-pressure": {}}, {})
    assert unmet is not None
    assert (unmet[0], "burst-detector" in unmet[1]) == ("ModelNotFound", True)
    not_ready = {
        "burst-detector": {
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "False",
                        "reason": "AliasNotFound",
                        "message": "no alias champion",
                    }
                ]
            }
        }
    }
    unmet = missing_references(scenario(), {"pudong-pressure": {}}, not_ready)
    assert unmet is not None
    assert unmet[0] == "ModelNotReady"
    assert "AliasNotFound" in unmet[1]


def test_scenario_ready_follows_the_workload() -> None:
    running = WorkloadObservation("ray.io/v1", "RayJob", "burst-abc", "Running", ready_replicas=2)
    status = compute_scenario_status(scenario(), None, running, 1, NOW)
    assert status["workload"] == {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": "burst-abc"}
    assert (status["readyReplicas"], status["openIncidents"]) == (2, 1)
    assert find_condition(status, "Ready")["reason"] == "WorkloadRunning"  # type: ignore[index]
    failed = WorkloadObservation("ray.io/v1", "RayJob", "burst-abc", "Failed", message="boom")
    status = compute_scenario_status(scenario(), None, failed, 0, NOW)
    assert "boom" in find_condition(status, "Ready")["message"]  # type: ignore[index]
    suspended = compute_scenario_status(scenario(replicas=0), None, None, 0, NOW)
    assert find_condition(suspended, "Ready")["reason"] == "Suspended"  # type: ignore[index]
    unmet = compute_scenario_status(scenario(), ("FleetNotFound", "SensorFleet x not found"), None, 0, NOW)
    assert find_condition(unmet, "Ready")["message"] == "SensorFleet x not found"  # type: ignore[index]


def test_scenario_shows_refused_alert_routes_apart_from_ready() -> None:
    routes = [{"name": "desk", "url": "http://169.254.169.254/", "secretRef": {"name": "s", "key": "k"}}]
    running = WorkloadObservation("ray.io/v1", "RayJob", "burst-abc", "Running", ready_replicas=2)
    message = "alert route desk (http://169.254.169.254) is refused"
    refused = compute_scenario_status(scenario(alertRoutes=routes), None, running, 0, NOW, [message])
    accepted = find_condition(refused, "AlertRoutesAccepted")
    assert accepted is not None
    assert (accepted["status"], accepted["reason"]) == ("False", "RouteRefused")
    assert "alert route desk" in accepted["message"]
    assert find_condition(refused, "Ready")["status"] == "True"  # type: ignore[index]  # the workload still runs
    fine = compute_scenario_status(scenario(alertRoutes=routes), None, running, 0, NOW)
    assert find_condition(fine, "AlertRoutesAccepted")["status"] == "True"  # type: ignore[index]


def test_incident_response_times_are_measured_from_transitions() -> None:
    incident = {
        "metadata": {"name": "i", "generation": 3},
        "status": None,
        "spec": {
            "detectedAt": "2026-07-12T04:15:00Z",
            "state": "OnSite",
            "transitions": [
                {"state": "Detected", "time": "2026-07-12T04:15:00Z", "actor": "scenario/x"},
                {"state": "Dispatched", "time": "2026-07-12T04:17:10Z", "actor": "officer"},
                {"state": "OnSite", "time": "2026-07-12T04:52:40Z", "actor": "crew"},
            ],
        },
    }
    after = NOW + timedelta(hours=1)  # the crew was on site at 04:52
    status = compute_incident_status(incident, ["water:OnSite"], [], after)
    assert (status["dispatchSeconds"], status["responseSeconds"]) == (130, 2260)
    assert "resolutionSeconds" not in status
    assert status["notifiedRoutes"] == ["water:OnSite"]
    assert "deliveryRetries" not in status
    retries = [
        {"route": "desk", "state": "OnSite", "attempts": 2, "reason": "Redirected",
         "message": "route desk moved"},
        {"route": "water", "state": "OnSite", "attempts": 1, "reason": "ReceiverTimeout",
         "message": "route water slow"},
    ]
    failed = compute_incident_status(incident, [], retries, after)
    notified = find_condition(failed, "Notified")
    assert notified is not None
    assert (notified["status"], notified["reason"]) == ("False", "Redirected")
    assert notified["message"] == "route desk moved; route water slow"  # every failing route named
    assert failed["deliveryRetries"] == retries


def test_an_incident_timed_in_the_future_measures_no_response_time() -> None:
    detected = NOW - timedelta(minutes=40)
    spec: dict[str, Any] = {
        "detectedAt": _iso(detected),
        "transitions": [
            {"state": "Detected", "time": _iso(detected)},
            {"state": "Dispatched", "time": _iso(detected + timedelta(minutes=5))},
            {"state": "OnSite", "time": _iso(detected + timedelta(minutes=30))},
        ],
    }
    times, measured = measure_response_times(spec, NOW, 4)
    assert times == {"dispatchSeconds": 300, "responseSeconds": 1800, "resolutionSeconds": None}
    assert (measured["type"], measured["status"], measured["reason"]) == ("Measured", "True",
                                                                        "TransitionsRecorded")
    # A clock a little ahead (within the skew allowed) is still measured.
    spec["transitions"].append({"state": "Resolved", "time": _iso(NOW + timedelta(minutes=4))})
    assert measure_response_times(spec, NOW, 4)[0]["resolutionSeconds"] == 44 * 60
    # detectedAt: 9999-12-31 (transitions after it, as the API server requires): no figure at all.
    far = {"detectedAt": "9999-12-31T00:00:00Z", "transitions": [
        {"state": "Detected", "time": "9999-12-31T00:00:00Z"},
        {"state": "OnSite", "time": "9999-12-31T00:05:00Z"}]}
    times, measured = measure_response_times(far, NOW, 4)
    assert set(times.values()) == {None}
    assert (measured["status"], measured["reason"]) == ("False", "TimeInFuture")
    assert measured["observedGeneration"] == 4
    assert measured["message"].startswith("spec.detectedAt 9999-12-31T00:00:00Z and the Detected transition")
    assert "recreate the Incident" in measured["message"]
    # A resolution recorded a day ahead would shorten nothing: the whole incident is left out.
    spec["transitions"][-1]["time"] = _iso(NOW + timedelta(days=1))
    times, measured = measure_response_times(spec, NOW, 4)
    assert set(times.values()) == {None}
    assert "the Resolved transition at 2026-07-13T04:00:00Z" in measured["message"]
