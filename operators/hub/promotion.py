"""Governed model promotion on the hub: gates, canary first, soak, automatic rollback, audit.

A ``ModelPromotion`` moves one registered model version to an alias across the cities its
selector picks. The hub never loads a model itself; it *pins* each city to a version by
propagating an ``AnalyticsModel`` (``spec.version`` and ``spec.expectedDigest``) through the
work mechanism (``federation.placement.desired_work``), and watches what the city's agent
reports back about it. Every decision is made by ``promotion_step`` (pure); the Kopf timer
only gathers observations and carries out the actions it names.

The rules
---------
0. **Selection** (at once). A selector that picks no joined city, or a canary city it does not
   pick, refuses the promotion before MLflow is even read (``selection_refusal``). What needs no
   City objects is refused by the API server: a rollback timeout that leaves no time to soak,
   gates of one metric that contradict each other.
1. **Gates** (at start). The version's recorded metrics — those of its source run in MLflow —
   must meet every gate of ``spec.gates`` except ``soakIncidents`` (below). A missing metric
   fails its gate. A version that fails is *refused*: nothing is pinned anywhere; the
   ``GatesPassed`` condition, an audit entry and a Warning Event name the metric, its value
   and the threshold.
   **The digest.** At the gate the hub downloads the version's artifact and computes its digest
   itself. It must equal the digest an earlier promotion recorded for that version, or (the first
   time through the chain) the one recorded at registration (the ``citynerve.io/artifact-digest``
   tag, read here and nowhere else); otherwise, or when the artifact lies outside the registry's
   artifact root, the version is refused. The digest is recorded in ``status.artifactDigest``,
   with the version the target alias named until now and its digest (``status.previousVersion``,
   ``status.previousDigest``) — status only the hub can write. Every pin carries that digest as
   the AnalyticsModel's ``spec.expectedDigest``; a city verifies against nothing else
   (docs/models-trust.md).
2. **Canary first.** The canary city is pinned to the new version; the others wait. A city is
   *running* the version when its agent reports the pinned AnalyticsModel applied at the
   current hash and ``Ready=True`` with reason ``Resolved`` (the city operator resolved that
   exact version and verified its digest before loading it). Then it soaks for ``soakSeconds``.
3. **A city fails** when, after being pinned,
   - its agent could not apply the AnalyticsModel (``ApplyFailed``), or
   - the city reports it not Ready with a permanent reason, e.g. ``ArtifactDigestMismatch``
     (a tampered artifact is refused by the city — "trusted models"), or
   - during the soak, the city's incidents of the model's scenario kind exceed the limit set
     by a gate on the city-observed metric ``soakIncidents`` (for example
     ``soakIncidents LessThanOrEqual 2``), or the model stops being Ready.
   Temporary reasons (``RegistryUnreachable``, ``RegistryError``, ``ArtifactUnavailable``) are
   waited out until ``rollback.timeoutSeconds``.
4. **Rollback.** A failing canary rolls the promotion back: the canary is pinned back to the
   previous version (the one the target alias named at start; without one, its pin is
   withdrawn and the city keeps what it last applied) and the other cities never receive the
   new version. After the canary, more than ``rollback.maxFailedCities`` failures roll every
   city back; fewer roll back only the failing city. Running out of ``timeoutSeconds`` rolls
   everything back.
5. **Completion.** When every city has passed its soak, the MLflow alias ``targetAlias`` is
   moved to the version, and the promotion is ``Complete``.

Pins outlive completion: a city stays pinned to what the newest promotion of a model asked of
it, until a newer promotion asks otherwise.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from citynerve.models.registry import DIGEST_TAG, SCENARIO_KIND_TAG, ResolvedModel
from citynerve.operators.api.hub import (
    AuditEntry,
    CityPromotionOutcome,
    GateResult,
    ModelPromotionSpec,
    ModelPromotionStatus,
    PromotionGate,
)
from citynerve.operators.api.resources import kind_info
from citynerve.operators.conditions import ConditionStatus, make_condition, rfc3339, sentence, set_conditions
from citynerve.operators.federation.placement import is_joined, manifest_hash, work_name
from citynerve.operators.hub.status import SCENARIO_KINDS_KEY

if TYPE_CHECKING:
    import kopf
    from citynerve.operators.hub.handlers import HubContext

log = logging.getLogger(__name__)

HUB_ACTOR = "citynerve-hub"
REQUESTED_BY_ANNOTATION = "citynerve.io/requested-by"
SCENARIO_KIND_ANNOTATION = "citynerve.io/scenario-kind"
SOAK_INCIDENTS = "soakIncidents"  # the one gate metric observed in the city rather than in MLflow
TEMPORARY_REASONS = frozenset(
    {
        "RegistryUnreachable",
        "RegistryError",
        "ArtifactUnavailable",
        "RegistryUnauthenticated",
        "RegistryPermissionDenied",
    }
)

# Reasons of a city's outcome. Pinned to the new version while Rolling, Soaking and Promoted;
# pinned back to the previous one when RolledBack; not pinned by this promotion otherwise.
ROLLING, SOAKING, PROMOTED = "Rolling", "Soaking", "Promoted"
WAITING, ROLLED_BACK, CANCELLED = "WaitingForCanary", "RolledBack", "Cancelled"
PINNED_NEW = frozenset({ROLLING, SOAKING, PROMOTED})

Operator = Literal["GreaterThan", "GreaterThanOrEqual", "LessThan", "LessThanOrEqual"]
_SYMBOLS: dict[str, str] = {
    "GreaterThan": ">",
    "GreaterThanOrEqual": ">=",
    "LessThan": "<",
    "LessThanOrEqual": "<=",
}


# --- what the hub observes ---------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryView:
    """What MLflow says about the promoted version and the target alias (read once, at start)."""

    version: str | None = None
    digest: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    scenario_kind: str | None = None
    previous_version: str | None = None
    previous_digest: str | None = None
    error_reason: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class CityView:
    """What a city's agent reports about the pinned AnalyticsModel, and the city's recent incidents."""

    name: str
    work_hash: str | None = None  # hash of the AnalyticsModel work the agent last applied
    applied: bool | None = None
    ready: str = "Unknown"
    reason: str | None = None
    message: str | None = None
    incidents: Sequence[tuple[str | None, dt.datetime]] = ()  # (kind, detectedAt)
    scenario_kinds: frozenset[str] | None = None  # kinds of its Ready scenarios (None: not reported)


@dataclass(frozen=True)
class Observations:
    now: dt.datetime
    cities: Sequence[Mapping[str, Any]]  # City objects on the hub
    views: Mapping[str, CityView]
    registry: RegistryView | None = None  # only needed before start


# --- what the handler does ---------------------------------------------------------------------


@dataclass(frozen=True)
class PostEvent:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Annotate:
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class MoveAlias:
    model: str
    alias: str
    version: str


Action = PostEvent | Annotate | MoveAlias


# --- pins: what the promotions ask of each city -------------------------------------------------


def model_object_name(model_name: str) -> str:
    """The AnalyticsModel a registered model is pinned through, in every city (a DNS label)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model_name.lower()).strip("-")
    return name[:63].rstrip("-") or "model"


