"""A schematic map of China for the situation picture: an outline, a projection, city positions.

The outline is a simplified boundary (about 120 vertices, accurate to a few tens of km): enough
to place cities and incidents by latitude and longitude at a glance, drawn as inline SVG so the
page fetches nothing from the internet. The projection is equirectangular with longitude
scaled by cos(35°), which keeps China's shape within a few per cent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

LON_MIN, LON_MAX = 72.0, 136.0
LAT_MIN, LAT_MAX = 17.0, 54.5
SCALE = 12.0  # SVG units per degree of latitude
_COS = math.cos(math.radians(35.0))
WIDTH = round((LON_MAX - LON_MIN) * _COS * SCALE)
HEIGHT = round((LAT_MAX - LAT_MIN) * SCALE)

#: Where the cities the platform knows lie (latitude, longitude); others can say so in
#: their City's annotations ``citynerve.io/latitude`` and ``citynerve.io/longitude``.
CITY_COORDINATES: dict[str, tuple[float, float]] = {
    "shanghai": (31.2304, 121.4737),
    "chengdu": (30.5728, 104.0668),
    "hangzhou": (30.2741, 120.1551),
    "wuhan": (30.5928, 114.3055),
    "beijing": (39.9042, 116.4074),
    "guangzhou": (23.1291, 113.2644),
    "shenzhen": (22.5431, 114.0579),
    "chongqing": (29.5630, 106.5516),
    "xian": (34.3416, 108.9398),
    "nanjing": (32.0603, 118.7969),
    "tianjin": (39.3434, 117.3616),
    "kunming": (24.8801, 102.8329),
    "harbin": (45.8038, 126.5350),
    "urumqi": (43.8256, 87.6168),
    "lhasa": (29.6520, 91.1721),
}

# (longitude, latitude), clockwise from the northern tip on the Amur.
MAINLAND: tuple[tuple[float, float], ...] = (
    (122.5, 53.3), (125.6, 53.0), (127.5, 50.2), (130.6, 48.9), (132.6, 47.7), (134.7, 48.3),
    (134.0, 46.7), (133.1, 45.1), (131.9, 45.2), (131.0, 44.9), (131.3, 43.1), (130.6, 42.4),
    (129.6, 42.4), (128.1, 42.0), (126.9, 41.7), (125.3, 40.5), (124.4, 39.9), (123.0, 39.6),
    (121.6, 38.9), (121.3, 39.5), (122.1, 40.4), (121.0, 40.8), (119.6, 39.9), (118.4, 39.1),
    (117.7, 38.8), (118.3, 38.1), (119.2, 37.7), (120.7, 37.8), (122.5, 37.4), (121.5, 36.8),
    (120.3, 36.0), (119.2, 34.8), (120.3, 33.9), (120.9, 32.6), (121.9, 31.8), (121.9, 30.9),
    (121.0, 30.6), (121.9, 29.9), (121.6, 28.8), (120.7, 27.9), (119.9, 26.6), (119.6, 25.6),
    (118.6, 24.6), (117.6, 23.8), (116.5, 23.0), (115.2, 22.7), (114.2, 22.3), (113.4, 22.1),
    (112.0, 21.7), (110.7, 21.3), (110.2, 20.3), (109.7, 21.0), (109.7, 21.6), (108.5, 21.6),
    (108.0, 21.5), (106.7, 22.0), (106.6, 22.9), (105.3, 23.3), (103.9, 22.6), (102.4, 22.5),
    (101.6, 21.2), (101.0, 21.6), (100.1, 21.5), (99.2, 22.1), (99.5, 22.9), (98.7, 23.9),
    (97.6, 23.9), (97.7, 24.8), (98.6, 25.9), (98.7, 27.5), (98.2, 28.3), (97.3, 28.2),
    (96.2, 29.0), (95.4, 29.0), (94.1, 28.0), (92.5, 27.8), (91.6, 27.8), (90.0, 28.2),
    (89.0, 27.3), (88.1, 27.9), (86.0, 27.9), (84.1, 28.6), (82.0, 30.1), (81.1, 30.2),
    (79.7, 30.9), (78.8, 31.6), (78.7, 32.6), (79.3, 33.0), (78.8, 34.3), (78.0, 35.5),
    (76.7, 35.7), (75.9, 36.7), (74.9, 37.2), (74.8, 38.5), (73.6, 39.4), (73.9, 39.8),
    (74.5, 40.1), (75.7, 40.6), (76.9, 41.0), (78.4, 41.4), (80.2, 42.1), (80.3, 42.9),
    (80.8, 43.2), (80.4, 44.9), (82.5, 45.3), (83.0, 47.2), (85.5, 47.1), (85.7, 48.4),
    (87.3, 49.1), (88.0, 48.6), (90.0, 47.9), (91.0, 46.6), (90.9, 45.3), (93.5, 44.9),
    (95.3, 44.3), (96.4, 42.7), (100.8, 42.6), (105.0, 41.6), (107.0, 42.4), (110.4, 42.7),
    (111.9, 43.7), (111.6, 44.7), (113.6, 44.8), (116.7, 46.4), (119.9, 46.7), (118.5, 47.8),
    (117.3, 47.6), (115.6, 47.9), (116.2, 49.8), (117.9, 49.5), (119.4, 50.3), (120.9, 52.6),
)
HAINAN: tuple[tuple[float, float], ...] = (
    (108.6, 19.2), (109.2, 19.9), (110.5, 20.1), (111.0, 19.6), (110.4, 18.6), (109.5, 18.2), (108.7, 18.5),
)
TAIWAN: tuple[tuple[float, float], ...] = (
    (121.5, 25.3), (122.0, 25.0), (121.6, 24.0), (120.9, 21.9), (120.1, 23.0), (120.2, 24.3), (121.0, 25.1),
)


def project(latitude: float, longitude: float) -> tuple[float, float]:
    """SVG coordinates (x right, y down) of a point; outside the map's box it is clamped to the edge."""
    lon = min(max(longitude, LON_MIN), LON_MAX)
    lat = min(max(latitude, LAT_MIN), LAT_MAX)
    return round((lon - LON_MIN) * _COS * SCALE, 1), round((LAT_MAX - lat) * SCALE, 1)


def _path(points: Sequence[tuple[float, float]]) -> str:
    coords = [project(lat, lon) for lon, lat in points]
    return "M" + " L".join(f"{x},{y}" for x, y in coords) + " Z"


def china_svg() -> str:
    """The map as an inline ``<svg>`` with an empty ``<g id="markers">`` the page fills."""
    land = "".join(
        f'<path class="land" d="{_path(shape)}"/>' for shape in (MAINLAND, HAINAN, TAIWAN)
    )
    graticule = []
    for lon in range(80, 136, 10):
        x, _ = project(LAT_MIN, lon)
        graticule.append(f'<line class="grid" x1="{x}" y1="0" x2="{x}" y2="{HEIGHT}"/>')
    for lat in range(20, 55, 10):
        _, y = project(lat, LON_MIN)
        graticule.append(f'<line class="grid" x1="0" y1="{y}" x2="{WIDTH}" y2="{y}"/>')
    return (
        f'<svg id="map" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="Map of China with member cities">'
        f'<g class="graticule">{"".join(graticule)}</g><g class="country">{land}</g>'
        f'<g id="incident-markers"></g><g id="markers"></g></svg>'
    )
