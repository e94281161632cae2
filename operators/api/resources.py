"""The eight CityNerve kinds, their registry, and manifest conversion.

`KINDS` is what `crdgen` generates CRDs from and what the operators look kinds up in;
`to_manifest` / `from_manifest` convert between typed objects and the dicts the Kubernetes
client and Kopf hand around.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from citynerve.operators.api.city import (
    AnalyticsModelSpec,
    AnalyticsModelStatus,
    IncidentSpec,
    IncidentStatus,
    ScenarioSpec,
    ScenarioStatus,
    SensorFleetSpec,
    SensorFleetStatus,
)
from citynerve.operators.api.common import (
    CITY_NAME_MAX_LENGTH,
    DNS_LABEL,
    GROUP,
    VERSION,
    ObjectMeta,
    Rule,
    check_rules,
)
from citynerve.operators.api.hub import (
    CitySpec,
    CityStatus,
    FederatedScenarioSpec,
    FederatedScenarioStatus,
    ModelPromotionSpec,
    ModelPromotionStatus,
    SensorTypeSpec,
    SensorTypeStatus,
)
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel


class Resource(BaseModel):
    """Fields every CityNerve object has; subclasses type `spec` and `status`."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    api_version: Literal["citynerve.io/v1alpha1"] = "citynerve.io/v1alpha1"
    kind: str
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)

    # Rules on the whole object: the CEL at the root of the CRD schema, which alone may read
    # `self.metadata.name`.
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Resource:
        check_rules(self, type(self).rules)
        return self


def _is_city_name(name: str | None) -> bool:
    return name is None or (re.fullmatch(DNS_LABEL, name) is not None and len(name) <= CITY_NAME_MAX_LENGTH)


class City(Resource):
    """A member city of the federation (hub, cluster-scoped)."""

    kind: Literal["City"] = "City"
    spec: CitySpec
    status: CityStatus | None = None

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel=f"self.metadata.name.matches(r'{DNS_LABEL}') && "
            f"size(self.metadata.name) <= {CITY_NAME_MAX_LENGTH}",
            message=f"a City's name must be a DNS label (lowercase letters, digits and '-') of at most "
            f"{CITY_NAME_MAX_LENGTH} characters, so that its hub namespace city-<name> is a valid namespace "
            "(metadata.name)",
            check=lambda city: _is_city_name(city.metadata.name),
        ),
    )


class SensorType(Resource):
    """A type of terminal: measured properties, units, ranges, data model (hub, cluster-scoped)."""

    kind: Literal["SensorType"] = "SensorType"
    spec: SensorTypeSpec
    status: SensorTypeStatus | None = None


class FederatedScenario(Resource):
    """A Scenario template placed into member cities with per-city overrides (hub)."""

    kind: Literal["FederatedScenario"] = "FederatedScenario"
    spec: FederatedScenarioSpec
    status: FederatedScenarioStatus | None = None


class ModelPromotion(Resource):
    """A gated, canary-first promotion of a model version to an alias across cities (hub)."""

    kind: Literal["ModelPromotion"] = "ModelPromotion"
    spec: ModelPromotionSpec
    status: ModelPromotionStatus | None = None


class SensorFleet(Resource):
    """A population of terminals of one SensorType in a district (city)."""

    kind: Literal["SensorFleet"] = "SensorFleet"
    spec: SensorFleetSpec
    status: SensorFleetStatus | None = None


class AnalyticsModel(Resource):
    """A registered MLflow model pinned by alias or version (city)."""

    kind: Literal["AnalyticsModel"] = "AnalyticsModel"
    spec: AnalyticsModelSpec
    status: AnalyticsModelStatus | None = None


class Scenario(Resource):
    """A governance scenario binding fleets, models, thresholds and alert routes (city)."""

    kind: Literal["Scenario"] = "Scenario"
    spec: ScenarioSpec
    status: ScenarioStatus | None = None


class Incident(Resource):
    """An incident followed from detection to resolution (city)."""

    kind: Literal["Incident"] = "Incident"
    spec: IncidentSpec
    status: IncidentStatus | None = None


@dataclass(frozen=True)
class PrinterColumn:
    """A column of `kubectl get`."""

    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"] = "string"
    description: str = ""
    priority: int = 0


def _condition_column(condition_type: str, description: str, priority: int = 0) -> PrinterColumn:
    return PrinterColumn(
        condition_type.upper(),
        f'.status.conditions[?(@.type=="{condition_type}")].status',
        description=description,
        priority=priority,
    )


