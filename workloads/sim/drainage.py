"""Drainage and urban-flood sensor streams from SWMM (through pyswmm) under a chosen storm.

The storm is written into a copy of a bundled example model: every rain gauge is re-pointed
to a new time series holding the storm's hyetograph, and the simulation period is set to
the storm plus a tail. Each run works in its own temporary directory. Readings are taken at
a fixed reporting interval: water level at the watched low points (underpasses), rainfall
at each gauge and pump status, as the terminals on site would report them. Flooding at each
watched node is recorded too, as ground truth (not as a sensor).
"""

from __future__ import annotations

import re
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyswmm
from citynerve.workloads.sim.placement import Placement, place_network
from citynerve.workloads.sim.readings import Readings

_MODELS = Path(pyswmm.__file__).parent / "tests" / "data"
#: Bundled SWMM examples the simulator accepts by name (`model_lids` is SWMM's Example 1
#: catchment: 8 subcatchments draining through 13 junctions; `model_full_features` has a pump).
BUNDLED_MODELS = ("model_lids", "model_full_features", "model_weir_setting", "model_pollutants")
_START = datetime(2026, 7, 1, 0, 0)  # noqa: DTZ001 - SWMM clocks are naive local time

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class StormSpec:
    """A storm: triangular hyetograph peaking at `peak_intensity` (model rain units per hour)."""

    peak_intensity: float
    start_s: int = 2 * 3600
    duration_s: int = 3 * 3600
    peak_fraction: float = 0.4  # when in the storm the peak comes (0.4: an advanced storm)

    def intensity(self, times_s: FloatArray) -> FloatArray:
        rel = (times_s - self.start_s) / self.duration_s
        rising = np.clip(rel / self.peak_fraction, 0.0, 1.0)
        falling = np.clip((1.0 - rel) / (1.0 - self.peak_fraction), 0.0, 1.0)
        shape = np.where(rel < self.peak_fraction, rising, falling)
        return np.where((rel >= 0) & (rel <= 1), self.peak_intensity * shape, 0.0)


@dataclass(frozen=True)
class DrainageScenarioSpec:
    model: str = "model_lids"
    storm: StormSpec = field(default_factory=lambda: StormSpec(peak_intensity=3.0))
    duration_s: int = 10 * 3600
    report_step_s: int = 300
    watched_nodes: tuple[str, ...] = ()  # empty: every junction
    level_noise: float = 0.01
    missing_rate: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class DrainageRun:
    spec: DrainageScenarioSpec
    times_s: FloatArray
    nodes: tuple[str, ...]
    level: FloatArray  # time x watched node: water depth (model length units)
    max_depth: FloatArray  # per watched node: depth at which it floods
    flooding: FloatArray  # time x watched node: flooding rate (truth, not a sensor)
    gauges: tuple[str, ...]
    rainfall: FloatArray  # time x gauge
    pumps: tuple[str, ...]
    pump_on: FloatArray  # time x pump: 1 running, 0 off
    catchments: tuple[str, ...] = ()
    runoff: FloatArray = field(default_factory=lambda: np.zeros((0, 0)))  # time x subcatchment (flow units)
    catchment_area: FloatArray = field(
        default_factory=lambda: np.zeros(0)
    )  # per subcatchment (model area units)

    def readings(self) -> Readings:
        parts = [
            Readings.from_wide(self.times_s, list(self.nodes), "currentLevel", self.level),
            Readings.from_wide(self.times_s, list(self.gauges), "precipitation", self.rainfall),
        ]
        if self.pumps:
            parts.append(Readings.from_wide(self.times_s, list(self.pumps), "value", self.pump_on))
        return Readings.concat(parts)

    def flood_onset_s(self, node: str) -> float | None:
        """When `node` first floods in this run, or None."""
        hits = np.flatnonzero(self.flooding[:, self.nodes.index(node)] > 0.0)
        return float(self.times_s[hits[0]]) if hits.size else None


def model_path(name: str) -> Path:
    if name not in BUNDLED_MODELS:
        raise ValueError(f"SWMM model {name!r} is not a bundled example; choose one of {BUNDLED_MODELS}")
    return _MODELS / f"{name}.inp"


def _stamp(t: datetime) -> tuple[str, str]:
    return t.strftime("%m/%d/%Y"), t.strftime("%H:%M:%S")


