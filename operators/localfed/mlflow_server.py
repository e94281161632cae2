"""A real MLflow tracking server for the local federation: its own process, a SQLite
backend store and a local artifact root that it serves (clients never touch the files)."""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from citynerve.operators.localfed import process
from citynerve.operators.localfed.cluster import ClusterError, free_port
from citynerve.operators.localfed.process import ProcessTable

_ROLE = "mlflow"


class LocalMlflow:
    """``mlflow server`` on loopback; state (database, artifacts, log, port) under ``root``."""

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

    def _args(self) -> list[str]:
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
        return [
            mlflow, "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--serve-artifacts",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]

    def is_running(self) -> bool:
        return self.processes.is_running(_ROLE, self._args()[0])

    def start(self, timeout: float = 90.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.is_running():
            self.processes.start(_ROLE, self._args(), self.log_file, self.root)
            self._write_state()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if not self.is_running():
                msg = f"the MLflow server exited during start-up:\n{process.tail(self.log_file)}"
                raise ClusterError(msg)
            time.sleep(0.25)
        msg = f"the MLflow server did not answer within {timeout:.0f} s; see {self.log_file}"
        raise ClusterError(msg)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as resp:  # noqa: S310
                return bool(resp.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        self.processes.stop(_ROLE, self._args()[0])
        self._write_state()
