"""The typed resource models: registry, manifest round trips, and the Python mirror of CEL rules."""

from __future__ import annotations

import copy
import re
import zoneinfo
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from citynerve.operators.api import (
    API_VERSION,
    KIND_BY_NAME,
    KINDS,
    City,
    Condition,
    Scenario,
    SensorFleet,
    from_manifest,
    kind_info,
    to_manifest,
)
from citynerve.operators.api.city import engine_fits_kind
from citynerve.operators.api.common import LABELS_MAX, LabelSelector, StatusBase
from citynerve.operators.api.hub import CitySpec, iana_time_zones
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[1]
# Every sample manifest (samples/helm holds Helm values files, checked by tests/test_charts.py).
SAMPLE_FILES = sorted(p for p in (REPO / "samples").rglob("*.yaml") if p.parent.name != "helm")
INVALID_FILES = sorted((REPO / "e2e" / "invalid").glob("*.yaml"))


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def _is_subset(small: Any, big: Any) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and _is_subset(v, big[k]) for k, v in small.items())
    if isinstance(small, list):
        return isinstance(big, list) and len(small) == len(big) and all(map(_is_subset, small, big))
    return bool(small == big)


@pytest.mark.timeout(10)
def test_registry_names_the_eight_kinds() -> None:
    assert {info.kind for info in KINDS} == {
        "City", "SensorType", "FederatedScenario", "ModelPromotion",
        "SensorFleet", "AnalyticsModel", "Scenario", "Incident",
    }  # fmt: skip
    assert {info.kind for info in KINDS if info.scope == "Cluster"} == {"City", "SensorType"}
    assert {info.kind for info in KINDS if info.cluster == "hub"} == {
        "City",
        "SensorType",
        "FederatedScenario",
        "ModelPromotion",
    }
    short_names = [name for info in KINDS for name in info.short_names]
    assert len(short_names) == len(set(short_names))
    for info in KINDS:
        assert info.categories == ("citynerve",)
        assert info.plural in (info.singular + "s", info.singular[:-1] + "ies")
        assert info.spec_model.__name__ == f"{info.kind}Spec"
        assert info.status_model.__name__ == f"{info.kind}Status"
        assert issubclass(info.status_model, StatusBase)
    with pytest.raises(KeyError, match="known kinds"):
        kind_info("Widget")


@pytest.mark.timeout(10)
def test_python_attributes_are_snake_case_and_yaml_camel_case() -> None:
    fleet = SensorFleet.model_validate(
        {
            "metadata": {"name": "f"},
            "spec": {
                "sensorType": "ph-meter",
                "district": "pudong",
                "count": 3,
                "owner": "government",
                "samplingIntervalSeconds": 60,
            },
        }
    )
    assert fleet.spec.sampling_interval_seconds == 60
    manifest = to_manifest(fleet)
    assert manifest["apiVersion"] == API_VERSION
    assert manifest["spec"]["samplingIntervalSeconds"] == 60
    assert "status" not in manifest


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: str(p.relative_to(REPO / "samples")))
def test_every_sample_round_trips(path: Path) -> None:
    for doc in _documents(path):
        obj = from_manifest(doc["kind"], doc)
        manifest = to_manifest(obj)
        assert _is_subset(doc, manifest), f"{path.name}: {doc['metadata']['name']} lost or changed a field"
        assert from_manifest(doc["kind"], manifest) == obj


@pytest.mark.timeout(30)
def test_samples_cover_every_kind_and_scenario_kind() -> None:
    docs = [doc for path in SAMPLE_FILES for doc in _documents(path)]
    assert {doc["kind"] for doc in docs} == set(KIND_BY_NAME)
    scenario_kinds = {doc["spec"]["kind"] for doc in docs if doc["kind"] == "Scenario"}
    assert scenario_kinds == {"water-burst", "urban-flood", "mountain-flood", "major-event"}
    cities = {
        doc["metadata"]["name"]: doc["metadata"]["labels"]["region"] for doc in docs if doc["kind"] == "City"
    }
    assert cities == {"shanghai": "east", "chengdu": "west"}


