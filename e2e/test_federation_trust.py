"""Joining carries no authority: each attack on the federation's trust, against real API servers.

The hub runs its admission policies and the hub operator runs as a ServiceAccount holding exactly
``operators/hub/rbac.py``'s rules. Attackers hold what a city's IT department is handed (its
bootstrap token), or a city's own certificate; each attempt fails with a refusal naming the rule,
and the legitimate path (join, approve, renew, re-key with approval) still works.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from citynerve.operators.city.rbac import IDENTITY_SECRET
from citynerve.operators.federation import onboarding
from citynerve.operators.federation.agent import AgentConfig, CityAgent
from citynerve.operators.federation.embedded import (
    approve_city,
    bootstrap_kubeconfig,
    install_crds,
    install_hub_trust,
    join_request,
)
from citynerve.operators.federation.placement import AGENT_LEASE, REPORT_CONFIGMAP, city_namespace
from citynerve.operators.hub import rbac as hub_rbac
from citynerve.operators.hub.handlers import build_registry as build_hub_registry
from citynerve.operators.hub.status import LABELS_KEY, REPORT_KEY
from citynerve.operators.kube import Kube
from citynerve.operators.runtime import InProcessOperator, KubeTarget, OperatorOptions, service_account_target
from kubernetes import client

pytestmark = pytest.mark.e2e
GROUP, VERSION = "citynerve.io", "v1alpha1"
HUB_ACCOUNT = "citynerve-hub-trust"


@dataclasses.dataclass
class Hub:
    federation: Any
    scratch: Path
    hub_account: client.ApiClient  # the hub operator's own identity

    @property
    def admin(self) -> KubeTarget:
        return KubeTarget(self.federation.kubeconfig, "hub")

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.federation.api_client("hub"))

    def bootstrap(self, city: str) -> client.ApiClient:
        """A client holding the join credential a city's IT department is handed."""
        path = bootstrap_kubeconfig(self.admin, city, self.scratch / f"boot-{city}")
        return client.ApiClient(KubeTarget(path, "hub").client_configuration())

    def city(self, name: str) -> dict[str, Any] | None:
        try:
            got: dict[str, Any] = self.custom.get_cluster_custom_object(GROUP, VERSION, "cities", name)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return got

    def as_city(self, name: str, cert_pem: bytes, key_pem: bytes) -> client.ApiClient:
        """A client holding a city's own certificate."""
        folder = self.scratch / f"as-{name}"
        folder.mkdir(exist_ok=True)
        (folder / "tls.crt").write_bytes(cert_pem)
        (folder / "tls.key").write_bytes(key_pem)
        cfg = client.Configuration()
        hub_cfg = self.admin.client_configuration()
        cfg.host, cfg.ssl_ca_cert = hub_cfg.host, hub_cfg.ssl_ca_cert
        cfg.cert_file, cfg.key_file = str(folder / "tls.crt"), str(folder / "tls.key")
        return client.ApiClient(cfg)


def _forget(hub_api: client.ApiClient, city: str) -> None:
    """Remove a test city's hub side, so that the shared federation stays as other modules expect."""
    custom, core = client.CustomObjectsApi(hub_api), client.CoreV1Api(hub_api)
    rbac, certs = client.RbacAuthorizationV1Api(hub_api), client.CertificatesV1Api(hub_api)
    calls = [
        (custom.delete_cluster_custom_object, (GROUP, VERSION, "cities", city)),
        (core.delete_namespace, (city_namespace(city),)),
        (core.delete_namespaced_service_account,
         (onboarding.bootstrap_account(city), onboarding.SYSTEM_NAMESPACE)),
        (rbac.delete_cluster_role, (f"citynerve:city-bootstrap:{city}",)),
        (rbac.delete_cluster_role_binding, (f"citynerve:city-bootstrap:{city}",)),
        (rbac.delete_cluster_role, (onboarding.city_user(city),)),
        (rbac.delete_cluster_role_binding, (onboarding.city_user(city),)),
        (rbac.delete_cluster_role_binding, (f"{onboarding.city_user(city)}:renewal",)),
    ]
    listed = certs.list_certificate_signing_request(label_selector=f"{onboarding.CSR_CITY_LABEL}={city}")
    calls.extend((certs.delete_certificate_signing_request, (csr.metadata.name,)) for csr in listed.items)
    for call, args in calls:
        try:
            call(*args)
        except client.ApiException as exc:
            if exc.status != 404:
                raise


