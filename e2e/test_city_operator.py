"""The city operator against a real city control plane, real MLflow server and real Ray.

The operator runs in-process (``InProcessOperator``) under a ServiceAccount of its own, bound
by a Role in the test's namespace only, so its API writes can be counted in the audit log
and namespace-scoped operation is proven with least privilege. One test runs it as its own
process through the CLI instead, to SIGKILL it mid-reconcile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from citynerve.models.registry import register_model_version
from citynerve.observability import TRACEPARENT_ANNOTATION
from citynerve.operators.api.events import (
    ALERT_DELIVERED,
    ALERT_FAILED,
    INCIDENT_DETECTED,
    WORKLOAD_STARTED,
)
from citynerve.operators.city import rbac
from citynerve.operators.city.broker import BrokerOptions, derive_password
from citynerve.operators.city.children import ENV_BROKER_PASSWORD, ENV_BROKER_URL, scoring_secret_name
from citynerve.operators.city.config import MANAGED_BY, AlertPolicy, CityOptions, WorkloadMode
from citynerve.operators.city.handlers import build_registry
from citynerve.operators.city.signing import ReplayGuard, verify_alert
from citynerve.operators.conditions import duration, now_rfc3339
from citynerve.operators.localfed import toolchain
from citynerve.operators.localfed.cluster import free_port
from citynerve.operators.runtime import InProcessOperator, KubeTarget, OperatorOptions, service_account_target
from citynerve.workloads.dataplane import names
from citynerve.workloads.dataplane.broker import OPERATOR_USER
from kubernetes import client

pytestmark = pytest.mark.e2e
CITY = "shanghai"
ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION = "citynerve.io", "v1alpha1"
OPERATOR_SA = "citynerve-city-operator"
# The Secrets the tests' alert routes name: the city chart's alerts.secretNames, the only Secrets
# the operator's Role lets it read (and the only ones it accepts in a route).
ALERT_SECRETS = ("drill-webhook",)
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}


# --- cluster set-up --------------------------------------------------------------------------------


def _kuberay_crds() -> Path:
    modcache = subprocess.run(
        ["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return (
        Path(modcache)
        / f"github.com/ray-project/kuberay/ray-operator@{toolchain.KUBERAY_VERSION}/config/crd/bases"
    )


@pytest.fixture(scope="module")
def city_cluster(federation: Any) -> Any:
    """Shanghai with the CityNerve and KubeRay CRDs installed, and the sample SensorTypes (what the
    agent applies from the hub's catalogue: each fleet's worker is configured with its type)."""
    for path in (ROOT / "crds", _kuberay_crds()):
        federation.kubectl(CITY, "apply", "--server-side", "--force-conflicts", "-f", str(path), timeout=120)
    deadline = time.monotonic() + 60
    while (
        federation.kubectl(
            CITY, "wait", "--for=condition=Established", "crd", "--all", "--timeout=30s", check=False
        ).returncode
        != 0
    ):  # a CRD just created has no conditions yet
        assert time.monotonic() < deadline, "CRDs not Established within 60 s"
        time.sleep(0.5)
    federation.kubectl(CITY, "apply", "--server-side", "--force-conflicts", "-f",
                       str(ROOT / "samples" / "sensortypes"), timeout=120)
    return federation.cluster(CITY)


@pytest.fixture(scope="module")
def registered_models(mlflow_server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The registered models the sample AnalyticsModels follow (the localiser needs three versions)."""
    folder = tmp_path_factory.mktemp("models")
    out: dict[str, Any] = {}
    for name, versions in (
        ("water-burst-detector", 1),
        ("urban-flood-forecaster", 1),
        ("crowd-anomaly-detector", 1),
        ("water-burst-localiser", 3),
    ):
        for version in range(versions):
            artifact = folder / f"{name}-{version}"
            artifact.mkdir()
            (artifact / "MLmodel").write_text(f"name: {name}\nversion: {version}\n")
            (artifact / "weights.json").write_text(json.dumps({"threshold": 12.0 + version}))
            out[name] = register_model_version(
                mlflow_server.url, name, artifact, {"f1": 0.9, "delay_min": 35.0}, alias="champion"
            )
    return out


def operator_kubeconfig(
    federation: Any, namespace: str, folder: Path, mode: str, alert_secrets: tuple[str, ...] = ALERT_SECRETS
) -> tuple[Path, str]:
    """A ServiceAccount bound by a Role to ``rbac.role_rules`` in ``namespace`` only; its token kubeconfig."""
    api = federation.api_client(CITY)
    core, rbac_api = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": OPERATOR_SA}})
    rbac_api.create_namespaced_role(
        namespace, {"metadata": {"name": OPERATOR_SA}, "rules": rbac.role_rules(mode, alert_secrets)}
    )
    rbac_api.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": OPERATOR_SA},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": OPERATOR_SA},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": namespace}],
        },
    )
    # The catalogue, which the chart grants the operator's account through the agent's rules: a
    # fleet's worker is configured with its SensorType.
    catalogue = f"citynerve-catalogue-{namespace}"
    rbac_api.create_cluster_role({"metadata": {"name": catalogue}, "rules": rbac.agent_cluster_rules()})
    rbac_api.create_cluster_role_binding({
        "metadata": {"name": catalogue},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": catalogue},
        "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": namespace}]})
    # The broker's users are written in the operator's own namespace (the chart's broker Role).
    rbac_api.create_namespaced_role(
        namespace, {"metadata": {"name": f"{OPERATOR_SA}-broker"}, "rules": rbac.broker_release_rules()}
    )
    rbac_api.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": f"{OPERATOR_SA}-broker"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                        "name": f"{OPERATOR_SA}-broker"},
            "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": namespace}],
        },
    )
    target = service_account_target(KubeTarget(federation.kubeconfig, CITY), namespace, OPERATOR_SA, folder)
    assert target.kubeconfig is not None
    path = target.kubeconfig
    return path, f"system:serviceaccount:{namespace}:{OPERATOR_SA}"


@contextlib.contextmanager
def running_operator(
    kubeconfig: Path,
    context: str | None,
    namespaces: tuple[str, ...],
    mode: WorkloadMode,
    mlflow_url: str | None = None,
    alert_secrets: tuple[str, ...] = ALERT_SECRETS,
    broker: BrokerOptions | None = None,
    **alert_options: float,
) -> Iterator[InProcessOperator]:
    """The city operator in this process; the tests' alert receivers listen on 127.0.0.1."""
    options = OperatorOptions(f"city-{CITY}", KubeTarget(kubeconfig, context), namespaces=namespaces)
    city = CityOptions(
        city=CITY, mlflow_url=mlflow_url, workload_mode=mode, resync_seconds=4.0, model_cache_seconds=60.0,
        alert_policy=AlertPolicy(allow_loopback=True), alert_secrets=alert_secrets, broker=broker,
        **alert_options,
    )
    operator = InProcessOperator(options, build_registry(options, city)).start()
    try:
        yield operator
    finally:
        operator.stop()


def city_broker(cluster: Any, namespace: str) -> BrokerOptions:
    """Shanghai's local broker, its users written in ``namespace`` (the operator's, in these tests)."""
    return BrokerOptions(cluster.broker.url, cluster.broker_key_file, namespace)