@pytest.mark.timeout(30)
def test_sample_references_resolve() -> None:
    city_docs = [
        doc for path in sorted((REPO / "samples" / "city").glob("*.yaml")) for doc in _documents(path)
    ]
    sensor_types = {p.stem for p in (REPO / "samples" / "sensortypes").glob("*.yaml")}
    names = {kind: {d["metadata"]["name"] for d in city_docs if d["kind"] == kind} for kind in KIND_BY_NAME}
    for doc in city_docs:
        if doc["kind"] == "SensorFleet":
            assert doc["spec"]["sensorType"] in sensor_types
        if doc["kind"] == "Scenario":
            assert {f["name"] for f in doc["spec"]["fleets"]} <= names["SensorFleet"]
            assert {m["name"] for m in doc["spec"].get("models", [])} <= names["AnalyticsModel"]
        if doc["kind"] == "Incident":
            assert doc["spec"]["scenarioRef"]["name"] in names["Scenario"]


def _expected_field(expect: str) -> str | None:
    """The last segment of the field path an `# expect:` text names, if it names one."""
    match = re.match(r"^(spec(?:\.[A-Za-z]+(?:\[\d+\])?)*)(?:\[\d+\])?: ", expect)
    return re.sub(r"\[\d+\]$", "", match.group(1).rsplit(".", 1)[-1]) if match else None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", INVALID_FILES, ids=lambda p: p.stem)
def test_invalid_corpus_is_refused_by_the_models_too(path: Path) -> None:
    """What the API server refuses, `from_manifest` refuses, naming the same field.

    Transition rules (immutable fields, state only moving forward) need the old object, so
    only the API server can check them.
    """
    docs = _documents(path)
    expect = re.search(r"^# expect: (.+)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    assert expect, f"{path.name} has no `# expect:` header"
    if len(docs) == 2:
        from_manifest(docs[0]["kind"], docs[0])
        return
    assert len(docs) == 1
    with pytest.raises(ValidationError) as refused:
        from_manifest(docs[0]["kind"], docs[0])
    field = _expected_field(expect.group(1))
    if field and field != "spec":
        assert field in str(refused.value), str(refused.value)


@pytest.mark.timeout(10)
def test_python_rules_mirror_cel_messages() -> None:
    spec: dict[str, Any] = {
        "kind": "urban-flood",
        "fleets": [{"name": "f"}],
        "thresholds": [{"metric": "waterLevelMm", "unitCode": "MMT", "warning": 300, "alarm": 200}],
    }
    scenario = {"metadata": {"name": "s"}, "spec": spec}
    with pytest.raises(ValidationError, match="warning threshold must be below the alarm threshold"):
        Scenario.model_validate(scenario)
    spec["thresholds"] = []
    spec["mode"] = "drill"
    with pytest.raises(ValidationError, match="must name a simulation source"):
        Scenario.model_validate(scenario)
    spec["simulation"] = {"engine": "swmm", "network": "example-catchment"}
    assert Scenario.model_validate(scenario).spec.simulation is not None


@pytest.mark.timeout(10)
def test_status_conditions_and_selectors() -> None:
    now = datetime(2026, 7, 12, 4, 0, tzinfo=UTC)
    city = City.model_validate(
        {
            "metadata": {
                "name": "shanghai",
                "labels": {"region": "east"},
                "uid": "u-1",
                "resourceVersion": "7",
            },
            "spec": {"displayName": "Shanghai", "region": "east", "dataResidency": {"jurisdiction": "CN-SH"}},
            "status": {
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "AllScenariosReady",
                        "lastTransitionTime": now.isoformat(),
                    }
                ]
            },
        }
    )
    assert city.status is not None
    ready = city.status.condition("Ready")
    assert isinstance(ready, Condition)
    assert ready.last_transition_time == now
    assert city.status.condition("Reachable") is None
    # Metadata the API server adds survives a round trip.
    assert to_manifest(city)["metadata"]["resourceVersion"] == "7"
    with pytest.raises(ValidationError, match="reason"):
        Condition.model_validate(
            {
                "type": "Ready",
                "status": "True",
                "reason": "not camel case",
                "lastTransitionTime": now.isoformat(),
            }
        )
    selector = LabelSelector.model_validate(
        {
            "matchLabels": {"region": "east"},
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["pilot"]}],
        }
    )
    assert selector.matches({"region": "east"})
    assert not selector.matches({"region": "east", "tier": "pilot"})
    assert not selector.matches({"region": "west"})
    assert LabelSelector().matches({})


@pytest.mark.timeout(10)
def test_from_manifest_refuses_a_manifest_of_another_kind() -> None:
    with pytest.raises(ValueError, match="not a 'City'"):
        from_manifest("City", {"kind": "Scenario", "spec": {}})


# --- cross-field rules at admission: the Python mirrors of the CEL rules ----------------------------

SAMPLES = REPO / "samples"


def _sample(path: str) -> dict[str, Any]:
    return copy.deepcopy(_documents(SAMPLES / path)[0])


