"""The one list of API permissions the city operator needs.

Namespace-scoped operation binds these rules with a Role in each watched namespace;
cluster-wide operation binds the same rules with a ClusterRole. The Helm chart is generated
from (and checked against) ``role_rules``.
"""

from __future__ import annotations

from typing import Any

from citynerve.operators.api import GROUP

_READ = ["get", "list", "watch"]
IDENTITY_SECRET = "citynerve-hub-identity"  # noqa: S105 - the agent's key Secret's name, not a secret
_WRITE = ["create", "update", "patch", "delete"]


def role_rules(workload_mode: str = "local") -> list[dict[str, Any]]:
    """RBAC PolicyRules (as manifests) for the city operator in one namespace."""
    rules: list[dict[str, Any]] = [
        {"apiGroups": [GROUP], "resources": ["sensorfleets", "analyticsmodels", "scenarios"], "verbs": _READ},
        {"apiGroups": [GROUP], "resources": ["incidents"], "verbs": [*_READ, "create"]},
        {
            "apiGroups": [GROUP],
            "resources": [
                "sensorfleets/status",
                "analyticsmodels/status",
                "scenarios/status",
                "incidents/status",
            ],
            "verbs": ["get", "patch", "update"],
        },
        {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": [*_READ, *_WRITE]},
        # Ingest reports are read, never written; alert routes' HMAC keys are read one by one.
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": _READ},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    ]
    if workload_mode == "kuberay":
        rules.append({"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": [*_READ, *_WRITE]})
    return rules


def cluster_rules(workload_mode: str = "local") -> list[dict[str, Any]]:
    """Rules for cluster-wide operation: the same, plus discovery of namespaces and CRDs by Kopf."""
    return [
        *role_rules(workload_mode),
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": _READ},
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": _READ},
    ]


# -- the federation agent, which runs beside the operator under the same ServiceAccount ----------
def agent_cluster_rules() -> list[dict[str, Any]]:
    """What the agent reads across the city and applies cluster-wide: the roll-up and SensorTypes.

    A ClusterRole in both RBAC modes: SensorTypes are cluster-scoped.
    """
    return [
        {"apiGroups": [GROUP], "resources": ["sensorfleets", "scenarios", "incidents", "analyticsmodels"],
         "verbs": ["list"]},
        # Server-side apply of the hub's catalogue; removal of what the hub no longer lists.
        {"apiGroups": [GROUP], "resources": ["sensortypes"],
         "verbs": ["list", "create", "patch", "delete"]},
    ]


def agent_work_rules() -> list[dict[str, Any]]:
    """What the agent applies and removes in its work namespace (a Role there)."""
    return [{"apiGroups": [GROUP], "resources": ["scenarios", "analyticsmodels"],
             "verbs": ["create", "patch", "delete"]}]


def agent_release_rules(deployment: str, service_account: str) -> list[dict[str, Any]]:
    """What the agent needs in its release namespace (a Role there): its key Secret, and the
    chart's Deployment and ServiceAccount, which tell it the release is installed and own what
    it creates."""
    return [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [IDENTITY_SECRET],
         "verbs": ["get", "patch"]},
        {"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": [deployment],
         "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["serviceaccounts"], "resourceNames": [service_account],
         "verbs": ["get"]},
    ]


# -- the ingest workers (citynerve.workloads.ingest.worker), one account per fleet namespace ------
def ingest_rules() -> list[dict[str, Any]]:
    """What an ingest worker does in its fleet's namespace: write its key of the fleet's report."""
    return [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create", "patch"]}]


def ingest_cluster_rules() -> list[dict[str, Any]]:
    """The fleet's SensorType, read once at start (the catalogue is cluster-scoped)."""
    return [{"apiGroups": [GROUP], "resources": ["sensortypes"], "verbs": ["get"]}]
