"""The two Helm charts, installed and removed with pyhelm3 and the pinned helm binary.

``citynerve hub install`` and ``citynerve city onboard`` are thin over this module:

- ``install_hub``: the hub chart into ``citynerve-system`` of the hub cluster;
- ``hub_connection``: what a city needs from the hub (API URL, CA bundle, and a bootstrap
  token good for that one city, issued by inviting it);
- ``onboard_city``: the city chart into a city cluster, its values filled from the hub; the join
  token goes into a Secret of the release namespace (``hub.bootstrap.existingSecret``), never into
  the values, which ``helm get values`` prints;
- ``agent_config_from_release``: the agent configuration the city chart rendered
  (ConfigMap ``citynerve-city-config``, key ``agent.json``), for an agent run in-process;
- ``wait_until_city_ready``: until the hub reports the City ``Ready``.

pyhelm3 is asynchronous; each public function here runs one ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyhelm3
import semver
import yaml
from citynerve.operators.federation import onboarding
from citynerve.operators.federation.agent import AgentConfig, agent_config
from citynerve.operators.federation.embedded import city_condition, invite_city, join_request
from citynerve.operators.federation.placement import is_offboarded
from citynerve.operators.kube import FIELD_MANAGER, Kube
from citynerve.operators.localfed import toolchain
from citynerve.operators.runtime import KubeTarget, scratch_dir
from kubernetes import client

CHARTS_DIR = Path(__file__).resolve().parents[1] / "charts"
HUB_CHART = CHARTS_DIR / "citynerve-hub"
CITY_CHART = CHARTS_DIR / "citynerve-city"
HUB_RELEASE = "citynerve-hub"
HUB_NAMESPACE = onboarding.SYSTEM_NAMESPACE
CITY_RELEASE = "citynerve-city"
CITY_NAMESPACE = "citynerve"
CITY_CONFIGMAP = "citynerve-city-config"
AGENT_CONFIG_KEY = "agent.json"
# The Secret `city onboard` writes the hub's join token into (the chart's hub.bootstrap.existingSecret),
# and the key the chart reads; `city offboard` deletes it (it carries MANAGED_BY, so a Secret of the
# user's own is never deleted).
CITY_BOOTSTRAP_SECRET = "citynerve-city-hub-join-token"  # noqa: S105 - a Secret's name, not a secret
BOOTSTRAP_TOKEN_KEY = "token"  # noqa: S105 - a key's name, not a secret
MANAGED_BY = {"app.kubernetes.io/managed-by": FIELD_MANAGER}
DEFAULT_TIMEOUT = "5m"


class HelmError(RuntimeError):
    """A helm command failed; the message carries helm's own explanation."""


@dataclass(frozen=True)
class ReleaseInfo:
    """What an install or upgrade produced."""

    name: str
    namespace: str
    revision: int
    status: str
    notes: str


@dataclass(frozen=True)
class HubConnection:
    """What a city's agent needs to reach the hub and ask to join."""

    url: str
    ca_pem: str
    bootstrap_token: str


class _PinnedHelm(pyhelm3.Command):  # type: ignore[misc]  # pyhelm3 is untyped here
    """pyhelm3's command runner, told the pinned version.

    A ``go install``-built helm reports ``v3.19`` (no patch: the release ldflags are not set),
    which pyhelm3's strict SemVer parse refuses.
    """

    def client_version(self) -> semver.Version:
        return semver.Version.parse(toolchain.HELM_VERSION.removeprefix("v"))


def helm_client(target: KubeTarget) -> pyhelm3.Client:
    """A pyhelm3 client on the pinned helm binary, for one kubeconfig context."""
    executable = str(toolchain.binary("helm"))
    command = _PinnedHelm(executable=executable, kubeconfig=target.kubeconfig, kubecontext=target.context,
                          default_timeout=DEFAULT_TIMEOUT)
    return pyhelm3.Client(command, executable=executable)


def _helm_message(exc: pyhelm3.errors.Error) -> str:
    stderr = getattr(exc, "stderr", b"")
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else str(stderr)
    return text.strip() or str(exc)


def on_cluster(target: KubeTarget) -> KubeTarget:
    """``target`` with its context named, for helm: the kubeconfig and context the client uses (helm
    reads $KUBECONFIG itself); a missing kubeconfig or context is refused before helm runs."""
    return dataclasses.replace(target, context=target.context_name())


