"""Hub and cities federated in pull mode, on separate real API servers."""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from citynerve.operators.city.rbac import IDENTITY_SECRET
from citynerve.operators.federation.embedded import EmbeddedFederation, city_condition
from citynerve.operators.federation.onboarding import SYSTEM_NAMESPACE
from kubernetes import client

pytestmark = pytest.mark.e2e
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
GROUP, VERSION = "citynerve.io", "v1alpha1"
HEARTBEAT, TIMEOUT = 2, 8  # seconds; short so that the disconnection tests stay quick


@pytest.fixture(scope="module")
def fed(federation: Any) -> Iterator[EmbeddedFederation]:
    embedded = EmbeddedFederation(
        kubeconfig=federation.kubeconfig, hub_context="hub",
        city_contexts={"shanghai": "shanghai", "chengdu": "chengdu"},
        heartbeat_seconds=HEARTBEAT, heartbeat_timeout_seconds=TIMEOUT, check_interval=1.0)
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


def custom(federation: Any, cluster: str) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(federation.api_client(cluster))


def ready(fed: EmbeddedFederation, city: str) -> bool:
    return city_condition(fed.hub, city, "Ready") == "True"


def city_events(federation: Any, city: str) -> dict[str, str]:
    """uid → reason of the Events on a City (those of cluster-scoped objects land in ``default``)."""
    events = client.CoreV1Api(federation.api_client("hub")).list_namespaced_event(
        "default", field_selector=f"involvedObject.kind=City,involvedObject.name={city}")
    return {e.metadata.uid: e.reason for e in events.items}


def scenario_in(federation: Any, cluster: str, name: str) -> dict[str, Any] | None:
    try:
        found: dict[str, Any] = custom(federation, cluster).get_namespaced_custom_object(
            GROUP, VERSION, "citynerve", "scenarios", name)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return found


@pytest.mark.timeout(90)
def test_cities_join_after_approval_and_become_ready(fed: EmbeddedFederation, federation: Any,
                                                     wait_for: Any) -> None:
    for city in ("shanghai", "chengdu"):
        wait_for(lambda c=city: ready(fed, c), 60, what=f"City {city} Ready on the hub")
        assert city_condition(fed.hub, city, "Joined") == "True"
        assert city_condition(fed.hub, city, "Reachable") == "True"
        # The hub writes it from the city's Lease along with Reachable.
        status = custom(federation, "hub").get_cluster_custom_object(GROUP, VERSION, "cities", city)["status"]
        assert status.get("lastHeartbeat")


@pytest.mark.timeout(60)
def test_a_city_credential_reaches_only_its_own_namespace(fed: EmbeddedFederation, federation: Any,
                                                          wait_for: Any) -> None:
    wait_for(lambda: ready(fed, "shanghai"), 45, what="Shanghai Ready")
    secret = client.CoreV1Api(federation.api_client("shanghai")).read_namespaced_secret(
        IDENTITY_SECRET, SYSTEM_NAMESPACE)
    folder = fed.scratch / "as-shanghai"
    folder.mkdir(exist_ok=True)
    (folder / "tls.crt").write_bytes(base64.b64decode(secret.data["tls.crt"]))
    (folder / "tls.key").write_bytes(base64.b64decode(secret.data["tls.key"]))
    cfg = client.Configuration()
    hub_cfg = fed.hub.client_configuration()
    cfg.host, cfg.ssl_ca_cert = hub_cfg.host, hub_cfg.ssl_ca_cert
    cfg.cert_file, cfg.key_file = str(folder / "tls.crt"), str(folder / "tls.key")
    as_city = client.CoreV1Api(client.ApiClient(cfg))

    assert as_city.list_namespaced_config_map("city-shanghai").items is not None  # its own work
    for forbidden in (
        lambda: as_city.list_namespaced_config_map("city-chengdu"),
        lambda: as_city.list_namespaced_secret("city-shanghai"),
        as_city.list_secret_for_all_namespaces,
        lambda: as_city.read_namespaced_secret(IDENTITY_SECRET, "kube-system"),
        lambda: client.CustomObjectsApi(client.ApiClient(cfg)).get_cluster_custom_object(
            GROUP, VERSION, "cities", "chengdu"),
    ):
        with pytest.raises(client.ApiException) as refused:
            forbidden()
        assert refused.value.status == 403