def write_storm_model(spec: DrainageScenarioSpec, target: Path) -> None:
    """A copy of the model with the storm as its only rainfall and the run period set."""
    text = model_path(spec.model).read_text()
    step = 300
    times = np.arange(0, spec.duration_s + step, step, dtype=np.float64)
    rain = spec.storm.intensity(times)
    series = "\n".join(
        f"CN_STORM {int(t) // 3600}:{(int(t) % 3600) // 60:02d} {r:.4f}"
        for t, r in zip(times, rain, strict=True)
    )
    text = re.sub(
        r"^\[TIMESERIES\][^\n]*\n", lambda m: m.group(0) + series + "\n", text, count=1, flags=re.MULTILINE
    )

    def gauge_line(match: re.Match[str]) -> str:
        return f"{match.group(1)} INTENSITY 0:05 1.0 TIMESERIES CN_STORM"

    section = re.search(r"^\[RAINGAGES\]\s*\n(.*?)(?=^\[)", text, flags=re.MULTILINE | re.DOTALL)
    if section is None:
        raise ValueError(f"SWMM model {spec.model!r} has no [RAINGAGES] section to carry the storm")
    gauges = re.sub(r"^(?!;)(\S+)\s+\S+\s+\S+.*$", gauge_line, section.group(1), flags=re.MULTILINE)
    text = text[: section.start(1)] + gauges + text[section.end(1) :]
    end = _START + timedelta(seconds=spec.duration_s)
    settings = {
        "START_DATE": _stamp(_START)[0],
        "START_TIME": _stamp(_START)[1],
        "REPORT_START_DATE": _stamp(_START)[0],
        "REPORT_START_TIME": _stamp(_START)[1],
        "END_DATE": _stamp(end)[0],
        "END_TIME": _stamp(end)[1],
        "DRY_DAYS": "5",
    }
    for key, value in settings.items():
        text = re.sub(rf"^{key}\s+\S+", f"{key} {value}", text, flags=re.MULTILINE)
    target.write_text(text)


def _section_rows(model: str, section: str) -> list[list[str]]:
    """The rows of one section of a bundled model's input file, split on whitespace, comments left out."""
    text = model_path(model).read_text()
    found = re.search(rf"^\[{section}\]\s*\n(.*?)(?=^\[|\Z)", text, flags=re.MULTILINE | re.DOTALL)
    body = found.group(1) if found else ""
    return [line.split() for line in body.splitlines() if line.strip() and not line.startswith(";")]


@dataclass(frozen=True)
class ModelUnits:
    """What a model's numbers are in, as factors to SI: SWMM's FLOW_UNITS choose US or SI units."""

    flow_units: str
    metres_per_length: float  # depths, levels and conduit lengths
    mm_per_hour_per_rain: float  # rainfall intensity
    cubic_metres_per_second_per_flow: float  # runoff and flows


_FLOW_TO_M3S = {"CFS": 0.0283168, "GPM": 6.30902e-5, "MGD": 0.0438126, "CMS": 1.0, "LPS": 0.001,
                "MLD": 1000.0 / 86400.0}


def model_units(model: str) -> ModelUnits:
    """The units of a bundled model, from its FLOW_UNITS (CFS, GPM, MGD: feet and inches; else metric)."""
    flow = next((r[1].upper() for r in _section_rows(model, "OPTIONS") if r[0] == "FLOW_UNITS"), "CFS")
    us = flow in ("CFS", "GPM", "MGD")
    return ModelUnits(flow, 0.3048 if us else 1.0, 25.4 if us else 1.0, _FLOW_TO_M3S[flow])


def drainage_placement(model: str, anchor: tuple[float, float], anchor_name: str) -> Placement:
    """Where a bundled model's nodes lie in the city (`citynerve.workloads.sim.placement`)."""
    metres = model_units(model).metres_per_length
    links = [(r[1], r[2], float(r[3]) * metres) for r in _section_rows(model, "CONDUITS")]
    return place_network(model, asset_coordinates(model), links, anchor, anchor_name)


