"""Incidents as detectors emit them, before any operator turns them into `Incident` resources."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

ScenarioKind = Literal["water-burst", "urban-flood", "mountain-flood", "major-event"]
Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True)
class IncidentLocation:
    """Where an incident is: an asset (node, pipe, sensor site, area) and coordinates when known.

    `placement` says how the coordinates were found when they are not surveyed ones: a drill
    places its simulated network in the city (`citynerve.workloads.sim.placement`).
    """

    asset_id: str
    lat: float | None = None
    lon: float | None = None
    placement: str | None = None


@dataclass(frozen=True)
class Measurement:
    """A magnitude a detector measured, named and in the unit a Scenario's thresholds use.

    `metric` is camelCase as a Scenario threshold names it (`pressureDropKpa`); a forecast of a
    metric is named `forecast<Metric>` (`forecastWaterLevelMm`), and the metric's threshold
    applies to it too. `sensor` is the simulated or field sensor the value is from and
    `sensor_index` its position in the scenario's sensor layout, which maps it to a terminal
    of the fleet measuring `quantity` (the SensorType property, e.g. `pressure`); a value
    derived from many sensors has neither.
    """

    metric: str
    unit_code: str
    value: float
    quantity: str | None = None
    sensor: str | None = None
    sensor_index: int | None = None


@dataclass(frozen=True)
class DrillTruth:
    """What a drill knows and its detector did not, for the officer to check a detection against.

    Water: the junction the burst was injected at, and the pipe-graph distance (metres along
    pipes, hops) from the reported asset to it. Floods: whether the warned asset flooded (a
    stream passed its warning discharge) in the run, when, and the lead time the warning gave.
    """

    true_asset: str | None = None
    distance_m: float | None = None
    hops: int | None = None
    flooded: bool | None = None
    flood_onset_s: float | None = None
    lead_time_s: float | None = None


@dataclass(frozen=True)
class IncidentEvent:
    """One detection. Times are simulated seconds since the start of the scenario's clock."""

    kind: ScenarioKind
    location: IncidentLocation
    severity: Severity
    detected_at_s: float
    onset_s: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    #: magnitudes in the Scenario's metric names and units: the Scenario's thresholds apply to them
    measurements: tuple[Measurement, ...] = ()
    #: the detector's own rule for `severity`, as a sentence (used when no threshold applies)
    rule: str | None = None
    #: in a drill, the simulation's ground truth about this detection
    truth: DrillTruth | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


IncidentSink = Callable[[IncidentEvent], None]


class CollectingSink:
    """A sink that keeps every incident in memory; the default for tests and drills."""

    def __init__(self) -> None:
        self.events: list[IncidentEvent] = []

    def __call__(self, event: IncidentEvent) -> None:
        self.events.append(event)
