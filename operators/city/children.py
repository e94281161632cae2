"""What a city's resources should produce: pure builders of children, payloads and incidents.

Nothing here talks to the API server; the reconcilers compare these with what they observe.
Names are deterministic, so a re-run (after a crash, on another replica) finds the same
children instead of making new ones.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from citynerve.operators.api import API_VERSION
from citynerve.operators.city.config import (
    LABEL_COMPONENT,
    LABEL_FLEET,
    LABEL_INGEST_REPORT,
    LABEL_MANAGED_BY,
    LABEL_REVISION,
    LABEL_SCENARIO,
    MANAGED_BY,
    CityOptions,
)
from citynerve.operators.city.rbac import ingest_rules
from citynerve.operators.conditions import rfc3339

TERMINALS_PER_INGEST_REPLICA = 50_000
MAX_INGEST_REPLICAS = 16
INGEST_PORT = 8080  # the NGSI-LD batch endpoint of citynerve.workloads.ingest.worker
_SEVERITY_ORDER = {"warning": 0, "alarm": 1, "critical": 2}
_KPA_PER_METRE_OF_WATER = 9.80665


def stable_hash(value: Any, length: int = 10) -> str:
    """A short hash of a JSON-able value, independent of key order."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def owner_reference(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A controller owner reference to a CityNerve object, so children are collected with it."""
    meta = obj["metadata"]
    return {
        "apiVersion": obj.get("apiVersion", API_VERSION),
        "kind": obj["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _labels(component: str, **extra: str) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_COMPONENT: component, **extra}


def _dns_name(base: str, suffix: str, limit: int = 63) -> str:
    """``<base>-<suffix>``, shortened with a hash when it would exceed ``limit`` characters."""
    name = f"{base}-{suffix}"
    if len(name) <= limit:
        return name
    keep = limit - len(suffix) - 10
    return f"{base[:keep].rstrip('-')}-{stable_hash(base, 8)}-{suffix}"


# --- SensorFleet ---------------------------------------------------------------------------------


def ingest_name(fleet: str) -> str:
    return _dns_name(fleet, "ingest")


def ingest_report_name(fleet: str) -> str:
    """The ConfigMap the ingestion workload reports its counters in (read by the operator)."""
    return _dns_name(fleet, "ingest-report", 253)


def ingest_account_name(fleet: str) -> str:
    """The ServiceAccount, Role and RoleBinding of a fleet's ingest workers (one name, three kinds)."""
    return ingest_name(fleet)


def _fleet_child_metadata(fleet: Mapping[str, Any], name: str, **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": fleet["metadata"]["namespace"],
        "labels": _labels("ingest", **{LABEL_FLEET: fleet["metadata"]["name"]}, **labels),
        "ownerReferences": [owner_reference(fleet)],
    }


def desired_ingest_service_account(fleet: Mapping[str, Any]) -> dict[str, Any]:
    """The identity a fleet's ingest workers run as: theirs alone, so RBAC can name their report."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _fleet_child_metadata(fleet, ingest_account_name(fleet["metadata"]["name"])),
        # The workers call the API server with it: their report (and the SensorType, through the chart).
        "automountServiceAccountToken": True,
    }


def desired_ingest_role(fleet: Mapping[str, Any]) -> dict[str, Any]:
    """What the fleet's workers may do in its namespace: patch their fleet's report, nothing else."""
    name = fleet["metadata"]["name"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _fleet_child_metadata(fleet, ingest_account_name(name)),
        "rules": ingest_rules(ingest_report_name(name)),
    }


def desired_ingest_role_binding(fleet: Mapping[str, Any]) -> dict[str, Any]:
    name = fleet["metadata"]["name"]
    account = ingest_account_name(name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _fleet_child_metadata(fleet, account),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
        "subjects": [
            {"kind": "ServiceAccount", "name": account, "namespace": fleet["metadata"]["namespace"]}
        ],
    }


def desired_ingest_report(fleet: Mapping[str, Any]) -> dict[str, Any]:
    """The fleet's report ConfigMap, made by the operator so its workers need only `patch` it.

    Its data are the workers' (one key each): the operator states no data, and never changes it.
    """
    name = fleet["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _fleet_child_metadata(fleet, ingest_report_name(name), **{LABEL_INGEST_REPORT: name}),
    }


def ingest_identity(fleet: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What a fleet's workers need before they start, in the order they are made."""
    return [
        desired_ingest_service_account(fleet),
        desired_ingest_role(fleet),
        desired_ingest_role_binding(fleet),
    ]


def child_conflict(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> str | None:
    """Why ``observed`` (found under ``desired``'s name) is not ours to update, or None.

    An object controlled by something else is left alone, and so is a RoleBinding to another
    role (its roleRef cannot change). One with no controller is adopted: a report ConfigMap
    made by the workers of an earlier release is.
    """
    meta = observed.get("metadata") or {}
    owner = desired["metadata"]["ownerReferences"][0]
    controller = next((r for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
    what = f"{desired['kind']} {desired['metadata']['name']}"
    if controller is not None and controller.get("uid") != owner["uid"]:
        return (f"{what} exists and is controlled by {controller.get('kind')} {controller.get('name')}, "
                f"not {owner['kind']} {owner['name']}; delete or rename it")
    if "roleRef" in desired and observed.get("roleRef") != desired["roleRef"]:
        return f"{what} exists and binds another role; delete it so the operator can make its own"
    return None


def child_patch(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that brings a child made from ``desired`` back in line, or None.

    Labels and owner references, and every field ``desired`` states besides metadata (rules,
    subjects, ...); what it leaves out (a report's data) is not the operator's.
    """
    meta_d, meta_o = desired["metadata"], observed.get("metadata") or {}
    patch: dict[str, Any] = {
        key: value for key, value in desired.items()
        if key not in ("apiVersion", "kind", "metadata") and drifted(value, observed.get(key))
    }
    metadata = {}
    if drifted(meta_d["labels"], meta_o.get("labels") or {}):
        metadata["labels"] = meta_d["labels"]
    if drifted(meta_d["ownerReferences"], meta_o.get("ownerReferences") or []):
        metadata["ownerReferences"] = meta_d["ownerReferences"]
    if metadata:
        patch["metadata"] = metadata
    return patch or None


def ingest_replicas(count: int) -> int:
    return max(1, min(MAX_INGEST_REPLICAS, math.ceil(count / TERMINALS_PER_INGEST_REPLICA)))


def fleet_config(spec: Mapping[str, Any], fleet: str) -> dict[str, Any]:
    """The ingestion configuration of a fleet, as the ingest workers read it."""
    return {
        "fleet": fleet,
        "sensorType": spec["sensorType"],
        "district": spec["district"],
        "count": spec["count"],
        "protocol": spec.get("protocol", "MQTT"),
        "samplingIntervalSeconds": spec.get("samplingIntervalSeconds", 300),
        "owner": spec["owner"],
        "dataClassification": spec.get("dataClassification", "internal"),
        "reportConfigMap": ingest_report_name(fleet),
    }


def desired_ingest_deployment(fleet: Mapping[str, Any], options: CityOptions) -> dict[str, Any]:
    """The ingestion Deployment of a SensorFleet: its configuration travels in the pod template,
    so a spec change rolls the workers in one write. The workers run as the fleet's own account
    (``desired_ingest_service_account``)."""
    name = fleet["metadata"]["name"]
    spec = fleet["spec"]
    selector = {LABEL_FLEET: name, LABEL_COMPONENT: "ingest"}
    config = fleet_config(spec, name)
    classified = spec.get("dataClassification", "internal") in ("confidential", "restricted")
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": ingest_name(name),
            "namespace": fleet["metadata"]["namespace"],
            "labels": _labels("ingest", **{LABEL_FLEET: name}),
            "ownerReferences": [owner_reference(fleet)],
        },
        "spec": {
            "replicas": ingest_replicas(int(spec["count"])),
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**_labels("ingest"), **selector}},
                "spec": {
                    "serviceAccountName": ingest_account_name(name),
                    "containers": [
                        {
                            "name": "ingest",
                            "image": options.ingest_image,
                            "args": [
                                "python",
                                "-m",
                                "citynerve.workloads.ingest",
                                "--config-env",
                                "CITYNERVE_FLEET_CONFIG",
                            ],
                            "env": [
                                {
                                    "name": "CITYNERVE_FLEET_CONFIG",
                                    "value": json.dumps(config, sort_keys=True, separators=(",", ":")),
                                },
                                {
                                    "name": "CITYNERVE_ENCRYPT_AT_REST",
                                    "value": "true" if classified else "false",
                                },
                                # Each worker reports under its own key of the fleet's report.
                                {
                                    "name": "POD_NAME",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                                },
                                {
                                    "name": "POD_NAMESPACE",
                                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
                                },
                            ],
                            "ports": [{"name": "ngsi-ld", "containerPort": INGEST_PORT, "protocol": "TCP"}],
                            "readinessProbe": {
                                "httpGet": {"path": "/healthz", "port": "ngsi-ld"},
                                "periodSeconds": 10,
                            },
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "128Mi"},
                                "limits": {"memory": "512Mi"},
                            },
                        }
                    ],
                },
            },
        },
    }


# --- Scenario ------------------------------------------------------------------------------------


def scenario_payload(
    scenario: Mapping[str, Any],
    fleets: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
    city: str,
) -> dict[str, Any]:
    """Everything the analytics workload needs, with models as resolved (never re-resolved by it)."""
    spec = scenario["spec"]
    meta = scenario["metadata"]
    return {
        "city": city,
        "scenario": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta.get("uid", "")},
        "spec": {
            "kind": spec["kind"],
            "mode": spec.get("mode", "live"),
            "replicas": spec.get("replicas", 1),
            "thresholds": list(spec.get("thresholds") or []),
            "simulation": spec.get("simulation"),
            "alertRoutes": [r["name"] for r in spec.get("alertRoutes") or []],
        },
        "fleets": [fleet_config(fleets[f["name"]]["spec"], f["name"]) for f in spec["fleets"]],
        "models": [
            {
                "name": m["name"],
                "role": m.get("role", "detector"),
                "registeredModel": models[m["name"]]["spec"]["registeredModel"],
                "version": (models[m["name"]].get("status") or {}).get("resolvedVersion"),
                "modelUri": (models[m["name"]].get("status") or {}).get("modelUri"),
                "artifactDigest": (models[m["name"]].get("status") or {}).get("artifactDigest"),
            }
            for m in spec.get("models") or []
        ],
    }


def workload_revision(payload: Mapping[str, Any]) -> str:
    return stable_hash(payload, 10)


def rayjob_name(scenario: str, revision: str) -> str:
    """A RayJob per workload revision: a RayJob's cluster and entrypoint cannot change in place,
    so a new revision is a new RayJob and the old one is deleted."""
    return _dns_name(scenario, revision[:8], 47)  # KubeRay appends suffixes to RayJob-derived names


def desired_rayjob(
    scenario: Mapping[str, Any], payload: Mapping[str, Any], options: CityOptions
) -> dict[str, Any]:
    """The KubeRay RayJob running a scenario's analytics in the cluster."""
    meta = scenario["metadata"]
    revision = workload_revision(payload)
    replicas = int(payload["spec"]["replicas"])
    drill = payload["spec"]["mode"] == "drill"
    container = {
        "image": options.analytics_image,
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": rayjob_name(meta["name"], revision),
            "namespace": meta["namespace"],
            "labels": _labels("analytics", **{LABEL_SCENARIO: meta["name"], LABEL_REVISION: revision}),
            "ownerReferences": [owner_reference(scenario)],
        },
        "spec": {
            "entrypoint": "python -m citynerve.operators.city.job",
            "runtimeEnvYAML": "env_vars:\n  CITYNERVE_SCENARIO: "
            + json.dumps(json.dumps(payload, sort_keys=True, separators=(",", ":")))
            + "\n",
            # A drill ends; a live scenario scores until a new revision replaces it. KubeRay
            # drops a false shutdownAfterJobFinishes (omitempty), so false is left out: stating it
            # would read as drift on every pass.
            **({"shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600} if drill else {}),
            "rayClusterSpec": {
                "rayVersion": options.ray_version,
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0"},
                    "template": {
                        "spec": {
                            "serviceAccountName": "citynerve-analytics",
                            "containers": [{"name": "ray-head", **container}],
                        }
                    },
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "scorers",
                        "replicas": replicas,
                        "minReplicas": replicas,
                        "maxReplicas": max(replicas, 1),
                        "rayStartParams": {},
                        "template": {
                            "spec": {
                                "serviceAccountName": "citynerve-analytics",
                                "containers": [{"name": "ray-worker", **container}],
                            }
                        },
                    }
                ],
            },
        },
    }


def local_actor_name(city: str, namespace: str, scenario: str, revision: str) -> str:
    """The named Ray actor running a scenario revision in the embedded (local) mode; the city is
    part of the name because two cities' operators may share one process and its Ray."""
    return f"{city}/{namespace}/{scenario}/{revision}"


def parse_local_actor_name(name: str) -> tuple[str, str, str, str] | None:
    parts = name.split("/")
    return (parts[0], parts[1], parts[2], parts[3]) if len(parts) == 4 else None


# --- Drift ---------------------------------------------------------------------------------------


def drifted(desired: Any, observed: Any) -> bool:
    """Whether ``observed`` differs from ``desired`` in anything ``desired`` says.

    Fields the API server defaults (and ``desired`` leaves out) are not drift; a list must
    match item by item, so an added container or env var is.
    """
    if isinstance(desired, Mapping):
        if not isinstance(observed, Mapping):
            return True
        return any(drifted(value, observed.get(key)) for key, value in desired.items())
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(desired) != len(observed):
            return True
        return any(drifted(d, o) for d, o in zip(desired, observed, strict=True))
    return bool(desired != observed)


def replacement(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> dict[str, Any]:
    """The body that replaces ``observed`` with ``desired`` and keeps what other controllers put
    in its metadata: their finalizers (KubeRay stops a RayJob's Ray job through one), annotations
    (the Deployment controller's revision) and labels."""
    meta_o = observed.get("metadata") or {}
    meta_d = desired["metadata"]
    metadata = {
        **meta_d,
        "resourceVersion": meta_o["resourceVersion"],
        "labels": {**(meta_o.get("labels") or {}), **(meta_d.get("labels") or {})},
        "annotations": {**(meta_o.get("annotations") or {}), **(meta_d.get("annotations") or {})},
    }
    if meta_o.get("finalizers"):
        metadata["finalizers"] = list(meta_o["finalizers"])
    return {**desired, "metadata": metadata}


def deployment_drifted(desired: Mapping[str, Any], observed: Mapping[str, Any]) -> bool:
    meta_d, meta_o = desired["metadata"], observed.get("metadata") or {}
    return (
        drifted(desired["spec"], observed.get("spec"))
        or drifted(meta_d.get("labels", {}), meta_o.get("labels") or {})
        or drifted(meta_d.get("ownerReferences", []), meta_o.get("ownerReferences") or [])
    )


# --- Incidents -----------------------------------------------------------------------------------


def _camel(key: str) -> str:
    head, *rest = re.split(r"[_\-\s]+", key)
    return head[:1].lower() + head[1:] + "".join(w[:1].upper() + w[1:] for w in rest)


def _decimal(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def incident_name(scenario: str, asset: str, detected_at_s: float) -> str:
    """Deterministic, so the same detection (re-run after a crash, by a new revision) is one Incident."""
    return _dns_name(scenario, stable_hash([scenario, asset, round(detected_at_s, 3)], 10), 253)


def incident_severity(
    event_severity: str, metric_values: Mapping[str, float], thresholds: list[Mapping[str, Any]]
) -> str:
    """The Incident severity: the scenario's thresholds decide warning/alarm; a detector's
    `critical` stays critical."""
    if event_severity == "critical":
        return "critical"
    level = "warning"
    for threshold in thresholds:
        value = metric_values.get(threshold["metric"])
        if value is not None and value >= threshold["alarm"]:
            level = "alarm"
    return level


def incident_evidence(
    event_evidence: Mapping[str, Any], fleet: str, observed_at: str
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Evidence entries (at most 64) and the worst value per metric, from a detector's evidence."""
    entries: list[dict[str, Any]] = []
    worst: dict[str, float] = {}

    def add(metric: str, unit: str, terminal: str | None, value: float) -> None:
        if not math.isfinite(value):
            return
        worst[metric] = max(worst.get(metric, value), value)
        entry = {
            "fleet": fleet,
            "metric": metric,
            "value": _decimal(value),
            "unitCode": unit,
            "observedAt": observed_at,
        }
        if terminal is not None:
            entry["terminal"] = terminal
        entries.append(entry)

    for key, value in event_evidence.items():
        if key == "pressure_drop_m" and isinstance(value, Mapping):
            for sensor, metres in value.items():
                add("pressureDropKpa", "KPA", str(sensor), float(metres) * _KPA_PER_METRE_OF_WATER)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            add(_camel(key), "C62", None, float(value))
    return entries[:64], worst


def simulated_timing(event: Mapping[str, Any], fleet: str, observed_at: str) -> list[dict[str, Any]]:
    """Evidence of when, on the scenario's own clock, the detection happened (and how long after
    the simulated onset): drills measure detection delay and lead time in simulated minutes."""
    timing: list[dict[str, Any]] = []
    detected = event.get("detected_at_s")
    onset = event.get("onset_s")
    if isinstance(detected, int | float) and math.isfinite(detected):
        timing.append({"fleet": fleet, "metric": "simulatedMinute", "value": _decimal(detected / 60),
                       "unitCode": "MIN", "observedAt": observed_at})
        if isinstance(onset, int | float) and math.isfinite(onset):
            timing.append({"fleet": fleet, "metric": "detectionDelayMinutes",
                           "value": _decimal((detected - onset) / 60), "unitCode": "MIN",
                           "observedAt": observed_at})
    return timing


def incident_manifest(
    event: Mapping[str, Any], payload: Mapping[str, Any], detected_at: datetime, centre: tuple[str, str]
) -> dict[str, Any]:
    """An Incident resource for one detection (``event`` is ``IncidentEvent.to_dict()``)."""
    scenario = payload["scenario"]
    spec = payload["spec"]
    location = event.get("location") or {}
    asset = str(location.get("asset_id") or "unknown")
    lat, lon = location.get("lat"), location.get("lon")
    fleet = payload["fleets"][0]["fleet"] if payload["fleets"] else scenario["name"]
    evidence, worst = incident_evidence(event.get("evidence") or {}, fleet, rfc3339(detected_at))
    evidence = [*simulated_timing(event, fleet, rfc3339(detected_at)), *evidence][:64]
    coordinates_known = (
        isinstance(lat, int | float)
        and isinstance(lon, int | float)
        and -90 <= lat <= 90
        and -180 <= lon <= 180
        and spec["mode"] != "drill"
    )
    latitude, longitude = (_decimal(float(lat)), _decimal(float(lon))) if coordinates_known else centre  # type: ignore[arg-type]
    description = f"asset {asset}" + ("" if coordinates_known else "; coordinates are the city centre")
    return {
        "apiVersion": API_VERSION,
        "kind": "Incident",
        "metadata": {
            "name": incident_name(scenario["name"], asset, float(event.get("detected_at_s") or 0.0)),
            "namespace": scenario["namespace"],
            "labels": {LABEL_SCENARIO: scenario["name"], LABEL_MANAGED_BY: MANAGED_BY},
        },
        "spec": {
            "scenarioRef": {"name": scenario["name"]},
            "kind": spec["kind"],
            "severity": incident_severity(str(event.get("severity", "warning")), worst, spec["thresholds"]),
            "drill": spec["mode"] == "drill",
            "location": {
                "latitude": latitude,
                "longitude": longitude,
                "assetId": asset[:253],
                "description": description,
            },
            "evidence": evidence,
            "detectedAt": rfc3339(detected_at),
            "state": "Detected",
            "transitions": [
                {"state": "Detected", "time": rfc3339(detected_at), "actor": f"scenario/{scenario['name']}"}
            ],
        },
    }


def severity_at_least(severity: str, minimum: str) -> bool:
    return _SEVERITY_ORDER.get(severity, 0) >= _SEVERITY_ORDER.get(minimum, 1)
