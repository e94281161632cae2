"""Where the situation map's browser assets are: installed by ``make web``, served by the server.

    web/package.json, web/package-lock.json   Leaflet, pinned (committed)
    web/node_modules/leaflet/dist/            ``npm ci`` (gitignored)
    web/build/china-boundaries.geojson        ``python -m citynerve.observability.situation.boundaries``
                                              (gitignored)
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
WEB = HERE / "web"
LEAFLET = WEB / "node_modules" / "leaflet" / "dist"
BOUNDARIES = WEB / "build" / "china-boundaries.geojson"