def install(target: KubeTarget, chart: Path, release: str, namespace: str,
            values: Mapping[str, Any], *, wait: bool = True) -> ReleaseInfo:
    """``helm upgrade --install`` of a local chart; objects left by a non-Helm install are adopted."""
    target = on_cluster(target)

    async def run() -> ReleaseInfo:
        helm = helm_client(target)
        loaded = await helm.get_chart(chart)
        revision = await helm.install_or_upgrade_release(
            release, loaded, dict(values), namespace=namespace, create_namespace=True,
            wait=wait, take_ownership=True)
        return ReleaseInfo(release, namespace, int(revision.revision), str(revision.status.value),
                           str(revision.notes or ""))

    try:
        return asyncio.run(run())
    except pyhelm3.errors.Error as exc:
        msg = f"helm could not install {release} ({chart.name}) into {namespace}: {_helm_message(exc)}"
        raise HelmError(msg) from exc


def uninstall(target: KubeTarget, release: str, namespace: str, *, wait: bool = True) -> None:
    """``helm uninstall``; a release that is not there is already uninstalled."""
    target = on_cluster(target)

    async def run() -> None:
        await helm_client(target).uninstall_release(release, namespace=namespace, wait=wait)

    try:
        asyncio.run(run())
    except pyhelm3.errors.Error as exc:
        msg = f"helm could not uninstall {release} from {namespace}: {_helm_message(exc)}"
        raise HelmError(msg) from exc


def template(chart: Path, values: Mapping[str, Any], *, release: str, namespace: str,
             include_crds: bool = False) -> list[dict[str, Any]]:
    """The manifests ``helm template`` renders (no cluster needed)."""

    async def run() -> list[dict[str, Any]]:
        helm = helm_client(KubeTarget())
        loaded = await helm.get_chart(chart)
        rendered = await helm.template_resources(loaded, release, dict(values), namespace=namespace,
                                                 include_crds=include_crds)
        return [dict(doc) for doc in rendered if doc]

    try:
        return asyncio.run(run())
    except pyhelm3.errors.Error as exc:
        msg = f"helm could not render {chart.name}: {_helm_message(exc)}"
        raise HelmError(msg) from exc


def read_values_file(path: Path | None) -> dict[str, Any]:
    """A values file as a mapping (empty for none); anything else is refused by name."""
    if path is None:
        return {}
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        msg = f"values file {path} must hold a mapping, not {type(loaded).__name__}"
        raise TypeError(msg)
    return loaded


