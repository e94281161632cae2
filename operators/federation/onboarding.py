"""Joining the federation, as pure functions: identities, RBAC, admission and certificates.

The flow follows OCM's accept step, with Kubernetes' own certificate API, and every rule that
keeps it honest is enforced by the hub's API server (RBAC and ValidatingAdmissionPolicies), not
by the hub operator's good behaviour:

1. A hub administrator *invites* a city: a bootstrap ServiceAccount ``city-bootstrap-<name>``
   good for that one name. It may create the City ``<name>`` (a join request: never approved,
   recording the fingerprint of the agent's public key), read that City, and create, read and
   delete one certificate request, ``citynerve-join-<name>``. Nothing else.
2. The agent creates its City and that CSR for a key it keeps in its own cluster.
3. A hub administrator reviews the request (name, labels, key fingerprint) and sets
   ``spec.approved: true``. Only members of :data:`HUB_ADMIN_GROUPS` may approve, re-key or
   relabel a City: the admission policy refuses anyone else, the hub operator included.
4. The hub operator creates ``city-<name>`` with the city's narrow RBAC and approves the CSR
   only if it asks for that city's identity *and* that key; the controller-manager signs it.
5. The agent swaps to its short-lived certificate and renews it before expiry with its own
   identity (CSR ``citynerve-renew-<name>``, same key); a new key needs the administrator again.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from citynerve.operators.api.crdgen import REPO_ROOT
from citynerve.operators.federation.placement import AGENT_LEASE, REPORT_CONFIGMAP, city_namespace
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SYSTEM_NAMESPACE = "citynerve-system"
BOOTSTRAP_ACCOUNT_PREFIX = "city-bootstrap-"
CITY_USER_PREFIX = "citynerve:city:"
CITY_GROUP = "citynerve:cities"
CSR_SIGNER = "kubernetes.io/kube-apiserver-client"
CSR_CITY_LABEL = "citynerve.io/city"
MANAGED_BY = {"app.kubernetes.io/managed-by": "citynerve-hub"}
# Who may approve, re-key and relabel a City on the hub: cluster administrators and the
# federation's own administrators group.
HUB_ADMIN_GROUPS = ("system:masters", "citynerve:hub-admins")
# Certificates a city's agent is issued: short-lived, renewed by the agent (Kubernetes' minimum
# is 600 s); the admission policy refuses requests for longer.
CERTIFICATE_SECONDS = 3600
MAX_CERTIFICATE_SECONDS = 86_400
# The ClusterRoles an administrator installs with the hub and the hub operator may only *bind*:
# a city's right to request its renewal, and the hub operator's writes in a city's namespace.
CITY_RENEWAL_ROLE = "citynerve:city-certificate-renewal"
HUB_CITY_NAMESPACE_ROLE = "citynerve:hub-in-city-namespace"
CITY_POLICY = "citynerve-city-approval"
CSR_POLICY = "citynerve-city-certificate-requests"


def city_user(city: str) -> str:
    """The Kubernetes user a city's agent is on the hub."""
    return f"{CITY_USER_PREFIX}{city}"


def bootstrap_account(city: str) -> str:
    """The ServiceAccount (in :data:`SYSTEM_NAMESPACE`) a city's join credential belongs to."""
    return f"{BOOTSTRAP_ACCOUNT_PREFIX}{city}"


def bootstrap_user(city: str) -> str:
    return f"system:serviceaccount:{SYSTEM_NAMESPACE}:{bootstrap_account(city)}"


def join_csr_name(city: str) -> str:
    """The one certificate request a city's bootstrap identity may make."""
    return f"citynerve-join-{city}"


def renew_csr_name(city: str) -> str:
    """The one certificate request a joined city's own identity may make (same key, renewal)."""
    return f"citynerve-renew-{city}"


def bootstrap_rbac(city: str) -> list[dict[str, Any]]:
    """A city's bootstrap identity: its join request and its one CSR, nothing else.

    RBAC cannot narrow ``create`` to a name; the admission policies do (:func:`admission_policies`).
    """
    name = f"citynerve:city-bootstrap:{city}"
    labels = {**MANAGED_BY, CSR_CITY_LABEL: city}
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM_NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": bootstrap_account(city), "namespace": SYSTEM_NAMESPACE, "labels": labels},
         "automountServiceAccountToken": False},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": name, "labels": labels},
         "rules": [
             {"apiGroups": ["citynerve.io"], "resources": ["cities"], "verbs": ["create"]},
             {"apiGroups": ["citynerve.io"], "resources": ["cities"], "resourceNames": [city],
              "verbs": ["get"]},
             {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
              "verbs": ["create"]},
             {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
              "resourceNames": [join_csr_name(city)], "verbs": ["get", "delete"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": name, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": bootstrap_account(city),
                       "namespace": SYSTEM_NAMESPACE}]},
    ]


