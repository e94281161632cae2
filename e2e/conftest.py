"""Fixtures for the end-to-end tier: a real local federation, shared by the whole session.

- ``federation``: hub + shanghai + chengdu control planes, started once per session in a
  temporary folder and stopped at the end; the session fails if any process survives.
- ``namespace``: a fresh namespace in every cluster for one test, deleted afterwards.
- ``wait_for``: poll a predicate until it holds, failing with what was awaited.
- A failing e2e test gets the log lines each component wrote during that test attached.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from citynerve.operators.localfed import toolchain
from citynerve.operators.localfed.cluster import COMPONENTS, LocalCluster
from citynerve.operators.localfed.federation import LocalFederation
from kubernetes import client, config


def _interrupt_on_sigterm() -> None:
    """A SIGTERM (a CI time limit, ``timeout``) ends the run like Ctrl-C, so the session's
    fixtures stop every control plane, MLflow server and Ray process they started."""

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def pytest_configure(config: pytest.Config) -> None:
    del config
    _interrupt_on_sigterm()


class Federation:
    """What a test sees of the local federation."""

    def __init__(self, local: LocalFederation) -> None:
        self.local = local
        self._clients: dict[str, client.ApiClient] = {}

    @property
    def kubeconfig(self) -> Path:
        return self.local.kubeconfig

    @property
    def names(self) -> tuple[str, ...]:
        return self.local.names

    @property
    def cities(self) -> tuple[str, ...]:
        return self.local.cities

    def cluster(self, name: str) -> LocalCluster:
        return self.local.cluster(name)

    def kubectl(self, cluster: str, *args: str, input: str | None = None,
                check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against one cluster; raise with its stderr if ``check``."""
        cmd = [str(toolchain.binary("kubectl")), "--kubeconfig", str(self.kubeconfig),
               "--context", self.cluster(cluster).name, *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            msg = f"kubectl {' '.join(args)} on {cluster} failed: {proc.stderr.strip()}"
            raise AssertionError(msg)
        return proc

    def api_client(self, cluster: str) -> client.ApiClient:
        if cluster not in self._clients:
            self._clients[cluster] = config.new_client_from_config(
                str(self.kubeconfig), context=self.cluster(cluster).name)
        return self._clients[cluster]


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    local = LocalFederation(tmp_path_factory.mktemp("federation"))
    try:
        local.up()
        yield Federation(local)
    finally:
        local.down()
        survivors = [pid for pid in local.pids() if Path(f"/proc/{pid}").exists()]
        assert not survivors, f"control-plane processes survived the session: {survivors}"


@pytest.fixture
def namespace(federation: Federation) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    for cluster in federation.names:
        client.CoreV1Api(federation.api_client(cluster)).create_namespace(
            {"metadata": {"name": name, "labels": {"citynerve.io/test": "true"}}})
    # Pods are refused until the controller-manager has made the namespace's default
    # ServiceAccount, and the ReplicaSet controller then backs off for a long time. After a
    # test stopped an API server, the controller-manager's watches come back only after
    # client-go's relist backoff (up to 30 s), hence the generous wait.
    for cluster in federation.names:
        core = client.CoreV1Api(federation.api_client(cluster))
        _wait_for(lambda c=core: _has_default_service_account(c, name), 90,
                  what=f"ServiceAccount default in {name} on {cluster}")
    yield name
    for cluster in federation.names:
        api = client.CoreV1Api(federation.api_client(cluster))
        try:
            api.delete_namespace(name)
        except client.ApiException as exc:
            if exc.status != 404:
                raise


def _has_default_service_account(core: client.CoreV1Api, namespace: str) -> bool:
    try:
        core.read_namespaced_service_account("default", namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


# -- component logs for failing tests -----------------------------------------------------
_LOG_OFFSETS = pytest.StashKey[dict[Path, int]]()


def _component_logs(item: pytest.Item) -> list[Path]:
    local: LocalFederation | None = getattr(item.session, "_citynerve_federation", None)
    if local is None:
        return []
    return [c.log_file(comp) for c in local.clusters.values() for comp in COMPONENTS]


@pytest.fixture(autouse=True)
def _remember_federation(request: pytest.FixtureRequest) -> None:
    if "federation" in request.fixturenames:
        fed: Federation = request.getfixturevalue("federation")
        request.session._citynerve_federation = fed.local  # type: ignore[attr-defined]
        request.node.stash[_LOG_OFFSETS] = {
            p: p.stat().st_size for p in _component_logs(request.node) if p.exists()}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and _LOG_OFFSETS in item.stash:
        offsets = item.stash[_LOG_OFFSETS]
        for path in _component_logs(item):
            if not path.exists():
                continue
            with path.open("rb") as fh:
                fh.seek(offsets.get(path, 0))
                text = fh.read()[-6000:].decode(errors="replace")
            if text.strip():
                report.sections.append((f"log {path.parent.parent.name}/{path.stem}", text))
    return report


def _wait_for(predicate: Any, timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    msg = f"timed out after {timeout:.0f} s waiting for {what} (last value: {last!r})"
    raise AssertionError(msg)


@pytest.fixture
def wait_for() -> Any:
    """``wait_for(predicate, timeout, what=...)``: poll until truthy, else fail naming ``what``."""
    return _wait_for


# -- city operator: MLflow and Ray, once per session ----------------------------------------
@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real ``mlflow server`` (SQLite store, served artifacts, MLflow's basic-auth app) for the
    session; ``.url``, ``.root``, ``.identity(name)``. The test process acts as the trainer (the
    embedded operators in it too); a city's read identity is ``server.identity(CITY_IDENTITY)``."""
    import os  # noqa: PLC0415

    from citynerve.models.registry import TRAINER_IDENTITY  # noqa: PLC0415
    from citynerve.operators.localfed.mlflow_server import LocalMlflow  # noqa: PLC0415

    server = LocalMlflow(tmp_path_factory.mktemp("mlflow"))
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    server.start()
    server.use_identity(TRAINER_IDENTITY)
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """A local Ray cluster for the session (2 CPUs, no dashboard); operators in this process share it."""
    import ray  # noqa: PLC0415

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, namespace="citynerve", log_to_driver=False)
        _interrupt_on_sigterm()  # ray.init made SIGTERM exit at once, skipping every teardown
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True, scope="module")
def _stop_detached_ray_actors() -> Iterator[None]:
    """Scenario drills run as detached Ray actors; a module's leftovers must not starve the next
    module's control planes (kwok's node heartbeats lapse on a saturated 2-core machine)."""
    yield
    import sys  # noqa: PLC0415

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    for entry in ray.util.list_named_actors(all_namespaces=True):
        try:
            ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]))
        except ValueError:  # already gone
            continue
