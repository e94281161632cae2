"""Resources that live in the hub cluster: City, SensorType, FederatedScenario, ModelPromotion."""

from __future__ import annotations

from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from citynerve.operators.api.city import (
    ENGINE_MESSAGE,
    ENGINE_SCENARIO_KINDS_CEL,
    ScenarioKind,
    ScenarioSpec,
    Severity,
    SimulationSource,
    Threshold,
    engine_fits_kind,
)
from citynerve.operators.api.common import (
    CAMEL_IDENTIFIER,
    DECIMAL,
    DNS_LABEL,
    LIST_ATOMIC,
    LIST_SET,
    MODEL_NAME,
    MODEL_NAME_MAX_LENGTH,
    UNIT_CODE,
    CityName,
    ConditionStatus,
    CrdModel,
    Labels,
    LabelSelector,
    Rule,
    StatusBase,
    labels_field,
    list_map,
)
from pydantic import Field

# --- City --------------------------------------------------------------------------------------


class CityConnection(CrdModel):
    """How the city's agent reaches the hub (pull mode: the city calls the hub, never the reverse).

    The agent reads and writes only its own hub namespace, always `city-<name>`.
    """

    heartbeat_interval_seconds: int = Field(
        default=10, ge=1, le=3600, description="Seconds between two heartbeats the agent writes to the hub."
    )
    heartbeat_timeout_seconds: int = Field(
        default=40,
        ge=2,
        le=86_400,
        description="Seconds without a heartbeat after which the city is reported not Reachable. Must "
        "exceed the heartbeat interval.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.heartbeatTimeoutSeconds > self.heartbeatIntervalSeconds",
            message="heartbeatTimeoutSeconds must be greater than heartbeatIntervalSeconds, or every city "
            "would flap between reachable and unreachable",
            field_path=".heartbeatTimeoutSeconds",
            check=lambda c: c.heartbeat_timeout_seconds > c.heartbeat_interval_seconds,
        ),
    )


ExportCategory = Literal["aggregates", "incidents", "model-metrics", "raw-readings"]
DEFAULT_EXPORTS: tuple[ExportCategory, ...] = ("aggregates", "incidents", "model-metrics")


class DataResidency(CrdModel):
    """What data may leave the city for the hub; everything else stays in the city's cluster."""

    jurisdiction: str = Field(
        description="ISO 3166-2 code of the jurisdiction whose data law applies (for example `CN-SH`).",
        pattern=r"^[A-Z]{2}(-[A-Z0-9]{1,3})?$",
    )
    exports: list[ExportCategory] = Field(
        default_factory=lambda: list(DEFAULT_EXPORTS),
        max_length=4,
        description="Categories of data the city sends to the hub: `aggregates` (roll-ups), `incidents`, "
        "`model-metrics`, `raw-readings`.",
        json_schema_extra=LIST_SET,
    )
    retention_days: int = Field(
        default=365, ge=1, le=3650, description="Days the hub keeps data received from this city."
    )


TIME_ZONES_FILE = Path(__file__).with_name("timezones.yaml")
TIMEZONE_MESSAGE = (
    "timezone must be an IANA tz database name, for example Asia/Shanghai, Europe/Paris or UTC"
)


@cache
def iana_time_zones() -> frozenset[str]:
    """The tz database names a City may use (operators/api/timezones.yaml)."""
    zones = yaml.safe_load(TIME_ZONES_FILE.read_text(encoding="utf-8"))["zones"]
    return frozenset(str(zone) for zone in zones)


