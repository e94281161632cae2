"""The generated CRDs: in sync with the models, structural, described, validated by CEL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from citynerve.operators.api import KIND_BY_NAME, KINDS, crdgen
from pydantic import BaseModel, Field

CRD_DIR = Path(__file__).resolve().parents[1] / "crds"
CRDS = {info.kind: crd for info in KINDS for crd in [crdgen.crd(info)]}


def _schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = CRDS[kind]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _nodes(
    schema: dict[str, Any], path: str = "", is_field: bool = True
) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """Every schema node with its path and whether it is a named field (not a list item or map value)."""
    yield path, schema, is_field
    for name, child in schema.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}" if path else name)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            yield from _nodes(schema[key], f"{path}[*]", is_field=False)


@pytest.mark.timeout(30)
def test_crds_directory_matches_the_models() -> None:
    """Fails when crds/ differs from what the models generate: run `make crds`."""
    generated = crdgen.generate()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in CRD_DIR.glob("*.yaml")}
    assert sorted(on_disk) == sorted(generated), "run `python -m citynerve.operators.api.crdgen`"
    stale = [name for name, text in generated.items() if on_disk[name] != text]
    assert not stale, f"out of date: {stale}; run `python -m citynerve.operators.api.crdgen`"


@pytest.mark.timeout(30)
def test_check_flag_names_files_that_differ(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert crdgen.main(["--output-dir", str(tmp_path)]) == 0
    assert crdgen.main(["--check", "--output-dir", str(tmp_path)]) == 0
    (tmp_path / "citynerve.io_scenarios.yaml").write_text("# edited by hand\n", encoding="utf-8")
    (tmp_path / "citynerve.io_widgets.yaml").write_text("# stale\n", encoding="utf-8")
    capsys.readouterr()
    assert crdgen.main(["--check", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "citynerve.io_scenarios.yaml" in err
    assert "citynerve.io_widgets.yaml" in err
    assert "citynerve.io_cities.yaml" not in err
    assert crdgen.main(["--output-dir", str(tmp_path)]) == 0
    assert not (tmp_path / "citynerve.io_widgets.yaml").exists()
    assert crdgen.main(["--check", "--output-dir", str(tmp_path)]) == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(KIND_BY_NAME))
def test_schema_is_structural_and_every_field_is_described(kind: str) -> None:
    schema = _schema(kind)
    assert set(schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    assert schema["properties"]["metadata"] == {"type": "object"}
    for path, node, is_field in _nodes(schema):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "not", "$defs", "title", "const"} & set(node), path
        assert node.get("default", "") is not None, path
        if path == "metadata":
            continue
        if is_field:
            assert node.get("description"), f"{kind}.{path} has no description"
        if node.get("x-kubernetes-preserve-unknown-fields"):
            continue
        assert "type" in node, path
        if node["type"] == "object":
            assert "properties" in node or "additionalProperties" in node, path
            assert node.get("additionalProperties") is not False, path
            for required in node.get("required", []):
                assert required in node["properties"], f"{path}: required {required} is not a property"
        if node["type"] == "array":
            list_type = node.get("x-kubernetes-list-type")
            assert list_type in ("atomic", "set", "map"), f"{kind}.{path} has no x-kubernetes-list-type"
            assert "maxItems" in node, f"{kind}.{path}: CEL cost estimation needs maxItems"
            if list_type == "map":
                keys = node["x-kubernetes-list-map-keys"]
                item = node["items"]
                for key in keys:
                    assert key in item["required"] or "default" in item["properties"][key], (path, key)
        for rule in node.get("x-kubernetes-validations", []):
            assert rule["rule"]
            assert rule["message"], f"{path}: every CEL rule explains itself"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(KIND_BY_NAME))
def test_spec_has_no_floats(kind: str) -> None:
    for path, node, _ in _nodes(_schema(kind)["properties"]["spec"], "spec"):
        assert node.get("type") != "number", f"{kind}.{path}: use integer units or a decimal string"


def _rules(kind: str) -> dict[str, list[dict[str, str]]]:
    return {
        path: node["x-kubernetes-validations"]
        for path, node, _ in _nodes(_schema(kind))
        if "x-kubernetes-validations" in node
    }


@pytest.mark.timeout(30)
def test_cross_field_rules_are_in_the_schema() -> None:
    assert _rules("SensorFleet")["spec.sensorType"][0]["rule"] == "self == oldSelf"
    assert _rules("Scenario")["spec.thresholds[*]"][0] == {
        "fieldPath": ".warning",
        "message": "warning threshold must be below the alarm threshold; lower warning or raise alarm",
        "rule": "self.warning < self.alarm",
    }
    drill = _rules("Scenario")["spec"][0]
    assert drill["fieldPath"] == ".simulation"
    assert drill["reason"] == "FieldValueRequired"
    assert "has(self.version) != has(self.alias)" in _rules("ModelPromotion")["spec.source"][0]["rule"]
    assert "has(self.alias) != has(self.version)" in _rules("AnalyticsModel")["spec"][0]["rule"]
    assert "oldSelf" in _rules("Incident")["spec.state"][0]["rule"]
    # The FederatedScenario template carries the Scenario's rules.
    assert (
        _rules("FederatedScenario")["spec.template.spec.thresholds[*]"][0]["rule"]
        == "self.warning < self.alarm"
    )


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", list(KIND_BY_NAME))
def test_names_subresources_and_printer_columns(kind: str) -> None:
    crd = CRDS[kind]
    info = KIND_BY_NAME[kind]
    assert crd["metadata"]["name"] == f"{info.plural}.citynerve.io"
    assert crd["spec"]["names"]["categories"] == ["citynerve"]
    assert crd["spec"]["names"]["shortNames"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = version["additionalPrinterColumns"]
    assert columns[-1]["jsonPath"] == ".metadata.creationTimestamp"
    properties = _schema(kind)["properties"]
    for column in columns:
        assert column["description"]
        path = column["jsonPath"].split("[")[0].lstrip(".").split(".")
        if path[0] == "metadata":
            continue
        node: dict[str, Any] = {"properties": properties}
        for part in path:
            assert part in node.get("properties", {}), f"{kind} column {column['name']}: no field {part}"
            node = node["properties"][part]


@pytest.mark.timeout(30)
def test_cities_show_health_at_a_glance() -> None:
    columns = {c["name"].upper(): c for c in CRDS["City"]["spec"]["versions"][0]["additionalPrinterColumns"]}
    assert columns["READY"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    for name in ("REACHABLE", "SENSORS ONLINE", "OPEN INCIDENTS", "AGE"):
        assert columns[name].get("priority", 0) == 0, name


@pytest.mark.timeout(30)
def test_generated_yaml_is_loadable_and_headed() -> None:
    for name, text in crdgen.generate().items():
        assert text.startswith("# Generated by"), name
        assert yaml.safe_load(text)["kind"] == "CustomResourceDefinition"


@pytest.mark.timeout(30)
def test_unions_and_undescribed_fields_are_refused() -> None:
    class Undescribed(BaseModel):
        size: int

    class Union(BaseModel):
        size: int | str = Field(description="either")

    with pytest.raises(crdgen.SchemaError, match="description"):
        crdgen.structural_schema(Undescribed, "spec")
    with pytest.raises(crdgen.SchemaError, match="unions"):
        crdgen.structural_schema(Union, "spec")


@pytest.mark.timeout(30)
def test_admission_rules_reach_the_schema() -> None:
    city = _schema("City")
    assert "self.metadata.name.matches(" in city["x-kubernetes-validations"][0]["rule"]
    assert "<= 58" in city["x-kubernetes-validations"][0]["rule"]
    spec = city["properties"]["spec"]
    assert "hubNamespace" not in spec["properties"]["connection"]["properties"]
    assert "'Asia/Shanghai'" in _rules("City")["spec"][0]["rule"]
    # The time zone list costs a few kilobytes, not a CRD too large to apply.
    assert len(crdgen.render(CRDS["City"])) < 64_000
    fs = _schema("FederatedScenario")["properties"]["spec"]["properties"]
    cities = fs["placement"]["properties"]["cities"]
    assert (cities["maxItems"], cities["items"]["maxLength"]) == (256, 58)
    assert cities["items"]["pattern"] == "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    for labels in (fs["template"]["properties"]["labels"],
                   fs["placement"]["properties"]["citySelector"]["properties"]["matchLabels"],
                   _schema("ModelPromotion")["properties"]["spec"]["properties"]["citySelector"]["properties"][
                       "matchLabels"]):
        assert labels["maxProperties"] == 64
        assert labels["additionalProperties"]["maxLength"] == 63
        assert "k.matches(" in labels["x-kubernetes-validations"][0]["rule"]
    for kind, field in (("AnalyticsModel", "registeredModel"), ("ModelPromotion", "modelName")):
        node = _schema(kind)["properties"]["spec"]["properties"][field]
        assert node["maxLength"] == 63
        assert "/" not in node["pattern"]
    paths = {r.get("fieldPath") for r in _rules("ModelPromotion")["spec"]}
    assert {".rollback.timeoutSeconds", ".gates"} <= paths
    assert ".simulation.engine" in {r.get("fieldPath") for r in _rules("Scenario")["spec"]}
    assert ".overrides" in {r.get("fieldPath") for r in _rules("FederatedScenario")["spec"]}
    incident = _rules("Incident")["spec"]
    assert any("t.time >= self.detectedAt" in r["rule"] for r in incident)
    assert any(".isSorted()" in r["rule"] for r in incident)