def _is_admin() -> str:
    groups = ", ".join(f"'{g}'" for g in HUB_ADMIN_GROUPS)
    return f"request.userInfo.groups.exists(g, g in [{groups}])"


def admission_policies() -> list[dict[str, Any]]:
    """The hub's ValidatingAdmissionPolicies (and bindings) that make joining carry no authority.

    - ``citynerve-city-approval``: only a hub administrator creates an approved City or changes a
      City's spec (approval, agent key) or labels; a bootstrap identity creates only its own City.
    - ``citynerve-city-certificate-requests``: a bootstrap identity or a city may request only its
      own one certificate, for its own city, as an API client, short-lived.
    """
    boot_prefix = f"system:serviceaccount:{SYSTEM_NAMESPACE}:{BOOTSTRAP_ACCOUNT_PREFIX}"
    api = "admissionregistration.k8s.io/v1"
    labels = dict(MANAGED_BY)

    def binding(policy: str) -> dict[str, Any]:
        return {"apiVersion": api, "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": {"name": policy, "labels": labels},
                "spec": {"policyName": policy, "validationActions": ["Deny"]}}

    approved = "(has(object.spec.approved) && object.spec.approved)"
    labels_of = "(has({o}.metadata.labels) ? {o}.metadata.labels : {{}})"
    city_policy = {
        "apiVersion": api, "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": CITY_POLICY, "labels": labels},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["citynerve.io"], "apiVersions": ["*"], "resources": ["cities"],
                "operations": ["CREATE", "UPDATE"]}]},
            "variables": [
                {"name": "admin", "expression": _is_admin()},
                {"name": "bootstrap", "expression": f"request.userInfo.username.startsWith('{boot_prefix}')"},
            ],
            "validations": [
                {"expression": f"request.operation != 'CREATE' || variables.admin || !{approved}",
                 "message": "spec.approved: a join request cannot approve itself; only a hub administrator "
                            "approves a City", "reason": "Forbidden"},
                {"expression": "!variables.bootstrap || request.userInfo.username == "
                               f"'{boot_prefix}' + object.metadata.name",
                 "message": "metadata.name: a city's join credential is good for its own City only",
                 "reason": "Forbidden"},
                {"expression": "request.operation != 'UPDATE' || variables.admin || "
                               "object.spec == oldObject.spec",
                 "message": "spec: only a hub administrator changes a City's spec (approval, agent key, "
                            "connection, data residency)", "reason": "Forbidden"},
                {"expression": "request.operation != 'UPDATE' || variables.admin || "
                               f"{labels_of.format(o='object')} == {labels_of.format(o='oldObject')}",
                 "message": "metadata.labels: labels place work; only a hub administrator changes them",
                 "reason": "Forbidden"},
            ],
        },
    }
    csr_policy = {
        "apiVersion": api, "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": CSR_POLICY, "labels": labels},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["certificates.k8s.io"], "apiVersions": ["*"],
                "resources": ["certificatesigningrequests"], "operations": ["CREATE"]}]},
            # Only the federation's identities are constrained; nobody else holds `create` here
            # through CityNerve.
            "matchConditions": [{"name": "federation-identity", "expression":
                                 f"request.userInfo.username.startsWith('{boot_prefix}') || "
                                 f"request.userInfo.username.startsWith('{CITY_USER_PREFIX}')"}],
            "variables": [
                {"name": "bootstrap", "expression": f"request.userInfo.username.startsWith('{boot_prefix}')"},
                {"name": "city", "expression":
                 f"variables.bootstrap ? request.userInfo.username.substring({len(boot_prefix)}) : "
                 f"request.userInfo.username.substring({len(CITY_USER_PREFIX)})"},
                {"name": "expectedName", "expression":
                 "(variables.bootstrap ? 'citynerve-join-' : 'citynerve-renew-') + variables.city"},
            ],
            "validations": [
                {"expression": "object.metadata.name == variables.expectedName",
                 "messageExpression": "'metadata.name: this identity may request one certificate, named ' "
                                      "+ variables.expectedName", "reason": "Forbidden"},
                {"expression": f"has(object.metadata.labels) && '{CSR_CITY_LABEL}' in object.metadata.labels "
                               f"&& object.metadata.labels['{CSR_CITY_LABEL}'] == variables.city",
                 "messageExpression": f"'metadata.labels[{CSR_CITY_LABEL}]: must name ' + variables.city",
                 "reason": "Forbidden"},
                {"expression": f"object.spec.signerName == '{CSR_SIGNER}' && "
                               "has(object.spec.usages) && object.spec.usages == ['client auth']",
                 "message": f"spec.signerName, spec.usages: only {CSR_SIGNER} client certificates",
                 "reason": "Forbidden"},
                {"expression": "has(object.spec.expirationSeconds) && "
                               f"object.spec.expirationSeconds <= {MAX_CERTIFICATE_SECONDS}",
                 "message": f"spec.expirationSeconds: a city's certificate lives at most "
                            f"{MAX_CERTIFICATE_SECONDS} s", "reason": "Forbidden"},
            ],
        },
    }
    return [city_policy, binding(CITY_POLICY), csr_policy, binding(CSR_POLICY)]


