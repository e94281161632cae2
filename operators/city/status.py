"""Observed state of a city's resources, computed by pure functions.

Each ``compute_*_status`` takes the object and what the reconciler observed (children,
reports, resolution results, the time) and returns the complete status the object should
have. The reconciler writes it only when it differs from the stored one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from citynerve.models.detectors.measures import threshold_metrics
from citynerve.models.registry import REFUSED_ARTIFACT_REASONS, ModelResolutionError, ResolvedModel
from citynerve.operators.api.city import INCIDENT_STATES
from citynerve.operators.api.events import MODEL_SWAPPED, WORKLOAD_FAILED, WORKLOAD_STARTED, EventReason
from citynerve.operators.conditions import (
    duration,
    find_condition,
    make_condition,
    parse_time,
    rfc3339,
    with_conditions,
)

STALE_AFTER_INTERVALS = 3


def _generation(obj: Mapping[str, Any]) -> int | None:
    generation = obj.get("metadata", {}).get("generation")
    return int(generation) if generation is not None else None


# --- SensorFleet -------------------------------------------------------------------------------


def _int(data: Mapping[str, Any], key: str) -> int | None:
    try:
        return max(0, int(str(data[key])))
    except (KeyError, ValueError):
        return None


def _replacing(deployment: Mapping[str, Any]) -> bool:
    """Whether the Deployment is rolling out a new template and has not given up."""
    meta, dstatus = deployment.get("metadata") or {}, deployment.get("status") or {}
    if int(dstatus.get("observedGeneration") or 0) < int(meta.get("generation") or 0):
        return True
    # Recreate: the old worker is stopped before the new template has a pod at all
    if int(dstatus.get("updatedReplicas") or 0) < int((deployment.get("spec") or {}).get("replicas") or 0):
        return True
    progressing: Mapping[str, Any] = next(
        (c for c in dstatus.get("conditions") or [] if c.get("type") == "Progressing"), {})
    rolling = ("ReplicaSetUpdated", "NewReplicaSetCreated", "FoundNewReplicaSet")
    return progressing.get("status") == "True" and progressing.get("reason") in rolling


# Whether a fleet's SensorType is in the city's catalogue: found, missing, or not readable by the
# operator (its account may not list SensorTypes; the city chart grants it).
SensorTypeLookup = Literal["found", "missing", "unreadable"]


def sensor_type_condition(
    fleet: Mapping[str, Any], lookup: SensorTypeLookup, generation: int | None
) -> dict[str, Any]:
    """``SensorTypeFound``: whether the SensorType the fleet names exists in the city."""
    name, sensor_type = fleet["metadata"]["name"], fleet["spec"].get("sensorType")
    if lookup == "found":
        return make_condition(
            "SensorTypeFound", "True", "SensorTypeFound", f"SensorType {sensor_type} exists.", generation
        )
    if lookup == "missing":
        return make_condition(
            "SensorTypeFound",
            "False",
            "SensorTypeNotFound",
            f"SensorFleet {name} names SensorType {sensor_type}, which does not exist in this city, so its "
            "readings cannot be validated. Create the SensorType on the hub (it propagates to every city) "
            "or correct spec.sensorType.",
            generation,
        )
    return make_condition(
        "SensorTypeFound",
        "Unknown",
        "CatalogueUnreadable",
        f"The city operator may not list SensorTypes, so it cannot tell whether SensorType {sensor_type} "
        "exists. Grant its account list on sensortypes.citynerve.io (the city chart does).",
        generation,
    )


def compute_fleet_status(
    fleet: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    report: Mapping[str, Any] | None,
    now: datetime,
    sensor_type: SensorTypeLookup = "found",
    data_plane: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Status of a SensorFleet from its SensorType, its data plane, its stream worker's Deployment
    and the status that worker last wrote on the city broker.

    A fleet whose SensorType does not exist is not Ready (``SensorTypeNotFound``), whatever its
    workers do: nothing can validate its readings. ``data_plane`` is why its broker users or
    streams could not be made (reason, message): its ingestion is not available.

    ``report`` is the worker's status from the broker's fleet bucket: ``reportedAt``,
    ``terminalsOnline``, ``lastReadingTime``, ``acceptedReadings``, ``rejectedReadings``,
    ``quarantinedPayloads``. Freshness is measured at the report (reportedAt - lastReadingTime), so
    the status changes when a report arrives, not every second; a report older than three sampling
    intervals makes the data stale.
    """
    name = fleet["metadata"]["name"]
    generation = _generation(fleet)
    interval = int(fleet["spec"].get("samplingIntervalSeconds", 300))
    type_found = sensor_type_condition(fleet, sensor_type, generation)
    conditions = [type_found]

    if data_plane is not None:
        available = make_condition("IngestionAvailable", "False", data_plane[0], data_plane[1], generation)
    elif deployment is None:
        available = make_condition(
            "IngestionAvailable",
            "False",
            "DeploymentMissing",
            f"The ingestion Deployment of fleet {name} does not exist yet.",
            generation,
        )
    else:
        wanted = int((deployment.get("spec") or {}).get("replicas") or 0)
        dstatus = deployment.get("status") or {}
        ready = int(dstatus.get("availableReplicas") or 0)
        # The worker is replaced, not rolled (one consumer per fleet): while its Deployment rolls
        # out, readings wait on the fleet's durable stream, so ingestion that was available stays
        # so and a spec change does not flap Ready. A rollout that fails (its progress deadline
        # passes) or a worker that dies afterwards counts.
        held = find_condition(fleet.get("status"), "IngestionAvailable")
        if ready < wanted and _replacing(deployment) and held and held.get("status") == "True":
            available = dict(held)
        elif ready >= wanted:
            available = make_condition(
                "IngestionAvailable",
                "True",
                "DeploymentAvailable",
                # the wanted count, not the available one: a rolling update briefly has more
                f"All {wanted} ingestion workers of fleet {name} are available.",
                generation,
            )
        else:
            available = make_condition(
                "IngestionAvailable",
                "False",
                "DeploymentProgressing",
                f"{ready} of {wanted} ingestion workers of fleet {name} are available; see "
                f"Deployment {deployment['metadata']['name']}.",
                generation,
            )
    conditions.append(available)

    fields: dict[str, Any] = {}
    if report is None:
        fresh = make_condition(
            "DataFresh",
            "Unknown",
            "NoReport",
            f"The stream worker of fleet {name} has not reported on the city broker yet.",
            generation,
        )
    else:
        reported = parse_time(str(report.get("reportedAt") or "")) or now
        last = parse_time(str(report.get("lastReadingTime") or ""))
        accepted = _int(report, "acceptedReadings") or 0
        rejected = _int(report, "rejectedReadings") or 0
        fields = {
            "terminalsOnline": _int(report, "terminalsOnline"),
            "quarantinedPayloads": _int(report, "quarantinedPayloads"),
            "lateReadings": _int(report, "lateReadings"),
            "qualityScore": round(100 * accepted / (accepted + rejected)) if accepted + rejected else None,
            "lastReadingTime": rfc3339(last) if last else None,
            "dataFreshnessSeconds": max(0, int((reported - last).total_seconds())) if last else None,
        }
        if fields["dataFreshnessSeconds"] is not None:
            fields["dataFreshness"] = duration(fields["dataFreshnessSeconds"])
        limit = STALE_AFTER_INTERVALS * interval
        newest = last or reported
        if (now - newest).total_seconds() > limit:
            fresh = make_condition(
                "DataFresh",
                "False",
                "ReadingsStale",
                f"The newest reading of fleet {name} is older than {duration(limit)} (three "
                "sampling intervals); check the terminals and the ingestion workers.",
                generation,
            )
        else:
            fresh = make_condition(
                "DataFresh", "True", "ReadingsFresh", f"Readings are newer than {duration(limit)}.",
                generation,
            )
    conditions.append(fresh)

    if type_found["status"] == "False":
        ready_condition = make_condition(
            "Ready", "False", type_found["reason"], type_found["message"], generation
        )
    elif available["status"] != "True":
        ready_condition = make_condition(
            "Ready", "False", available["reason"], available["message"], generation
        )
    elif fresh["status"] == "False":
        ready_condition = make_condition("Ready", "False", fresh["reason"], fresh["message"], generation)
    else:
        message = f"Ingestion of fleet {name} is available" + (
            "." if fresh["status"] == "True" else "; no readings are reported yet."
        )
        ready_condition = make_condition("Ready", "True", "IngestionReady", message, generation)
    conditions.append(ready_condition)
    return with_conditions(fleet.get("status"), fields, conditions, generation, rfc3339(now))