def _refused(kind: str, manifest: dict[str, Any], why: str) -> None:
    with pytest.raises(ValidationError, match=why):
        from_manifest(kind, manifest)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("water-burst-detector", True),
        ("Flood_Forecaster.v2", True),
        ("x" * 63, True),
        ("x" * 64, False),
        ("../../etc/passwd", False),
        ("../../../etc", False),
        ("models/water", False),
        (".hidden", False),
        ("a..b", False),
        ("detector-", False),
        ("models:/water-burst-detector/7", False),
        ("", False),
    ],
)
def test_registered_model_names_are_never_paths(name: str, valid: bool) -> None:
    model = _sample("city/analyticsmodels.yaml")
    model["spec"]["registeredModel"] = name
    promotion = _sample("hub/modelpromotion-water-burst.yaml")
    promotion["spec"]["modelName"] = name
    for kind, manifest, field in (("AnalyticsModel", model, "registeredModel"),
                                  ("ModelPromotion", promotion, "modelName")):
        if valid:
            from_manifest(kind, manifest)
        else:
            _refused(kind, manifest, field)


@pytest.mark.timeout(10)
def test_placed_cities_are_city_names_and_lists_are_bounded() -> None:
    fs = _sample("hub/federatedscenario-urban-flood.yaml")
    for city in ("Chengdu City", "c" * 59, "c" * 1_500_000, "chengdu.sichuan", ""):
        fs["spec"]["placement"]["cities"] = [city]
        _refused("FederatedScenario", fs, "placement.cities.0")
    fs["spec"]["placement"]["cities"] = ["c" * 58, "chengdu"]
    from_manifest("FederatedScenario", fs)
    fs["spec"]["placement"]["cities"] = [f"city-{i}" for i in range(257)]
    _refused("FederatedScenario", fs, "placement.cities")
    fs = _sample("hub/federatedscenario-urban-flood.yaml")
    fs["spec"]["overrides"][0]["city"] = "c" * 59
    _refused("FederatedScenario", fs, "overrides.0.city")
    promotion = _sample("hub/modelpromotion-water-burst.yaml")
    promotion["spec"]["canaryCity"] = "Shanghai"
    _refused("ModelPromotion", promotion, "canaryCity")


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("key", "value", "valid"),
    [
        ("citynerve.io/programme", "flood-season-2026", True),
        ("region", "", True),
        ("app.kubernetes.io/part-of", "citynerve", True),
        ("a" * 63, "b" * 63, True),
        (f"{'p' * 253}/name", "v", True),
        (f"{'p' * 254}/name", "v", False),
        ("a" * 64, "v", False),
        ("flood season", "2026", False),
        ("Citynerve.IO/programme", "x", False),
        ("/programme", "x", False),
        ("citynerve.io/", "x", False),
        ("region", "East China", False),
        ("region", "b" * 64, False),
        ("region", "-east", False),
    ],
)
def test_labels_and_selectors_follow_kubernetes_label_syntax(key: str, value: str, valid: bool) -> None:
    fs = _sample("hub/federatedscenario-urban-flood.yaml")
    fs["spec"]["template"]["labels"] = {key: value}
    placement = _sample("hub/federatedscenario-urban-flood.yaml")
    placement["spec"]["placement"]["citySelector"] = {"matchLabels": {key: value}}
    promotion = _sample("hub/modelpromotion-water-burst.yaml")
    requirement = {"key": key, "operator": "In", "values": [value]}
    promotion["spec"]["citySelector"] = {"matchExpressions": [requirement]}
    for kind, manifest, field in (
        ("FederatedScenario", fs, "template.labels"),
        ("FederatedScenario", placement, "citySelector.matchLabels"),
        ("ModelPromotion", promotion, "citySelector.matchExpressions.0"),
    ):
        if valid:
            from_manifest(kind, manifest)
        else:
            _refused(kind, manifest, re.escape(field))


@pytest.mark.timeout(10)
def test_label_maps_are_bounded() -> None:
    fs = _sample("hub/federatedscenario-urban-flood.yaml")
    fs["spec"]["template"]["labels"] = {f"k{i}": "v" for i in range(LABELS_MAX + 1)}
    _refused("FederatedScenario", fs, "template.labels")
    schema = LabelSelector.model_json_schema(by_alias=True)["properties"]["matchLabels"]
    assert schema["maxProperties"] == LABELS_MAX
    assert schema["x-kubernetes-validations"][0]["rule"].startswith("self.all(k, k.matches(")


