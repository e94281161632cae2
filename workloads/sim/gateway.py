"""A terminal gateway: one NGSI-LD batch with a reading from each of a fleet's terminals.

What a city's field gateway posts to a fleet's ingest worker each sampling round. Values are
drawn inside each property's valid range; ``malformed`` entities (no id, or a value far out of
range) stand for the broken payloads real fleets send, so quarantine counts are not zero.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import numpy as np
from citynerve.workloads.ingest.sensor_type import SensorType
from citynerve.workloads.ngsi import entity_id

# Open-ended ranges (no minimum or maximum) draw from this span instead.
_OPEN_RANGE = (0.0, 100.0)


def gateway_batch(sensor_type: SensorType, terminals: int, at_ms: int, rng: np.random.Generator,
                  malformed: int = 0, prefix: str = "t") -> bytes:
    """``terminals`` entities observed at ``at_ms``, then ``malformed`` broken ones, as JSON bytes."""
    observed = datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    columns = {}
    for prop in sensor_type.properties:
        lo, hi = prop.minimum, prop.maximum
        if not (np.isfinite(lo) and np.isfinite(hi)):
            lo, hi = _OPEN_RANGE
        span = hi - lo
        columns[prop.name] = np.round(rng.uniform(lo + 0.25 * span, hi - 0.25 * span, terminals), 3)
    entities: list[dict[str, object]] = []
    for i in range(terminals):
        entity: dict[str, object] = {"id": entity_id(sensor_type.data_model, f"{prefix}{i}"),
                                     "type": sensor_type.data_model, "dateObserved": observed}
        entity.update({name: float(values[i]) for name, values in columns.items()})
        entities.append(entity)
    first = sensor_type.properties[0]
    for j in range(malformed):
        if j % 2:
            entities.append({"type": sensor_type.data_model, "dateObserved": observed})  # no id
        else:
            far = (abs(first.maximum) if np.isfinite(first.maximum) else 1e6) * 10 + 1
            entities.append({"id": entity_id(sensor_type.data_model, f"{prefix}{j}"),
                             "type": sensor_type.data_model, "dateObserved": observed, first.name: far})
    return json.dumps(entities).encode()
