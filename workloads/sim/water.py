"""Water-supply sensor streams from EPANET (through WNTR) on the networks WNTR ships.

A *network* here is a city's water system as its utility models it (the `.inp` file) and as it
really behaves: the field network draws demands that differ from the model by a fixed,
per-junction mismatch (seeded per network), so a detector comparing readings against the
model sees the same kind of standing residual a utility sees. Leaks and bursts are emitters
(pressure-dependent outflow, Q = Cd·A·√(2gh)) behind a short pipe that opens at the onset
time; demand is pressure-dependent (PDD). Every run writes its EPANET files into its own
temporary directory, so runs in parallel never clash.
"""

from __future__ import annotations

import math
import tempfile
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import networkx as nx  # type: ignore[import-untyped]  # no stubs in this environment
import numpy as np
import numpy.typing as npt
import wntr
from citynerve.observability.logs import adopt_logger
from citynerve.workloads.sim.placement import Placement, place_network
from citynerve.workloads.sim.readings import Readings

_NETWORKS = Path(wntr.__file__).parent / "library" / "networks"
#: Networks WNTR ships that the simulators accept by name.
BUNDLED_NETWORKS = ("Net1", "Net3", "Net6", "ky4", "ky10")
_GRAVITY = 9.81
_DISCHARGE_COEFF = 0.75
_LEAK_NODE = "CN_LEAK_{i}"
_LEAK_PIPE = "CN_LEAKPIPE_{i}"

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LeakSpec:
    """A leak or burst: an orifice of `area_m2` at a junction (or mid-pipe) from `start_s` on.

    With `pipe` set the leak is at that pipe's midpoint, and `node` names the pipe end that
    localisation is scored against.
    """

    node: str
    area_m2: float
    start_s: int
    pipe: str | None = None

    @property
    def kind(self) -> str:
        return "burst" if self.area_m2 >= 0.005 else "leak"


@dataclass(frozen=True)
class WaterSensorLayout:
    """Pressure loggers at junctions and flow meters on links."""

    pressure_nodes: tuple[str, ...]
    flow_links: tuple[str, ...]
    #: +1 where a metered link's positive flow enters the network from storage, -1 where it leaves
    flow_into_network: tuple[int, ...] = ()


@dataclass(frozen=True)
class WaterScenarioSpec:
    network: str = "Net3"
    duration_s: int = 24 * 3600
    hydraulic_step_s: int = 900
    leaks: tuple[LeakSpec, ...] = ()
    sensors: WaterSensorLayout | None = None
    pressure_noise_m: float = 0.05
    flow_noise_frac: float = 0.005
    missing_rate: float = 0.01
    #: relative std of the field network's demands against the model's (0 = the model itself)
    demand_mismatch: float = 0.05
    #: relative std of the whole city's demand from one run (day) to the next
    daily_demand_variation: float = 0.01
    network_seed: int = 7
    seed: int = 0


@dataclass(frozen=True)
class WaterRun:
    spec: WaterScenarioSpec
    layout: WaterSensorLayout
    times_s: FloatArray
    pressure: FloatArray  # time x pressure sensor, metres; NaN where missing
    flow: FloatArray  # time x flow sensor, m3/s; NaN where missing
    leak_flow: FloatArray = field(default_factory=lambda: np.zeros(0))  # time, m3/s summed over leaks

    def consumption(self) -> FloatArray:
        """The zone's net supply (demand plus losses) by mass balance over the metered links."""
        signs = np.asarray(self.layout.flow_into_network, dtype=np.float64)
        return np.asarray(self.flow @ signs, dtype=np.float64)  # NaN when any meter is missing

    def readings(self) -> Readings:
        parts = [
            Readings.from_wide(self.times_s, list(self.layout.pressure_nodes), "pressure", self.pressure)
        ]
        if self.layout.flow_links:
            parts.append(Readings.from_wide(self.times_s, list(self.layout.flow_links), "flow", self.flow))
        return Readings.concat(parts)


def network_path(name: str) -> Path:
    if name not in BUNDLED_NETWORKS:
        raise ValueError(f"water network {name!r} is not one WNTR ships; choose one of {BUNDLED_NETWORKS}")
    return _NETWORKS / f"{name}.inp"


def load_network(spec: WaterScenarioSpec) -> Any:
    """The network model with the scenario's time and PDD settings."""
    wn = wntr.network.WaterNetworkModel(str(network_path(spec.network)))
    opts = wn.options
    opts.time.duration = spec.duration_s
    opts.time.hydraulic_timestep = spec.hydraulic_step_s
    opts.time.report_timestep = spec.hydraulic_step_s
    opts.time.quality_timestep = spec.hydraulic_step_s
    opts.quality.parameter = "NONE"
    opts.hydraulic.demand_model = "PDD"
    opts.hydraulic.minimum_pressure = 0.0
    opts.hydraulic.required_pressure = 10.0
    return wn


