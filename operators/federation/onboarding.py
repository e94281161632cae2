"""Joining the federation, as pure functions: identities, RBAC and the certificate request.

The flow follows OCM's accept step, with Kubernetes' own certificate API:

1. The city's agent holds a *bootstrap* credential for the hub, good for two things only:
   creating a City (a join request, ``approved: false``) and a CertificateSigningRequest.
2. It creates its City and a CSR for a key it keeps, for the user ``citynerve:city:<name>``.
3. A hub administrator sets ``spec.approved: true`` on the City. The hub operator then
   creates ``city-<name>`` with the city's narrow RBAC and approves the CSR; the hub's
   controller-manager signs it.
4. The agent swaps to its own certificate, which may read its work, update its Lease and
   report, and write its own City status — nothing else.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from citynerve.operators.federation.placement import AGENT_LEASE, REPORT_CONFIGMAP, city_namespace
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SYSTEM_NAMESPACE = "citynerve-system"
BOOTSTRAP_SERVICE_ACCOUNT = "city-bootstrap"
CITY_GROUP = "citynerve:cities"
CSR_SIGNER = "kubernetes.io/kube-apiserver-client"
CSR_CITY_LABEL = "citynerve.io/city"
MANAGED_BY = {"app.kubernetes.io/managed-by": "citynerve-hub"}


def city_user(city: str) -> str:
    """The Kubernetes user a city's agent is on the hub."""
    return f"citynerve:city:{city}"


def bootstrap_user() -> str:
    return f"system:serviceaccount:{SYSTEM_NAMESPACE}:{BOOTSTRAP_SERVICE_ACCOUNT}"


def bootstrap_rbac() -> list[dict[str, Any]]:
    """The bootstrap identity: create a City and a CSR, read them back. Nothing else."""
    name = "citynerve:city-bootstrap"
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": BOOTSTRAP_SERVICE_ACCOUNT, "namespace": SYSTEM_NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": name, "labels": MANAGED_BY},
         "rules": [
             {"apiGroups": ["citynerve.io"], "resources": ["cities"], "verbs": ["create", "get"]},
             {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
              "verbs": ["create", "get", "list", "watch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": name, "labels": MANAGED_BY},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": BOOTSTRAP_SERVICE_ACCOUNT,
                       "namespace": SYSTEM_NAMESPACE}]},
    ]


def city_access(city: str) -> list[dict[str, Any]]:
    """The namespace, Lease, report and RBAC the hub creates for an approved city.

    The Lease and the report ConfigMap are created by the hub, so the city needs no
    ``create`` (which RBAC cannot narrow to one name).
    """
    ns = city_namespace(city)
    user = {"kind": "User", "name": city_user(city), "apiGroup": "rbac.authorization.k8s.io"}
    labels = {**MANAGED_BY, CSR_CITY_LABEL: city}
    role = "citynerve-city-agent"
    cluster_role = f"citynerve:city:{city}"
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}},
        {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
         "metadata": {"name": AGENT_LEASE, "namespace": ns, "labels": labels},
         "spec": {"holderIdentity": city_user(city)}},
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": REPORT_CONFIGMAP, "namespace": ns, "labels": labels}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": role, "namespace": ns, "labels": labels},
         "rules": [
             # Exactly what the agent does: list and watch its work, patch its report and Lease.
             {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "watch"]},
             {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [REPORT_CONFIGMAP],
              "verbs": ["patch"]},
             {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
              "resourceNames": [AGENT_LEASE], "verbs": ["patch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": role, "namespace": ns, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
         "subjects": [user]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": cluster_role, "labels": labels},
         "rules": [
             {"apiGroups": ["citynerve.io"], "resources": ["cities"], "resourceNames": [city],
              "verbs": ["get"]},
             {"apiGroups": ["citynerve.io"], "resources": ["cities/status"], "resourceNames": [city],
              "verbs": ["patch"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": cluster_role, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
         "subjects": [user]},
    ]


def new_private_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def csr_pem(city: str, key_pem: bytes) -> bytes:
    """A PKCS#10 request for the city's agent identity, signed by its own key."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        msg = "the agent key must be an EC key"
        raise TypeError(msg)
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, city_user(city)),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, CITY_GROUP),
    ])
    request = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM)


def csr_name(city: str, key_pem: bytes) -> str:
    """One CSR per city and key: a restarted agent with the same key finds its request again."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(key_pem)
    return f"citynerve-city-{city}-{digest.finalize().hex()[:10]}"


def csr_manifest(city: str, key_pem: bytes, expiration_seconds: int = 30 * 86400) -> dict[str, Any]:
    return {
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": csr_name(city, key_pem), "labels": {CSR_CITY_LABEL: city}},
        "spec": {
            "request": base64.b64encode(csr_pem(city, key_pem)).decode(),
            "signerName": CSR_SIGNER,
            "usages": ["client auth"],
            "expirationSeconds": expiration_seconds,
        },
    }


def csr_decision(csr: Mapping[str, Any], approved_cities: set[str]) -> tuple[bool, str]:
    """Whether the hub approves a city's CSR, and why (or why not) — a pure decision.

    Approved only if it came from the bootstrap identity, asks for exactly the identity of
    a city the administrator approved, for client auth, from the API-client signer.
    """
    spec = csr.get("spec", {})
    city = (csr.get("metadata", {}).get("labels") or {}).get(CSR_CITY_LABEL)
    if not city:
        return False, "the request names no city"
    if spec.get("username") != bootstrap_user():
        return False, f"requested by {spec.get('username')!r}, not the bootstrap identity"
    if spec.get("signerName") != CSR_SIGNER or set(spec.get("usages", [])) != {"client auth"}:
        return False, "only client certificates from the API-client signer are issued"
    try:
        request = x509.load_pem_x509_csr(base64.b64decode(spec["request"]))
    except (KeyError, ValueError):
        return False, "the request is not a PEM certificate request"
    cns = [a.value for a in request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    orgs = [a.value for a in request.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    if cns != [city_user(city)] or orgs != [CITY_GROUP]:
        return False, f"the subject must be CN={city_user(city)}, O={CITY_GROUP}"
    if city not in approved_cities:
        return False, f"City {city} is not approved yet"
    return True, f"City {city} is approved"