def put_fleet_status(cluster: Any, fleet: str, status: dict[str, Any]) -> None:
    """Write a fleet's status on the broker, where its stream worker writes it."""
    password = derive_password(cluster.broker_key_file.read_bytes().strip(), "operator", "operator")

    async def put() -> None:
        nc = await nats.connect(cluster.broker.url, user=OPERATOR_USER, password=password,
                                allow_reconnect=False)
        try:
            kv = await nc.jetstream().key_value(names.FLEETS_BUCKET)
            await kv.put(names.status_key(fleet), json.dumps(status).encode())
        finally:
            await nc.close()

    asyncio.run(put())


class AuditLog:
    """API writes made by one user, read from the city's audit log."""

    def __init__(self, path: Path, username: str) -> None:
        self.path, self.username = path, username
        self.offset = 0

    def mark(self) -> None:
        self.offset = self.path.stat().st_size

    def writes(self) -> list[str]:
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            lines = fh.read().splitlines()
        out = []
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if (
                    entry.get("user", {}).get("username") == self.username
                    and entry.get("stage") == "ResponseComplete"
                    and entry.get("verb") in WRITE_VERBS  # the log has ServiceAccounts' reads too
                ):
                    ref = entry.get("objectRef", {})
                    resource = f"{ref.get('resource')}/{ref.get('subresource', '')}"
                    out.append(f"{entry['verb']} {resource} {ref.get('name')}")
        return out

    def requests(self) -> set[tuple[str, str, str]]:
        """(API group, resource, verb) of every request the user made since the mark, allowed or not."""
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            lines = fh.read().splitlines()
        out = set()
        for line in lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                ref = entry.get("objectRef") or {}
                if entry.get("user", {}).get("username") == self.username and ref.get("resource"):
                    out.add((ref.get("apiGroup", ""), ref["resource"], entry["verb"]))
        return out

    def quiet_writes(self, seconds: float) -> list[str]:
        """Writes during ``seconds`` of nothing changing."""
        self.mark()
        time.sleep(seconds)
        return self.writes()


# --- small helpers ---------------------------------------------------------------------------------


def custom(federation: Any) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(federation.api_client(CITY))