CITIES = ("trust-self", "trust-a", "trust-b", "trust-t", "trust-r")


@pytest.fixture(scope="module")
def hub(federation: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    scratch = tmp_path_factory.mktemp("trust")
    admin = KubeTarget(federation.kubeconfig, "hub")
    install_crds(admin)
    install_crds(KubeTarget(federation.kubeconfig, "shanghai"))
    install_hub_trust(admin)
    kube = Kube(federation.api_client("hub"))
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": HUB_ACCOUNT}, "rules": hub_rbac.cluster_rules()}
    for manifest in (
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": onboarding.SYSTEM_NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": HUB_ACCOUNT, "namespace": onboarding.SYSTEM_NAMESPACE}},
        role,
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": HUB_ACCOUNT},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": HUB_ACCOUNT},
         "subjects": [{"kind": "ServiceAccount", "name": HUB_ACCOUNT,
                       "namespace": onboarding.SYSTEM_NAMESPACE}]},
    ):
        kube.apply(manifest, field_manager="citynerve-test")
    as_hub = service_account_target(admin, onboarding.SYSTEM_NAMESPACE, HUB_ACCOUNT, scratch / "hub")
    options = OperatorOptions(name="hub-trust", target=as_hub)
    operator = InProcessOperator(options, build_hub_registry(options, 1.0)).start()
    for city in CITIES:
        _forget(federation.api_client("hub"), city)
    try:
        yield Hub(federation, scratch, client.ApiClient(as_hub.client_configuration()))
    finally:
        operator.stop()
        for city in CITIES:
            _forget(federation.api_client("hub"), city)
        for namespace in ("citynerve-trust-r", "trust-r-work"):
            try:
                client.CoreV1Api(federation.api_client("shanghai")).delete_namespace(namespace)
            except client.ApiException as exc:
                if exc.status != 404:
                    raise


def _refused(call: Any, *args: Any, **kwargs: Any) -> str:
    """Call; it must be refused (403 or 422). Returns the API server's message."""
    with pytest.raises(client.ApiException) as raised:
        call(*args, **kwargs)
    assert raised.value.status in (403, 422), raised.value
    return str(json.loads(raised.value.body or "{}").get("message", raised.value.body))


def _join_request(city: str, key: bytes, approved: bool = False) -> dict[str, Any]:
    body = join_request(city, heartbeat_seconds=2, timeout_seconds=8)
    body["spec"]["agentKeyFingerprint"] = onboarding.key_fingerprint(key)
    body["spec"]["approved"] = approved
    return body


def _issued(hub: Hub, name: str) -> str | None:
    csr = client.CertificatesV1Api(hub.federation.api_client("hub")).read_certificate_signing_request(name)
    return str(csr.status.certificate) if csr.status and csr.status.certificate else None


def _exists(call: Any, *args: Any) -> bool:
    try:
        call(*args)
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