class CitySpec(CrdModel):
    """A member city of the federation."""

    display_name: str = Field(
        description="Human-readable name of the city (for example `Shanghai`).", min_length=1, max_length=128
    )
    region: str = Field(
        description="Region the city belongs to (for example `east`); by convention also set as the "
        "`region` label, which placements select on.",
        pattern=DNS_LABEL,
        max_length=63,
    )
    timezone: str = Field(
        default="Asia/Shanghai",
        description="IANA time zone of the city (a tz database name such as `Asia/Shanghai` or `UTC`), used "
        "for reports and schedules. The API server accepts only names the tz database defines (the list in "
        "operators/api/timezones.yaml); abbreviations such as `CST` or offsets such as `+08:00` are refused.",
        max_length=64,
    )
    connection: CityConnection = Field(
        default_factory=CityConnection, description="How the city's agent connects to the hub."
    )
    data_residency: DataResidency = Field(description="Which data may leave the city.")
    agent_key_fingerprint: str | None = Field(
        default=None,
        description="SHA-256 of the public key (DER SubjectPublicKeyInfo) the city's agent holds, as "
        "`sha256:<64 hex digits>`; recorded by the join request. The hub signs certificates for this key "
        "and this city only; changing it (re-keying) is a hub administrator's act, like the approval.",
        pattern=r"^sha256:[0-9a-f]{64}$",
    )
    approved: bool = Field(
        default=False,
        description="Set to true by a hub administrator to accept the city's request to join (its name, "
        "labels and agent key); until then nothing is propagated to it. The API server refuses this "
        "field, the agent key and the City's labels from anyone but a hub administrator.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=f"!has(self.timezone) || self.timezone in {sorted(iana_time_zones())!r}",
            message=TIMEZONE_MESSAGE,
            field_path=".timezone",
            check=lambda s: s.timezone in iana_time_zones(),
        ),
    )


class SensorCount(CrdModel):
    """Terminals online of one sensor type."""

    sensor_type: str = Field(description="Name of the SensorType.", max_length=253)
    count: int = Field(ge=0, description="Terminals of this type online.")


class IncidentSummary(CrdModel):
    """The most recent incident a city reported."""

    name: str = Field(description="Name of the Incident in the city cluster.", max_length=253)
    namespace: str = Field(description="Namespace of the Incident in the city cluster.", max_length=63)
    kind: ScenarioKind = Field(description="Scenario kind that raised it.")
    severity: Severity = Field(description="Severity of the incident.")
    detected_at: datetime = Field(description="When it was detected.")


class CityStatus(StatusBase):
    """Roll-up of the city's health; conditions `Joined`, `Reachable` and `Ready`."""

    last_heartbeat: datetime | None = Field(
        default=None, description="When the city's agent last checked in."
    )
    agent_version: str | None = Field(default=None, description="Version of the city's agent.", max_length=64)
    sensors_online: list[SensorCount] = Field(
        default_factory=list,
        max_length=1024,
        description="Terminals online, per sensor type.",
        json_schema_extra=list_map("sensorType"),
    )
    sensors_online_total: int | None = Field(default=None, ge=0, description="Terminals online, all types.")
    active_scenarios: int | None = Field(default=None, ge=0, description="Scenarios with Ready=True.")
    open_incidents: int | None = Field(default=None, ge=0, description="Incidents not yet Resolved.")
    last_incident: IncidentSummary | None = Field(default=None, description="The most recent incident.")


# --- SensorType --------------------------------------------------------------------------------

SensorDomain = Literal[
    "water-supply",
    "drainage-flood",
    "environment",
    "traffic",
    "parking",
    "crowd",
    "video-analytics",
    "structural-health",
]


class MeasuredProperty(CrdModel):
    """One quantity a terminal measures, with its unit and valid range (decimal strings, no floats)."""

    name: str = Field(
        description="camelCase attribute name in the NGSI-LD payload (for example `pressure`).",
        pattern=CAMEL_IDENTIFIER,
        max_length=63,
    )
    unit_code: str = Field(
        description="UN/CEFACT Recommendation 20 unit code, as FIWARE uses (for example `KPA`, `MTR`, "
        "`CEL`, `C62` for a count).",
        pattern=UNIT_CODE,
    )
    minimum: str = Field(
        description="Lowest physically valid value, as a decimal string; readings below are quarantined.",
        pattern=DECIMAL,
        max_length=32,
    )
    maximum: str = Field(
        description="Highest physically valid value, as a decimal string; readings above are quarantined.",
        pattern=DECIMAL,
        max_length=32,
    )
    description: str = Field(default="", description="What the property measures.", max_length=1024)

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="double(self.minimum) < double(self.maximum)",
            message="minimum must be below maximum",
            field_path=".minimum",
            check=lambda p: float(p.minimum) < float(p.maximum),
        ),
    )