def get(federation: Any, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = custom(federation).get_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return obj


def condition(obj: dict[str, Any] | None, kind: str = "Ready") -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == kind:
            return dict(cond)
    return {}


def events_of(federation: Any, namespace: str, kind: str, name: str) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the core/v1 Events on one object, oldest first."""
    listed = client.CoreV1Api(federation.api_client(CITY)).list_namespaced_event(
        namespace, field_selector=f"involvedObject.kind={kind},involvedObject.name={name}")
    items = sorted(listed.items, key=lambda e: str(e.first_timestamp or ""))
    return [(e.type, e.reason, e.message) for e in items]


def apply(federation: Any, namespace: str, text: str) -> None:
    federation.kubectl(CITY, "apply", "-n", namespace, "-f", "-", input=text)


def sample(name: str) -> str:
    return (ROOT / "samples" / "city" / name).read_text()


def deployment(federation: Any, namespace: str, name: str) -> Any:
    try:
        return client.AppsV1Api(federation.api_client(CITY)).read_namespaced_deployment(name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


class Webhook:
    """A local alert receiver that checks each delivery with the shipped verifier.

    It keeps every request as it arrived (``raw``: headers, body, monotonic time) so a test can
    replay one. ``delay`` makes it slow; ``answer`` (with ``location``) answers every request so.
    """

    def __init__(self, key: bytes, *, delay: float = 0.0, answer: int | None = None,
                 location: str | None = None) -> None:
        self.key = key
        self.seen = ReplayGuard()
        self.received: list[dict[str, Any]] = []
        self.raw: list[tuple[dict[str, str], bytes, float]] = []
        webhook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                webhook.raw.append((dict(self.headers.items()), body, time.monotonic()))
                verdict = verify_alert(webhook.key, self.headers, body, seen=webhook.seen)
                webhook.received.append(
                    {"valid": bool(verdict), "reason": verdict.reason, **json.loads(body)}
                )
                time.sleep(delay)
                with contextlib.suppress(OSError):  # a slow receiver's caller may have gone
                    self.send_response(answer or (204 if verdict else 401))
                    if location:
                        self.send_header("Location", location)
                    self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/alerts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def states(self) -> list[tuple[str, bool]]:
        return [(r["state"], r["valid"]) for r in self.received]

    def close(self) -> None:
        self.server.shutdown()


# --- tests -----------------------------------------------------------------------------------------


@pytest.mark.timeout(300)  # the first test of the module: its time includes starting the federation
def test_samples_become_ready_and_a_drill_alerts_the_webhook(
    federation: Any,
    city_cluster: Any,
    namespace: str,
    wait_for: Any,
    mlflow_server: Any,
    registered_models: dict[str, Any],
    local_ray: None,
    tmp_path: Path,
) -> None:
    kubeconfig, user = operator_kubeconfig(federation, namespace, tmp_path, "local")
    audit = AuditLog(city_cluster.audit_log, user)
    webhook = Webhook(b"drill-hmac-key")
    core = client.CoreV1Api(federation.api_client(CITY))
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "drill-webhook"},
            "data": {"hmac-key": base64.b64encode(b"drill-hmac-key").decode()},
        },
    )
    fleets = [d["metadata"]["name"] for d in yaml.safe_load_all(sample("sensorfleets.yaml"))]
    with running_operator(kubeconfig, "hub", (namespace,), "local", mlflow_server.url,
                          broker=city_broker(city_cluster, namespace)) as operator:
        apply(federation, namespace, sample("sensorfleets.yaml"))
        apply(federation, namespace, sample("analyticsmodels.yaml"))
        for fleet in fleets:
            try:
                wait_for(
                    lambda f=fleet: (
                        condition(get(federation, "sensorfleets", namespace, f)).get("status") == "True"
                    ),
                    30,
                    what=f"SensorFleet {fleet} Ready",
                )
            except AssertionError as exc:  # say why: the condition's reason and message
                seen = condition(get(federation, "sensorfleets", namespace, fleet))
                raise AssertionError(f"{exc}; Ready is {seen}") from exc
            owner = deployment(federation, namespace, f"{fleet}-ingest").metadata.owner_references[0]
            assert (owner.kind, owner.name, owner.controller) == ("SensorFleet", fleet, True)
        for model in ("burst-detector", "flood-forecaster", "crowd-detector"):
            wait_for(
                lambda m=model: (
                    condition(get(federation, "analyticsmodels", namespace, m)).get("status") == "True"
                ),
                30,
                what=f"AnalyticsModel {model} Ready",
            )
        detector = get(federation, "analyticsmodels", namespace, "burst-detector")
        assert detector is not None
        assert detector["status"]["resolvedVersion"] == registered_models["water-burst-detector"].version
        assert (
            detector["status"]["artifactDigest"] == registered_models["water-burst-detector"].artifact_digest
        )
        assert {"name": "f1", "value": 0.9} in detector["status"]["metrics"]
        # The sample pins the localiser to a placeholder digest (sha256 of "test"): refused as untrusted.
        localiser = wait_for(
            lambda: (
                condition(get(federation, "analyticsmodels", namespace, "burst-localiser"), "Degraded")
                or None
            ),
            30,
            what="burst-localiser Degraded",
        )
        assert localiser["reason"] == "ArtifactDigestMismatch"

        drill = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Scenario",
            "metadata": {"name": "pudong-burst-drill"},
            "spec": {
                "kind": "water-burst",
                "mode": "drill",
                "fleets": [{"name": "pudong-pressure"}, {"name": "pudong-flow"}],
                "models": [{"name": "burst-detector", "role": "detector"}],
                "thresholds": [{"metric": "pressureDropKpa", "unitCode": "KPA", "warning": 50, "alarm": 120}],
                "alertRoutes": [
                    {
                        "name": "duty-desk",
                        "url": webhook.url,
                        "minSeverity": "warning",
                        "secretRef": {"name": "drill-webhook", "key": "hmac-key"},
                    }
                ],
                "simulation": {"engine": "wntr", "network": "Net1", "event": "burst:22"},
            },
        }
        apply(federation, namespace, json.dumps(drill))

        def drill_incidents() -> list[dict[str, Any]]:
            ready = condition(get(federation, "scenarios", namespace, "pudong-burst-drill"))
            assert ready.get("reason") != "WorkloadFailed", ready  # fail fast, with the workload's error
            items: list[dict[str, Any]] = custom(federation).list_namespaced_custom_object(
                GROUP, VERSION, namespace, "incidents"
            )["items"]
            return items

        incidents = wait_for(drill_incidents, 90, what="an Incident from the drill")
        incident = incidents[0]
        assert incident["spec"]["drill"] is True
        assert incident["spec"]["scenarioRef"]["name"] == "pudong-burst-drill"
        # The trace of its detection, as docs/alerts.md promises (telemetry is off in this process).
        traceparent = incident["metadata"]["annotations"][TRACEPARENT_ANNOTATION]
        assert len(traceparent.split("-")) == 4
        wait_for(lambda: ("Detected", True) in webhook.states(), 20, what="the Detected alert, signed")
        trace_id = traceparent.split("-")[1]
        assert any(trace_id in headers.get("traceparent", "") for headers, _, _ in webhook.raw)
        name = incident["metadata"]["name"]
        def incident_events() -> list[tuple[str, str, str]] | None:
            seen = events_of(federation, namespace, "Incident", name)
            wanted = {INCIDENT_DETECTED.reason, ALERT_DELIVERED.reason}
            return seen if wanted <= {reason for _, reason, _ in seen} else None

        told = wait_for(incident_events, 20, what="IncidentDetected and AlertDelivered Events")
        detected = next(e for e in told if e[1] == INCIDENT_DETECTED.reason)
        assert detected[0] == "Warning"
        assert "Drill scenario pudong-burst-drill detected a water-burst incident" in detected[2]
        delivered = next(e for e in told if e[1] == ALERT_DELIVERED.reason)
        assert delivered[:2] == ("Normal", ALERT_DELIVERED.reason)
        assert "State Detected was delivered to alert route duty-desk" in delivered[2]
        started = wait_for(
            lambda: [e for e in events_of(federation, namespace, "Scenario", "pudong-burst-drill")
                     if e[1] == WORKLOAD_STARTED.reason],
            20, what="a WorkloadStarted Event",
        )
        assert "Scenario pudong-burst-drill started RayActor" in started[0][2]
        assert "burst-detector version" in started[0][2]
        ready = wait_for(
            lambda: condition(get(federation, "scenarios", namespace, "pudong-burst-drill")) or None,
            20,
            what="the drill's Ready condition",
        )
        assert ready["status"] == "True", ready

        transitions = [
            *incident["spec"]["transitions"],
            {"state": "Dispatched", "time": now_rfc3339(), "actor": "duty-officer-wang"},
        ]
        custom(federation).patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            "incidents",
            name,
            {"spec": {"state": "Dispatched", "transitions": transitions}},
        )
        wait_for(lambda: ("Dispatched", True) in webhook.states(), 20, what="the Dispatched alert")
        status = wait_for(
            lambda: (
                (get(federation, "incidents", namespace, name) or {}).get("status", {}).get("dispatchSeconds")
                is not None
                and get(federation, "incidents", namespace, name)
            ),
            20,
            what="dispatchSeconds",
        )["status"]
        assert "duty-desk:Dispatched" in status["notifiedRoutes"]
        assert all(valid for _, valid in webhook.states())
        assert webhook.states().count(("Detected", True)) == 1

        # The Scenario counts its open Incidents (from the operator's index, not a listing).
        def open_counts() -> tuple[int, int] | None:
            items = custom(federation).list_namespaced_custom_object(GROUP, VERSION, namespace, "incidents")
            opened = sum(1 for i in items["items"] if i["spec"].get("state") != "Resolved")
            shown = (get(federation, "scenarios", namespace, "pudong-burst-drill") or {}).get("status", {})
            return (opened, shown.get("openIncidents")) if shown.get("openIncidents") == opened else None

        opened, _ = wait_for(open_counts, 20, what="openIncidents equal to the open Incidents")
        assert opened >= 1
        on_site = [*transitions, {"state": "OnSite", "time": now_rfc3339(), "actor": "crew-pd-07"}]
        custom(federation).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "incidents", name,
            {"spec": {"state": "OnSite", "transitions": on_site}},
        )

        def response_measured() -> dict[str, Any] | None:
            status = (get(federation, "incidents", namespace, name) or {}).get("status") or {}
            return status if status.get("responseTime") else None

        measured = wait_for(response_measured, 20, what="the response time")
        assert measured["responseTime"] == duration(measured["responseSeconds"])
        resolved = [*on_site, {"state": "Resolved", "time": now_rfc3339(), "actor": "crew"}]
        custom(federation).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "incidents", name,
            {"spec": {"state": "Resolved", "transitions": resolved}},
        )
        wait_for(lambda: ("Resolved", True) in webhook.states(), 20, what="the Resolved alert")
        wait_for(open_counts, 20, what="openIncidents without the resolved Incident")

        # Settled: nothing changes, so the operator writes nothing (resync runs every 4 s).
        writes = audit.quiet_writes(9)
        assert writes == [], writes
        assert operator.alive
    webhook.close()


def _replay(url: str, headers: dict[str, str], body: bytes) -> int:
    """POST a captured request again, as an attacker who saw it would; the HTTP status of the answer."""
    request = urllib.request.Request(url, body, headers, method="POST")  # noqa: S310 - a local receiver
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@pytest.mark.timeout(120)
def test_alerts_are_replay_proof_backed_off_never_redirected_and_refused_where_they_must_not_go(
    federation: Any, city_cluster: Any, namespace: str, wait_for: Any, tmp_path: Path
) -> None:
    """Incidents applied directly (no drill): the operator's deliveries, as receivers see them."""
    key = b"harbour-duty-desk-key"
    client.CoreV1Api(federation.api_client(CITY)).create_namespaced_secret(
        namespace,
        {"metadata": {"name": "drill-webhook"}, "data": {"hmac-key": base64.b64encode(key).decode()}},
    )
    timeout, base, cap = 1.0, 2.0, 8.0
    desk = Webhook(key)
    slow = Webhook(key, delay=timeout + 2)  # answers after the operator has given up on it
    landing = Webhook(key)
    moved = Webhook(key, answer=302, location=landing.url)
    receivers = (desk, slow, landing, moved)

    def routes(**urls: str) -> list[dict[str, Any]]:
        return [{"name": name.replace("_", "-"), "url": url, "minSeverity": "warning",
                 "secretRef": {"name": "drill-webhook", "key": "hmac-key"}} for name, url in urls.items()]

    scenarios = {
        "harbour-burst": routes(duty_desk=desk.url, slow_desk=slow.url, moved_desk=moved.url),
        "metadata-burst": routes(metadata="http://169.254.169.254/latest/meta-data/"),
    }

    def incident_status(name: str) -> dict[str, Any]:
        return dict((get(federation, "incidents", namespace, name) or {}).get("status") or {})

    def retry(name: str, route: str) -> dict[str, Any] | None:
        retries = incident_status(name).get("deliveryRetries") or []
        return next((r for r in retries if r["route"] == route), None)

    kubeconfig, _ = operator_kubeconfig(federation, namespace, tmp_path, "local")
    try:
        with running_operator(kubeconfig, "hub", (namespace,), "local", webhook_timeout_seconds=timeout,
                              alert_retry_seconds=base, alert_retry_max_seconds=cap):
            for name, alert_routes in scenarios.items():
                apply(federation, namespace, json.dumps({
                    "apiVersion": f"{GROUP}/{VERSION}", "kind": "Scenario", "metadata": {"name": name},
                    "spec": {"kind": "water-burst", "fleets": [{"name": "harbour-pressure"}],
                             "alertRoutes": alert_routes}}))
            # (d) A route to the metadata address is refused on its Scenario at once.
            accepted = wait_for(
                lambda: condition(get(federation, "scenarios", namespace, "metadata-burst"),
                                  "AlertRoutesAccepted") or None,
                30, what="AlertRoutesAccepted on the Scenario")
            assert (accepted["status"], accepted["reason"]) == ("False", "RouteRefused"), accepted
            assert "alert route metadata" in accepted["message"]
            assert "169.254.169.254" in accepted["message"]
            harbour = wait_for(
                lambda: condition(get(federation, "scenarios", namespace, "harbour-burst"),
                                  "AlertRoutesAccepted") or None,
                30, what="AlertRoutesAccepted on the other Scenario")
            assert harbour["status"] == "True", harbour  # loopback receivers: this operator allows them

            for name in scenarios:
                apply(federation, namespace, json.dumps({
                    "apiVersion": f"{GROUP}/{VERSION}", "kind": "Incident", "metadata": {"name": f"{name}-1"},
                    "spec": {"scenarioRef": {"name": name}, "kind": "water-burst", "severity": "alarm",
                             "location": {"latitude": "31.2397", "longitude": "121.4998"},
                             "detectedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}))

            # (a) A delivery captured from the operator, replayed, fails the shipped verifier.
            wait_for(lambda: desk.received, 20, what="the duty desk's alert")
            headers, body, _ = desk.raw[0]
            assert desk.received[0]["valid"], desk.received[0]
            signed = {k: v for k, v in headers.items() if k.lower().startswith("x-citynerve-")}
            assert _replay(desk.url, {**signed, "Content-Type": "application/json"}, body) == 401
            assert desk.received[-1]["reason"] == "Replayed"
            later = verify_alert(key, signed, body, now=time.time() + 301, seen=ReplayGuard())
            assert later.reason == "TimestampOutOfTolerance"  # and to a receiver that forgot it, too late
            assert len(desk.received) == 2  # delivered once

            # (c) A 302 is a failure with its reason on the Incident; the redirect is not followed.
            redirected = wait_for(lambda: retry("harbour-burst-1", "moved-desk"), 20, what="the 302's retry")
            assert redirected["reason"] == "Redirected", redirected
            notified = condition({"status": incident_status("harbour-burst-1")}, "Notified")
            assert (notified["status"], notified["reason"]) == ("False", "Redirected"), notified
            assert "moved-desk" in notified["message"]
            assert "never followed" in notified["message"]
            assert "duty-desk:Detected" in incident_status("harbour-burst-1")["notifiedRoutes"]
            failed = wait_for(
                lambda: [e for e in events_of(federation, namespace, "Incident", "harbour-burst-1")
                         if e[1] == ALERT_FAILED.reason and "moved-desk" in e[2]],
                20, what="an AlertFailed Event for the redirect",
            )
            assert failed[0][0] == "Warning"
            assert "Delivering state Detected to alert route moved-desk failed (Redirected)" in failed[0][2]

            # (d) ... and on the Incident, never delivered.
            refused = wait_for(lambda: retry("metadata-burst-1", "metadata"), 20, what="the refused route")
            assert refused["reason"] == "RouteRefused", refused
            shown = condition({"status": incident_status("metadata-burst-1")}, "Notified")
            assert (shown["reason"], "alert route metadata" in shown["message"]) == ("RouteRefused", True)

            # (b) A receiver slower than the timeout sees one delivery per backoff step: 2, 4, 8, 8 s.
            wait_for(lambda: slow.raw, 20, what="the slow receiver's first delivery")
            time.sleep(16)
            arrivals = [at for _, _, at in slow.raw]
            gaps = [b - a for a, b in itertools.pairwise(arrivals)]
            # Each attempt waits out the timeout, then its backoff (status times are whole seconds).
            floors = [timeout + min(cap, base * 2**k) - 1.0 for k in range(len(gaps))]
            assert 2 <= len(arrivals) <= 4, gaps
            assert all(gap >= floor for gap, floor in zip(gaps, floors, strict=True)), (gaps, floors)
            ids = {v for h, _, _ in slow.raw for k, v in h.items() if k.lower() == "x-citynerve-delivery"}
            assert len(ids) == 1, ids  # every retry carries the same delivery id (the idempotency key)
            assert [r["reason"] for r in slow.received][1:] == ["Replayed"] * (len(arrivals) - 1)
            timed_out = retry("harbour-burst-1", "slow-desk")
            assert timed_out is not None
            assert timed_out["reason"] == "ReceiverTimeout"
            assert timed_out["attempts"] >= len(arrivals) - 1, (timed_out, len(arrivals))
            assert landing.raw == []  # the redirect's target was never called
    finally:
        for receiver in receivers:
            receiver.close()


@pytest.mark.timeout(90)
def test_fleet_children_follow_spec_drift_and_deletion(
    federation: Any, city_cluster: Any, namespace: str, wait_for: Any, tmp_path: Path
) -> None:
    kubeconfig, user = operator_kubeconfig(federation, namespace, tmp_path, "local")
    audit = AuditLog(city_cluster.audit_log, user)
    apps = client.AppsV1Api(federation.api_client(CITY))
    core = client.CoreV1Api(federation.api_client(CITY))
    fleet = next(yaml.safe_load_all(sample("sensorfleets.yaml")))
    name = fleet["metadata"]["name"]
    child = f"{name}-ingest"

    def ready_generation() -> int | None:
        obj = get(federation, "sensorfleets", namespace, name)
        cond = condition(obj)
        return cond.get("observedGeneration") if cond.get("status") == "True" else None

    broker = city_broker(city_cluster, namespace)
    with running_operator(kubeconfig, "hub", (namespace,), "local", broker=broker):
        apply(federation, namespace, yaml.safe_dump(fleet))
        wait_for(lambda: ready_generation() == 1, 30, what="fleet Ready at generation 1")
        assert audit.quiet_writes(6) == []

        # A real change: one Deployment update and one status patch.
        audit.mark()
        fleet["spec"]["count"] = 4300
        apply(federation, namespace, yaml.safe_dump(fleet))
        wait_for(lambda: ready_generation() == 2, 30, what="fleet Ready at generation 2")
        time.sleep(3)
        writes = audit.writes()
        assert len(writes) <= 2, writes
        env = deployment(federation, namespace, child).spec.template.spec.containers[0].env
        assert json.loads(next(e.value for e in env if e.name == "CITYNERVE_FLEET_CONFIG"))["count"] == 4300

        # Drift is corrected; a deleted child is recreated.
        apps.patch_namespaced_deployment(child, namespace, {"spec": {"replicas": 4}})
        wait_for(
            lambda: deployment(federation, namespace, child).spec.replicas == 1, 20, what="replicas restored"
        )
        uid = deployment(federation, namespace, child).metadata.uid
        apps.delete_namespaced_deployment(child, namespace)
        wait_for(
            lambda: (d := deployment(federation, namespace, child)) is not None and d.metadata.uid != uid,
            20,
            what="the ingestion Deployment recreated",
        )

        # The workers' identity is kept in line too: a token automounted again is turned off again.
        core.patch_namespaced_service_account(child, namespace, {"automountServiceAccountToken": True})
        account = partial(core.read_namespaced_service_account, child, namespace)
        wait_for(lambda: account().automount_service_account_token is False, 20,
                 what="the worker account's token automount turned off again")

        # The stream worker's status on the broker reaches the fleet's.
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        put_fleet_status(city_cluster, name, {
            "reportedAt": now, "lastReadingTime": now, "terminalsOnline": 4100,
            "acceptedReadings": 990, "rejectedReadings": 10, "quarantinedPayloads": 10,
        })
        status = wait_for(
            lambda: (
                (get(federation, "sensorfleets", namespace, name) or {})
                .get("status", {})
                .get("terminalsOnline")
                and get(federation, "sensorfleets", namespace, name)["status"]  # type: ignore[index]
            ),
            20,
            what="fleet figures from the worker's status on the broker",
        )
        assert (status["terminalsOnline"], status["qualityScore"], status["quarantinedPayloads"]) == (
            4100,
            99,
            10,
        )
        assert condition({"status": status}, "DataFresh")["status"] == "True"

        # No finalizer: deletion completes at once and the child is collected.
        assert not (get(federation, "sensorfleets", namespace, name) or {})["metadata"].get("finalizers")
        custom(federation).delete_namespaced_custom_object(GROUP, VERSION, namespace, "sensorfleets", name)
        wait_for(lambda: get(federation, "sensorfleets", namespace, name) is None, 10, what="fleet deleted")
        wait_for(
            lambda: deployment(federation, namespace, child) is None,
            30,
            what="ingestion Deployment collected",
        )
        wait_for(lambda: not fleet_children(federation, namespace), 30,
                 what="the workers' account and credentials collected")


@pytest.mark.timeout(90)
def test_a_fleet_naming_a_missing_sensor_type_is_not_ready_until_the_type_arrives(
    federation: Any, city_cluster: Any, namespace: str, wait_for: Any, tmp_path: Path
) -> None:
    """The operator's account may list SensorTypes as the city chart grants it (the agent's rules)."""
    kubeconfig, _ = operator_kubeconfig(federation, namespace, tmp_path, "local")
    api = federation.api_client(CITY)
    rbac_api = client.RbacAuthorizationV1Api(api)
    role = f"citynerve-catalogue-{namespace}"
    sample_type = ROOT / "samples" / "sensortypes" / "tunnel-settlement-sensor.yaml"
    sensor_type = yaml.safe_load(sample_type.read_text())
    type_name = sensor_type["metadata"]["name"] = f"settlement-{namespace}"[:63]  # cluster-scoped: unique
    fleet = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SensorFleet",
             "metadata": {"name": "metro-settlement"},
             "spec": {"sensorType": type_name, "district": "huangpu", "count": 120, "owner": "operator",
                      "samplingIntervalSeconds": 600}}

    def fleet_condition(kind: str, wanted: tuple[str, str]) -> dict[str, Any] | None:
        seen = condition(get(federation, "sensorfleets", namespace, "metro-settlement"), kind)
        return seen if (seen.get("status"), seen.get("reason")) == wanted else None

    catalogue = client.CustomObjectsApi(api)
    try:
        with running_operator(kubeconfig, "hub", (namespace,), "local",
                              broker=city_broker(city_cluster, namespace)):
            apply(federation, namespace, json.dumps(fleet))
            missing = wait_for(lambda: fleet_condition("Ready", ("False", "SensorTypeNotFound")), 30,
                               what="the fleet's Ready naming the missing SensorType")
            assert f"names SensorType {type_name}, which does not exist in this city" in missing["message"]
            catalogue.create_cluster_custom_object(GROUP, VERSION, "sensortypes", sensor_type)
            wait_for(lambda: fleet_condition("Ready", ("True", "IngestionReady")), 30,
                     what="the fleet Ready once its SensorType arrived")
            assert fleet_condition("SensorTypeFound", ("True", "SensorTypeFound")) is not None
    finally:
        with contextlib.suppress(client.ApiException):
            catalogue.delete_cluster_custom_object(GROUP, VERSION, "sensortypes", type_name)
        for delete in (rbac_api.delete_cluster_role_binding, rbac_api.delete_cluster_role):
            with contextlib.suppress(client.ApiException):
                delete(role)


def fleet_children(federation: Any, namespace: str) -> list[str]:
    """The ServiceAccounts, Secrets and Services the operator made in ``namespace``."""
    core = client.CoreV1Api(federation.api_client(CITY))
    selector = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    listed = [
        ("ServiceAccount", core.list_namespaced_service_account(namespace, label_selector=selector).items),
        ("Secret", core.list_namespaced_secret(namespace, label_selector=selector).items),
        ("Service", core.list_namespaced_service(namespace, label_selector=selector).items),
    ]
    return sorted(f"{kind}/{item.metadata.name}" for kind, items in listed for item in items
                  if item.metadata.name != "citynerve-broker-auth")


def fleet_identity_children(fleet: dict[str, Any]) -> list[str]:
    name = fleet["metadata"]["name"]
    made = [f"Secret/{name}-ingest-broker", f"ServiceAccount/{name}-ingest"]
    if fleet["spec"].get("protocol", "MQTT") == "MQTT":
        made.append(f"Secret/{name}-mqtt")
    else:
        made.append(f"Service/{name}-ingest")
    return made


@pytest.mark.timeout(90)
def test_bad_references_are_reported_not_retried_in_a_loop(
    federation: Any,
    city_cluster: Any,
    namespace: str,
    wait_for: Any,
    mlflow_server: Any,
    registered_models: dict[str, Any],
    tmp_path: Path,
) -> None:
    # A tampered artifact: registered with its digest, then changed in the server's artifact store.
    artifact = tmp_path / "tampered"
    artifact.mkdir()
    (artifact / "weights.json").write_text('{"threshold": 12}')
    registered = register_model_version(
        mlflow_server.url, "tampered-detector", artifact, {"f1": 0.5}, alias="champion"
    )
    stored = next(
        p
        for p in (mlflow_server.root / "artifacts").rglob("weights.json")
        if p.read_text() == '{"threshold": 12}'
    )
    stored.write_text('{"threshold": 1}')

    manifests = [
        {
            "kind": "AnalyticsModel",
            "metadata": {"name": "no-alias"},
            "spec": {"registeredModel": "water-burst-detector", "alias": "does-not-exist"},
        },
        {
            "kind": "AnalyticsModel",
            "metadata": {"name": "no-model"},
            "spec": {"registeredModel": "no-such-model", "version": "1"},
        },
        {
            "kind": "AnalyticsModel",
            "metadata": {"name": "tampered"},
            # The digest comes from the manifest (a promotion's pin carries the hub's), never the registry.
            "spec": {
                "registeredModel": "tampered-detector",
                "alias": "champion",
                "expectedDigest": registered.artifact_digest,
            },
        },
        {
            "kind": "Scenario",
            "metadata": {"name": "orphan"},
            "spec": {"kind": "urban-flood", "fleets": [{"name": "missing-fleet"}]},
        },
    ]
    # Cluster-wide, with the admin's credentials (the namespaced Role is proven by the other tests).
    with running_operator(federation.kubeconfig, CITY, (), "local", mlflow_server.url) as operator:
        for manifest in manifests:
            apply(federation, namespace, json.dumps({"apiVersion": f"{GROUP}/{VERSION}", **manifest}))
        expected = {
            ("analyticsmodels", "no-alias"): ("AliasNotFound", "does-not-exist"),
            ("analyticsmodels", "no-model"): ("RegisteredModelNotFound", "no-such-model"),
            ("analyticsmodels", "tampered"): ("ArtifactDigestMismatch", "tampered-detector"),
            ("scenarios", "orphan"): ("FleetNotFound", "missing-fleet"),
        }
        for (plural, name), (reason, named) in expected.items():
            ready = wait_for(
                lambda p=plural, n=name: condition(get(federation, p, namespace, n)) or None,
                30,
                what=f"{plural}/{name} Ready condition",
            )
            assert (ready["status"], ready["reason"]) == ("False", reason), ready
            assert named in ready["message"]
        assert (
            condition(get(federation, "analyticsmodels", namespace, "tampered"), "Degraded")["status"]
            == "True"
        )
        before = {n: get(federation, p, namespace, n)["metadata"]["resourceVersion"] for p, n in expected}  # type: ignore[index]
        time.sleep(9)  # two resyncs: nothing is rewritten, nothing crashes
        after = {n: get(federation, p, namespace, n)["metadata"]["resourceVersion"] for p, n in expected}  # type: ignore[index]
        assert before == after
        assert operator.alive

        # Fixing the reference recovers without a restart.
        apply(
            federation,
            namespace,
            json.dumps(
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "SensorFleet",
                    "metadata": {"name": "missing-fleet"},
                    "spec": {
                        "sensorType": "water-level-gauge-underpass",
                        "district": "huangpu",
                        "count": 3,
                        "owner": "government",
                    },
                }
            ),
        )
        wait_for(
            lambda: (
                condition(get(federation, "scenarios", namespace, "orphan")).get("reason") != "FleetNotFound"
            ),
            20,
            what="the scenario past FleetNotFound",
        )


def _status_of(call: Callable[[], Any]) -> int:
    """The HTTP status the API server answered ``call`` with (200 for any success)."""
    try:
        call()
    except client.ApiException as exc:
        return int(exc.status)
    return 200


def _secrets_requested(audit_log: Path, username: str) -> set[str]:
    """Names of the Secrets ``username`` asked the API server for, as the audit log recorded them."""
    names = set()
    with audit_log.open("rb") as fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                ref = entry.get("objectRef") or {}
                if entry.get("user", {}).get("username") == username and ref.get("resource") == "secrets":
                    names.add(str(ref.get("name")))
    return names


@pytest.mark.timeout(150)
def test_each_identity_is_refused_what_it_does_not_need(
    federation: Any, city_cluster: Any, namespace: str, wait_for: Any, tmp_path: Path
) -> None:
    """The attacks of the security review, tried with the real identities' own tokens: a fleet's
    stream worker (internet-facing) touching anything on the API server (it holds no right at all,
    and its pods get no token), the operator reading a Secret no alert route may name or a fleet's
    broker credential it made. The API server answers 403 to each; what the identities are for
    still works, and a route naming another Secret is refused by name."""
    allowed = ("duty-webhook",)
    kubeconfig, operator_user = operator_kubeconfig(federation, namespace, tmp_path, "local", allowed)
    admin = client.CoreV1Api(federation.api_client(CITY))
    for secret in ("duty-webhook", "water-billing-db"):
        admin.create_namespaced_secret(namespace, {"metadata": {"name": secret},
                                                   "data": {"key": base64.b64encode(b"not-shown").decode()}})
    admin.create_namespaced_config_map(namespace, {"metadata": {"name": "street-lights"},
                                                   "data": {"mode": "auto"}})
    fleets = [d for d in yaml.safe_load_all(sample("sensorfleets.yaml"))
              if d["metadata"]["name"] in ("pudong-pressure", "pudong-flow")]
    scenario = yaml.safe_load(sample("scenario-water-burst.yaml"))
    scenario["spec"] |= {"models": [], "replicas": 0, "alertRoutes": [
        {"name": "duty-desk", "url": "http://127.0.0.1:9/alerts", "minSeverity": "warning",
         "secretRef": {"name": "duty-webhook", "key": "key"}},
        {"name": "billing-export", "url": "http://127.0.0.1:9/collect", "minSeverity": "warning",
         "secretRef": {"name": "water-billing-db", "key": "key"}},
    ]}
    incident = yaml.safe_load(sample("incident-water-burst.yaml"))
    incident["spec"]["scenarioRef"]["name"] = scenario["metadata"]["name"]
    rbac_admin = client.RbacAuthorizationV1Api(federation.api_client(CITY))

    with running_operator(kubeconfig, "hub", (namespace,), "local", alert_secrets=allowed,
                          broker=city_broker(city_cluster, namespace)):
        apply(federation, namespace, "---\n".join(yaml.safe_dump(d) for d in [*fleets, scenario]))
        for fleet in fleets:
            name = fleet["metadata"]["name"]
            made = wait_for(lambda n=name: deployment(federation, namespace, f"{n}-ingest"), 30,
                            what=f"{name}'s ingest Deployment, after its account and credentials")
            assert made.spec.template.spec.automount_service_account_token is False
            assert not [b for b in rbac_admin.list_namespaced_role_binding(namespace).items
                        if b.metadata.name.startswith(name)], "a fleet's worker is bound to nothing"
        def routes_accepted() -> dict[str, Any]:
            return condition(get(federation, "scenarios", namespace, scenario["metadata"]["name"]),
                             "AlertRoutesAccepted")

        refused = wait_for(lambda: routes_accepted().get("status") == "False" and routes_accepted(), 30,
                           what="the route naming another Secret refused")
        for named in ("billing-export", "water-billing-db", "alerts.secretNames"):
            assert named in refused["message"], refused
        assert "duty-desk" not in refused["message"], refused
        # An Incident's alert is not sent on that route, and the operator never asks for the Secret.
        apply(federation, namespace, yaml.safe_dump(incident))
        incident_name = incident["metadata"]["name"]
        notified = wait_for(
            lambda: condition(get(federation, "incidents", namespace, incident_name), "Notified") or None,
            30, what="the Incident's Notified condition")
        assert notified["status"] == "False"
        assert "billing-export" in notified["message"]
        assert "water-billing-db" not in _secrets_requested(city_cluster.audit_log, operator_user)

    admin_target = KubeTarget(federation.kubeconfig, CITY)

    def as_account(name: str) -> client.ApiClient:
        target = service_account_target(admin_target, namespace, name, tmp_path / name)
        return client.ApiClient(target.client_configuration())

    # Even with a token requested for it (its pods get none), the worker's account can do nothing.
    worker = client.CoreV1Api(as_account("pudong-pressure-ingest"))
    attacks = {
        "patch a ConfigMap": lambda: worker.patch_namespaced_config_map(
            "street-lights", namespace, {"data": {"mode": "off"}}),
        "create a ConfigMap": lambda: worker.create_namespaced_config_map(
            namespace, {"metadata": {"name": "decoy"}}),
        "read its own broker credential": lambda: worker.read_namespaced_secret(
            "pudong-pressure-ingest-broker", namespace),
        "read another fleet's": lambda: worker.read_namespaced_secret("pudong-flow-ingest-broker", namespace),
        "read a Secret": lambda: worker.read_namespaced_secret("duty-webhook", namespace),
        "write its fleet's status": lambda: client.CustomObjectsApi(
            worker.api_client).patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "sensorfleets", "pudong-pressure", {"status": {"terminalsOnline": 1}}),
        "make itself a Role": lambda: client.RbacAuthorizationV1Api(worker.api_client).create_namespaced_role(
            namespace, {"metadata": {"name": "mine"},
                        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["patch"]}]}),
    }
    answers = {what: _status_of(call) for what, call in attacks.items()}
    assert answers == dict.fromkeys(attacks, 403), answers
    assert admin.read_namespaced_config_map("street-lights", namespace).data == {"mode": "auto"}

    operator = client.ApiClient(KubeTarget(kubeconfig, "hub").client_configuration())
    core = client.CoreV1Api(operator)
    assert _status_of(lambda: core.read_namespaced_secret("duty-webhook", namespace)) == 200, "a listed key"
    attacks = {
        "read a Secret no route may name": lambda: core.read_namespaced_secret("water-billing-db", namespace),
        "list Secrets": lambda: core.list_namespaced_secret(namespace),
        # It creates fleets' broker credentials; it never reads one back (they derive from its key).
        "read a fleet's broker credential": lambda: core.read_namespaced_secret(
            "pudong-pressure-mqtt", namespace),
        "overwrite a fleet's broker credential": lambda: core.patch_namespaced_secret(
            "pudong-pressure-mqtt", namespace, {"stringData": {"password": "chosen"}}),
        # What it may grant is what it holds: no Role that reads Secrets it cannot.
        "grant itself more": lambda: client.RbacAuthorizationV1Api(operator).create_namespaced_role(
            namespace, {"metadata": {"name": "wider"}, "rules": [
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}]}),
    }
    answers = {what: _status_of(call) for what, call in attacks.items()}
    assert answers == dict.fromkeys(attacks, 403), answers


