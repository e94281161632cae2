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
    city_conditions,
    city_status,
    federated_scenario_status,
    labels_accepted,
    lifecycle_events,
    merge_condition,
    status_changes,
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


def test_last_heartbeat_is_the_lease_s_and_an_unchanged_check_writes_nothing() -> None:
    report = {"objects": {"sensortype-a": {"hash": "h1", "applied": True}}}
    lease = {"spec": {"renewTime": "2026-11-25T07:59:50.123456Z"}}
    first = city_status(CITIES[0], lease, report, {"sensortype-a": "h1"}, NOW)
    assert first["lastHeartbeat"] == "2026-11-25T07:59:50Z"
    written = {**CITIES[0], "status": first}
    # A check a moment later, with the same Lease, finds nothing to write.
    again = city_status(written, lease, report, {"sensortype-a": "h1"}, NOW + dt.timedelta(seconds=2))
    assert status_changes(first, again) == {}
    renewed = {"spec": {"renewTime": "2026-11-25T08:00:00.000000Z"}}
    later = city_status(written, renewed, report, {"sensortype-a": "h1"}, NOW + dt.timedelta(seconds=2))
    assert status_changes(first, later)["lastHeartbeat"] == "2026-11-25T08:00:00Z"
    assert "lastHeartbeat" not in city_status(CITIES[0], None, report, {}, NOW)
    # Unreachable: the message says since when, so it does not change (and is not rewritten) each check.
    stale = {"spec": {"renewTime": "2026-11-25T07:58:00.000000Z"}}
    missed = city_status(CITIES[0], stale, report, {}, NOW)
    assert status_changes(missed, city_status({**CITIES[0], "status": missed}, stale, report, {},
                                              NOW + dt.timedelta(seconds=30))) == {}


def test_lifecycle_events_follow_condition_transitions_only() -> None:
    def conds(joined: str, reachable: tuple[str, str] = ("Unknown", "NoHeartbeat"),
              joined_reason: str = "Approved") -> list[dict[str, Any]]:
        return [{"type": "Joined", "status": joined, "reason": joined_reason, "message": "m"},
                {"type": "Reachable", "status": reachable[0], "reason": reachable[1],
                 "message": "No heartbeat from chengdu since 2026-11-25T07:58:00Z (timeout 40 s)."}]

    up, down = ("True", "HeartbeatReceived"), ("False", "HeartbeatMissed")
    approved = lifecycle_events("chengdu", conds("False", joined_reason="AwaitingApproval"), conds("True"))
    assert [(t, r) for t, r, _ in approved] == [("Normal", "Joined")]
    assert lifecycle_events("chengdu", [], conds("True"))[0][1] == "Joined"  # created approved
    assert lifecycle_events("chengdu", conds("True", up), conds("True", up)) == []
    [(kind, reason, message)] = lifecycle_events("chengdu", conds("True", up), conds("True", down))
    assert (kind, reason) == ("Warning", "Unreachable")
    assert "City chengdu stopped sending heartbeats" in message
    assert "since 2026-11-25T07:58:00Z" in message
    assert lifecycle_events("chengdu", conds("True", down), conds("True", down)) == []
    assert [r for _, r, _ in lifecycle_events("chengdu", conds("True", down), conds("True", up))] == [
        "Recovered"]
    assert lifecycle_events("chengdu", conds("True"), conds("True", up)) == []  # first heartbeat
    gone = conds("False", ("False", "Offboarded"), joined_reason="Offboarded")
    [(kind, reason, message)] = lifecycle_events("chengdu", conds("True", up), gone)
    assert (kind, reason) == ("Normal", "Offboarded")
    assert "kubectl delete city chengdu" in message
    assert lifecycle_events("chengdu", gone, gone) == []


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


def test_labels_a_chart_proposes_wait_for_the_administrator() -> None:
    shanghai = city("shanghai", "east")
    shanghai["metadata"]["labels"] |= {"tier": "gold"}
    assert labels_accepted(shanghai, {"objects": {}}) is None  # an agent that proposes none
    assert labels_accepted(shanghai, {"labels": {"region": "east", "tier": "gold"}})[0] == "True"
    status, reason, message = labels_accepted(shanghai, {"labels": {"region": "west", "tier": "gold"}})
    assert (status, reason) == ("False", "LabelsProposed")
    assert "kubectl label city shanghai region=west --overwrite" in message
    conditions = city_conditions(shanghai, None, {"labels": {"region": "west"}}, {}, NOW)
    assert {c["type"]: c["reason"] for c in conditions}["LabelsAccepted"] == "LabelsProposed"
    assert shanghai["metadata"]["labels"]["region"] == "east"  # nothing is copied onto the City


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