# -- attack 1: self-approval --------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_a_join_request_cannot_approve_itself_and_a_refused_one_leaves_nothing(hub: Hub) -> None:
    boot = client.CustomObjectsApi(hub.bootstrap("trust-self"))
    key = onboarding.new_private_key_pem()
    message = _refused(boot.create_cluster_custom_object, GROUP, VERSION, "cities",
                       _join_request("trust-self", key, approved=True))
    assert "only a hub administrator approves" in message
    time.sleep(2)  # what the hub would have done at creation, it had the time to do
    admin_core = client.CoreV1Api(hub.federation.api_client("hub"))
    assert hub.city("trust-self") is None
    assert not _exists(admin_core.read_namespace, city_namespace("trust-self"))
    assert not _exists(client.RbacAuthorizationV1Api(hub.federation.api_client("hub")).read_cluster_role,
                       onboarding.city_user("trust-self"))
    # The join request itself is fine, and cannot be approved afterwards by its sender or the hub.
    boot.create_cluster_custom_object(GROUP, VERSION, "cities", _join_request("trust-self", key))
    _refused(boot.patch_cluster_custom_object, GROUP, VERSION, "cities", "trust-self",
             {"spec": {"approved": True}})
    as_hub = client.CustomObjectsApi(hub.hub_account)
    message = _refused(as_hub.patch_cluster_custom_object, GROUP, VERSION, "cities", "trust-self",
                       {"spec": {"approved": True}})
    assert "only a hub administrator" in message
    _refused(as_hub.patch_cluster_custom_object, GROUP, VERSION, "cities", "trust-self",
             {"metadata": {"labels": {"tier": "gold"}}})
    assert not (hub.city("trust-self") or {})["spec"]["approved"]


# -- attack 4: bootstrap reach; two cities joining at once ---------------------------------------
@pytest.mark.timeout(60)
def test_a_join_credential_reaches_its_own_city_only(hub: Hub) -> None:
    a, b = hub.bootstrap("trust-a"), hub.bootstrap("trust-b")
    key_a, key_b = onboarding.new_private_key_pem(), onboarding.new_private_key_pem()
    custom_a, certs_a = client.CustomObjectsApi(a), client.CertificatesV1Api(a)
    # Pre-registering another city's future name, with exports that city never chose.
    squat = _join_request("trust-b", key_a)
    squat["spec"]["dataResidency"]["exports"] = ["raw-readings"]
    assert "own City only" in _refused(custom_a.create_cluster_custom_object, GROUP, VERSION, "cities", squat)
    # Both join at the same time, each with its own token.
    custom_a.create_cluster_custom_object(GROUP, VERSION, "cities", _join_request("trust-a", key_a))
    client.CustomObjectsApi(b).create_cluster_custom_object(GROUP, VERSION, "cities",
                                                            _join_request("trust-b", key_b))
    assert custom_a.get_cluster_custom_object(GROUP, VERSION, "cities", "trust-a")["metadata"]["name"]
    _refused(custom_a.get_cluster_custom_object, GROUP, VERSION, "cities", "trust-b")
    _refused(custom_a.get_cluster_custom_object, GROUP, VERSION, "cities", "shanghai")
    _refused(custom_a.list_cluster_custom_object, GROUP, VERSION, "cities")
    _refused(certs_a.list_certificate_signing_request)
    # Certificate requests: its own one, for its own city, and no other.
    other = onboarding.csr_manifest("trust-b", key_a)
    assert "citynerve-join-trust-a" in _refused(certs_a.create_certificate_signing_request, other)
    relabelled = onboarding.csr_manifest("trust-a", key_a)
    relabelled["metadata"]["labels"][onboarding.CSR_CITY_LABEL] = "trust-b"
    assert "must name trust-a" in _refused(certs_a.create_certificate_signing_request, relabelled)
    long_lived = onboarding.csr_manifest("trust-a", key_a, expiration_seconds=30 * 86400)
    assert "expirationSeconds" in _refused(certs_a.create_certificate_signing_request, long_lived)
    for i in range(20):  # once unlimited: now any name but its one is refused
        flood = onboarding.csr_manifest("trust-a", key_a)
        flood["metadata"]["name"] = f"citynerve-join-trust-a-{i}"
        _refused(certs_a.create_certificate_signing_request, flood)
    certs_a.create_certificate_signing_request(onboarding.csr_manifest("trust-a", key_a))
    with pytest.raises(client.ApiException) as again:  # one at a time
        certs_a.create_certificate_signing_request(onboarding.csr_manifest("trust-a", key_a))
    assert again.value.status == 409
    # Approving one city affects the other in nothing.
    approve_city(hub.admin, "trust-a")
    _wait(lambda: _issued(hub, "citynerve-join-trust-a"), 30, "trust-a's certificate")
    assert not (hub.city("trust-b") or {})["spec"]["approved"]
    assert not _exists(client.CoreV1Api(hub.federation.api_client("hub")).read_namespace, "city-trust-b")


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