_AGE = PrinterColumn("Age", ".metadata.creationTimestamp", "date", "Time since the object was created.")


@dataclass(frozen=True)
class KindInfo:
    """Everything a CRD and an operator need to know about one kind."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    scope: Literal["Cluster", "Namespaced"]
    cluster: Literal["hub", "city"]
    model: type[Resource]
    printer_columns: tuple[PrinterColumn, ...] = ()
    categories: tuple[str, ...] = ("citynerve",)
    group: str = GROUP
    version: str = VERSION
    spec_model: type[BaseModel] = field(init=False)
    status_model: type[BaseModel] = field(init=False)

    def __post_init__(self) -> None:
        fields = self.model.model_fields
        spec_type = fields["spec"].annotation
        status_type = fields["status"].annotation
        assert isinstance(spec_type, type)
        # `status` is `XStatus | None`; the status model is the non-None member.
        status_model = next(a for a in getattr(status_type, "__args__", ()) if a is not type(None))
        object.__setattr__(self, "spec_model", spec_type)
        object.__setattr__(self, "status_model", status_model)

    @property
    def crd_name(self) -> str:
        return f"{self.plural}.{self.group}"


KINDS: tuple[KindInfo, ...] = (
    KindInfo(
        "City",
        "cities",
        "city",
        ("cty",),
        "Cluster",
        "hub",
        City,
        (
            PrinterColumn("Region", ".spec.region", description="Region of the city."),
            PrinterColumn(
                "Approved", ".spec.approved", "boolean", "Accepted by a hub administrator.", priority=1
            ),
            _condition_column("Joined", "The city's agent completed the join.", priority=1),
            _condition_column("Reachable", "Heartbeats arrive in time."),
            _condition_column("Ready", "Joined, reachable and its scenarios ready."),
            PrinterColumn("Sensors Online", ".status.sensorsOnlineTotal", "integer", "Terminals online."),
            PrinterColumn("Scenarios", ".status.activeScenarios", "integer", "Scenarios with Ready=True."),
            PrinterColumn(
                "Open Incidents", ".status.openIncidents", "integer", "Incidents not yet Resolved."
            ),
            PrinterColumn(
                "Last Heartbeat", ".status.lastHeartbeat", "date", "Last agent check-in.", priority=1
            ),
            _AGE,
        ),
    ),
    KindInfo(
        "SensorType",
        "sensortypes",
        "sensortype",
        ("stype",),
        "Cluster",
        "hub",
        SensorType,
        (
            PrinterColumn("Domain", ".spec.domain", description="Governance domain."),
            PrinterColumn("Data Model", ".spec.dataModel.entityType", description="FIWARE entity type."),
            PrinterColumn(
                "Interval",
                ".spec.defaultSamplingIntervalSeconds",
                "integer",
                "Default sampling interval in seconds.",
                priority=1,
            ),
            _condition_column("Propagated", "On the hub: every city holds the current spec. In a city: "
                              "this copy is the hub's current spec."),
            _AGE,
        ),
    ),
    KindInfo(
        "FederatedScenario",
        "federatedscenarios",
        "federatedscenario",
        ("fscn",),
        "Namespaced",
        "hub",
        FederatedScenario,
        (
            PrinterColumn("Kind", ".spec.template.spec.kind", description="Scenario kind."),
            PrinterColumn("Mode", ".spec.template.spec.mode", description="live or drill."),
            PrinterColumn("Cities", ".status.selectedCities", "integer", "Cities selected."),
            PrinterColumn("Ready Cities", ".status.readyCities", "integer", "Cities where it is Ready."),
            _condition_column("Ready", "Ready in every selected city."),
            _AGE,
        ),
    ),
    KindInfo(
        "ModelPromotion",
        "modelpromotions",
        "modelpromotion",
        ("mpromo",),
        "Namespaced",
        "hub",
        ModelPromotion,
        (
            PrinterColumn("Model", ".spec.modelName", description="Registered model."),
            PrinterColumn("Version", ".status.resolvedVersion", description="Version being promoted."),
            PrinterColumn("Alias", ".spec.targetAlias", description="Target alias."),
            PrinterColumn("Canary", ".spec.canaryCity", description="Canary city."),
            _condition_column("Complete", "Promoted in every city."),
            PrinterColumn(
                "Rolled Back",
                '.status.conditions[?(@.type=="RolledBack")].status',
                description="The promotion was rolled back.",
            ),
            _AGE,
        ),
    ),
    KindInfo(
        "SensorFleet",
        "sensorfleets",
        "sensorfleet",
        ("fleet", "sfleet"),
        "Namespaced",
        "city",
        SensorFleet,
        (
            PrinterColumn("Type", ".spec.sensorType", description="SensorType of the terminals."),
            PrinterColumn("District", ".spec.district", description="District."),
            PrinterColumn("Count", ".spec.count", "integer", "Terminals installed."),
            PrinterColumn("Online", ".status.terminalsOnline", "integer", "Terminals reporting."),
            PrinterColumn(
                "Freshness",
                ".status.dataFreshness",
                description="Age of the newest reading (for example 15s or 2m10s).",
            ),
            PrinterColumn("Quality", ".status.qualityScore", "integer", "Percent of valid readings."),
            _condition_column("Ready", "Ingestion provisioned and data fresh."),
            _AGE,
        ),
    ),
    KindInfo(
        "AnalyticsModel",
        "analyticsmodels",
        "analyticsmodel",
        ("amodel",),
        "Namespaced",
        "city",
        AnalyticsModel,
        (
            PrinterColumn("Model", ".spec.registeredModel", description="Registered model."),
            PrinterColumn("Alias", ".spec.alias", description="Alias followed."),
            PrinterColumn("Version", ".status.resolvedVersion", description="Resolved version."),
            _condition_column("Ready", "Resolved and downloaded; refused artifacts are not used."),
            _condition_column("Verified", "Artifact digest matched spec.expectedDigest (the promotion's)."),
            _AGE,
        ),
    ),
    KindInfo(
        "Scenario",
        "scenarios",
        "scenario",
        ("scn",),
        "Namespaced",
        "city",
        Scenario,
        (
            PrinterColumn("Kind", ".spec.kind", description="Scenario kind."),
            PrinterColumn("Mode", ".spec.mode", description="live or drill."),
            PrinterColumn("Replicas", ".spec.replicas", "integer", "Analytics workers desired.", priority=1),
            _condition_column("Ready", "Workload running and scoring."),
            PrinterColumn(
                "Open Incidents", ".status.openIncidents", "integer", "Incidents not yet Resolved."
            ),
            _AGE,
        ),
    ),
    KindInfo(
        "Incident",
        "incidents",
        "incident",
        ("inc",),
        "Namespaced",
        "city",
        Incident,
        (
            PrinterColumn("Scenario", ".spec.scenarioRef.name", description="Scenario that detected it."),
            PrinterColumn("Kind", ".spec.kind", description="Scenario kind."),
            PrinterColumn("Severity", ".spec.severity", description="Severity."),
            PrinterColumn("State", ".spec.state", description="Lifecycle state."),
            PrinterColumn("Detected", ".spec.detectedAt", "date", "When it was detected."),
            PrinterColumn(
                "Response", ".status.responseTime", description="Time from detection to a crew on site (for "
                "example 4m30s); empty until a crew is on site."
            ),
            _AGE,
        ),
    ),
)

KIND_BY_NAME: dict[str, KindInfo] = {info.kind: info for info in KINDS}


def kind_info(kind: str) -> KindInfo:
    """The registry entry of a kind; a KeyError names the known kinds."""
    try:
        return KIND_BY_NAME[kind]
    except KeyError:
        raise KeyError(f"unknown CityNerve kind {kind!r}; known kinds: {', '.join(KIND_BY_NAME)}") from None


def to_manifest(obj: Resource) -> dict[str, Any]:
    """The object as a Kubernetes manifest: camelCase keys, JSON types, unset optionals left out."""
    manifest = obj.model_dump(mode="json", by_alias=True, exclude_none=True)
    metadata = manifest["metadata"]
    for key in ("labels", "annotations"):
        if not metadata.get(key):
            metadata.pop(key, None)
    return manifest


def from_manifest(kind: str, manifest: dict[str, Any]) -> Resource:
    """Parse and validate a manifest (or a Kopf body) of `kind` into its typed model.

    Fields the API server adds to metadata are kept; a ValidationError names any field the
    manifest gets wrong.
    """
    info = kind_info(kind)
    if manifest.get("kind", kind) != kind:
        raise ValueError(f"manifest is a {manifest.get('kind')!r}, not a {kind!r}")
    # Validated as JSON, strictly, so that types are checked the way the API server checks them
    # ("yes" is not a boolean, 7 is not a version string) while timestamps may still be strings.
    return info.model.model_validate_json(json.dumps(manifest, default=str), strict=True)