@pytest.mark.timeout(90)
def test_a_sensor_type_reaches_every_joined_city(fed: EmbeddedFederation, federation: Any,
                                                 wait_for: Any) -> None:
    manifest = yaml.safe_load((SAMPLES / "sensortypes" / "air-quality-station.yaml").read_text())
    custom(federation, "hub").create_cluster_custom_object(GROUP, VERSION, "sensortypes", manifest)
    name = manifest["metadata"]["name"]

    def present(cluster: str) -> bool:
        try:
            got = custom(federation, cluster).get_cluster_custom_object(GROUP, VERSION, "sensortypes", name)
        except client.ApiException:
            return False
        return bool(got["spec"] == manifest["spec"])

    for city in ("shanghai", "chengdu"):
        wait_for(lambda c=city: present(c), 20, what=f"SensorType {name} in {city}")


@pytest.mark.timeout(120)
def test_placement_and_overrides_decide_where_a_scenario_runs(fed: EmbeddedFederation, federation: Any,
                                                             wait_for: Any) -> None:
    manifest = yaml.safe_load((SAMPLES / "hub" / "federatedscenario-urban-flood.yaml").read_text())
    manifest = copy.deepcopy(manifest)
    manifest["metadata"]["name"] = "flood-east"
    manifest["spec"]["placement"] = {"citySelector": {"matchLabels": {"region": "east"}}}
    manifest["spec"]["overrides"] = [{"city": "shanghai", "replicas": 3, "thresholds": [
        {"metric": "waterLevelMm", "unitCode": "MMT", "warning": 120, "alarm": 240}]}]
    hub = custom(federation, "hub")
    hub.create_namespaced_custom_object(GROUP, VERSION, "default", "federatedscenarios", manifest)

    got = wait_for(lambda: scenario_in(federation, "shanghai", "flood-east"), 20,
                   what="the scenario in Shanghai")
    assert got["spec"]["replicas"] == 3
    assert got["spec"]["thresholds"] == [{"metric": "waterLevelMm", "unitCode": "MMT",
                                          "warning": 120, "alarm": 240}]
    time.sleep(2 * HEARTBEAT)
    assert scenario_in(federation, "chengdu", "flood-east") is None

    hub.patch_namespaced_custom_object(GROUP, VERSION, "default", "federatedscenarios", "flood-east",
                                       {"spec": {"placement": {"citySelector": {
                                           "matchLabels": {"region": "west"}}}}})
    moved = wait_for(lambda: scenario_in(federation, "chengdu", "flood-east"), 20,
                     what="the scenario moved to Chengdu")
    assert moved["spec"]["replicas"] == 1  # Shanghai's override does not follow it
    wait_for(lambda: scenario_in(federation, "shanghai", "flood-east") is None, 20,
             what="the scenario removed from Shanghai")

    def fs_status() -> dict[str, Any]:
        body = hub.get_namespaced_custom_object(GROUP, VERSION, "default", "federatedscenarios",
                                                "flood-east")
        return dict(body.get("status") or {})

    def placed() -> list[tuple[str, str]]:
        return [(c["city"], c.get("propagated")) for c in fs_status().get("cities", [])]

    wait_for(lambda: placed() == [("chengdu", "True")], 20,
             what="FederatedScenario status reporting Chengdu only, propagated")
    assert fs_status()["selectedCities"] == 1
    # Shanghai's override stayed behind: the placement no longer selects it, and the hub says so.
    matched = next(c for c in fs_status()["conditions"] if c["type"] == "OverridesMatched")
    assert (matched["status"], matched["reason"]) == ("False", "OverrideForUnselectedCity")
    assert "spec.overrides names shanghai" in matched["message"]


