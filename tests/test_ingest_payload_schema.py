"""A SensorType's payloadSchema is evaluated on every NGSI-LD entity: compiled checks and the fallback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in this environment
import orjson
import pytest
import yaml
from citynerve.workloads.ingest.payload_schema import PayloadSchema, concise_form
from citynerve.workloads.ingest.pipeline import BatchResult, IngestPipeline
from citynerve.workloads.ingest.sensor_type import MeasuredProperty, SensorType

NOW_MS = 1_782_086_400_000  # 2026-06-22T00:00:00Z
OBSERVED = "2026-06-21T23:50:00Z"
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "sensortypes"


def gauge(schema: dict[str, Any] | None) -> SensorType:
    """A pressure gauge whose valid range (0 to 1600 kPa) is wider than the schemas below."""
    return SensorType(
        "gauge",
        "Junction",
        (
            MeasuredProperty("pressure", "KPA", 0.0, 1600.0),
            MeasuredProperty("batteryLevel", "P1", 0.0, 100.0),
        ),
        payload_schema=schema,
    )


def entity(n: int, normalized: bool = False, **attributes: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f"urn:ngsi-ld:Junction:g{n}", "type": "Junction", "dateObserved": OBSERVED}
    out |= attributes
    if normalized:
        out = {k: v if k in ("id", "type") else {"type": "Property", "value": v} for k, v in out.items()}
    return out


def ingest(sensor_type: SensorType, entities: list[dict[str, Any]]) -> BatchResult:
    return IngestPipeline(sensor_type).ingest_ngsi(orjson.dumps(entities), NOW_MS)


def reasons(result: BatchResult) -> dict[str, str]:
    """Rejected entity id → reason."""
    return {orjson.loads(f.raw)["id"].rsplit(":", 1)[1]: f.reason for f in result.rejected_entities}


def test_the_catalogue_schemas_are_read_from_the_resource_and_compile_whole() -> None:
    for path in sorted(SAMPLES.glob("*.yaml")):
        resource = yaml.safe_load(path.read_text())
        sensor_type = SensorType.from_resource(resource["metadata"]["name"], resource["spec"])
        assert sensor_type.payload_schema is not None
        assert sensor_type.payload_schema == resource["spec"]["payloadSchema"]
        compiled = PayloadSchema(sensor_type.payload_schema, sensor_type.property_names, path.stem)
        assert compiled.residual is None, path.name


@pytest.mark.timeout(30)
@pytest.mark.parametrize("normalized", [False, True])
def test_a_schema_tighter_than_the_range_quarantines_the_entity(normalized: bool) -> None:
    schema = {
        "type": "object",
        "properties": {"pressure": {"type": "number", "minimum": 100, "maximum": 800}},
    }
    entities = [
        entity(0, normalized, pressure=450.0, batteryLevel=80.0),
        entity(1, normalized, pressure=900.0, batteryLevel=80.0),  # in range, above the schema's maximum
        entity(2, normalized, pressure=50.0),
        entity(3, normalized, batteryLevel=70.0),  # no pressure: nothing to bound
    ]
    result = ingest(gauge(schema), entities)
    assert reasons(result) == {
        "g1": "payload-schema: $.pressure: 900.0 is greater than the maximum of 800",
        "g2": "payload-schema: $.pressure: 50.0 is less than the minimum of 100",
    }
    assert result.quarantined == {"payload-schema": 2}
    assert result.accepted == 3  # g0's two readings and g3's one
    assert result.quarantined_rows.num_rows == 0  # rejected whole, not reading by reading


@pytest.mark.timeout(30)
def test_an_enum_a_const_and_an_exclusive_bound() -> None:
    schema = {
        "properties": {
            "pressure": {"enum": [100, 200.5]},
            "batteryLevel": {"exclusiveMinimum": 10, "exclusiveMaximum": 100},
            "type": {"const": "Junction"},
        }
    }
    result = ingest(
        gauge(schema),
        [
            entity(0, pressure=100.0, batteryLevel=50.0),
            entity(1, pressure=200.5),
            entity(2, pressure=150.0),
            entity(3, batteryLevel=10.0),
            entity(4, batteryLevel=100.0),
        ],
    )
    assert reasons(result) == {
        "g2": "payload-schema: $.pressure: 150.0 is not one of [100, 200.5]",
        "g3": "payload-schema: $.batteryLevel: 10.0 is less than or equal to the minimum of 10",
        "g4": "payload-schema: $.batteryLevel: 100.0 is greater than or equal to the maximum of 100",
    }
    assert result.accepted == 3


@pytest.mark.timeout(30)
@pytest.mark.parametrize("normalized", [False, True])
def test_a_required_attribute_missing_quarantines_the_entity(normalized: bool) -> None:
    schema = {"type": "object", "required": ["id", "type", "dateObserved", "pressure", "batteryLevel"]}
    entities = [
        entity(0, normalized, pressure=400.0, batteryLevel=90.0),
        entity(1, normalized, pressure=400.0),
    ]
    if normalized:
        del entities[0]["dateObserved"]
    result = ingest(gauge(schema), entities)
    expected = {"g1": "payload-schema: $: 'batteryLevel' is a required property"}
    if normalized:
        expected["g0"] = "payload-schema: $: 'dateObserved' is a required property"
    assert reasons(result) == expected


@pytest.mark.timeout(30)
def test_types_nulls_date_times_and_patterns() -> None:
    schema = {
        "properties": {
            "id": {"type": "string", "pattern": "^urn:ngsi-ld:Junction:g[0-9]+$"},
            "dateObserved": {"type": "string", "format": "date-time"},
            "pressure": {"type": "integer"},
            "batteryLevel": {"type": ["number", "null"]},
        }
    }
    bad_id = entity(4, pressure=1.0)
    bad_id["id"] = "urn:ngsi-ld:Junction:gauge-4"
    result = ingest(
        gauge(schema),
        [
            entity(0, pressure=300.0, batteryLevel=None),  # null allowed for batteryLevel
            entity(1, pressure=300.5),
            entity(2, pressure=None),
            {**entity(3, pressure=1.0), "dateObserved": "2026-02-30T00:00:00Z"},
            bad_id,
        ],
    )
    assert reasons(result) == {
        "g1": "payload-schema: $.pressure: 300.5 is not of type 'integer'",
        "g2": "payload-schema: $.pressure: None is not of type 'integer'",
        "g3": "payload-schema: $.dateObserved: '2026-02-30T00:00:00Z' is not a 'date-time'",
        "gauge-4": "payload-schema: $.id: 'urn:ngsi-ld:Junction:gauge-4' does not match "
        "'^urn:ngsi-ld:Junction:g[0-9]+$'",
    }
    # without a schema a null is what it always was: no reading
    plain = ingest(gauge(None), [entity(0, pressure=None, batteryLevel=50.0)])
    assert (plain.accepted, plain.rejected_entities) == (1, [])


@pytest.mark.timeout(30)
def test_constructs_left_to_jsonschema_give_its_answer() -> None:
    schema = {
        "type": "object",
        "required": ["id", "status"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string"},
            "type": {"type": "string"},
            "dateObserved": {"type": "string"},
            "status": {"enum": ["ok", "degraded"]},
            "pressure": {"type": "number", "multipleOf": 0.5, "maximum": 1000},
            "batteryLevel": {"type": "number"},
        },
        "if": {"properties": {"status": {"const": "degraded"}}},
        "then": {"required": ["batteryLevel"]},
    }
    compiled = PayloadSchema(schema, ("pressure", "batteryLevel"), "gauge")
    assert compiled.residual is not None
    assert set(compiled.residual) == {"required", "additionalProperties", "properties", "if", "then"}
    entities = [
        entity(0, status="ok", pressure=400.5),
        entity(1, status="ok", pressure=400.2),  # multipleOf
        entity(2, pressure=400.0, batteryLevel=20.0),  # status required
        entity(3, status="broken", pressure=400.0),  # enum on an attribute the decoder skips
        entity(4, status="ok", pressure=400.0, colour="red"),  # additionalProperties
        entity(5, status="degraded", pressure=400.0),  # if/then
        entity(6, status="degraded", pressure=400.0, batteryLevel=30.0),
        entity(7, normalized=True, status="ok", pressure=300.0),
        entity(8, normalized=True, status="ok", pressure=300.3),
    ]
    validator = jsonschema.Draft202012Validator(schema)
    expected = {}
    for e in entities:
        error = jsonschema.exceptions.best_match(validator.iter_errors(concise_form(e)))
        if error is not None:
            path = "$" + "".join(f".{p}" for p in error.absolute_path)
            expected[e["id"].rsplit(":", 1)[1]] = f"payload-schema: {path}: {error.message}"
    assert set(expected) == {"g1", "g2", "g3", "g4", "g5", "g8"}
    result = ingest(gauge(schema), entities)
    assert reasons(result) == expected
    assert result.accepted == 4  # g0, g6 (two readings), g7


def test_a_broken_schema_is_refused_when_the_pipeline_is_made() -> None:
    with pytest.raises(ValueError, match="SensorType gauge: payloadSchema is not a valid JSON Schema"):
        IngestPipeline(gauge({"type": "objet"}))