def asset_coordinates(model: str) -> dict[str, tuple[float, float]]:
    """Model-plane coordinates of every node, and of every subcatchment (its polygon's centroid,
    or its outlet node's position when it has no polygon)."""
    nodes = {r[0]: (float(r[1]), float(r[2])) for r in _section_rows(model, "COORDINATES")}
    polygons: dict[str, list[tuple[float, float]]] = {}
    for r in _section_rows(model, "Polygons"):
        polygons.setdefault(r[0], []).append((float(r[1]), float(r[2])))
    out = dict(nodes)
    for r in _section_rows(model, "SUBCATCHMENTS"):
        points = polygons.get(r[0])
        if points:
            out[f"subcatchment:{r[0]}"] = (
                float(np.mean([p[0] for p in points])), float(np.mean([p[1] for p in points])))
        elif r[2] in nodes:
            out[f"subcatchment:{r[0]}"] = nodes[r[2]]
    return out


def critical_levels(model: str, nodes: tuple[str, ...]) -> dict[str, float]:
    """Level at which each node's outlet conduits run full: beyond it, inflow can only pond.

    Read from the model's [CONDUITS] and [XSECTIONS] (the first geometry value is the full
    depth); a node without an outlet conduit gets its own full depth from [JUNCTIONS].
    """
    inlet = {r[0]: r[1] for r in _section_rows(model, "CONDUITS")}
    depth = {r[0]: float(r[2]) for r in _section_rows(model, "XSECTIONS") if r[0] in inlet}
    node_depth = {r[0]: float(r[2]) for r in _section_rows(model, "JUNCTIONS")}
    out: dict[str, float] = {}
    for node in nodes:
        outlets = [depth[link] for link, start in inlet.items() if start == node and link in depth]
        out[node] = max(outlets) if outlets else node_depth.get(node, float("inf"))
    return out


def simulate_drainage(spec: DrainageScenarioSpec) -> DrainageRun:
    with tempfile.TemporaryDirectory(prefix=f"citynerve-swmm-{uuid.uuid4().hex[:8]}-") as workdir:
        inp = Path(workdir) / f"{spec.model}.inp"
        write_storm_model(spec, inp)
        with pyswmm.Simulation(str(inp)) as sim:
            all_nodes = pyswmm.Nodes(sim)
            junctions = [n.nodeid for n in all_nodes if n.is_junction()]
            nodes = spec.watched_nodes or tuple(junctions)
            watched = [all_nodes[n] for n in nodes]
            gauges = list(pyswmm.RainGages(sim))
            pumps = [link for link in pyswmm.Links(sim) if link.is_pump()]
            subcatchments = list(pyswmm.Subcatchments(sim))
            areas = np.array([c.area for c in subcatchments], dtype=np.float64)
            max_depth = np.array([n.full_depth for n in watched], dtype=np.float64)
            sim.step_advance(spec.report_step_s)
            times, level, flood, rain, pump, runoff = [], [], [], [], [], []
            for _ in sim:
                times.append((sim.current_time - _START).total_seconds())
                level.append([n.depth for n in watched])
                flood.append([n.flooding for n in watched])
                rain.append([g.rainfall for g in gauges])
                pump.append([1.0 if p.flow > 1e-6 else 0.0 for p in pumps])
                runoff.append([c.runoff for c in subcatchments])
            gauge_ids = tuple(g.raingageid for g in gauges)
            pump_ids = tuple(p.linkid for p in pumps)
            catchment_ids = tuple(c.subcatchmentid for c in subcatchments)
    rng = np.random.default_rng(spec.seed)
    level_arr = np.asarray(level, dtype=np.float64)
    level_arr = np.maximum(level_arr + spec.level_noise * rng.standard_normal(level_arr.shape), 0.0)
    level_arr[rng.random(level_arr.shape) < spec.missing_rate] = np.nan
    n_t = len(times)
    return DrainageRun(
        spec=spec,
        times_s=np.asarray(times, dtype=np.float64),
        nodes=tuple(nodes),
        level=level_arr,
        max_depth=max_depth,
        flooding=np.asarray(flood, dtype=np.float64).reshape(n_t, len(nodes)),
        gauges=gauge_ids,
        rainfall=np.asarray(rain, dtype=np.float64).reshape(n_t, len(gauge_ids)),
        pumps=pump_ids,
        pump_on=np.asarray(pump, dtype=np.float64).reshape(n_t, len(pump_ids)),
        catchments=catchment_ids,
        runoff=np.asarray(runoff, dtype=np.float64).reshape(n_t, len(catchment_ids)),
        catchment_area=areas,
    )