def pin_manifest(model_name: str, version: str, digest: str | None) -> dict[str, Any]:
    """The AnalyticsModel that pins ``model_name`` at ``version`` (with the digest it must have)."""
    info = kind_info("AnalyticsModel")
    spec: dict[str, Any] = {"registeredModel": model_name, "version": version}
    if digest:
        spec["expectedDigest"] = digest
    return {
        "apiVersion": f"{info.group}/{info.version}",
        "kind": "AnalyticsModel",
        "metadata": {
            "name": model_object_name(model_name),
            "labels": {"citynerve.io/pinned-by": "promotion"},
        },
        "spec": spec,
    }


def pin_work_name(model_name: str) -> str:
    return work_name("AnalyticsModel", model_object_name(model_name))


def _annotations(promotion: Mapping[str, Any]) -> Mapping[str, str]:
    return dict(promotion.get("metadata", {}).get("annotations") or {})


def promotion_pins(promotion: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """City → the AnalyticsModel manifest this promotion pins there (cities it does not pin are absent).

    Versions and digests come from the promotion's status, which only the hub writes.
    """
    status = promotion.get("status") or {}
    version = status.get("resolvedVersion")
    if not version:
        return {}
    model = promotion["spec"]["modelName"]
    pins: dict[str, dict[str, Any]] = {}
    for outcome in status.get("cities") or []:
        reason = outcome.get("reason")
        if reason in PINNED_NEW:
            pins[outcome["city"]] = pin_manifest(model, version, status.get("artifactDigest"))
        elif reason == ROLLED_BACK and status.get("previousVersion"):
            pins[outcome["city"]] = pin_manifest(
                model, status["previousVersion"], status.get("previousDigest")
            )
    return pins


def chain_digests(model_name: str, promotions: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, str]]:
    """Version → (digest, promotion) that earlier promotions of ``model_name`` recorded (pure).

    Only digests a promotion recorded at its gate count (its status); the newest promotion wins.
    """
    chain: dict[str, tuple[str, str]] = {}
    ordered = sorted(
        promotions,
        key=lambda p: (str(p["metadata"].get("creationTimestamp", "")), str(p["metadata"].get("name", ""))),
    )
    for promotion in ordered:
        if (promotion.get("spec") or {}).get("modelName") != model_name:
            continue
        status = promotion.get("status") or {}
        name = f"ModelPromotion {promotion['metadata'].get('namespace')}/{promotion['metadata']['name']}"
        if status.get("resolvedVersion") and status.get("artifactDigest"):
            chain[str(status["resolvedVersion"])] = (str(status["artifactDigest"]), name)
    return chain


