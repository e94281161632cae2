"""Water-burst scenarios end to end: simulate the field, compare with the model, detect, score.

`evaluate_water_detection` is how detector quality is measured (tests and `bench/detection.py`):
detection rate, detection delay from onset, localisation error and false alarms per day.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import wntr
from citynerve.models.detectors.base import SensorWindow, Window
from citynerve.models.detectors.water import KPA_PER_METRE_OF_WATER, LeakLocaliser, WaterLeakDetector
from citynerve.models.incidents import IncidentEvent
from citynerve.workloads.sim.water import (
    LeakSpec,
    WaterRun,
    WaterScenarioSpec,
    choose_sensors,
    graph_distances,
    model_baseline,
    network_path,
    run_water_scenarios,
    sensitivity_signatures,
)

#: The terminal of a water zone's supply fleet that reports the zone's net supply (sources plus tank
#: outflows, m³/h): what a utility's SCADA sums from its metered inlets.
ZONE_SUPPLY_TERMINAL = "zone-supply"


def window_of(run: WaterRun, model: WaterRun) -> Window:
    """A detector window: field readings and the model's expectation for the same sensors."""
    sensors_p = run.layout.pressure_nodes
    return {
        "pressure": SensorWindow(run.times_s, sensors_p, run.pressure),
        "pressure_model": SensorWindow(model.times_s, sensors_p, model.pressure),
        "consumption": SensorWindow(run.times_s, ("zone",), run.consumption()[:, None]),
        "consumption_model": SensorWindow(model.times_s, ("zone",), model.consumption()[:, None]),
    }