def choose_sensors(network: str, n_pressure: int = 10) -> WaterSensorLayout:
    """Spread pressure loggers by farthest-point sampling; meter every link out of a source or tank."""
    wn = wntr.network.WaterNetworkModel(str(network_path(network)))
    names = list(wn.junction_name_list)
    xy = np.array([wn.get_node(n).coordinates for n in names], dtype=np.float64)
    chosen = [int(np.argmin(xy[:, 0] + xy[:, 1]))]
    dist = np.linalg.norm(xy - xy[chosen[0]], axis=1)
    while len(chosen) < min(n_pressure, len(names)):
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(xy - xy[nxt], axis=1))
    storage = set(wn.reservoir_name_list) | set(wn.tank_name_list)
    metered = sorted(
        (name, 1 if link.start_node_name in storage else -1)
        for name, link in wn.links()
        if (link.start_node_name in storage) != (link.end_node_name in storage)
    )
    return WaterSensorLayout(
        tuple(names[i] for i in chosen), tuple(m[0] for m in metered), tuple(m[1] for m in metered)
    )


def _apply_field_mismatch(wn: Any, spec: WaterScenarioSpec) -> None:
    rng = np.random.default_rng(spec.network_seed)
    day = 1.0 + spec.daily_demand_variation * np.random.default_rng(spec.seed + 10_000).standard_normal()
    for _name, junction in wn.junctions():
        factor = max(0.0, day * (1.0 + spec.demand_mismatch * rng.standard_normal()))
        for demand in junction.demand_timeseries_list:
            demand.base_value *= factor


def _add_leaks(wn: Any, leaks: tuple[LeakSpec, ...]) -> list[str]:
    leak_pipes = []
    for i, leak in enumerate(leaks):
        at = leak.node
        if leak.pipe is not None:
            at = f"CN_SITE_{i}"
            wn = wntr.morph.split_pipe(wn, leak.pipe, f"{leak.pipe}_CN{i}", at, return_copy=False)
        node = wn.get_node(at)
        leak_node, leak_pipe = _LEAK_NODE.format(i=i), _LEAK_PIPE.format(i=i)
        wn.add_junction(leak_node, base_demand=0.0, elevation=node.elevation, coordinates=node.coordinates)
        wn.add_pipe(
            leak_pipe, at, leak_node, length=1.0, diameter=0.5, roughness=140, initial_status="CLOSED"
        )
        wn.get_node(leak_node).emitter_coefficient = _DISCHARGE_COEFF * leak.area_m2 * math.sqrt(2 * _GRAVITY)
        opens = wntr.network.controls.Control(
            wntr.network.controls.SimTimeCondition(wn, "=", int(leak.start_s)),
            wntr.network.controls.ControlAction(wn.get_link(leak_pipe), "status", 1),
        )
        wn.add_control(f"CN_LEAKOPEN_{i}", opens)
        leak_pipes.append(leak_pipe)
    return leak_pipes


def simulate_water(spec: WaterScenarioSpec, field_network: bool = True) -> WaterRun:
    """Run one scenario; `field_network=False` gives the utility's noise-free model instead."""
    layout = spec.sensors or choose_sensors(spec.network)
    wn = load_network(spec)
    leak_pipes: list[str] = []
    if field_network:
        _apply_field_mismatch(wn, spec)
        leak_pipes = _add_leaks(wn, spec.leaks)
    with tempfile.TemporaryDirectory(prefix=f"citynerve-water-{uuid.uuid4().hex[:8]}-") as workdir:
        results = wntr.sim.EpanetSimulator(wn).run_sim(file_prefix=str(Path(workdir) / spec.network))
    pressure_df = results.node["pressure"]
    flow_df = results.link["flowrate"]
    times = pressure_df.index.to_numpy(dtype=np.float64)
    pressure = pressure_df[list(layout.pressure_nodes)].to_numpy(dtype=np.float64)
    flow = flow_df[list(layout.flow_links)].to_numpy(dtype=np.float64)
    leak_flow = (
        flow_df[leak_pipes].to_numpy(dtype=np.float64).sum(axis=1) if leak_pipes else np.zeros(len(times))
    )
    if field_network:
        rng = np.random.default_rng(spec.seed)
        pressure = pressure + spec.pressure_noise_m * rng.standard_normal(pressure.shape)
        flow = flow * (1.0 + spec.flow_noise_frac * rng.standard_normal(flow.shape))
        pressure[rng.random(pressure.shape) < spec.missing_rate] = np.nan
        flow[rng.random(flow.shape) < spec.missing_rate] = np.nan
    return WaterRun(spec, layout, times, pressure, flow, leak_flow)