# -- attacks 2 and 3: identity theft, label hijack ------------------------------------------------
@pytest.mark.timeout(90)
def test_a_stolen_name_gets_no_certificate_and_a_city_cannot_steer_its_placement(hub: Hub) -> None:
    key = onboarding.new_private_key_pem()
    boot = hub.bootstrap("trust-t")
    client.CustomObjectsApi(boot).create_cluster_custom_object(GROUP, VERSION, "cities",
                                                               _join_request("trust-t", key))
    certs = client.CertificatesV1Api(boot)
    certs.create_certificate_signing_request(onboarding.csr_manifest("trust-t", key))
    approve_city(hub.admin, "trust-t")
    cert = base64.b64decode(_wait(lambda: _issued(hub, "citynerve-join-trust-t"), 30, "the certificate"))

    # The join token leaks: the thief replaces the request with one for a key of its own.
    thief_key = onboarding.new_private_key_pem()
    certs.delete_certificate_signing_request("citynerve-join-trust-t")
    certs.create_certificate_signing_request(onboarding.csr_manifest("trust-t", thief_key))
    time.sleep(4)
    assert _issued(hub, "citynerve-join-trust-t") is None, "a request for another key is never signed"
    events = client.CoreV1Api(hub.federation.api_client("hub")).list_namespaced_event(
        "default", field_selector="involvedObject.name=trust-t")
    assert any(e.reason == "CertificateRequestPending" and "agentKeyFingerprint" in e.message
               for e in events.items)

    # The city itself: it may report, never relabel or re-key itself.
    as_city = hub.as_city("trust-t", cert, key)
    city_custom = client.CustomObjectsApi(as_city)
    _refused(city_custom.patch_cluster_custom_object, GROUP, VERSION, "cities", "trust-t",
             {"metadata": {"labels": {"region": "west"}}})
    _refused(city_custom.patch_cluster_custom_object, GROUP, VERSION, "cities", "trust-t",
             {"spec": {"agentKeyFingerprint": onboarding.key_fingerprint(thief_key)}})
    _refused(client.CertificatesV1Api(as_city).create_certificate_signing_request,
             onboarding.csr_manifest("trust-a", key, renewal=True))
    report = {"objects": {}, "incidents": [], LABELS_KEY: {"region": "west", "tier": "bronze"}}
    client.CoreV1Api(as_city).patch_namespaced_config_map(
        REPORT_CONFIGMAP, city_namespace("trust-t"), {"data": {REPORT_KEY: json.dumps(report)}})

    def proposal() -> dict[str, Any]:
        conditions = ((hub.city("trust-t") or {}).get("status") or {}).get("conditions") or []
        return next((c for c in conditions if c["type"] == "LabelsAccepted"), {})

    _wait(lambda: proposal().get("reason") == "LabelsProposed", 20, "the proposed labels shown")
    labels = (hub.city("trust-t") or {})["metadata"]["labels"]
    assert labels.get("region") == "central"
    assert "tier" not in labels
    # Another city's identity reaches none of it.
    _refused(client.CoreV1Api(as_city).patch_namespaced_config_map, REPORT_CONFIGMAP,
             city_namespace("trust-a"), {"data": {REPORT_KEY: "{}"}})
    _refused(client.CoordinationV1Api(as_city).patch_namespaced_lease, AGENT_LEASE,
             city_namespace("trust-a"), {"spec": {"renewTime": "2026-01-01T00:00:00.000000Z"}})


