"""The one list of API permissions the hub operator needs (cluster-wide: cities are).

The hub chart's ClusterRole is generated from, and checked against, ``cluster_rules``.
"""

from __future__ import annotations

from typing import Any

from citynerve.operators.api import GROUP

_READ = ["get", "list", "watch"]


def cluster_rules() -> list[dict[str, Any]]:
    """RBAC PolicyRules (as manifests) for the hub operator."""
    return [
        # The federation's own kinds: watched (Kopf lists, then watches; nothing reads one by one).
        {"apiGroups": [GROUP], "resources": ["cities", "sensortypes", "federatedscenarios",
                                             "modelpromotions"], "verbs": ["list", "watch"]},
        # A city reads its own City: RBAC lets the hub grant only what it holds.
        {"apiGroups": [GROUP], "resources": ["cities"], "verbs": ["get"]},
        # Kopf keeps its last-handled spec in annotations, and a city's chart labels reach its
        # City; a City's approval stays the administrator's (no update).
        {"apiGroups": [GROUP], "resources": ["cities", "federatedscenarios", "modelpromotions"],
         "verbs": ["patch"]},
        {"apiGroups": [GROUP], "resources": ["cities/status", "federatedscenarios/status",
                                             "modelpromotions/status"], "verbs": ["patch"]},
        # Each approved city's namespace (patch: its labels put right if they drift).
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "create", "patch"]},
        # Its work (replaced when it changes), report and Lease; patch is granted to the city on
        # its report and Lease, so the hub holds it too.
        {"apiGroups": [""], "resources": ["configmaps"],
         "verbs": [*_READ, "create", "update", "patch", "delete"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": [*_READ, "create", "patch"]},
        # The city's narrow RBAC: the hub holds every permission it grants, so no escalate.
        {"apiGroups": ["rbac.authorization.k8s.io"],
         "resources": ["roles", "rolebindings", "clusterroles", "clusterrolebindings"],
         "verbs": ["get", "create", "patch"]},
        # Approving a city's certificate request once the City is approved.
        {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
         "verbs": ["list", "watch"]},
        {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/approval"],
         "verbs": ["patch"]},
        {"apiGroups": ["certificates.k8s.io"], "resources": ["signers"],
         "resourceNames": ["kubernetes.io/kube-apiserver-client"], "verbs": ["approve"]},
        # Promotions' steps, and Kopf's reports of a failing handler.
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
         "verbs": ["list", "watch"]},
    ]
