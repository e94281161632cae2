"""Live scoring: a Scenario's workload scores its fleets' windows with the verified model.

    windows.<city>.<fleet>.<property> ──▶ StepAssembler ──▶ scorer (the loaded detector) ──▶ IncidentEvent
     (durable consumer scoring-<uid>)      one time step       keeps the recent steps as
                                           of every binding    its context, scores the newest

A *binding* says which (fleet, property) windows feed which stream of the detector and how a
window's per-terminal mean converts to the detector's unit. A *step* is one window start with a
value per terminal of every binding; it is complete once every binding has delivered a window at
or after it (a fleet's windows arrive in time order), or once it has waited ``max_wait_s`` for a
binding that stays silent (that stream is then missing for the step, not invented).

A scorer keeps the last ``context_steps`` steps. Each new step is scored with that context and
only detections *at* the newest step are new; the detector's own statistics (a CUSUM, a trailing
baseline) run over the context. A detection is remembered by its excursion (onset to alarm), so a
swapped model re-finding an excursion already raised raises nothing.

Everything here is pure: the consumer loop that feeds it lives with the workload that runs it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from citynerve.models.detectors.base import SensorWindow, Window, slot_of
from citynerve.models.detectors.water import KPA_PER_METRE_OF_WATER, WaterLeakDetector
from citynerve.models.incidents import IncidentEvent
from citynerve.workloads.dataplane.windows import Window as FleetWindow
from citynerve.workloads.water import ZONE_SUPPLY_TERMINAL, HydraulicExpectation

#: SensorTypes a water-burst scenario reads: pressure loggers at junctions, the zone's supply meter
PRESSURE_SENSOR_TYPE = "pipe-pressure-gauge"
SUPPLY_SENSOR_TYPE = "electromagnetic-flow-meter"
SECONDS_PER_HOUR = 3600.0


class LiveScoringError(ValueError):
    """A scenario that cannot be scored live as bound; the message names what to change."""


@dataclass(frozen=True)
class Binding:
    """Windows of one fleet's property as one stream of the detector."""

    fleet: str
    prop: str
    stream: str
    scale: float = 1.0  # window mean times scale = the detector's unit
    sensors: tuple[str, ...] | None = None  # the terminals the detector reads (None: every one)


@dataclass
class Step:
    """One window start, with each binding's per-terminal values in the detector's units."""

    start_ms: int
    values: dict[str, dict[str, float]] = field(default_factory=dict)  # stream -> terminal -> value
    windows: list[str] = field(default_factory=list)  # msg ids of the windows it holds
    tokens: list[Any] = field(default_factory=list)  # what to acknowledge once it is scored
    first_seen: float = 0.0

    @property
    def time_s(self) -> float:
        return self.start_ms / 1000.0


class StepAssembler:
    """Windows of several bindings into complete time steps, in time order."""

    def __init__(self, bindings: Sequence[Binding], step_s: float, max_wait_s: float = 120.0) -> None:
        self.bindings = {(b.fleet, b.prop): b for b in bindings}
        self.step_ms = int(step_s * 1000)
        self.max_wait_s = max_wait_s
        self._pending: dict[int, Step] = {}
        self._latest: dict[tuple[str, str], int] = {}
        self.done_through: int | None = None  # start of the last step handed out
        self.ignored = 0  # windows of a property no binding reads, or off the step grid

    def add(
        self, window: FleetWindow, token: Any = None, now: float | None = None
    ) -> tuple[list[Step], list[Any]]:
        """Take a window; returns the steps it completed and the tokens that need no step (a window
        no binding reads, or one of a step already scored: acknowledge them at once)."""
        binding = self.bindings.get((window.fleet, window.prop))
        if binding is None or window.start_ms % self.step_ms:
            self.ignored += 1
            return [], [token]
        if self.done_through is not None and window.start_ms <= self.done_through:
            return [], [token]  # delivered again after its step was scored
        step = self._pending.get(window.start_ms)
        if step is None:
            seen = time.monotonic() if now is None else now
            step = self._pending[window.start_ms] = Step(window.start_ms, first_seen=seen)
        if window.msg_id not in step.windows:
            wanted = set(binding.sensors) if binding.sensors is not None else None
            values = step.values.setdefault(binding.stream, {})
            for sensor, mean in zip(window.sensor, window.mean, strict=True):
                if wanted is None or sensor in wanted:
                    values[str(sensor)] = values.get(str(sensor), 0.0) + float(mean) * binding.scale
            step.windows.append(window.msg_id)
        step.tokens.append(token)
        key = (window.fleet, window.prop)
        self._latest[key] = max(self._latest.get(key, window.start_ms), window.start_ms)
        return self._complete(now), []

    def expire(self, now: float | None = None) -> list[Step]:
        """Steps that waited ``max_wait_s`` for a silent binding (and every step before them)."""
        return self._complete(now, expire=True)

    def _complete(self, now: float | None, expire: bool = False) -> list[Step]:
        now = time.monotonic() if now is None else now
        ready: list[Step] = []
        starts = sorted(self._pending)
        heard = [self._latest.get(k) for k in self.bindings]
        floor = min((h for h in heard if h is not None), default=None) if None not in heard else None
        last_expired = max(
            (s for s in starts if expire and now - self._pending[s].first_seen >= self.max_wait_s),
            default=None,
        )
        for start in starts:
            if (floor is not None and start <= floor) or (last_expired is not None and start <= last_expired):
                ready.append(self._pending.pop(start))
                self.done_through = start
            else:
                break
        return ready

    @property
    def pending_windows(self) -> int:
        """Windows received whose step is not complete yet."""
        return sum(len(step.windows) for step in self._pending.values())


