"""The Helm charts on the local federation: the hub chart in the hub, the city chart in both cities.

Installed through the ``citynerve hub install`` / ``city onboard`` commands (pyhelm3 and the
pinned helm), some run as a user runs them: the installed command, its kubeconfig in
``$KUBECONFIG`` and the current context. kwok runs no containers, so the operators themselves run
in this process: the hub operator as the hub chart's ServiceAccount, each city's agent from the
configuration its chart rendered — which shows the chart gives both what they need.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from citynerve.operators import cli, helm
from citynerve.operators.city import rbac as city_rbac
from citynerve.operators.city.rbac import IDENTITY_SECRET
from citynerve.operators.federation import onboarding
from citynerve.operators.federation.agent import CityAgent
from citynerve.operators.federation.embedded import approve_city, invite_city
from citynerve.operators.federation.placement import city_namespace, is_offboarded, work_name
from citynerve.operators.hub import rbac as hub_rbac
from citynerve.operators.hub.handlers import build_registry as build_hub_registry
from citynerve.operators.localfed import toolchain
from citynerve.operators.localfed.cluster import free_port
from citynerve.operators.runtime import (
    ENV_HEALTH_PORT,
    InProcessOperator,
    KubeTarget,
    OperatorOptions,
    service_account_target,
)
from kubernetes import client

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION = "citynerve.io", "v1alpha1"
INSTANCE = "app.kubernetes.io/instance"


@dataclass(frozen=True)
class CityRelease:
    cluster: str
    name: str  # the City on the hub
    rbac_mode: str
    workload_mode: str


CITIES = (CityRelease("shanghai", "charts-shanghai", "namespaced", "local"),
          CityRelease("chengdu", "charts-chengdu", "cluster", "kuberay"))
ALERT_SECRETS = ["charts-duty-webhook"]  # the city chart's alerts.secretNames in this module
CITYNERVE = Path(sys.executable).parent / "citynerve"


def citynerve(*args: str, kubeconfig: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The installed command as a user runs it: no --kubeconfig, its kubeconfig in $KUBECONFIG."""
    return subprocess.run([str(CITYNERVE), *args], env={**os.environ, "KUBECONFIG": kubeconfig},
                          capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class Installed:
    federation: Any
    namespace: str  # the city chart's release namespace in both city clusters
    scratch: Path

    def target(self, cluster: str) -> KubeTarget:
        return KubeTarget(self.federation.kubeconfig, self.federation.cluster(cluster).name)


def _delete_quietly(call: Any, *args: Any) -> None:
    try:
        call(*args)
    except client.ApiException as exc:
        if exc.status != 404:
            raise


def _forget_cities(federation: Any) -> None:
    """Leave the shared federation as other tests expect it: no charts-* cities, no agent identity."""
    hub = federation.api_client("hub")
    custom, rbac = client.CustomObjectsApi(hub), client.RbacAuthorizationV1Api(hub)
    certificates, core = client.CertificatesV1Api(hub), client.CoreV1Api(hub)
    for city in CITIES:
        _delete_quietly(custom.delete_cluster_custom_object, GROUP, VERSION, "cities", city.name)
        _delete_quietly(core.delete_namespace, f"city-{city.name}")
        _delete_quietly(rbac.delete_cluster_role, onboarding.city_user(city.name))
        _delete_quietly(rbac.delete_cluster_role_binding, onboarding.city_user(city.name))
        _delete_quietly(rbac.delete_cluster_role_binding, f"{onboarding.city_user(city.name)}:renewal")
        for manifest in onboarding.bootstrap_rbac(city.name)[1:]:  # not the system namespace
            kind, name = manifest["kind"], manifest["metadata"]["name"]
            if kind == "ServiceAccount":
                _delete_quietly(core.delete_namespaced_service_account, name, onboarding.SYSTEM_NAMESPACE)
            elif kind == "ClusterRole":
                _delete_quietly(rbac.delete_cluster_role, name)
            else:
                _delete_quietly(rbac.delete_cluster_role_binding, name)
        selector = f"{onboarding.CSR_CITY_LABEL}={city.name}"
        for csr in certificates.list_certificate_signing_request(label_selector=selector).items:
            _delete_quietly(certificates.delete_certificate_signing_request, csr.metadata.name)


@pytest.fixture(scope="module")
def installed(federation: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    scratch = tmp_path_factory.mktemp("charts")
    result = Installed(federation, f"cn-{uuid.uuid4().hex[:6]}", scratch)
    kubeconfig = str(federation.kubeconfig)  # its current context is the hub
    # A user's own kubeconfig listed first in $KUBECONFIG: its current context (the first city) wins.
    first_city = federation.cluster(CITIES[0].cluster).name
    users = scratch / "kubeconfig-current-city"
    users.write_text(yaml.safe_dump({**yaml.safe_load(federation.kubeconfig.read_text()),
                                     "current-context": first_city}))
    _forget_cities(federation)
    try:
        hub = citynerve("hub", "install", kubeconfig=kubeconfig)
        assert hub.returncode == 0, hub.stderr
        assert f"into {helm.HUB_NAMESPACE} of context hub" in hub.stdout
        for city in CITIES:
            values = scratch / f"{city.name}.yaml"
            values.write_text(yaml.safe_dump({
                "city": {"labels": {"tier": "pilot"}, "heartbeatSeconds": 2, "heartbeatTimeoutSeconds": 8},
                "rbac": {"mode": city.rbac_mode}, "workload": {"mode": city.workload_mode},
                "alerts": {"secretNames": ALERT_SECRETS},
            }))
            if city == CITIES[0]:
                listed = os.pathsep.join([str(scratch / "no-such-kubeconfig"), str(users), kubeconfig])
                onboarded = citynerve("city", "onboard", city.name, "--hub-context", "hub", "--namespace",
                                      result.namespace, "--values", str(values), kubeconfig=listed)
                assert onboarded.returncode == 0, onboarded.stderr
                assert f"of context {first_city}, joined to the hub of context hub" in onboarded.stdout
                continue
            assert cli.main(["city", "onboard", city.name, "--kubeconfig", kubeconfig, "--hub-context", "hub",
                             "--city-context", federation.cluster(city.cluster).name,
                             "--namespace", result.namespace, "--values", str(values)]) == 0
        yield result
    finally:
        for city in CITIES:
            helm.offboard_city(result.target(city.cluster), namespace=result.namespace)
            _delete_quietly(client.CoreV1Api(federation.api_client(city.cluster)).delete_namespace,
                            result.namespace)
        helm.uninstall_hub(result.target("hub"))
        _forget_cities(federation)


def _available(api: client.ApiClient, namespace: str, name: str) -> bool:
    deployment = client.AppsV1Api(api).read_namespaced_deployment(name, namespace)
    return any(c.type == "Available" and c.status == "True" for c in deployment.status.conditions or [])


@pytest.mark.timeout(150)
def test_charts_install_and_their_deployments_become_available(installed: Installed, wait_for: Any) -> None:
    fed = installed.federation
    wait_for(lambda: _available(fed.api_client("hub"), helm.HUB_NAMESPACE, "citynerve-hub"), 60,
             what="the hub operator Deployment Available")
    for city in CITIES:
        wait_for(lambda c=city: _available(fed.api_client(c.cluster), installed.namespace, "citynerve-city"),
                 60, what=f"the city operator Deployment Available in {city.cluster}")
    policies = client.AdmissionregistrationV1Api(fed.api_client("hub")).list_validating_admission_policy()
    assert {p.metadata.name for p in policies.items} >= {onboarding.CITY_POLICY, onboarding.CSR_POLICY}


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - a loopback http URL
            return int(response.status)
    except OSError:
        return 0


@pytest.mark.timeout(180)
def test_the_hub_operator_answers_the_probes_its_chart_gives_it(installed: Installed, wait_for: Any) -> None:
    """``citynerve operator hub`` with the environment the chart gives its container (ports moved to
    free ones: this machine is shared) and the kubeconfig in $KUBECONFIG: its health endpoint answers
    where the chart's probes ask."""
    docs = helm.template(helm.HUB_CHART, {}, release=helm.HUB_RELEASE, namespace=helm.HUB_NAMESPACE)
    operator = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == helm.HUB_RELEASE]
    container = operator[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    health = next(p for p in container["ports"] if p["name"] == container["livenessProbe"]["httpGet"]["port"])
    assert env[ENV_HEALTH_PORT] == str(health["containerPort"])
    port = free_port()
    env.update({ENV_HEALTH_PORT: str(port), "CITYNERVE_PROMETHEUS_PORT": str(free_port()),
                "KUBECONFIG": str(installed.federation.kubeconfig)})  # current context: the hub
    url = f"http://127.0.0.1:{port}{container['livenessProbe']['httpGet']['path']}"
    assert url == f"http://127.0.0.1:{port}{container['readinessProbe']['httpGet']['path']}"
    log = installed.scratch / "hub-operator-probe.log"
    with log.open("wb") as out:
        process = subprocess.Popen([str(CITYNERVE), *container["args"]], env={**os.environ, **env},
                                   stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _get(url) == 200, 120, what=f"the hub operator's {url} (log: {log})")
        finally:
            process.terminate()
            process.wait(60)
    assert _get(url) == 0, "the endpoint goes with the process"


# -- RBAC as the charts' ServiceAccounts ---------------------------------------------------------
def _allowed(api: client.ApiClient, verb: str, group: str, resource: str, namespace: str | None = None,
             name: str | None = None) -> bool:
    resource, _, subresource = resource.partition("/")
    attributes = {"verb": verb, "group": group, "resource": resource, "subresource": subresource or None,
                  "namespace": namespace, "name": name}
    review = client.AuthorizationV1Api(api).create_self_subject_access_review(
        {"spec": {"resourceAttributes": {k: v for k, v in attributes.items() if v is not None}}})
    return bool(review.status.allowed)


def _assert_granted(api: client.ApiClient, rules: list[dict[str, Any]], namespace: str | None,
                    who: str) -> None:
    missing = [
        f"{verb} {group or 'core'}/{resource}{'/' + name if name else ''}"
        for rule in rules for group in rule["apiGroups"] for resource in rule["resources"]
        for verb in rule["verbs"] for name in rule.get("resourceNames", [None])
        if not _allowed(api, verb, group, resource, namespace, name)
    ]
    assert not missing, f"{who} lacks: {missing}"


@pytest.mark.timeout(90)
def test_chart_service_accounts_hold_exactly_the_operators_rules(installed: Installed) -> None:
    fed = installed.federation
    folder = installed.scratch / "accounts"

    hub = client.ApiClient(service_account_target(
        installed.target("hub"), helm.HUB_NAMESPACE, "citynerve-hub", folder).client_configuration())
    _assert_granted(hub, hub_rbac.cluster_rules(), None, "the hub operator")
    assert not _allowed(hub, "list", "", "secrets")
    assert not _allowed(hub, "update", GROUP, "cities")  # approval is the administrator's
    assert not _allowed(hub, "delete", "", "namespaces")
    assert not _allowed(hub, "escalate", "rbac.authorization.k8s.io", "clusterroles")

    assert not _allowed(hub, "patch", "", "configmaps", "default"), "writes only in city-<name>"
    assert not _allowed(hub, "create", "certificates.k8s.io", "certificatesigningrequests")

    invite_city(installed.target("hub"), "probe")
    bootstrap = client.ApiClient(service_account_target(
        installed.target("hub"), onboarding.SYSTEM_NAMESPACE, onboarding.bootstrap_account("probe"),
        folder).client_configuration())
    bootstrap_role = next(m for m in onboarding.bootstrap_rbac("probe") if m["kind"] == "ClusterRole")
    _assert_granted(bootstrap, bootstrap_role["rules"], None, "a city's bootstrap identity")
    assert not _allowed(bootstrap, "list", GROUP, "cities")
    assert not _allowed(bootstrap, "get", GROUP, "cities", name="shanghai")
    assert not _allowed(bootstrap, "list", "certificates.k8s.io", "certificatesigningrequests")
    assert not _allowed(bootstrap, "update", GROUP, "cities/status")

    for city in CITIES:
        api = client.ApiClient(service_account_target(
            installed.target(city.cluster), installed.namespace, "citynerve-city", folder / city.cluster,
        ).client_configuration())
        assert not _allowed(api, "list", "", "secrets", installed.namespace)
        # The agent, beside the operator under the same account: its work, key and release only.
        _assert_granted(api, city_rbac.agent_cluster_rules(), None, f"{city.name}'s agent")
        _assert_granted(api, city_rbac.agent_work_rules(), installed.namespace, f"{city.name}'s agent")
        _assert_granted(api, city_rbac.agent_release_rules("citynerve-city", "citynerve-city"),
                        installed.namespace, f"{city.name}'s agent")
        assert not _allowed(api, "create", GROUP, "scenarios", "default")
        assert not _allowed(api, "delete", GROUP, "sensorfleets", installed.namespace)
        assert not _allowed(api, "patch", "", "secrets", installed.namespace, "city-bootstrap")
        if city.rbac_mode == "cluster":
            _assert_granted(api, city_rbac.cluster_rules(city.workload_mode, ALERT_SECRETS), None,
                            f"{city.name} (cluster)")
        else:
            _assert_granted(api, city_rbac.role_rules(city.workload_mode, ALERT_SECRETS), installed.namespace,
                            city.name)
            assert not _allowed(api, "get", GROUP, "scenarios", "default"), "a Role reaches one namespace"
            assert not _allowed(api, "list", "ray.io", "rayjobs", installed.namespace)
        # Secrets: the alert routes' keys the chart lists, no other (the agent's key is the agent's).
        assert _allowed(api, "get", "", "secrets", installed.namespace, ALERT_SECRETS[0])
        assert not _allowed(api, "get", "", "secrets", installed.namespace, "water-billing-db")
        assert not _allowed(api, "get", "", "secrets", installed.namespace)
        # The broker's users, in the release namespace: that one Secret patched, fleets' credentials
        # created, none read back.
        _assert_granted(api, city_rbac.broker_release_rules(), installed.namespace,
                        f"{city.name}'s broker users")
        assert not _allowed(api, "get", "", "secrets", installed.namespace, city_rbac.BROKER_AUTH_SECRET)
        assert not _allowed(api, "patch", "", "secrets", installed.namespace, "pudong-pressure-mqtt")
        # The accounts of the fleets' namespaces get nothing from the chart (a fleet's worker talks
        # to the broker only, with a credential of its own).
        default = client.ApiClient(service_account_target(
            installed.target(city.cluster), installed.namespace, "default",
            folder / f"{city.cluster}-default").client_configuration())
        assert not _allowed(default, "get", GROUP, "sensortypes", name="pipe-pressure-gauge")
        assert not _allowed(default, "patch", "", "configmaps", installed.namespace)
        assert not _allowed(default, "get", "", "secrets", installed.namespace)
    del fed


# -- joining with what the charts configured ------------------------------------------------------
@dataclass
class Joined:
    installed: Installed
    agents: dict[str, CityAgent]  # by City name, each running as its chart's ServiceAccount

    def restart_agent(self, city: CityRelease) -> None:
        """What a changed chart configuration does to the pod: a new agent with the new config."""
        self.agents[city.name].stop()
        self.agents[city.name] = _agent(self.installed, city)


def _agent(installed: Installed, city: CityRelease) -> CityAgent:
    config = helm.agent_config_from_release(installed.target(city.cluster), installed.namespace,
                                            installed.scratch / f"agent-{city.name}")
    as_chart = service_account_target(installed.target(city.cluster), installed.namespace, "citynerve-city",
                                      installed.scratch / f"agent-account-{city.name}")
    return CityAgent(dataclasses.replace(config, city_target=as_chart)).start()


@pytest.fixture(scope="module")
def joined(installed: Installed) -> Iterator[Joined]:
    """The hub operator as the hub chart's ServiceAccount, each agent as its city chart's."""
    as_hub_sa = service_account_target(installed.target("hub"), helm.HUB_NAMESPACE, "citynerve-hub",
                                       installed.scratch / "hub-operator")
    options = OperatorOptions(name="hub-chart", target=as_hub_sa)
    operator = InProcessOperator(options, build_hub_registry(options, 1.0)).start()
    result = Joined(installed, {})
    try:
        for city in CITIES:
            result.agents[city.name] = _agent(installed, city)
        yield result
    finally:
        for agent in result.agents.values():
            agent.stop()
        operator.stop()
        _delete_quietly(client.CustomObjectsApi(installed.federation.api_client("hub"))
                        .delete_namespaced_custom_object, GROUP, VERSION, "default", "federatedscenarios",
                        TIER_SCENARIO)


@pytest.mark.timeout(150)
def test_cities_join_with_the_charts_configuration_and_become_ready(joined: Joined, wait_for: Any) -> None:
    installed = joined.installed
    hub_admin = installed.target("hub")
    as_hub_sa = service_account_target(hub_admin, helm.HUB_NAMESPACE, "citynerve-hub",
                                       installed.scratch / "hub-check")
    sa_api = client.ApiClient(as_hub_sa.client_configuration())
    # Kopf's annotations on Cities (the admission policy keeps their spec and labels the
    # administrator's); Leases and ConfigMaps only inside the cities' namespaces.
    assert _allowed(sa_api, "patch", GROUP, "cities")
    assert not _allowed(sa_api, "patch", "coordination.k8s.io", "leases", "default")
    custom = client.CustomObjectsApi(installed.federation.api_client("hub"))
    for city in CITIES:
        assert joined.agents[city.name].config.city == city.name
        got = wait_for(lambda c=city: _city(custom, c.name), 30, what=f"City {city.name} asks to join")
        assert got["metadata"]["labels"] == {"region": "central", "tier": "pilot"}
        assert got["spec"]["connection"]["heartbeatIntervalSeconds"] == 2
        approve_city(hub_admin, city.name)
    for city in CITIES:
        helm.wait_until_city_ready(hub_admin, city.name, timeout=60)
        assert _allowed(sa_api, "patch", "coordination.k8s.io", "leases", city_namespace(city.name))
    core = client.CoreV1Api(installed.federation.api_client(CITIES[0].cluster))
    key = core.read_namespaced_secret(IDENTITY_SECRET, installed.namespace)
    assert [o.kind for o in key.metadata.owner_references] == ["ServiceAccount"], "goes with the release"


@pytest.mark.timeout(60)
def test_an_onboarded_citys_helm_values_hold_no_join_token(joined: Joined) -> None:
    """`city onboard` put the hub's token in a Secret of the release namespace, where the chart (and
    the agent that joined above) read it; `helm get values` and the release's manifest show none."""
    installed = joined.installed
    fed = installed.federation
    for city in CITIES:
        secret = client.CoreV1Api(fed.api_client(city.cluster)).read_namespaced_secret(
            helm.CITY_BOOTSTRAP_SECRET, installed.namespace)
        encoded = secret.data[helm.BOOTSTRAP_TOKEN_KEY]
        token = base64.b64decode(encoded).decode()
        agent_kubeconfig = joined.agents[city.name].config.bootstrap.kubeconfig
        assert agent_kubeconfig is not None
        assert f"token: {token}" in agent_kubeconfig.read_text(), "the agent joined with the Secret's token"
        printed = {}
        for what in (("values", "-o", "yaml"), ("values", "--all", "-o", "yaml"), ("manifest",)):
            proc = subprocess.run(
                [str(toolchain.binary("helm")), "get", *what, helm.CITY_RELEASE, "--namespace",
                 installed.namespace, "--kubeconfig", str(fed.kubeconfig),
                 "--kube-context", fed.cluster(city.cluster).name],
                capture_output=True, text=True, timeout=60, check=False)
            assert proc.returncode == 0, proc.stderr
            assert token not in proc.stdout, f"helm get {' '.join(what)} shows the token"
            assert encoded not in proc.stdout, f"helm get {' '.join(what)} shows the token (base64)"
            printed[what[0] if len(what) < 4 else "all"] = proc.stdout
        given = yaml.safe_load(printed["values"])  # what the CLI set
        assert given["hub"]["bootstrap"] == {"existingSecret": helm.CITY_BOOTSTRAP_SECRET}


TIER_SCENARIO = "charts-tier-flood"  # stays until the uninstall test: the release takes it along


def _federated_scenario(tier: str) -> dict[str, Any]:
    body: dict[str, Any] = yaml.safe_load((ROOT / "samples" / "hub" / "federatedscenario-urban-flood.yaml")
                                          .read_text())
    body["metadata"] = {"name": TIER_SCENARIO}
    body["spec"]["placement"] = {"citySelector": {"matchLabels": {"tier": tier}}}
    body["spec"].pop("overrides", None)
    return body


@pytest.mark.timeout(180)
def test_a_label_the_chart_proposes_moves_a_federated_scenario_once_accepted(joined: Joined,
                                                                             wait_for: Any) -> None:
    installed = joined.installed
    fed = installed.federation
    hub = client.CustomObjectsApi(fed.api_client("hub"))
    city = CITIES[1]
    city_objects = client.CustomObjectsApi(fed.api_client(city.cluster))
    hub.create_namespaced_custom_object(GROUP, VERSION, "default", "federatedscenarios",
                                        _federated_scenario("production"))

    def status() -> dict[str, Any]:
        got: dict[str, Any] = hub.get_namespaced_custom_object(
            GROUP, VERSION, "default", "federatedscenarios", TIER_SCENARIO)
        return got.get("status") or {}

    wait_for(lambda: status().get("conditions"), 30, what="the FederatedScenario's status")
    assert status()["selectedCities"] == 0, "no city is tier=production yet"

    apps = client.AppsV1Api(fed.api_client(city.cluster))

    def checksum() -> str:
        deployment = apps.read_namespaced_deployment("citynerve-city", installed.namespace)
        return str(deployment.spec.template.metadata.annotations["checksum/config"])

    before = checksum()
    values = installed.scratch / f"{city.name}-production.yaml"
    values.write_text(yaml.safe_dump({
        "city": {"labels": {"tier": "production"}, "heartbeatSeconds": 2, "heartbeatTimeoutSeconds": 8},
        "rbac": {"mode": city.rbac_mode}, "workload": {"mode": city.workload_mode}}))
    assert cli.main(["city", "onboard", city.name, "--kubeconfig", str(fed.kubeconfig),
                     "--hub-context", "hub", "--city-context", fed.cluster(city.cluster).name,
                     "--namespace", installed.namespace, "--values", str(values)]) == 0
    assert checksum() != before, "a changed label rolls the operator pod, and with it the agent"
    joined.restart_agent(city)

    # The chart only proposes: labels place work, so the City keeps its own until the administrator
    # accepts them.
    def proposal() -> dict[str, Any]:
        conditions = ((_city(hub, city.name) or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "LabelsAccepted"), {})

    wait_for(lambda: proposal().get("reason") == "LabelsProposed", 30,
             what=f"City {city.name} shows the labels its chart proposes")
    assert "tier=production" in proposal()["message"]
    assert (_city(hub, city.name) or {})["metadata"]["labels"]["tier"] == "pilot"
    assert status()["selectedCities"] == 0
    hub.patch_cluster_custom_object(GROUP, VERSION, "cities", city.name,
                                    {"metadata": {"labels": {"tier": "production"}}})
    wait_for(lambda: proposal().get("status") == "True", 30, what="the proposal accepted")
    wait_for(lambda: status().get("selectedCities") == 1 and status()["cities"][0]["city"] == city.name
             and status()["cities"][0]["propagated"] == "True", 60,
             what=f"the FederatedScenario placed on and applied in {city.name}")
    applied = city_objects.get_namespaced_custom_object(GROUP, VERSION, installed.namespace, "scenarios",
                                                        TIER_SCENARIO)
    assert [o["kind"] for o in applied["metadata"]["ownerReferences"]] == ["ServiceAccount"]
    # A change to the template reaches the placed city (its work is replaced, then applied).
    hub.patch_namespaced_custom_object(GROUP, VERSION, "default", "federatedscenarios", TIER_SCENARIO,
                                       {"spec": {"template": {"spec": {"replicas": 2}}}})
    wait_for(lambda: city_objects.get_namespaced_custom_object(
        GROUP, VERSION, installed.namespace, "scenarios", TIER_SCENARIO)["spec"]["replicas"] == 2, 30,
        what=f"the changed template applied in {city.name}")
    other = client.CoreV1Api(fed.api_client("hub")).list_namespaced_config_map(
        city_namespace(CITIES[0].name), label_selector="citynerve.io/work=true")
    assert work_name("Scenario", TIER_SCENARIO) not in {cm.metadata.name for cm in other.items}


@pytest.mark.timeout(120)
def test_work_comes_and_goes_in_both_cities(joined: Joined, wait_for: Any) -> None:
    """A SensorType and a FederatedScenario placed by name reach both cities and leave with them."""
    fed = joined.installed.federation
    hub = client.CustomObjectsApi(fed.api_client("hub"))
    sensor_type = yaml.safe_load((ROOT / "samples" / "sensortypes" / "pipe-pressure-gauge.yaml").read_text())
    sensor_type["metadata"] = {"name": "charts-gauge"}
    both = _federated_scenario("any")
    both["metadata"] = {"name": "charts-both"}
    both["spec"]["placement"] = {"cities": [c.name for c in CITIES]}
    hub.create_cluster_custom_object(GROUP, VERSION, "sensortypes", sensor_type)
    hub.create_namespaced_custom_object(GROUP, VERSION, "default", "federatedscenarios", both)

    def present(city: CityRelease) -> tuple[bool, bool]:
        objects = client.CustomObjectsApi(fed.api_client(city.cluster))
        types = {t["metadata"]["name"] for t in objects.list_cluster_custom_object(
            GROUP, VERSION, "sensortypes")["items"]}
        scenarios = {s["metadata"]["name"] for s in objects.list_namespaced_custom_object(
            GROUP, VERSION, joined.installed.namespace, "scenarios")["items"]}
        return "charts-gauge" in types, "charts-both" in scenarios

    try:
        for city in CITIES:
            wait_for(lambda c=city: present(c) == (True, True), 30, what=f"the work in {city.name}")
    finally:
        _delete_quietly(hub.delete_cluster_custom_object, GROUP, VERSION, "sensortypes", "charts-gauge")
        _delete_quietly(hub.delete_namespaced_custom_object, GROUP, VERSION, "default", "federatedscenarios",
                        "charts-both")
    for city in CITIES:
        wait_for(lambda c=city: present(c) == (False, False), 30, what=f"the work gone from {city.name}")


def _city(custom: client.CustomObjectsApi, name: str) -> dict[str, Any] | None:
    try:
        got: dict[str, Any] = custom.get_cluster_custom_object(GROUP, VERSION, "cities", name)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return got


# -- uninstalling ------------------------------------------------------------------------------
_NAMESPACED = ("deployments,replicasets,statefulsets,pods,configmaps,secrets,serviceaccounts,services,roles,"
               "rolebindings,networkpolicies")
# Kept by `helm uninstall` on purpose (helm.sh/resource-policy: keep, docs/broker.md): the key every
# broker password derives from, so a reinstall finds its broker's users and data as they were.
KEPT = "secret/citynerve-broker-key"


def _left_behind(installed: Installed, cluster: str, namespace: str, instance: str) -> list[str]:
    fed = installed.federation
    names: list[str] = fed.kubectl(cluster, "get", _NAMESPACED, "-n", namespace,
                                   "-l", f"{INSTANCE}={instance}", "-o", "name").stdout.split()
    names += fed.kubectl(cluster, "get", "secrets", "-n", namespace, "-l", f"owner=helm,name={instance}",
                         "-o", "name").stdout.split()
    names += fed.kubectl(cluster, "get", "clusterroles,clusterrolebindings", "-l", f"{INSTANCE}={instance}",
                         "-o", "name").stdout.split()
    return names


@pytest.mark.timeout(180)
def test_uninstalling_leaves_nothing_but_the_crds_and_the_hub_marks_the_city_gone(
        joined: Joined, wait_for: Any) -> None:
    installed = joined.installed
    kubeconfig = str(installed.federation.kubeconfig)
    hub = client.CustomObjectsApi(installed.federation.api_client("hub"))
    placed = client.CustomObjectsApi(installed.federation.api_client(CITIES[1].cluster))
    assert placed.list_namespaced_custom_object(GROUP, VERSION, installed.namespace, "scenarios")["items"]
    for city in CITIES:
        assert _left_behind(installed, city.cluster, installed.namespace, helm.CITY_RELEASE)
        # The agents keep running as the operator pods do through their grace period.
        offboard = ["city", "offboard", city.name, "--city-context",
                    installed.federation.cluster(city.cluster).name, "--hub-context", "hub",
                    "--namespace", installed.namespace, "--timeout", "60"]
        if city == CITIES[0]:
            proc = citynerve(*offboard, kubeconfig=kubeconfig)
            assert proc.returncode == 0, proc.stderr
        else:
            assert cli.main([*offboard, "--kubeconfig", kubeconfig]) == 0
        assert joined.agents[city.name].left
        core = client.CoreV1Api(installed.federation.api_client(city.cluster))
        assert helm.CITY_BOOTSTRAP_SECRET not in {s.metadata.name for s in core.list_namespaced_secret(
            installed.namespace).items}, "offboarding deletes the join token the onboarding wrote"
        body = _city(hub, city.name)
        assert body is not None
        assert is_offboarded(body)
        ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "Offboarded")
    for city in CITIES:
        wait_for(lambda c=city: _left_behind(installed, c.cluster, installed.namespace,
                                             helm.CITY_RELEASE) == [KEPT],
                 60, what=f"nothing of the city chart left in {city.cluster} but its broker key")
        core = client.CoreV1Api(installed.federation.api_client(city.cluster))
        objects = client.CustomObjectsApi(installed.federation.api_client(city.cluster))
        # What the agent made in the release namespace went with it (owned by the ServiceAccount).
        wait_for(lambda c=core: not [s for s in c.list_namespaced_secret(installed.namespace).items
                                     if s.metadata.name == IDENTITY_SECRET], 60,
                 what=f"the agent's key Secret collected in {city.cluster}")
        wait_for(lambda o=objects: not o.list_namespaced_custom_object(
            GROUP, VERSION, installed.namespace, "scenarios")["items"], 60,
            what=f"the hub's Scenarios collected in {city.cluster}")
        crds = installed.federation.kubectl(city.cluster, "get", "crd", "-o", "name").stdout.split()
        assert "customresourcedefinition.apiextensions.k8s.io/scenarios.citynerve.io" in crds
        # The hub takes its work back: nothing is placed on a city that left.
        wait_for(lambda c=city: not client.CoreV1Api(installed.federation.api_client("hub"))
                 .list_namespaced_config_map(city_namespace(c.name), label_selector="citynerve.io/work=true")
                 .items, 30, what=f"no work left for {city.name} on the hub")

    assert cli.main(["hub", "uninstall", "--kubeconfig", kubeconfig, "--context", "hub"]) == 0
    wait_for(lambda: not _left_behind(installed, "hub", helm.HUB_NAMESPACE, helm.HUB_RELEASE), 60,
             what="nothing of the hub chart left in the hub")
    crds = installed.federation.kubectl("hub", "get", "crd", "-o", "name").stdout.split()
    assert "customresourcedefinition.apiextensions.k8s.io/cities.citynerve.io" in crds


# -- every permission a chart grants is one its account uses ------------------------------------
def _used(audit_log: Path, username: str) -> set[tuple[str, str, str]]:
    """(group, resource[/subresource], verb) of every request ``username`` made, from the audit log."""
    used = set()
    with audit_log.open("rb") as fh:
        for line in fh:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            ref = entry.get("objectRef") or {}
            if entry.get("user", {}).get("username") != username or not ref.get("resource"):
                continue
            resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            used.add((ref.get("apiGroup", ""), resource, entry["verb"]))
    return used


def _unused(rules: list[dict[str, Any]], used: set[tuple[str, str, str]]) -> list[str]:
    return sorted(f"{verb} {group or 'core'}/{resource}" for rule in rules for group in rule["apiGroups"]
                  for resource in rule["resources"] for verb in rule["verbs"]
                  if (group, resource, verb) not in used)


# Held, yet not requests of the hub's own in this module: the API server checks `approve` on the
# signer while the hub approves a CSR; promotions (their status, Kopf's annotations and Events)
# run in the promotion tests; `patch` on a city's namespace and RBAC repairs drift.
HUB_NOT_USED_HERE = {
    "approve certificates.k8s.io/signers",
    "patch citynerve.io/modelpromotions", "patch citynerve.io/modelpromotions/status",
    "create core/events", "patch core/events", "create events.k8s.io/events", "patch events.k8s.io/events",
    "patch core/namespaces", *(f"patch rbac.authorization.k8s.io/{kind}"
                               for kind in ("roles", "rolebindings", "clusterroles", "clusterrolebindings")),
    # An authorization check when it binds the two installed roles, never a request of its own.
    "bind rbac.authorization.k8s.io/clusterroles",
}


# Server-side apply of a new object is a patch request the API server also authorizes as create;
# AnalyticsModels are pinned by promotions (the promotion tests).
AGENT_NOT_USED_HERE = {
    "create citynerve.io/sensortypes", "create citynerve.io/scenarios", "create citynerve.io/analyticsmodels",
    "patch citynerve.io/analyticsmodels", "delete citynerve.io/analyticsmodels",
}


def _granted_to_cities() -> set[str]:
    """What the hub grants each city: RBAC lets it grant only what it holds itself."""
    rules = [r for m in onboarding.city_access("any") if m["kind"] in ("Role", "ClusterRole")
             for r in m["rules"]]
    return set(_unused(rules, set()))


@pytest.mark.timeout(60)
def test_the_charts_accounts_use_the_permissions_they_hold(joined: Joined) -> None:
    """Least privilege, the other way round: what the join, upgrade and offboarding above did
    as the charts' accounts (the audit log records their requests) covers what they hold."""
    fed = joined.installed.federation
    hub_account = f"system:serviceaccount:{helm.HUB_NAMESPACE}:citynerve-hub"
    hub_used = _used(fed.cluster("hub").audit_log, hub_account)
    unused = set(_unused(hub_rbac.cluster_rules(), hub_used)) - HUB_NOT_USED_HERE - _granted_to_cities()
    assert not unused, f"the hub chart grants what the hub operator never used: {sorted(unused)}"
    account = f"system:serviceaccount:{joined.installed.namespace}:citynerve-city"
    for city in CITIES:
        used = _used(fed.cluster(city.cluster).audit_log, account)
        for rules in (city_rbac.agent_cluster_rules(), city_rbac.agent_work_rules(),
                      city_rbac.agent_release_rules("citynerve-city", "citynerve-city")):
            unused = set(_unused(rules, used)) - AGENT_NOT_USED_HERE
            assert not unused, f"{city.name}'s agent never used {sorted(unused)}"


# -- rendered manifests against the real API servers -------------------------------------------
CHARTS = {"hub": (helm.HUB_CHART, "hub"), "city": (helm.CITY_CHART, "shanghai")}
CI_VALUES = [(chart, path) for chart, (directory, _) in CHARTS.items()
             for path in sorted((directory / "ci").glob("*.yaml"))]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("chart", "values"), CI_VALUES, ids=lambda v: v.name if isinstance(v, Path) else v)
