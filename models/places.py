"""Where cities lie: the one table of city centres (WGS 84) the platform shares.

The city operator anchors a drill's network model at its city's centre (and refuses to guess
one for a city not listed); the situation map draws cities from it. Decimal degrees, north
and east positive.
"""

from __future__ import annotations

#: (latitude, longitude) of each city's centre, by the City's name.
CITY_CENTRES: dict[str, tuple[float, float]] = {
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


def city_centre(city: str) -> tuple[float, float] | None:
    """The centre of `city` (latitude, longitude), or None for a city the table does not list."""
    return CITY_CENTRES.get(city.lower())
