"""What every detector shares: the window it reads and the interface it offers.

A window is a mapping from a stream name (a measured property such as ``pressure``, or a
companion series such as ``pressure_model``) to a regular (time x sensor) matrix. The ingest
pipeline's aggregated windows and the simulators' outputs both reduce to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, Self

import numpy as np
import numpy.typing as npt
from citynerve.models.incidents import IncidentEvent, IncidentSink

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class SensorWindow:
    """Readings of one stream on a regular clock: `values[t, s]` is sensor `s` at `times_s[t]`."""

    times_s: FloatArray
    sensors: tuple[str, ...]
    values: FloatArray

    def __post_init__(self) -> None:
        if self.values.shape != (len(self.times_s), len(self.sensors)):
            raise ValueError(
                f"window values have shape {self.values.shape}, expected "
                f"({len(self.times_s)} times, {len(self.sensors)} sensors)"
            )

    def column(self, sensor: str) -> FloatArray:
        return self.values[:, self.sensors.index(sensor)]


Window = Mapping[str, SensorWindow]


class Detector(Protocol):
    """fit on history, score a window, turn scores into incidents, explain an incident."""

    def fit(self, history: Window) -> Self: ...

    def score(self, window: Window) -> FloatArray: ...

    def predict(self, window: Window, sink: IncidentSink | None = None) -> list[IncidentEvent]: ...

    def explain(self, incident: IncidentEvent) -> dict[str, Any]: ...


def emit(events: list[IncidentEvent], sink: IncidentSink | None) -> list[IncidentEvent]:
    """Hand each event to the sink (when there is one) and return them."""
    if sink is not None:
        for event in events:
            sink(event)
    return events


def cusum(evidence: FloatArray, slack: float) -> FloatArray:
    """One-sided CUSUM S_t = max(0, S_{t-1} + e_t - k); NaN evidence counts as none."""
    out = np.empty_like(evidence)
    level = 0.0
    for i, e in enumerate(np.nan_to_num(evidence, nan=0.0)):
        level = max(0.0, level + float(e) - slack)
        out[i] = level
    return out


def require(window: Window, *names: str) -> None:
    missing = [n for n in names if n not in window]
    if missing:
        raise KeyError(f"window lacks stream(s) {missing}; it has {sorted(window)}")


def slot_of(times_s: FloatArray, step_s: float, period_s: float = 86400.0) -> npt.NDArray[np.int64]:
    """Index of each time within a repeating period (time of day by default)."""
    return (np.mod(times_s, period_s) // step_s).astype(np.int64)


def as_mapping(**streams: SensorWindow) -> Mapping[str, SensorWindow]:
    return dict(streams)
