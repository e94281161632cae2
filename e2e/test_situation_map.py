"""The hub's situation map in headless Chromium, against the local federation.

Hub operator and both cities' agents run in-process (EmbeddedFederation); the map server reads
the hub with the Kubernetes client. An Incident created in Shanghai's cluster reaches the hub
through the agent's report and appears on the page without a reload; moving it on shows in
its timeline. Then incidents of every severity, of different ages, in both cities and one
already resolved: the page must draw a marker at each open Incident's coordinates as the city
clusters hold them (read through Leaflet's API), list them most severe first and oldest first,
leave the resolved one out, draw exactly the incidents the hub's picture has on the map, and the
screenshot must show each marker's severity colour at its coordinates. Screenshots are kept in
test-artifacts/.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from citynerve.observability.situation.geo import CITY_COORDINATES
from citynerve.observability.situation.picture import SEVERITIES, HubReader, on_map
from citynerve.observability.situation.server import SituationServer, serve_hub
from citynerve.operators.federation.embedded import EmbeddedFederation, city_condition
from kubernetes import client
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = pytest.mark.e2e
GROUP, VERSION = "citynerve.io", "v1alpha1"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# no network beyond the page's own server: nothing may be fetched from the internet
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,900", "--force-device-scale-factor=1")

#: name -> (city, severity, detected minutes ago, latitude, longitude, resolved)
INCIDENTS: dict[str, tuple[str, str, int, str, str, bool]] = {
    "crowd-surge-bund": ("shanghai", "critical", 12, "31.2397", "121.4998", False),
    "water-burst-xuhui": ("shanghai", "alarm", 10, "31.1880", "121.4370", False),
    "flood-yangpu": ("shanghai", "warning", 20, "31.2800", "121.5500", False),
    "water-burst-pudong-fixed": ("shanghai", "critical", 30, "31.2000", "121.6000", True),
    "flood-jinjiang": ("chengdu", "alarm", 1, "30.6586", "104.0647", False),
}
KINDS = {"crowd": "major-event", "water": "water-burst", "flood": "urban-flood"}


@pytest.fixture(scope="module")
def fed(federation: Any) -> Iterator[EmbeddedFederation]:
    embedded = EmbeddedFederation(
        kubeconfig=federation.kubeconfig, hub_context="hub",
        city_contexts={"shanghai": "shanghai", "chengdu": "chengdu"},
        heartbeat_seconds=2, heartbeat_timeout_seconds=8, check_interval=1.0)
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture(scope="module")
def situation_map(federation: Any, fed: EmbeddedFederation) -> Iterator[SituationServer]:
    server = serve_hub(federation.api_client("hub"), "127.0.0.1", 0, interval=0.5)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not (Path(CHROMIUM).exists() and shutil.which(CHROMEDRIVER)):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: run `make system-packages`")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def find(driver: webdriver.Chrome, css: str) -> list[Any]:
    return list(driver.find_elements(By.CSS_SELECTOR, css))


def shown(css: str) -> Callable[[webdriver.Chrome], list[Any]]:
    """A WebDriverWait condition: the elements matching ``css`` (falsy while there are none)."""
    return lambda driver: find(driver, css)


def incident_manifest(namespace: str, name: str, kind: str, severity: str, detected: datetime,
                      latitude: str, longitude: str, resolved: bool = False) -> dict[str, Any]:
    at = rfc3339(detected)
    transitions = [{"state": "Detected", "time": at, "actor": "scenario/map-drill"}]
    if resolved:
        transitions.append({"state": "Resolved", "time": rfc3339(detected + timedelta(minutes=5)),
                            "actor": "crew-7"})
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Incident",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "scenarioRef": {"name": "map-drill"}, "kind": kind, "severity": severity, "drill": True,
            "evidence": [], "detectedAt": at, "state": "Resolved" if resolved else "Detected",
            "location": {"latitude": latitude, "longitude": longitude, "assetId": name},
            "transitions": transitions,
        },
    }


def cluster_incidents(federation: Any, namespace: str) -> dict[str, dict[str, Any]]:
    """Every Incident in ``namespace`` of both city clusters, by the picture's id, as the API holds it."""
    held = {}
    for city in ("shanghai", "chengdu"):
        listed = client.CustomObjectsApi(federation.api_client(city)).list_namespaced_custom_object(
            GROUP, VERSION, namespace, "incidents")
        for item in listed["items"]:
            held[f"{city}/{namespace}/{item['metadata']['name']}"] = item["spec"]
    return held


def page_markers(driver: webdriver.Chrome) -> dict[str, dict[str, Any]]:
    """The incident markers as Leaflet holds them: id -> {lat, lng, severity, state, colour}."""
    markers: list[dict[str, Any]] = driver.execute_script("return window.situation.markers()")
    return {m["id"]: m for m in markers}


