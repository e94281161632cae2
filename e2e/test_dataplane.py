"""A city's data plane end to end: terminals publish, the stream worker windows, the fleet says so.

Real pieces only: the city's control plane (RBAC on) and its nats-server (JetStream, MQTT), the
city operator in-process under a ServiceAccount holding exactly the chart's rules, each fleet's
stream worker run from its own Deployment by ``LocalPods`` (kwok runs no containers), paho-mqtt
terminals with the fleet's own credential, and a field gateway posting NGSI-LD over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import yaml
from citynerve.operators.city import rbac
from citynerve.operators.city.broker import BrokerOptions, derive_password
from citynerve.operators.city.config import CityOptions
from citynerve.operators.city.handlers import build_registry
from citynerve.operators.federation.embedded import install_crds
from citynerve.operators.localfed.pods import LocalPods
from citynerve.operators.runtime import InProcessOperator, KubeTarget, OperatorOptions, service_account_target
from citynerve.workloads.dataplane import names
from citynerve.workloads.dataplane.broker import OPERATOR_USER
from citynerve.workloads.dataplane.history import read_history
from citynerve.workloads.dataplane.http_gateway import UPSERT_PATH
from citynerve.workloads.dataplane.windows import Window
from kubernetes import client

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
CITY = "chengdu"
ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION = "citynerve.io", "v1alpha1"
OPERATOR_SA = "citynerve-city-operator"
WINDOW_S, LATENESS_S = 10, 2
WINDOWS = 3  # full windows each terminal reports in


@pytest.fixture(scope="module")
def city(federation: Any) -> Any:
    install_crds(KubeTarget(federation.kubeconfig, CITY))
    return federation.cluster(CITY)


def operator_target(federation: Any, namespace: str, folder: Path) -> KubeTarget:
    """The chart's rules for the operator: its Role in the (work and broker) namespace, the catalogue."""
    api = federation.api_client(CITY)
    core, rbac_api = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": OPERATOR_SA}})
    subject = [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": namespace}]
    for name, rules in (("operator", rbac.role_rules("local")), ("broker", rbac.broker_release_rules())):
        rbac_api.create_namespaced_role(namespace, {"metadata": {"name": name}, "rules": rules})
        rbac_api.create_namespaced_role_binding(namespace, {
            "metadata": {"name": name}, "subjects": subject,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}})
    catalogue = f"citynerve-catalogue-{namespace}"
    rbac_api.create_cluster_role({"metadata": {"name": catalogue}, "rules": rbac.agent_cluster_rules()})
    rbac_api.create_cluster_role_binding({
        "metadata": {"name": catalogue}, "subjects": subject,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": catalogue}})
    return service_account_target(KubeTarget(federation.kubeconfig, CITY), namespace, OPERATOR_SA, folder)


@contextlib.contextmanager
def data_plane(federation: Any, city: Any, namespace: str, folder: Path,
               mlflow_url: str | None = None) -> Iterator[LocalPods]:
    """The city operator (with its broker; scenarios on the local Ray) and the local pod host."""
    target = operator_target(federation, namespace, folder / "operator")
    broker = BrokerOptions(city.broker.url, city.broker_key_file, namespace)
    options = OperatorOptions(f"city-{CITY}", target, namespaces=(namespace,))
    city_options = CityOptions(city=CITY, resync_seconds=4.0, broker=broker, mlflow_url=mlflow_url,
                               model_cache_seconds=2.0)
    operator = InProcessOperator(options, build_registry(options, city_options)).start()
    api = federation.api_client(CITY)
    pods = LocalPods(api, [namespace], city.broker, namespace, folder / "pods").start()
    try:
        yield pods
    finally:
        pods.stop()
        operator.stop()


def sensor_type(namespace: str) -> dict[str, Any]:
    body = yaml.safe_load((ROOT / "samples/sensortypes/water-level-gauge-underpass.yaml").read_text())
    body["metadata"]["name"] = f"underpass-{namespace}"
    return body


def fleet(name: str, type_name: str, count: int, protocol: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SensorFleet", "metadata": {"name": name},
            "spec": {"sensorType": type_name, "district": "wuhou", "count": count, "owner": "government",
                     "protocol": protocol, "samplingIntervalSeconds": 60, "windowSeconds": WINDOW_S,
                     "allowedLatenessSeconds": LATENESS_S}}


def entities(fleet_name: str, terminal: int, start_s: int, values: list[float]) -> bytes:
    """One terminal's readings, one a second from ``start_s``, as concise NGSI-LD FloodMonitoring."""
    return json.dumps([
        {"id": f"urn:ngsi-ld:FloodMonitoring:{fleet_name}-{terminal}", "type": "FloodMonitoring",
         "dateObserved": datetime.fromtimestamp(start_s + i, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
         "waterLevel": value}
        for i, value in enumerate(values)
    ]).encode()


def secret(federation: Any, namespace: str, name: str) -> dict[str, str]:
    body = client.CoreV1Api(federation.api_client(CITY)).read_namespaced_secret(name, namespace)
    return {k: base64.b64decode(v).decode() for k, v in (body.data or {}).items()}


class Terminals:
    """An MQTT client with a fleet's credential (what a network server of its terminals holds)."""

    def __init__(self, host: str, port: int, username: str, password: str) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                  client_id=f"{username}-{time.monotonic_ns()}")
        self.client.username_pw_set(username, password)
        answered = threading.Event()
        refused: list[str] = []

        def on_connect(_client: Any, _data: Any, _flags: Any, reason: Any, _props: Any) -> None:
            if reason.is_failure:
                refused.append(str(reason))
            answered.set()

        self.client.on_connect = on_connect
        self.client.connect(host, port)
        self.client.loop_start()
        if not answered.wait(10) or refused:
            self.close()
            msg = f"the broker refused {username}: {refused or 'no answer'}"
            raise ConnectionError(msg)
        self.client.on_connect = None

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(30)
        assert info.is_published(), f"the broker did not acknowledge a QoS 1 publish to {topic}"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(  # noqa: S310 - the local worker
        url + UPSERT_PATH, body, {"Content-Type": "application/ld+json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - the local worker
        return int(answer.status)


Aggregates = dict[tuple[str, int], tuple[int, float, float, float]]


def read_windows(url: str, key_file: Path, fleet_name: str) -> Aggregates:
    """Every window message on the fleet's windows stream, by (terminal, window start)."""

    password = derive_password(key_file.read_bytes().strip(), "operator", "operator")

    async def read() -> Aggregates:
        nc = await nats.connect(url, user=OPERATOR_USER, password=password, allow_reconnect=False)
        try:
            js = nc.jetstream()
            info = await js.stream_info(names.windows_stream(fleet_name))
            found: Aggregates = {}
            if not info.state.messages:  # an empty stream's first sequence is 0, no message's
                return found
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                msg = await js.get_msg(names.windows_stream(fleet_name), seq)
                window = Window.decode(msg.data or b"")
                for i, sensor in enumerate(window.sensor):
                    key = (str(sensor), window.start_ms)
                    assert key not in found, f"window {key} of {fleet_name} published twice"
                    found[key] = (int(window.count[i]), float(window.mean[i]), float(window.minimum[i]),
                                  float(window.maximum[i]))
            return found
        finally:
            await nc.close()

    return asyncio.run(read())


def fleet_status(federation: Any, namespace: str, name: str) -> dict[str, Any]:
    body = client.CustomObjectsApi(federation.api_client(CITY)).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "sensorfleets", name)
    return dict(body.get("status") or {})


def ready(status: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions") or [])


def test_terminals_over_mqtt_and_http_become_exact_windows_and_fleet_status(
        federation: Any, city: Any, namespace: str, tmp_path: Path, wait_for: Any) -> None:
    custom = client.CustomObjectsApi(federation.api_client(CITY))
    type_body = sensor_type(namespace)
    custom.create_cluster_custom_object(GROUP, VERSION, "sensortypes", type_body)
    type_name = type_body["metadata"]["name"]
    rng = np.random.default_rng(17)
    plan = {"underpass-mqtt": ("MQTT", 4), "underpass-http": ("HTTP", 3)}
    try:
        with data_plane(federation, city, namespace, tmp_path) as pods:
            for name, (protocol, count) in plan.items():
                custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "sensorfleets",
                                                       fleet(name, type_name, count, protocol))
            wait_for(lambda: len(pods.running()) == 2, 60, what="both fleets' stream workers running")
            wait_for(lambda: pods.url(namespace, "underpass-http"), 30, what="the HTTP fleet's gateway")
            credential = wait_for(lambda: secret(federation, namespace, "underpass-mqtt-mqtt"), 30,
                                  what="the MQTT fleet's terminal credential")
            # Windows in the near future: the wall clock never closes them before the test does.
            base = (int(time.time()) // WINDOW_S + 2) * WINDOW_S
            expected: dict[str, dict[tuple[str, int], list[float]]] = {name: {} for name in plan}
            terminals = wait_for(lambda: _connect(city, credential), 60, what="the terminals' MQTT login")
            http_url = str(pods.url(namespace, "underpass-http"))
            wait_for(lambda: _healthy(http_url), 60, what="the HTTP fleet's gateway healthy")
            for window in range(WINDOWS):
                start = base + window * WINDOW_S
                for name, (protocol, count) in plan.items():
                    for terminal in range(count):
                        values = [round(float(v), 1) for v in rng.uniform(100, 2900, WINDOW_S)]
                        expected[name][(f"{name}-{terminal}", start * 1000)] = values
                        body = entities(name, terminal, start, values)
                        if protocol == "MQTT":
                            terminals.publish(names.readings_topic(CITY, name), body)
                        else:
                            assert post(http_url, body) == 204
                if window == 1:  # a crash mid-stream: every reading is windowed once all the same
                    pods.kill(namespace, "underpass-mqtt")
            # One reading past the last window's end and lateness closes it on the event clock; its
            # own window closes on the wall clock once the fleets are quiet (every reading counts).
            close_at = base + WINDOWS * WINDOW_S + LATENESS_S + 1
            for name in plan:
                expected[name][(f"{name}-0", (close_at // WINDOW_S) * WINDOW_S * 1000)] = [500.0]
            terminals.publish(names.readings_topic(CITY, "underpass-mqtt"),
                              entities("underpass-mqtt", 0, close_at, [500.0]))
            assert post(http_url, entities("underpass-http", 0, close_at, [500.0])) == 204
            # A terminal of one fleet cannot publish into another's topic.
            with contextlib.suppress(AssertionError, RuntimeError, OSError):
                terminals.publish(names.readings_topic(CITY, "underpass-http"),
                                  entities("underpass-http", 99, base, [1.0]))
            terminals.close()

            for name, sent in expected.items():
                want = {k: (len(v), float(np.mean(v)), min(v), max(v)) for k, v in sent.items()}

                def windows(n: str = name, w: int = len(want)) -> Any:
                    got = read_windows(city.broker.url, city.broker_key_file, n)
                    return got if len(got) >= w else None

                got = wait_for(windows, 120, what=f"{name}'s {len(want)} terminal windows")
                assert set(got) == set(want), f"{name}: windows of other terminals or times"
                for key, (n, mean, low, high) in want.items():
                    assert got[key][0] == n, f"{name} {key}: {got[key][0]} readings windowed, {n} sent"
                    assert got[key][1:] == pytest.approx((mean, low, high)), f"{name} {key}"

            for name, (_, count) in plan.items():
                def online(n: str = name, c: int = count) -> dict[str, Any] | None:
                    status = fleet_status(federation, namespace, n)
                    return status if status.get("terminalsOnline") == c and ready(status) else None

                status = wait_for(online, 60, what=f"{name}: {count} terminals online and Ready")
                assert status["qualityScore"] == 100

            # Each worker writes its fleet's windows into the history (Parquet on the fleet's claim);
            # the windows the killed one held come again after the history consumer's ack wait.
            for name, sent in expected.items():

                def history(n: str = name) -> dict[tuple[str, int], int]:
                    table = read_history(pods.claim_dir(namespace, f"{n}-history"), n)
                    starts = table.column("window_start").cast("int64").to_pylist()
                    rows = zip(table.column("sensor").to_pylist(), starts, table.column("count").to_pylist(),
                               strict=True)
                    return {(sensor, start): count for sensor, start, count in rows}

                want_rows = {k: len(v) for k, v in sent.items()}
                wait_for(lambda h=history, w=want_rows: h() == w, 120,
                         what=f"{name}'s history = what was sent")
    finally:
        with contextlib.suppress(client.ApiException):
            custom.delete_cluster_custom_object(GROUP, VERSION, "sensortypes", type_name)
        rbac_api = client.RbacAuthorizationV1Api(federation.api_client(CITY))
        for delete in (rbac_api.delete_cluster_role_binding, rbac_api.delete_cluster_role):
            with contextlib.suppress(client.ApiException):
                delete(f"citynerve-catalogue-{namespace}")


def _connect(city: Any, credential: dict[str, str]) -> Terminals | None:
    """The terminals' client once the broker knows the fleet's user (it reloads the operator's list)."""
    try:
        return Terminals(city.broker.mqtt_host, city.broker.mqtt_port, credential["username"],
                         credential["password"])
    except (OSError, ConnectionError):
        return None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as answer:  # noqa: S310 - local worker
            return bool(answer.status == 200)
    except OSError:
        return False


# -- live scoring --------------------------------------------------------------------------------
STEP_S = 900  # the water model's step and the fleets' window


def catalogue_type(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "samples" / "sensortypes" / f"{name}.yaml").read_text()))


def water_fleet(name: str, type_name: str, count: int, **extra: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SensorFleet", "metadata": {"name": name},
            "spec": {"sensorType": type_name, "district": "jinjiang", "count": count, "owner": "operator",
                     "protocol": "MQTT", "samplingIntervalSeconds": STEP_S, "windowSeconds": STEP_S,
                     "allowedLatenessSeconds": 0, **extra}}


def scenario_status(federation: Any, namespace: str, name: str) -> dict[str, Any]:
    body = client.CustomObjectsApi(federation.api_client(CITY)).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "scenarios", name)
    return dict(body.get("status") or {})


def incidents(federation: Any, namespace: str) -> list[dict[str, Any]]:
    listed = client.CustomObjectsApi(federation.api_client(CITY)).list_namespaced_custom_object(
        GROUP, VERSION, namespace, "incidents")
    return list(listed["items"])


def test_a_burst_published_over_mqtt_is_raised_once_by_the_verified_model_scoring_live(
        mlflow_server: Any, local_ray: None, federation: Any, city: Any, namespace: str, tmp_path: Path,
        wait_for: Any) -> None:
    """Terminals → broker → stream workers → windows → the Scenario's live actor with the verified
    model → one Incident whose decidedBy names the version and digest the Scenario reports. While
    the drill's day is published, the actor is killed (it comes back and goes on from the stream)
    and a new version is promoted (it takes over at a step): every step scored, one Incident."""
    import ray  # noqa: PLC0415 - the local Ray the operator's actors run on
    from citynerve.models.training import WaterTrainingConfig, train_water_detector  # noqa: PLC0415
    from citynerve.workloads.ingest.sensor_type import SensorType  # noqa: PLC0415
    from citynerve.workloads.sim.field import (  # noqa: PLC0415
        FleetLogin,
        water_field_batches,
        yesterday_midnight_ms,
    )
    from citynerve.workloads.sim.water import LeakSpec, simulate_water  # noqa: PLC0415

    custom = client.CustomObjectsApi(federation.api_client(CITY))
    types = {}
    for type_name in ("pipe-pressure-gauge", "electromagnetic-flow-meter"):
        body = catalogue_type(type_name)
        types[type_name] = SensorType.from_resource(type_name, body["spec"])
        try:
            custom.create_cluster_custom_object(GROUP, VERSION, "sensortypes", body)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
    config = WaterTrainingConfig(evaluation_leaks=2)
    registered = f"live-burst-{namespace}"
    trained = train_water_detector(mlflow_server.url, registered, config, alias=None)
    version, digest = trained.model.version, trained.model.artifact_digest
    retrained = train_water_detector(mlflow_server.url, registered, replace(config, seed=1), alias=None)
    loggers = config.base().sensors
    assert loggers is not None
    burst = LeakSpec(node="123", area_m2=0.02, start_s=9 * 3600)
    run = simulate_water(replace(config.base(), leaks=(burst,), seed=7))
    manifests = [
        water_fleet("jinjiang-pressure", "pipe-pressure-gauge", len(loggers.pressure_nodes),
                    georeference={"latitude": "30.6000", "longitude": "104.0200",
                                  "description": "Jinjiang's booster station"}),
        water_fleet("jinjiang-supply", "electromagnetic-flow-meter", 1),
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "AnalyticsModel", "metadata": {"name": "burst-detector"},
         "spec": {"registeredModel": f"live-burst-{namespace}", "version": version,
                  "expectedDigest": digest}},
        {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Scenario", "metadata": {"name": "jinjiang-mains"},
         "spec": {"kind": "water-burst", "mode": "live",
                  "fleets": [{"name": "jinjiang-pressure"}, {"name": "jinjiang-supply"}],
                  "models": [{"name": "burst-detector"}],
                  "thresholds": [{"metric": "pressureDropKpa", "unitCode": "KPA", "warning": 1,
                                  "alarm": 500}]}},
    ]
    plural = {"SensorFleet": "sensorfleets", "AnalyticsModel": "analyticsmodels", "Scenario": "scenarios"}
    with data_plane(federation, city, namespace, tmp_path, mlflow_url=mlflow_server.url) as pods:
        for body in manifests:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, plural[body["kind"]], body)
        wait_for(lambda: len(pods.running()) == 2, 90, what="both fleets' stream workers running")

        def scoring() -> dict[str, Any] | None:
            status = scenario_status(federation, namespace, "jinjiang-mains")
            ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
            assert ready.get("reason") not in ("WorkloadFailed", "UnknownThreshold"), ready
            return status if ready.get("status") == "True" else None

        status = wait_for(scoring, 120, what="the live scenario Ready (its actor consuming, model loaded)")
        assert status["models"] == [{"name": "burst-detector", "version": version, "artifactDigest": digest}]
        logins = [FleetLogin(f, wait_for(lambda f=f: secret(federation, namespace, f"{f}-mqtt"), 30,
                                         what=f"{f}'s terminal credential")["password"])
                  for f in ("jinjiang-pressure", "jinjiang-supply")]
        origin = yesterday_midnight_ms()
        steps = water_field_batches(run, types["pipe-pressure-gauge"], types["electromagnetic-flow-meter"],
                                    origin)
        source = wait_for(lambda: _field_source(city, logins), 60, what="the terminals' MQTT logins")
        steps = list(steps)
        first = 12  # steps before the kill, the promotion and the new threshold: the burst is at step 36

        def scored(at_least: int) -> dict[str, Any] | None:
            status = scenario_status(federation, namespace, "jinjiang-mains")
            return status if (status.get("scored") or {}).get("steps", 0) >= at_least else None

        with source:  # a simulated quarter-hour every 0.1 s
            reports = [source.publish(steps[:first], STEP_S / 0.1)]
            wait_for(lambda: scored(first - 1), 60, what=f"{first - 1} steps scored")
            actor = f"{CITY}/{namespace}/jinjiang-mains/live"
            killed = ray.get_actor(actor, namespace="citynerve")
            ray.kill(killed)  # mid-stream

            def back() -> Any:
                try:
                    again = ray.get_actor(actor, namespace="citynerve")
                    report = ray.get(again.report.remote(), timeout=5)
                except (ValueError, ray.exceptions.RayError):
                    return None
                fresh = again._actor_id != killed._actor_id
                return again if fresh and (report["scored"] or {}).get("steps", 0) >= first - 1 else None

            restarted = wait_for(back, 60, what="the actor back, the steps before it scored again")
            restarted = restarted._actor_id.hex()
            # before the burst: the alarm level lowered to 2 kPa, then a new version promoted (its
            # revision carries the new threshold too)
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, "scenarios", "jinjiang-mains",
                {"spec": {"thresholds": [{"metric": "pressureDropKpa", "unitCode": "KPA", "warning": 1,
                                          "alarm": 2}]}})
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, "analyticsmodels", "burst-detector",
                {"spec": {"version": retrained.model.version,
                          "expectedDigest": retrained.model.artifact_digest}})
            promoted = [{"name": "burst-detector", "version": retrained.model.version,
                         "artifactDigest": retrained.model.artifact_digest}]
            wait_for(lambda: scenario_status(federation, namespace, "jinjiang-mains").get("models")
                     == promoted, 60, what="the promoted version loaded beside the running one")
            reports.append(source.publish(steps[first:], STEP_S / 0.1))
        assert sum(r.steps for r in reports) == len(run.times_s)
        report = replace(reports[0], messages=sum(r.messages for r in reports))

        raised = wait_for(lambda: incidents(federation, namespace) or None, 120, what="the burst's Incident")
        last = datetime.fromtimestamp(origin / 1000 + run.times_s[-1], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        def scored_all() -> dict[str, Any] | None:
            status = scenario_status(federation, namespace, "jinjiang-mains")
            return status if (status.get("scored") or {}).get("lastWindowTime") == last else None

        status = wait_for(scored_all, 120, what="every window of the drill day scored")
        assert status["models"] == promoted
        time.sleep(2 * 4.0)  # a resync later: still one Incident for the one burst
        raised = incidents(federation, namespace)
        assert len(raised) == 1, [i["metadata"]["name"] for i in raised]
        spec = raised[0]["spec"]
        assert spec["drill"] is False
        assert spec["severity"] == "alarm", spec["transitions"][0]["note"]  # the threshold set mid-stream
        # ... applied by the same actor: thresholds and versions change in place, not by a restart
        assert ray.get_actor(actor, namespace="citynerve")._actor_id.hex() == restarted
        decided = spec["decidedBy"]
        assert (decided["name"], decided["version"], decided["artifactDigest"]) in {
            ("burst-detector", version, digest),
            ("burst-detector", retrained.model.version, retrained.model.artifact_digest)}
        onset = next(e for e in spec["evidence"] if e["metric"] == "detectionDelayMinutes")
        assert float(onset["value"]) >= 0
        assert datetime.fromisoformat(decided["lastWindow"]).timestamp() >= origin / 1000 + burst.start_s
        # at the junction, placed by the pressure fleet's georeference (Net3 spans a few km)
        where = spec["location"]
        assert abs(float(where["latitude"]) - 30.6) < 0.05
        assert abs(float(where["longitude"]) - 104.02) < 0.05
        assert "jinjiang-pressure's georeference" in where["description"]
        assert where["assetId"] in where["description"]
        terminals = {e.get("terminal") for e in spec["evidence"] if e["metric"] == "pressureDropKpa"}
        assert terminals <= set(loggers.pressure_nodes)
        assert terminals
        # every message the terminals sent is one window, and every window was scored
        assert status["scored"]["windows"] == report.messages

        # a threshold on something the detector does not measure: refused, naming what it may name
        custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "scenarios", "jinjiang-mains",
            {"spec": {"thresholds": [{"metric": "chlorineMgPerL", "unitCode": "M1", "warning": 1,
                                      "alarm": 2}]}})

        def refused() -> dict[str, Any] | None:
            status = scenario_status(federation, namespace, "jinjiang-mains")
            ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
            return ready if ready.get("reason") == "UnknownThreshold" else None

        ready = wait_for(refused, 60, what="the unknown threshold refused")
        assert "chlorineMgPerL" in ready["message"]
        assert "a threshold may name flowSurgePercent, pressureDropKpa." in ready["message"]
        assert status["scored"]["steps"] == len(run.times_s)


def _field_source(city: Any, logins: list[Any]) -> Any:
    from citynerve.workloads.sim.field import FieldSourceError, MqttFieldSource  # noqa: PLC0415

    try:
        source = MqttFieldSource(city.broker.mqtt_host, city.broker.mqtt_port, CITY, *logins)
        source.pressure.wait_connected()
        source.supply.wait_connected()
    except (FieldSourceError, ConnectionError, OSError):
        return None
    return source
