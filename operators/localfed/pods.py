"""What a kubelet would do for a local city's data plane, since kwok runs no containers.

The local federation's clusters schedule pods onto kwok nodes, which report them Running and
never start a process. For the data plane that is not enough: readings must really travel. So
the harness that hosts a city (the demo, the e2e tests) runs a ``LocalPods`` beside it:

* each fleet's stream-worker Deployment (the operator's, unchanged) runs as a local process —
  its container's own command and environment, its Secret volumes written to a private folder
  (0700), its PersistentVolumeClaims a folder each that outlives the process (``claim_dir``),
  and its ``--http-port`` moved to a free local port; a changed pod template restarts it,
  a dead process is restarted (as ``restartPolicy: Always`` would), a deleted Deployment stops it;
* Secret ``citynerve-broker-auth`` (the operator's rendering of the broker's users) is copied into
  the local broker's auth file, which its supervisor reloads — what the kubelet's refresh of the
  mounted Secret does in a cluster.

Development harness only: production code never imports it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citynerve.operators.city.config import LABEL_COMPONENT, LABEL_FLEET, LABEL_MANAGED_BY, MANAGED_BY
from citynerve.operators.city.rbac import BROKER_AUTH_SECRET
from citynerve.workloads.dataplane.broker import LocalBroker
from kubernetes import client

log = logging.getLogger(__name__)
AUTH_KEY = "auth.conf"
RESTART_BACKOFF_SECONDS = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class _Process:
    template_hash: str
    popen: subprocess.Popen[bytes]
    port: int
    folder: Path
    started: float
    restarts: int = 0


class LocalPods:
    """Runs a city's fleet stream workers as processes, and keeps its broker's users in line."""

    def __init__(self, api: client.ApiClient, namespaces: list[str], broker: LocalBroker,
                 broker_namespace: str, folder: Path, interval: float = 1.0) -> None:
        self.core, self.apps = client.CoreV1Api(api), client.AppsV1Api(api)
        self.namespaces, self.broker, self.broker_namespace = namespaces, broker, broker_namespace
        self.folder, self.interval = folder, interval
        self._processes: dict[tuple[str, str], _Process] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._auth: str | None = None
        self._thread = threading.Thread(target=self._loop, name="local-pods", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> LocalPods:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        with self._lock:
            for key in list(self._processes):
                self._end(key)

    # -- what tests and the demo ask -----------------------------------------------------------
    def url(self, namespace: str, fleet: str) -> str | None:
        """The NGSI-LD batch endpoint of a fleet's worker, once it runs."""
        with self._lock:
            process = self._processes.get((namespace, fleet))
        return None if process is None else f"http://127.0.0.1:{process.port}"

    def pid(self, namespace: str, fleet: str) -> int | None:
        with self._lock:
            process = self._processes.get((namespace, fleet))
        return None if process is None or process.popen.poll() is not None else process.popen.pid

    def kill(self, namespace: str, fleet: str) -> None:
        """SIGKILL a fleet's worker, as a node failure would; it is started again like a pod."""
        pid = self.pid(namespace, fleet)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The folder standing for a PersistentVolumeClaim: kept across the worker's restarts."""
        return self.folder / "claims" / namespace / claim

    def log_file(self, namespace: str, fleet: str) -> Path:
        """Where a fleet worker's output goes (kept across its restarts)."""
        return self.folder / f"{namespace}.{fleet}.log"

    def running(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return {k: p.popen.pid for k, p in self._processes.items() if p.popen.poll() is None}

    # -- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as exc:  # noqa: BLE001 - an API server restarting is retried, said once a pass
                log.warning("local pods: %s", str(exc).splitlines()[0] if str(exc) else repr(exc))
            self._stop.wait(self.interval)

    def sync(self) -> None:
        """One pass: the broker's users, then every fleet worker's process."""
        self._sync_auth()
        wanted: dict[tuple[str, str], dict[str, Any]] = {}
        selector = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_COMPONENT}=ingest"
        for namespace in self.namespaces:
            listed = self.apps.list_namespaced_deployment(namespace, label_selector=selector)
            for deployment in listed.items:
                body = self.apps.api_client.sanitize_for_serialization(deployment)
                fleet = body["metadata"]["labels"].get(LABEL_FLEET)
                if fleet and not body["metadata"].get("deletionTimestamp"):
                    wanted[(namespace, fleet)] = body
        with self._lock:
            for key in [k for k in self._processes if k not in wanted]:
                self._end(key)
            for key, body in wanted.items():
                self._ensure(key, body)

    def _sync_auth(self) -> None:
        try:
            secret = self.core.read_namespaced_secret(BROKER_AUTH_SECRET, self.broker_namespace)
        except client.ApiException as exc:
            if exc.status == 404:  # the operator writes it once every fleet is listed
                return
            raise
        text = base64.b64decode((secret.data or {}).get(AUTH_KEY, "")).decode()
        if text and text != self._auth:
            tmp = self.broker.auth_file.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.chmod(0o600)
            tmp.replace(self.broker.auth_file)  # the broker's supervisor reloads it
            self._auth = text

    def _ensure(self, key: tuple[str, str], deployment: dict[str, Any]) -> None:
        template = deployment["spec"]["template"]
        wanted_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:12]
        process = self._processes.get(key)
        if process is not None and process.template_hash != wanted_hash:
            self._end(key)
            process = None
        if process is not None and process.popen.poll() is not None:
            if time.monotonic() - process.started < RESTART_BACKOFF_SECONDS * (1 + min(process.restarts, 5)):
                return
            log.warning("the stream worker of %s/%s exited with %s; starting it again", *key,
                        process.popen.returncode)
            restarts = process.restarts + 1
            self._end(key)
            self._processes[key] = self._spawn(key, template, wanted_hash, restarts)
            return
        if process is None:
            self._processes[key] = self._spawn(key, template, wanted_hash, 0)

    def _spawn(self, key: tuple[str, str], template: dict[str, Any], template_hash: str,
               restarts: int) -> _Process:
        namespace, fleet = key
        pod = template["spec"]
        container = pod["containers"][0]
        folder = self.folder / namespace / fleet
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, mode=0o700)
        mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts") or []}
        paths: dict[str, str] = {}
        for volume in pod.get("volumes") or []:
            if "persistentVolumeClaim" in volume and volume["name"] in mounts:
                claim = self.claim_dir(namespace, volume["persistentVolumeClaim"]["claimName"])
                claim.mkdir(parents=True, exist_ok=True, mode=0o700)
                paths[mounts[volume["name"]]] = str(claim)
                continue
            if "secret" not in volume or volume["name"] not in mounts:
                continue
            secret = self.core.read_namespaced_secret(volume["secret"]["secretName"], namespace)
            target = folder / volume["name"]
            target.mkdir(mode=0o700)
            for name, encoded in (secret.data or {}).items():
                (target / name).write_bytes(base64.b64decode(encoded))
                (target / name).chmod(0o600)
            paths[mounts[volume["name"]]] = str(target)
        port = _free_port()
        args = [sys.executable if a == "python" else paths.get(a, a) for a in container["args"]]
        if "--http-port" in args:
            args[args.index("--http-port") + 1] = str(port)
        if "--http-address" in args:
            args[args.index("--http-address") + 1] = "127.0.0.1"
        env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}}
        with self.log_file(namespace, fleet).open("ab") as out:
            popen = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, cwd=folder)
        return _Process(template_hash, popen, port, folder, time.monotonic(), restarts)

    def _end(self, key: tuple[str, str]) -> None:
        process = self._processes.pop(key, None)
        if process is None or process.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.popen.pid, signal.SIGTERM)
        try:
            process.popen.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.popen.pid, signal.SIGKILL)
            process.popen.wait(5)
