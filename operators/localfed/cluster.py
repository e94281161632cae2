"""One real Kubernetes control plane on this machine: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok, each a process of its own; for a city,
also its broker (nats-server with JetStream and MQTT, started after the control plane).

The cluster's whole state (ports, certificates, etcd data, the broker's store, logs, the
processes' ids) lives in one folder, so another process (`citynerve dev status|down`) can
find and stop it.
"""

from __future__ import annotations

import json
import secrets
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from citynerve.operators.city.broker import Credentials
from citynerve.operators.localfed import process, toolchain
from citynerve.operators.localfed.pki import CLIENTS, ClusterPki, create_cluster_pki
from citynerve.operators.localfed.process import ProcessTable
from citynerve.workloads.dataplane.broker import LocalBroker

# A cluster here has no storage provisioner: a pool of pre-made volumes stands in (ensure_storage).
LOCAL_STORAGE_CLASS = "citynerve-local"
LOCAL_VOLUMES = 256
# Start order; a component only starts once the ones before it answer.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/16"

_AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  # Writes are what reconcile budgets are measured in.
  - level: Metadata
    verbs: ["create", "update", "patch", "delete", "deletecollection"]
  # Reads by the platform's own ServiceAccounts, so tests can check that each permission a
  # chart grants is used; the control plane's own controllers would drown them.
  - level: None
    userGroups: ["system:serviceaccounts:kube-system"]
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
    verbs: ["get", "list", "watch"]
  - level: None
"""


class ClusterError(RuntimeError):
    """A control-plane component did not start or answer; the message names which and why."""


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Ports:
    """The loopback ports of one cluster's components."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int

    @classmethod
    def allocate(cls) -> Ports:
        ports: list[int] = []
        while len(ports) < 6:
            port = free_port()
            if port not in ports:
                ports.append(port)
        return cls(*ports)


@dataclass(frozen=True)
class CityBroker:
    """A city's local broker and the key its operator derives every broker password from."""

    broker: LocalBroker
    key_file: Path