@pytest.fixture
def ray_operator(city_cluster: Any, namespace: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """KubeRay's ray-operator v1.4.0 watching the test's namespace on the city cluster."""
    log = (tmp_path / "ray-operator.log").open("wb")
    proc = subprocess.Popen(
        [
            str(toolchain.binary("ray-operator")),
            "-kubeconfig",
            str(city_cluster.kubeconfig),
            "-watch-namespace",
            namespace,
            "-enable-leader-election=false",
            "-metrics-addr",
            f"127.0.0.1:{free_port()}",
            "-health-probe-bind-address",
            f"127.0.0.1:{free_port()}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.timeout(120)
def test_kuberay_workload_survives_an_operator_restart_without_duplicates(
    federation: Any, city_cluster: Any, namespace: str, wait_for: Any, ray_operator: Any, tmp_path: Path
) -> None:
    kubeconfig, _ = operator_kubeconfig(federation, namespace, tmp_path, "kuberay")
    broker = city_broker(city_cluster, namespace)
    # The account the Ray pods run as comes with the city chart, not from the operator.
    client.CoreV1Api(federation.api_client(CITY)).create_namespaced_service_account(
        namespace, {"metadata": {"name": "citynerve-analytics"}}
    )
    objects = custom(federation)
    scenario = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Scenario",
        "metadata": {"name": "huangpu-flood"},
        "spec": {
            "kind": "urban-flood",
            "fleets": [{"name": "underpass-water-level"}, {"name": "rain-gauges"}],
            "thresholds": [{"metric": "waterLevelMm", "unitCode": "MMT", "warning": 150, "alarm": 270}],
            "replicas": 2,
        },
    }
    fleets = [
        d
        for d in yaml.safe_load_all(sample("sensorfleets.yaml"))
        if d["metadata"]["name"] in ("underpass-water-level", "rain-gauges")
    ]

    def rayjobs() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = objects.list_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayjobs"
        )["items"]
        return [j for j in items if not j["metadata"].get("deletionTimestamp")]

    # Killed mid-reconcile: stopped as soon as its first child write lands.
    with running_operator(kubeconfig, "hub", (namespace,), "kuberay", broker=broker):
        apply(federation, namespace, "---\n".join(yaml.safe_dump(d) for d in [*fleets, scenario]))
        wait_for(
            lambda: rayjobs() or deployment(federation, namespace, "rain-gauges-ingest"),
            20,
            what="a first child",
        )
    with running_operator(kubeconfig, "hub", (namespace,), "kuberay", broker=broker):
        status = wait_for(
            lambda: (
                (get(federation, "scenarios", namespace, "huangpu-flood") or {})
                .get("status", {})
                .get("workload")
            ),
            30,
            what="the scenario's workload in status",
        )
        assert status["kind"] == "RayJob"
        wait_for(lambda: len(rayjobs()) == 1, 10, what="exactly one RayJob")
        job = rayjobs()[0]
        assert job["metadata"]["name"] == status["name"]
        assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2
        # Its scoring identity on the broker: a Secret owned by the Scenario, named by reference
        # in the RayJob's containers; the password itself is nowhere in the RayJob.
        owner = get(federation, "scenarios", namespace, "huangpu-flood")["metadata"]
        secret = client.CoreV1Api(federation.api_client(CITY)).read_namespaced_secret(
            scoring_secret_name("huangpu-flood"), namespace)
        assert [(r.kind, r.uid) for r in secret.metadata.owner_references] == [("Scenario", owner["uid"])]
        password = derive_password(city_cluster.broker_key_file.read_bytes().strip(), "scoring", owner["uid"])
        assert {k: base64.b64decode(v).decode() for k, v in secret.data.items()} == {
            "username": names.scoring_identity(owner["uid"]), "password": password}
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in head["env"]}
        assert env[ENV_BROKER_URL]["value"] == broker.url
        assert env[ENV_BROKER_PASSWORD]["valueFrom"]["secretKeyRef"] == {
            "name": secret.metadata.name, "key": "password"}
        assert password not in json.dumps(job)
        # KubeRay makes the Ray cluster (and its pods) for the RayJob.
        clusters = wait_for(
            lambda: objects.list_namespaced_custom_object("ray.io", "v1", namespace, "rayclusters")["items"],
            30,
            what="the RayCluster KubeRay creates",
        )
        assert clusters[0]["metadata"]["ownerReferences"][0]["name"] == job["metadata"]["name"]
        core = client.CoreV1Api(federation.api_client(CITY))
        wait_for(
            lambda: core.list_namespaced_pod(namespace, label_selector="ray.io/node-type=head").items,
            30,
            what="the Ray head pod",
        )
        for name in ("underpass-water-level-ingest", "rain-gauges-ingest"):
            # Fleets are reconciled beside the Scenario, not before it: the head pod may come first.
            wait_for(lambda n=name: deployment(federation, namespace, n), 30, what=f"Deployment {name}")
        assert (
            len(client.AppsV1Api(federation.api_client(CITY)).list_namespaced_deployment(namespace).items)
            == 2
        )

        # A spec change reaches the workload: a new revision replaces the RayJob.
        objects.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, "scenarios", "huangpu-flood", {"spec": {"replicas": 3}}
        )
        wait_for(
            lambda: (
                [j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] for j in rayjobs()] == [3]
            ),
            30,
            what="one RayJob with 3 workers",
        )
        ready = wait_for(
            lambda: condition(get(federation, "scenarios", namespace, "huangpu-flood")) or None,
            10,
            what="Ready condition",
        )
        assert ready["reason"] in ("WorkloadPending", "WorkloadRunning"), ready