def hub_install_rbac() -> list[dict[str, Any]]:
    """ClusterRoles the administrator installs and the hub operator may only bind, never widen.

    - :data:`CITY_RENEWAL_ROLE`: create a CSR (the admission policy narrows it to the city's own
      renewal); bound by the hub to each approved city's user.
    - :data:`HUB_CITY_NAMESPACE_ROLE`: the hub operator's writes in a city's namespace (its work,
      report and Lease); bound by the hub inside each ``city-<name>``, so it can write ConfigMaps
      and Leases nowhere else.
    """
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": CITY_RENEWAL_ROLE, "labels": dict(MANAGED_BY)},
         "rules": [{"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
                    "verbs": ["create"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": HUB_CITY_NAMESPACE_ROLE, "labels": dict(MANAGED_BY)},
         "rules": [
             # Its work (replaced when it changes), the report and Lease it creates for the city;
             # patch is granted to the city on its report and Lease, so the hub holds it there too.
             {"apiGroups": [""], "resources": ["configmaps"],
              "verbs": ["create", "update", "patch", "delete"]},
             {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create", "patch"]},
         ]},
    ]


def city_access(city: str, hub_account: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """The namespace, hub write access, Lease, report and RBAC the hub creates for an approved city.

    ``hub_account`` (namespace, name) is the hub operator's ServiceAccount: it is bound to
    :data:`HUB_CITY_NAMESPACE_ROLE` in the city's namespace first, so its writes there need no
    cluster-wide ConfigMap rights. ``None`` (an administrator's own run) binds nothing.
    The Lease and the report ConfigMap are created by the hub, so the city needs no
    ``create`` (which RBAC cannot narrow to one name).
    """
    ns = city_namespace(city)
    user = {"kind": "User", "name": city_user(city), "apiGroup": "rbac.authorization.k8s.io"}
    labels = {**MANAGED_BY, CSR_CITY_LABEL: city}
    role = "citynerve-city-agent"
    cluster_role = f"citynerve:city:{city}"
    manifests: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}}]
    if hub_account is not None:
        manifests.append(
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "citynerve-hub", "namespace": ns, "labels": labels},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": HUB_CITY_NAMESPACE_ROLE},
             "subjects": [{"kind": "ServiceAccount", "namespace": hub_account[0], "name": hub_account[1]}]})
    return [*manifests,
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
             # Its certificate renewal (creating it is the shared renewal role's).
             {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
              "resourceNames": [renew_csr_name(city)], "verbs": ["get", "delete"]},
         ]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": cluster_role, "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
         "subjects": [user]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": f"{cluster_role}:renewal", "labels": labels},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                     "name": CITY_RENEWAL_ROLE},
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


def key_fingerprint(key_pem: bytes) -> str:
    """``sha256:<hex>`` of a private or public key's public half (DER SubjectPublicKeyInfo)."""
    try:
        public = serialization.load_pem_private_key(key_pem, password=None).public_key()
    except (ValueError, TypeError):
        public = serialization.load_pem_public_key(key_pem)
    return _spki_fingerprint(public)