class LocalCluster:
    """A control plane whose state lives in ``root``; cheap to construct, ``start`` runs it.

    With ``with_broker`` (a city) it also runs a broker in ``root/broker``.
    """

    def __init__(self, name: str, root: Path, *, with_broker: bool = False) -> None:
        self.name = name
        self.root = root
        self.pki = ClusterPki(root / "pki")
        state = self._read_state()
        self.ports = Ports(**state["ports"]) if state else Ports.allocate()
        self.processes = ProcessTable(state.get("pids", {}) if state else {})
        self.broker = (LocalBroker(root / "broker", name, nats_server=toolchain.binary("nats-server"))
                       if with_broker else None)

    @property
    def pids(self) -> dict[str, int]:
        return self.processes.pids

    # -- state -------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.root / "cluster.json"

    def _read_state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data

    def _write_state(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        payload = {"name": self.name, "ports": asdict(self.ports), "pids": self.pids}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(self.state_file)

    # -- addresses and credentials ------------------------------------------------------
    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig; its only context is named after the cluster."""
        return self.root / "admin.kubeconfig"

    def log_file(self, component: str) -> Path:
        return self.root / "logs" / f"{component}.log"

    @property
    def audit_log(self) -> Path:
        return self.root / "logs" / "audit.log"

    def kubeconfig_entry(self, user: str = "admin") -> dict[str, Any]:
        """The cluster, user and context stanzas of a kubeconfig for ``user``."""
        return {
            "cluster": {"name": self.name, "cluster": {
                "server": self.api_url, "certificate-authority": str(self.pki.ca_cert)}},
            "user": {"name": f"{self.name}-{user}", "user": {
                "client-certificate": str(self.pki.client_cert(user)),
                "client-key": str(self.pki.client_key(user))}},
            "context": {"name": self.name, "context": {
                "cluster": self.name, "user": f"{self.name}-{user}"}},
        }

    def _write_kubeconfig(self, path: Path, user: str) -> None:
        entry = self.kubeconfig_entry(user)
        config = {
            "apiVersion": "v1", "kind": "Config", "current-context": self.name,
            "clusters": [entry["cluster"]], "users": [entry["user"]], "contexts": [entry["context"]],
        }
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)

    def _component_kubeconfig(self, user: str) -> Path:
        return self.root / f"{user}.kubeconfig"

    # -- processes ----------------------------------------------------------------------
    def _args(self, component: str) -> list[str]:
        p, pki, root = self.ports, self.pki, self.root
        if component == "etcd":
            peer = f"http://127.0.0.1:{p.etcd_peer}"
            client = f"http://127.0.0.1:{p.etcd_client}"
            return [
                str(toolchain.binary("etcd")), "--name", self.name, "--data-dir", str(root / "etcd"),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}",
                # A test cluster trades crash durability for speed; clean stops lose nothing.
                "--unsafe-no-fsync", "--log-level", "warn",
            ]
        if component == "kube-apiserver":
            return [
                str(toolchain.binary("kube-apiserver")),
                "--etcd-servers", f"http://127.0.0.1:{p.etcd_client}",
                "--secure-port", str(p.apiserver), "--bind-address", "127.0.0.1",
                "--advertise-address", "127.0.0.1",
                "--tls-cert-file", str(pki.serving_cert), "--tls-private-key-file", str(pki.serving_key),
                "--client-ca-file", str(pki.ca_cert),
                "--service-account-key-file", str(pki.sa_pub),
                "--service-account-signing-key-file", str(pki.sa_key),
                "--service-account-issuer", "https://kubernetes.default.svc",
                "--authorization-mode", "Node,RBAC",
                "--enable-bootstrap-token-auth",
                "--service-cluster-ip-range", SERVICE_CLUSTER_IP_RANGE,
                "--audit-policy-file", str(root / "audit-policy.yaml"),
                "--audit-log-path", str(self.audit_log), "--audit-log-maxsize", "200",
                "--cert-dir", str(root / "apiserver-certs"),
                "--profiling=false", "--v", "1",
            ]
        if component == "kube-controller-manager":
            kubeconfig = str(self._component_kubeconfig("controller-manager"))
            return [
                str(toolchain.binary("kube-controller-manager")),
                "--kubeconfig", kubeconfig, "--authentication-kubeconfig", kubeconfig,
                "--authorization-kubeconfig", kubeconfig,
                "--service-account-private-key-file", str(pki.sa_key),
                "--root-ca-file", str(pki.ca_cert),
                "--cluster-signing-cert-file", str(pki.ca_cert),
                "--cluster-signing-key-file", str(pki.ca_key),
                "--use-service-account-credentials", "--leader-elect=false",
                "--controllers", "*,bootstrapsigner,tokencleaner",
                "--secure-port", str(p.controller_manager), "--bind-address", "127.0.0.1",
                "--cert-dir", str(root / "kcm-certs"), "--v", "1",
            ]
        if component == "kube-scheduler":
            kubeconfig = str(self._component_kubeconfig("scheduler"))
            return [
                str(toolchain.binary("kube-scheduler")),
                "--kubeconfig", kubeconfig, "--authentication-kubeconfig", kubeconfig,
                "--authorization-kubeconfig", kubeconfig, "--leader-elect=false",
                "--secure-port", str(p.scheduler), "--bind-address", "127.0.0.1",
                "--cert-dir", str(root / "scheduler-certs"), "--v", "1",
            ]
        if component == "kwok":
            return [
                str(toolchain.binary("kwok")), "--kubeconfig", str(self.kubeconfig),
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                # Heartbeats through a node Lease, as a kubelet sends them. Without one, kwok
                # refreshes the Node's status only every ~55 s, past the controller-manager's
                # 50 s grace: the Node went NotReady for 5 s each minute, and with it every
                # Deployment's availability (fleets flapped Ready, operators wrote status).
                "--node-lease-duration-seconds", "40",
                "--server-address", f"127.0.0.1:{p.kwok}",
            ]
        msg = f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}"
        raise ValueError(msg)

    def is_running(self, component: str) -> bool:
        return self.processes.is_running(component, self._args(component)[0])

    def start_component(self, component: str) -> None:
        """Start one component (if it is not running) and wait until it answers."""
        if not self.is_running(component):
            self.processes.start(component, self._args(component), self.log_file(component), self.root)
            self._write_state()
        self._wait_healthy(component)

    def stop_component(self, component: str, timeout: float | None = None) -> None:
        """Stop one component: SIGTERM, then SIGKILL if it has not gone after ``timeout``.

        The API server holds its state in etcd only, so it gets little time to drain its
        watches; etcd gets time to close its database cleanly.
        """
        if timeout is None:
            timeout = 3.0 if component == "kube-apiserver" else 15.0
        self.processes.stop(component, self._args(component)[0], timeout)
        self._write_state()

    # -- health -------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(self.pki.client_cert("admin")), str(self.pki.client_key("admin")))
        return ctx

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                timeout: float = 5.0) -> Any:
        """One admin request to the API server; returns the decoded JSON body."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(  # noqa: S310 - the URL is our own loopback API server
            self.api_url + path, data=data, method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout, context=self._ssl_context()) as resp:  # noqa: S310
            raw = resp.read()
        return json.loads(raw) if raw and raw[:1] in b"{[" else raw.decode()

    def _probe(self, component: str) -> bool:
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE  # the components' own self-signed serving certs
        urls = {
            "etcd": (f"http://127.0.0.1:{self.ports.etcd_client}/health", None),
            "kube-controller-manager": (f"https://127.0.0.1:{self.ports.controller_manager}/healthz",
                                        insecure),
            "kube-scheduler": (f"https://127.0.0.1:{self.ports.scheduler}/healthz", insecure),
            "kwok": (f"http://127.0.0.1:{self.ports.kwok}/healthz", None),
        }
        try:
            if component == "kube-apiserver":
                return bool(self.request("GET", "/readyz", timeout=2) == "ok")
            url, ctx = urls[component]
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def _wait_healthy(self, component: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._probe(component):
                return
            if not self.is_running(component):
                tail = process.tail(self.log_file(component))
                msg = f"{self.name}: {component} exited during start-up; last log lines:\n{tail}"
                raise ClusterError(msg)
            time.sleep(0.1)
        msg = (f"{self.name}: {component} did not become healthy within {timeout:.0f} s; "
               f"see {self.log_file(component)}")
        raise ClusterError(msg)

    # -- whole cluster ------------------------------------------------------------------
    def prepare(self) -> None:
        """Write certificates, kubeconfigs and the audit policy (idempotent)."""
        self.root.mkdir(parents=True, exist_ok=True)
        create_cluster_pki(self.pki.root, self.name)
        (self.root / "audit-policy.yaml").write_text(_AUDIT_POLICY)
        self._write_kubeconfig(self.kubeconfig, "admin")
        for user in CLIENTS:
            if user != "admin":
                self._write_kubeconfig(self._component_kubeconfig(user), user)
        self._write_state()

    def start(self, components: Iterable[str] = COMPONENTS) -> None:
        components = tuple(components)
        self.prepare()
        for component in components:
            self.start_component(component)
        if "kwok" in components:
            self.ensure_node()
            self.ensure_storage()
        if components == COMPONENTS:
            self.start_broker()

    def stop(self) -> None:
        self.stop_broker()
        for component in reversed(COMPONENTS):
            self.stop_component(component)

    # -- the city's broker ----------------------------------------------------------------
    def _city_broker(self) -> LocalBroker:
        if self.broker is None:
            msg = f"{self.name} runs no broker (only cities do)"
            raise ClusterError(msg)
        return self.broker

    @property
    def broker_key_file(self) -> Path:
        """The key the city operator derives every broker password from (``--broker-key-file``):
        made once, kept 0600 beside the broker's store (in a cluster: Secret citynerve-broker-key)."""
        path = self._city_broker().folder / "key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.touch(mode=0o600)
            tmp.write_text(secrets.token_hex(32))
            tmp.replace(path)
        return path

    def city_broker(self) -> CityBroker:
        return CityBroker(self._city_broker(), self.broker_key_file)

    def start_broker(self) -> None:
        """Start the broker unless it runs; a broker started before keeps the users it was given since."""
        if self.broker is None or self.broker.is_running():
            return
        try:
            if self.broker.auth_file.exists():
                self.broker.restart()
            else:
                # The operator alone, until it writes every fleet's users (LocalPods copies them in).
                key = self.broker_key_file.read_bytes().strip()
                self.broker.start(Credentials(key, self.name).users({}))
        except (RuntimeError, TimeoutError) as exc:
            msg = f"{self.name}: the broker did not start: {exc}"
            raise ClusterError(msg) from exc

    def stop_broker(self) -> None:
        if self.broker is not None:
            self.broker.stop()

    def ensure_node(self, name: str = "kwok-node-0") -> None:
        """Register a kwok-managed Node (kwok then keeps it and its Pods Ready)."""
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {KWOK_NODE_ANNOTATION: "fake"},
                         "labels": {"type": "kwok", "kubernetes.io/hostname": name,
                                    "kubernetes.io/os": "linux"}},
            "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "pods": "250"},
                       "capacity": {"cpu": "32", "memory": "256Gi", "pods": "250"}},
        }
        try:
            self.request("POST", "/api/v1/nodes", node)
        except urllib.error.HTTPError as exc:
            if exc.code != 409:  # already registered on an earlier start
                raise

    def ensure_storage(self, volumes: int = LOCAL_VOLUMES) -> None:
        """A default StorageClass and a pool of pre-made volumes, as a cluster without a dynamic
        provisioner has them: claims (the broker's JetStream store, each fleet's history) bind to
        one each and their pods schedule. kwok runs no containers, so nothing is ever written to
        the volumes' paths; a released volume is not reused (the pool covers a test session)."""
        storage_class = {
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": LOCAL_STORAGE_CLASS,
                         "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate",
            "reclaimPolicy": "Retain",
        }
        try:
            self.request("POST", "/apis/storage.k8s.io/v1/storageclasses", storage_class)
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise
        listed = self.request("GET", "/api/v1/persistentvolumes")
        have = {item["metadata"]["name"] for item in listed.get("items", [])}
        for i in range(volumes):
            name = f"local-{i:03d}"
            if name in have:
                continue
            volume = {
                "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
                "spec": {"capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteOnce"],
                         "persistentVolumeReclaimPolicy": "Retain", "storageClassName": LOCAL_STORAGE_CLASS,
                         "hostPath": {"path": f"/var/lib/citynerve-local/{name}"}},
            }
            try:
                self.request("POST", "/api/v1/persistentvolumes", volume)
            except urllib.error.HTTPError as exc:
                if exc.code != 409:
                    raise

    def status(self) -> dict[str, Any]:
        """Name, API URL, server version, Ready nodes and the broker's ports (cities), for ``dev status``."""
        running = {c: self.is_running(c) for c in COMPONENTS}
        row: dict[str, Any] = {"name": self.name, "api": self.api_url, "version": "-",
                               "nodes_ready": "-", "components": running, "broker": "-"}
        if self.broker is not None:
            ports = self.broker.ports
            row["broker"] = {"running": self.broker.is_running(), "url": self.broker.url,
                             "mqtt": ports.mqtt, "monitor": ports.monitor}
        if not running["kube-apiserver"]:
            return row
        try:
            row["version"] = self.request("GET", "/version")["gitVersion"]
            nodes = self.request("GET", "/api/v1/nodes")["items"]
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            return row
        ready = sum(
            1 for n in nodes
            for c in n.get("status", {}).get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True"
        )
        row["nodes_ready"] = f"{ready}/{len(nodes)}"
        return row