@pytest.mark.timeout(10)
def test_an_override_names_a_city_the_placement_lists() -> None:
    fs = _sample("hub/federatedscenario-urban-flood.yaml")
    fs["spec"]["overrides"].append({"city": "wuhan", "replicas": 2})
    from_manifest("FederatedScenario", fs)  # a selector: only the hub knows whether it selects wuhan
    del fs["spec"]["placement"]["citySelector"]
    _refused("FederatedScenario", fs, "an override names a city the placement does not select")
    fs["spec"]["placement"]["cities"].append("wuhan")
    from_manifest("FederatedScenario", fs)


@pytest.mark.timeout(10)
def test_a_drill_override_needs_a_simulation_somewhere() -> None:
    fs = _sample("hub/federatedscenario-urban-flood.yaml")
    simulation = fs["spec"]["overrides"][0].pop("simulation")
    _refused("FederatedScenario", fs, "drill without a simulation source")
    fs["spec"]["template"]["spec"]["simulation"] = simulation  # the template's serves the drill
    from_manifest("FederatedScenario", fs)
    fs["spec"]["overrides"][0]["mode"] = "live"
    del fs["spec"]["template"]["spec"]["simulation"]
    from_manifest("FederatedScenario", fs)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("kind", "engine", "valid"),
    [
        ("water-burst", "wntr", True),
        ("water-burst", "swmm", False),
        ("urban-flood", "swmm", True),
        ("mountain-flood", "swmm", True),
        ("mountain-flood", "wntr", False),
        ("major-event", "pedestrian-counts", True),
        ("major-event", "replay", True),
        ("major-event", "wntr", False),
        ("urban-flood", "replay", False),
    ],
)
def test_a_simulation_engine_suits_the_scenario_kind(kind: str, engine: str, valid: bool) -> None:
    assert engine_fits_kind(engine, kind) is valid
    scenario = _sample("city/scenario-major-event.yaml")
    scenario["spec"].update(kind=kind, mode="drill", simulation={"engine": engine, "network": "n"})
    fs = _sample("hub/federatedscenario-urban-flood.yaml")
    fs["spec"]["template"]["spec"]["kind"] = kind
    fs["spec"]["overrides"][0]["simulation"]["engine"] = engine
    if valid:
        from_manifest("Scenario", scenario)
        from_manifest("FederatedScenario", fs)
    else:
        _refused("Scenario", scenario, "simulation.engine cannot rehearse this scenario kind")
        _refused("FederatedScenario", fs, "an override's simulation.engine cannot rehearse")


@pytest.mark.timeout(10)
def test_a_promotion_leaves_time_to_soak() -> None:
    promotion = _sample("hub/modelpromotion-water-burst.yaml")  # canary, soak 1800 s
    promotion["spec"]["rollback"]["timeoutSeconds"] = 3600
    _refused("ModelPromotion", promotion, "leaves no time to soak")  # canary soak + the others' soak
    promotion["spec"]["rollback"]["timeoutSeconds"] = 3601
    from_manifest("ModelPromotion", promotion)
    del promotion["spec"]["canaryCity"]
    promotion["spec"]["rollback"]["timeoutSeconds"] = 1800
    _refused("ModelPromotion", promotion, "leaves no time to soak")
    del promotion["spec"]["rollback"]  # the default timeout, 3600 s
    promotion["spec"]["soakSeconds"] = 3600
    _refused("ModelPromotion", promotion, "leaves no time to soak")
    promotion["spec"]["soakSeconds"] = 600
    from_manifest("ModelPromotion", promotion)


def _gate(metric: str, operator: str, threshold: str) -> dict[str, str]:
    return {"metric": metric, "operator": operator, "threshold": threshold}


RATE = "detectionRate"


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("gates", "why"),
    [
        ([_gate(RATE, "GreaterThanOrEqual", "0.9"), _gate(RATE, "LessThanOrEqual", "0.5")], "contradict"),
        ([_gate(RATE, "GreaterThan", "0.5"), _gate(RATE, "LessThanOrEqual", "0.5")], "contradict"),
        ([_gate(RATE, "GreaterThanOrEqual", "0.5"), _gate(RATE, "LessThan", "0.5")], "contradict"),
        ([_gate(RATE, "GreaterThanOrEqual", "0.9"), _gate(RATE, "GreaterThan", "0.8")], "gated twice"),
        ([_gate("falseAlarmsPerDay", "LessThan", "1"), _gate("falseAlarmsPerDay", "LessThanOrEqual", "2")],
         "gated twice"),
        ([_gate(RATE, "GreaterThanOrEqual", "0.5"), _gate(RATE, "LessThanOrEqual", "0.5")], None),
        ([_gate(RATE, "GreaterThan", "0.5"), _gate(RATE, "LessThan", "0.95"),
          _gate("falseAlarmsPerDay", "GreaterThan", "2"), _gate("soakIncidents", "LessThanOrEqual", "2")],
         None),
    ],
)
def test_gates_of_a_metric_agree(gates: list[dict[str, str]], why: str | None) -> None:
    promotion = _sample("hub/modelpromotion-water-burst.yaml")
    promotion["spec"]["gates"] = gates
    if why is None:
        from_manifest("ModelPromotion", promotion)
    else:
        _refused("ModelPromotion", promotion, why)