# --- AnalyticsModel ----------------------------------------------------------------------------


def compute_model_status(
    model: Mapping[str, Any],
    resolved: ResolvedModel | None,
    error: ModelResolutionError | None,
    now: datetime,
) -> dict[str, Any]:
    """Status of an AnalyticsModel from a resolution (or its error).

    ``Verified`` says whether the artifact's digest matched ``spec.expectedDigest`` — the digest
    from the hub's promotion chain (a pinned model) or the city's own manifest; the registry's tag
    never counts. A model without one resolves but is not Verified, and live scenarios refuse it.

    A temporary error (registry unreachable, credentials refused) and a refused artifact (its
    digest does not match, or it lies outside the registry's artifact root: the new version is
    not trusted, the verified one keeps running) keep the last resolution in use, with its
    ``Verified``, and report Degraded; any other permanent error (no such model, alias or
    version) withdraws it.
    """
    spec = model["spec"]
    generation = _generation(model)
    current = dict(model.get("status") or {})
    ref = (
        f"{spec['registeredModel']}@{spec['alias']}"
        if spec.get("alias")
        else f"{spec['registeredModel']} version {spec.get('version')}"
    )
    keys = ("resolvedVersion", "modelUri", "artifactDigest", "metrics")
    if resolved is not None:
        fields: dict[str, Any] = {
            "resolvedVersion": resolved.version,
            "modelUri": resolved.model_uri,
            "artifactDigest": resolved.artifact_digest,
            "metrics": [{"name": k, "value": v} for k, v in sorted(resolved.metrics.items())][:256],
        }
        conditions = [
            make_condition(
                "Ready",
                "True",
                "Resolved",
                f"{ref} resolved to version {resolved.version}, artifact digest "
                + ("verified" if resolved.verified else "computed (not verified)"),
                generation,
            ),
            make_condition("Degraded", "False", "Resolved", "", generation),
            verified_condition(resolved, generation),
        ]
    elif (
        error is not None
        and (not error.permanent or error.reason in REFUSED_ARTIFACT_REASONS)
        and current.get("resolvedVersion")
    ):
        fields = {k: current.get(k) for k in keys}
        conditions = [
            make_condition(
                "Ready",
                "True",
                "LastResolutionInUse",
                f"still using version {current['resolvedVersion']}: {error.message}",
                generation,
            ),
            make_condition("Degraded", "True", error.reason, error.message, generation),
        ]
    else:
        assert error is not None
        fields = {}
        conditions = [
            make_condition("Ready", "False", error.reason, error.message, generation),
            make_condition("Degraded", "True", error.reason, error.message, generation),
            make_condition("Verified", "False", error.reason, "no artifact is in use", generation),
        ]
    return with_conditions(model.get("status"), fields, conditions, generation, rfc3339(now))