class FiwareDataModel(CrdModel):
    """The FIWARE Smart Data Model a payload follows."""

    subject: str = Field(
        description="Smart Data Models subject repository (for example `dataModel.WaterQuality`).",
        pattern=r"^dataModel\.[A-Za-z0-9-]+$",
        max_length=128,
    )
    entity_type: str = Field(
        description="NGSI-LD entity type (for example `WaterQualityObserved`).",
        pattern=r"^[A-Z][A-Za-z0-9]*$",
        max_length=128,
    )


class SensorTypeSpec(CrdModel):
    """One type of terminal: what it measures and what its payload looks like."""

    display_name: str = Field(description="Human-readable name of the type.", min_length=1, max_length=128)
    domain: SensorDomain = Field(description="Governance domain the type serves.")
    description: str = Field(
        default="", description="What the terminal is and where it is installed.", max_length=4096
    )
    data_model: FiwareDataModel = Field(description="The FIWARE Smart Data Model readings follow.")
    properties: list[MeasuredProperty] = Field(
        min_length=1,
        max_length=64,
        description="Quantities the terminal measures.",
        json_schema_extra=list_map("name"),
    )
    default_sampling_interval_seconds: int = Field(
        default=300,
        ge=1,
        le=86_400,
        description="Sampling interval fleets of this type use unless they set one.",
    )
    payload_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON Schema every payload must satisfy, beyond the property ranges.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )


class SensorTypeStatus(StatusBase):
    """Propagation of the type to member cities; condition `Propagated`."""

    propagated_cities: int | None = Field(default=None, ge=0, description="Cities holding the current spec.")


# --- FederatedScenario -------------------------------------------------------------------------


class ScenarioTemplate(CrdModel):
    """The Scenario every placed city runs."""

    labels: Labels = labels_field("Labels put on every city's Scenario.")
    spec: ScenarioSpec = Field(description="Spec of the Scenario created in each city.")


class Placement(CrdModel):
    """Which cities run the scenario: those matching the selector plus those listed."""

    city_selector: LabelSelector | None = Field(
        default=None, description="Label selector over City objects (for example `region: east`)."
    )
    cities: list[CityName] = Field(
        default_factory=list,
        max_length=256,
        description="Cities selected by name, in addition to the selector: City names, DNS labels of at most "
        "58 characters (so that `city-<name>` is a namespace).",
        json_schema_extra=LIST_SET,
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.citySelector) || (has(self.cities) && size(self.cities) > 0)",
            message="placement selects no city: set citySelector, cities, or both",
            reason="FieldValueRequired",
            check=lambda p: p.city_selector is not None or bool(p.cities),
        ),
    )


class ScenarioOverride(CrdModel):
    """Changes to the template for one city; fields left unset keep the template's value."""

    city: CityName = Field(
        description="Name of the City this override applies to; the placement must select it."
    )
    mode: Literal["live", "drill"] | None = Field(
        default=None,
        description="Mode in this city. An override that makes the scenario a drill needs a simulation, its "
        "own or the template's.",
    )
    replicas: int | None = Field(default=None, ge=0, le=64, description="Workers in this city.")
    thresholds: list[Threshold] | None = Field(
        default=None,
        max_length=32,
        description="Thresholds replacing the template's entries of the same metric.",
        json_schema_extra=list_map("metric"),
    )
    simulation: SimulationSource | None = Field(
        default=None,
        description="Simulation source in this city; its engine must suit the template's scenario kind.",
    )


