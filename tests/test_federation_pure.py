"""Placement, onboarding decisions, hub status and the agent's roll-up, without a cluster."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml
from citynerve.operators.federation import onboarding
from citynerve.operators.federation.agent import incident_digest, object_readiness, rollup
from citynerve.operators.federation.placement import (
    desired_work,
    manifest_of,
    placed_cities,
    render_scenario,
    work_changes,
)
from citynerve.operators.hub.status import (
    CITY_LABELS_ANNOTATION,
    city_conditions,
    city_label_changes,
    federated_scenario_status,
    merge_condition,
)

pytestmark = pytest.mark.timeout(30)
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
NOW = dt.datetime(2026, 11, 25, 8, 0, tzinfo=dt.UTC)


def city(name: str, region: str, approved: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"region": region}, "generation": 1},
            "spec": {"approved": approved, "region": region,
                     "connection": {"heartbeatIntervalSeconds": 10, "heartbeatTimeoutSeconds": 40}}}


CITIES = [city("shanghai", "east"), city("hangzhou", "east"), city("chengdu", "west"),
          city("wuhan", "east", approved=False)]


def federated() -> dict[str, Any]:
    path = SAMPLES / "hub" / "federatedscenario-urban-flood.yaml"
    body: dict[str, Any] = yaml.safe_load(path.read_text())
    return body


def test_placement_selects_by_label_or_name_and_only_joined_cities() -> None:
    spec = federated()["spec"]  # region=east plus chengdu by name
    assert placed_cities(spec, CITIES) == ["chengdu", "hangzhou", "shanghai"]  # wuhan not approved
    spec["placement"] = {"cities": ["wuhan"]}
    spec["overrides"] = []
    assert placed_cities(spec, CITIES) == []


def test_overrides_apply_to_their_city_only() -> None:
    body = federated()
    chengdu = render_scenario("flood", body["spec"], "chengdu")
    shanghai = render_scenario("flood", body["spec"], "shanghai")
    assert chengdu["spec"]["mode"] == "drill"
    assert chengdu["spec"]["simulation"]["engine"] == "swmm"
    assert chengdu["spec"]["thresholds"] == [
        {"metric": "waterLevelMm", "unitCode": "MMT", "warning": 200, "alarm": 300}]
    assert shanghai["spec"]["mode"] == "live"
    assert len(shanghai["spec"]["thresholds"]) == 2
    assert shanghai["metadata"]["labels"] == {"citynerve.io/programme": "flood-season-2026"}


def test_desired_work_and_changes_write_only_differences() -> None:
    sensor_type = {"metadata": {"name": "rain-gauge"}, "spec": {"displayName": "Rain gauge"}}
    work = desired_work(CITIES[2], [sensor_type], [federated()], CITIES)
    assert sorted(work) == ["scenario-urban-flood-watch", "sensortype-rain-gauge"]
    assert manifest_of(work["sensortype-rain-gauge"])["spec"] == sensor_type["spec"]
    assert desired_work(CITIES[3], [sensor_type], [federated()], CITIES) == {}  # not joined

    assert work_changes(work, work) == ([], [], [])
    changed = desired_work(CITIES[2], [{**sensor_type, "spec": {"displayName": "Gauge"}}], [], CITIES)
    create, update, delete = work_changes(changed, work)
    assert (create, [u["metadata"]["name"] for u in update], delete) == (
        [], ["sensortype-rain-gauge"], ["scenario-urban-flood-watch"])


def test_city_conditions_follow_the_lease_and_the_report() -> None:
    hashes = {"sensortype-a": "h1"}
    fresh = {"spec": {"renewTime": "2026-11-25T07:59:50.000000Z"}}
    stale = {"spec": {"renewTime": "2026-11-25T07:58:00.000000Z"}}
    report = {"objects": {"sensortype-a": {"hash": "h1", "applied": True}}}
    conds = {c["type"]: c for c in city_conditions(CITIES[0], fresh, report, hashes, NOW)}
    assert (conds["Joined"]["status"], conds["Reachable"]["status"], conds["Ready"]["status"]) == (
        "True", "True", "True")
    conds = {c["type"]: c for c in city_conditions(CITIES[0], stale, report, hashes, NOW)}
    assert conds["Reachable"]["reason"] == "HeartbeatMissed"
    assert "nothing is deleted" in conds["Reachable"]["message"]
    assert conds["Ready"]["reason"] == "Unreachable"
    conds = {c["type"]: c for c in city_conditions(CITIES[0], fresh, {"objects": {}}, hashes, NOW)}
    assert conds["Ready"]["reason"] == "Propagating"
    failed = {"objects": {"sensortype-a": {"hash": "h1", "applied": False, "message": "spec.x: bad"}}}
    conds = {c["type"]: c for c in city_conditions(CITIES[0], fresh, failed, hashes, NOW)}
    assert conds["Ready"]["reason"] == "ApplyFailed"
    assert "spec.x: bad" in conds["Ready"]["message"]


def test_an_offboarded_city_is_marked_so_and_takes_no_work() -> None:
    shanghai = city("shanghai", "east")
    lease = {"spec": {"renewTime": "2026-11-25T07:59:55+00:00"}}
    report = {"objects": {}, "incidents": [], "offboardedAt": "2026-11-25T07:59:58Z"}
    conditions = city_conditions(shanghai, lease, report, {"st-x": "h1"}, NOW)
    state = {c["type"]: (c["status"], c["reason"]) for c in conditions}
    assert state == dict.fromkeys(("Joined", "Reachable", "Ready"), ("False", "Offboarded"))
    assert "kubectl delete city shanghai" in conditions[0]["message"]
    gone = {**shanghai, "status": {"conditions": conditions}}
    assert desired_work(gone, [{"metadata": {"name": "x"}, "spec": {}}], [], [gone]) == {}
    spec = {**federated()["spec"], "placement": {"cities": ["shanghai"]}, "overrides": []}
    assert placed_cities(spec, [shanghai]) == ["shanghai"]
    assert placed_cities(spec, [gone]) == []


def test_city_labels_follow_the_chart_and_leave_the_administrators_alone() -> None:
    shanghai = city("shanghai", "east")
    shanghai["metadata"]["labels"] |= {"owner": "ops", "tier": "pilot"}
    # First report: the labels it sets are already there; only the claim is recorded.
    first = city_label_changes(shanghai, {"labels": {"region": "east", "tier": "pilot"}})
    assert first == {"annotations": {CITY_LABELS_ANNOTATION: '["region", "tier"]'}}
    shanghai["metadata"]["annotations"] = first["annotations"]
    # An upgrade changes one, drops one and adds a reserved one, which is ignored.
    report = {"labels": {"tier": "production", "citynerve.io/hub": "x"}}
    assert city_label_changes(shanghai, report) == {
        "labels": {"tier": "production", "region": None},
        "annotations": {CITY_LABELS_ANNOTATION: '["tier"]'}}
    assert city_label_changes(shanghai, {"objects": {}}) == {}  # an agent that reports none
    assert city_label_changes(shanghai, {**report, "offboardedAt": "2026-11-25T07:59:58Z"}) == {}


def test_merge_condition_moves_transition_time_only_on_change() -> None:
    first = merge_condition([], "Ready", "True", "Ok", "fine", NOW)
    later = NOW + dt.timedelta(minutes=5)
    same = merge_condition(first, "Ready", "True", "Ok", "still fine", later)
    assert same[0]["lastTransitionTime"] == first[0]["lastTransitionTime"]
    flipped = merge_condition(first, "Ready", "False", "Broken", "not fine", later)
    assert flipped[0]["lastTransitionTime"] == "2026-11-25T08:05:00Z"


def test_federated_scenario_status_reports_each_city() -> None:
    body = federated()
    body["metadata"]["generation"] = 2
    reports = {"chengdu": {"objects": {"scenario-urban-flood-watch": {"applied": True, "ready": "True"}}},
               "shanghai": {"objects": {"scenario-urban-flood-watch": {"applied": False, "message": "bad"}}}}
    status = federated_scenario_status(body, CITIES, reports, NOW)
    by_city = {c["city"]: c for c in status["cities"]}
    assert status["selectedCities"] == 3
    assert status["readyCities"] == 1
    assert by_city["shanghai"]["propagated"] == "False"
    assert by_city["hangzhou"]["propagated"] == "Unknown"
    propagated = next(c for c in status["conditions"] if c["type"] == "Propagated")
    assert propagated["reason"] == "Propagating"


def _csr(city_name: str, subject_city: str, username: str) -> dict[str, Any]:
    key = onboarding.new_private_key_pem()
    manifest = onboarding.csr_manifest(subject_city, key)
    manifest["metadata"]["labels"][onboarding.CSR_CITY_LABEL] = city_name
    manifest["spec"]["username"] = username
    return manifest


def test_csr_is_approved_only_for_an_approved_city_asking_for_itself() -> None:
    boot = onboarding.bootstrap_user()
    ok, why = onboarding.csr_decision(_csr("shanghai", "shanghai", boot), {"shanghai"})
    assert ok, why
    ok, why = onboarding.csr_decision(_csr("shanghai", "shanghai", boot), set())
    assert not ok
    assert "not approved" in why
    ok, why = onboarding.csr_decision(_csr("shanghai", "chengdu", boot), {"shanghai", "chengdu"})
    assert not ok
    assert "CN=citynerve:city:shanghai" in why
    ok, why = onboarding.csr_decision(_csr("shanghai", "shanghai", "mallory"), {"shanghai"})
    assert not ok
    assert "bootstrap" in why
    bad = _csr("shanghai", "shanghai", boot)
    bad["spec"]["request"] = base64.b64encode(b"garbage").decode()
    assert not onboarding.csr_decision(bad, {"shanghai"})[0]


def test_city_access_grants_no_create_and_names_its_objects() -> None:
    access = onboarding.city_access("chengdu")
    rules = [r for m in access if m["kind"] in ("Role", "ClusterRole") for r in m["rules"]]
    assert all("create" not in r["verbs"] and "delete" not in r["verbs"] for r in rules)
    assert all("secrets" not in r["resources"] for r in rules)
    writes = [r for r in rules if set(r["verbs"]) & {"update", "patch"}]
    assert all(r.get("resourceNames") for r in writes)


def test_rollup_summarises_fleets_scenarios_and_incidents() -> None:
    fleets = [{"spec": {"sensorType": "rain-gauge"}, "status": {"terminalsOnline": 40}},
              {"spec": {"sensorType": "rain-gauge"}, "status": {"terminalsOnline": 2}},
              {"spec": {"sensorType": "pressure"}}]
    scenarios = [{"status": {"conditions": [{"type": "Ready", "status": "True"}]}}, {"status": {}}]
    incidents = [
        {"metadata": {"name": "a", "namespace": "x"},
         "spec": {"state": "Resolved", "detectedAt": "2026-11-25T01:00:00Z", "kind": "water-burst",
                  "severity": "alarm"}},
        {"metadata": {"name": "b", "namespace": "x"},
         "spec": {"state": "Detected", "detectedAt": "2026-11-25T02:00:00Z", "kind": "urban-flood",
                  "severity": "warning"}},
    ]
    status = rollup(fleets, scenarios, incidents)
    assert status["sensorsOnline"] == [{"sensorType": "pressure", "count": 0},
                                       {"sensorType": "rain-gauge", "count": 42}]
    assert (status["sensorsOnlineTotal"], status["activeScenarios"], status["openIncidents"]) == (42, 1, 1)
    assert status["lastIncident"]["name"] == "b"
    assert object_readiness({"kind": "SensorType"}) == ("True", None, None)
    assert object_readiness(None) == ("Unknown", None, None)


def test_incident_digest_is_newest_first_and_leaves_evidence_in_the_city() -> None:
    incidents = [
        {"metadata": {"name": f"i{n}", "namespace": "x"},
         "spec": {"kind": "water-burst", "severity": "alarm", "state": "Detected",
                  "detectedAt": f"2026-11-25T0{n}:00:00Z", "evidence": [{"value": "1"}],
                  "location": {"latitude": "31.2", "longitude": "121.5"},
                  "transitions": [{"state": "Detected", "time": f"2026-11-25T0{n}:00:00Z", "actor": "a"}]}}
        for n in range(3)
    ]
    digest = incident_digest(incidents)
    assert [d["name"] for d in digest] == ["i2", "i1", "i0"]
    assert "evidence" not in digest[0]
    assert digest[0]["transitions"] == [{"state": "Detected", "time": "2026-11-25T02:00:00Z", "actor": "a"}]


def test_an_override_for_a_city_the_selector_never_selects_is_reported_at_once() -> None:
    body = federated()  # region=east plus chengdu by name; chengdu has an override
    body["metadata"]["generation"] = 3
    status = federated_scenario_status(body, CITIES, {}, NOW)
    matched = next(c for c in status["conditions"] if c["type"] == "OverridesMatched")
    assert (matched["status"], matched["reason"]) == ("True", "OverridesSelected")
    # wuhan is east but not approved yet: the selector selects it, so its override is fine.
    body["spec"]["overrides"] += [{"city": "wuhan", "replicas": 2}, {"city": "lhasa", "replicas": 1},
                                  {"city": "nanjing", "replicas": 1}]
    status = federated_scenario_status(body, [*CITIES, city("lhasa", "west")], {}, NOW)
    matched = next(c for c in status["conditions"] if c["type"] == "OverridesMatched")
    assert (matched["status"], matched["reason"]) == ("False", "OverrideForUnselectedCity")
    assert matched["observedGeneration"] == 3
    assert "lhasa, nanjing" in matched["message"]
    assert "wuhan" not in matched["message"]
    assert status["selectedCities"] == 3  # the rest of the placement carries on
    body["spec"]["overrides"] = []
    status = federated_scenario_status(body, CITIES, {}, NOW)
    matched = next(c for c in status["conditions"] if c["type"] == "OverridesMatched")
    assert (matched["status"], matched["reason"]) == ("True", "NoOverrides")