def test_rendered_chart_passes_server_side_dry_run(chart: str, values: Path, federation: Any,
                                                   namespace: str) -> None:
    directory, cluster = CHARTS[chart]
    # The bootstrap identity lives in citynerve-system, which must exist (the CLI creates it).
    federation.kubectl(cluster, "apply", "-f", "-", input=yaml.safe_dump(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": onboarding.SYSTEM_NAMESPACE}}))
    docs = helm.template(directory, yaml.safe_load(values.read_text()) or {}, release=f"citynerve-{chart}",
                         namespace=namespace, include_crds=True)
    proc = federation.kubectl(cluster, "apply", "--server-side", "--force-conflicts", "--dry-run=server",
                              "--field-manager=chart-test", "-f", "-", input=yaml.safe_dump_all(docs),
                              check=False)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == len(docs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("chart", "values"), CI_VALUES, ids=lambda v: v.name if isinstance(v, Path) else v)
def test_chart_pods_are_admitted_under_the_restricted_pod_security_standard(
        chart: str, values: Path, federation: Any, namespace: str) -> None:
    directory, cluster = CHARTS[chart]
    federation.kubectl(cluster, "label", "namespace", namespace,
                       "pod-security.kubernetes.io/enforce=restricted", "--overwrite")
    docs = helm.template(directory, yaml.safe_load(values.read_text()) or {}, release=f"citynerve-{chart}",
                         namespace=namespace)
    pods = []
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        # Dry-run objects are not stored, so the chart's ServiceAccount would not be found.
        spec = {**deployment["spec"]["template"]["spec"], "serviceAccountName": "default"}
        pods.append({"apiVersion": "v1", "kind": "Pod", "spec": spec,
                     "metadata": {"name": deployment["metadata"]["name"], "namespace": namespace}})
    proc = federation.kubectl(cluster, "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(pods),
                              check=False)
    assert proc.returncode == 0, proc.stderr
    assert "violate" not in proc.stderr, proc.stderr


@pytest.mark.timeout(120)
def test_a_heartbeat_timeout_the_city_resource_refuses_fails_the_install_and_makes_no_release(
        federation: Any, namespace: str) -> None:
    """Helm used to report `deployed` and the city never joined: now the install fails, naming both
    values, before any of the release's objects exists (its CRDs, installed first by Helm, were there)."""
    helm_binary = str(toolchain.binary("helm"))
    context = ["--kubeconfig", str(federation.kubeconfig), "--kube-context",
               federation.cluster("shanghai").name, "--namespace", namespace]
    proc = subprocess.run([helm_binary, "install", "bad-heartbeat", str(helm.CITY_CHART), *context,
                           "--set", "city.heartbeatSeconds=30", "--set", "city.heartbeatTimeoutSeconds=30"],
                          capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode != 0
    assert "city.heartbeatTimeoutSeconds (30) must be greater than city.heartbeatSeconds (30)" in proc.stderr
    releases = subprocess.run([helm_binary, "list", "--all", "--short", *context],
                              capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert "bad-heartbeat" not in releases
    labelled = ["-l", f"{INSTANCE}=bad-heartbeat", "-o", "name"]
    for kinds in (["-n", namespace, _NAMESPACED], ["clusterroles,clusterrolebindings"]):
        assert not federation.kubectl("shanghai", "get", *kinds, *labelled).stdout.split(), kinds


@pytest.mark.timeout(120)
def test_offboarding_a_city_the_hub_does_not_know_says_so_in_one_line(federation: Any,
                                                                      namespace: str) -> None:
    """The installed command with its kubeconfig in $KUBECONFIG, no --kubeconfig: nothing is installed
    in the city's namespace and the hub has no such City, each said plainly."""
    proc = citynerve("city", "offboard", "atlantis", "--city-context", federation.cluster("shanghai").name,
                     "--hub-context", "hub", "--namespace", namespace, "--timeout", "10",
                     kubeconfig=str(federation.kubeconfig))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"uninstalled {helm.CITY_RELEASE} (atlantis) from {namespace} of context shanghai" in proc.stdout
    assert proc.stderr.strip() == ("error: City atlantis is not on the hub of context hub, so there is "
                                   "nothing to wait for; check the name and --hub-context")
