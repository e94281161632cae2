"""Placing a simulated network model in a city, so a drill's incidents have coordinates.

A network model (an EPANET `.inp`, a SWMM `.inp`) draws its nodes on its own plane, in units
of its own. A drill places that plane in the city: the scale is the median ratio of each
link's stated length to the straight distance between its end points (so one unit is as
many metres as the model's pipes say), the centre of the model's extent goes to an anchor
(the city's centre), north is up, and metres become degrees on a local equirectangular
projection (good to well under a metre across a few kilometres). The result is a drill
placement, stated as such wherever it is shown: the assets are the model's, not the city's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

_METRES_PER_DEGREE_LATITUDE = 111_320.0


@dataclass(frozen=True)
class Placement:
    """Where a network model's plane lies in a city (see the module's description)."""

    network: str
    anchor_lat: float
    anchor_lon: float
    anchor_name: str
    centre_x: float
    centre_y: float
    metres_per_unit: float
    #: the model-plane position of each asset placements can locate
    points: Mapping[str, tuple[float, float]]

    def place(self, x: float, y: float) -> tuple[float, float]:
        """Latitude and longitude of the model point (x, y)."""
        east = (x - self.centre_x) * self.metres_per_unit
        north = (y - self.centre_y) * self.metres_per_unit
        lat = self.anchor_lat + north / _METRES_PER_DEGREE_LATITUDE
        lon = self.anchor_lon + east / (_METRES_PER_DEGREE_LATITUDE * math.cos(math.radians(self.anchor_lat)))
        return round(lat, 6), round(lon, 6)

    def locate(self, asset: str) -> tuple[float, float] | None:
        """Latitude and longitude of a placed asset, or None for one the model does not draw."""
        point = self.points.get(asset)
        return None if point is None else self.place(*point)

    def describe(self, asset: str) -> str:
        """A sentence saying how the coordinates of `asset` (as a person would name it) were found."""
        return (
            f"Drill placement: {asset} of the simulated network {self.network}, placed by the model's own "
            f"coordinates (1 unit = {self.metres_per_unit:.3g} m, from its link lengths) with the model's "
            f"centre at {self.anchor_name} ({self.anchor_lat:.4f}, {self.anchor_lon:.4f})."
        )


def place_network(
    network: str,
    coordinates: Mapping[str, tuple[float, float]],
    links: Iterable[tuple[str, str, float]],
    anchor: tuple[float, float],
    anchor_name: str,
) -> Placement:
    """The placement of a model with node `coordinates` and `links` (start, end, length in metres)."""
    ratios = []
    for start, end, length_m in links:
        if start in coordinates and end in coordinates and length_m > 0:
            (x0, y0), (x1, y1) = coordinates[start], coordinates[end]
            straight = math.hypot(x1 - x0, y1 - y0)
            if straight > 0:
                ratios.append(length_m / straight)
    if not ratios:
        raise ValueError(
            f"network {network!r} has no link with a length between two drawn nodes to scale it by"
        )
    xy = np.array(list(coordinates.values()), dtype=np.float64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    return Placement(
        network=network,
        anchor_lat=float(anchor[0]),
        anchor_lon=float(anchor[1]),
        anchor_name=anchor_name,
        centre_x=float((lo[0] + hi[0]) / 2),
        centre_y=float((lo[1] + hi[1]) / 2),
        metres_per_unit=float(np.median(ratios)),
        points=dict(coordinates),
    )
