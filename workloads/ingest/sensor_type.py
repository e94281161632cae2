"""What ingestion needs to know about a terminal type: a small, plain structure.

The operators' `SensorType` resource converts to this (see `SensorType.from_dict`, which reads
the resource's camelCase spec); ingestion never imports the operators.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class MeasuredProperty:
    """One measured quantity: NGSI-LD attribute name, UN/CEFACT unit code, valid range."""

    name: str
    unit: str
    minimum: float
    maximum: float

    def __post_init__(self) -> None:
        if not self.minimum < self.maximum:
            raise ValueError(
                f"measured property {self.name!r}: minimum {self.minimum} "
                f"must be below maximum {self.maximum}"
            )


@dataclass(frozen=True)
class SensorType:
    """A terminal type: the FIWARE Smart Data Model its payloads follow and what it measures.

    `max_future_skew_s` bounds how far ahead of the ingesting clock a timestamp may be;
    `max_age_s` how far behind (late data beyond it is quarantined, not silently folded in).
    `payload_schema` is the resource's ``payloadSchema`` (JSON Schema), evaluated on every
    NGSI-LD entity (`citynerve.workloads.ingest.payload_schema`).
    """

    name: str
    data_model: str
    properties: tuple[MeasuredProperty, ...]
    max_future_skew_s: float = 300.0
    max_age_s: float = 7 * 86400.0
    payload_schema: Mapping[str, Any] | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        names = [p.name for p in self.properties]
        if len(set(names)) != len(names):
            raise ValueError(f"sensor type {self.name!r} lists a measured property twice: {names}")
        if not names:
            raise ValueError(f"sensor type {self.name!r} measures nothing; list at least one property")

    @property
    def property_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.properties)

    def bounds(self) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Valid minimum and maximum per property, in `properties` order."""
        return (
            np.array([p.minimum for p in self.properties], dtype=np.float64),
            np.array([p.maximum for p in self.properties], dtype=np.float64),
        )

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> SensorType:
        """From a plain dict (camelCase keys); a SensorType resource's spec goes through ``from_resource``."""
        try:
            props = tuple(
                MeasuredProperty(
                    name=str(p["name"]),
                    unit=str(p["unit"]),
                    minimum=float(p["validRange"]["min"] if "validRange" in p else p["minimum"]),
                    maximum=float(p["validRange"]["max"] if "validRange" in p else p["maximum"]),
                )
                for p in spec["measuredProperties"]
            )
            return cls(
                name=str(spec["name"]),
                data_model=str(spec["dataModel"]),
                properties=props,
                max_future_skew_s=float(spec.get("maxFutureSkewSeconds", 300.0)),
                max_age_s=float(spec.get("maxAgeSeconds", 7 * 86400.0)),
                payload_schema=spec.get("payloadSchema"),
            )
        except KeyError as err:
            raise ValueError(f"sensor type spec lacks field {err.args[0]!r}") from err

    @classmethod
    def from_resource(cls, name: str, spec: Mapping[str, Any]) -> SensorType:
        """From a SensorType custom resource's spec, as the hub's catalogue publishes it."""
        try:
            props = tuple(
                MeasuredProperty(
                    name=str(p["name"]),
                    unit=str(p["unitCode"]),
                    minimum=float(p.get("minimum", "-inf")),
                    maximum=float(p.get("maximum", "inf")),
                )
                for p in spec["properties"]
            )
            return cls(
                name=name,
                data_model=str(spec["dataModel"]["entityType"]),
                properties=props,
                payload_schema=spec.get("payloadSchema"),
            )
        except KeyError as err:
            raise ValueError(f"SensorType {name} lacks field {err.args[0]!r}") from err


#: The terminal types the simulators produce, as a city's platform team would define them.
CATALOGUE: dict[str, SensorType] = {
    t.name: t
    for t in (
        SensorType(
            "water-pressure-logger",
            "WaterObserved",
            (MeasuredProperty("pressure", "MTR", -5.0, 200.0),),
        ),
        SensorType(
            "water-flow-meter",
            "WaterObserved",
            (MeasuredProperty("flow", "MQS", -20.0, 20.0),),
        ),
        SensorType(
            "water-quality-probe",
            "WaterQualityObserved",
            (
                MeasuredProperty("temperature", "CEL", -5.0, 45.0),
                MeasuredProperty("pH", "C62", 0.0, 14.0),
                MeasuredProperty("turbidity", "NTU", 0.0, 1000.0),
            ),
        ),
        SensorType(
            "flood-level-gauge",
            "FloodMonitoring",
            (
                MeasuredProperty("currentLevel", "MTR", 0.0, 30.0),
                MeasuredProperty("precipitation", "MMT", 0.0, 500.0),
            ),
        ),
        SensorType(
            "pump-status",
            "Device",
            (MeasuredProperty("value", "C62", 0.0, 1.0),),
        ),
        SensorType(
            "crowd-counter",
            "CrowdFlowObserved",
            (MeasuredProperty("peopleCount", "C62", 0.0, 1.0e6),),
        ),
        SensorType(
            "traffic-counter",
            "TrafficFlowObserved",
            (MeasuredProperty("intensity", "C62", 0.0, 1.0e5),),
        ),
    )
}
