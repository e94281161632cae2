"""The one list of API permissions the city operator needs.

Namespace-scoped operation binds these rules with a Role in each watched namespace;
cluster-wide operation binds the same rules with a ClusterRole. The Helm chart is generated
from (and checked against) ``role_rules``.

Who holds what in a city:

- the operator (and its agent, under the same account): ``role_rules``/``cluster_rules`` and
  the ``agent_*`` rules;
- each SensorFleet's stream worker: an account of its own that the operator makes beside the
  fleet (``children.desired_ingest_service_account``), with no API token and no rules: it
  talks to the city broker only, with the fleet's own broker credential
  (``operators/city/broker.py``, ``docs/broker.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from citynerve.operators.api import GROUP

_READ = ["get", "list", "watch"]
IDENTITY_SECRET = "citynerve-hub-identity"  # noqa: S105 - the agent's key Secret's name, not a secret
# The city broker's users (written by the operator, mounted by the broker): a name, not a secret.
BROKER_AUTH_SECRET = "citynerve-broker-auth"  # noqa: S105
_WRITE = ["create", "update", "patch", "delete"]
_CHILD = ["get", "create", "patch"]  # children read one by one and kept in line with a merge patch


def role_rules(workload_mode: str = "local", alert_secrets: Sequence[str] = ()) -> list[dict[str, Any]]:
    """RBAC PolicyRules (as manifests) for the city operator in one namespace.

    ``alert_secrets``: the Secrets alert routes may name (the chart's ``alerts.secretNames``);
    the operator may read those and no other Secret. None: no Secret at all (an empty
    ``resourceNames`` would mean every one, so the rule is left out).
    """
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
        # Each fleet's worker account and (HTTP fleets) Service, made and kept in line by the
        # operator; never deleted by it (owner references take them with the fleet).
        {"apiGroups": [""], "resources": ["serviceaccounts", "services"], "verbs": _CHILD},
        # Each fleet's history volume: made once, never changed or deleted by the operator (it
        # goes with the fleet; its size is the chart's ingest.history.size when it is made).
        {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "create"]},
        # Each fleet's broker credentials: created, never read back (they derive from the broker
        # key, operators/city/broker.py), so the operator holds no `get` on any fleet's Secret.
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
    ]
    if alert_secrets:
        # Alert routes' HMAC keys, read one by one and only those the chart lists.
        rules.insert(-1, {"apiGroups": [""], "resources": ["secrets"], "resourceNames": list(alert_secrets),
                          "verbs": ["get"]})
    if workload_mode == "kuberay":
        rules.append({"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": [*_READ, *_WRITE]})
    return rules


def cluster_rules(workload_mode: str = "local", alert_secrets: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rules for cluster-wide operation: the same, plus discovery of namespaces and CRDs by Kopf."""
    return [
        *role_rules(workload_mode, alert_secrets),
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
        # Each copy's `Propagated` condition: this city holds the hub's current spec.
        {"apiGroups": [GROUP], "resources": ["sensortypes/status"], "verbs": ["patch"]},
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


# -- the city broker ------------------------------------------------------------------------
def broker_release_rules() -> list[dict[str, Any]]:
    """What the operator needs in the broker's namespace (a Role there): to write the broker's
    users, Secret ``citynerve-broker-auth``, which the broker mounts (made on first write)."""
    return [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [BROKER_AUTH_SECRET],
         "verbs": ["patch"]},
    ]
