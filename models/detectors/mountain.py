"""Mountain flash-flood defence: predict → pre-warn → rehearse → pre-plan.

* predict: a lumped rainfall-runoff model per catchment — a runoff coefficient on rainfall
  past an initial loss, routed through a linear reservoir (lag `k`) — fed with the rain
  observed so far and a nowcast for the horizon (a building storm extrapolated on its last
  hour's trend, a waning one held at its last hour's mean);
* pre-warn: an incident when a catchment's forecast discharge passes its warning level
  (critical past its evacuation level), before the stream gauge sees it;
* rehearse: run drill storms through a simulator (the field-grade engine, supplied by the
  caller) and score the warnings: hit or miss and lead time per catchment;
* pre-plan: which areas to evacuate, in order of forecast time to their evacuation level.

`fit` calibrates each catchment's coefficient and lag against a recorded storm.

Each pre-warning reports the forecast peak discharge (`forecastDischargeM3PerS`), as a share of
the area's reference discharge when it has one (`forecastDischargePercent`: the metric Scenarios
set thresholds on), and the rain falling on the catchment (`rainfallIntensityMmPerHour`);
`flow_m3s_per_unit` and `rain_mm_per_hour_per_unit` convert the model's own units.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
from citynerve.models.detectors.base import FloatArray, Window, emit, require
from citynerve.models.incidents import IncidentEvent, IncidentLocation, IncidentSink, Measurement


@dataclass(frozen=True)
class Area:
    """A settlement below a catchment, with the discharges that mean warn and evacuate."""

    catchment: str
    name: str
    warn_discharge: float
    evacuate_discharge: float
    lon: float | None = None
    lat: float | None = None
    #: the discharge warn and evacuate levels are set against (a reference storm's peak), if any
    reference_discharge: float | None = None


@dataclass(frozen=True)
class CatchmentParams:
    area: float  # model area units
    coefficient: float  # share of rain past the initial loss that runs off
    lag_s: float  # linear reservoir constant
    initial_loss: float = 0.0  # rain depth (model units) absorbed before any runoff


@dataclass(frozen=True)
class DrillOutcome:
    storm: str
    catchment: str
    warned_at_s: float | None
    exceeded_at_s: float | None

    @property
    def lead_time_s(self) -> float | None:
        if self.warned_at_s is None or self.exceeded_at_s is None:
            return None
        return self.exceeded_at_s - self.warned_at_s


def runoff(rain: FloatArray, params: CatchmentParams, step_s: float, unit_factor: float) -> FloatArray:
    """Discharge from a rain-intensity series (per hour) through loss, coefficient and reservoir."""
    depth = np.cumsum(np.nan_to_num(rain)) * step_s / 3600.0
    excess = np.diff(np.maximum(depth - params.initial_loss, 0.0), prepend=0.0) * 3600.0 / step_s
    inflow = params.coefficient * excess * params.area * unit_factor
    alpha = 1.0 - np.exp(-step_s / max(params.lag_s, 1.0))
    out = np.empty_like(inflow)
    q = 0.0
    for t, value in enumerate(inflow):
        q += alpha * (value - q)
        out[t] = q
    return out


class MountainFloodWarning:
    """Streams: `precipitation` (one gauge per catchment, or one for all) and `flow` (stream gauges)."""

    #: the metrics its detections measure: what a Scenario's thresholds may name
    MEASURES: ClassVar[tuple[str, ...]] = (
        "forecastDischargeM3PerS", "warningDischargeM3PerS", "evacuationDischargeM3PerS",
        "rainfallIntensityMmPerHour", "forecastDischargePercent",
    )


    def __init__(
        self,
        areas: list[Area],
        step_s: float,
        horizon_s: float = 3600.0,
        unit_factor: float = 1.0,
        flow_m3s_per_unit: float = 1.0,
        rain_mm_per_hour_per_unit: float = 1.0,
    ) -> None:
        self.areas = areas
        self.step_s = step_s
        self.horizon_s = horizon_s
        self.unit_factor = unit_factor  # converts rain intensity x area into discharge units
        self.flow_m3s_per_unit = flow_m3s_per_unit
        self.rain_mm_per_hour_per_unit = rain_mm_per_hour_per_unit
        self.params: dict[str, CatchmentParams] = {}

    def fit(self, history: Window, catchment_area: dict[str, float] | None = None) -> Self:
        """Calibrate coefficient and lag per catchment on a recorded storm (grid search, least squares)."""
        require(history, "precipitation", "flow")
        flow = history["flow"]
        areas = catchment_area or {}
        for j, name in enumerate(flow.sensors):
            rain = self._rain_for(history, name)
            observed = np.nan_to_num(flow.values[:, j])
            best: tuple[float, CatchmentParams] | None = None
            for coefficient in np.linspace(0.1, 1.0, 10):
                for lag_s in (300.0, 600.0, 900.0, 1800.0, 2700.0, 3600.0, 5400.0):
                    for loss in (0.0, 0.05, 0.1, 0.2):
                        params = CatchmentParams(areas.get(name, 1.0), float(coefficient), lag_s, loss)
                        err = float(
                            np.sum((runoff(rain, params, self.step_s, self.unit_factor) - observed) ** 2)
                        )
                        if best is None or err < best[0]:
                            best = (err, params)
            assert best is not None
            self.params[name] = best[1]
        return self

    def _rain_for(self, window: Window, catchment: str) -> FloatArray:
        rain = window["precipitation"]
        if catchment in rain.sensors:
            return np.asarray(rain.column(catchment), dtype=np.float64)
        return np.asarray(np.nanmean(rain.values, axis=1), dtype=np.float64)

    def forecast(self, window: Window, catchment: str) -> FloatArray:
        """Per step t: the highest discharge the model expects within the horizon after t."""
        params = self.params[catchment]
        rain = np.nan_to_num(self._rain_for(window, catchment))
        ahead = max(1, round(self.horizon_s / self.step_s))
        hour = max(1, round(3600.0 / self.step_s))
        peaks = np.empty(len(rain))
        lead = np.arange(1, ahead + 1, dtype=np.float64)
        for t in range(len(rain)):
            recent = rain[max(0, t - hour + 1) : t + 1]
            slope = float(np.polyfit(np.arange(recent.size), recent, 1)[0]) if recent.size > 2 else 0.0
            # a storm still building is carried forward on its trend, a waning one at its mean
            nowcast = (
                np.maximum(recent.mean(), rain[t] + slope * lead)
                if slope > 0
                else np.full(ahead, recent.mean())
            )
            series = np.concatenate([rain[: t + 1], nowcast])
            peaks[t] = runoff(series, params, self.step_s, self.unit_factor)[t:].max()
        return peaks

    def score(self, window: Window) -> FloatArray:
        """Per step and area: forecast peak discharge as a fraction of the area's warning level."""
        require(window, "precipitation")
        cols = [self.forecast(window, a.catchment) / a.warn_discharge for a in self.areas]
        return np.asarray(np.column_stack(cols), dtype=np.float64)

    def predict(self, window: Window, sink: IncidentSink | None = None) -> list[IncidentEvent]:
        """Pre-warnings: the first step each area's forecast passes its warning level."""
        events = []
        for area in self.areas:
            peak = self.forecast(window, area.catchment)
            over = np.flatnonzero(peak >= area.warn_discharge)
            if not over.size:
                continue
            t = int(over[0])
            events.append(self._prewarning(window, area, t, float(peak[t])))
        return emit(sorted(events, key=lambda e: e.detected_at_s), sink)

    def _prewarning(self, window: Window, area: Area, t: int, peak: float) -> IncidentEvent:
        q = self.flow_m3s_per_unit
        rain = self._rain_for(window, area.catchment)
        gauges = window["precipitation"]
        own = gauges.sensors.index(area.catchment) if area.catchment in gauges.sensors else None
        measurements = [
            Measurement("forecastDischargeM3PerS", "MQS", peak * q, "flow", area.catchment),
            Measurement("warningDischargeM3PerS", "MQS", area.warn_discharge * q),
            Measurement("evacuationDischargeM3PerS", "MQS", area.evacuate_discharge * q),
            Measurement("rainfallIntensityMmPerHour", "H67",
                        float(np.nan_to_num(rain[t])) * self.rain_mm_per_hour_per_unit,
                        "rainfallIntensity", None if own is None else area.catchment, own),
        ]
        if area.reference_discharge:
            share = 100.0 * peak / area.reference_discharge
            measurements.insert(
                0, Measurement("forecastDischargePercent", "P1", share, "flow", area.catchment)
            )
        critical = peak >= area.evacuate_discharge
        rule = (
            f"the discharge forecast within {self.horizon_s / 60:g} min, {peak * q:.3g} m3/s, passes the "
            f"area's warning discharge {area.warn_discharge * q:.3g} m3/s"
            + (f"; critical: it passes the evacuation discharge {area.evacuate_discharge * q:.3g} m3/s"
               if critical else "")
        )
        return IncidentEvent(
            kind="mountain-flood",
            location=IncidentLocation(asset_id=area.name, lat=area.lat, lon=area.lon),
            severity="critical" if critical else "warning",
            detected_at_s=float(window["precipitation"].times_s[t]),
            evidence={
                "catchment": area.catchment,
                "forecast_peak": peak,
                "warn_discharge": area.warn_discharge,
                "evacuate_discharge": area.evacuate_discharge,
                "horizon_s": self.horizon_s,
            },
            measurements=tuple(measurements),
            rule=rule,
        )

    def rehearse(
        self, storms: dict[str, Window], simulate: Callable[[str], Window] | None = None
    ) -> list[DrillOutcome]:
        """Drill: for each storm, warn on its rainfall and compare with the simulated stream gauges.

        `storms` maps a drill name to its window (rain and simulated flow); `simulate`, when
        given, produces the window for a name instead (so drills can run the engine lazily).
        """
        outcomes = []
        for name, given in storms.items():
            window = simulate(name) if simulate is not None else given
            warned = {e.location.asset_id: e.detected_at_s for e in self.predict(window)}
            flow = window["flow"]
            for area in self.areas:
                observed = np.nan_to_num(flow.column(area.catchment))
                hits = np.flatnonzero(observed >= area.warn_discharge)
                exceeded = float(flow.times_s[hits[0]]) if hits.size else None
                outcomes.append(DrillOutcome(name, area.catchment, warned.get(area.name), exceeded))
        return outcomes

    def preplan(self, window: Window) -> list[dict[str, Any]]:
        """Areas to evacuate now, soonest first: those whose forecast passes the evacuation level."""
        times = window["precipitation"].times_s
        plan = []
        for area in self.areas:
            peak = self.forecast(window, area.catchment)
            hits = np.flatnonzero(peak >= area.evacuate_discharge)
            if hits.size:
                plan.append(
                    {
                        "area": area.name,
                        "catchment": area.catchment,
                        "evacuate_from_s": float(times[hits[0]]),
                        "forecast_peak": float(peak.max()),
                        "evacuate_discharge": area.evacuate_discharge,
                    }
                )
        return sorted(plan, key=lambda p: p["evacuate_from_s"])

    def explain(self, incident: IncidentEvent) -> dict[str, Any]:
        params = self.params.get(str(incident.evidence.get("catchment")))
        return {
            "method": "runoff coefficient and linear reservoir on observed rain plus a trend nowcast",
            "params": None if params is None else params.__dict__,
            **incident.evidence,
        }
