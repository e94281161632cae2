"""A real MLflow tracking server for the local federation: its own process, a SQLite
backend store and a local artifact root that it serves (clients never touch the files).

It runs MLflow's ``basic-auth`` app as the hub chart does: every request but ``/health`` needs
credentials. The admin is the hub operator's identity (``citynerve-hub``); ``start`` makes the
trainer's and the cities' read identity too. Passwords are generated once, kept in
``identities.json`` (mode 0600) under the server's root, and handed to the server and to clients
through the environment only (MLflow's own variables), never on a command line or in a log.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citynerve.models.registry import CITY_IDENTITY, HUB_IDENTITY, TRAINER_IDENTITY, ensure_users
from citynerve.operators.localfed import process
from citynerve.operators.localfed.cluster import ClusterError, free_port
from citynerve.operators.localfed.process import ProcessTable

_ROLE = "mlflow"
# MLflow's auth app, as the hub chart configures it: every authenticated identity may read; writing
# needs ownership (what an identity created) or the admin.
_AUTH_CONFIG = """[mlflow]
default_permission = READ
database_uri = sqlite:///{database}
admin_username = {admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = 60
"""


@dataclass(frozen=True)
class MlflowIdentity:
    """A user of the MLflow server's auth app."""

    username: str
    password: str

    def env(self) -> dict[str, str]:
        """MLflow's own variables that make a client act as this identity."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}

    def __repr__(self) -> str:  # a password never reaches a log through a repr
        return f"MlflowIdentity({self.username!r})"


class LocalMlflow:
    """``mlflow server --app-name basic-auth`` on loopback; state (database, artifacts, log, port,
    identities) under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        state = self._read_state()
        self.port: int = int(state.get("port") or free_port())
        self.processes = ProcessTable(state.get("pids", {}))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.root / "mlflow.log"

    @property
    def pids(self) -> dict[str, int]:
        return self.processes.pids

    def _read_state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.root / "mlflow.json").read_text())
        except (OSError, ValueError):
            return {}
        return data

    def _write_state(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "mlflow.json").write_text(json.dumps({"port": self.port, "pids": self.pids}))

    # -- identities ---------------------------------------------------------------------------------
    def _passwords(self) -> dict[str, str]:
        """Username → password, generated once (0600 file)."""
        path = self.root / "identities.json"
        try:
            stored: dict[str, str] = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
        wanted = {name: stored.get(name) or secrets.token_urlsafe(24)
                  for name in (HUB_IDENTITY, TRAINER_IDENTITY, CITY_IDENTITY)}
        if wanted != stored:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(wanted, fh)
        return wanted

    def identity(self, username: str) -> MlflowIdentity:
        """One of ``HUB_IDENTITY`` (the admin), ``TRAINER_IDENTITY`` or ``CITY_IDENTITY``."""
        return MlflowIdentity(username, self._passwords()[username])

    def use_identity(self, username: str) -> MlflowIdentity:
        """Make this process's MLflow clients act as ``username`` (MLflow's own variables).

        One process holds one identity: the embedded federation (demo, tests) runs the hub, the
        cities and training in one process, so it acts as the trainer, which owns what it trains;
        a city's read identity is exercised by a client of its own (e2e/test_models_trust.py).
        """
        identity = self.identity(username)
        os.environ.update(identity.env())
        return identity

    # -- the server -----------------------------------------------------------------------------------
    def _args(self) -> list[str]:
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        return [
            mlflow, "server",
            "--app-name", "basic-auth",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]

    def _env(self) -> dict[str, str]:
        config = self.root / "basic_auth.ini"
        config.write_text(_AUTH_CONFIG.format(database=self.root / "basic_auth.db", admin=HUB_IDENTITY))
        secret_key = self.root / "flask-secret-key"
        if not secret_key.exists():
            fd = os.open(secret_key, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_urlsafe(32))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
        return {
            **env,
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            # Read only on the first start, when the auth app creates its admin.
            "MLFLOW_AUTH_ADMIN_PASSWORD": self._passwords()[HUB_IDENTITY],
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret_key.read_text(),
            # No GenAI job runner: nothing here uses it, and on a small machine its processes would
            # compete with the server for the CPU while it starts.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }

    def is_running(self) -> bool:
        return self.processes.is_running(_ROLE, self._args()[0])

    def start(self, timeout: float = 180.0) -> None:
        """Start the server (if it is not running), wait for it, and make its identities."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.is_running():
            self.processes.start(_ROLE, self._args(), self.log_file, self.root, env=self._env())
            self._write_state()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy() and self._answers(deadline - time.monotonic()):
                passwords = self._passwords()
                try:
                    ensure_users(
                        self.url,
                        {name: passwords[name] for name in (TRAINER_IDENTITY, CITY_IDENTITY)},
                        admin=(HUB_IDENTITY, passwords[HUB_IDENTITY]),
                    )
                except BaseException:
                    self.stop()
                    raise
                return
            if not self.is_running():
                msg = f"the MLflow server exited during start-up:\n{process.tail(self.log_file)}"
                raise ClusterError(msg)
            time.sleep(0.25)
        self.stop()  # a server that never answered is not left behind
        msg = f"the MLflow server did not answer within {timeout:.0f} s; see {self.log_file}"
        raise ClusterError(msg)

    def _answers(self, timeout: float) -> bool:
        """Whether the tracking API answers the admin (its first answer can take long on a busy machine;
        clients fail fast, so ``start`` waits for it)."""
        admin = self.identity(HUB_IDENTITY)
        request = urllib.request.Request(  # noqa: S310 - http on loopback
            self.url + "/api/2.0/mlflow/experiments/search?max_results=1")
        token = base64.b64encode(f"{admin.username}:{admin.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=max(timeout, 1.0)) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        self.processes.stop(_ROLE, self._args()[0])
        self._write_state()
