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
        # The federation's own kinds: read all, write status (and a City's approval is the
        # administrator's, so the operator never writes City specs).
        {"apiGroups": [GROUP], "resources": ["cities", "sensortypes", "federatedscenarios",
                                             "modelpromotions"], "verbs": _READ},
        # Kopf keeps its last-handled spec and progress in annotations on the objects it handles.
        {"apiGroups": [GROUP], "resources": ["cities", "federatedscenarios", "modelpromotions"],
         "verbs": ["patch"]},
        {"apiGroups": [GROUP], "resources": ["cities/status", "sensortypes/status",
                                             "federatedscenarios/status", "modelpromotions/status"],
         "verbs": ["get", "patch", "update"]},
        # Each approved city's namespace, Lease, report and work (ConfigMaps).
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": [*_READ, "create", "patch"]},
        {"apiGroups": [""], "resources": ["configmaps"],
         "verbs": [*_READ, "create", "update", "patch", "delete"]},
        # update too: RBAC lets the hub grant a city `update` on its Lease only if it holds it.
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "verbs": [*_READ, "create", "update", "patch"]},
        # The city's narrow RBAC: the hub holds every permission it grants, so no escalate.
        {"apiGroups": ["rbac.authorization.k8s.io"],
         "resources": ["roles", "rolebindings", "clusterroles", "clusterrolebindings"],
         "verbs": ["get", "create", "patch"]},
        # Approving a city's certificate request once the City is approved.
        {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"], "verbs": _READ},
        {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests/approval"],
         "verbs": ["update", "patch"]},
        {"apiGroups": ["certificates.k8s.io"], "resources": ["signers"],
         "resourceNames": ["kubernetes.io/kube-apiserver-client"], "verbs": ["approve"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": _READ},
    ]