class FederatedScenarioSpec(CrdModel):
    """A Scenario template placed into member cities, with per-city overrides."""

    template: ScenarioTemplate = Field(description="The Scenario to create in each placed city.")
    placement: Placement = Field(description="Which cities run it.")
    overrides: list[ScenarioOverride] = Field(
        default_factory=list,
        max_length=256,
        description="Per-city changes to the template, one entry per city the placement selects. With "
        "only `placement.cities` the API server refuses an override for another city; with a "
        "`citySelector` the hub reports one on the `OverridesMatched` condition.",
        json_schema_extra=list_map("city"),
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.placement.citySelector) || !has(self.overrides) || "
            "self.overrides.all(o, has(self.placement.cities) && o.city in self.placement.cities)",
            message="an override names a city the placement does not select; add the city to "
            "placement.cities or remove its override",
            field_path=".overrides",
            check=lambda s: s.placement.city_selector is not None
            or all(o.city in s.placement.cities for o in s.overrides),
        ),
        Rule(
            cel="!has(self.overrides) || has(self.template.spec.simulation) || "
            "self.overrides.all(o, !has(o.mode) || o.mode != 'drill' || has(o.simulation))",
            message="an override makes its city's scenario a drill without a simulation source; set "
            "simulation in that override or in template.spec.simulation",
            field_path=".overrides",
            reason="FieldValueRequired",
            check=lambda s: s.template.spec.simulation is not None
            or all(o.mode != "drill" or o.simulation is not None for o in s.overrides),
        ),
        Rule(
            cel=f"!has(self.overrides) || self.overrides.all(o, !has(o.simulation) || "
            f"self.template.spec.kind in {ENGINE_SCENARIO_KINDS_CEL}[o.simulation.engine])",
            message=f"an override's {ENGINE_MESSAGE}",
            field_path=".overrides",
            check=lambda s: all(
                o.simulation is None or engine_fits_kind(o.simulation.engine, s.template.spec.kind)
                for o in s.overrides
            ),
        ),
    )


class CityPlacementStatus(CrdModel):
    """How the scenario fares in one city."""

    city: str = Field(description="Name of the City.", max_length=63)
    propagated: ConditionStatus = Field(description="Whether the city's agent applied the current template.")
    ready: ConditionStatus = Field(description="The city's Scenario Ready condition status.")
    reason: str | None = Field(default=None, description="CamelCase reason when not ready.", max_length=1024)
    message: str | None = Field(default=None, description="What is wrong in this city.", max_length=32768)


class FederatedScenarioStatus(StatusBase):
    """Placement outcome; conditions `Propagated` and `Ready`."""

    selected_cities: int | None = Field(default=None, ge=0, description="Cities the placement selects.")
    ready_cities: int | None = Field(default=None, ge=0, description="Cities where the Scenario is Ready.")
    cities: list[CityPlacementStatus] = Field(
        default_factory=list,
        max_length=256,
        description="Outcome per selected city.",
        json_schema_extra=list_map("city"),
    )


# --- ModelPromotion ----------------------------------------------------------------------------


class PromotionSource(CrdModel):
    """The model version to promote: a version number or the version an alias currently names."""

    version: str | None = Field(
        default=None,
        description="Registry version number, as a string of digits. Set exactly one of version and alias.",
        pattern=r"^[1-9][0-9]*$",
        max_length=10,
    )
    alias: str | None = Field(
        default=None,
        description="Alias whose current version is promoted (for example `challenger`). Set exactly one of "
        "version and alias.",
        pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
        max_length=63,
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.version) != has(self.alias)",
            message="name exactly one of source.version or source.alias",
            check=lambda s: (s.version is None) != (s.alias is None),
        ),
    )


class PromotionGate(CrdModel):
    """A metric the promoted version must meet in a city before the next city is promoted."""

    metric: str = Field(
        description="camelCase metric recorded in MLflow for the city's evaluation run (for example "
        "`detectionDelaySeconds`, `falseAlarmsPerDay`, `f1Permille`).",
        pattern=CAMEL_IDENTIFIER,
        max_length=63,
    )
    operator: Literal["GreaterThan", "GreaterThanOrEqual", "LessThan", "LessThanOrEqual"] = Field(
        description="How the recorded metric is compared with threshold."
    )
    threshold: str = Field(
        description="Value to compare with, as a decimal string.", pattern=DECIMAL, max_length=32
    )


