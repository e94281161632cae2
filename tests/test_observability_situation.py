"""The situation picture (pure) and its server: page, assets, JSON and the live feed, no cluster."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from citynerve.observability.situation.geo import HEIGHT, WIDTH, project
from citynerve.observability.situation.picture import city_health, situation_picture
from citynerve.observability.situation.server import PictureFeed, SituationServer

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
    assert shanghai["x"] > chengdu["x"]  # Shanghai lies east of Chengdu
    assert 0 < chengdu["x"] < WIDTH
    assert 0 < chengdu["y"] < HEIGHT
    assert not chengdu["reported"]
    (incident,) = picture["incidents"]
    assert incident["id"] == "shanghai/citynerve/water-206"
    assert (incident["x"], incident["y"]) == project(31.2304, 121.4737)
    steps = {s["state"]: s for s in incident["timeline"]}
    assert steps["Dispatched"]["reached"]
    assert steps["Dispatched"]["afterSeconds"] == 360
    assert not steps["OnSite"]["reached"]
    assert incident["openSeconds"] == 30 * 60
    assert picture["openIncidents"] == 1


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
    status, kind, body = get(server.url)
    assert (status, kind) == (200, "text/html; charset=utf-8")
    html = body.decode()
    assert '<svg id="map"' in html
    assert 'class="land"' in html
    # nothing from the internet: every src/href is local (or a data: URI)
    for ref in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert ref.startswith(("/static/", "data:")), ref
    for asset in ("app.js", "style.css"):
        status, _, text = get(server.url + "static/" + asset)
        assert status == 200
        assert b"http://" not in text.replace(b"http://www.w3.org/2000/svg", b"")
        assert b"https://" not in text
    with pytest.raises(urllib.error.HTTPError):
        get(server.url + "static/../picture.py")


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