def table(federation: Any, cluster: str, path: str) -> dict[str, dict[str, Any]]:
    """What `kubectl get` shows, as the API server computes it (the Table form): name → column → cell."""
    api = federation.api_client(cluster)
    _, url, headers, _, _ = api.param_serialize(
        "GET", path, header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"])
    response = api.call_api("GET", url, header_params=headers)
    response.read()
    data = json.loads(response.data)
    names = [c["name"] for c in data["columnDefinitions"]]
    return {row["cells"][0]: dict(zip(names, row["cells"], strict=True)) for row in data["rows"]}


def empty_columns(rows: dict[str, dict[str, Any]], name: str) -> list[str]:
    return [column for column, cell in rows.get(name, {}).items() if cell in (None, "", "<none>")]


@pytest.mark.timeout(120)
def test_every_hub_column_is_filled_and_ready_and_propagated_tell_the_truth(
    fed: EmbeddedFederation, federation: Any, wait_for: Any
) -> None:
    for city in ("shanghai", "chengdu"):
        wait_for(lambda c=city: ready(fed, c), 60, what=f"City {city} Ready on the hub")
    manifest = yaml.safe_load((SAMPLES / "sensortypes" / "weather-station.yaml").read_text())
    name = manifest["metadata"]["name"]
    hub = custom(federation, "hub")
    hub.create_cluster_custom_object(GROUP, VERSION, "sensortypes", manifest)
    path = f"/apis/{GROUP}/{VERSION}/sensortypes"
    def propagated() -> dict[str, dict[str, Any]] | None:
        rows = table(federation, "hub", path)
        return rows if rows.get(name, {}).get("PROPAGATED") == "True" else None

    rows = wait_for(propagated, 30, what=f"SensorType {name} Propagated")
    assert empty_columns(rows, name) == []
    status = hub.get_cluster_custom_object(GROUP, VERSION, "sensortypes", name)["status"]
    assert status["propagatedCities"] == 2
    # A changed spec is not propagated until both agents report it applied.
    hub.patch_cluster_custom_object(GROUP, VERSION, "sensortypes", name,
                                    {"spec": {"defaultSamplingIntervalSeconds": 120}})
    def propagated_again() -> bool:
        got = hub.get_cluster_custom_object(GROUP, VERSION, "sensortypes", name)["status"]
        return bool(got.get("observedGeneration") == 2 and propagated())

    wait_for(propagated_again, 30, what="the changed SensorType propagated again")

    cities = table(federation, "hub", f"/apis/{GROUP}/{VERSION}/cities")
    for city in ("shanghai", "chengdu"):
        assert empty_columns(cities, city) == [], cities[city]

    fs = yaml.safe_load((SAMPLES / "hub" / "federatedscenario-urban-flood.yaml").read_text())
    fs["metadata"]["name"] = "flood-columns"
    fs["spec"]["placement"] = {"cities": ["shanghai", "chengdu"]}
    fs["spec"]["overrides"] = []
    hub.create_namespaced_custom_object(GROUP, VERSION, "default", "federatedscenarios", fs)
    try:
        fs_path = f"/apis/{GROUP}/{VERSION}/namespaces/default/federatedscenarios"
        def filled() -> dict[str, dict[str, Any]] | None:
            rows = table(federation, "hub", fs_path)
            return rows if "flood-columns" in rows and not empty_columns(rows, "flood-columns") else None

        rows = wait_for(filled, 30, what="every FederatedScenario column filled")
        body = hub.get_namespaced_custom_object(GROUP, VERSION, "default", "federatedscenarios",
                                                "flood-columns")
        ready_cond = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
        assert rows["flood-columns"]["READY"] == ready_cond["status"]
        if ready_cond["status"] != "True":  # no fleets in these cities: it says where and why
            assert ready_cond["reason"] == "NotReadyInSomeCities"
            assert "chengdu" in ready_cond["message"] or "shanghai" in ready_cond["message"]
    finally:
        hub.delete_namespaced_custom_object(GROUP, VERSION, "default", "federatedscenarios", "flood-columns")


@pytest.mark.timeout(180)
def test_a_stopped_city_is_marked_unreachable_and_converges(fed: EmbeddedFederation, federation: Any,
                                                            wait_for: Any) -> None:
    for city in ("shanghai", "chengdu"):
        wait_for(lambda c=city: ready(fed, c), 30, what=f"{city} Ready before the cut")
    before = {s["metadata"]["name"] for s in custom(federation, "chengdu").list_cluster_custom_object(
        GROUP, VERSION, "sensortypes")["items"]}

    told_before = city_events(federation, "chengdu")
    chengdu = federation.cluster("chengdu")
    stopped = time.monotonic()
    chengdu.stop_component("kube-apiserver")
    try:
        wait_for(lambda: city_condition(fed.hub, "chengdu", "Reachable") == "False", 2 * TIMEOUT + 5,
                 what="Chengdu marked unreachable within two lease periods")
        marked_after = time.monotonic() - stopped
        assert city_condition(fed.hub, "shanghai", "Ready") == "True"
        time.sleep(max(0.0, 60 - (time.monotonic() - stopped)))
    finally:
        chengdu.start_component("kube-apiserver")
    restarted = time.monotonic()
    wait_for(lambda: ready(fed, "chengdu"), 15, what="Chengdu Ready within 15 s of its return")
    converged_after = time.monotonic() - restarted
    after = {s["metadata"]["name"] for s in custom(federation, "chengdu").list_cluster_custom_object(
        GROUP, VERSION, "sensortypes")["items"]}
    assert before <= after, f"deleted during the cut: {before - after}"

    def told() -> set[str]:
        return {r for uid, r in city_events(federation, "chengdu").items() if uid not in told_before}

    # Events are posted in the background: both land shortly after the transitions.
    wait_for(lambda: {"Unreachable", "Recovered"} <= told(), 15,
             what="Unreachable and Recovered Events on City chengdu")
    print(f"unreachable after {marked_after:.1f} s; converged {converged_after:.1f} s after return")


@pytest.mark.timeout(240)
def test_with_the_hub_down_cities_keep_working_and_catch_up(fed: EmbeddedFederation, federation: Any,
                                                            namespace: str, wait_for: Any) -> None:
    wait_for(lambda: ready(fed, "shanghai"), 30, what="Shanghai Ready")
    hub = federation.cluster("hub")
    incident = yaml.safe_load((SAMPLES / "city" / "incident-water-burst.yaml").read_text())
    incident["metadata"]["name"] = "burst-while-hub-down"
    incident["spec"]["state"] = "Detected"
    incident["spec"]["transitions"] = incident["spec"]["transitions"][:1]
    incident["spec"]["detectedAt"] = incident["spec"]["transitions"][0]["time"] = "2026-11-25T01:00:00Z"

    hub.stop_component("kube-apiserver")
    try:
        custom(federation, "shanghai").create_namespaced_custom_object(
            GROUP, VERSION, namespace, "incidents", incident)
        time.sleep(3 * HEARTBEAT)
        assert scenario_in(federation, "shanghai", "does-not-matter") is None  # the city still answers
    finally:
        hub.start_component("kube-apiserver")

    def rolled_up() -> bool:
        city = custom(federation, "hub").get_cluster_custom_object(GROUP, VERSION, "cities", "shanghai")
        last = (city.get("status") or {}).get("lastIncident") or {}
        return bool(last.get("name") == "burst-while-hub-down")

    wait_for(rolled_up, 30, what="the incident in Shanghai's roll-up on the hub")
    wait_for(lambda: ready(fed, "shanghai"), 30, what="Shanghai Ready after the hub returns")

