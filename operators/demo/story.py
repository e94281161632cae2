"""`make demo`: the federation story, end to end, on the embedded default.

Real control planes (hub, Shanghai, Chengdu), a real MLflow server and local Ray; the charts
installed with Helm; the hub operator (as its chart's ServiceAccount), each city's operator
and agent running in this process; real simulations (WNTR, SWMM, replayed pedestrian
counts). Every number printed is read back from what happened in this run.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import secrets
import threading
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from citynerve.models.registry import TRAINER_IDENTITY
from citynerve.models.scenario_runs import read_scenario_run
from citynerve.operators import helm
from citynerve.operators.city.broker import BrokerOptions
from citynerve.operators.city.config import AlertPolicy, CityOptions
from citynerve.operators.city.handlers import build_registry as build_city_registry
from citynerve.operators.city.signing import ReplayGuard, verify_alert
from citynerve.operators.demo.report import (
    DemoResult,
    incident_record,
    runs_named_by,
    summary_text,
    write_report,
)
from citynerve.operators.federation.agent import CityAgent
from citynerve.operators.federation.embedded import approve_city, city_condition
from citynerve.operators.hub.handlers import build_registry as build_hub_registry
from citynerve.operators.localfed.cluster import free_port
from citynerve.operators.localfed.federation import LocalFederation
from citynerve.operators.localfed.mlflow_server import LocalMlflow
from citynerve.operators.localfed.pods import LocalPods
from citynerve.operators.models_cli import create_promotion, promotion_manifest, wait_for_outcome
from citynerve.operators.runtime import (
    InProcessOperator,
    KubeTarget,
    OperatorOptions,
    scratch_dir,
    service_account_target,
)
from citynerve.workloads.dataplane.http_gateway import UPSERT_PATH
from citynerve.workloads.dataplane.names import readings_topic
from citynerve.workloads.ingest.sensor_type import SensorType
from citynerve.workloads.sim.gateway import gateway_batch
from kubernetes import client
from paho.mqtt.enums import CallbackAPIVersion

GROUP, VERSION = "citynerve.io", "v1alpha1"
SAMPLES = Path(__file__).resolve().parents[2] / "samples"
WORK_NS = "citynerve"
log = logging.getLogger(__name__)
CITIES = ("shanghai", "chengdu")
BURST_NODE = "123"
DUTY_OFFICER = "duty-officer/demo"
# The HMAC keys the samples' alert routes name: the city chart's alerts.secretNames, so the
# operators may read them (and no other Secret).
ALERT_SECRETS = ("water-dispatch-webhook", "flood-webhook", "event-command-webhook")


class Step:
    """Prints a numbered step and times it."""

    def __init__(self, result: DemoResult, after: Callable[[], None] | None = None) -> None:
        self.result = result
        self.number = 0
        self.after = after

    def __call__(self, title: str, key: str) -> Callable[[], None]:
        self.number += 1
        print(f"\n[{self.number}] {title}", flush=True)
        started = time.monotonic()

        def done() -> None:
            self.result.timings[key] = time.monotonic() - started
            print(f"    done in {self.result.timings[key]:.1f} s", flush=True)
            if self.after is not None:
                self.after()

        return done


def wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except client.ApiException:
            value = None
        if value:
            return value
        time.sleep(interval)
    msg = f"timed out after {timeout:.0f} s waiting for {what}"
    raise TimeoutError(msg)


class AlertReceiver:
    """The duty officers' alert endpoint: verifies each webhook's signature and keeps what arrived once."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.alerts: list[dict[str, Any]] = []
        self.refused = 0
        self.seen = ReplayGuard()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                verdict = verify_alert(receiver.key, self.headers, body, seen=receiver.seen)
                if verdict:
                    receiver.alerts.append(json.loads(body))
                    self.send_response(204)
                elif verdict.reason == "Replayed":  # a retry of an alert already taken
                    self.send_response(204)
                else:
                    receiver.refused += 1
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/alerts"

    def stop(self) -> None:
        self.server.shutdown()


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def city_values_file(city: str) -> Path:
    """The city chart values a city's IT department keeps (its own fleets)."""
    return SAMPLES / "helm" / f"values-{city}.yaml"


