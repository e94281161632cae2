"""The embedded default: hub operator and city agents in one process, on any clusters.

``EmbeddedFederation`` takes kubeconfig contexts (the local federation's, or real clusters')
and does what the platform team and each city's IT department would do: install the CRDs and
the hub's admission policies, invite each city (its own bootstrap identity), start the hub
operator, start each city's agent with its bootstrap credential, and (as the hub
administrator) approve the cities.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from citynerve.operators.api.crdgen import crd
from citynerve.operators.api.resources import KINDS
from citynerve.operators.federation import onboarding
from citynerve.operators.federation.agent import AgentConfig, CityAgent
from citynerve.operators.hub.handlers import build_registry as build_hub_registry
from citynerve.operators.kube import Kube
from citynerve.operators.runtime import (
    InProcessOperator,
    KubeTarget,
    OperatorOptions,
    scratch_dir,
    token_kubeconfig,
)
from kubernetes import client

log = logging.getLogger(__name__)

# Cities the samples describe; any other name joins with neutral defaults.
KNOWN_CITIES: dict[str, tuple[str, str, str]] = {
    "shanghai": ("Shanghai", "east", "CN-SH"),
    "chengdu": ("Chengdu", "west", "CN-SC"),
    "hangzhou": ("Hangzhou", "east", "CN-ZJ"),
    "wuhan": ("Wuhan", "central", "CN-HB"),
}


def join_request(city: str, heartbeat_seconds: int = 10, timeout_seconds: int = 40,
                 labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The City a city's agent asks the hub to create (approval stays with the hub admin)."""
    display, region, jurisdiction = KNOWN_CITIES.get(city, (city.title(), "central", "CN"))
    return {
        "apiVersion": "citynerve.io/v1alpha1", "kind": "City",
        "metadata": {"name": city, "labels": {"region": region, **(labels or {})}},
        "spec": {
            "displayName": display, "region": region,
            "connection": {"heartbeatIntervalSeconds": heartbeat_seconds,
                           "heartbeatTimeoutSeconds": timeout_seconds},
            "dataResidency": {"jurisdiction": jurisdiction},
            "approved": False,
        },
    }


def install_crds(target: KubeTarget, timeout: float = 60.0) -> None:
    """Create or update every CityNerve CRD and wait until each is Established."""
    kube = Kube(client.ApiClient(target.client_configuration()))
    for info in KINDS:
        kube.apply(crd(info), field_manager="citynerve-install")
    ext = client.ApiextensionsV1Api(kube.api_client)
    deadline = time.monotonic() + timeout
    for info in KINDS:
        while True:
            got = ext.read_custom_resource_definition(info.crd_name)
            if any(c.type == "Established" and c.status == "True" for c in got.status.conditions or []):
                break
            if time.monotonic() > deadline:
                msg = f"CRD {info.crd_name} not Established within {timeout:.0f} s"
                raise TimeoutError(msg)
            time.sleep(0.1)


def install_hub_trust(hub: KubeTarget) -> None:
    """The hub administrator's install step: admission policies and the roles the hub only binds."""
    kube = Kube(client.ApiClient(hub.client_configuration()))
    for manifest in (*onboarding.admission_policies(), *onboarding.hub_install_rbac()):
        kube.apply(manifest, field_manager="citynerve-install")


def invite_city(hub: KubeTarget, city: str, hours: int = 24) -> str:
    """The hub administrator invites one city: its own bootstrap identity, and a token for it.

    The token is good for ``hours`` and for City ``city`` only (RBAC and the admission policies).
    """
    api = client.ApiClient(hub.client_configuration())
    kube = Kube(api)
    for manifest in onboarding.bootstrap_rbac(city):
        kube.ensure(manifest)
    token: str = client.CoreV1Api(api).create_namespaced_service_account_token(
        onboarding.bootstrap_account(city), onboarding.SYSTEM_NAMESPACE,
        {"spec": {"expirationSeconds": hours * 3600}}).status.token
    return token


