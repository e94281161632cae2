"""Urban flood warning for underpasses and low points, with lead time.

For each watched node the detector projects the water level `horizon_s` ahead from its
recent trend (least squares over the last `trend_steps` readings) and raises a warning when
the projection reaches the node's critical level — the level at which its drains run full,
beyond which water can only pond — while it is raining (or rained within the last hour), or
when the level itself passes `warn_fraction` of the critical level and is rising.
`fit` learns each node's dry-weather level and noise so that noise never reads as a trend.

Each warning reports, in the metrics Scenarios set thresholds on: the level read at the node
(`waterLevelMm`), the level it is projected to reach within the horizon (`forecastWaterLevelMm`),
its rise (`levelRiseMmPerHour`) and the heaviest rainfall at a gauge (`rainfallIntensityMmPerHour`);
`mm_per_unit` and `rain_mm_per_hour_per_unit` convert the model's own units.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt
from citynerve.models.detectors.base import FloatArray, Window, emit, require
from citynerve.models.incidents import IncidentEvent, IncidentLocation, IncidentSink, Measurement


class UrbanFloodWarning:
    #: the metrics its detections measure: what a Scenario's thresholds may name
    MEASURES: ClassVar[tuple[str, ...]] = (
        "waterLevelMm", "forecastWaterLevelMm", "drainFullLevelMm", "levelRiseMmPerHour",
        "rainfallIntensityMmPerHour",
    )

    def __init__(
        self,
        critical_level: dict[str, float],
        step_s: float,
        horizon_s: float = 1800.0,
        trend_steps: int = 3,
        warn_fraction: float = 0.8,
        rain_threshold: float = 0.05,
        locations: dict[str, tuple[float, float]] | None = None,
        mm_per_unit: float = 1.0,
        rain_mm_per_hour_per_unit: float = 1.0,
    ) -> None:
        self.critical_level = critical_level
        self.step_s = step_s
        self.horizon_s = horizon_s
        self.trend_steps = trend_steps
        self.warn_fraction = warn_fraction
        self.rain_threshold = rain_threshold
        self.locations = locations or {}
        self.mm_per_unit = mm_per_unit
        self.rain_mm_per_hour_per_unit = rain_mm_per_hour_per_unit
        self._noise: dict[str, float] = {}

    def fit(self, history: Window) -> Self:
        """Noise per node from dry-weather levels (step-to-step differences, robust)."""
        require(history, "currentLevel")
        level = history["currentLevel"]
        diffs = np.diff(level.values, axis=0)
        mad = np.nanmedian(np.abs(diffs - np.nanmedian(diffs, axis=0)), axis=0)
        for name, value in zip(level.sensors, 1.4826 * mad / np.sqrt(2.0), strict=True):
            self._noise[name] = float(np.nan_to_num(value))
        return self

    def _slopes(self, values: FloatArray) -> FloatArray:
        """Per step and node, level change per second over the trailing `trend_steps` readings."""
        k = self.trend_steps
        slopes = np.zeros_like(values)
        if values.shape[0] < k:
            return slopes
        x = (np.arange(k) - (k - 1) / 2.0) * self.step_s
        windows = np.lib.stride_tricks.sliding_window_view(
            np.nan_to_num(values), k, axis=0
        )  # (t-k+1) x n x k
        slopes[k - 1 :] = windows @ x / float(x @ x)
        return slopes

    def score(self, window: Window) -> FloatArray:
        """Per step and node: projected level at the horizon as a fraction of the flooding depth."""
        require(window, "currentLevel")
        level = window["currentLevel"]
        depth = np.array([self.critical_level[n] for n in level.sensors], dtype=np.float64)
        slopes = self._slopes(level.values)
        noise = np.array([self._noise.get(n, 0.0) for n in level.sensors])
        # a trend within three noise sigmas per step is no trend
        significant = np.abs(slopes) * self.step_s > 3.0 * noise * np.sqrt(12.0 / self.trend_steps**3)
        rising = np.where(significant, np.maximum(slopes, 0.0), 0.0)
        projected = np.nan_to_num(level.values) + rising * self.horizon_s
        return np.asarray(projected / depth, dtype=np.float64)

    def _raining(self, window: Window) -> npt.NDArray[np.bool_]:
        if "precipitation" not in window:
            return np.ones(len(window["currentLevel"].times_s), dtype=bool)
        rain = np.nanmax(np.nan_to_num(window["precipitation"].values), axis=1)
        recent = max(1, round(3600.0 / self.step_s))
        wet = rain > self.rain_threshold
        return np.asarray(np.convolve(wet.astype(np.float64), np.ones(recent), mode="full")[: len(wet)] > 0)

    def predict(self, window: Window, sink: IncidentSink | None = None) -> list[IncidentEvent]:
        """The first warning per node (a node stays warned until its window ends)."""
        risk = self.score(window)
        level = window["currentLevel"]
        raining = self._raining(window)
        depth = np.array([self.critical_level[n] for n in level.sensors], dtype=np.float64)
        slopes = self._slopes(level.values)
        by_projection = (risk >= 1.0) & raining[:, None]
        by_level = (np.nan_to_num(level.values) >= self.warn_fraction * depth) & (slopes > 0)
        warn = by_projection | by_level
        events = []
        for j in np.flatnonzero(warn.any(axis=0)):
            t = int(np.argmax(warn[:, j]))
            node = level.sensors[j]
            rate = float(slopes[t, j])
            to_go = float(depth[j] - level.values[t, j])
            eta = to_go / rate if rate > 0 else None
            lon, lat = self.locations.get(node, (None, None))
            rain_now = (
                float(np.nanmax(window["precipitation"].values[t])) if "precipitation" in window else None
            )
            events.append(self._warning(window, t, int(j), float(risk[t, j] * depth[j]), rate, eta,
                                        "projection" if by_projection[t, j] else "level", rain_now,
                                        IncidentLocation(asset_id=node, lat=lat, lon=lon)))
        return emit(sorted(events, key=lambda e: e.detected_at_s), sink)

    def _warning(self, window: Window, t: int, j: int, projected: float, rate: float, eta: float | None,
                 trigger: str, rain_now: float | None, location: IncidentLocation) -> IncidentEvent:
        level = window["currentLevel"]
        node = level.sensors[j]
        depth = self.critical_level[node]
        mm = self.mm_per_unit
        measurements = [
            Measurement("waterLevelMm", "MMT", float(level.values[t, j]) * mm, "waterLevel", node, j),
            Measurement("forecastWaterLevelMm", "MMT", projected * mm, "waterLevel", node, j),
            Measurement("drainFullLevelMm", "MMT", depth * mm),
            Measurement("levelRiseMmPerHour", "H67", rate * 3600.0 * mm, "waterLevel", node, j),
        ]
        if rain_now is not None:
            gauges = window["precipitation"]
            g = int(np.nanargmax(np.nan_to_num(gauges.values[t])))
            measurements.append(Measurement("rainfallIntensityMmPerHour", "H67",
                                            rain_now * self.rain_mm_per_hour_per_unit,
                                            "rainfallIntensity", gauges.sensors[g], g))
        horizon_min = self.horizon_s / 60.0
        critical = eta is not None and eta < self.horizon_s / 2
        rule = (
            f"the level, projected {horizon_min:g} min ahead on its trend over the last {self.trend_steps} "
            f"readings, reaches the drain-full level of {depth * mm:.0f} mm while it rains"
            if trigger == "projection"
            else f"the level passed {self.warn_fraction:.0%} of the drain-full level of {depth * mm:.0f} mm "
            "and is rising"
        ) + (f"; critical: it is due there within {horizon_min / 2:g} min" if critical else "")
        return IncidentEvent(
            kind="urban-flood",
            location=location,
            severity="critical" if critical else "warning",
            detected_at_s=float(level.times_s[t]),
            evidence={
                "level": float(level.values[t, j]),
                "critical_level": float(depth),
                "rise_per_hour": rate * 3600.0,
                "predicted_flooding_in_s": eta,
                "rainfall": rain_now,
                "trigger": trigger,
            },
            measurements=tuple(measurements),
            rule=rule,
        )

    def explain(self, incident: IncidentEvent) -> dict[str, Any]:
        return {
            "method": "level trend projected over the horizon against the node's critical level",
            "horizon_s": self.horizon_s,
            "trend_steps": self.trend_steps,
            **incident.evidence,
        }