def verified_condition(resolved: ResolvedModel, generation: int | None) -> dict[str, Any]:
    """``Verified`` of a resolution: True only when its digest matched spec.expectedDigest."""
    if resolved.verified:
        return make_condition(
            "Verified",
            "True",
            "DigestMatched",
            f"the artifact of version {resolved.version} has digest {resolved.artifact_digest}, "
            "as spec.expectedDigest requires",
            generation,
        )
    return make_condition(
        "Verified",
        "False",
        "NoExpectedDigest",
        f"spec.expectedDigest is not set, so the artifact of version {resolved.version} (digest "
        f"{resolved.artifact_digest}) is not verified; live scenarios refuse this model until a "
        "ModelPromotion pins it or spec.expectedDigest is set",
        generation,
    )


# --- Scenario ----------------------------------------------------------------------------------


WorkloadState = Literal["Pending", "Running", "Succeeded", "Failed"]


@dataclass(frozen=True)
class WorkloadObservation:
    """What the reconciler saw of a scenario's workload."""

    api_version: str
    kind: str
    name: str
    state: WorkloadState
    ready_replicas: int = 0
    message: str = ""
    last_evaluation_time: str | None = None
    #: a live workload's own report: the model it loaded (name, registeredModel, version, artifactDigest)
    model: Mapping[str, Any] | None = None
    #: and what it scored (windows, steps, lagWindows, lastWindowTime)
    scored: Mapping[str, Any] | None = None


