"""The typed resource models: registry, manifest round trips, and the Python mirror of CEL rules."""

from __future__ import annotations

import re
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
from citynerve.operators.api.common import LabelSelector, StatusBase
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[1]
SAMPLE_FILES = sorted((REPO / "samples").rglob("*.yaml"))
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
