"""Incidents as detectors emit them, before any operator turns them into `Incident` resources."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ScenarioKind = Literal["water-burst", "urban-flood", "mountain-flood", "major-event"]
Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True)
class IncidentLocation:
    """Where an incident is: an asset (node, pipe, sensor site, area) and coordinates when known."""

    asset_id: str
    lat: float | None = None
    lon: float | None = None


@dataclass(frozen=True)
class IncidentEvent:
    """One detection. Times are simulated seconds since the start of the scenario's clock."""

    kind: ScenarioKind
    location: IncidentLocation
    severity: Severity
    detected_at_s: float
    onset_s: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


IncidentSink = Callable[[IncidentEvent], None]


class CollectingSink:
    """A sink that keeps every incident in memory; the default for tests and drills."""

    def __init__(self) -> None:
        self.events: list[IncidentEvent] = []

    def __call__(self, event: IncidentEvent) -> None:
        self.events.append(event)
