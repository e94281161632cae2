"""What a city's resources should produce: pure builders of children, payloads and incidents.

Nothing here talks to the API server; the reconcilers compare these with what they observe.
Names are deterministic, so a re-run (after a crash, on another replica) finds the same
children instead of making new ones.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from citynerve.operators.api import API_VERSION
from citynerve.operators.city.broker import PASSWORD_KEY, USERNAME_KEY
from citynerve.operators.city.config import (
    LABEL_COMPONENT,
    LABEL_FLEET,
    LABEL_MANAGED_BY,
    LABEL_REVISION,
    LABEL_SCENARIO,
    MANAGED_BY,
    CityOptions,
)
from citynerve.operators.conditions import rfc3339

INGEST_PORT = 8080  # the NGSI-LD endpoint of citynerve.workloads.dataplane.worker
# Where a stream worker finds its broker credential (files `username`, `password`).
BROKER_CREDENTIALS_DIR = "/var/run/citynerve/broker"
# Where it writes the fleet's window history (Parquet by day), on the fleet's own claim.
HISTORY_DIR = "/var/lib/citynerve/history"
# A Scenario's RayJob reaches the city broker with its scoring identity through these variables:
# the URL as a value, the user name and password from the Scenario's Secret (scoring_secret_name).
ENV_BROKER_URL = "CITYNERVE_BROKER_URL"
ENV_BROKER_USER = "CITYNERVE_BROKER_USER"
ENV_BROKER_PASSWORD = "CITYNERVE_BROKER_PASSWORD"  # noqa: S105 - the variable's name, not a password
_SEVERITY_ORDER = {"warning": 0, "alarm": 1, "critical": 2}


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


def ingest_account_name(fleet: str) -> str:
    """The ServiceAccount a fleet's stream workers run as (theirs alone; it holds no API rights)."""
    return ingest_name(fleet)


def _fleet_child_metadata(fleet: Mapping[str, Any], name: str, **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": fleet["metadata"]["namespace"],
        "labels": _labels("ingest", **{LABEL_FLEET: fleet["metadata"]["name"]}, **labels),
        "ownerReferences": [owner_reference(fleet)],
    }


def desired_ingest_service_account(fleet: Mapping[str, Any]) -> dict[str, Any]:
    """The identity a fleet's workers run as. They talk to the broker, never to the API server."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _fleet_child_metadata(fleet, ingest_account_name(fleet["metadata"]["name"])),
        "automountServiceAccountToken": False,
    }


def mqtt_secret_name(fleet: str) -> str:
    """The Secret holding the credential an MQTT fleet's terminals (or their network server) publish with."""
    return _dns_name(fleet, "mqtt", 253)


def ingest_secret_name(fleet: str) -> str:
    """The Secret the fleet's stream workers mount: their broker credential."""
    return _dns_name(fleet, "ingest-broker", 253)


def scoring_secret_name(scenario: str) -> str:
    """The Secret holding a Scenario's scoring identity on the city broker (keys ``username``,
    ``password``), which its RayJob's containers read their broker credential from."""
    return _dns_name(scenario, "scoring-broker", 253)