def _csr(city_name: str, subject_city: str, username: str, key: bytes | None = None,
         renewal: bool = False) -> dict[str, Any]:
    manifest = onboarding.csr_manifest(subject_city, key or onboarding.new_private_key_pem(), renewal=renewal)
    manifest["metadata"]["labels"][onboarding.CSR_CITY_LABEL] = city_name
    manifest["spec"]["username"] = username
    return manifest


def _approved(name: str, key: bytes) -> dict[str, dict[str, Any]]:
    return {name: {"metadata": {"name": name},
                   "spec": {"approved": True, "agentKeyFingerprint": onboarding.key_fingerprint(key)}}}


def test_csr_is_approved_only_for_the_key_the_administrator_approved() -> None:
    key = onboarding.new_private_key_pem()
    boot, own = onboarding.bootstrap_user("shanghai"), onboarding.city_user("shanghai")
    cities = _approved("shanghai", key)
    ok, why = onboarding.csr_decision(_csr("shanghai", "shanghai", boot, key), cities)
    assert ok, why
    ok, why = onboarding.csr_decision(_csr("shanghai", "shanghai", own, key, renewal=True), cities)
    assert ok, why  # a renewal by the city itself, same key
    # Identity theft: the right name and label, another key.
    ok, why = onboarding.csr_decision(_csr("shanghai", "shanghai", boot), cities)
    assert not ok
    assert "spec.agentKeyFingerprint" in why
    not_yet = {"shanghai": {**cities["shanghai"], "spec": {**cities["shanghai"]["spec"], "approved": False}}}
    assert "not approved" in onboarding.csr_decision(_csr("shanghai", "shanghai", boot, key), not_yet)[1]
    other_subject = _csr("shanghai", "chengdu", boot, key)
    other_subject["metadata"]["name"] = onboarding.join_csr_name("shanghai")
    ok, why = onboarding.csr_decision(other_subject, cities)
    assert not ok
    assert "CN=citynerve:city:shanghai" in why
    # Another city's join credential, a stranger, or the city's renewal name from its bootstrap.
    for requester in (onboarding.bootstrap_user("chengdu"), "mallory"):
        assert not onboarding.csr_decision(_csr("shanghai", "shanghai", requester, key), cities)[0]
    assert not onboarding.csr_decision(_csr("shanghai", "shanghai", boot, key, renewal=True), cities)[0]
    bad = _csr("shanghai", "shanghai", boot, key)
    bad["spec"]["request"] = base64.b64encode(b"garbage").decode()
    assert not onboarding.csr_decision(bad, cities)[0]


def test_key_fingerprint_is_the_public_key_s() -> None:
    key = onboarding.new_private_key_pem()
    fingerprint = onboarding.key_fingerprint(key)
    assert fingerprint.startswith("sha256:")
    assert len(fingerprint) == len("sha256:") + 64
    assert onboarding.csr_key_fingerprint(onboarding.csr_manifest("x", key)) == fingerprint
    assert onboarding.csr_key_fingerprint({"spec": {"request": "???"}}) is None


def test_bootstrap_identity_is_good_for_one_city() -> None:
    role = next(m for m in onboarding.bootstrap_rbac("wuhan") if m["kind"] == "ClusterRole")
    named = {(r["resources"][0], v): r.get("resourceNames") for r in role["rules"] for v in r["verbs"]}
    assert named[("cities", "get")] == ["wuhan"]
    assert named[("certificatesigningrequests", "get")] == ["citynerve-join-wuhan"]
    # create cannot be narrowed by RBAC: the admission policies narrow it, and nothing lists.
    assert not any("list" in r["verbs"] or "watch" in r["verbs"] for r in role["rules"])


def test_trust_file_in_the_hub_chart_is_generated() -> None:
    assert onboarding.main(["--check"]) == 0


def test_city_access_grants_no_create_and_names_its_objects() -> None:
    access = onboarding.city_access("chengdu")
    rules = [r for m in access if m["kind"] in ("Role", "ClusterRole") for r in m["rules"]]
    assert all("create" not in r["verbs"] for r in rules)
    assert all(r.get("resourceNames") == ["citynerve-renew-chengdu"] for r in rules if "delete" in r["verbs"])
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
