"""Crowd density forecasting and congestion alerts for major events.

`fit` learns, per site and hour of the week, the usual count (median over the history's
weeks) and its spread, and each site's capacity: the highest hourly count seen in history
times `capacity_margin` (the footway's everyday peak, with headroom). The forecast for the
next `lead_steps` hours is the usual count then, scaled by how far above usual the site runs
now (a smoothed ratio): a surge that has begun is carried forward on the week's profile.
An alert fires when a site is both well above its usual count (z ≥ `z_alert`) and its
count or forecast exceeds its capacity, for `persist` consecutive hours.
"""

from __future__ import annotations

from typing import Any, Self

import numpy as np
from citynerve.models.detectors.base import FloatArray, Window, emit, require, slot_of
from citynerve.models.incidents import IncidentEvent, IncidentLocation, IncidentSink

_WEEK_S = 7 * 86400.0


class CrowdCongestionDetector:
    def __init__(
        self,
        step_s: float = 3600.0,
        lead_steps: int = 1,
        z_alert: float = 6.0,
        capacity_margin: float = 1.0,
        capacity_percentile: float = 99.0,
        persist: int = 3,
        smoothing: float = 0.6,
        locations: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        self.step_s = step_s
        self.lead_steps = lead_steps
        self.z_alert = z_alert
        self.capacity_margin = capacity_margin
        self.capacity_percentile = capacity_percentile
        self.persist = persist
        self.smoothing = smoothing
        self.locations = locations or {}
        self._usual: FloatArray | None = None  # slot x site
        self._spread: FloatArray | None = None
        self._capacity: FloatArray | None = None
        self._sites: tuple[str, ...] = ()

    def fit(self, history: Window) -> Self:
        require(history, "peopleCount")
        counts = history["peopleCount"]
        slots = slot_of(counts.times_s, self.step_s, _WEEK_S)
        n_slots = round(_WEEK_S / self.step_s)
        usual = np.full((n_slots, len(counts.sensors)), np.nan)
        spread = np.full_like(usual, np.nan)
        for slot in np.unique(slots):
            rows = counts.values[slots == slot]
            usual[slot] = np.nanmedian(rows, axis=0)
            spread[slot] = 1.4826 * np.nanmedian(np.abs(rows - usual[slot]), axis=0)
        # counts are roughly Poisson at least; the spread never goes below √usual
        self._usual = np.nan_to_num(usual, nan=float(np.nanmedian(usual)))
        self._spread = np.maximum(np.nan_to_num(spread), np.sqrt(np.maximum(self._usual, 1.0)))
        self._capacity = (
            np.nanpercentile(counts.values, self.capacity_percentile, axis=0) * self.capacity_margin
        )
        self._sites = counts.sensors
        return self

    def _profile(self, times_s: FloatArray) -> tuple[FloatArray, FloatArray]:
        if self._usual is None or self._spread is None:
            raise RuntimeError("crowd detector is not fitted; call fit() on ordinary weeks first")
        slots = slot_of(times_s, self.step_s, _WEEK_S)
        return self._usual[slots], self._spread[slots]

    def forecast(self, window: Window) -> FloatArray:
        """Per hour and site: the count expected `lead_steps` hours later."""
        counts = window["peopleCount"]
        usual_now, _ = self._profile(counts.times_s)
        usual_next, _ = self._profile(counts.times_s + self.lead_steps * self.step_s)
        ratio = np.nan_to_num(counts.values / np.maximum(usual_now, 1.0), nan=1.0)
        smoothed = np.empty_like(ratio)
        level = np.ones(ratio.shape[1])
        for t in range(ratio.shape[0]):
            level = self.smoothing * ratio[t] + (1.0 - self.smoothing) * level
            smoothed[t] = level
        return np.asarray(usual_next * smoothed, dtype=np.float64)

    def score(self, window: Window) -> FloatArray:
        """Per hour and site: how many spreads above its usual count the site runs."""
        require(window, "peopleCount")
        counts = window["peopleCount"]
        usual, spread = self._profile(counts.times_s)
        return np.asarray(np.nan_to_num((counts.values - usual) / spread), dtype=np.float64)

    def predict(self, window: Window, sink: IncidentSink | None = None) -> list[IncidentEvent]:
        """One alert per site per congestion episode."""
        z = self.score(window)
        counts = window["peopleCount"]
        forecast = self.forecast(window)
        assert self._capacity is not None
        capacity = self._capacity[[self._sites.index(s) for s in counts.sensors]]
        over = (np.nan_to_num(counts.values) > capacity) | (forecast > capacity)
        hot = (z >= self.z_alert) & over
        events = []
        for j, site in enumerate(counts.sensors):
            run = 0
            alerted = False
            for t in range(hot.shape[0]):
                run = run + 1 if hot[t, j] else 0
                if run == 0:
                    alerted = False
                if run >= self.persist and not alerted:
                    alerted = True
                    onset = t - run + 1
                    lon, lat = self.locations.get(site, (None, None))
                    events.append(
                        IncidentEvent(
                            kind="major-event",
                            location=IncidentLocation(asset_id=site, lat=lat, lon=lon),
                            severity="critical" if counts.values[t, j] > 1.5 * capacity[j] else "warning",
                            detected_at_s=float(counts.times_s[t]),
                            onset_s=float(counts.times_s[onset]),
                            evidence={
                                "count": float(counts.values[t, j]),
                                "forecast_next": float(forecast[t, j]),
                                "capacity": float(capacity[j]),
                                "z": float(z[t, j]),
                            },
                        )
                    )
        return emit(sorted(events, key=lambda e: e.detected_at_s), sink)

    def explain(self, incident: IncidentEvent) -> dict[str, Any]:
        return {
            "method": "hour-of-week profile, z-score and profile-carried forecast against site capacity",
            "z_alert": self.z_alert,
            "persist_hours": self.persist * self.step_s / 3600.0,
            **incident.evidence,
        }