# -- the legitimate path: a real agent renews its certificate, and re-keys with approval ----------
def _agent(hub: Hub, *, renew_after: float) -> CityAgent:
    cfg = hub.admin.client_configuration()
    return CityAgent(AgentConfig(
        city="trust-r", city_target=KubeTarget(hub.federation.kubeconfig, "shanghai"),
        hub_server=cfg.host, hub_ca_pem=Path(cfg.ssl_ca_cert).read_bytes(),
        bootstrap=KubeTarget(bootstrap_kubeconfig(hub.admin, "trust-r", hub.scratch / "boot-r"), "hub"),
        join_request=join_request("trust-r", heartbeat_seconds=2, timeout_seconds=8),
        work_namespace="trust-r-work", heartbeat_seconds=2, scratch=hub.scratch / "agent-r",
        namespace="citynerve-trust-r", certificate_seconds=600, renew_after=renew_after,
    )).start()


def _identity_in_city(federation: Any, key: str) -> bytes | None:
    """``tls.crt`` or ``tls.key`` of trust-r's agent identity Secret in its city (None: not yet)."""
    try:
        secret = client.CoreV1Api(federation.api_client("shanghai")).read_namespaced_secret(
            IDENTITY_SECRET, "citynerve-trust-r")
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    pem = (secret.data or {}).get(key)
    return base64.b64decode(pem) if pem else None


def _serial(federation: Any) -> int | None:
    from cryptography import x509  # noqa: PLC0415

    pem = _identity_in_city(federation, "tls.crt")
    return x509.load_pem_x509_certificate(pem).serial_number if pem else None


@pytest.mark.timeout(150)
def test_an_agent_renews_its_certificate_without_a_gap_and_re_keys_only_with_approval(hub: Hub) -> None:
    agent = _agent(hub, renew_after=0.0)  # renew as soon as possible, again and again
    lease_api = client.CoordinationV1Api(hub.federation.api_client("hub"))
    try:
        _wait(lambda: hub.city("trust-r"), 30, "trust-r's join request")
        assert (hub.city("trust-r") or {})["spec"]["agentKeyFingerprint"].startswith("sha256:")
        approve_city(hub.admin, "trust-r")
        first = _wait(lambda: _serial(hub.federation), 30, "trust-r's first certificate")
        serials, renewals = {first}, []
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and len(serials) < 3:
            lease = lease_api.read_namespaced_lease(AGENT_LEASE, city_namespace("trust-r"))
            if lease.spec.renew_time is not None:
                renewals.append(lease.spec.renew_time)
            serial = _serial(hub.federation)
            if serial is not None:
                serials.add(serial)
            time.sleep(0.5)
        assert len(serials) >= 3, "the agent renewed its certificate twice"
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(renewals)]
        assert max(gaps) < 8, f"heartbeats went on through the renewals (largest gap {max(gaps):.1f} s)"
    finally:
        agent.stop()

    # The key is lost: a new agent with a new key asks again, and waits for the administrator.
    client.CoreV1Api(hub.federation.api_client("shanghai")).delete_namespaced_secret(
        IDENTITY_SECRET, "citynerve-trust-r")
    agent = _agent(hub, renew_after=2 / 3)
    try:
        new_key = _wait(lambda: _identity_in_city(hub.federation, "tls.key"), 30, "the new key")
        _wait(lambda: _exists(client.CertificatesV1Api(hub.federation.api_client("hub"))
                              .read_certificate_signing_request, "citynerve-join-trust-r"), 30,
              "the new join request")
        time.sleep(3)
        assert _issued(hub, "citynerve-join-trust-r") is None, "a new key waits for the administrator"
        assert agent.hub_api is None
        hub.custom.patch_cluster_custom_object(GROUP, VERSION, "cities", "trust-r", {
            "spec": {"agentKeyFingerprint": onboarding.key_fingerprint(new_key)}})
        _wait(lambda: agent.hub_api is not None and agent.cycles > 0, 30, "the re-keyed agent joined")
    finally:
        agent.stop()
