"""Burst and leak detection in a water network, and localisation to a junction.

Detection compares each pressure logger and the zone's metered supply against the utility's hydraulic model
of the same period. What remains is the field's standing difference from the model (learned
per sensor and time of day by `fit` on leak-free history), noise, and — when a leak opens —
a pressure drop across the loggers near it and more water drawn from the sources. A CUSUM on
the combined, standardised residual raises the alarm; the time the CUSUM last left zero
estimates the onset.

Localisation correlates the residual signature at the alarm (mean residual from estimated
onset to alarm, per logger) with a sensitivity matrix: the pressure change each candidate
junction's leak causes at each logger, simulated on the model (see
`citynerve.workloads.sim.water.sensitivity_signatures`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
from citynerve.models.detectors.base import FloatArray, Window, cusum, emit, require, slot_of
from citynerve.models.incidents import IncidentEvent, IncidentLocation, IncidentSink, Measurement

_MAD_TO_SIGMA = 1.4826
#: kilopascals per metre of water head (fresh water, 1000 kg/m3, standard gravity)
KPA_PER_METRE_OF_WATER = 9.80665


@dataclass(frozen=True)
class LeakLocaliser:
    """Candidate junctions and their simulated pressure signatures at the loggers."""

    candidates: tuple[str, ...]
    signatures: FloatArray  # candidate x pressure logger, metres of pressure change
    #: (longitude, latitude) of candidates, for a georeferenced network only; a drill's network is
    #: placed in the city by its runner instead
    coordinates: dict[str, tuple[float, float]] | None = None

    def rank(self, residual: FloatArray) -> list[tuple[str, float]]:
        """Candidates by cosine similarity of their signature with the residual, best first."""
        present = ~np.isnan(residual)
        sig = self.signatures[:, present]
        res = residual[present]
        denom = np.linalg.norm(sig, axis=1) * max(float(np.linalg.norm(res)), 1e-12)
        similarity = (sig @ res) / np.maximum(denom, 1e-12)
        order = np.argsort(-similarity)
        return [(self.candidates[i], float(similarity[i])) for i in order]


class WaterLeakDetector:
    """CUSUM on two kinds of evidence, each a change against its own trailing baseline.

    * pressure: each logger's residual against the model, less its learned standing offset
      for that time of day, in units of its noise; evidence is the mean drop across loggers;
    * consumption: the zone's metered net supply (sources plus tank outflows, i.e. demand plus
      losses) relative to the model's; pump and tank switching cancel in this mass balance.

    Both are compared with their median over the trailing `baseline_steps` steps: the city's
    demand differs a little from day to day and shifts every residual alike, and against a
    trailing baseline that level cancels while a leak shows as the step change it is.
    """
    #: the metrics its detections measure: what a Scenario's thresholds may name
    MEASURES: ClassVar[tuple[str, ...]] = ("pressureDropKpa", "flowSurgePercent")


    def __init__(
        self,
        step_s: float,
        slack: float = 1.0,
        threshold: float = 12.0,
        sigma_floor_m: float = 0.02,
        localiser: LeakLocaliser | None = None,
        z_clip: float = 10.0,
        step_clip: float = 5.0,
        baseline_steps: int = 8,
    ) -> None:
        self.step_s = step_s
        self.slack = slack
        self.threshold = threshold
        self.sigma_floor_m = sigma_floor_m
        self.localiser = localiser
        self.z_clip = z_clip
        self.step_clip = step_clip
        self.baseline_steps = baseline_steps
        self._offsets: FloatArray | None = None
        self._sigmas: FloatArray | None = None
        self._evidence_null: list[tuple[float, FloatArray]] = []
        self._oos = 1.0
        self._explained: dict[float, dict[str, Any]] = {}
        #: the hydraulic model's expectation over one day (`pressure_model`, `consumption_model`, time
        #: of day in seconds), which a live workload compares the field's windows with
        self.expectation: Window | None = None
        #: the utility's hydraulic model (a `WaterScenarioSpec`: network, loggers, step) that a live
        #: workload runs forward over the days it scores, tanks carried over
        self.hydraulic_model: Any = None

    @staticmethod
    def _residual(window: Window, stream: str) -> FloatArray:
        return window[stream].values - window[f"{stream}_model"].values

    def fit(self, history: Window) -> Self:
        """Learn each logger's standing residual per time of day and the evidence's spread, leak-free."""
        require(history, "pressure", "pressure_model")
        resid = self._residual(history, "pressure")
        slots = slot_of(history["pressure"].times_s, self.step_s)
        n_slots = round(86400.0 / self.step_s)
        offsets = np.full((n_slots, resid.shape[1]), np.nan)
        for slot in np.unique(slots):
            offsets[slot] = np.nanmedian(resid[slots == slot], axis=0)
        # slots never seen in history fall back to the logger's overall median
        offsets = np.where(np.isnan(offsets), np.nanmedian(resid, axis=0), offsets)
        dev = resid - offsets[slots]
        # in-sample deviations understate out-of-sample ones: (n+1)/(n-1) in variance
        n_days = max(2.0, len(slots) / n_slots)
        self._oos = float(np.sqrt((n_days + 1.0) / (n_days - 1.0)))
        mad = np.nanmedian(np.abs(dev - np.nanmedian(dev, axis=0)), axis=0)
        self._sigmas = np.maximum(_MAD_TO_SIGMA * mad * self._oos, self.sigma_floor_m)
        self._offsets = offsets
        # the loggers share common-mode swings, so the spread of their mean is measured on
        # history rather than assumed to shrink as 1/sqrt(n); and per time of day as well,
        # since some hours (pumps switching, tanks turning) are noisier than others
        self._evidence_null = []
        for raw in self._raw_evidence(history):
            centre = float(np.nanmedian(raw))
            overall = _MAD_TO_SIGMA * float(np.nanmedian(np.abs(raw - centre))) * self._oos
            by_slot = np.full(n_slots, overall)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # slots with too few values
                for slot in np.unique(slots):
                    dev = raw[slots == slot] - centre
                    by_slot[slot] = max(
                        overall, float(np.nan_to_num(np.sqrt(np.nanmean(dev**2)))) * self._oos
                    )
            self._evidence_null.append((centre, np.maximum(by_slot, 1e-9)))
        return self

    def zscores(self, window: Window) -> FloatArray:
        """Each pressure logger's residual less its standing offset, in units of its noise."""
        if self._offsets is None or self._sigmas is None:
            raise RuntimeError("water leak detector is not fitted; call fit() on leak-free history first")
        slots = slot_of(window["pressure"].times_s, self.step_s)
        return (self._residual(window, "pressure") - self._offsets[slots]) / self._sigmas

    def _changes(self, x: FloatArray) -> FloatArray:
        """x minus its median over the trailing `baseline_steps` steps (NaN until there are enough)."""
        w = self.baseline_steps
        out = np.full_like(x, np.nan)
        if x.shape[0] <= w:
            return out
        trailing = np.lib.stride_tricks.sliding_window_view(x[:-1], w, axis=0)  # (t-w) x s x w
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
            out[w:] = x[w:] - np.nanmedian(trailing, axis=2)
        return out

    def _raw_evidence(self, window: Window) -> list[FloatArray]:
        """Per step: mean pressure drop (in sigmas); relative rise in consumption, when metered."""
        z_p = np.clip(-self._changes(self.zscores(window)), -self.z_clip, self.z_clip)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a step with every logger missing
            parts = [np.asarray(np.nanmean(z_p, axis=1), dtype=np.float64)]
        if "consumption" in window:
            model = window["consumption_model"].values
            # relative to the day's mean supply: at night the supply can be next to nothing
            relative = self._residual(window, "consumption") / max(float(np.nanmean(np.abs(model))), 1e-9)
            parts.append(np.asarray(self._changes(relative)[:, 0], dtype=np.float64))
        return parts

    def score(self, window: Window) -> FloatArray:
        """Per time step, standardised evidence of a leak (about N(0,1) or below when there is none).

        Evidence is clipped per step so that one odd step (a pump switching a quarter-hour
        earlier than the model says) cannot raise the alarm alone; a leak persists.
        """
        require(window, "pressure", "pressure_model")
        if not self._evidence_null:
            raise RuntimeError("water leak detector is not fitted; call fit() on leak-free history first")
        raw = self._raw_evidence(window)
        if len(raw) != len(self._evidence_null):
            raise KeyError("window and fitting history must both have, or both lack, the consumption stream")
        slots = slot_of(window["pressure"].times_s, self.step_s)
        stacked = np.vstack([(r - c) / s[slots] for r, (c, s) in zip(raw, self._evidence_null, strict=True)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # steps with no evidence at all
            best = np.nanmax(stacked, axis=0)
        return np.asarray(np.clip(np.nan_to_num(best, nan=0.0), -self.step_clip, self.step_clip))

    def predict(self, window: Window, sink: IncidentSink | None = None) -> list[IncidentEvent]:
        """One incident per CUSUM excursion above the threshold (the CUSUM restarts after each)."""
        evidence = self.score(window)
        events: list[IncidentEvent] = []
        start = 0
        while start < len(evidence):
            path = cusum(evidence[start:], self.slack)
            above = np.flatnonzero(path > self.threshold)
            if above.size == 0:
                break
            alarm = start + int(above[0])
            zeros = np.flatnonzero(path[: above[0] + 1] == 0.0)
            onset = start + (int(zeros[-1]) + 1 if zeros.size else 0)
            events.append(self._incident(window, onset, alarm, float(path[above[0]])))
            # the same leak keeps the CUSUM up; look for a new one only once it has settled
            settled = np.flatnonzero(path[above[0] :] == 0.0)
            if settled.size == 0:
                break
            start = alarm + int(settled[0]) + 1
        return emit(events, sink)

    def _incident(self, window: Window, onset: int, alarm: int, statistic: float) -> IncidentEvent:
        times = window["pressure"].times_s
        sensors = window["pressure"].sensors
        z = self.zscores(window)[onset : alarm + 1]
        assert self._offsets is not None
        all_slots = slot_of(times, self.step_s)
        resid = self._residual(window, "pressure") - self._offsets[all_slots]
        before = resid[max(0, onset - self.baseline_steps) : onset]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a logger missing for the whole span
            level = np.nan_to_num(np.nanmedian(before, axis=0)) if before.size else 0.0
            # the change the leak made at each logger, against its level just before onset
            signature = np.nan_to_num(np.nanmean(resid[onset : alarm + 1], axis=0) - level)
            mean_z = np.nan_to_num(np.nanmean(z, axis=0))
        worst = np.argsort(mean_z)[:3]
        evidence: dict[str, Any] = {
            "cusum": statistic,
            "threshold": self.threshold,
            "pressure_drop_m": {sensors[i]: float(-signature[i]) for i in worst},
            "mean_z": {sensors[i]: float(mean_z[i]) for i in worst},
        }
        # the Scenario's metrics: the largest drops, in kPa, at the loggers that saw them
        measurements = [
            Measurement("pressureDropKpa", "KPA", float(-signature[i]) * KPA_PER_METRE_OF_WATER,
                        quantity="pressure", sensor=sensors[i], sensor_index=int(i))
            for i in np.argsort(signature)[:3]
        ]
        surge = self._flow_surge_percent(window, onset, alarm)
        if surge is not None:
            measurements.append(Measurement("flowSurgePercent", "P1", surge, quantity="flow"))
        asset, lat, lon = sensors[int(worst[0])], None, None
        if self.localiser is not None:
            ranked = self.localiser.rank(signature)
            asset = ranked[0][0]
            evidence["candidates"] = ranked[:5]
            if self.localiser.coordinates and asset in self.localiser.coordinates:
                lon, lat = self.localiser.coordinates[asset]
        event = IncidentEvent(
            kind="water-burst",
            location=IncidentLocation(asset_id=asset, lat=lat, lon=lon),
            severity="warning",
            detected_at_s=float(times[alarm]),
            onset_s=float(times[onset]),
            evidence=evidence,
            measurements=tuple(measurements),
            rule=(
                f"the CUSUM of the standardised pressure and supply residuals reached {statistic:.1f}, past "
                f"the detector's threshold {self.threshold:g} (slack {self.slack:g})"
            ),
        )
        self._explained[event.detected_at_s] = evidence
        return event

    def _flow_surge_percent(self, window: Window, onset: int, alarm: int) -> float | None:
        """The zone's supply from onset to alarm above what the model expects, in per cent of it,
        less the standing difference just before onset; None when the supply is not metered."""
        if "consumption" not in window:
            return None
        field = window["consumption"].values[:, 0]
        model = window["consumption_model"].values[:, 0]
        excess = field - model
        before = excess[max(0, onset - self.baseline_steps) : onset]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a span with every reading missing
            level = float(np.nan_to_num(np.nanmedian(before))) if before.size else 0.0
            rise = float(np.nanmean(excess[onset : alarm + 1])) - level
            expected = float(np.nanmean(np.abs(model[onset : alarm + 1])))
        if not (np.isfinite(rise) and np.isfinite(expected)) or expected <= 0.0:
            return None
        return 100.0 * rise / expected

    def explain(self, incident: IncidentEvent) -> dict[str, Any]:
        """Why the alarm was raised: the statistic, the loggers that dropped most, the best candidates."""
        return {
            "method": "CUSUM on standardised residuals against the hydraulic model",
            "slack": self.slack,
            **self._explained.get(incident.detected_at_s, incident.evidence),
        }