def model_baseline(spec: WaterScenarioSpec) -> WaterRun:
    """The utility's model of the same day: no leaks, no field mismatch, no noise."""
    return simulate_water(replace(spec, leaks=()), field_network=False)


def sensitivity_signatures(
    spec: WaterScenarioSpec, candidates: list[str], area_m2: float = 0.002, at_s: int = 12 * 3600
) -> FloatArray:
    """Pressure change at each pressure sensor for a leak at each candidate junction.

    One EPANET snapshot per candidate through the toolkit (no file per run); the model is the
    utility's, at hour `at_s` of the demand pattern. Returns (candidate x sensor) metres.
    """
    from wntr.epanet import toolkit  # noqa: PLC0415 - the toolkit loads a shared library

    layout = spec.sensors or choose_sensors(spec.network)
    wn = load_network(replace(spec, duration_s=0))
    wn.options.time.pattern_start = at_s
    en_pressure, en_emitter = 11, 3
    with tempfile.TemporaryDirectory(prefix=f"citynerve-sens-{uuid.uuid4().hex[:8]}-") as workdir:
        inp = Path(workdir) / "model.inp"
        wntr.network.write_inpfile(wn, str(inp), units="LPS")
        en = toolkit.ENepanet()
        en.ENopen(str(inp), str(Path(workdir) / "model.rpt"), str(Path(workdir) / "model.bin"))
        en.ENopenH()
        sensor_idx = [en.ENgetnodeindex(n) for n in layout.pressure_nodes]

        def solve() -> FloatArray:
            en.ENinitH(0)
            en.ENrunH()
            return np.array([en.ENgetnodevalue(i, en_pressure) for i in sensor_idx], dtype=np.float64)

        base = solve()
        # written in LPS, so EPANET's emitter coefficient is L/s per m^0.5 and pressures are metres
        coeff = 1000.0 * _DISCHARGE_COEFF * area_m2 * math.sqrt(2 * _GRAVITY)
        rows = []
        for cand in candidates:
            idx = en.ENgetnodeindex(cand)
            en.ENsetnodevalue(idx, en_emitter, coeff)
            rows.append(solve() - base)
            en.ENsetnodevalue(idx, en_emitter, 0.0)
        en.ENcloseH()
        en.ENclose()
    return np.vstack(rows)


def graph_distances(network: str, source: str, targets: list[str]) -> tuple[FloatArray, FloatArray]:
    """Hops and pipe-length metres from `source` to each target junction."""
    wn = wntr.network.WaterNetworkModel(str(network_path(network)))
    graph = nx.Graph()
    for name, link in wn.links():
        length = float(getattr(link, "length", 1.0))
        graph.add_edge(link.start_node_name, link.end_node_name, length=length, name=name)
    hops = nx.single_source_shortest_path_length(graph, source)
    metres = nx.single_source_dijkstra_path_length(graph, source, weight="length")
    return (
        np.array([hops.get(t, np.inf) for t in targets], dtype=np.float64),
        np.array([metres.get(t, np.inf) for t in targets], dtype=np.float64),
    )


def water_placement(network: str, anchor: tuple[float, float], anchor_name: str) -> Placement:
    """Where a network's junctions lie in the city (`citynerve.workloads.sim.placement`)."""
    wn = wntr.network.WaterNetworkModel(str(network_path(network)))
    coordinates = {name: tuple(node.coordinates) for name, node in wn.nodes()}
    links = [(pipe.start_node_name, pipe.end_node_name, float(pipe.length)) for _name, pipe in wn.pipes()]
    return place_network(network, coordinates, links, anchor, anchor_name)


def run_water_scenarios(specs: list[WaterScenarioSpec], use_ray: bool = True) -> list[WaterRun]:
    """Run scenarios in parallel as Ray tasks (locally in turn when Ray is not wanted)."""
    if not use_ray:
        return [simulate_water(s) for s in specs]
    import ray  # noqa: PLC0415 - Ray is only needed when runs go parallel

    if not ray.is_initialized():
        # Started here (training, benches): without a dashboard, its lines through the process's
        # logging rather than a handler and colours of its own.
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
        adopt_logger("ray")
    task = ray.remote(num_cpus=1)(simulate_water)
    return list(ray.get([task.remote(s) for s in specs]))