@pytest.mark.timeout(10)
def test_a_city_time_zone_is_an_iana_name() -> None:
    city = _sample("hub/city-chengdu.yaml")
    for zone in ("Asia/Shanghai", "UTC", "Europe/Paris", "America/Argentina/Buenos_Aires", "Etc/GMT-8"):
        city["spec"]["timezone"] = zone
        from_manifest("City", city)
    for zone in ("Mars/Olympus_Mons", "+08:00", "CST", "asia/shanghai", "Asia/Beijing", "Factory"):
        city["spec"]["timezone"] = zone
        _refused("City", city, "timezone must be an IANA tz database name")
    zones = iana_time_zones()
    assert 500 < len(zones) < 700
    for zone in zones:
        zoneinfo.ZoneInfo(zone)  # every name the API server accepts, Python can use
    rule = next(r for r in CitySpec.rules if r.field_path == ".timezone")
    assert "'Asia/Shanghai'" in rule.cel


@pytest.mark.timeout(10)
def test_a_city_name_can_become_its_hub_namespace() -> None:
    city = _sample("hub/city-chengdu.yaml")
    for name in ("c" * 59, "chengdu.sichuan", "Chengdu"):
        city["metadata"]["name"] = name
        _refused("City", city, r"a City's name must be a DNS label .* \(metadata.name\)")
    city["metadata"]["name"] = "c" * 58
    assert len(f"city-{city['metadata']['name']}") == 63
    from_manifest("City", city)
    del city["metadata"]["name"]
    city["metadata"]["generateName"] = "city-"  # named by the API server, checked there
    from_manifest("City", city)


@pytest.mark.timeout(10)
def test_the_hub_namespace_field_is_gone() -> None:
    city = _sample("hub/city-chengdu.yaml")
    city["spec"]["connection"]["hubNamespace"] = "city-chengdu"
    _refused("City", city, "hubNamespace")


def _incident(state: str, *transitions: tuple[str, str]) -> dict[str, Any]:
    incident = _sample("city/incident-water-burst.yaml")  # detected at 04:15:00
    incident["spec"]["state"] = state
    incident["spec"]["transitions"] = [
        {"state": s, "time": f"2026-07-12T{t}Z", "actor": "crew"} for s, t in transitions
    ]
    return incident


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("incident", "why"),
    [
        (_incident("Dispatched", ("Detected", "04:15:00"), ("Dispatched", "01:15:00")),
         "before spec.detectedAt"),
        (_incident("Dispatched", ("Dispatched", "04:14:59")), "before spec.detectedAt"),
        (_incident("Detected", ("Detected", "04:15:00"), ("Resolved", "05:40:00")), "later than spec.state"),
        (_incident("OnSite", ("Detected", "04:15:00"), ("OnSite", "04:50:00"), ("Resolved", "05:00:00")),
         "later than spec.state"),
        (_incident("OnSite", ("Dispatched", "04:17:00"), ("Detected", "04:15:00"), ("OnSite", "04:50:00")),
         "lifecycle order"),
        (_incident("OnSite", ("Detected", "04:15:00"), ("Dispatched", "04:50:00"), ("OnSite", "04:20:00")),
         "timed before an earlier one"),
        (_incident("Resolved", ("Detected", "04:15:00"), ("Resolved", "04:15:00")), None),
        (_incident("OnSite", ("Detected", "04:15:00"), ("Dispatched", "04:17:10"), ("OnSite", "04:52:40")),
         None),
        (_incident("Detected"), None),
    ],
)
def test_incident_transitions_agree_with_state_and_detection(
    incident: dict[str, Any], why: str | None
) -> None:
    if why is None:
        from_manifest("Incident", incident)
    else:
        _refused("Incident", incident, re.escape(why))