def desired_fleet_secret(fleet: Mapping[str, Any], name: str, data: Mapping[str, str]) -> dict[str, Any]:
    """A fleet's broker credential (``data`` base64, as the API holds it), collected with the fleet."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": _fleet_child_metadata(fleet, name),
        "data": dict(data),
    }


def history_claim_name(fleet: str) -> str:
    return _dns_name(fleet, "history", 253)


def desired_history_claim(fleet: Mapping[str, Any], options: CityOptions) -> dict[str, Any]:
    """The volume of a fleet's window history (docs/history.md): its stream worker's alone."""
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": options.history_storage}},
    }
    if options.history_storage_class:
        spec["storageClassName"] = options.history_storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _fleet_child_metadata(fleet, history_claim_name(fleet["metadata"]["name"])),
        "spec": spec,
    }


def desired_ingest_service(fleet: Mapping[str, Any]) -> dict[str, Any]:
    """The NGSI-LD endpoint of an HTTP fleet: its gateways post batch upserts here."""
    name = fleet["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _fleet_child_metadata(fleet, ingest_name(name)),
        "spec": {
            "selector": {LABEL_FLEET: name, LABEL_COMPONENT: "ingest"},
            "ports": [{"name": "ngsi-ld", "port": INGEST_PORT, "targetPort": "ngsi-ld", "protocol": "TCP"}],
        },
    }


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


def scenario_fleet(spec: Mapping[str, Any], fleet: str) -> dict[str, Any]:
    """A fleet as a Scenario's workload sees it (its windows are on ``windows.<city>.<fleet>.*``)."""
    return {
        "fleet": fleet,
        "sensorType": spec["sensorType"],
        "district": spec["district"],
        "count": spec["count"],
        "samplingIntervalSeconds": spec.get("samplingIntervalSeconds", 300),
        "windowSeconds": spec.get("windowSeconds", 300),
        "owner": spec["owner"],
        "dataClassification": spec.get("dataClassification", "internal"),
        **({"georeference": dict(spec["georeference"])} if spec.get("georeference") else {}),
    }


def fleet_config(
    fleet: Mapping[str, Any], city: str, sensor_type_spec: Mapping[str, Any], broker_url: str
) -> dict[str, Any]:
    """What a fleet's stream worker reads (``citynerve.workloads.dataplane.worker.FleetConfig``).

    The SensorType's spec travels with it, so the worker needs no API access and a changed type
    rolls the workers like any other change of the pod template.
    """
    spec = fleet["spec"]
    return {
        "city": city,
        "fleet": fleet["metadata"]["name"],
        "sensorType": spec["sensorType"],
        "sensorTypeSpec": dict(sensor_type_spec),
        "count": spec["count"],
        "samplingIntervalSeconds": spec.get("samplingIntervalSeconds", 300),
        "windowSeconds": spec.get("windowSeconds", 300),
        "allowedLatenessSeconds": spec.get("allowedLatenessSeconds", 60),
        "historyRetentionDays": spec.get("historyRetentionDays", 30),
        "brokerUrl": broker_url,
    }