def page_list(driver: webdriver.Chrome) -> list[dict[str, str]]:
    """The incident list, top to bottom."""
    items: list[dict[str, str]] = driver.execute_script(
        "return [...document.querySelectorAll('#incidents li.incident')].map((li) => ({"
        "id: li.dataset.incident, severity: li.dataset.severity, state: li.dataset.state,"
        "detectedAt: li.dataset.detectedAt}))")
    return items


def rgb(hex_colour: str) -> tuple[int, int, int]:
    value = hex_colour.strip().lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


@pytest.mark.timeout(240)
def test_the_map_shows_both_cities_and_incidents_where_the_clusters_say(
    federation: Any, fed: EmbeddedFederation, situation_map: SituationServer, browser: webdriver.Chrome,
    namespace: str, wait_for: Any,
) -> None:
    for city in ("shanghai", "chengdu"):
        wait_for(lambda c=city: city_condition(fed.hub, c, "Ready") == "True", 60, what=f"City {city} Ready")
    browser.get(situation_map.url)
    wait = WebDriverWait(browser, 30, poll_frequency=0.2)
    wait.until(shown('body[data-boundaries="drawn"]'), "the administrative boundaries drawn")
    drawn = browser.execute_script("return window.situation.boundaries")
    assert (drawn["country"], drawn["province"], drawn["maritime"]) == (1, 34, 1)
    assert drawn["south"] < 4.0  # the South China Sea islands are on the national map
    for city in ("shanghai", "chengdu"):
        on_map_ = f'#map path.city-marker[data-city="{city}"][data-health="Ready"]'
        wait.until(shown(on_map_), f"{city} shown Ready on the map")
        wait.until(shown(f'#cities .card.Ready[data-city="{city}"]'), f"{city}'s card, Ready")
    cities = {c["name"]: c for c in browser.execute_script("return window.situation.cities()")}
    for city in ("shanghai", "chengdu"):
        assert (cities[city]["lat"], cities[city]["lng"]) == CITY_COORDINATES[city]
    assert cities["shanghai"]["lng"] > cities["chengdu"]["lng"]

    # a duty officer's view: an incident raised in Shanghai appears without reloading the page
    custom = {city: client.CustomObjectsApi(federation.api_client(city)) for city in ("shanghai", "chengdu")}
    start = datetime.now(UTC)
    name = "water-burst-drill-206"
    first = incident_manifest(namespace, name, "water-burst", "critical", start, "31.2304", "121.4737")
    custom["shanghai"].create_namespaced_custom_object(GROUP, VERSION, namespace, "incidents", first)
    incident_id = f"shanghai/{namespace}/{name}"
    item = f'#incidents li.incident[data-incident="{incident_id}"]'
    wait.until(shown(item), "the new incident in the incident list")
    wait.until(shown(f'#map path.incident-marker[data-incident="{incident_id}"]'), "its marker on the map")
    assert "water-burst in shanghai" in find(browser, item)[0].text
    assert find(browser, f'{item} .timeline li.reached[data-step="Detected"]')

    # incidents of every severity and age in both cities, one of them already resolved
    for other, (city, severity, minutes, lat, lon, resolved) in INCIDENTS.items():
        manifest = incident_manifest(namespace, other, KINDS[other.split("-")[0]], severity,
                                     start - timedelta(minutes=minutes), lat, lon, resolved)
        custom[city].create_namespaced_custom_object(GROUP, VERSION, namespace, "incidents", manifest)
    ours = {f"{city}/{namespace}/{n}" for n, (city, *_rest) in INCIDENTS.items()} | {incident_id}
    resolved_id = f"shanghai/{namespace}/water-burst-pudong-fixed"
    wait.until(lambda d: ours - {resolved_id} <= set(page_markers(d)), "a marker for every open incident")

    # the markers are where the city clusters say, coloured by severity
    held = cluster_incidents(federation, namespace)
    assert set(held) == ours
    markers = page_markers(browser)
    colours = browser.execute_script(
        "const s = getComputedStyle(document.documentElement);"
        "return Object.fromEntries(arguments[0].map((v) => [v, s.getPropertyValue('--sev-' + v).trim()]))",
        list(SEVERITIES))
    for iid, spec in held.items():
        if spec["state"] == "Resolved":
            assert iid not in markers, "a resolved incident is drawn"
            continue
        marker = markers[iid]
        assert (marker["lat"], marker["lng"]) == (float(spec["location"]["latitude"]),
                                                  float(spec["location"]["longitude"])), iid
        assert (marker["severity"], marker["colour"]) == (spec["severity"], colours[spec["severity"]]), iid
    assert len(set(colours.values())) == len(SEVERITIES)

    # the list: most severe first, then oldest first; the resolved one filtered out
    listed = [i for i in page_list(browser) if i["id"] in ours]
    assert [i["id"].rsplit("/", 1)[1] for i in listed] == [
        "crowd-surge-bund", name, "water-burst-xuhui", "flood-jinjiang", "flood-yangpu"]
    everything = page_list(browser)  # other tests' incidents too: the same order holds for all
    keys = [(SEVERITIES.index(i["severity"]) if i["severity"] in SEVERITIES else len(SEVERITIES),
             datetime.fromisoformat(i["detectedAt"]) if i["detectedAt"] else datetime.max.replace(tzinfo=UTC))
            for i in everything]
    assert keys == sorted(keys)
    assert all(i["state"] != "Resolved" for i in everything)
    toggle = find(browser, "#show-resolved")[0]
    toggle.click()
    resolved_item = f'#incidents li.incident[data-incident="{resolved_id}"][data-state="Resolved"]'
    wait.until(shown(resolved_item), "the resolved incident, when asked for")
    assert page_list(browser)[-1]["state"] == "Resolved"
    toggle.click()
    wait.until(lambda d: not find(d, resolved_item), "the resolved incident hidden again")

    # the markers drawn are exactly the open incidents with coordinates in the hub's picture
    reader = HubReader(federation.api_client("hub"))

    def same_as_hub(driver: webdriver.Chrome) -> bool:
        expected = {i["id"] for i in on_map(reader.picture()["incidents"])}
        return expected == set(page_markers(driver))

    wait.until(same_as_hub, "the page's markers = the hub picture's open incidents with coordinates")

    # moving it on shows in its timeline; resolving one takes it off the map and the list
    dispatched = rfc3339(datetime.now(UTC) + timedelta(seconds=1))
    custom["shanghai"].patch_namespaced_custom_object(GROUP, VERSION, namespace, "incidents", name, {"spec": {
        "state": "Dispatched",
        "transitions": [{"state": "Detected", "time": rfc3339(start), "actor": "scenario/map-drill"},
                        {"state": "Dispatched", "time": dispatched, "actor": "duty-officer"}]}})
    step = f'{item}[data-state="Dispatched"] .timeline li.reached[data-step="Dispatched"]'
    wait.until(shown(step), "the Dispatched step in the incident's timeline")
    xuhui = "water-burst-xuhui"
    xuhui_detected = rfc3339(start - timedelta(minutes=INCIDENTS[xuhui][2]))
    resolve = {"spec": {
        "state": "Resolved",
        "transitions": [{"state": "Detected", "time": xuhui_detected, "actor": "scenario/map-drill"},
                        {"state": "Resolved", "time": rfc3339(datetime.now(UTC)), "actor": "crew-3"}]}}
    custom["shanghai"].patch_namespaced_custom_object(GROUP, VERSION, namespace, "incidents", xuhui, resolve)
    xuhui_id = f"shanghai/{namespace}/{xuhui}"
    wait.until(lambda d: xuhui_id not in page_markers(d) and not find(d, f'[data-incident="{xuhui_id}"]'),
               "the resolved incident off the map and the list")
    assert find(browser, "#live.on"), "the live feed is not connected"
    wait.until(same_as_hub, "the page's markers = the hub's, after the changes")

    # nothing was fetched from anywhere but the page's own server
    origin = situation_map.url.rstrip("/")
    fetched = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert fetched
    assert all(url.startswith(origin) for url in fetched), fetched

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "situation-map.png"))

    # zoomed on Shanghai: the screenshot shows each marker's severity colour where the cluster put it
    browser.execute_script(
        "const m = window.situation.map;"
        "const pts = [...window.situation.incidentMarkers.entries()]"
        "  .filter(([id]) => id.startsWith('shanghai/' + arguments[0] + '/')).map(([, k]) => k.getLatLng());"
        "m.fitBounds(L.latLngBounds(pts), {padding: [80, 80], animate: false});", namespace)
    browser.execute_script("return new Promise((done) => requestAnimationFrame(() => setTimeout(done, 300)))")
    png = browser.get_screenshot_as_png()
    (ARTIFACTS / "situation-map-shanghai.png").write_bytes(png)
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    checked = 0
    for iid, spec in cluster_incidents(federation, namespace).items():
        if not iid.startswith("shanghai/") or spec["state"] == "Resolved":
            continue
        x, y = browser.execute_script(
            "const m = window.situation.map, r = m.getContainer().getBoundingClientRect();"
            "const p = m.latLngToContainerPoint([arguments[0], arguments[1]]);"
            "return [r.left + p.x, r.top + p.y];",
            float(spec["location"]["latitude"]), float(spec["location"]["longitude"]))
        scale = shot.width / browser.execute_script("return window.innerWidth")
        pixel = shot.getpixel((round(x * scale), round(y * scale)))
        want = rgb(colours[spec["severity"]])
        assert all(abs(a - b) <= 24 for a, b in zip(pixel, want, strict=True)), (iid, pixel, want)
        checked += 1
    assert checked == 3  # the two critical ones and the warning

    logs: list[dict[str, Any]] = browser.get_log("browser")  # type: ignore[no-untyped-call]
    assert not [e for e in logs if e.get("level") == "SEVERE"]
