"""Governed promotion decisions (``promotion_step``), pins and observations: pure, no cluster."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest
from citynerve.operators.api.hub import ModelPromotionSpec
from citynerve.operators.federation.placement import desired_work, manifest_hash
from citynerve.operators.hub.promotion import (
    REQUESTED_BY_ANNOTATION,
    Annotate,
    CityView,
    MoveAlias,
    Observations,
    PostEvent,
    RegistryView,
    city_pins,
    city_view,
    model_object_name,
    needs_registry,
    pin_manifest,
    pin_work_name,
    promotion_pins,
    promotion_step,
    selection_refusal,
)

MODEL = "water-burst-detector"
NEW, OLD = "sha256:" + "a" * 64, "sha256:" + "b" * 64
T0 = dt.datetime(2026, 11, 25, 4, 0, tzinfo=dt.UTC)


def city(name: str, region: str, approved: bool = True) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"region": region}}, "spec": {"approved": approved}}


CITIES = [
    city("shanghai", "east"),
    city("hangzhou", "east"),
    city("chengdu", "west"),
    city("wuhan", "east", False),
]
METRICS = {"detectionRate": 0.75, "falseAlarmsPerDay": 0.0, "detectionDelaySeconds": 2700.0}
REGISTRY = RegistryView(
    version="2",
    digest=NEW,
    metrics=METRICS,
    scenario_kind="water-burst",
    previous_version="1",
    previous_digest=OLD,
)


def promotion(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "promote-v2",
            "namespace": "citynerve",
            "generation": 1,
            "creationTimestamp": "2026-11-25T04:00:00Z",
            "annotations": {REQUESTED_BY_ANNOTATION: "alice"},
        },
        "spec": {
            "modelName": MODEL,
            "source": {"version": "2"},
            "targetAlias": "champion",
            "citySelector": {"matchLabels": {"region": "east"}},
            "canaryCity": "shanghai",
            "gates": [{"metric": "detectionRate", "operator": "GreaterThanOrEqual", "threshold": "0.5"}],
            "soakSeconds": 60,
            **spec,
        },
    }


def step(
    obj: dict[str, Any], now: dt.datetime, views: dict[str, CityView] | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """One tick as the handler runs it: registry read only when needed; annotations and status applied."""
    registry = REGISTRY if needs_registry(obj.get("status")) else None
    actions, status = promotion_step(obj, Observations(now, CITIES, views or {}, registry))
    for action in actions:
        if isinstance(action, Annotate):
            obj["metadata"]["annotations"].update(action.annotations)
    obj["status"] = status
    return actions, status


def running(name: str, version: str = "2", digest: str = NEW, **kw: Any) -> CityView:
    return CityView(
        name,
        work_hash=manifest_hash(pin_manifest(MODEL, version, digest)),
        applied=True,
        ready="True",
        reason="Resolved",
        **kw,
    )


def outcomes(status: dict[str, Any]) -> dict[str, str]:
    return {o["city"]: o["reason"] for o in status["cities"]}


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == kind)


def pinned_versions(obj: dict[str, Any]) -> dict[str, str]:
    return {c: m["spec"]["version"] for c, m in promotion_pins(obj).items()}


@pytest.mark.timeout(10)
def test_a_version_failing_a_gate_is_refused_naming_metric_and_threshold() -> None:
    obj = promotion(
        gates=[
            {"metric": "falseAlarmsPerDay", "operator": "LessThan", "threshold": "0.5"},
            {"metric": "detectionRate", "operator": "GreaterThanOrEqual", "threshold": "0.9"},
            {"metric": "f1Score", "operator": "GreaterThanOrEqual", "threshold": "0.8"},
        ]
    )
    actions, status = step(obj, T0)
    gates = condition(status, "GatesPassed")
    assert gates["status"] == "False"
    assert gates["reason"] == "GateFailed"
    assert "detectionRate is 0.75, the gate requires detectionRate >= 0.9" in gates["message"]
    assert "f1Score is not recorded" in gates["message"]
    assert "falseAlarmsPerDay" not in gates["message"]  # that gate passed
    assert condition(status, "Complete")["reason"] == "Refused"
    assert [a["action"] for a in status["audit"]] == ["GateFailed", "GateFailed"]
    assert [a.reason for a in actions if isinstance(a, PostEvent)] == ["GateFailed"]
    assert promotion_pins(obj) == {}  # no city ever receives it
    # terminal: a later tick changes nothing and reads nothing
    assert not needs_registry(status)
    again, later = step(copy.deepcopy(obj), T0 + dt.timedelta(minutes=5))
    assert again == []
    assert later == status


@pytest.mark.timeout(10)
def test_canary_first_then_the_rest_then_the_alias_moves() -> None:
    obj = promotion()
    actions, status = step(obj, T0)
    assert outcomes(status) == {"hangzhou": "WaitingForCanary", "shanghai": "Rolling"}  # east, joined
    assert pinned_versions(obj) == {"shanghai": "2"}
    started = status["audit"][0]
    assert started["action"] == "Started"
    assert started["actor"] == "alice"
    assert NEW in started["message"]
    assert "detectionRate >= 0.5" in started["message"]
    # the digest the hub computed at the gate, and the version to roll back to, are status only it writes
    assert (status["artifactDigest"], status["previousVersion"], status["previousDigest"]) == (NEW, "1", OLD)
    assert not any(isinstance(a, Annotate) and "digest" in str(a.annotations) for a in actions)

    # the canary has not applied the pin yet (its report still shows the old hash): nothing moves
    _, status = step(obj, T0 + dt.timedelta(seconds=2), {"shanghai": running("shanghai", "1", OLD)})
    assert outcomes(status)["shanghai"] == "Rolling"
    # it runs the new version: soaking starts; Ready of an older generation would show Unknown
    _, status = step(obj, T0 + dt.timedelta(seconds=4), {"shanghai": running("shanghai")})
    assert outcomes(status)["shanghai"] == "Soaking"
    _, status = step(obj, T0 + dt.timedelta(seconds=30), {"shanghai": running("shanghai")})
    assert outcomes(status) == {"hangzhou": "WaitingForCanary", "shanghai": "Soaking"}
    actions, status = step(obj, T0 + dt.timedelta(seconds=65), {"shanghai": running("shanghai")})
    assert outcomes(status) == {"hangzhou": "Rolling", "shanghai": "Promoted"}
    assert condition(status, "CanaryPassed")["status"] == "True"
    assert pinned_versions(obj) == {"hangzhou": "2", "shanghai": "2"}
    assert not any(isinstance(a, MoveAlias) for a in actions)

    views = {"shanghai": running("shanghai"), "hangzhou": running("hangzhou")}
    step(obj, T0 + dt.timedelta(seconds=70), views)
    actions, status = step(obj, T0 + dt.timedelta(seconds=131), views)
    assert MoveAlias(MODEL, "champion", "2") in actions
    assert condition(status, "Complete")["status"] == "True"
    assert condition(status, "RolledBack")["status"] == "False"
    assert {o["promoted"] for o in status["cities"]} == {"True"}
    assert [a["action"] for a in status["audit"]] == [
        "Started",
        "GatePassed",
        "Promoted",
        "GatePassed",
        "Promoted",
        "GatePassed",
        "Completed",
    ]
    assert status["audit"][-1]["message"].startswith("alias champion moved to version 2")


@pytest.mark.timeout(10)
def test_a_canary_refusing_the_artifact_rolls_back_and_the_others_never_receive_it() -> None:
    obj = promotion(citySelector={})  # every joined city
    step(obj, T0)
    refused = CityView(
        "shanghai",
        work_hash=manifest_hash(pin_manifest(MODEL, "2", NEW)),
        applied=True,
        ready="False",
        reason="ArtifactDigestMismatch",
        message="the artifact of version 2 has digest sha256:ccc…, not the digest recorded at registration",
    )
    actions, status = step(obj, T0 + dt.timedelta(seconds=3), {"shanghai": refused})
    assert outcomes(status) == {"chengdu": "Cancelled", "hangzhou": "Cancelled", "shanghai": "RolledBack"}
    assert condition(status, "RolledBack")["status"] == "True"
    canary = condition(status, "CanaryPassed")
    assert canary["status"] == "False"
    assert canary["reason"] == "ArtifactDigestMismatch"
    assert condition(status, "Complete")["reason"] == "RolledBack"
    # the canary is pinned back to the previous version (and digest); nobody else is pinned
    pins = promotion_pins(obj)
    assert list(pins) == ["shanghai"]
    assert pins["shanghai"]["spec"] == {"registeredModel": MODEL, "version": "1", "expectedDigest": OLD}
    assert ("GateFailed", "shanghai") in [(a["action"], a.get("city")) for a in status["audit"]]
    assert ("RolledBack", "shanghai") in [(a["action"], a.get("city")) for a in status["audit"]]
    assert {a.reason for a in actions if isinstance(a, PostEvent)} == {"ArtifactDigestMismatch", "RolledBack"}
    assert not any(isinstance(a, MoveAlias) for a in actions)


@pytest.mark.timeout(10)
def test_too_many_incidents_during_the_soak_roll_the_canary_back() -> None:
    obj = promotion(
        gates=[{"metric": "soakIncidents", "operator": "LessThanOrEqual", "threshold": "1"}], soakSeconds=300
    )
    step(obj, T0)
    step(obj, T0 + dt.timedelta(seconds=2), {"shanghai": running("shanghai")})
    before = T0 - dt.timedelta(hours=1)  # incidents from before the soak do not count
    noisy = running(
        "shanghai",
        incidents=[
            ("water-burst", before),
            ("urban-flood", T0 + dt.timedelta(seconds=5)),  # another scenario kind
            ("water-burst", T0 + dt.timedelta(seconds=10)),
        ],
    )
    _, status = step(obj, T0 + dt.timedelta(seconds=20), {"shanghai": noisy})
    assert outcomes(status)["shanghai"] == "Soaking"
    noisier = running(
        "shanghai", incidents=[*noisy.incidents, ("water-burst", T0 + dt.timedelta(seconds=30))]
    )
    _, status = step(obj, T0 + dt.timedelta(seconds=40), {"shanghai": noisier})
    assert outcomes(status) == {"hangzhou": "Cancelled", "shanghai": "RolledBack"}
    message = condition(status, "RolledBack")["message"]
    assert "2 incidents during the soak; the gate requires soakIncidents <= 1" in message
    gates = next(o for o in status["cities"] if o["city"] == "shanghai")["gates"]
    assert {"metric": "soakIncidents", "value": "2", "passed": False} in gates


@pytest.mark.timeout(10)
def test_temporary_errors_are_waited_out_until_the_timeout() -> None:
    obj = promotion(soakSeconds=50, rollback={"maxFailedCities": 0, "timeoutSeconds": 120})
    step(obj, T0)
    unreachable = CityView(
        "shanghai",
        work_hash=manifest_hash(pin_manifest(MODEL, "2", NEW)),
        applied=True,
        ready="False",
        reason="RegistryUnreachable",
    )
    _, status = step(obj, T0 + dt.timedelta(seconds=60), {"shanghai": unreachable})
    assert outcomes(status)["shanghai"] == "Rolling"
    _, status = step(obj, T0 + dt.timedelta(seconds=121), {"shanghai": unreachable})
    assert condition(status, "RolledBack")["reason"] == "Timeout"
    assert outcomes(status) == {"hangzhou": "Cancelled", "shanghai": "RolledBack"}


@pytest.mark.timeout(10)
def test_without_canary_all_cities_at_once_and_failures_within_the_budget_stay_local() -> None:
    obj = promotion(canaryCity=None, citySelector={}, soakSeconds=0, rollback={"maxFailedCities": 1})
    obj["spec"].pop("canaryCity")
    _, status = step(obj, T0)
    assert set(outcomes(status).values()) == {"Rolling"}
    failed = CityView(
        "chengdu", work_hash=manifest_hash(pin_manifest(MODEL, "2", NEW)), applied=False, message="forbidden"
    )
    views = {"shanghai": running("shanghai"), "hangzhou": running("hangzhou"), "chengdu": failed}
    actions, status = step(obj, T0 + dt.timedelta(seconds=2), views)
    assert outcomes(status) == {"chengdu": "RolledBack", "hangzhou": "Promoted", "shanghai": "Promoted"}
    assert condition(status, "Complete")["status"] == "True"
    assert "rolled back in chengdu" in condition(status, "Complete")["message"]
    assert MoveAlias(MODEL, "champion", "2") in actions
    assert pinned_versions(obj) == {"chengdu": "1", "hangzhou": "2", "shanghai": "2"}


@pytest.mark.timeout(10)
def test_a_failure_beyond_the_budget_rolls_every_city_back() -> None:
    obj = promotion(canaryCity=None, citySelector={}, soakSeconds=600)
    obj["spec"].pop("canaryCity")
    step(obj, T0)
    views = {"shanghai": running("shanghai"), "hangzhou": running("hangzhou")}
    step(obj, T0 + dt.timedelta(seconds=2), views)
    views["chengdu"] = CityView(
        "chengdu",
        work_hash=manifest_hash(pin_manifest(MODEL, "2", NEW)),
        ready="False",
        reason="VersionNotFound",
    )
    _, status = step(obj, T0 + dt.timedelta(seconds=4), views)
    assert set(outcomes(status).values()) == {"RolledBack"}
    assert condition(status, "RolledBack")["reason"] == "TooManyFailures"
    assert set(pinned_versions(obj).values()) == {"1"}


@pytest.mark.timeout(10)
def test_refusals_before_anything_is_pinned() -> None:
    obj = promotion(canaryCity="chengdu")  # west, not selected
    _, status = step(obj, T0)
    assert "not among the selected cities" in condition(status, "Complete")["message"]
    missing = promotion()
    _, status = promotion_step(
        missing,
        Observations(
            T0, CITIES, {}, RegistryView(error_reason="VersionNotFound", error_message="no version 2")
        ),
    )
    assert condition(status, "GatesPassed")["reason"] == "VersionNotFound"
    assert condition(status, "Complete")["reason"] == "Refused"


@pytest.mark.timeout(10)
def test_a_canary_the_selector_does_not_select_is_refused_without_reading_the_registry() -> None:
    obj = promotion(canaryCity="chengdu")  # west; the selector picks region=east
    spec = ModelPromotionSpec.model_validate(obj["spec"])
    reason, message = selection_refusal(spec, CITIES) or ("", "")
    assert reason == "CanaryNotSelected"
    assert "spec.citySelector" in message
    # No registry view at all: the refusal needs none, so an unreachable MLflow cannot delay it.
    actions, status = promotion_step(obj, Observations(T0, CITIES, {}, None))
    complete = condition(status, "Complete")
    assert (complete["status"], complete["reason"]) == ("False", "Refused")
    assert "chengdu is not among the selected cities (hangzhou, shanghai)" in complete["message"]
    assert PostEvent("Warning", "CanaryNotSelected", complete["message"]) in actions
    assert not any(isinstance(a, Annotate) for a in actions)
    assert promotion_pins(obj | {"status": status}) == {}
    nobody = promotion(canaryCity=None, citySelector={"matchLabels": {"region": "north"}})
    assert selection_refusal(ModelPromotionSpec.model_validate(nobody["spec"]), CITIES) == (
        "NoCitySelected", "the city selector picks no joined city")
    assert selection_refusal(ModelPromotionSpec.model_validate(promotion()["spec"]), CITIES) is None


@pytest.mark.timeout(10)
def test_pins_become_work_and_the_newest_promotion_wins() -> None:
    older = promotion()
    step(older, T0)
    newer = copy.deepcopy(promotion())
    newer["metadata"].update(name="promote-v3", creationTimestamp="2026-11-25T05:00:00Z")
    newer["spec"]["source"] = {"version": "3"}
    registry = RegistryView(version="3", digest="sha256:" + "c" * 64, metrics=METRICS, previous_version="2")
    _, newer["status"] = promotion_step(newer, Observations(T0, CITIES, {}, registry))
    pins = city_pins("shanghai", [newer, older])
    assert [(source, m["spec"]["version"], m["spec"]["expectedDigest"]) for source, m in pins] == [
        ("ModelPromotion/citynerve/promote-v3", "3", "sha256:" + "c" * 64)
    ]
    assert city_pins("chengdu", [newer, older]) == []

    work = desired_work(CITIES[0], [], [], CITIES, pins)
    cm = work[pin_work_name(MODEL)]
    assert cm["metadata"]["labels"]["citynerve.io/work-kind"] == "analyticsmodel"
    assert model_object_name("Water Burst/Detector") == "water-burst-detector"


@pytest.mark.timeout(10)
def test_city_view_reads_the_agents_report() -> None:
    report = {
        "objects": {
            pin_work_name(MODEL): {"hash": "abc", "applied": True, "ready": "True", "reason": "Resolved"},
            "scenario-x": {"hash": "def", "applied": True, "ready": "True"},
        },
        "incidents": [
            {"kind": "water-burst", "detectedAt": "2026-11-25T04:00:05Z"},
            {"kind": "water-burst", "detectedAt": None},
        ],
    }
    view = city_view(MODEL, "shanghai", report)
    assert (view.work_hash, view.applied, view.ready, view.reason) == ("abc", True, "True", "Resolved")
    assert view.incidents == (("water-burst", T0 + dt.timedelta(seconds=5)),)
    assert city_view(MODEL, "chengdu", {}).ready == "Unknown"


@pytest.mark.timeout(10)
def test_a_soak_in_a_city_running_no_scenario_of_the_kind_says_so() -> None:
    from citynerve.operators.federation.agent import running_scenario_kinds  # noqa: PLC0415
    from citynerve.operators.hub.promotion import city_view, soak_scope  # noqa: PLC0415

    ready = {"type": "Ready", "status": "True"}
    scenarios = [{"spec": {"kind": "urban-flood"}, "status": {"conditions": [ready]}},
                 {"spec": {"kind": "water-burst"}, "status": {"conditions": [{**ready, "status": "False"}]}}]
    kinds = running_scenario_kinds(scenarios)
    assert kinds == ["urban-flood"]  # a scenario that is not Ready scores nothing
    view = city_view("water-burst-detector", "chengdu", {"scenarioKinds": kinds})
    assert view.scenario_kinds == frozenset({"urban-flood"})
    said = soak_scope("water-burst", view.scenario_kinds)
    assert said == "; the city runs no water-burst scenario, so nothing there was scored with this model"
    assert soak_scope("urban-flood", view.scenario_kinds) == ""
    assert soak_scope("water-burst", city_view("m", "old-agent", {}).scenario_kinds) == ""  # not reported