def bootstrap_kubeconfig(hub: KubeTarget, city: str, folder: Path, hours: int = 24) -> Path:
    """Invite ``city`` and write a kubeconfig for its bootstrap identity."""
    cfg = hub.client_configuration()
    return token_kubeconfig(cfg.host, Path(cfg.ssl_ca_cert).read_bytes(), invite_city(hub, city, hours),
                            onboarding.bootstrap_account(city), folder)


def approve_city(hub: KubeTarget, city: str) -> None:
    """The hub administrator's accept step."""
    client.CustomObjectsApi(client.ApiClient(hub.client_configuration())).patch_cluster_custom_object(
        "citynerve.io", "v1alpha1", "cities", city, {"spec": {"approved": True}})


@dataclass
class EmbeddedFederation:
    """Hub operator + one agent per city, in this process, against the given contexts."""

    kubeconfig: Path
    hub_context: str
    city_contexts: dict[str, str]  # city name → kubeconfig context of its cluster
    heartbeat_seconds: int = 10
    heartbeat_timeout_seconds: int = 40
    check_interval: float = 2.0
    scratch: Path = field(default_factory=lambda: scratch_dir("federation"))
    hub_operator: InProcessOperator | None = None
    agents: dict[str, CityAgent] = field(default_factory=dict)

    def target(self, context: str) -> KubeTarget:
        return KubeTarget(self.kubeconfig, context)

    @property
    def hub(self) -> KubeTarget:
        return self.target(self.hub_context)

    def install(self) -> None:
        for context in (self.hub_context, *self.city_contexts.values()):
            install_crds(self.target(context))
        install_hub_trust(self.hub)

    def start_hub(self) -> None:
        options = OperatorOptions(name="hub", target=self.hub)
        self.hub_operator = InProcessOperator(
            options, build_hub_registry(options, self.check_interval)).start()

    def start_agent(self, city: str, labels: Mapping[str, str] | None = None) -> CityAgent:
        bootstrap = bootstrap_kubeconfig(self.hub, city, self.scratch / city)
        cfg = self.hub.client_configuration()
        agent = CityAgent(AgentConfig(
            city=city,
            city_target=self.target(self.city_contexts[city]),
            hub_server=cfg.host,
            hub_ca_pem=Path(cfg.ssl_ca_cert).read_bytes(),
            bootstrap=KubeTarget(bootstrap, "hub"),
            join_request=join_request(city, self.heartbeat_seconds, self.heartbeat_timeout_seconds, labels),
            heartbeat_seconds=self.heartbeat_seconds,
            scratch=self.scratch / city / "identity",
        ))
        self.agents[city] = agent.start()
        return agent

    def start(self, approve: bool = True) -> EmbeddedFederation:
        self.install()
        self.start_hub()
        for city in self.city_contexts:
            self.start_agent(city)
        if approve:
            for city in self.city_contexts:
                self.wait_for_join_request(city)
                approve_city(self.hub, city)
        return self

    def wait_for_join_request(self, city: str, timeout: float = 30.0) -> None:
        custom = client.CustomObjectsApi(client.ApiClient(self.hub.client_configuration()))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                custom.get_cluster_custom_object("citynerve.io", "v1alpha1", "cities", city)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise
                time.sleep(0.2)
                continue
            return
        msg = f"City {city} did not ask to join within {timeout:.0f} s"
        raise TimeoutError(msg)

    def stop_agent(self, city: str) -> None:
        agent = self.agents.pop(city, None)
        if agent is not None:
            agent.stop()

    def stop(self) -> None:
        for city in list(self.agents):
            self.stop_agent(city)
        if self.hub_operator is not None:
            self.hub_operator.stop()
            self.hub_operator = None


def city_condition(hub: KubeTarget, city: str, condition: str) -> str | None:
    """The status of one condition of a City on the hub (None if not reported)."""
    custom = client.CustomObjectsApi(client.ApiClient(hub.client_configuration()))
    body = custom.get_cluster_custom_object("citynerve.io", "v1alpha1", "cities", city)
    for cond in (body.get("status") or {}).get("conditions") or []:
        if cond.get("type") == condition:
            return str(cond.get("status"))
    return None

