"""Crowd density forecasts and capacity alerts for major events, raised before the breach.

The readings are gate cameras' crowd density (people per 100 m², the unit of the Scenario's
`crowdDensityPer100Sqm` thresholds) at the fleet's sampling interval. `fit` learns each site's
usual density by time of week (the median of `profile_step_s` slots over the history's weeks).
The forecast `horizon_s` ahead is the usual density then, plus the site's current departure
from usual and its trend: a straight line fitted by least squares to the departures of the last
`trend_window_s` (a queue growing at a gate grows close to linearly while arrivals exceed what
the gate passes). A site alerts when its forecast reaches `warning_density` for `persist_s`
(at least one reading), once per episode; an episode ends when forecast and measurement have both
stayed below the warning level for `rearm_s`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
from citynerve.models.detectors.base import FloatArray, SensorWindow, Window, emit, require, slot_of
from citynerve.models.incidents import IncidentEvent, IncidentLocation, IncidentSink, Measurement
from numpy.lib.stride_tricks import sliding_window_view

_WEEK_S = 7 * 86400.0
DENSITY = "crowdDensity"  # the SensorType's property: people per 100 m²
PEOPLE = "peopleCount"  # people in the camera's zone


@dataclass(frozen=True)
class DensityForecast:
    """Per reading and site: the fitted level now, its trend and the forecast `horizon_s` ahead."""

    level: FloatArray  # people per 100 m², the trend line's value now
    slope_per_s: FloatArray  # people per 100 m² per second
    forecast: FloatArray  # people per 100 m², `horizon_s` ahead


class CrowdCongestionDetector:
    #: the metrics its detections measure: what a Scenario's thresholds may name
    MEASURES: ClassVar[tuple[str, ...]] = ("crowdDensityPer100Sqm", "forecastCrowdDensityPer100Sqm")

    def __init__(
        self,
        warning_density: float = 250.0,
        alarm_density: float = 400.0,
        horizon_s: float = 900.0,
        trend_window_s: float = 600.0,
        persist_s: float = 180.0,
        rearm_s: float = 1800.0,
        profile_step_s: float = 900.0,
        locations: Mapping[str, tuple[float, float]] | None = None,
    ) -> None:
        if not 0 < warning_density <= alarm_density:
            raise ValueError(
                f"crowd detector warning_density {warning_density} must be positive and at most "
                f"alarm_density {alarm_density}"
            )
        self.warning_density = warning_density
        self.alarm_density = alarm_density
        self.horizon_s = horizon_s
        self.trend_window_s = trend_window_s
        self.persist_s = persist_s
        self.rearm_s = rearm_s
        self.profile_step_s = profile_step_s
        self.locations = dict(locations or {})
        self._usual: FloatArray | None = None  # time-of-week slot x site
        self._sites: tuple[str, ...] = ()

    def fit(self, history: Window) -> Self:
        """Learn each site's usual density by time of week from ordinary weeks."""
        require(history, DENSITY)
        density = history[DENSITY]
        slots = slot_of(density.times_s, self.profile_step_s, _WEEK_S)
        usual = np.full((round(_WEEK_S / self.profile_step_s), len(density.sensors)), np.nan)
        order = np.argsort(slots, kind="stable")
        present, starts = np.unique(slots[order], return_index=True)
        for slot, rows in zip(present, np.split(density.values[order], starts[1:]), strict=True):
            with warnings.catch_warnings():  # a site the counters never covered in a slot stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                usual[slot] = np.nanmedian(rows, axis=0)
        self._usual = np.nan_to_num(usual, nan=float(np.nanmedian(usual)))
        self._sites = density.sensors
        return self

    def _usual_at(self, times_s: FloatArray, sites: Sequence[str]) -> FloatArray:
        if self._usual is None:
            raise RuntimeError("crowd detector is not fitted; call fit() on ordinary weeks first")
        unknown = [s for s in sites if s not in self._sites]
        if unknown:
            raise KeyError(f"crowd detector was not fitted on site(s) {', '.join(unknown)}")
        columns = self._usual[:, [self._sites.index(s) for s in sites]]
        return columns[slot_of(times_s, self.profile_step_s, _WEEK_S)]

    def forecast(self, window: Window) -> DensityForecast:
        """The density expected `horizon_s` after each reading, from the profile and the trend."""
        require(window, DENSITY)
        density = window[DENSITY]
        step_s = _step_of(density)
        points = max(round(self.trend_window_s / step_s), 3)
        usual = self._usual_at(density.times_s, density.sensors)
        departure = density.values - usual
        padded = np.vstack([np.full((points - 1, departure.shape[1]), np.nan), departure])
        recent = sliding_window_view(padded, points, axis=0)  # time x site x point
        x = np.arange(points, dtype=np.float64) - (points - 1)  # the newest point at 0
        valid = np.isfinite(recent)
        n = valid.sum(axis=2)
        with np.errstate(invalid="ignore", divide="ignore"):
            x_mean = np.where(valid, x, 0.0).sum(axis=2) / n
            y_mean = np.nansum(recent, axis=2) / n
            dx = np.where(valid, x - x_mean[..., None], 0.0)
            slope = (dx * np.nan_to_num(recent - y_mean[..., None])).sum(axis=2) / (dx**2).sum(axis=2)
        enough = n >= max(points // 2, 2)
        slope = np.where(enough, slope, 0.0) / step_s
        level = np.where(enough, y_mean - slope * step_s * x_mean, departure)
        ahead = self._usual_at(density.times_s + self.horizon_s, density.sensors)
        return DensityForecast(
            level=np.asarray(usual + level, dtype=np.float64),
            slope_per_s=np.asarray(slope, dtype=np.float64),
            forecast=np.asarray(ahead + level + slope * self.horizon_s, dtype=np.float64),
        )

    def score(self, window: Window) -> FloatArray:
        """Per reading and site: the forecast density as a share of the warning level (≥ 1 alerts)."""
        return np.asarray(
            np.nan_to_num(self.forecast(window).forecast) / self.warning_density, dtype=np.float64
        )

    def predict(self, window: Window, sink: IncidentSink | None = None) -> list[IncidentEvent]:
        """One alert per site per episode, when the forecast reaches the warning level."""
        density = window[DENSITY]
        people = window.get(PEOPLE)
        outlook = self.forecast(window)
        hot = np.nan_to_num(outlook.forecast) >= self.warning_density
        calm = ~hot & ~(np.nan_to_num(density.values) >= self.warning_density)
        step_s = _step_of(density)
        persist = max(round(self.persist_s / step_s), 1)
        rearm_steps = max(round(self.rearm_s / step_s), 1)
        events = []
        for j, site in enumerate(density.sensors):
            run, calm_run, alerted = 0, 0, False
            for t in range(hot.shape[0]):
                run = run + 1 if hot[t, j] else 0
                calm_run = calm_run + 1 if calm[t, j] else 0
                if calm_run >= rearm_steps:
                    alerted = False
                if run >= persist and not alerted:
                    alerted = True
                    events.append(self._event(density, people, outlook, t, j, t - run + 1, site))
        return emit(sorted(events, key=lambda e: e.detected_at_s), sink)

    def _event(
        self,
        density: SensorWindow,
        people: SensorWindow | None,
        outlook: DensityForecast,
        t: int,
        j: int,
        onset: int,
        site: str,
    ) -> IncidentEvent:
        now = float(density.times_s[t])
        level, slope = float(outlook.level[t, j]), float(outlook.slope_per_s[t, j])
        # when the trend line reaches the warning level (now if it is there already)
        to_breach = max(0.0, (self.warning_density - level) / slope) if slope > 0 else self.horizon_s
        breach_in_s = min(to_breach, self.horizon_s)
        lon, lat = self.locations.get(site, (None, None))
        measured = float(density.values[t, j])
        evidence: dict[str, Any] = {
            # named as the Scenario's metric, so the operator judges severity in its unit
            "crowd_density_per_100_sqm": measured,
            "forecast_crowd_density_per_100_sqm": float(outlook.forecast[t, j]),
            "forecast_horizon_minutes": self.horizon_s / 60.0,
            "trend_per_100_sqm_per_minute": slope * 60.0,
            "predicted_breach_at_s": now + breach_in_s,
            "predicted_breach_in_minutes": breach_in_s / 60.0,
            "capacity": self.warning_density,
            "alarm_density_per_100_sqm": self.alarm_density,
        }
        if people is not None:
            evidence["people_in_zone"] = float(people.values[t, people.sensors.index(site)])
        return IncidentEvent(
            kind="major-event",
            location=IncidentLocation(asset_id=site, lat=lat, lon=lon),
            severity="critical" if measured >= self.alarm_density else "warning",
            detected_at_s=now,
            onset_s=float(density.times_s[onset]),
            evidence=evidence,
            measurements=tuple(
                Measurement(metric, "C62", value, quantity=DENSITY, sensor=site, sensor_index=j)
                for metric, value in (
                    ("crowdDensityPer100Sqm", measured),
                    ("forecastCrowdDensityPer100Sqm", float(outlook.forecast[t, j])),
                )
                if np.isfinite(value)
            ),
            rule=(
                f"the density forecast {self.horizon_s / 60:g} min ahead (time-of-week profile plus the "
                f"{self.trend_window_s / 60:g}-min trend) stayed at or above {self.warning_density:g} people "
                f"per 100 m² for {self.persist_s / 60:g} min"
            ),
        )

    def explain(self, incident: IncidentEvent) -> dict[str, Any]:
        return {
            "method": (
                "time-of-week density profile plus a least-squares trend of the departure from it, "
                "forecast a horizon ahead against the warning density"
            ),
            "warning_density": self.warning_density,
            "alarm_density": self.alarm_density,
            "horizon_minutes": self.horizon_s / 60.0,
            "trend_window_minutes": self.trend_window_s / 60.0,
            "persist_minutes": self.persist_s / 60.0,
            **incident.evidence,
        }


def _step_of(window: SensorWindow) -> float:
    if len(window.times_s) < 2:
        raise ValueError("crowd window needs at least two readings to know its sampling interval")
    return float(np.median(np.diff(window.times_s)))


@dataclass(frozen=True)
class AlertLead:
    """An alert matched to the measured breach it warned of; lead is positive when ahead."""

    site: str
    detected_at_s: float
    breach_at_s: float

    @property
    def lead_time_s(self) -> float:
        return self.breach_at_s - self.detected_at_s


@dataclass(frozen=True)
class DrillScore:
    matched: tuple[AlertLead, ...]
    alerts_without_breach: int
    missed_breaches: int


def score_drill(
    events: Sequence[IncidentEvent], breaches: Mapping[str, Sequence[float]], match_s: float
) -> DrillScore:
    """Match each measured breach to the earliest alert at its site within `match_s` either side."""
    pending = sorted(events, key=lambda e: e.detected_at_s)
    used: set[int] = set()
    matched, missed = [], 0
    for site, times in breaches.items():
        for breach in times:
            candidates = [
                i
                for i, e in enumerate(pending)
                if i not in used and e.location.asset_id == site and abs(breach - e.detected_at_s) <= match_s
            ]
            if not candidates:
                missed += 1
                continue
            used.add(candidates[0])
            matched.append(AlertLead(site, pending[candidates[0]].detected_at_s, breach))
    return DrillScore(
        matched=tuple(sorted(matched, key=lambda m: m.detected_at_s)),
        alerts_without_breach=len(pending) - len(used),
        missed_breaches=missed,
    )