def city_pins(city: str, promotions: Iterable[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(source, AnalyticsModel) ``city`` should hold: per model, the newest promotion pinning it wins."""
    chosen: dict[str, tuple[str, dict[str, Any]]] = {}
    ordered = sorted(
        promotions,
        key=lambda p: (str(p["metadata"].get("creationTimestamp", "")), str(p["metadata"].get("name", ""))),
    )
    for promotion in ordered:
        pin = promotion_pins(promotion).get(city)
        if pin is not None:
            meta = promotion["metadata"]
            chosen[pin["metadata"]["name"]] = (f"ModelPromotion/{meta.get('namespace')}/{meta['name']}", pin)
    return [chosen[name] for name in sorted(chosen)]


# --- gates ---------------------------------------------------------------------------------------


def gate_text(gate: PromotionGate) -> str:
    return f"{gate.metric} {_SYMBOLS[gate.operator]} {gate.threshold}"


def gate_passes(gate: PromotionGate, value: float | None) -> bool:
    if value is None or math.isnan(value):
        return False
    threshold = Decimal(gate.threshold)
    observed = Decimal(repr(float(value)))
    return {
        "GreaterThan": observed > threshold,
        "GreaterThanOrEqual": observed >= threshold,
        "LessThan": observed < threshold,
        "LessThanOrEqual": observed <= threshold,
    }[gate.operator]


def _fmt(value: float | None) -> str:
    return "not recorded" if value is None else f"{value:.6g}"


def evaluate_gates(
    gates: Iterable[PromotionGate], values: Mapping[str, float]
) -> list[tuple[PromotionGate, GateResult]]:
    results = []
    for gate in gates:
        value = values.get(gate.metric)
        results.append(
            (gate, GateResult(metric=gate.metric, value=_fmt(value)[:32], passed=gate_passes(gate, value)))
        )
    return results


def selected_cities(spec: ModelPromotionSpec, cities: Iterable[Mapping[str, Any]]) -> list[str]:
    """Joined cities the promotion's selector picks, by name."""
    return sorted(
        c["metadata"]["name"]
        for c in cities
        if is_joined(c) and spec.city_selector.matches(dict(c["metadata"].get("labels") or {}))
    )


def selection_refusal(
    spec: ModelPromotionSpec, cities: Iterable[Mapping[str, Any]]
) -> tuple[str, str] | None:
    """(reason, message) when the selector picks no joined city or not the canary; None otherwise.

    Decided from the City objects alone, so the promotion is refused at once, before MLflow is read
    (a label selector is not something the API server can check a canary against).
    """
    selected = selected_cities(spec, cities)
    if not selected:
        return ("NoCitySelected", "the city selector picks no joined city")
    if spec.canary_city and spec.canary_city not in selected:
        return (
            "CanaryNotSelected",
            f"canary city {spec.canary_city} is not among the selected cities ({', '.join(selected)}); "
            "select it with spec.citySelector or choose a selected city as spec.canaryCity",
        )
    return None


# --- the decision --------------------------------------------------------------------------------


@dataclass
class _Step:
    """The status being computed, and the actions and audit entries collected on the way."""

    spec: ModelPromotionSpec
    status: ModelPromotionStatus
    now: dt.datetime
    actor: str
    actions: list[Action] = field(default_factory=list)

    def audit(self, action: str, message: str, city: str | None = None, actor: str = HUB_ACTOR) -> None:
        self.status.audit.append(
            AuditEntry.model_validate(
                {"time": self.now, "actor": actor, "action": action, "city": city, "message": message[:4096]}
            )
        )

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.actions.append(PostEvent(type_, reason, sentence(message)[:1024]))

    def outcome(self, city: str) -> CityPromotionOutcome:
        return next(o for o in self.status.cities if o.city == city)

    def set_outcome(self, city: str, promoted: ConditionStatus, reason: str, **fields: Any) -> None:
        current = self.outcome(city)
        for key, value in {"promoted": promoted, "reason": reason, **fields}.items():
            setattr(current, key, value)
        current.updated_at = self.now


def needs_registry(status: Mapping[str, Any] | None) -> bool:
    """Whether the next step must read MLflow first (only before the promotion has started)."""
    return not (status or {}).get("resolvedVersion") and not _terminal(status)


def _terminal(status: Mapping[str, Any] | None) -> bool:
    for cond in (status or {}).get("conditions") or []:
        if cond.get("type") == "Complete" and cond.get("status") in ("True", "False"):
            return True
    return False


def promotion_step(
    promotion: Mapping[str, Any], observations: Observations
) -> tuple[list[Action], dict[str, Any]]:
    """One decision: (actions to carry out, the complete desired status). Pure.

    Call ``needs_registry(status)`` first; before start, ``observations.registry`` is required.
    """
    spec = ModelPromotionSpec.model_validate(promotion["spec"])
    raw_status = promotion.get("status") or {}
    status = ModelPromotionStatus.model_validate(raw_status)
    generation = promotion.get("metadata", {}).get("generation")
    actor = _annotations(promotion).get(REQUESTED_BY_ANNOTATION, "unknown")
    step = _Step(spec, status, observations.now, actor)
    desired_conditions: list[dict[str, Any]] = []
    if _terminal(raw_status):
        pass
    elif not status.resolved_version:
        desired_conditions = _start(step, observations)
    else:
        desired_conditions = _advance(step, promotion, observations)
    status.observed_generation = generation
    dumped = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    dumped["conditions"] = set_conditions(
        raw_status.get("conditions") or [],
        [
            {**c, "observedGeneration": generation} if generation is not None else c
            for c in desired_conditions
        ],
        rfc3339(observations.now),
    )
    return step.actions, dumped


Cond = tuple[ConditionStatus, str, str]  # status, reason, message


def _conditions(
    gates: Cond | None = None,
    canary: Cond | None = None,
    complete: Cond | None = None,
    rolled_back: Cond | None = None,
) -> list[dict[str, Any]]:
    out = []
    for kind, value in (
        ("GatesPassed", gates),
        ("CanaryPassed", canary),
        ("Complete", complete),
        ("RolledBack", rolled_back),
    ):
        if value is not None:
            out.append(make_condition(kind, value[0], value[1], sentence(value[2]), None))
    return out


def _start(step: _Step, obs: Observations) -> list[dict[str, Any]]:
    spec = step.spec
    source = f"version {spec.source.version}" if spec.source.version else f"alias {spec.source.alias}"
    what = f"{spec.model_name} {source}"
    refusal = selection_refusal(spec, obs.cities)
    if refusal is not None:
        message = f"{what} is refused: {refusal[1]}"
        step.event("Warning", refusal[0], message)
        return _conditions(
            complete=("False", "Refused", message),
            rolled_back=("False", "NothingPromoted", "no city was changed"),
        )
    registry = obs.registry
    assert registry is not None, "promotion_step needs the registry view before the promotion starts"
    if registry.error_reason is not None or registry.version is None:
        message = registry.error_message or f"{what} could not be resolved"
        step.event("Warning", registry.error_reason or "SourceNotFound", message)
        return _conditions(
            gates=("False", registry.error_reason or "SourceNotFound", message),
            complete=("False", "Refused", f"the promotion was refused: {message}"),
            rolled_back=("False", "NothingPromoted", "no city was changed"),
        )
    version = registry.version
    step.status.resolved_version = version
    what = f"version {version} of {spec.model_name}"
    registry_gates = [g for g in spec.gates if g.metric != SOAK_INCIDENTS]
    results = evaluate_gates(registry_gates, registry.metrics)
    failed = [(g, r) for g, r in results if not r.passed]
    selected = selected_cities(spec, obs.cities)
    if failed:
        detail = "; ".join(f"{g.metric} is {r.value}, the gate requires {gate_text(g)}" for g, r in failed)
        message = f"{what} is refused: {detail}"
        for gate, result in failed:
            step.audit(
                "GateFailed", f"{what}: {gate.metric} = {result.value} does not meet {gate_text(gate)}"
            )
        step.event("Warning", "GateFailed", message)
        return _conditions(
            gates=("False", "GateFailed", message),
            complete=("False", "Refused", message),
            rolled_back=("False", "NothingPromoted", "no city was changed"),
        )
    if registry.digest is None:
        detail = f"{what} has no recorded artifact digest, so no city could verify it"
        step.event("Warning", "ArtifactDigestMissing", f"{what} is refused: {detail}")
        return _conditions(
            gates=("True", "GatesPassed", "every registry gate passed"),
            complete=("False", "Refused", f"{what} is refused: {detail}"),
            rolled_back=("False", "NothingPromoted", "no city was changed"),
        )
    step.status.artifact_digest = registry.digest
    step.status.previous_version = registry.previous_version
    step.status.previous_digest = registry.previous_digest
    step.actions.append(Annotate({SCENARIO_KIND_ANNOTATION: registry.scenario_kind or ""}))
    first = [spec.canary_city] if spec.canary_city else selected
    gates_text = ", ".join(gate_text(g) for g in spec.gates) or "no gates"
    step.audit(
        "Started",
        f"promote {what} (artifact digest {registry.digest}) to alias {spec.target_alias} in "
        f"{', '.join(selected)}, "
        f"canary {spec.canary_city or 'none'}, soak {spec.soak_seconds} s, gates: {gates_text}; "
        f"previous version {registry.previous_version or 'none'}",
        actor=step.actor,
    )
    for gate, result in results:
        step.audit("GatePassed", f"{what}: {gate.metric} = {result.value} meets {gate_text(gate)}")
    step.status.cities = [
        CityPromotionOutcome.model_validate(
            {
                "city": city,
                "promoted": "Unknown",
                "reason": ROLLING if city in first else WAITING,
                "previousVersion": registry.previous_version,
                "promotedVersion": version,
                "gates": [r.model_dump(by_alias=True) for _, r in results],
                "updatedAt": step.now,
            }
        )
        for city in selected
    ]
    step.event(
        "Normal",
        "Started",
        f"promoting {what} to {spec.target_alias}: "
        f"{'canary ' + spec.canary_city if spec.canary_city else 'all cities'} first",
    )
    return _conditions(
        gates=("True", "GatesPassed", f"{what} meets {gates_text}"),
        canary=("Unknown", "Rolling", f"pinning canary {spec.canary_city}") if spec.canary_city else None,
        complete=("Unknown", "InProgress", f"promoting {what} to {spec.target_alias}"),
        rolled_back=("False", "NotRolledBack", ""),
    )


def _started_at(status: ModelPromotionStatus) -> dt.datetime | None:
    return next((a.time for a in status.audit if a.action == "Started"), None)


def _city_failure(
    step: _Step,
    outcome: CityPromotionOutcome,
    view: CityView | None,
    soak_limit: PromotionGate | None,
    kind: str | None,
) -> tuple[str, str, int | None] | None:
    """(reason, message, incidents during soak) when the city failed; None otherwise.

    Also moves Rolling → Soaking → Promoted.
    """
    spec = step.spec
    version = step.status.resolved_version
    assert version is not None
    expected = manifest_hash(pin_manifest(spec.model_name, version, step.status.artifact_digest))
    if view is None or view.work_hash != expected:
        return None  # the city has not applied the pin yet
    if view.applied is False:
        return (
            "ApplyFailed",
            f"the city's agent could not apply the AnalyticsModel: {view.message or ''}",
            None,
        )
    if view.ready == "False" and view.reason not in TEMPORARY_REASONS:
        return (
            view.reason or "ModelNotReady",
            f"the city refused version {version}: {view.message or view.reason or 'not Ready'}",
            None,
        )
    running = view.ready == "True" and view.reason == "Resolved"
    if outcome.reason == ROLLING:
        if not running:
            return None
        step.set_outcome(outcome.city, "Unknown", SOAKING)
        step.audit(
            "Promoted",
            f"running version {version} (digest verified); soaking {spec.soak_seconds} s",
            city=outcome.city,
        )
    elif not running:
        return (
            view.reason or "ModelNotReady",
            f"version {version} stopped being Ready during the soak: {view.message or ''}",
            None,
        )
    soak_start = outcome.updated_at or step.now
    incidents = sum(1 for k, at in view.incidents if at >= soak_start and (kind is None or k in (None, kind)))
    if (
        soak_limit is not None
        and soak_limit.operator.startswith("Less")
        and not gate_passes(soak_limit, incidents)
    ):
        return (
            "TooManyIncidents",
            f"{incidents} incidents during the soak; the gate requires {gate_text(soak_limit)}",
            incidents,
        )
    if (step.now - soak_start).total_seconds() >= spec.soak_seconds:
        if soak_limit is not None and not gate_passes(soak_limit, incidents):
            return (
                "TooManyIncidents",
                f"{incidents} incidents during the soak; the gate requires {gate_text(soak_limit)}",
                incidents,
            )
        gates = [g for g in outcome.gates if g.metric != SOAK_INCIDENTS]
        if soak_limit is not None:
            gates.append(GateResult(metric=SOAK_INCIDENTS, value=str(incidents), passed=True))
        step.set_outcome(outcome.city, "True", PROMOTED, gates=gates)
        observed = soak_scope(kind, view.scenario_kinds)
        step.audit(
            "GatePassed",
            f"soak of {spec.soak_seconds} s passed with {incidents} incidents of {kind or 'any kind'}"
            f"{observed}",
            city=outcome.city,
        )
    return None


def soak_scope(kind: str | None, running: frozenset[str] | None) -> str:
    """What a soak could observe in a city: said when the city runs no scenario of the model's kind,
    so `0 incidents` is not read as the model's good behaviour there."""
    if kind is None or running is None or kind in running:
        return ""
    return f"; the city runs no {kind} scenario, so nothing there was scored with this model"


def _roll_back(step: _Step, cities: Iterable[str], why: str) -> None:
    previous = None
    for city in cities:
        outcome = step.outcome(city)
        previous = outcome.previous_version
        if outcome.reason in PINNED_NEW:
            step.set_outcome(city, "False", ROLLED_BACK)
            step.audit(
                "RolledBack",
                f"pinned back to version {previous or '(none: pin withdrawn)'}: {why}",
                city=city,
            )
        elif outcome.reason == WAITING:
            step.set_outcome(city, "False", CANCELLED)


def _advance(step: _Step, promotion: Mapping[str, Any], obs: Observations) -> list[dict[str, Any]]:
    spec, status = step.spec, step.status
    version = status.resolved_version
    what = f"version {version} of {spec.model_name}"
    soak_limit = next((g for g in spec.gates if g.metric == SOAK_INCIDENTS), None)
    kind = _annotations(promotion).get(SCENARIO_KIND_ANNOTATION) or None
    canary = spec.canary_city
    canary_cond: Cond | None = None
    failures: list[tuple[str, str, str]] = []
    for outcome in list(status.cities):
        if outcome.reason not in (ROLLING, SOAKING):
            continue
        failure = _city_failure(step, outcome, obs.views.get(outcome.city), soak_limit, kind)
        if failure is not None:
            reason, message, incidents = failure
            gates = [g for g in outcome.gates if g.metric != SOAK_INCIDENTS]
            if incidents is not None and soak_limit is not None:
                gates.append(GateResult(metric=SOAK_INCIDENTS, value=str(incidents), passed=False))
            step.set_outcome(outcome.city, "False", ROLLED_BACK, gates=gates)
            step.audit("GateFailed", f"{reason}: {message}", city=outcome.city)
            step.event("Warning", reason, f"{outcome.city}: {message}")
            failures.append((outcome.city, reason, message))
    started = _started_at(status) or step.now
    timed_out = (step.now - started).total_seconds() > spec.rollback.timeout_seconds
    canary_failed = next((f for f in failures if f[0] == canary), None)
    failed_cities = [o.city for o in status.cities if o.reason == ROLLED_BACK and o.city != canary]
    if canary_failed or timed_out or len(failed_cities) > spec.rollback.max_failed_cities:
        if canary_failed:
            why = f"canary {canary} failed: {canary_failed[1]}: {canary_failed[2]}"
            canary_cond = ("False", canary_failed[1], why)
        elif timed_out:
            why = f"not promoted everywhere within {spec.rollback.timeout_seconds} s"
        else:
            why = (
                f"{len(failed_cities)} cities failed ({', '.join(failed_cities)}), more than "
                f"rollback.maxFailedCities {spec.rollback.max_failed_cities}"
            )
        for city, _, _ in failures:
            step.audit(
                "RolledBack",
                f"pinned back to version {step.outcome(city).previous_version or '(none)'}",
                city=city,
            )
        _roll_back(step, [o.city for o in status.cities], why)
        step.event("Warning", "RolledBack", f"{what} rolled back: {why}")
        return _conditions(
            canary=canary_cond,
            complete=("False", "RolledBack", f"{what} was rolled back: {why}"),
            rolled_back=(
                "True",
                "CanaryFailed" if canary_failed else "Timeout" if timed_out else "TooManyFailures",
                why,
            ),
        )
    for city, _, _ in failures:
        step.audit(
            "RolledBack",
            f"pinned back to version {step.outcome(city).previous_version or '(none)'}",
            city=city,
        )
    if canary:
        canary_outcome = step.outcome(canary)
        if canary_outcome.reason == PROMOTED:
            canary_cond = ("True", "SoakPassed", f"canary {canary} ran {what} for {spec.soak_seconds} s")
            waiting = [o.city for o in status.cities if o.reason == WAITING]
            if waiting:
                for city in waiting:
                    step.set_outcome(city, "Unknown", ROLLING)
                step.event("Normal", "CanaryPassed",
                           f"canary {canary} passed; promoting {what} in {', '.join(waiting)}")
        else:
            canary_cond = (
                "Unknown",
                canary_outcome.reason,
                f"canary {canary} is {canary_outcome.reason.lower()}",
            )
    pending = [o.city for o in status.cities if o.reason in (ROLLING, SOAKING, WAITING)]
    if pending:
        return _conditions(
            canary=canary_cond,
            complete=("Unknown", "InProgress", f"waiting for {', '.join(pending)}"),
            rolled_back=("False", "NotRolledBack", ""),
        )
    promoted = [o.city for o in status.cities if o.reason == PROMOTED]
    assert version is not None
    step.actions.append(MoveAlias(spec.model_name, spec.target_alias, version))
    message = f"{what} is {spec.target_alias}, running in {', '.join(promoted)}"
    if failed_cities:
        message += f"; rolled back in {', '.join(failed_cities)}"
    step.audit("Completed", f"alias {spec.target_alias} moved to version {version}; {message}")
    step.event("Normal", "Completed", message)
    return _conditions(
        canary=canary_cond,
        complete=("True", "Promoted", message),
        rolled_back=("False", "NotRolledBack", ""),
    )


# --- observations from what the hub holds (pure too) ----------------------------------------------


def city_view(model_name: str, city: str, report: Mapping[str, Any]) -> CityView:
    """The city's agent report, reduced to what a promotion needs."""
    entry = (report.get("objects") or {}).get(pin_work_name(model_name)) or {}
    incidents = []
    for inc in report.get("incidents") or []:
        at = inc.get("detectedAt")
        if not at:
            continue
        try:
            moment = dt.datetime.fromisoformat(str(at))
        except ValueError:
            continue
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
        incidents.append((inc.get("kind"), moment))
    return CityView(
        name=city,
        work_hash=entry.get("hash"),
        applied=entry.get("applied"),
        ready=str(entry.get("ready", "Unknown")),
        reason=entry.get("reason"),
        message=entry.get("message"),
        incidents=tuple(incidents),
        scenario_kinds=frozenset(report[SCENARIO_KINDS_KEY]) if SCENARIO_KINDS_KEY in report else None,
    )


# --- the Kopf side: gather, decide (above), act ----------------------------------------------------


def expected_at_gate(resolved: ResolvedModel, chain: Mapping[str, tuple[str, str]]) -> tuple[str | None, str]:
    """The digest a version's artifact must have at the gate, and whose record it is (pure).

    An earlier promotion's record wins; a version never promoted has only its registration record.
    """
    if resolved.version in chain:
        digest, promotion = chain[resolved.version]
        return digest, f"the digest {promotion} recorded"
    return resolved.tags.get(DIGEST_TAG), "the digest recorded at registration"


def gate_refusal(resolved: ResolvedModel, chain: Mapping[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(reason, message) when the artifact the hub downloaded is not the one recorded; None when it is."""
    what = f"version {resolved.version} of {resolved.name}"
    expected, whose = expected_at_gate(resolved, chain)
    if expected is None:
        return (
            "ArtifactDigestMissing",
            f"{what} has no {DIGEST_TAG} tag and no promotion recorded its digest, so nothing says its "
            "artifact is the one its metrics were recorded for; register it with citynerve models train",
        )
    if expected != resolved.artifact_digest:
        return (
            "ArtifactDigestMismatch",
            f"the artifact of {what} has digest {resolved.artifact_digest}, not {whose} ({expected}); it "
            "changed since and is refused as untrusted",
        )
    return None


def registry_view(
    source: ResolvedModel, previous: ResolvedModel | None, chain: Mapping[str, tuple[str, str]]
) -> RegistryView:
    """The gate's view from the artifacts the hub downloaded and digested itself (pure).

    A previous version whose artifact fails the same check is not pinned back to (rollback then
    withdraws the pin: the city keeps what it last applied).
    """
    refusal = gate_refusal(source, chain)
    if refusal is not None:
        return RegistryView(error_reason=refusal[0], error_message=refusal[1])
    keep_previous = (
        previous is not None and previous.version != source.version and gate_refusal(previous, chain) is None
    )
    return RegistryView(
        version=source.version,
        digest=source.artifact_digest,
        metrics=dict(source.metrics),
        scenario_kind=source.tags.get(SCENARIO_KIND_TAG),
        previous_version=previous.version if previous is not None and keep_previous else None,
        previous_digest=previous.artifact_digest if previous is not None and keep_previous else None,
    )


def read_registry(
    tracking_uri: str | None, spec: ModelPromotionSpec, chain: Mapping[str, tuple[str, str]]
) -> RegistryView:
    """Download and digest the source version's artifact (and the target alias's), then ``registry_view``.

    Raises ``ModelResolutionError`` only for a temporary failure (unreachable, credentials refused).
    """
    from citynerve.models.registry import (  # noqa: PLC0415 - MLflow loads only when a promotion starts
        ModelResolutionError,
        alias_version,
        resolve_model_version,
    )

    if not tracking_uri:
        return RegistryView(
            error_reason="RegistryNotConfigured",
            error_message="the hub operator has no MLflow tracking URI (MLFLOW_TRACKING_URI)",
        )
    try:
        source = resolve_model_version(
            tracking_uri, spec.model_name, version=spec.source.version, alias=spec.source.alias
        )
    except ModelResolutionError as exc:
        if not exc.permanent:
            raise
        return RegistryView(error_reason=exc.reason, error_message=exc.message)
    previous = None
    previous_version = alias_version(tracking_uri, spec.model_name, spec.target_alias)
    if previous_version is not None and previous_version != source.version:
        try:
            previous = resolve_model_version(tracking_uri, spec.model_name, version=previous_version)
        except ModelResolutionError as exc:
            if not exc.permanent:
                raise
            log.warning("the previous version %s of %s is not pinned back to: %s",
                        previous_version, spec.model_name, exc.message)
    return registry_view(source, previous, chain)


def _post_event(ctx: HubContext, body: Mapping[str, Any], event: PostEvent, now: dt.datetime) -> None:
    from kubernetes import client  # noqa: PLC0415

    meta = body["metadata"]
    stamp = rfc3339(now)
    manifest = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": body.get("apiVersion", "citynerve.io/v1alpha1"),
            "kind": "ModelPromotion",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "reason": event.reason,
        "message": event.message,
        "type": event.type,
        "source": {"component": HUB_ACTOR},
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }
    try:
        ctx.core.create_namespaced_event(meta["namespace"], manifest)
    except client.ApiException as exc:  # an Event is worth a log line, never a stuck promotion
        log.warning(
            "could not post event %s on %s/%s: %s", event.reason, meta["namespace"], meta["name"], exc.reason
        )


def read_identities(folder: Path) -> dict[str, str]:
    """User → password from a folder of files named by user (a mounted Secret; dotfiles skipped)."""
    return {
        path.name: path.read_text().strip()
        for path in sorted(folder.iterdir())
        if path.is_file() and not path.name.startswith(".")
    }


def keep_registry_identities(tracking_uri: str, folder: Path, stop: threading.Event) -> None:
    """Create the registry's identities from ``folder`` (or set their passwords) once MLflow answers.

    Runs on a thread of its own: MLflow being down delays this, never the rest of the hub. Tries
    again after 1, 2, 4 … 60 s; names users in the log, never passwords.
    """
    from citynerve.models.registry import ModelResolutionError, ensure_users  # noqa: PLC0415

    delay = 1.0
    while not stop.is_set():
        try:
            users = ensure_users(tracking_uri, read_identities(folder))
        except (ModelResolutionError, OSError) as exc:
            log.warning("MLflow identities not set yet (again in %.0f s): %s", delay, exc)
            stop.wait(delay)
            delay = min(delay * 2, 60.0)
            continue
        log.info("MLflow identities set: %s", ", ".join(users) or "none")
        return


def register_promotion_handlers(registry: kopf.OperatorRegistry, ctx: HubContext) -> None:
    """The ModelPromotion timer: observations in, ``promotion_step`` decides, actions and status out;
    and, with ``ctx.mlflow_users``, the registry identities kept from the start.

    Needs the hub's ``city_index`` and ``report_index`` (``hub.handlers.build_registry``).
    """
    import kopf  # noqa: PLC0415
    from citynerve.models.registry import ModelResolutionError, set_model_alias  # noqa: PLC0415
    from citynerve.operators.federation.placement import city_namespace  # noqa: PLC0415
    from citynerve.operators.hub.status import read_report, status_changes  # noqa: PLC0415

    stop_identities = threading.Event()

    @kopf.on.startup(registry=registry)
    def registry_identities(**_: Any) -> None:
        if ctx.mlflow_users is not None and ctx.mlflow_url:
            threading.Thread(
                target=keep_registry_identities,
                args=(ctx.mlflow_url, ctx.mlflow_users, stop_identities),
                name="mlflow-identities",
                daemon=True,
            ).start()

    @kopf.on.cleanup(registry=registry)
    def registry_identities_stop(**_: Any) -> None:
        stop_identities.set()

    @kopf.timer("citynerve.io", "v1alpha1", "modelpromotions", interval=ctx.check_interval, registry=registry)
    def modelpromotion_check(*, body: kopf.Body, patch: kopf.Patch, **kwargs: Any) -> None:
        status = dict(body.get("status") or {})
        if _terminal(status):
            return
        promotion = {"metadata": dict(body["metadata"]), "spec": dict(body["spec"]), "status": status}
        spec = ModelPromotionSpec.model_validate(promotion["spec"])
        cities = [v for _, store in kwargs["city_index"].items() for v in store]
        views = {}
        for city in cities:
            name = city["metadata"]["name"]
            report = read_report(next(iter(kwargs["report_index"].get(city_namespace(name), [])), None))
            views[name] = city_view(spec.model_name, name, report)
        try:
            # A promotion its cities already refuse is refused without asking MLflow.
            reads_registry = needs_registry(status) and selection_refusal(spec, cities) is None
            promotions = [p for _, store in kwargs["promotion_index"].items() for p in store]
            chain = chain_digests(spec.model_name, promotions)
            gate_view = read_registry(ctx.mlflow_url, spec, chain) if reads_registry else None
        except ModelResolutionError as exc:
            raise kopf.TemporaryError(exc.message, delay=ctx.check_interval * 2) from exc
        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        actions, desired = promotion_step(promotion, Observations(now, cities, views, gate_view))
        for action in actions:
            if isinstance(action, MoveAlias):
                try:
                    set_model_alias(ctx.mlflow_url or "", action.model, action.alias, action.version)
                except ModelResolutionError as exc:
                    raise kopf.TemporaryError(exc.message, delay=ctx.check_interval * 2) from exc
        for action in actions:
            if isinstance(action, Annotate):
                for key, value in action.annotations.items():
                    patch.metadata.annotations[key] = value
            elif isinstance(action, PostEvent):
                _post_event(ctx, body, action, now)
        for key, value in status_changes(status, desired).items():
            patch.status[key] = value
