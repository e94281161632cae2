"""The hub's situation map in headless Chromium, against the local federation.

Hub operator and both cities' agents run in-process (EmbeddedFederation); the map server reads
the hub with the Kubernetes client. An Incident created in Shanghai's cluster reaches the hub
through the agent's report and appears on the page without a reload; moving it on shows in
its timeline. A screenshot is kept in test-artifacts/.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from citynerve.observability.situation.server import SituationServer, serve_hub
from citynerve.operators.federation.embedded import EmbeddedFederation, city_condition
from kubernetes import client
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
                  "--disable-dev-shm-usage", "--window-size=1400,900")


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


@pytest.mark.timeout(150)
def test_the_map_shows_both_cities_and_a_new_incident_live(
    federation: Any, fed: EmbeddedFederation, situation_map: SituationServer, browser: webdriver.Chrome,
    namespace: str, wait_for: Any,
) -> None:
    for city in ("shanghai", "chengdu"):
        wait_for(lambda c=city: city_condition(fed.hub, c, "Ready") == "True", 60, what=f"City {city} Ready")
    browser.get(situation_map.url)
    wait = WebDriverWait(browser, 30, poll_frequency=0.2)
    for city in ("shanghai", "chengdu"):
        on_map = f'#markers g.city[data-city="{city}"][data-health="Ready"]'
        card = f'#cities .card.Ready[data-city="{city}"]'
        wait.until(shown(on_map), f"{city} shown Ready on the map")
        wait.until(shown(card), f"{city}'s card, Ready")
    shanghai_marker = find(browser, '#markers g.city[data-city="shanghai"] circle')[0]
    chengdu_marker = find(browser, '#markers g.city[data-city="chengdu"] circle')[0]
    assert float(shanghai_marker.get_attribute("cx")) > float(chengdu_marker.get_attribute("cx"))

    # a duty officer's view: an incident raised in Shanghai appears without reloading the page
    now = rfc3339(datetime.now(UTC))
    name = "water-burst-drill-206"
    custom = client.CustomObjectsApi(federation.api_client("shanghai"))
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "incidents", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Incident",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "scenarioRef": {"name": "water-drill"}, "kind": "water-burst", "severity": "critical",
            "drill": True, "evidence": [], "detectedAt": now, "state": "Detected",
            "location": {"latitude": "31.2304", "longitude": "121.4737", "assetId": "206",
                         "description": "asset 206; coordinates are the city centre"},
            "transitions": [{"state": "Detected", "time": now, "actor": "scenario/water-drill"}],
        },
    })
    incident_id = f"shanghai/{namespace}/{name}"
    item = f'#incidents li.incident[data-incident="{incident_id}"]'
    wait.until(shown(item), "the new incident in the incident list")
    marker = f'#incident-markers [data-incident="{incident_id}"]'
    wait.until(shown(marker), "its marker on the map")
    assert "water-burst in shanghai" in find(browser, item)[0].text
    assert find(browser, f'{item} .timeline li.reached[data-step="Detected"]')

    dispatched = rfc3339(datetime.now(UTC) + timedelta(seconds=1))
    custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "incidents", name, {"spec": {
        "state": "Dispatched",
        "transitions": [{"state": "Detected", "time": now, "actor": "scenario/water-drill"},
                        {"state": "Dispatched", "time": dispatched, "actor": "duty-officer"}]}})
    step = f'{item}[data-state="Dispatched"] .timeline li.reached[data-step="Dispatched"]'
    wait.until(shown(step), "the Dispatched step in the incident's timeline")
    assert find(browser, "#live.on"), "the live feed is not connected"

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "situation-map.png"))
    logs: list[dict[str, Any]] = browser.get_log("browser")  # type: ignore[no-untyped-call]
    assert not [e for e in logs if e.get("level") == "SEVERE"]
