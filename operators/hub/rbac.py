"""The one list of API permissions the hub operator needs (cluster-wide: cities are).

The hub chart's ClusterRole is generated from, and checked against, ``cluster_rules``.
"""

from __future__ import annotations

from typing import Any

from citynerve.operators.api import GROUP
from citynerve.operators.federation.onboarding import CITY_RENEWAL_ROLE, CSR_SIGNER, HUB_CITY_NAMESPACE_ROLE

_READ = ["get", "list", "watch"]


def cluster_rules() -> list[dict[str, Any]]:
    """RBAC PolicyRules (as manifests) for the hub operator."""
    return [
        # The federation's own kinds: watched (Kopf lists, then watches; nothing reads one by one).
        {"apiGroups": [GROUP], "resources": ["cities", "sensortypes", "federatedscenarios",
                                             "modelpromotions"], "verbs": ["list", "watch"]},
        # A city reads its own City: RBAC lets the hub grant only what it holds.
        {"apiGroups": [GROUP], "resources": ["cities"], "verbs": ["get"]},
        # Kopf keeps its last-handled spec in annotations. The hub's admission policy refuses this
        # account any change of a City's spec (approval, agent key) or labels.
        {"apiGroups": [GROUP], "resources": ["cities", "federatedscenarios", "modelpromotions"],
         "verbs": ["patch"]},
        {"apiGroups": [GROUP], "resources": ["cities/status", "sensortypes/status",
                                             "federatedscenarios/status", "modelpromotions/status"],
         "verbs": ["patch"]},
        # Each approved city's namespace (patch: its labels put right if they drift).
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "create", "patch"]},
        # Every city's work, report and Lease are watched; writes happen only in city-<name>
        # namespaces, through a RoleBinding of the role below the hub makes there.
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": _READ},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": _READ},
        # The city's narrow RBAC: the hub holds every permission it grants, and may only *bind*
        # the two roles the administrator installed (its writes in a city's namespace, and a
        # city's certificate renewal) — never widen them.
        {"apiGroups": ["rbac.authorization.k8s.io"],
         "resources": ["roles", "rolebindings", "clusterroles", "clusterrolebindings"],
         "verbs": ["get", "create", "patch"]},
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
         "resourceNames": [HUB_CITY_NAMESPACE_ROLE, CITY_RENEWAL_ROLE], "verbs": ["bind"]},
        # Approving a city's certificate request for the key the administrator approved; get and
        # delete are granted to each city on its own renewal request, so the hub holds them.
        {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
         "verbs": ["get", "list", "watch", "delete"]},
        {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/approval"],
         "verbs": ["patch"]},
        {"apiGroups": ["certificates.k8s.io"], "resources": ["signers"],
         "resourceNames": [CSR_SIGNER], "verbs": ["approve"]},
        # Who it is (SelfSubjectReview), to bind its own account in each city's namespace.
        {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]},
        # Promotions' steps, and Kopf's reports of a failing handler.
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "verbs": ["list", "watch"]},
    ]