class HydraulicExpectation:
    """The utility's hydraulic model run forward day by day over the period being scored: what it
    expects at the loggers and of the zone's supply at each step, tanks carried over from one day
    to the next as they are in the city (a one-day profile repeated would start every day from the
    model file's tank levels, and the field's drifting tanks would read as leaks).

    Days are counted from the UTC midnight of the first time asked for; each day is simulated once
    (EPANET, the model network without leaks, mismatch or noise) and kept.
    """

    def __init__(self, spec: WaterScenarioSpec, keep_days: int = 8) -> None:
        self.spec = replace(spec, leaks=(), duration_s=86400)
        self.layout = spec.sensors or choose_sensors(spec.network)
        self.keep_days = keep_days
        self.anchor_s: float | None = None
        self._days: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._levels: tuple[int, dict[str, float]] | None = None  # tank levels at the end of a day

    def _simulate_day(self, day: int) -> tuple[np.ndarray, np.ndarray]:
        import tempfile  # noqa: PLC0415
        from pathlib import Path  # noqa: PLC0415

        from citynerve.workloads.sim.water import load_network  # noqa: PLC0415

        wn = load_network(self.spec)
        if self._levels is not None:
            for tank, level in self._levels[1].items():
                wn.get_node(tank).init_level = level
        with tempfile.TemporaryDirectory(prefix="citynerve-expectation-") as workdir:
            results = wntr.sim.EpanetSimulator(wn).run_sim(file_prefix=str(Path(workdir) / self.spec.network))
        pressure_df = results.node["pressure"]
        self._levels = (day, {t: float(pressure_df[t].iloc[-1]) for t in wn.tank_name_list})
        flows = results.link["flowrate"][list(self.layout.flow_links)].to_numpy(dtype=np.float64)
        signs = np.asarray(self.layout.flow_into_network, dtype=np.float64)
        pressure = pressure_df[list(self.layout.pressure_nodes)].to_numpy(dtype=np.float64)
        return pressure[:-1], (flows @ signs)[:-1]  # the day's last instant is the next day's first

    def _day(self, day: int) -> tuple[np.ndarray, np.ndarray]:
        if day not in self._days:
            start = 0 if self._levels is None else self._levels[0] + 1
            if day < start:
                msg = f"day {day} of the expectation is before the days already run ({start})"
                raise ValueError(msg)
            for d in range(start, day + 1):
                self._days[d] = self._simulate_day(d)
            for old in [d for d in self._days if d <= day - self.keep_days]:
                del self._days[old]
        return self._days[day]

    def at(self, times_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Expected pressure (time x logger, metres) and zone supply (time, m³/s) at ``times_s``."""
        if self.anchor_s is None:
            self.anchor_s = float(np.floor(np.min(times_s) / 86400.0) * 86400.0)
        offset = np.asarray(times_s, dtype=np.float64) - self.anchor_s
        days = (offset // 86400.0).astype(np.int64)
        slots = ((offset % 86400.0) // self.spec.hydraulic_step_s).astype(np.int64)
        pressure = np.full((len(offset), len(self.layout.pressure_nodes)), np.nan)
        supply = np.full(len(offset), np.nan)
        for day in np.unique(days):
            if day < 0:
                continue  # before the anchor: not expected (the context began after it)
            p, c = self._day(int(day))
            rows = days == day
            pressure[rows] = p[slots[rows]]
            supply[rows] = c[slots[rows]]
        return pressure, supply


def build_detector(base: WaterScenarioSpec, history_days: int = 6, **params: Any) -> WaterLeakDetector:
    """Fit a detector on leak-free field history and give it the network's leak signatures."""
    wn = wntr.network.WaterNetworkModel(str(network_path(base.network)))
    candidates = list(wn.junction_name_list)
    localiser = LeakLocaliser(
        candidates=tuple(candidates),
        signatures=sensitivity_signatures(base, candidates),
    )
    detector = WaterLeakDetector(step_s=base.hydraulic_step_s, localiser=localiser, **params)
    model = model_baseline(base)
    days = run_water_scenarios(
        [replace(base, leaks=(), seed=base.seed + 1000 + d) for d in range(history_days)]
    )
    history = {
        name: SensorWindow(
            np.concatenate([d.times_s + i * base.duration_s for i, d in enumerate(days)]),
            stream.sensors,
            np.vstack([window_of(d, model)[name].values for d in days]),
        )
        for name, stream in window_of(days[0], model).items()
    }
    detector.fit(history)
    # what the hydraulic model expects at the loggers and of the zone's supply over the day: a live
    # workload compares the field's windows with it, time of day by time of day
    one_day = window_of(model, model)
    detector.expectation = {name: one_day[name] for name in ("pressure_model", "consumption_model")}
    # and the model itself, which a live workload runs forward over the period it scores
    detector.hydraulic_model = replace(base, leaks=())
    return detector


@dataclass(frozen=True)
class WaterDetectionReport:
    network: str
    scenarios: int
    detected: int
    detection_rate: float
    median_delay_min: float
    median_localisation_hops: float
    median_localisation_m: float
    false_alarms_per_day: float
    per_scenario: list[dict[str, Any]]

    def figures(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "per_scenario"}


def evaluate_water_detection(
    base: WaterScenarioSpec, leaks: list[LeakSpec], clean_days: int = 4, **params: Any
) -> WaterDetectionReport:
    """Run every leak as its own scenario plus leak-free days, all in parallel, and score the detector."""
    base = replace(base, sensors=base.sensors or choose_sensors(base.network))
    detector = build_detector(base, **params)
    model = model_baseline(base)
    leak_specs = [replace(base, leaks=(leak,), seed=base.seed + i) for i, leak in enumerate(leaks)]
    clean_specs = [replace(base, leaks=(), seed=base.seed + 500 + d) for d in range(clean_days)]
    runs = run_water_scenarios(leak_specs + clean_specs)
    false_alarms = 0
    observed_s = 0.0
    rows: list[dict[str, Any]] = []
    for leak, run in zip(leaks, runs[: len(leaks)], strict=True):
        events = detector.predict(window_of(run, model))
        early = [e for e in events if e.detected_at_s < leak.start_s]
        false_alarms += len(early)
        observed_s += leak.start_s
        hits = [e for e in events if e.detected_at_s >= leak.start_s]
        rows.append(_score_leak(base.network, leak, hits[0] if hits else None))
    for run in runs[len(leaks) :]:
        false_alarms += len(detector.predict(window_of(run, model)))
        observed_s += base.duration_s
    found = [r for r in rows if r["detected"]]

    def median(key: str) -> float:
        return float(np.median([r[key] for r in found])) if found else float("nan")

    return WaterDetectionReport(
        network=base.network,
        scenarios=len(leaks),
        detected=len(found),
        detection_rate=len(found) / max(len(leaks), 1),
        median_delay_min=median("delay_min"),
        median_localisation_hops=median("hops"),
        median_localisation_m=median("metres"),
        false_alarms_per_day=false_alarms / (observed_s / 86400.0),
        per_scenario=rows,
    )


def _score_leak(network: str, leak: LeakSpec, event: IncidentEvent | None) -> dict[str, Any]:
    row: dict[str, Any] = {"node": leak.node, "area_m2": leak.area_m2, "kind": leak.kind, "detected": False}
    if event is None:
        return row
    hops, metres = graph_distances(network, leak.node, [event.location.asset_id])
    row.update(
        detected=True,
        delay_min=(event.detected_at_s - leak.start_s) / 60.0,
        located_at=event.location.asset_id,
        hops=float(hops[0]),
        metres=float(metres[0]),
    )
    return row


def leak_set(network: str, count: int, seed: int = 0, duration_s: int = 24 * 3600) -> list[LeakSpec]:
    """Leaks and bursts of varied size, place and start time on a network's junctions."""
    wn = wntr.network.WaterNetworkModel(str(network_path(network)))
    rng = np.random.default_rng(seed)
    nodes = rng.choice(np.array(wn.junction_name_list), size=count, replace=False)
    areas = np.geomspace(0.0005, 0.02, count)
    rng.shuffle(areas)
    starts = rng.integers(int(duration_s * 0.3) // 900, int(duration_s * 0.6) // 900, size=count) * 900
    return [
        LeakSpec(node=str(n), area_m2=float(a), start_s=int(s))
        for n, a, s in zip(nodes, areas, starts, strict=True)
    ]


@dataclass(frozen=True)
class WaterHistory:
    """Where a water zone's stored window history is (the fleets' history volumes, see
    docs/history.md): its pressure loggers' fleet and its supply meter's fleet (each fleet's history
    has its own volume: ``supply_root`` when it is not under ``root`` too), and the period."""

    root: Path
    pressure_fleet: str
    supply_fleet: str
    start: datetime | None = None
    end: datetime | None = None
    supply_root: Path | None = None


def history_window(
    source: WaterHistory, spec: WaterScenarioSpec
) -> tuple[Window, WaterScenarioSpec, dict[str, Any]]:
    """The fleets' stored windows as a detector window over their period, with the hydraulic model's
    expectation for the same period (run forward day by day, as the live workload runs it).

    The loggers are the pressure fleet's terminals that are junctions of the network (terminal id =
    junction); readings are converted to the detector's units (kPa to metres of head, m³/h to m³/s).
    Returns the window, the spec with those loggers, and the history's identity (what it holds).
    """
    from citynerve.workloads.dataplane.history import read_history  # noqa: PLC0415

    pressure = read_history(source.root, source.pressure_fleet, source.start, source.end, ["pressure"])
    supply = read_history(source.supply_root or source.root, source.supply_fleet, source.start, source.end,
                          ["flow"], [ZONE_SUPPLY_TERMINAL])
    if pressure.num_rows == 0:
        msg = f"no pressure windows of fleet {source.pressure_fleet} in the history under {source.root}"
        raise ValueError(msg)
    junctions = set(wntr.network.WaterNetworkModel(str(network_path(spec.network))).junction_name_list)
    terminals = sorted({str(s) for s in pressure.column("sensor").to_pylist()} & junctions)
    if not terminals:
        msg = f"no terminal of fleet {source.pressure_fleet} is a junction of network {spec.network}"
        raise ValueError(msg)
    starts_ms = pressure.column("window_start").cast("int64").to_numpy()
    step_ms = int(spec.hydraulic_step_s * 1000)
    first, last = int(starts_ms.min()), int(starts_ms.max())
    times_ms = np.arange(first, last + step_ms, step_ms, dtype=np.int64)
    index = {int(t): i for i, t in enumerate(times_ms)}
    column = {t: j for j, t in enumerate(terminals)}
    field = np.full((len(times_ms), len(terminals)), np.nan)
    for start, sensor, mean in zip(starts_ms, pressure.column("sensor").to_pylist(),
                                   pressure.column("mean").to_numpy(), strict=True):
        if int(start) in index and sensor in column:
            field[index[int(start)], column[sensor]] = float(mean) / KPA_PER_METRE_OF_WATER
    consumption = np.full(len(times_ms), np.nan)
    for start, mean in zip(supply.column("window_start").cast("int64").to_numpy(),
                           supply.column("mean").to_numpy(), strict=True):
        if int(start) in index:
            consumption[index[int(start)]] = float(mean) / 3600.0
    layout = choose_sensors(spec.network)
    spec = replace(spec, sensors=replace(layout, pressure_nodes=tuple(terminals)), leaks=())
    times = times_ms / 1000.0
    expected_p, expected_c = HydraulicExpectation(spec).at(times)
    window: Window = {
        "pressure": SensorWindow(times, tuple(terminals), field),
        "pressure_model": SensorWindow(times, tuple(terminals), expected_p),
        "consumption": SensorWindow(times, ("zone",), consumption[:, None]),
        "consumption_model": SensorWindow(times, ("zone",), expected_c[:, None]),
    }
    identity = {
        "source": "window-history",
        "pressureFleet": source.pressure_fleet,
        "supplyFleet": source.supply_fleet,
        "from": datetime.fromtimestamp(first / 1000, UTC).isoformat(),
        "to": datetime.fromtimestamp(last / 1000, UTC).isoformat(),
        "steps": len(times_ms), "loggers": terminals,
        "pressureRows": pressure.num_rows, "supplyRows": supply.num_rows,
    }
    return window, spec, identity


def build_detector_from_history(
    source: WaterHistory, spec: WaterScenarioSpec, **params: Any
) -> tuple[WaterLeakDetector, WaterScenarioSpec, dict[str, Any]]:
    """Fit a detector on the zone's stored windows against the hydraulic model of the same period."""
    window, spec, identity = history_window(source, spec)
    wn = wntr.network.WaterNetworkModel(str(network_path(spec.network)))
    candidates = list(wn.junction_name_list)
    signatures = sensitivity_signatures(spec, candidates)
    localiser = LeakLocaliser(candidates=tuple(candidates), signatures=signatures)
    detector = WaterLeakDetector(step_s=spec.hydraulic_step_s, localiser=localiser, **params)
    detector.fit(window)
    model = model_baseline(spec)
    one_day = window_of(model, model)
    detector.expectation = {name: one_day[name] for name in ("pressure_model", "consumption_model")}
    detector.hydraulic_model = spec
    return detector, spec, identity