def missing_references(
    scenario: Mapping[str, Any],
    fleets: Mapping[str, Mapping[str, Any]],
    models: Mapping[str, Mapping[str, Any]],
) -> tuple[str, str] | None:
    """The first unmet reference of a scenario as (reason, message), or None when all resolve; a
    threshold naming a metric the kind's detector does not measure is one."""
    spec = scenario["spec"]
    namespace = scenario["metadata"]["namespace"]
    allowed = threshold_metrics(str(spec.get("kind")))
    unknown = [t["metric"] for t in spec.get("thresholds") or [] if t["metric"] not in allowed]
    if unknown:
        return (
            "UnknownThreshold",
            f"spec.thresholds names {', '.join(unknown)}, which the {spec.get('kind')} detector does not "
            "measure; "
            f"a threshold may name {', '.join(allowed)}.",
        )
    absent = [f["name"] for f in spec["fleets"] if f["name"] not in fleets]
    if absent:
        return (
            "FleetNotFound",
            f"SensorFleet {', '.join(absent)} not found in namespace {namespace}; "
            "create it or correct spec.fleets.",
        )
    absent = [m["name"] for m in spec.get("models") or [] if m["name"] not in models]
    if absent:
        return (
            "ModelNotFound",
            f"AnalyticsModel {', '.join(absent)} not found in namespace {namespace}; "
            "create it or correct spec.models.",
        )
    for ref in spec.get("models") or []:
        model = models[ref["name"]]
        ready = next(
            (c for c in (model.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"), None
        )
        if not ready or ready.get("status") != "True":
            why = f": {ready['reason']}: {ready.get('message', '')}" if ready else " (not resolved yet)"
            return ("ModelNotReady", f"AnalyticsModel {ref['name']} is not Ready{why}")
        if spec.get("mode", "live") == "live":
            verified = find_condition(model.get("status"), "Verified")
            if not verified or verified.get("status") != "True":
                why = (
                    f"{verified['reason']}: {verified.get('message', '')}" if verified else "not verified yet"
                )
                return (
                    "ModelNotVerified",
                    f"a live scenario runs only models whose artifact digest matched one from the hub's "
                    f"promotion chain or spec.expectedDigest; AnalyticsModel {ref['name']} is not Verified "
                    f"({why})",
                )
    return None


def running_models(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The model versions a workload payload scores with, as ``status.models`` lists them (pure)."""
    return [
        {k: v for k, v in (("name", m["name"]), ("version", m.get("version")),
                           ("artifactDigest", m.get("artifactDigest"))) if v is not None}
        for m in payload.get("models") or []
    ]


def compute_scenario_status(
    scenario: Mapping[str, Any],
    unmet: tuple[str, str] | None,
    workload: WorkloadObservation | None,
    open_incidents: int,
    now: datetime,
    refused_routes: Sequence[str] = (),
    models: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Status of a Scenario: its workload's readiness, and whether its alert routes are allowed.

    ``refused_routes`` are the messages of routes the city's alert policy refuses (one per route).
    ``models`` are the versions the workload's payload carries (``running_models``); they become
    ``status.models`` once that workload runs, so a swap is seen when it takes effect.
    """
    generation = _generation(scenario)
    replicas = int(scenario["spec"].get("replicas", 1))
    fields: dict[str, Any] = {"openIncidents": open_incidents}
    if workload is not None:
        # A new revision that is not running yet has not swapped anything: the old models stand.
        fields["models"] = (scenario.get("status") or {}).get("models") or None
        fields["workload"] = {
            "apiVersion": workload.api_version,
            "kind": workload.kind,
            "name": workload.name,
        }
        fields["readyReplicas"] = workload.ready_replicas
        fields["lastEvaluationTime"] = workload.last_evaluation_time
        if workload.scored is not None:
            fields["scored"] = {k: v for k, v in workload.scored.items() if v is not None}
        if workload.model is not None:  # what the live workload says it loaded, not what it was asked to
            loaded = {"name": workload.model["name"], "version": str(workload.model["version"]),
                      "artifactDigest": workload.model["artifactDigest"]}
            fields["models"] = [loaded, *[dict(m) for m in models if m.get("name") != loaded["name"]]]
        elif workload.state in ("Running", "Succeeded"):
            fields["models"] = [dict(m) for m in models] or None
    if unmet is not None:
        ready = make_condition("Ready", "False", unmet[0], unmet[1], generation)
    elif replicas == 0:
        ready = make_condition(
            "Ready", "False", "Suspended", "spec.replicas is 0, so the workload is stopped.", generation
        )
    elif workload is None:
        ready = make_condition(
            "Ready", "False", "WorkloadPending", "The analytics workload is being created.", generation
        )
    elif workload.state == "Failed":
        ready = make_condition(
            "Ready",
            "False",
            "WorkloadFailed",
            f"{workload.kind} {workload.name} failed: {workload.message}"
            f"{'' if workload.message.endswith('.') else '.'}",
            generation,
        )
    elif workload.state == "Pending":
        ready = make_condition(
            "Ready",
            "False",
            "WorkloadPending",
            f"{workload.kind} {workload.name} is starting{': ' if workload.message else ''}"
            f"{workload.message}{'' if workload.message.endswith('.') else '.'}",
            generation,
        )
    else:
        verb = "finished" if workload.state == "Succeeded" else "is running"
        ready = make_condition(
            "Ready",
            "True",
            f"Workload{workload.state}",
            f"{workload.kind} {workload.name} {verb}.",
            generation,
        )
    routes = len(scenario["spec"].get("alertRoutes") or [])
    if refused_routes:
        accepted = make_condition(
            "AlertRoutesAccepted", "False", "RouteRefused", _joined(refused_routes), generation
        )
    else:
        accepted = make_condition(
            "AlertRoutesAccepted",
            "True",
            "RoutesAccepted",
            f"Every alert route ({routes}) is allowed by the city's alert policy."
            if routes
            else "The scenario has no alert routes.",
            generation,
        )
    return with_conditions(scenario.get("status"), fields, [ready, accepted], generation, rfc3339(now))


ScenarioEvent = tuple[EventReason, str]
_RUNNING_REASONS = ("WorkloadRunning", "WorkloadSucceeded")


def _model_text(model: Mapping[str, Any]) -> str:
    digest = model.get("artifactDigest")
    return f"version {model.get('version', 'unknown')}" + (f" (artifact {digest})" if digest else "")


def scenario_events(scenario: Mapping[str, Any], desired: Mapping[str, Any]) -> list[ScenarioEvent]:
    """The Events a Scenario's status change calls for: workload started or failed, model swapped (pure).

    Only changes count, so a reconcile that writes nothing, or a restarted operator that finds
    the same status, tells nothing twice.
    """
    name = scenario["metadata"]["name"]
    before = scenario.get("status") or {}
    old_ready, new_ready = find_condition(before, "Ready") or {}, find_condition(desired, "Ready") or {}
    old_reason, new_reason = old_ready.get("reason"), new_ready.get("reason")
    old_workload = (before.get("workload") or {}).get("name")
    workload = desired.get("workload") or {}
    new_workload = workload.get("name")
    replaced = new_workload is not None and new_workload != old_workload
    events: list[ScenarioEvent] = []
    if new_reason in _RUNNING_REASONS and (replaced or old_reason not in _RUNNING_REASONS):
        models = ", ".join(f"{m['name']} {_model_text(m)}" for m in desired.get("models") or [])
        events.append((
            WORKLOAD_STARTED,
            f"Scenario {name} started {workload.get('kind')} {new_workload}"
            + (f", scoring with {models}." if models else "."),
        ))
    if new_reason == "WorkloadFailed" and (replaced or old_reason != "WorkloadFailed"):
        events.append((WORKLOAD_FAILED, f"Scenario {name}'s workload failed: {new_ready.get('message', '')}"))
    if new_reason in _RUNNING_REASONS:
        old_models = {m["name"]: m for m in before.get("models") or []}
        for model in desired.get("models") or []:
            old = old_models.get(model["name"])
            if old is not None and (old.get("version"), old.get("artifactDigest")) != (
                model.get("version"), model.get("artifactDigest")
            ):
                events.append((
                    MODEL_SWAPPED,
                    f"Scenario {name} now scores with AnalyticsModel {model['name']} {_model_text(model)}; "
                    f"it scored with {_model_text(old)} before.",
                ))
    return events


MAX_CONDITION_MESSAGE = 4096


def _joined(messages: Sequence[str]) -> str:
    """Several messages in one condition message, bounded."""
    text = "; ".join(messages)
    return text if len(text) <= MAX_CONDITION_MESSAGE else text[: MAX_CONDITION_MESSAGE - 1] + "…"


# --- Incident ----------------------------------------------------------------------------------


def _seconds_between(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, int((end - start).total_seconds()))


# A time further ahead of the operator's clock than this is not believed. The API server has no
# "now" to compare spec.detectedAt with, so the operator reports such an incident instead.
CLOCK_SKEW_SECONDS = 300


def measure_response_times(
    spec: Mapping[str, Any], now: datetime, generation: int | None
) -> tuple[dict[str, int | None], dict[str, Any]]:
    """Seconds from detection to dispatch, crew on site and resolution, and the ``Measured`` condition.

    A detection or transition timed in the future (``detectedAt: 9999-12-31``) would give figures
    nobody achieved, so that incident measures nothing and says why.
    """
    detected = parse_time(spec.get("detectedAt"))
    entered = {t["state"]: parse_time(t["time"]) for t in spec.get("transitions") or []}
    horizon = now + timedelta(seconds=CLOCK_SKEW_SECONDS)
    ahead = [f"spec.detectedAt {rfc3339(detected)}"] if detected and detected > horizon else []
    ahead += [f"the {state} transition at {rfc3339(at)}" for state, at in entered.items()
              if at and at > horizon]
    if ahead:
        message = (
            f"{' and '.join(ahead)} lies more than {CLOCK_SKEW_SECONDS} s after the city operator's clock "
            f"({rfc3339(now)}), so no response time is measured and the incident counts in no response "
            "KPI; record the real times (detectedAt is immutable: recreate the Incident)"
        )
        times = dict.fromkeys(("dispatchSeconds", "responseSeconds", "resolutionSeconds"))
        return times, make_condition("Measured", "False", "TimeInFuture", message, generation)
    times = {
        "dispatchSeconds": _seconds_between(detected, entered.get("Dispatched")),
        "responseSeconds": _seconds_between(detected, entered.get("OnSite")),
        "resolutionSeconds": _seconds_between(detected, entered.get("Resolved")),
    }
    message = "Response times are measured from spec.detectedAt to the recorded transitions."
    return times, make_condition("Measured", "True", "TransitionsRecorded", message, generation)


def compute_incident_status(
    incident: Mapping[str, Any],
    notified: Sequence[str],
    retries: Sequence[Mapping[str, Any]],
    now: datetime,
) -> dict[str, Any]:
    """Response times measured from the recorded transitions, where the incident was delivered,
    and the deliveries waiting for a retry (``status.deliveryRetries`` entries, sorted by route)."""
    spec = incident["spec"]
    generation = _generation(incident)
    times, measured = measure_response_times(spec, now, generation)
    response = times.get("responseSeconds")
    fields: dict[str, Any] = {
        **times,
        "responseTime": duration(response) if response is not None else None,
        "notifiedRoutes": sorted(notified) or None,
        "deliveryRetries": list(retries) or None,
    }
    if retries:
        condition = make_condition(
            "Notified", "False", str(retries[0]["reason"]), _joined([str(r["message"]) for r in retries]),
            generation,
        )
    else:
        condition = make_condition(
            "Notified",
            "True",
            "Delivered",
            f"State {spec.get('state', 'Detected')} was delivered to every alert route due.",
            generation,
        )
    return with_conditions(incident.get("status"), fields, [condition, measured], generation, rfc3339(now))


def incident_detected_message(incident: Mapping[str, Any]) -> str | None:
    """The IncidentDetected Event's message, for an Incident the operator has never reconciled (pure).

    An Incident with conditions was seen before (by this operator or an earlier run of it).
    """
    if (incident.get("status") or {}).get("conditions"):
        return None
    spec = incident["spec"]
    location = spec.get("location") or {}
    where = location.get("assetId") or location.get("description") or "an unnamed asset"
    return (
        f"{'Drill scenario' if spec.get('drill') else 'Scenario'} {spec['scenarioRef']['name']} detected a "
        f"{spec['kind']} incident of severity {spec['severity']} at {where} "
        f"({location.get('latitude')}, {location.get('longitude')}) at {spec.get('detectedAt')}."
    )


def state_index(state: str) -> int:
    return INCIDENT_STATES.index(state) if state in INCIDENT_STATES else -1