def _read_secret(core: client.CoreV1Api, name: str) -> dict[str, str] | None:
    try:
        body = core.read_namespaced_secret(name, WORK_NS)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return {k: base64.b64decode(v).decode() for k, v in (body.data or {}).items()}


class FieldGateway:
    """What sends one fleet's readings: its terminals' network server over MQTT (QoS 1, the
    fleet's own credential), or a field gateway posting NGSI-LD batch upserts over HTTP."""

    def __init__(self, city: str, fleet: str, sensor_type: SensorType, terminals: int) -> None:
        self.city, self.fleet, self.sensor_type, self.terminals = city, fleet, sensor_type, terminals
        self.topic = ""
        self.url = ""
        self.client: mqtt.Client | None = None

    @classmethod
    def mqtt(cls, city: str, fleet: str, sensor_type: SensorType, terminals: int, host: str, port: int,
             credential: dict[str, str]) -> FieldGateway:
        gateway = cls(city, fleet, sensor_type, terminals)
        gateway.topic = readings_topic(city, fleet)
        gateway.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-{city}-{fleet}",
                                     protocol=mqtt.MQTTv311)
        gateway.client.username_pw_set(credential["username"], credential["password"])
        gateway.client.connect_async(host, port)
        gateway.client.loop_start()  # reconnects by itself, e.g. while the broker reloads its users
        return gateway

    @classmethod
    def http(cls, city: str, fleet: str, sensor_type: SensorType, terminals: int, url: str) -> FieldGateway:
        gateway = cls(city, fleet, sensor_type, terminals)
        gateway.url = url + UPSERT_PATH
        return gateway

    def ready(self) -> bool:
        """MQTT: logged in to the broker; HTTP: the fleet's gateway says it is healthy."""
        if self.client is not None:
            return bool(self.client.is_connected())
        try:
            with urllib.request.urlopen(self.url.replace(UPSERT_PATH, "/healthz"), timeout=5) as answer:  # noqa: S310
                return bool(answer.status == 200)
        except OSError:
            return False

    def send(self, body: bytes) -> None:
        if self.client is not None:
            info = self.client.publish(self.topic, body, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                log.warning("terminals of %s/%s: not connected to the broker yet", self.city, self.fleet)
            return
        request = urllib.request.Request(self.url, body, {"Content-Type": "application/ld+json"},  # noqa: S310
                                         method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30):  # noqa: S310 - the fleet's local worker
                pass
        except OSError as exc:
            log.warning("gateway of %s/%s: %s", self.city, self.fleet, exc)

    def close(self) -> None:
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()


class Story:
    def __init__(self, state_dir: Path | None, quick: bool,
                 after_step: Callable[[], None] | None = None) -> None:
        self.quick = quick
        self.federation = LocalFederation(state_dir)
        self.result = DemoResult()
        self.step = Step(self.result, after_step)
        self.scratch = scratch_dir("demo")
        self.hub_key = secrets.token_bytes(32)
        self.receiver = AlertReceiver(self.hub_key)
        self.mlflow = LocalMlflow(self.federation.state_dir / "mlflow")
        self.operators: list[InProcessOperator] = []
        self.agents: dict[str, CityAgent] = {}
        self.map_server: Any = None
        self.pods: dict[str, LocalPods] = {}  # each city's fleet workers, as its kubelet would run them
        self.gateways: list[FieldGateway] = []
        self.gateways_stop = threading.Event()
        self.timeout_s = 8 if quick else 20
        self.cut_s = 15 if quick else 60

    # -- plumbing ------------------------------------------------------------------------------
    def admin(self, cluster: str) -> KubeTarget:
        return KubeTarget(self.federation.kubeconfig, cluster)

    def api(self, cluster: str) -> client.ApiClient:
        return client.ApiClient(self.admin(cluster).client_configuration())

    def custom(self, cluster: str) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api(cluster))

    def city_objects(self, city: str, plural: str) -> list[dict[str, Any]]:
        return list(self.custom(city).list_namespaced_custom_object(GROUP, VERSION, WORK_NS, plural)["items"])

    # -- the story -----------------------------------------------------------------------------
    def start_federation(self) -> None:
        done = self.step(
            "Starting the local federation: hub, Shanghai and Chengdu control planes, a local MLflow server",
            "federation up",
        )
        self.federation.up()
        self.mlflow.start()
        # One process, one MLflow identity: the trainer, which owns what it trains (the hub and
        # the cities run in this process too); the server refuses requests without credentials.
        self.mlflow.use_identity(TRAINER_IDENTITY)
        self.result.clusters = self.federation.status()
        for row in self.result.clusters:
            print(f"    {row['name']:<9} {row['api']}  {row['version']}  nodes ready {row['nodes_ready']}")
        print(f"    MLflow tracking server {self.mlflow.url} (basic-auth; identities in "
              f"{self.mlflow.root / 'identities.json'})")
        done()

    def install_charts(self) -> None:
        done = self.step(
            "Platform team installs the hub chart; each city's IT department onboards "
            "with the city chart (Helm via pyhelm3)",
            "helm",
        )
        release = helm.install_hub(self.admin("hub"))
        print(f"    hub: {release.name} revision {release.revision} ({release.status})")
        for city in CITIES:
            # Each city's IT department's own values file: its fleets, districts and counts.
            values = helm.merge_values(helm.read_values_file(city_values_file(city)),
                                       {"alerts": {"secretNames": list(ALERT_SECRETS)}})
            release = helm.onboard_city(city, self.admin("hub"), self.admin(city), values)
            print(f"    {city}: {release.name} revision {release.revision} ({release.status}), "
                  f"{len(values.get('fleets', []))} fleets from {city_values_file(city).name}")
        done()

    def start_operators(self) -> None:
        done = self.step(
            "Operators start: the hub operator as its chart's ServiceAccount, each city's "
            "operator and agent with its chart's configuration",
            "operators",
        )
        hub_sa = service_account_target(
            self.admin("hub"), helm.HUB_NAMESPACE, "citynerve-hub", self.scratch / "hub"
        )
        options = OperatorOptions(name="hub", target=hub_sa)
        registry = build_hub_registry(options, 1.0, mlflow_url=self.mlflow.url)
        self.operators.append(InProcessOperator(options, registry).start())
        for city in CITIES:
            options = OperatorOptions(name=f"city-{city}", target=self.admin(city))
            broker = self.federation.broker(city)
            city_options = CityOptions(
                city=city,
                broker=BrokerOptions(broker.broker.url, broker.key_file, WORK_NS),
                mlflow_url=self.mlflow.url,
                resync_seconds=5.0,
                model_cache_seconds=30.0,
                alert_secrets=ALERT_SECRETS,  # as the city chart starts it
                alert_policy=AlertPolicy(allow_loopback=True),  # the duty desk listens on 127.0.0.1
            )
            self.operators.append(
                InProcessOperator(options, build_city_registry(options, city_options)).start()
            )
            self.start_agent(city)
        for city in CITIES:
            wait(partial(self._city_exists, city), 60, f"{city}'s join request on the hub")
            print(f"    {city} asked to join; the hub administrator approves it")
            approve_city(self.admin("hub"), city)
            self.custom("hub").patch_cluster_custom_object(
                GROUP,
                VERSION,
                "cities",
                city,
                {
                    "spec": {
                        "connection": {
                            "heartbeatIntervalSeconds": 2,
                            "heartbeatTimeoutSeconds": self.timeout_s,
                        }
                    }
                },
            )
        for city in CITIES:
            wait(
                partial(self._city_ready, city),
                90,
                f"City {city} Ready",
            )
            print(f"    {city}: Joined, Reachable, Ready")
        done()

    def start_agent(self, city: str) -> None:
        config = helm.agent_config_from_release(self.admin(city), scratch=self.scratch / f"agent-{city}")
        self.agents[city] = CityAgent(config).start()

    def _city_ready(self, city: str) -> bool:
        return city_condition(self.admin("hub"), city, "Ready") == "True"

    def _city_exists(self, city: str) -> bool:
        self.custom("hub").get_cluster_custom_object(GROUP, VERSION, "cities", city)
        return True

    def apply_catalogue(self) -> None:
        done = self.step("Platform team applies the sensor-type catalogue on the hub", "catalogue")
        names = []
        written = time.monotonic()
        for path in sorted((SAMPLES / "sensortypes").glob("*.yaml")):
            manifest = yaml.safe_load(path.read_text())
            names.append(manifest["metadata"]["name"])
            try:
                self.custom("hub").create_cluster_custom_object(GROUP, VERSION, "sensortypes", manifest)
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
        for city in CITIES:

            def arrived(c: str = city) -> bool:
                items = self.custom(c).list_cluster_custom_object(GROUP, VERSION, "sensortypes")["items"]
                return {i["metadata"]["name"] for i in items} >= set(names)

            wait(arrived, 60, f"the catalogue in {city}")
            print(
                f"    {len(names)} SensorTypes present in {city} "
                f"{time.monotonic() - written:.1f} s after the hub write"
            )
        done()

    def prepare_cities(self) -> None:
        done = self.step("Each city's own fleets (from its chart values) are provisioned; the alert routes' "
                         "HMAC key is stored", "city setup")
        for city in CITIES:
            core = client.CoreV1Api(self.api(city))
            for secret in ALERT_SECRETS:
                body = {
                    "metadata": {"name": secret},
                    "data": {"hmac-key": base64.b64encode(self.hub_key).decode()},
                }
                try:
                    core.create_namespaced_secret(WORK_NS, body)
                except client.ApiException as exc:
                    if exc.status != 409:
                        raise
            fleets = self.fleets(city)
            districts = sorted({f["spec"]["district"] for f in fleets})
            terminals = sum(int(f["spec"]["count"]) for f in fleets)
            print(f"    {city}: {len(fleets)} fleets, {terminals} terminals in {', '.join(districts)}")
        done()

    def fleets(self, city: str) -> list[dict[str, Any]]:
        """The city's SensorFleets, as its chart created them."""
        return sorted(self.city_objects(city, "sensorfleets"), key=lambda f: str(f["metadata"]["name"]))

    def bound_fleets(self, city: str, *sensor_types: str) -> list[dict[str, str]]:
        """A scenario's fleet references in ``city``: its own fleets of those SensorTypes."""
        found = [{"name": f["metadata"]["name"]} for t in sensor_types for f in self.fleets(city)
                 if f["spec"]["sensorType"] == t]
        if not found:
            msg = f"{city} has no fleet of SensorType {' or '.join(sensor_types)} in {city_values_file(city)}"
            raise RuntimeError(msg)
        return found

    def start_terminals(self) -> None:
        done = self.step(
            "Terminals report through each city's data plane: MQTT fleets publish to the city broker "
            "with their fleet's own credential, HTTP fleets' gateways post NGSI-LD; each fleet's "
            "stream worker (its Deployment's own command, hosted here since kwok runs no containers) "
            "validates and windows them on JetStream",
            "ingest",
        )
        gateway_seconds = 15.0
        for city in CITIES:
            broker = self.federation.broker(city)
            self.pods[city] = LocalPods(self.api(city), [WORK_NS], broker.broker, WORK_NS,
                                        self.scratch / f"pods-{city}").start()
        for city in CITIES:
            core = client.CoreV1Api(self.api(city))
            local = self.federation.broker(city).broker
            for fleet in self.fleets(city):
                name, spec = fleet["metadata"]["name"], fleet["spec"]
                body = self.custom(city).get_cluster_custom_object(GROUP, VERSION, "sensortypes",
                                                                   spec["sensorType"])
                sensor_type = SensorType.from_resource(spec["sensorType"], body["spec"])
                if spec.get("protocol", "MQTT") == "MQTT":
                    secret = wait(partial(_read_secret, core, f"{name}-mqtt"), 60,
                                  f"{city}'s MQTT credential of fleet {name}")
                    gateway = FieldGateway.mqtt(city, name, sensor_type, int(spec["count"]), local.mqtt_host,
                                                local.mqtt_port, secret)
                else:
                    url = wait(partial(self.pods[city].url, WORK_NS, name), 60, f"{city}'s gateway of {name}")
                    gateway = FieldGateway.http(city, name, sensor_type, int(spec["count"]), url)
                self.gateways.append(gateway)
        # The first round only once every fleet's way in answers (workers started, broker users loaded).
        for gateway in self.gateways:
            wait(gateway.ready, 90, f"{gateway.city}'s {gateway.fleet} taking readings")
        rng = np.random.default_rng(2026)

        def report() -> None:
            while True:
                now = int(time.time() * 1000)
                for gateway in self.gateways:
                    # One broken payload per thousand terminals: quarantined and counted, not lost.
                    # Terminal ids are the fleet's (`<fleet>-<n>`), as Incidents' evidence names them.
                    gateway.send(gateway_batch(gateway.sensor_type, gateway.terminals, now - 2000, rng,
                                               malformed=max(1, gateway.terminals // 1000),
                                               prefix=f"{gateway.fleet}-"))
                if self.gateways_stop.wait(gateway_seconds):
                    return

        threading.Thread(target=report, name="field-gateways", daemon=True).start()
        expected = {city: sum(g.terminals for g in self.gateways if g.city == city) for city in CITIES}
        for city in CITIES:

            def online(c: str = city) -> bool:
                body = self.custom("hub").get_cluster_custom_object(GROUP, VERSION, "cities", c)
                return bool((body.get("status") or {}).get("sensorsOnlineTotal") == expected[c])

            wait(online, 120, f"{city}'s terminals online on the hub")
            listed = self.custom(city).list_namespaced_custom_object(GROUP, VERSION, WORK_NS, "sensorfleets")
            fleets = listed["items"]
            quarantined = sum(int((f.get("status") or {}).get("quarantinedPayloads") or 0) for f in fleets)
            over_mqtt = sum(1 for g in self.gateways if g.city == city and g.topic)
            print(f"    {city}: {expected[city]} terminals online across {len(fleets)} fleets "
                  f"({over_mqtt} over MQTT, {len(fleets) - over_mqtt} over NGSI-LD HTTP; seen on the hub); "
                  f"{quarantined} malformed readings quarantined so far (read from the fleets' status)")
        done()

    def train_and_promote(self) -> None:
        from citynerve.models.training import train_water_detector  # noqa: PLC0415

        done = self.step(
            "ML engineer trains the water-burst detector on simulated Net3 history, registers it "
            "in MLflow, and promotes it to both cities with Shanghai as canary",
            "models",
        )
        trained = train_water_detector(self.mlflow.url, "water-burst-detector", alias="challenger")
        version = trained.model.version
        rate = trained.metrics.get("detectionRate")
        print(
            f"    registered water-burst-detector version {version} "
            f"(digest {trained.model.artifact_digest[:19]}…), "
            f"detectionRate {rate}, {trained.metrics_logged} metrics logged in {trained.seconds:.1f} s"
        )
        manifest = promotion_manifest(
            model="water-burst-detector",
            version=version,
            from_alias=None,
            alias="champion",
            cities="",
            canary="shanghai",
            gates=["detectionRate>=0.5"],
            soak_seconds=3 if self.quick else 10,
            max_failed_cities=0,
            timeout_seconds=600,
            name="water-burst-detector-v" + version,
            namespace=helm.HUB_NAMESPACE,
            actor="ml-engineer/demo",
        )
        started = time.monotonic()
        created = create_promotion(self.api("hub"), manifest, tracking_uri=self.mlflow.url)
        status = wait_for_outcome(self.api("hub"), helm.HUB_NAMESPACE, created["metadata"]["name"], 300)
        took = time.monotonic() - started
        complete = next(c for c in status.get("conditions", []) if c["type"] == "Complete")
        cities = [f"{c['city']}:{c.get('reason')}" for c in status.get("cities", [])]
        print(f"    promotion {complete['reason']}: {', '.join(cities)} in {took:.1f} s")
        self.result.promotions.append(
            {
                "model": "water-burst-detector",
                "version": version,
                "canary": "shanghai",
                "outcome": complete["reason"],
                "cities": cities,
                "seconds": took,
            }
        )
        done()

    def federated_scenarios(self) -> None:
        done = self.step(
            "Platform team places three drills from the hub: a pipe burst in Shanghai (WNTR), "
            "a rainstorm over a Chengdu underpass (SWMM), a Grand Prix crowd surge "
            "in Shanghai; each bound to that city's own fleets",
            "scenarios",
        )
        route = {"url": self.receiver.url}
        water = load(SAMPLES / "city" / "scenario-water-burst.yaml")[0]["spec"]
        water.update(
            fleets=self.bound_fleets("shanghai", "pipe-pressure-gauge", "electromagnetic-flow-meter"),
            mode="drill",
            models=[{"name": "water-burst-detector", "role": "detector"}],
            simulation={"engine": "wntr", "network": "Net3", "event": f"burst:{BURST_NODE}"},
        )
        flood = load(SAMPLES / "city" / "scenario-urban-flood.yaml")[0]["spec"]
        flood.update(
            fleets=self.bound_fleets("chengdu", "water-level-gauge-underpass", "tipping-bucket-rain-gauge"),
            mode="drill",
            models=[],
            simulation={"engine": "swmm", "network": "example-catchment", "event": "storm:50y"},
        )
        crowd = load(SAMPLES / "city" / "scenario-major-event.yaml")[0]["spec"]
        crowd.update(
            fleets=self.bound_fleets("shanghai", "crowd-density-camera", "car-park-counter"),
            mode="drill",
            models=[],
            simulation={"engine": "pedestrian-counts", "network": "grand-prix", "event": "surge:3"},
        )
        for name, spec, city in (
            ("pipe-burst-drill", water, "shanghai"),
            ("rainstorm-underpass-drill", flood, "chengdu"),
            ("grand-prix-crowd-drill", crowd, "shanghai"),
        ):
            for r in spec.get("alertRoutes", []):
                r.update(route)
                r["minSeverity"] = "warning"  # the duty officers follow warnings too in a drill
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "FederatedScenario",
                "metadata": {"name": name, "namespace": helm.HUB_NAMESPACE},
                "spec": {"template": {"spec": spec}, "placement": {"cities": [city]}},
            }
            self.custom("hub").create_namespaced_custom_object(
                GROUP, VERSION, helm.HUB_NAMESPACE, "federatedscenarios", body
            )
            print(f"    {name} → {city} (fleets {', '.join(f['name'] for f in spec['fleets'])})")
        done()

    def follow_incidents(self) -> None:
        done = self.step(
            "Drills run on local Ray; incidents are detected, alerted (HMAC-signed webhooks) "
            "and followed by the duty officer",
            "incidents",
        )
        wanted = {("shanghai", "water-burst"), ("chengdu", "urban-flood"), ("shanghai", "major-event")}

        def seen() -> bool:
            kinds = {(c, i["spec"]["kind"]) for c in CITIES for i in self.city_objects(c, "incidents")}
            return wanted <= kinds

        wait(seen, 600, "an incident from each drill", interval=2)
        burst = min(
            (i for i in self.city_objects("shanghai", "incidents") if i["spec"]["kind"] == "water-burst"),
            key=lambda i: i["spec"]["detectedAt"],
        )
        wait(
            lambda: any(
                a.get("incident", {}).get("name") == burst["metadata"]["name"]
                or burst["metadata"]["name"] in json.dumps(a)
                for a in self.receiver.alerts
            ),
            60,
            "the burst's alert at the duty officers' endpoint",
        )
        truth = {e["metric"]: e["value"] for e in burst["spec"].get("evidence", [])}
        print(f"    alert received for {burst['metadata']['name']} (signature verified): "
              f"{burst['spec']['severity']}; burst injected at junction {BURST_NODE}, reported at "
              f"{burst['spec']['location'].get('assetId')}, {truth.get('drillDistanceMetres', '?')} m and "
              f"{truth.get('drillDistanceHops', '?')} pipes away (the Incident's evidence)")
        for state, pause in (("Dispatched", 1.0), ("OnSite", 2.0), ("Resolved", 1.5)):
            time.sleep(pause)
            self.transition("shanghai", burst, state)
            print(f"    duty officer: {state}")
        name = burst["metadata"]["name"]
        wait(
            lambda: (
                (
                    self.custom("shanghai")
                    .get_namespaced_custom_object(GROUP, VERSION, WORK_NS, "incidents", name)
                    .get("status")
                    or {}
                ).get("resolutionSeconds")
                is not None
            ),
            60,
            "response times in the burst's status",
        )
        done()

    def transition(self, city: str, incident: dict[str, Any], state: str) -> None:
        name = incident["metadata"]["name"]
        current = self.custom(city).get_namespaced_custom_object(GROUP, VERSION, WORK_NS, "incidents", name)
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        transitions = [
            *current["spec"].get("transitions", []),
            {"state": state, "time": now, "actor": DUTY_OFFICER},
        ]
        self.custom(city).patch_namespaced_custom_object(
            GROUP, VERSION, WORK_NS, "incidents", name, {"spec": {"state": state, "transitions": transitions}}
        )

    def cut_chengdu(self) -> None:
        done = self.step(f"Chengdu is cut off from the hub for {self.cut_s} s and keeps detecting", "cut-off")
        before = len(
            self.custom("chengdu").list_cluster_custom_object(
                GROUP, VERSION, "sensortypes", label_selector="citynerve.io/propagated-from=hub"
            )["items"]
        )
        started = time.monotonic()
        self.agents.pop("chengdu").stop()
        wait(
            lambda: city_condition(self.admin("hub"), "chengdu", "Reachable") == "False",
            3 * self.timeout_s,
            "the hub to mark Chengdu unreachable",
            interval=0.25,
        )
        marked = time.monotonic() - started
        print(
            f"    hub: Chengdu Reachable=False after {marked:.1f} s; Shanghai still "
            f"Ready={city_condition(self.admin('hub'), 'shanghai', 'Ready')}"
        )
        drill = load(SAMPLES / "city" / "scenario-mountain-flood.yaml")[0]
        streams = self.bound_fleets("chengdu", "water-level-gauge-mountain-stream")
        drill["spec"]["fleets"] = [*streams, *self.bound_fleets("chengdu", "tipping-bucket-rain-gauge")]
        district = next(f["spec"]["district"] for f in self.fleets("chengdu")
                        if f["metadata"]["name"] == streams[0]["name"])
        drill["metadata"]["name"] = f"{district}-mountain-flood-drill"
        self.custom("chengdu").create_namespaced_custom_object(GROUP, VERSION, WORK_NS, "scenarios", drill)
        print("    Chengdu's own mountain-flood drill starts while the link is down")
        wait(
            lambda: any(
                i["spec"]["kind"] == "mountain-flood" for i in self.city_objects("chengdu", "incidents")
            ),
            300,
            "a mountain-flood pre-warning in Chengdu",
            interval=2,
        )
        during = [
            i for i in self.city_objects("chengdu", "incidents") if i["spec"]["kind"] == "mountain-flood"
        ]
        print(f"    {len(during)} pre-warning(s) raised in Chengdu during the cut")
        time.sleep(max(0.0, self.cut_s - (time.monotonic() - started)))
        back = time.monotonic()
        self.start_agent("chengdu")
        newest = max(i["spec"]["detectedAt"] for i in during)

        def caught_up() -> bool:
            city = self.custom("hub").get_cluster_custom_object(GROUP, VERSION, "cities", "chengdu")
            status = city.get("status") or {}
            last = (status.get("lastIncident") or {}).get("detectedAt", "")
            ready = city_condition(self.admin("hub"), "chengdu", "Ready") == "True"
            return ready and last >= newest

        wait(caught_up, 90, "the hub's roll-up of Chengdu to catch up", interval=0.25)
        after = len(
            self.custom("chengdu").list_cluster_custom_object(
                GROUP, VERSION, "sensortypes", label_selector="citynerve.io/propagated-from=hub"
            )["items"]
        )
        self.result.cut = {
            "seconds": time.monotonic() - started,
            "marked_unreachable_s": marked,
            "timeout_s": self.timeout_s,
            "incidents_during": len(during),
            "caught_up_s": time.monotonic() - back,
            "objects_before": before,
            "objects_after": after,
            "names": {i["metadata"]["name"] for i in during},
        }
        print(f"    link back: hub roll-up caught up in {self.result.cut['caught_up_s']:.1f} s")
        done()

    # -- figures ---------------------------------------------------------------------------------
    def collect(self) -> None:
        """Read back what the report shows: each city's Incidents, the MLflow runs they name (what
        each workload scored), and the cities' status on the hub. Nothing is simulated again."""
        during = self.result.cut.get("names", set())
        incidents = {
            city: sorted(self.city_objects(city, "incidents"), key=lambda i: i["spec"]["detectedAt"])
            for city in CITIES
        }
        self.result.mlflow_url = self.mlflow.url
        self.result.runs = {
            run_id: read_scenario_run(self.mlflow.url, run_id)
            for run_id in runs_named_by([i for items in incidents.values() for i in items])
        }
        for city, items in incidents.items():
            self.result.incidents += [incident_record(city, i, self.result.runs, during) for i in items]
        self.result.webhook_deliveries = len(self.receiver.alerts)
        for city in CITIES:
            body = self.custom("hub").get_cluster_custom_object(GROUP, VERSION, "cities", city)
            status = body.get("status") or {}
            conds = {c["type"]: c["status"] for c in status.get("conditions", [])}
            self.result.federation.append(
                {
                    "city": city,
                    "joined": conds.get("Joined"),
                    "reachable": conds.get("Reachable"),
                    "ready": conds.get("Ready"),
                    "sensors": status.get("sensorsOnlineTotal", 0),
                    "scenarios": status.get("activeScenarios", 0),
                    "open": status.get("openIncidents", 0),
                }
            )

    def situation_map(self) -> None:
        from citynerve.observability.situation.server import serve_hub  # noqa: PLC0415

        self.map_server = serve_hub(self.api("hub"), port=free_port())
        self.result.situation_map = f"http://127.0.0.1:{self.map_server.server_address[1]}/"

    # -- whole -----------------------------------------------------------------------------------
    def play(self, output: Path) -> Path:
        self.start_federation()
        self.install_charts()
        self.start_operators()
        self.apply_catalogue()
        self.prepare_cities()
        self.start_terminals()
        self.train_and_promote()
        self.federated_scenarios()
        self.follow_incidents()
        self.cut_chengdu()
        self.collect()
        self.situation_map()
        print("\n" + summary_text(self.result))
        report = write_report(self.result, output)
        unrecorded = sum(1 for i in self.result.incidents if i.run_id not in self.result.runs)
        missing = f"; {unrecorded} incident(s) name no recorded run" if unrecorded else ""
        print(f"\nReport: {report} (incidents from the cities' API servers, {len(self.result.runs)} scenario "
              f"runs read back from MLflow{missing})")
        print(f"Situation map: {self.result.situation_map}")
        return report

    def teardown(self) -> None:
        # Operators stopped mid-work cancel their handlers and drop open connections: what a
        # stop means, not news (Kopf says so per handler, asyncio per aiohttp session).
        for noisy in ("kopf", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.CRITICAL)
        if self.map_server is not None:
            self.map_server.stop()  # its poller first: no "cannot read the hub" once the hub is gone
        self.gateways_stop.set()
        for gateway in self.gateways:
            gateway.close()
        for pods in self.pods.values():
            pods.stop()
        for agent in self.agents.values():
            agent.stop()
        for operator in reversed(self.operators):
            operator.stop()
        self.receiver.stop()
        try:
            import ray  # noqa: PLC0415

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:  # pragma: no cover - ray is a dependency
            pass
        self.mlflow.stop()
        self.federation.down()