class LiveScorer(Protocol):
    """What a loaded detector offers to a live workload."""

    step_s: float
    context_steps: int

    def bindings(self, fleets: Sequence[Mapping[str, Any]]) -> list[Binding]: ...

    def score(self, step: Step) -> list[IncidentEvent]: ...


@dataclass(frozen=True)
class Excursion:
    onset_s: float
    detected_at_s: float
    asset: str


class WaterScorer:
    """A fitted water-burst detector on live windows: loggers' pressure and the zone's supply
    against the hydraulic model's expectation for the same time of day, which the model carries
    (computed from the network model when it was trained)."""

    def __init__(self, detector: WaterLeakDetector, context_steps: int = 192) -> None:
        expectation = getattr(detector, "expectation", None)
        if not expectation or "pressure_model" not in expectation:
            raise LiveScoringError(
                "the model carries no hydraulic expectation for its loggers, so it cannot score live "
                "windows; train it again with `citynerve models train`"
            )
        self.detector = detector
        self.step_s = float(detector.step_s)
        self.context_steps = max(int(context_steps), detector.baseline_steps + 2)
        self.loggers: tuple[str, ...] = tuple(expectation["pressure_model"].sensors)
        self.metered = "consumption_model" in expectation
        self._profile_p = self._by_slot(expectation["pressure_model"])
        self._profile_c = self._by_slot(expectation["consumption_model"]) if self.metered else None
        spec = getattr(detector, "hydraulic_model", None)
        # the model run over the period scored; a model saved before it carried one: the day's profile
        self.hydraulic = HydraulicExpectation(spec) if spec is not None else None
        if self.hydraulic is not None and tuple(self.hydraulic.layout.pressure_nodes) != self.loggers:
            raise LiveScoringError("the model's hydraulic model and its loggers disagree; train it again")
        self._times: list[float] = []
        self._pressure: list[np.ndarray] = []
        self._supply: list[float] = []
        self._windows: list[int] = []
        self.raised: list[Excursion] = []

    def _by_slot(self, stream: SensorWindow) -> np.ndarray:
        slots = slot_of(np.asarray(stream.times_s, dtype=np.float64), self.step_s)
        n = round(86400.0 / self.step_s)
        table = np.full((n, stream.values.shape[1]), np.nan)
        table[slots[::-1] % n] = stream.values[::-1]  # a day's end (86 400 s) does not overwrite midnight
        return table

    def bindings(self, fleets: Sequence[Mapping[str, Any]]) -> list[Binding]:
        """The scenario's pressure-logger fleets and (when the model meters supply) its supply fleet."""
        pressure = [f for f in fleets if f.get("sensorType") == PRESSURE_SENSOR_TYPE]
        supply = [f for f in fleets if f.get("sensorType") == SUPPLY_SENSOR_TYPE]
        if not pressure:
            raise LiveScoringError(
                "a water-burst scenario scores pressure loggers: bind a SensorFleet of type "
                f"{PRESSURE_SENSOR_TYPE}"
            )
        if self.metered and not supply:
            raise LiveScoringError(
                "the model compares the zone's supply with the hydraulic model: bind a SensorFleet of type "
                f"{SUPPLY_SENSOR_TYPE} whose terminal {ZONE_SUPPLY_TERMINAL!r} reports the zone's net supply"
            )
        for fleet in [*pressure, *supply]:
            if int(fleet.get("windowSeconds") or 0) != int(self.step_s):
                raise LiveScoringError(
                    f"SensorFleet {fleet['fleet']} closes windows of {fleet.get('windowSeconds')} s but the "
                    "model "
                    f"scores steps of {self.step_s:g} s; set its spec.windowSeconds to {self.step_s:g}"
                )
        out = [Binding(f["fleet"], "pressure", "pressure", 1.0 / KPA_PER_METRE_OF_WATER, self.loggers)
               for f in pressure]
        if self.metered:
            supplied = (ZONE_SUPPLY_TERMINAL,)
            out += [Binding(f["fleet"], "flow", "consumption", 1.0 / SECONDS_PER_HOUR, supplied)
                    for f in supply]
        return out

    def _append(self, step: Step) -> None:
        row = step.values.get("pressure", {})
        self._times.append(step.time_s)
        self._pressure.append(np.array([row.get(s, math.nan) for s in self.loggers], dtype=np.float64))
        supply = step.values.get("consumption", {})
        self._supply.append(float(supply.get(ZONE_SUPPLY_TERMINAL, math.nan)))
        self._windows.append(len(step.windows))
        if len(self._times) > self.context_steps:
            del self._times[0], self._pressure[0], self._supply[0], self._windows[0]

    @property
    def context(self) -> tuple[float, float, int]:
        """The context scored at the newest step: its first and last step start (s), its windows."""
        return self._times[0], self._times[-1], sum(self._windows)

    def window(self) -> Window:
        """The detector's window over the context: field readings and the model's expectation."""
        times = np.asarray(self._times, dtype=np.float64)
        expected_c: np.ndarray | None
        if self.hydraulic is not None:
            expected_p, supply = self.hydraulic.at(times)
            expected_c = supply[:, None]
        else:
            slots = slot_of(times, self.step_s) % self._profile_p.shape[0]
            expected_p = self._profile_p[slots]
            expected_c = self._profile_c[slots] if self._profile_c is not None else None
        window: dict[str, SensorWindow] = {
            "pressure": SensorWindow(times, self.loggers, np.vstack(self._pressure)),
            "pressure_model": SensorWindow(times, self.loggers, expected_p),
        }
        if self.metered and expected_c is not None:
            window["consumption"] = SensorWindow(times, ("zone",), np.asarray(self._supply)[:, None])
            window["consumption_model"] = SensorWindow(times, ("zone",), expected_c)
        return window

    def score(self, step: Step) -> list[IncidentEvent]:
        """Append the step and return the detections first raised at it."""
        self._append(step)
        if len(self._times) <= self.detector.baseline_steps:
            return []
        new = []
        for event in self.detector.predict(self.window()):
            if event.detected_at_s != step.time_s:
                continue
            onset = event.onset_s if event.onset_s is not None else event.detected_at_s
            # the same excursion, raised already (by this model or the one it replaced): it began
            # before that alarm; a new excursion begins after the statistic settled
            if any(onset <= r.detected_at_s for r in self.raised):
                continue
            self.raised.append(Excursion(onset, event.detected_at_s, event.location.asset_id))
            new.append(event)
        return new

    def adopt(self, other: WaterScorer) -> None:
        """Take over ``other``'s context and what it raised (a swap at a step boundary)."""
        n = self.context_steps
        self._times, self._pressure = list(other._times[-n:]), list(other._pressure[-n:])
        self._supply, self._windows = list(other._supply[-n:]), list(other._windows[-n:])
        self.raised = list(other.raised)
        mine, theirs = self.hydraulic, other.hydraulic
        if mine is not None and theirs is not None and mine.spec == theirs.spec:
            self.hydraulic = theirs  # the same model run: its days (and tanks) go on


def scorer_for(kind: str, detector: Any, context_steps: int = 192) -> WaterScorer:
    """The live scorer of a scenario kind around a loaded detector."""
    if kind == "water-burst":
        if not isinstance(detector, WaterLeakDetector):
            what = type(detector).__name__
            raise LiveScoringError(f"a water-burst scenario needs a water leak detector, not {what}")
        return WaterScorer(detector, context_steps)
    raise LiveScoringError(
        f"live scoring of {kind} scenarios is not built yet; run it as a drill (spec.mode: drill)"
    )
