"""Where the cities the platform knows lie, for the situation map: the platform's one table
(``citynerve.models.places``), which the operators also use to place drills.

The map itself (boundaries, projection) is drawn in the browser by Leaflet from a published
dataset: see `boundaries.py` and docs/situation-map.md. Cities the table does not list can say
where they are in their City's annotations ``citynerve.io/latitude`` and ``citynerve.io/longitude``.
"""

from __future__ import annotations

from citynerve.models.places import CITY_CENTRES as CITY_COORDINATES

__all__ = ["CITY_COORDINATES"]
