"""The ``citynerve`` command as a user meets it: its version, and the cluster it talks to.

Every command that talks to a cluster finds its kubeconfig and context as kubectl does
(``--kubeconfig``, else ``$KUBECONFIG``, else ``~/.kube/config``; ``--context``, else the current
context), through ``KubeTarget``. Here with real kubeconfig files and the installed command run as a
subprocess; e2e/test_charts.py runs it against the local federation's API servers.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from citynerve.operators import cli
from citynerve.operators.runtime import ENV_HEALTH_PORT, KubeconfigError, KubeTarget, liveness_endpoint

ROOT = Path(__file__).resolve().parents[1]
CITYNERVE = Path(sys.executable).parent / "citynerve"


def write_kubeconfig(path: Path, contexts: dict[str, str], current: str | None = None) -> Path:
    """A kubeconfig with one cluster per context (its server URL), token users, and ``current``."""
    config: dict[str, object] = {
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": n, "cluster": {"server": url}} for n, url in contexts.items()],
        "users": [{"name": n, "user": {"token": f"token-of-{n}"}} for n in contexts],
        "contexts": [{"name": n, "context": {"cluster": n, "user": n}} for n in contexts],
    }
    if current:
        config["current-context"] = current
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def no_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home with no ~/.kube/config, no $KUBECONFIG, and not in a pod."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        monkeypatch.delenv(name, raising=False)
    return home


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CITYNERVE), *args], capture_output=True, text=True, timeout=120, check=False,
                          env={"PATH": os.environ.get("PATH", ""), **env})


# -- --version -------------------------------------------------------------------------------------
def head() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True, timeout=30, check=True).stdout.strip()


@pytest.mark.timeout(120)
def test_version_names_the_package_version_and_the_checkout_commit() -> None:
    before = head()
    proc = run_cli("--version", env={"HOME": str(Path.home())})
    after = head()  # the commit is read when the command runs; another may land meanwhile
    assert proc.returncode == 0, proc.stderr
    version = importlib.metadata.version("citynerve")
    assert proc.stdout.strip() in {f"citynerve {version} (commit {c})" for c in (before, after)}


@pytest.mark.timeout(30)
def test_version_leaves_out_a_commit_it_cannot_know(tmp_path: Path) -> None:
    assert cli.installed_commit(tmp_path) is None  # an installed copy, not a checkout
    assert cli.version_text(tmp_path) == f"citynerve {importlib.metadata.version('citynerve')}"


# -- finding the kubeconfig and context ------------------------------------------------------------
@pytest.mark.timeout(30)
def test_kubeconfig_list_in_the_environment_is_merged_and_the_first_current_context_wins(
        no_kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_kubeconfig(tmp_path / "a", {"hub": "https://hub.example.org:6443"}, current="hub")
    second = write_kubeconfig(tmp_path / "b", {"shanghai": "https://sh.example.org:6443"}, current="shanghai")
    missing = tmp_path / "not-there"
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join(map(str, (missing, first, second))))
    target = KubeTarget()
    assert target.kubeconfig_files() == (first, second)
    assert target.context_name() == "hub"
    assert target.client_configuration().host == "https://hub.example.org:6443"
    chosen = KubeTarget(context="shanghai").connection_info()  # the operators' Kopf login
    assert (chosen.server, chosen.token) == ("https://sh.example.org:6443", "token-of-shanghai")
    # --kubeconfig wins over $KUBECONFIG.
    assert KubeTarget(second).client_configuration().host == "https://sh.example.org:6443"


@pytest.mark.timeout(30)
def test_the_default_kubeconfig_is_used_when_nothing_else_is_set(no_kubeconfig: Path) -> None:
    (no_kubeconfig / ".kube").mkdir()
    default = write_kubeconfig(no_kubeconfig / ".kube" / "config", {"chengdu": "https://cd.example.org"},
                               current="chengdu")
    assert KubeTarget().kubeconfig_files() == (default,)
    assert KubeTarget().client_configuration().host == "https://cd.example.org"


@pytest.mark.timeout(30)
def test_a_missing_kubeconfig_or_context_is_one_line_naming_what_to_set(
        no_kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KubeconfigError, match=r"^no kubeconfig: pass --kubeconfig, set KUBECONFIG, or "):
        KubeTarget().client_configuration()
    with pytest.raises(KubeconfigError, match=r"kubeconfig .*/nowhere does not exist"):
        KubeTarget(tmp_path / "nowhere").client_configuration()
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "gone"))
    with pytest.raises(KubeconfigError, match=r"^KUBECONFIG names no kubeconfig file that exists"):
        KubeTarget().context_name()
    path = write_kubeconfig(tmp_path / "k", {"hub": "https://hub.example.org", "ningbo": "https://nb.example.org"})
    monkeypatch.setenv("KUBECONFIG", str(path))
    with pytest.raises(KubeconfigError) as no_current:
        KubeTarget(context_option="--hub-context").client_configuration()
    assert str(no_current.value) == (f"kubeconfig {path} sets no current context; pass --hub-context "
                                     "with one of: hub, ningbo (or run `kubectl config use-context NAME`)")
    with pytest.raises(KubeconfigError) as unknown:
        KubeTarget(context="wuhan", context_option="--city-context").client_configuration()
    assert str(unknown.value) == (f"--city-context wuhan is not a context of kubeconfig {path}; pass "
                                  "--city-context with one of: hub, ningbo")
    assert "\n" not in str(no_current.value) + str(unknown.value)


@pytest.mark.timeout(30)
def test_in_a_pod_without_a_kubeconfig_the_service_account_is_used(
        no_kubeconfig: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    target = KubeTarget()
    assert target.kubeconfig_files() == ()
    assert target.context_name() is None
    # Not really a pod: the service account's token file is missing, and the message says so.
    with pytest.raises(KubeconfigError, match=r"^cannot use the in-cluster service account: "):
        target.client_configuration()


# -- the commands, without a cluster configured ----------------------------------------------------
COMMANDS_THAT_TALK_TO_A_CLUSTER = [
    ("hub", "install"),
    ("hub", "uninstall"),
    ("hub", "dashboard"),
    ("city", "onboard", "ningbo"),
    ("city", "offboard", "ningbo"),
    ("models", "promote", "water-burst-detector", "--version", "1"),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("args", COMMANDS_THAT_TALK_TO_A_CLUSTER, ids=" ".join)
def test_every_cluster_command_without_a_kubeconfig_fails_in_one_line_with_status_2(
        args: tuple[str, ...], tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}  # promote checks MLflow later
    proc = run_cli(*args, env=env)
    assert proc.returncode == cli.EXIT_NO_CLUSTER, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: no kubeconfig: pass --kubeconfig, set KUBECONFIG, or create "
                               "~/.kube/config")


@pytest.mark.timeout(120)
def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    proc = run_cli("--debug", "city", "offboard", "ningbo", env={"HOME": str(tmp_path)})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "KubeconfigError: no kubeconfig" in proc.stderr


@pytest.mark.timeout(120)
def test_an_unknown_context_of_the_kubeconfig_in_the_environment_is_refused_by_name(tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "config", {"hub": "https://127.0.0.1:9"}, current="hub")
    proc = run_cli("city", "offboard", "ningbo", "--city-context", "ningbo",
                   env={"HOME": str(tmp_path), "KUBECONFIG": str(kubeconfig)})
    assert proc.returncode == cli.EXIT_NO_CLUSTER, proc.stderr
    assert proc.stderr.strip() == (f"error: --city-context ningbo is not a context of kubeconfig "
                                   f"{kubeconfig}; pass --city-context with one of: hub")


# -- the operators' health endpoint ----------------------------------------------------------------
@pytest.mark.timeout(30)
def test_the_health_endpoint_is_served_only_when_its_port_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_HEALTH_PORT, raising=False)
    assert liveness_endpoint() is None
    monkeypatch.setenv(ENV_HEALTH_PORT, "8080")
    assert liveness_endpoint() == "http://0.0.0.0:8080/healthz"
    monkeypatch.setenv(ENV_HEALTH_PORT, "http")
    with pytest.raises(ValueError, match="CITYNERVE_HEALTH_PORT='http' is not a port number"):
        liveness_endpoint()


@pytest.mark.timeout(180)
def test_an_api_server_that_is_not_there_is_one_line_too(tmp_path: Path) -> None:
    from citynerve.operators.localfed.cluster import free_port  # noqa: PLC0415

    closed = f"https://127.0.0.1:{free_port()}"  # nothing listens there
    kubeconfig = write_kubeconfig(tmp_path / "config", {"hub": closed}, current="hub")
    proc = run_cli("models", "promote", "water-burst-detector", "--version", "1",
                   env={"HOME": str(tmp_path), "KUBECONFIG": str(kubeconfig),
                        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: cannot reach the API server (")
    assert "check the kubeconfig's server and context" in lines[0]
