"""How every CityNerve operator runs: its own Kopf registry, login and settings.

The hub operator and each city's operator are built the same way, so several can run in
one process (the embedded default runs the hub and two cities side by side) or one per
process (``citynerve operator hub|city``). Each gets:

- a fresh ``kopf.OperatorRegistry`` its handlers are registered into (no module-level
  handlers, so two cities in one process never share one);
- a login from a kubeconfig and context, found as kubectl finds them (or the in-cluster account);
- every Kopf setting in one startup handler (STYLE.md).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
import yaml
from kubernetes import client
from kubernetes import config as kube_config
from kubernetes.client import Configuration

ANNOTATION_PREFIX = "citynerve.io"
# The port of an operator process's health endpoint (the charts' probes); unset: none is served.
ENV_HEALTH_PORT = "CITYNERVE_HEALTH_PORT"
HEALTH_PATH = "/healthz"
log = logging.getLogger(__name__)


ENV_KUBECONFIG = "KUBECONFIG"  # kubectl's: a list of kubeconfig files, separated by os.pathsep
DEFAULT_KUBECONFIG = Path("~/.kube/config")  # kubectl's default file
# Set by the kubelet in every pod: what makes the in-cluster service account usable.
ENV_IN_CLUSTER = ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT")


class KubeconfigError(Exception):
    """No cluster to talk to: no kubeconfig, or no such context. The message is one line that says
    what to set; commands print it without a traceback (exit status 2)."""


@dataclass(frozen=True)
class KubeTarget:
    """Which API server to talk to, chosen as kubectl chooses it.

    The kubeconfig: ``kubeconfig`` if given, else every file in ``$KUBECONFIG`` (merged, the first
    to set a value wins), else ``~/.kube/config``; with none of them, the pod's in-cluster service
    account. The context: ``context`` if given, else the kubeconfig's current context.
    ``context_option`` is how a command lets its user choose the context (named in errors).
    """

    kubeconfig: Path | None = None
    context: str | None = None
    context_option: str = field(default="--context", compare=False)

    def kubeconfig_files(self) -> tuple[Path, ...]:
        """The kubeconfig files this target reads; empty: the in-cluster service account."""
        if self.kubeconfig is not None:
            path = self.kubeconfig.expanduser()
            if not path.is_file():
                msg = f"kubeconfig {path} does not exist; pass an existing file with --kubeconfig"
                raise KubeconfigError(msg)
            return (path,)
        listed = os.environ.get(ENV_KUBECONFIG)
        if listed is not None and listed.strip(os.pathsep):
            named = [Path(p).expanduser() for p in listed.split(os.pathsep) if p]
            found = tuple(dict.fromkeys(p for p in named if p.is_file()))
            if not found:
                msg = (f"{ENV_KUBECONFIG} names no kubeconfig file that exists ({listed}); set it to "
                       "existing files or pass --kubeconfig")
                raise KubeconfigError(msg)
            return found
        default = DEFAULT_KUBECONFIG.expanduser()
        if default.is_file():
            return (default,)
        if all(os.environ.get(name) for name in ENV_IN_CLUSTER):
            return ()
        msg = (f"no kubeconfig: pass --kubeconfig, set {ENV_KUBECONFIG}, or create {DEFAULT_KUBECONFIG} "
               "(this is not a pod with an in-cluster service account either)")
        raise KubeconfigError(msg)

    def context_name(self) -> str | None:
        """The context this target uses (checked to exist); None for the in-cluster service account."""
        files = self.kubeconfig_files()
        if not files:
            return None
        contexts: list[str] = []
        current = ""
        for path in files:
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as exc:
                msg = f"kubeconfig {path} cannot be read: {' '.join(str(exc).split())}"
                raise KubeconfigError(msg) from exc
            if not isinstance(loaded, dict):
                msg = f"kubeconfig {path} is not a kubeconfig (a mapping with clusters, users and contexts)"
                raise KubeconfigError(msg)
            contexts += [str(c.get("name")) for c in loaded.get("contexts") or [] if isinstance(c, dict)]
            current = current or str(loaded.get("current-context") or "")
        where = os.pathsep.join(map(str, files))
        choose = f"pass {self.context_option} with one of: {', '.join(dict.fromkeys(contexts)) or '(none)'}"
        if self.context is None and not current:
            msg = (f"kubeconfig {where} sets no current context; {choose} "
                   "(or run `kubectl config use-context NAME`)")
            raise KubeconfigError(msg)
        name = self.context or current
        if name not in contexts:
            given = f"{self.context_option} {name}" if self.context else f"the current context {name}"
            msg = f"{given} is not a context of kubeconfig {where}; {choose}"
            raise KubeconfigError(msg)
        return name

    def client_configuration(self) -> Configuration:
        """A Kubernetes client configuration for this target (also used by non-Kopf code)."""
        configuration = Configuration()
        files = self.kubeconfig_files()
        try:
            if not files:
                kube_config.load_incluster_config(client_configuration=configuration)
            else:
                kube_config.load_kube_config(config_file=os.pathsep.join(map(str, files)),
                                             context=self.context_name(), client_configuration=configuration)
        except kube_config.ConfigException as exc:
            where = os.pathsep.join(map(str, files)) or "the in-cluster service account"
            msg = f"cannot use {where}: {' '.join(str(exc).split())}"
            raise KubeconfigError(msg) from exc
        return configuration

    def connection_info(self) -> kopf.ConnectionInfo:
        cfg = self.client_configuration()
        token = None
        auth = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
        if auth:
            token = auth.removeprefix("Bearer ").strip()
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
            token=token,
            default_namespace=None,
        )


def token_kubeconfig(server: str, ca_pem: bytes, token: str, user: str, folder: Path) -> Path:
    """Write a kubeconfig that authenticates with a bearer token (a city's hub credential)."""
    ca_b64 = base64.b64encode(ca_pem).decode()
    text = (
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: hub\n  cluster:\n    server: {server}\n"
        f"    certificate-authority-data: {ca_b64}\n"
        f"users:\n- name: {user}\n  user:\n    token: {token}\n"
        f"contexts:\n- name: hub\n  context:\n    cluster: hub\n    user: {user}\n"
        "current-context: hub\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{user}.kubeconfig"
    path.write_text(text)
    path.chmod(0o600)
    return path


def service_account_target(admin: KubeTarget, namespace: str, name: str, folder: Path,
                           expiration_seconds: int = 3600) -> KubeTarget:
    """Act as ServiceAccount ``namespace/name``: a TokenRequest by ``admin``, then a token kubeconfig.

    How tests run an operator with exactly the permissions its chart grants it.
    """
    cfg = admin.client_configuration()
    token = client.CoreV1Api(client.ApiClient(cfg)).create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": expiration_seconds}}).status.token
    ca_pem = Path(cfg.ssl_ca_cert).read_bytes() if cfg.ssl_ca_cert else b""
    path = token_kubeconfig(cfg.host, ca_pem, token, f"{namespace}.{name}", folder)
    return KubeTarget(path, "hub")


@dataclass
class OperatorOptions:
    """The settings an operator is started with; one startup handler applies them."""

    name: str
    target: KubeTarget = field(default_factory=KubeTarget)
    namespaces: Collection[str] = ()  # empty: cluster-wide
    peering: str | None = None  # None: standalone (no peering objects needed)
    request_timeout: float = 30.0
    watch_server_timeout: int = 300
    max_workers: int = 20
    posting_level: int = logging.WARNING

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


def new_registry(options: OperatorOptions) -> kopf.OperatorRegistry:
    """A registry with the login and the one settings handler; callers add their handlers."""
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return options.target.connection_info()

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Progress and the last-handled spec live in annotations: the CRDs' structural
        # schemas would prune anything Kopf wrote into status.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=ANNOTATION_PREFIX, key="last-handled-configuration")
        settings.persistence.finalizer = f"{ANNOTATION_PREFIX}/finalizer"
        settings.posting.level = options.posting_level
        settings.watching.server_timeout = options.watch_server_timeout
        settings.watching.client_timeout = options.watch_server_timeout + 30
        settings.watching.connect_timeout = 10
        settings.networking.request_timeout = options.request_timeout
        settings.networking.connect_timeout = 10
        settings.execution.max_workers = options.max_workers
        settings.queueing.error_delays = [1, 2, 5, 10, 30]
        # A per-object worker leaves soon after its last event (the handlers are level-triggered:
        # nothing is lost by exiting early), so idle objects hold no task or queue. No
        # worker_limit: with indices, Kopf's first workers wait for every object to be indexed,
        # and the objects queued behind a limit never would be (a deadlock past the limit).
        settings.queueing.idle_timeout = 0.5
        # The initial listing in pages: one response of every object is one huge transient buffer.
        settings.watching.chunk_size = 500
        # A namespaced operator may hold only a Role: it must not try to list CRDs or namespaces.
        settings.scanning.disabled = not options.clusterwide
        if options.peering:
            settings.peering.name = options.peering
            settings.peering.mandatory = True
            settings.peering.clusterwide = options.clusterwide
        else:
            settings.peering.standalone = True

    return registry


class InProcessOperator:
    """Runs one operator on its own thread and event loop; ``stop`` ends it cleanly."""

    def __init__(self, options: OperatorOptions, registry: kopf.OperatorRegistry,
                 memo: object | None = None) -> None:
        self.options = options
        self.registry = registry
        self.memo = memo
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"operator-{options.name}", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(kopf.operator(
                registry=self.registry,
                clusterwide=self.options.clusterwide,
                namespaces=list(self.options.namespaces),
                standalone=self.options.peering is None,
                peering_name=self.options.peering,
                stop_flag=self._stop,
                ready_flag=self._ready,
                memo=self.memo,
            ))
        except BaseException as exc:
            self._error = exc
            log.exception("operator %s stopped with an error", self.options.name)

    def start(self, timeout: float = 30.0) -> InProcessOperator:
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            msg = f"operator {self.options.name} did not become ready within {timeout:.0f} s"
            raise RuntimeError(msg) from self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            msg = f"operator {self.options.name} did not stop within {timeout:.0f} s"
            raise RuntimeError(msg)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def liveness_endpoint() -> str | None:
    """Kopf's health endpoint, on every address at ``$CITYNERVE_HEALTH_PORT`` (None when unset).

    It answers from the operator's event loop, the one its watch loops run in: a stalled loop answers
    nothing, and a failed watch stops the operator (Kopf ends every root task with it), so the probe
    fails with it.
    """
    port = os.environ.get(ENV_HEALTH_PORT, "").strip()
    if not port:
        return None
    if not port.isdigit() or not 0 < int(port) < 65536:
        msg = f"{ENV_HEALTH_PORT}={port!r} is not a port number; set it to one between 1 and 65535"
        raise ValueError(msg)
    return f"http://0.0.0.0:{int(port)}{HEALTH_PATH}"


def run_until_signal(options: OperatorOptions, build: Callable[[OperatorOptions], kopf.OperatorRegistry],
                     memo: object | None = None) -> int:
    """The body of ``citynerve operator …``: run in the foreground until SIGINT/SIGTERM."""
    registry = build(options)
    asyncio.run(kopf.operator(
        registry=registry, clusterwide=options.clusterwide, namespaces=list(options.namespaces),
        standalone=options.peering is None, peering_name=options.peering, memo=memo,
        liveness_endpoint=liveness_endpoint(),
    ))
    return 0


def scratch_dir(prefix: str) -> Path:
    """A private temporary folder for credentials an operator writes for itself."""
    return Path(tempfile.mkdtemp(prefix=f"citynerve-{prefix}-"))