class RollbackPolicy(CrdModel):
    """When a promotion is undone, restoring each city's previous version."""

    max_failed_cities: int = Field(
        default=0,
        ge=0,
        le=256,
        description="Cities that may fail their gates before the whole promotion is rolled back; 0 rolls "
        "back on the first failure.",
    )
    timeout_seconds: int = Field(
        default=3600,
        ge=60,
        le=604_800,
        description="Seconds the whole promotion may take before it is rolled back.",
    )


_DEFAULT_ROLLBACK_TIMEOUT = RollbackPolicy.model_fields["timeout_seconds"].default


class ModelPromotionSpec(CrdModel):
    """Move a registered model version to an alias in a set of cities, canary first, gated on metrics."""

    model_name: str = Field(
        description="Registered model name in MLflow (for example `water-burst-detector`): dot-separated "
        "words of letters, digits, `-` and `_`, at most 63 characters.",
        pattern=MODEL_NAME,
        min_length=1,
        max_length=MODEL_NAME_MAX_LENGTH,
    )
    source: PromotionSource = Field(description="The version to promote.")
    target_alias: str = Field(
        default="champion",
        description="Alias the version is moved to in each city (for example `champion`).",
        pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
        max_length=63,
    )
    city_selector: LabelSelector = Field(
        default_factory=LabelSelector, description="Cities to promote in; empty selects every city."
    )
    canary_city: CityName | None = Field(
        default=None,
        description="City promoted first and soaked alone before the others; unset promotes all at once. "
        "The city selector must select it; the hub refuses the promotion at once when it does not.",
    )
    gates: list[PromotionGate] = Field(
        default_factory=list,
        max_length=16,
        description="Metrics each city must meet after the soak period to count as passed. A metric has at "
        "most one lower bound (GreaterThan or GreaterThanOrEqual) and one upper bound (LessThan or "
        "LessThanOrEqual), and together they must leave some value that passes.",
        json_schema_extra=list_map("metric", "operator"),
    )
    soak_seconds: int = Field(
        default=600,
        ge=0,
        le=604_800,
        description="Seconds a promoted city runs before its gates are checked. rollback.timeoutSeconds must "
        "leave time for every soak: more than soakSeconds, or twice soakSeconds with a canary city.",
    )
    rollback: RollbackPolicy = Field(default_factory=RollbackPolicy, description="When to roll back.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.source.alias) || self.source.alias != self.targetAlias",
            message="source.alias and targetAlias are the same alias; promote to a different alias",
            field_path=".targetAlias",
            check=lambda s: s.source.alias != s.target_alias,
        ),
        Rule(
            cel=f"(has(self.rollback) ? self.rollback.timeoutSeconds : {_DEFAULT_ROLLBACK_TIMEOUT}) > "
            "self.soakSeconds * (has(self.canaryCity) ? 2 : 1)",
            message="rollback.timeoutSeconds leaves no time to soak, so the promotion could never pass: make "
            "it greater than soakSeconds, or than twice soakSeconds with a canary city",
            field_path=".rollback.timeoutSeconds",
            check=lambda s: s.rollback.timeout_seconds > s.soak_seconds * (2 if s.canary_city else 1),
        ),
        Rule(
            cel="!has(self.gates) || self.gates.all(a, self.gates.exists_one(b, b.metric == a.metric && "
            "b.operator.startsWith('Greater') == a.operator.startsWith('Greater')))",
            message="a metric is gated twice in the same direction; keep one lower bound (GreaterThan or "
            "GreaterThanOrEqual) and one upper bound (LessThan or LessThanOrEqual) per metric",
            field_path=".gates",
            check=lambda s: all(
                sum(1 for b in s.gates if b.metric == a.metric and _is_lower(b) == _is_lower(a)) == 1
                for a in s.gates
            ),
        ),
        Rule(
            cel="!has(self.gates) || self.gates.all(lo, !lo.operator.startsWith('Greater') || "
            "self.gates.all(hi, hi.metric != lo.metric || !hi.operator.startsWith('Less') || "
            "double(lo.threshold) < double(hi.threshold) || (double(lo.threshold) == double(hi.threshold) "
            "&& lo.operator == 'GreaterThanOrEqual' && hi.operator == 'LessThanOrEqual')))",
            message="the gates of a metric contradict each other: no value meets both its lower and its "
            "upper bound; lower the GreaterThan threshold or raise the LessThan one",
            field_path=".gates",
            check=lambda s: all(_satisfiable(lo, hi) for lo in s.gates for hi in s.gates),
        ),
    )