def merge_values(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` wins; nested mappings merge (Helm's own rule for values files)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


# -- the hub ------------------------------------------------------------------------------
def install_hub(hub: KubeTarget, values: Mapping[str, Any] | None = None, *,
                namespace: str = HUB_NAMESPACE, wait: bool = True) -> ReleaseInfo:
    return install(hub, HUB_CHART, HUB_RELEASE, namespace, values or {}, wait=wait)


def uninstall_hub(hub: KubeTarget, *, namespace: str = HUB_NAMESPACE) -> None:
    uninstall(hub, HUB_RELEASE, namespace)


def hub_connection(hub: KubeTarget, city: str, hours: int = 24) -> HubConnection:
    """The hub's URL and CA (from the kubeconfig) and a bootstrap token good for ``city`` only.

    Run with the hub administrator's credentials: it invites the city (its own bootstrap identity
    on the hub) and issues a token that expires after ``hours``.
    """
    cfg = hub.client_configuration()
    ca_pem = Path(cfg.ssl_ca_cert).read_text() if cfg.ssl_ca_cert else ""
    return HubConnection(url=str(cfg.host), ca_pem=ca_pem, bootstrap_token=invite_city(hub, city, hours))


# -- a city -------------------------------------------------------------------------------
def city_values(city: str, connection: HubConnection | None) -> dict[str, Any]:
    """The city chart's values for ``city``: its City as ``join_request`` describes it, and the hub."""
    joining = join_request(city)
    spec = joining["spec"]
    values: dict[str, Any] = {"city": {
        "name": city,
        "displayName": spec["displayName"],
        "region": spec["region"],
        "dataResidency": {"jurisdiction": spec["dataResidency"]["jurisdiction"]},
        "heartbeatSeconds": spec["connection"]["heartbeatIntervalSeconds"],
        "heartbeatTimeoutSeconds": spec["connection"]["heartbeatTimeoutSeconds"],
    }}
    if connection is not None:
        # The token itself goes into CITY_BOOTSTRAP_SECRET (bootstrap_secret), never into the values.
        values["hub"] = {"url": connection.url, "caBundle": connection.ca_pem,
                         "bootstrap": {"existingSecret": CITY_BOOTSTRAP_SECRET}}
    return values


def bootstrap_secret(token: str, namespace: str) -> dict[str, Any]:
    """The Secret holding the hub's join token for the city chart (its ``hub.bootstrap.existingSecret``)."""
    return {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": CITY_BOOTSTRAP_SECRET, "namespace": namespace,
                     "labels": {"app.kubernetes.io/part-of": "citynerve",
                                "app.kubernetes.io/component": "agent", **MANAGED_BY}},
        "type": "Opaque",
        "data": {BOOTSTRAP_TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def onboarding_values(city: str, connection: HubConnection, values: Mapping[str, Any] | None,
                      namespace: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The city chart's values for joining ``connection``'s hub, and the join-token Secret to write
    first (pure). A token or existingSecret in ``values`` is the user's own and wins: no Secret then."""
    derived = city_values(city, connection)
    own = ((values or {}).get("hub") or {}).get("bootstrap") or {}
    if own.get("token") or own.get("existingSecret"):
        del derived["hub"]["bootstrap"]
        return merge_values(derived, values or {}), None
    return merge_values(derived, values or {}), bootstrap_secret(connection.bootstrap_token, namespace)


def onboard_city(city: str, hub: KubeTarget, target: KubeTarget, values: Mapping[str, Any] | None = None,
                 *, namespace: str = CITY_NAMESPACE, wait: bool = True) -> ReleaseInfo:
    """Install or upgrade the city chart, joined to ``hub``; ``values`` override the derived ones.

    The join token goes into Secret CITY_BOOTSTRAP_SECRET of the release namespace, written before
    the chart is installed (``onboarding_values``).
    """
    target = on_cluster(target)  # a wrong city context is refused before the hub invites the city
    merged, secret = onboarding_values(city, hub_connection(hub, city), values, namespace)
    if secret is not None:
        kube = Kube(client.ApiClient(target.client_configuration()))
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        kube.apply(secret)
    return install(target, CITY_CHART, CITY_RELEASE, namespace, merged, wait=wait)


def offboard_city(target: KubeTarget, *, namespace: str = CITY_NAMESPACE) -> None:
    """Uninstall the city chart, and delete the join-token Secret ``onboard_city`` wrote (if any)."""
    uninstall(target, CITY_RELEASE, namespace)
    core = client.CoreV1Api(client.ApiClient(target.client_configuration()))
    try:
        secret = core.read_namespaced_secret(CITY_BOOTSTRAP_SECRET, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return
        raise
    if MANAGED_BY.items() <= (secret.metadata.labels or {}).items():
        core.delete_namespaced_secret(CITY_BOOTSTRAP_SECRET, namespace)


def agent_config_from_release(city_target: KubeTarget, namespace: str = CITY_NAMESPACE,
                              scratch: Path | None = None) -> AgentConfig:
    """The agent configuration a city chart release rendered, read back from its cluster."""
    core = client.CoreV1Api(client.ApiClient(city_target.client_configuration()))
    config_map = core.read_namespaced_config_map(CITY_CONFIGMAP, namespace)
    rendered = json.loads((config_map.data or {})[AGENT_CONFIG_KEY])
    secret = core.read_namespaced_secret(rendered["bootstrapSecret"], namespace)
    token = base64.b64decode((secret.data or {})[rendered["bootstrapSecretKey"]]).decode()
    return agent_config(rendered, token, city_target, scratch or scratch_dir(f"agent-{rendered['city']}"))


def wait_until_city_offboarded(hub: KubeTarget, city: str, timeout: float = 120.0,
                               interval: float = 1.0) -> None:
    """Until the hub marks City ``city`` Offboarded (its agent saw its chart uninstalled)."""
    custom = client.CustomObjectsApi(client.ApiClient(hub.client_configuration()))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = custom.get_cluster_custom_object("citynerve.io", "v1alpha1", "cities", city)
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            msg = (f"City {city} is not on the hub of context {hub.context_name()}, so there is nothing to "
                   "wait for; check the name and --hub-context")
            raise ValueError(msg) from exc
        if is_offboarded(body):
            return
        time.sleep(interval)
    msg = (f"City {city} is not marked Offboarded on the hub after {timeout:.0f} s; its agent tells "
           "the hub when its pod ends after the uninstall — is the hub operator running?")
    raise TimeoutError(msg)


def wait_until_city_ready(hub: KubeTarget, city: str, timeout: float = 300.0,
                          interval: float = 1.0) -> None:
    """Until the hub reports City ``city`` Ready (its agent joined and sends heartbeats)."""
    deadline = time.monotonic() + timeout
    last: str | None = None
    while time.monotonic() < deadline:
        try:
            last = city_condition(hub, city, "Ready")
        except client.ApiException as exc:
            if exc.status != 404:
                raise
            last = "absent"
        if last == "True":
            return
        time.sleep(interval)
    msg = (f"City {city} is not Ready on the hub after {timeout:.0f} s (Ready: {last}); is it approved "
           f"(kubectl patch city {city} --type merge -p '{{\"spec\":{{\"approved\":true}}}}') "
           "and its agent running?")
    raise TimeoutError(msg)