def desired_ingest_deployment(
    fleet: Mapping[str, Any], options: CityOptions, sensor_type_spec: Mapping[str, Any], broker_url: str
) -> dict[str, Any]:
    """The stream worker of a SensorFleet: its configuration travels in the pod template, so a spec
    change rolls it in one write. One replica, replaced (never two at once): windows are made by
    one consumer of the fleet's readings (docs/data-plane.md). It runs as the fleet's own account,
    with the fleet's broker credential mounted from ``secret`` and no API token."""
    name = fleet["metadata"]["name"]
    selector = {LABEL_FLEET: name, LABEL_COMPONENT: "ingest"}
    config = fleet_config(fleet, options.city, sensor_type_spec, broker_url)
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
            "replicas": 1,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**_labels("ingest"), **selector}},
                "spec": {
                    "serviceAccountName": ingest_account_name(name),
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "volumes": [
                        {"name": "broker", "secret": {"secretName": ingest_secret_name(name)}},
                        {"name": "history", "persistentVolumeClaim": {"claimName": history_claim_name(name)}},
                    ],
                    "containers": [
                        {
                            "name": "ingest",
                            "image": options.image,
                            "args": [
                                "python", "-m", "citynerve.workloads.dataplane.worker",
                                "--config-env", "CITYNERVE_FLEET_CONFIG",
                                "--credentials-dir", BROKER_CREDENTIALS_DIR,
                                "--history-dir", HISTORY_DIR,
                                "--http-address", "0.0.0.0",  # noqa: S104 - the pod's own address
                                "--http-port", str(INGEST_PORT),
                            ],
                            "env": [
                                {
                                    "name": "CITYNERVE_FLEET_CONFIG",
                                    "value": json.dumps(config, sort_keys=True, separators=(",", ":")),
                                },
                            ],
                            "volumeMounts": [
                                {"name": "broker", "mountPath": BROKER_CREDENTIALS_DIR, "readOnly": True},
                                {"name": "history", "mountPath": HISTORY_DIR},
                            ],
                            "ports": [{"name": "ngsi-ld", "containerPort": INGEST_PORT, "protocol": "TCP"}],
                            "readinessProbe": {
                                "httpGet": {"path": "/healthz", "port": "ngsi-ld"},
                                "periodSeconds": 10,
                            },
                            "livenessProbe": {
                                "httpGet": {"path": "/healthz", "port": "ngsi-ld"},
                                "periodSeconds": 20,
                                "failureThreshold": 6,
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
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
    mlflow_url: str | None = None,
) -> dict[str, Any]:
    """Everything the analytics workload needs, with models as resolved (never re-resolved by it);
    ``mlflowUrl`` (when the operator has one) is where the workload records what it scored."""
    spec = scenario["spec"]
    meta = scenario["metadata"]
    return {
        "city": city,
        **({"mlflowUrl": mlflow_url} if mlflow_url else {}),
        "scenario": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta.get("uid", "")},
        "spec": {
            "kind": spec["kind"],
            "mode": spec.get("mode", "live"),
            "replicas": spec.get("replicas", 1),
            "thresholds": list(spec.get("thresholds") or []),
            "simulation": spec.get("simulation"),
            "alertRoutes": [r["name"] for r in spec.get("alertRoutes") or []],
        },
        "fleets": [scenario_fleet(fleets[f["name"]]["spec"], f["name"]) for f in spec["fleets"]],
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
    container: dict[str, Any] = {
        "image": options.image,
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    }
    if options.broker is not None:
        # The scoring identity: the password stays in the Secret, never in the RayJob itself.
        secret = scoring_secret_name(meta["name"])
        container["env"] = [
            {"name": ENV_BROKER_URL, "value": options.broker.url},
            *({"name": env, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
              for env, key in ((ENV_BROKER_USER, USERNAME_KEY), (ENV_BROKER_PASSWORD, PASSWORD_KEY))),
        ]
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


def _degrees(value: float) -> str:
    """Decimal degrees to six places (about 0.1 m), as Incident coordinates are written."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def incident_name(scenario: str, asset: str, detected_at_s: float) -> str:
    """Deterministic, so the same detection (re-run after a crash, by a new revision) is one Incident."""
    return _dns_name(scenario, stable_hash([scenario, asset, round(detected_at_s, 3)], 10), 253)


@dataclass(frozen=True)
class SeverityDecision:
    """An Incident's severity and the sentence saying which rule set it.

    ``severity`` is None when the detection stays below every warning threshold of the Scenario
    that applies to what the detector measured: such a detection is not raised as an Incident.
    """

    severity: str | None
    reason: str


def _forecast_name(metric: str) -> str:
    return "forecast" + metric[:1].upper() + metric[1:]


def _measured(event: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The event's measurements; an event without any (an older detector's) offers its scalar
    evidence by camelCase name, with no unit to check."""
    measurements = [dict(m) for m in event.get("measurements") or ()]
    if measurements:
        return measurements
    return [
        {"metric": _camel(key), "unit_code": None, "value": float(value)}
        for key, value in (event.get("evidence") or {}).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]


def incident_severity(event: Mapping[str, Any], thresholds: list[Mapping[str, Any]]) -> SeverityDecision:
    """Severity by the Scenario's thresholds, in the units the Scenario states.

    A threshold on metric ``M`` applies to the detector's measurements of ``M`` and of its
    forecast ``forecastM`` in the threshold's unit; the highest value of each is compared. The
    severity is the highest level any applicable threshold reaches (``warning`` or ``alarm``);
    below every warning level the detection is not raised. When no threshold applies to
    anything the detector measured, its own rule sets the severity, named in the reason.
    """
    measured = _measured(event)
    reached: list[tuple[int, str]] = []
    below: list[str] = []
    skipped: list[str] = []
    for threshold in thresholds:
        metric, unit = threshold["metric"], threshold["unitCode"]
        names = (metric, _forecast_name(metric))
        matching = [m for m in measured if m["metric"] in names and math.isfinite(float(m["value"]))]
        in_unit = [m for m in matching if m.get("unit_code") in (None, unit)]
        if matching and not in_unit:
            skipped.append(f"{metric} is measured in {matching[0]['unit_code']}, not the threshold's {unit}")
        if not in_unit:
            continue
        top = max(in_unit, key=lambda m: float(m["value"]))
        value = float(top["value"])
        said = f"{top['metric']} {_decimal(value)} {unit}"
        if value >= threshold["alarm"]:
            reached.append((1, f"{said} reached the alarm level {threshold['alarm']}"))
        elif value >= threshold["warning"]:
            reached.append((0, f"{said} reached the warning level {threshold['warning']}"))
        else:
            below.append(f"{said} is below the warning level {threshold['warning']}")
    unapplied = f" ({'; '.join(skipped)})" if skipped else ""
    if reached:
        level = max(rank for rank, _ in reached)
        severity = ("warning", "alarm")[level]
        compared = [text for _, text in sorted(reached, reverse=True)] + below
        return SeverityDecision(severity, f"Severity {severity} by the Scenario's thresholds: "
                                          f"{'; '.join(compared)}{unapplied}.")
    if below:
        return SeverityDecision(None, f"Not raised: below the Scenario's thresholds: {'; '.join(below)}"
                                      f"{unapplied}.")
    own = str(event.get("severity") or "warning")
    rule = event.get("rule") or "the detector states no rule"
    if own not in _SEVERITY_ORDER:
        return SeverityDecision(None, f"Not raised: the detector rated it {own}: {rule}.")
    return SeverityDecision(
        own,
        f"Severity {own} by the detector's own rule, as no threshold of the Scenario applies to what it "
        f"measured{unapplied}: {rule}.",
    )


def terminal_id(fleet: str, index: int) -> str:
    """A fleet's terminal, as its gateways name it (``gateway_batch(prefix=f"{fleet}-")``)."""
    return f"{fleet}-{index}"


@functools.cache
def _catalogue_properties() -> dict[str, frozenset[str]]:
    from citynerve.operators.api.catalogue import load  # noqa: PLC0415 - read once, on first use

    return {str(t.metadata.name): frozenset(p.name for p in t.spec.properties) for t in load()}


def fleet_measuring(quantity: str | None, fleets: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The first of the scenario's fleets whose SensorType measures ``quantity`` (per the catalogue),
    or its first fleet when none is known to."""
    if not fleets:
        return None
    if quantity:
        for fleet in fleets:
            if quantity in _catalogue_properties().get(str(fleet.get("sensorType")), frozenset()):
                return fleet
    return fleets[0]


def incident_evidence(
    event: Mapping[str, Any], fleets: list[Mapping[str, Any]], default_fleet: str, observed_at: str,
    *, live: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Evidence entries (at most 64) from a detector's measurements, each under the fleet that
    measures its quantity and, where it came from one sensor, that fleet's terminal (``live``: the
    terminal is the sensor itself, as the windows name it; a drill's layout numbers them); and,
    for the crew, each such terminal with the network asset it reads."""
    entries: list[dict[str, Any]] = []
    terminals: list[str] = []
    nouns = {"pressure": "junction", "waterLevel": "node", "rainfallIntensity": "rain gauge",
             "flow": "subcatchment"}
    for m in _measured(event):
        value = float(m["value"])
        if not math.isfinite(value):
            continue
        fleet = fleet_measuring(m.get("quantity"), fleets)
        name = str(fleet["fleet"]) if fleet else default_fleet
        entry = {"fleet": name, "metric": m["metric"], "value": _decimal(value),
                 "unitCode": m.get("unit_code") or "C62", "observedAt": observed_at}
        index = m.get("sensor_index")
        if live and m.get("sensor") is not None:
            entry["terminal"] = str(m["sensor"])
            if entry["terminal"] not in terminals:
                terminals.append(entry["terminal"])
        elif isinstance(index, int):
            count = int(fleet.get("count") or 0) if fleet else 0
            terminal = terminal_id(name, index % count if count else index)
            entry["terminal"] = terminal
            noun = nouns.get(str(m.get("quantity")), "sensor")
            reading = f"{terminal} ({noun} {m.get('sensor')})" if m.get("sensor") is not None else terminal
            if reading not in terminals:
                terminals.append(reading)
        entries.append(entry)
    return entries[:64], terminals


def drill_truth(
    event: Mapping[str, Any], fleet: str, observed_at: str
) -> tuple[list[dict[str, Any]], str | None]:
    """Evidence entries and a sentence from what a drill knows: the distance from the reported
    to the true burst junction, or whether a warned asset flooded and the lead time."""
    truth = event.get("truth")
    if not isinstance(truth, Mapping):
        return [], None
    noun = {"water-burst": "junction ", "urban-flood": "node "}.get(str(event.get("kind")), "")
    asset = noun + str((event.get("location") or {}).get("asset_id") or "the reported asset")

    def entry(metric: str, value: float, unit: str) -> dict[str, Any]:
        return {"fleet": fleet, "metric": metric, "value": _decimal(value), "unitCode": unit,
                "observedAt": observed_at}

    if event.get("kind") == "water-burst":
        true_asset, metres, hops = truth.get("true_asset"), truth.get("distance_m"), truth.get("hops")
        if true_asset is not None:
            true_asset = noun + str(true_asset)
        if true_asset is None:
            return [], "In the drill no burst had started by then: a false alarm."
        if metres is None or hops is None:
            return [], f"In the drill the burst was at {true_asset}, not connected by pipes to {asset}."
        pipes = f"{int(hops)} pipe{'s' if hops != 1 else ''}"
        return (
            [entry("drillDistanceMetres", float(round(metres)), "MTR"),
             entry("drillDistanceHops", float(hops), "C62")],
            f"In the drill the burst was at {true_asset}: the reported {asset} is {round(metres)} m along "
            f"the pipes from it ({pipes}).",
        )
    flooded = truth.get("flooded")
    if flooded is None:
        return [], None
    stream = event.get("kind") == "mountain-flood"
    what = f"the stream of {asset} passed its warning discharge" if stream else f"{asset} flooded"
    flag = "drillWarningDischargePassed" if stream else "drillFlooded"
    if not flooded:
        never = " (its stream never passed the warning discharge)" if stream else ""
        return [entry(flag, 0.0, "C62")], f"In the drill {asset} did not flood{never}."
    onset, lead = float(truth.get("flood_onset_s") or 0.0), float(truth.get("lead_time_s") or 0.0)
    return (
        [entry(flag, 1.0, "C62"), entry("drillLeadTimeMinutes", lead / 60.0, "MIN")],
        f"In the drill {what} at simulated minute {_decimal(onset / 60)}: the warning came "
        f"{_decimal(lead / 60)} min ahead.",
    )


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


class IncidentLocationUnknownError(ValueError):
    """A detection with no coordinates in a city whose centre is not known."""


def incident_coordinates(
    event: Mapping[str, Any], payload: Mapping[str, Any], centre: tuple[str, str] | None
) -> tuple[str, str, str]:
    """Latitude, longitude and how they were found: the asset's own (surveyed in live mode, placed
    with the drill's network in a drill), else the city's centre; never a made-up 0, 0."""
    location = event.get("location") or {}
    lat, lon, placement = location.get("lat"), location.get("lon"), location.get("placement")
    valid = (
        isinstance(lat, int | float) and isinstance(lon, int | float)
        and -90 <= lat <= 90 and -180 <= lon <= 180
    )
    # A drill's detector may know its model's own coordinates; only a placement makes them the city's.
    if isinstance(lat, int | float) and isinstance(lon, int | float) and valid and (
        placement or payload["spec"]["mode"] != "drill"
    ):
        surveyed = "Surveyed coordinates of the asset."
        return _degrees(float(lat)), _degrees(float(lon)), str(placement or surveyed)
    if centre is None:
        scenario = payload["scenario"]
        raise IncidentLocationUnknownError(
            f"Scenario {scenario['namespace']}/{scenario['name']}: the detection at "
            f"{location.get('asset_id')} has no coordinates and city {payload.get('city')!r} has no known "
            "centre to place it at; add the city to citynerve.models.places.CITY_CENTRES."
        )
    return centre[0], centre[1], "Coordinates are the city centre: the detector gave none for this asset."


def incident_manifest(
    event: Mapping[str, Any],
    payload: Mapping[str, Any],
    detected_at: datetime,
    centre: tuple[str, str] | None,
    decision: SeverityDecision | None = None,
    decided_by: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An Incident resource for one detection (``event`` is ``IncidentEvent.to_dict()``).

    ``decision`` is ``incident_severity``'s (computed here when not given); a detection it does
    not raise has no Incident, and asking for one is an error. ``decided_by`` (live scoring: the
    model version that decided and its windows) makes the name the excursion's onset's, so a
    replay of the same windows, by any model, names the same Incident.
    """
    scenario = payload["scenario"]
    spec = payload["spec"]
    decision = decision or incident_severity(event, spec["thresholds"])
    asset = str((event.get("location") or {}).get("asset_id") or "unknown")
    if decision.severity is None:
        raise ValueError(f"the detection at {asset} is not an Incident: {decision.reason}")
    fleets = list(payload.get("fleets") or [])
    fleet = fleets[0]["fleet"] if fleets else scenario["name"]
    observed = rfc3339(detected_at)
    measured, terminals = incident_evidence(event, fleets, fleet, observed, live=decided_by is not None)
    truth, truth_said = drill_truth(event, fleet, observed)
    timing = simulated_timing(event, fleet, observed)
    if decided_by is not None:  # on the readings' own clock: the delay, not a simulated minute
        timing = [t for t in timing if t["metric"] != "simulatedMinute"]
    evidence = [*timing, *truth, *measured][:64]
    latitude, longitude, placed = incident_coordinates(event, payload, centre)
    where = [placed] if placed.startswith("Drill placement") else [f"Asset {asset}.", placed]
    if terminals:
        where.append(f"Readings from terminals {', '.join(terminals)}.")
    note = " ".join(part for part in (decision.reason, truth_said) if part)
    return {
        "apiVersion": API_VERSION,
        "kind": "Incident",
        "metadata": {
            "name": incident_name(
                scenario["name"], asset,
                float((event.get("onset_s") if decided_by is not None else None)
                      or event.get("detected_at_s") or 0.0),
            ),
            "namespace": scenario["namespace"],
            "labels": {LABEL_SCENARIO: scenario["name"], LABEL_MANAGED_BY: MANAGED_BY},
        },
        "spec": {
            "scenarioRef": {"name": scenario["name"]},
            "kind": spec["kind"],
            "severity": decision.severity,
            "drill": spec["mode"] == "drill",
            "location": {
                "latitude": latitude,
                "longitude": longitude,
                "assetId": asset[:253],
                "description": " ".join(where)[:1024],
            },
            "evidence": evidence,
            **({"decidedBy": dict(decided_by)} if decided_by is not None else {}),
            "detectedAt": observed,
            "state": "Detected",
            "transitions": [
                {"state": "Detected", "time": observed, "actor": f"scenario/{scenario['name']}",
                 "note": note[:4096]}
            ],
        },
    }


def severity_at_least(severity: str, minimum: str) -> bool:
    return _SEVERITY_ORDER.get(severity, 0) >= _SEVERITY_ORDER.get(minimum, 1)