def _is_lower(gate: PromotionGate) -> bool:
    return gate.operator.startswith("Greater")


def _satisfiable(lo: PromotionGate, hi: PromotionGate) -> bool:
    """Whether some value meets both gates, when `lo` is a lower and `hi` an upper bound of one metric."""
    if lo.metric != hi.metric or not _is_lower(lo) or _is_lower(hi):
        return True
    low, high = float(lo.threshold), float(hi.threshold)  # as CEL's double() reads them
    both_inclusive = lo.operator == "GreaterThanOrEqual" and hi.operator == "LessThanOrEqual"
    return low < high or (low == high and both_inclusive)


class GateResult(CrdModel):
    """A gate as evaluated in one city."""

    metric: str = Field(description="Metric of the gate.", max_length=63)
    value: str = Field(description="Recorded value, as a decimal string.", max_length=32)
    passed: bool = Field(description="Whether the recorded value met the gate.")


class CityPromotionOutcome(CrdModel):
    """The promotion's outcome in one city."""

    city: str = Field(description="Name of the City.", max_length=63)
    promoted: ConditionStatus = Field(
        description="True when the alias names the new version and gates passed; False when gates failed or "
        "it was rolled back; Unknown while soaking."
    )
    reason: str = Field(
        description="CamelCase reason (for example `Soaking`, `GateFailed`, `RolledBack`).", max_length=1024
    )
    previous_version: str | None = Field(
        default=None, description="Version the alias named before.", max_length=10
    )
    promoted_version: str | None = Field(
        default=None, description="Version the alias was moved to.", max_length=10
    )
    gates: list[GateResult] = Field(
        default_factory=list, max_length=16, description="Gate results.", json_schema_extra=LIST_ATOMIC
    )
    updated_at: datetime | None = Field(default=None, description="When this outcome last changed.")


class AuditEntry(CrdModel):
    """One recorded action of the promotion, for algorithm governance."""

    time: datetime = Field(description="When the action happened.")
    actor: str = Field(description="Who or what acted (a user, or `citynerve-hub`).", max_length=253)
    action: Literal["Started", "Promoted", "GatePassed", "GateFailed", "RolledBack", "Completed"] = Field(
        description="What happened."
    )
    city: str | None = Field(default=None, description="City it happened in, if one.", max_length=63)
    message: str = Field(default="", description="Details for the record.", max_length=4096)


class ModelPromotionStatus(StatusBase):
    """Progress of the promotion; conditions `CanaryPassed`, `Complete` and `RolledBack`."""

    resolved_version: str | None = Field(
        default=None, description="Version the source resolved to.", max_length=10
    )
    artifact_digest: str | None = Field(
        default=None,
        description="sha256 digest of the resolved version's artifact, computed by the hub from the artifact "
        "it downloaded at the gate. Every city is pinned to the version with this digest as "
        "`spec.expectedDigest` and refuses an artifact that differs, whatever the registry says.",
        pattern=r"^sha256:[a-f0-9]{64}$",
    )
    previous_version: str | None = Field(
        default=None,
        description="Version the target alias named when the promotion started; a rolled-back city is "
        "pinned back to it.",
        max_length=10,
    )
    previous_digest: str | None = Field(
        default=None,
        description="sha256 digest the previous version is pinned back with: the one an earlier promotion "
        "recorded for it, or else the hub's own at the gate.",
        pattern=r"^sha256:[a-f0-9]{64}$",
    )
    cities: list[CityPromotionOutcome] = Field(
        default_factory=list,
        max_length=256,
        description="Outcome per city.",
        json_schema_extra=list_map("city"),
    )
    audit: list[AuditEntry] = Field(
        default_factory=list,
        max_length=1024,
        description="Actions taken, oldest first.",
        json_schema_extra=LIST_ATOMIC,
    )