def _spki_fingerprint(public: Any) -> str:
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def csr_manifest(city: str, key_pem: bytes, *, renewal: bool = False,
                 expiration_seconds: int = CERTIFICATE_SECONDS) -> dict[str, Any]:
    """The city's one join request (bootstrap identity) or renewal (its own identity)."""
    return {
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": renew_csr_name(city) if renewal else join_csr_name(city),
                     "labels": {CSR_CITY_LABEL: city}},
        "spec": {
            "request": base64.b64encode(csr_pem(city, key_pem)).decode(),
            "signerName": CSR_SIGNER,
            "usages": ["client auth"],
            "expirationSeconds": expiration_seconds,
        },
    }


def csr_key_fingerprint(csr: Mapping[str, Any]) -> str | None:
    """The fingerprint of the key a CSR asks a certificate for (None: not a PEM request)."""
    try:
        request = x509.load_pem_x509_csr(base64.b64decode(csr.get("spec", {})["request"]))
    except (KeyError, ValueError, TypeError):
        return None
    return _spki_fingerprint(request.public_key())


def csr_decision(csr: Mapping[str, Any], cities: Mapping[str, Mapping[str, Any]]) -> tuple[bool, str]:
    """Whether the hub approves a city's CSR, and why (or why not) — a pure decision.

    Approved only if it is the city's own join request (from its bootstrap identity) or renewal
    (from the city itself), asks for exactly that city's identity, for client auth, from the
    API-client signer, for the key the administrator approved with the City.
    """
    meta, spec = csr.get("metadata", {}), csr.get("spec", {})
    city = (meta.get("labels") or {}).get(CSR_CITY_LABEL)
    if not city:
        return False, "the request names no city"
    requester = spec.get("username")
    expected = {bootstrap_user(city): join_csr_name(city), city_user(city): renew_csr_name(city)}
    if requester not in expected:
        return False, f"requested by {requester!r}, neither {city}'s join credential nor {city} itself"
    if meta.get("name") != expected[requester]:
        return False, f"{requester} may only request {expected[requester]}"
    if spec.get("signerName") != CSR_SIGNER or set(spec.get("usages", [])) != {"client auth"}:
        return False, "only client certificates from the API-client signer are issued"
    try:
        request = x509.load_pem_x509_csr(base64.b64decode(spec["request"]))
    except (KeyError, ValueError, TypeError):
        return False, "the request is not a PEM certificate request"
    cns = [a.value for a in request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    orgs = [a.value for a in request.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    if cns != [city_user(city)] or orgs != [CITY_GROUP]:
        return False, f"the subject must be CN={city_user(city)}, O={CITY_GROUP}"
    body = cities.get(city)
    if body is None or not body.get("spec", {}).get("approved"):
        return False, f"City {city} is not approved yet"
    approved_key = body.get("spec", {}).get("agentKeyFingerprint")
    key = _spki_fingerprint(request.public_key())
    if approved_key != key:
        return False, (f"the request is for key {key}, but City {city} was approved for key "
                       f"{approved_key or '(none recorded)'}; to re-key, a hub administrator sets "
                       f"spec.agentKeyFingerprint to {key}")
    return True, f"City {city} is approved for key {key}"


# -- the hub chart's copy ------------------------------------------------------------------------
TRUST_FILE = Path("charts") / "citynerve-hub" / "files" / "federation-trust.yaml"


def trust_manifests_yaml() -> str:
    """The admission policies and bindable roles as the hub chart installs them (one file)."""
    header = ("# Generated by `python -m citynerve.operators.federation.onboarding` from "
              "citynerve.operators.federation.onboarding; do not edit.\n")
    docs = [*admission_policies(), *hub_install_rbac()]
    return header + "---\n".join(yaml.safe_dump(d, sort_keys=False, width=1000) for d in docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) the hub chart's federation-trust.yaml.")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the file differs")
    args = parser.parse_args(argv)
    path = REPO_ROOT / TRUST_FILE
    wanted = trust_manifests_yaml()
    if path.exists() and path.read_text(encoding="utf-8") == wanted:
        return 0
    if args.check:
        sys.stderr.write(f"differs: {path}; run `python -m citynerve.operators.federation.onboarding`\n")
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(wanted, encoding="utf-8")
    sys.stderr.write(f"wrote: {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
