"""Status that tells the truth: every printer column filled, units in columns, Events (pure)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from citynerve.models.registry import ResolvedModel
from citynerve.operators.api import KINDS
from citynerve.operators.api.common import DURATION
from citynerve.operators.api.events import (
    EVENT_REASONS,
    MODEL_SWAPPED,
    WORKLOAD_FAILED,
    WORKLOAD_STARTED,
)
from citynerve.operators.city import alerts
from citynerve.operators.city.status import (
    WorkloadObservation,
    compute_fleet_status,
    compute_incident_status,
    compute_model_status,
    compute_scenario_status,
    incident_detected_message,
    running_models,
    scenario_events,
)
from citynerve.operators.conditions import duration, find_condition, sentence, status_patch
from citynerve.operators.federation.agent import rollup
from citynerve.operators.federation.placement import manifest_hash, render_sensor_type, work_name
from citynerve.operators.hub.promotion import Observations, RegistryView, promotion_step
from citynerve.operators.hub.status import city_status, federated_scenario_status, sensor_type_status

pytestmark = pytest.mark.timeout(20)
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
NOW = dt.datetime(2026, 7, 12, 4, 0, tzinfo=dt.UTC)
DIGEST = "sha256:" + "a" * 64


def _iso(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _sample(path: str, name: str | None = None) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((SAMPLES / path).read_text()) if d]
    doc = next(d for d in docs if name is None or d["metadata"]["name"] == name)
    doc["metadata"].setdefault("namespace", "citynerve")
    doc["metadata"]["generation"] = 1
    return dict(doc)


# --- a tiny reader of the JSON paths printer columns use --------------------------------------------
_FILTER = re.compile(r'^(.*)\[\?\(@\.type=="(\w+)"\)\](.*)$')


def _field(node: Any, path: str) -> Any:
    for part in path.strip(".").split("."):
        node = (node or {}).get(part) if part else node
    return node


def column_value(obj: dict[str, Any], json_path: str) -> Any:
    """What `kubectl get` shows in a column: ``.a.b`` or ``.status.conditions[?(@.type=="X")].status``."""
    match = _FILTER.match(json_path)
    if match is None:
        return _field(obj, json_path)
    chosen = next((c for c in _field(obj, match[1]) or [] if c.get("type") == match[2]), None)
    return _field(chosen, match[3])


def test_column_value_reads_fields_and_conditions() -> None:
    obj = {"spec": {"a": 1}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    assert column_value(obj, ".spec.a") == 1
    assert column_value(obj, '.status.conditions[?(@.type=="Ready")].status') == "True"
    assert column_value(obj, '.status.conditions[?(@.type=="Joined")].status') is None


# --- each kind as its operators leave it, from the samples -----------------------------------------
def _hub_city() -> dict[str, Any]:
    city = _sample("hub/city-shanghai.yaml")
    city["spec"]["approved"] = True
    lease = {"spec": {"renewTime": _iso(NOW - dt.timedelta(seconds=3))}}
    work = {"sensortype-pipe-pressure-gauge": "h1"}
    report = {"objects": {"sensortype-pipe-pressure-gauge": {"hash": "h1", "applied": True, "ready": "True"}}}
    fleet = {"spec": {"sensorType": "pipe-pressure-gauge"}, "status": {"terminalsOnline": 4187}}
    scenario = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    city["status"] = {**city_status(city, lease, report, work, NOW), **rollup([fleet], [scenario], [])}
    return city


def _sensor_type() -> dict[str, Any]:
    sensor_type = _sample("sensortypes/pipe-pressure-gauge.yaml")
    held = {"hash": manifest_hash(render_sensor_type(sensor_type)), "applied": True}
    reports = {"shanghai": {"objects": {work_name("SensorType", sensor_type["metadata"]["name"]): held}}}
    cities = [{"metadata": {"name": "shanghai"}, "spec": {"approved": True}}]
    sensor_type["status"] = sensor_type_status(sensor_type, cities, reports, NOW)
    return sensor_type


def _federated() -> dict[str, Any]:
    federated = _sample("hub/federatedscenario-urban-flood.yaml")
    city = _sample("hub/city-shanghai.yaml")
    city["spec"]["approved"] = True
    federated["metadata"]["name"] = "fs"
    name = work_name("Scenario", "fs")
    report = {"objects": {name: {"hash": "h", "applied": True, "ready": "True"}}}
    federated["status"] = federated_scenario_status(federated, [city], {"shanghai": report}, NOW)
    return federated


def _promotion() -> dict[str, Any]:
    promotion = _sample("hub/modelpromotion-water-burst.yaml")
    promotion["spec"]["gates"] = []
    cities = [{"metadata": {"name": "shanghai", "labels": {"region": "east"}}, "spec": {"approved": True}}]
    registry = RegistryView(version="8", digest=DIGEST, metrics={}, scenario_kind="water-burst")
    _, promotion["status"] = promotion_step(promotion, Observations(NOW, cities, {}, registry))
    return promotion


def _fleet() -> dict[str, Any]:
    fleet = _sample("city/sensorfleets.yaml", "pudong-pressure")
    deployment = {"metadata": {"name": "d"}, "spec": {"replicas": 1}, "status": {"availableReplicas": 1}}
    report = {"reportedAt": _iso(NOW - dt.timedelta(seconds=20)), "terminalsOnline": "40",
              "lastReadingTime": _iso(NOW - dt.timedelta(seconds=150)), "acceptedReadings": "80",
              "rejectedReadings": "1", "quarantinedPayloads": "1"}
    fleet["status"] = compute_fleet_status(fleet, deployment, report, NOW, "found")
    return fleet


def _model() -> dict[str, Any]:
    model = _sample("city/analyticsmodels.yaml", "burst-detector")
    resolved = ResolvedModel("water-burst-detector", "3", "models:/water-burst-detector/3", DIGEST, "run",
                             {"f1": 0.9}, verified=True)
    model["status"] = compute_model_status(model, resolved, None, NOW)
    return model


def _scenario() -> dict[str, Any]:
    scenario = _sample("city/scenario-water-burst.yaml")
    workload = WorkloadObservation("ray.io/v1", "RayJob", "burst-1", "Running", ready_replicas=1)
    scenario["status"] = compute_scenario_status(scenario, None, workload, 2, NOW)
    return scenario


def _incident() -> dict[str, Any]:
    incident = _sample("city/incident-water-burst.yaml")
    incident["status"] = compute_incident_status(incident, [], [], NOW + dt.timedelta(hours=2))
    return incident


OBJECTS = {
    "City": _hub_city,
    "SensorType": _sensor_type,
    "FederatedScenario": _federated,
    "ModelPromotion": _promotion,
    "SensorFleet": _fleet,
    "AnalyticsModel": _model,
    "Scenario": _scenario,
    "Incident": _incident,
}


@pytest.mark.parametrize("info", KINDS, ids=lambda info: info.kind)
def test_every_printer_column_is_filled_by_the_operator_that_owns_the_object(info: Any) -> None:
    obj = OBJECTS[info.kind]()
    empty = [c.name for c in info.printer_columns
             if c.json_path != ".metadata.creationTimestamp" and column_value(obj, c.json_path) in (None, "")]
    assert empty == [], f"{info.kind}: columns {', '.join(empty)} are empty"


# --- units in columns ------------------------------------------------------------------------------
@pytest.mark.parametrize(("seconds", "shown"), [
    (0, "0s"), (4, "4s"), (15, "15s"), (60, "1m"), (130, "2m10s"), (3720, "1h2m"), (90061, "1d1h1m1s"),
])
def test_durations_read_as_kubectl_shows_them(seconds: int, shown: str) -> None:
    assert duration(seconds) == shown
    assert re.fullmatch(DURATION, shown)


def test_freshness_and_response_carry_their_units_beside_the_seconds() -> None:
    fleet = _fleet()["status"]
    assert (fleet["dataFreshnessSeconds"], fleet["dataFreshness"]) == (130, "2m10s")
    incident = _incident()
    detected = dt.datetime.fromisoformat(incident["spec"]["detectedAt"])
    on_site = next(dt.datetime.fromisoformat(t["time"]) for t in incident["spec"]["transitions"]
                   if t["state"] == "OnSite")
    seconds = int((on_site - detected).total_seconds())
    assert incident["status"]["responseSeconds"] == seconds
    assert incident["status"]["responseTime"] == duration(seconds)


def test_messages_become_sentences_without_renaming_anything() -> None:
    assert sentence("waiting for chengdu") == "Waiting for chengdu."
    assert sentence("water-burst-detector version 2 is refused: no city") == (
        "water-burst-detector version 2 is refused: no city."
    )
    assert sentence("Already one.") == "Already one."
    assert sentence("") == ""


def test_promotion_conditions_and_events_are_sentences() -> None:
    promotion = _promotion()
    for condition in promotion["status"]["conditions"]:
        assert condition["message"] == "" or condition["message"].endswith("."), condition
    assert find_condition(promotion["status"], "Complete")["message"].startswith("Promoting version 8")  # type: ignore[index]


# --- a fleet whose SensorType is missing -----------------------------------------------------------
def test_a_fleet_naming_a_missing_sensor_type_is_not_ready_and_names_it() -> None:
    fleet = _fleet()
    deployment = {"metadata": {"name": "d"}, "spec": {"replicas": 1}, "status": {"availableReplicas": 1}}
    missing = compute_fleet_status(fleet, deployment, None, NOW, "missing")
    ready = find_condition(missing, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "SensorTypeNotFound")
    assert "SensorType pipe-pressure-gauge" in ready["message"]
    assert ready["message"].endswith(".")
    fleet["status"] = missing
    arrived = compute_fleet_status(fleet, deployment, None, NOW + dt.timedelta(seconds=5), "found")
    assert find_condition(arrived, "Ready")["status"] == "True"  # type: ignore[index]
    assert find_condition(arrived, "SensorTypeFound")["status"] == "True"  # type: ignore[index]
    unreadable = compute_fleet_status(fleet, deployment, None, NOW, "unreadable")
    assert find_condition(unreadable, "SensorTypeFound")["reason"] == "CatalogueUnreadable"  # type: ignore[index]
    assert find_condition(unreadable, "Ready")["status"] == "True"  # type: ignore[index]


# --- Scenario Events -------------------------------------------------------------------------------
def _payload(version: str, digest: str) -> dict[str, Any]:
    return {"models": [{"name": "burst-detector", "version": version, "artifactDigest": digest}]}


def test_a_scenario_tells_when_its_workload_starts_fails_and_swaps_its_model() -> None:
    scenario = _sample("city/scenario-water-burst.yaml")
    old, new = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    pending = WorkloadObservation("ray.io/v1", "RayJob", "burst-aaa", "Pending")
    desired = compute_scenario_status(scenario, None, pending, 0, NOW, (), running_models(_payload("1", old)))
    assert scenario_events(scenario, desired) == []
    scenario["status"] = desired
    running = WorkloadObservation("ray.io/v1", "RayJob", "burst-aaa", "Running", 1)
    desired = compute_scenario_status(scenario, None, running, 0, NOW, (), running_models(_payload("1", old)))
    events = scenario_events(scenario, desired)
    assert [e[0] for e in events] == [WORKLOAD_STARTED]
    assert "RayJob burst-aaa" in events[0][1]
    assert "burst-detector version 1" in events[0][1]
    scenario["status"] = desired
    assert scenario_events(scenario, compute_scenario_status(
        scenario, None, running, 0, NOW, (), running_models(_payload("1", old)))) == []  # nothing new

    # A promotion resolves version 2: a new revision starts, and runs with it.
    swapped = WorkloadObservation("ray.io/v1", "RayJob", "burst-bbb", "Pending")
    desired = compute_scenario_status(scenario, None, swapped, 0, NOW, (), running_models(_payload("2", new)))
    assert desired["models"] == scenario["status"]["models"]  # not swapped until it runs
    scenario["status"] = desired
    swapped = WorkloadObservation("ray.io/v1", "RayJob", "burst-bbb", "Running", 1)
    desired = compute_scenario_status(scenario, None, swapped, 0, NOW, (), running_models(_payload("2", new)))
    events = scenario_events(scenario, desired)
    assert [e[0] for e in events] == [WORKLOAD_STARTED, MODEL_SWAPPED]
    assert f"version 2 (artifact {new})" in events[1][1]
    assert f"version 1 (artifact {old}) before" in events[1][1]
    scenario["status"] = desired

    failed = WorkloadObservation("ray.io/v1", "RayJob", "burst-bbb", "Failed", message="the head pod crashed")
    desired = compute_scenario_status(scenario, None, failed, 0, NOW, ())
    events = scenario_events(scenario, desired)
    assert [e[0] for e in events] == [WORKLOAD_FAILED]
    assert "the head pod crashed" in events[0][1]
    for _, message in events:
        assert "[" not in message  # sentences, no reprs
        assert "{" not in message


# --- Incident Events -------------------------------------------------------------------------------
def test_an_incident_is_told_once_as_detected() -> None:
    incident = _sample("city/incident-water-burst.yaml")
    message = incident_detected_message(incident)
    assert message is not None
    spec = incident["spec"]
    for part in (spec["scenarioRef"]["name"], spec["kind"], spec["severity"], spec["location"]["assetId"]):
        assert str(part) in message
    incident["status"] = compute_incident_status(incident, [], [], NOW + dt.timedelta(hours=2))
    assert incident_detected_message(incident) is None  # reconciled before: not told again


def test_alert_events_name_state_route_and_why() -> None:
    route = {"name": "duty-desk", "url": "https://desk.example/alerts?token=secret", "secretRef": {}}
    delivery = alerts.Delivery(route, "Detected")
    delivered = alerts.delivered_event_message(delivery)
    assert "State Detected" in delivered
    assert "duty-desk (https://desk.example)" in delivered
    assert "token" not in delivered
    retries = alerts.record_failure({}, delivery, alerts.AlertDeliveryError("ReceiverRefused", "it said 500"),
                                    NOW, 5.0, 300.0)
    failed = alerts.failure_event_message(retries["duty-desk"])
    assert "(ReceiverRefused): it said 500; attempt 1 failed" in failed


# --- hub: FederatedScenario Ready and SensorType Propagated ----------------------------------------
def test_a_federated_scenario_is_ready_when_ready_in_every_selected_city() -> None:
    federated = _sample("hub/federatedscenario-urban-flood.yaml")
    federated["metadata"]["name"] = "fs"
    cities = []
    for name in ("shanghai", "chengdu"):
        city = _sample("hub/city-shanghai.yaml")
        city["metadata"]["name"] = name
        city["spec"]["approved"] = True
        cities.append(city)
    federated["spec"]["placement"] = {"cities": ["shanghai", "chengdu"]}
    federated["spec"]["overrides"] = []
    wname = work_name("Scenario", "fs")
    reports = {
        "shanghai": {"objects": {wname: {"hash": "h", "applied": True, "ready": "True"}}},
        "chengdu": {"objects": {wname: {"hash": "h", "applied": True, "ready": "False",
                                        "reason": "FleetNotFound", "message": "SensorFleet x not found."}}},
    }
    status = federated_scenario_status(federated, cities, reports, NOW)
    ready = find_condition(status, "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "NotReadyInSomeCities")
    assert "Ready in 1 of 2 selected cities, not in chengdu." in ready["message"]
    assert "FleetNotFound" in ready["message"]
    reports["chengdu"]["objects"][wname] = {"hash": "h", "applied": True, "ready": "True"}
    federated["status"] = status
    status = federated_scenario_status(federated, cities, reports, NOW)
    assert find_condition(status, "Ready")["status"] == "True"  # type: ignore[index]
    assert status_patch(status, federated_scenario_status({**federated, "status": status}, cities, reports,
                                                          NOW + dt.timedelta(minutes=1))) is None


def test_a_sensor_type_counts_the_cities_that_hold_its_current_spec() -> None:
    sensor_type = _sample("sensortypes/pipe-pressure-gauge.yaml")
    wname = work_name("SensorType", sensor_type["metadata"]["name"])
    current = manifest_hash(render_sensor_type(sensor_type))
    cities = [{"metadata": {"name": n}, "spec": {"approved": True}} for n in ("shanghai", "chengdu")]
    cities.append({"metadata": {"name": "wuhan"}, "spec": {"approved": False}})  # takes no work
    reports = {"shanghai": {"objects": {wname: {"hash": current, "applied": True}}},
               "chengdu": {"objects": {wname: {"hash": "an-older-spec", "applied": True}}}}
    status = sensor_type_status(sensor_type, cities, reports, NOW)
    propagated = find_condition(status, "Propagated")
    assert status["propagatedCities"] == 1
    assert propagated is not None
    assert (propagated["status"], propagated["reason"]) == ("False", "Propagating")
    assert "waiting for chengdu." in propagated["message"]
    reports["chengdu"] = reports["shanghai"]
    status = sensor_type_status(sensor_type, cities, reports, NOW)
    assert (status["propagatedCities"], find_condition(status, "Propagated")["status"]) == (2, "True")  # type: ignore[index]
    nobody = sensor_type_status(sensor_type, [], {}, NOW)
    assert find_condition(nobody, "Propagated")["reason"] == "NoCityJoined"  # type: ignore[index]


# --- the docs list every column, condition and Event reason ------------------------------------------
def test_the_status_page_lists_every_printer_column_and_event_reason() -> None:
    page = (ROOT / "docs" / "status-and-events.md").read_text()
    for info in KINDS:
        assert f"## {info.kind}" in page, info.kind
        section = page.split(f"## {info.kind}", 1)[1].split("\n## ", 1)[0]
        for column in info.printer_columns:
            assert f"`{column.name.upper()}`" in section, (info.kind, column.name)
    for reason in EVENT_REASONS:
        section = page.split(f"## {reason.kind}", 1)[1].split("\n## ", 1)[0]
        assert f"`{reason.reason}`" in section, reason
    readme = (ROOT / "README.md").read_text().split("## Documentation", 1)[1]
    assert "docs/status-and-events.md" in readme