def start_city_operator(
    kubeconfig: Path, namespace: str, log: Path, broker: BrokerOptions
) -> subprocess.Popen[bytes]:
    """``citynerve operator city`` as its own process, the way the city chart runs it."""
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [
                str(Path(sys.executable).with_name("citynerve")),
                "operator",
                "city",
                "--kubeconfig",
                str(kubeconfig),
                "--context",
                "hub",
                "--namespace",
                namespace,
                "--city",
                CITY,
                "--workload-mode",
                "kuberay",
                "--resync-seconds",
                "4",
                "--broker-url",
                broker.url,
                "--broker-key-file",
                str(broker.key_file),
                "--broker-namespace",
                namespace,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def kill_at_first_write(proc: subprocess.Popen[bytes], audit: AuditLog) -> threading.Thread:
    """SIGKILL ``proc`` the moment the audit log shows a write of ``audit.username`` succeed.

    A thread tailing the file reacts within milliseconds, while the rest of the burst of writes
    the first one belongs to is still to come.
    """

    def succeeded_write(line: bytes) -> bool:
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            return bool(
                entry.get("user", {}).get("username") == audit.username
                and entry.get("stage") == "ResponseComplete"
                and entry.get("verb") in WRITE_VERBS
                and entry.get("responseStatus", {}).get("code", 500) < 300
                # the broker's users, written at start before any fleet: not a reconcile's write
                and (entry.get("objectRef") or {}).get("name") != "citynerve-broker-auth"
            )
        return False

    def tail() -> None:
        with audit.path.open("rb") as fh:
            fh.seek(audit.offset)
            pending = b""
            while proc.poll() is None:
                *lines, pending = (pending + fh.read()).split(b"\n")
                if any(succeeded_write(line) for line in lines):
                    proc.kill()
                    return
                time.sleep(0.001)

    thread = threading.Thread(target=tail, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(240)
def test_kuberay_workload_survives_a_sigkill_mid_reconcile(
    federation: Any, city_cluster: Any, namespace: str, wait_for: Any, ray_operator: Any, tmp_path: Path
) -> None:
    kubeconfig, user = operator_kubeconfig(federation, namespace, tmp_path, "kuberay")
    audit = AuditLog(city_cluster.audit_log, user)
    api = federation.api_client(CITY)
    core, apps, objects = client.CoreV1Api(api), client.AppsV1Api(api), custom(federation)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "citynerve-analytics"}})
    fleets = [
        d
        for d in yaml.safe_load_all(sample("sensorfleets.yaml"))
        if d["metadata"]["name"] in ("underpass-water-level", "rain-gauges")
    ]
    scenario = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Scenario",
        "metadata": {"name": "huangpu-flood"},
        "spec": {
            "kind": "urban-flood",
            "fleets": [{"name": f["metadata"]["name"]} for f in fleets],
            "thresholds": [{"metric": "waterLevelMm", "unitCode": "MMT", "warning": 150, "alarm": 270}],
        },
    }

    def rayjobs() -> list[dict[str, Any]]:  # terminating ones included: a replaced RayJob is churn
        items: list[dict[str, Any]] = objects.list_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayjobs"
        )["items"]
        return items

    def children() -> list[str]:
        deployments = apps.list_namespaced_deployment(namespace).items
        return sorted(
            [f"Deployment/{d.metadata.name}" for d in deployments]
            + [f"RayJob/{j['metadata']['name']}" for j in rayjobs()]
            + fleet_children(federation, namespace)
        )

    def scenario_status() -> dict[str, Any]:
        status: dict[str, Any] = (get(federation, "scenarios", namespace, "huangpu-flood") or {}).get(
            "status"
        ) or {}
        return status

    log = tmp_path / "operator.log"
    audit.mark()
    first = start_city_operator(kubeconfig, namespace, log, city_broker(city_cluster, namespace))
    second: subprocess.Popen[bytes] | None = None
    try:
        killer = kill_at_first_write(first, audit)
        apply(federation, namespace, "---\n".join(yaml.safe_dump(d) for d in [*fleets, scenario]))
        killer.join(60)
        assert not killer.is_alive(), "the operator wrote nothing within 60 s"
        assert first.wait(10) == -signal.SIGKILL, log.read_text()[-3000:]
        time.sleep(1)  # a request in flight when it died lands or is aborted by the API server
        at_kill, first_writes, jobs_at_kill = children(), audit.writes(), rayjobs()
        with log.open("a") as out:
            out.write(f"\n--- SIGKILL; children then: {at_kill}; its writes: {first_writes} ---\n")
        # Mid-reconcile: a child landed, but the scenario's reconcile never recorded its workload.
        # Seen at the kill: some of the fleets' children (account, credentials, Deployment: made in
        # that order), with or without the RayJob, never the scenario's status
        # (the full burst is each fleet's creates, the RayJob's and the status patches).
        assert at_kill, first_writes
        assert "workload" not in scenario_status(), first_writes

        audit.mark()
        second = start_city_operator(kubeconfig, namespace, log, city_broker(city_cluster, namespace))
        workload = wait_for(lambda: scenario_status().get("workload"), 60, what="the workload in status")
        expected = sorted(
            [
                *(f"Deployment/{f['metadata']['name']}-ingest" for f in fleets),
                *(c for f in fleets for c in fleet_identity_children(f)),
                f"RayJob/{workload['name']}",
                f"Secret/{scoring_secret_name('huangpu-flood')}",  # its broker identity
            ]
        )
        wait_for(lambda: children() == expected, 30, what=f"exactly {expected}")
        time.sleep(9)  # two resyncs: nothing is duplicated late either
        assert children() == expected
        second_writes = audit.writes()
        assert not any(w.startswith("delete") for w in second_writes), second_writes
        if jobs_at_kill:  # the RayJob the killed process made is adopted, not replaced
            assert rayjobs()[0]["metadata"]["uid"] == jobs_at_kill[0]["metadata"]["uid"]
        for fleet in fleets:
            name = fleet["metadata"]["name"]
            owner = deployment(federation, namespace, f"{name}-ingest").metadata.owner_references[0]
            assert (owner.kind, owner.name, owner.controller) == ("SensorFleet", name, True)
        # Events say when Ready flips; a restart re-reads status and has nothing to repeat.
        events = [
            (e.involved_object.kind, e.involved_object.name, e.reason)
            for e in core.list_namespaced_event(namespace).items
            if e.source and e.source.component == MANAGED_BY
        ]
        assert len(events) == len(set(events)), events
        for obj in (
            get(federation, "scenarios", namespace, "huangpu-flood"),
            *(get(federation, "sensorfleets", namespace, f["metadata"]["name"]) for f in fleets),
        ):
            assert obj is not None
            leftovers = [
                k for k in obj["metadata"].get("annotations") or {} if "kopf" in k or "citynerve" in k
            ]
            assert (obj["metadata"].get("finalizers"), leftovers) == (None, []), obj["metadata"]
        assert second.poll() is None, "the second operator process died"

        objects.delete_namespaced_custom_object(GROUP, VERSION, namespace, "scenarios", "huangpu-flood")
        wait_for(
            lambda: get(federation, "scenarios", namespace, "huangpu-flood") is None,
            10,
            what="the scenario deleted at once",
        )
        wait_for(lambda: not rayjobs(), 60, what="its RayJob gone")
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.mark.timeout(30)
def test_kuberay_crds_are_where_the_tests_expect() -> None:
    if shutil.which("go") is None:
        pytest.skip("go is not on PATH")
    assert (_kuberay_crds() / "ray.io_rayjobs.yaml").exists()
