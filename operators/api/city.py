"""Resources that live in a city cluster: SensorFleet, AnalyticsModel, Scenario, Incident."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import ClassVar, Literal

from citynerve.operators.api.common import (
    CAMEL_IDENTIFIER,
    DECIMAL,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    DURATION,
    LIST_ATOMIC,
    MODEL_NAME,
    MODEL_NAME_MAX_LENGTH,
    UNIT_CODE,
    CrdModel,
    LocalObjectReference,
    Rule,
    SecretKeyReference,
    StatusBase,
    immutable,
    list_map,
)
from pydantic import Field

ScenarioKind = Literal["water-burst", "urban-flood", "mountain-flood", "major-event"]
Severity = Literal["warning", "alarm", "critical"]
IncidentState = Literal["Detected", "Dispatched", "OnSite", "Resolved"]
INCIDENT_STATES: tuple[IncidentState, ...] = ("Detected", "Dispatched", "OnSite", "Resolved")
_STATE_ORDER_CEL = "{'Detected': 0, 'Dispatched': 1, 'OnSite': 2, 'Resolved': 3}"
SimulationEngine = Literal["wntr", "swmm", "pedestrian-counts", "replay"]
# The scenario kinds each simulation engine rehearses: a water network (WNTR/EPANET) bursts, a
# drainage model (SWMM) floods, recorded crowd counts (replayed) a major event's crowds.
ENGINE_SCENARIO_KINDS: dict[str, tuple[ScenarioKind, ...]] = {
    "wntr": ("water-burst",),
    "swmm": ("urban-flood", "mountain-flood"),
    "pedestrian-counts": ("major-event",),
    "replay": ("major-event",),
}
ENGINE_SCENARIO_KINDS_CEL = (
    "{" + ", ".join(f"'{engine}': {list(kinds)!r}" for engine, kinds in ENGINE_SCENARIO_KINDS.items()) + "}"
)
ENGINE_MESSAGE = (
    "simulation.engine cannot rehearse this scenario kind: use wntr for water-burst, swmm for urban-flood "
    "and mountain-flood, pedestrian-counts or replay for major-event"
)


def engine_fits_kind(engine: str, kind: str) -> bool:
    """Whether a simulation engine can rehearse a scenario kind (the Python reading of the CEL rule)."""
    return kind in ENGINE_SCENARIO_KINDS.get(engine, ())


# WGS 84 coordinates as decimal-degree strings: the same rules wherever a resource carries them.
COORDINATE_RULES: tuple[Rule, ...] = (
    Rule(
        cel="double(self.latitude) >= -90.0 && double(self.latitude) <= 90.0",
        message="latitude must be between -90 and 90 decimal degrees",
        field_path=".latitude",
        check=lambda loc: -90 <= float(loc.latitude) <= 90,
    ),
    Rule(
        cel="double(self.longitude) >= -180.0 && double(self.longitude) <= 180.0",
        message="longitude must be between -180 and 180 decimal degrees",
        field_path=".longitude",
        check=lambda loc: -180 <= float(loc.longitude) <= 180,
    ),
)


# --- SensorFleet -------------------------------------------------------------------------------


class Georeference(CrdModel):
    """Where the network model a fleet's terminals belong to lies in the city: its centre at this
    point, its own drawing scaled by its pipe (or conduit) lengths."""

    latitude: str = Field(
        description="Latitude of the model's centre in decimal degrees, as a string (for example "
        '`"30.6570"`).',
        pattern=DECIMAL,
        max_length=16,
    )
    longitude: str = Field(
        description="Longitude of the model's centre in decimal degrees, as a string (for example "
        '`"104.0660"`).',
        pattern=DECIMAL,
        max_length=16,
    )
    description: str | None = Field(
        default=None,
        description="What the point is, for the crew (for example `Jinjiang district's pumping station`).",
        max_length=256,
    )

    rules: ClassVar[tuple[Rule, ...]] = COORDINATE_RULES


class SensorFleetSpec(CrdModel):
    """A population of terminals of one SensorType in one district, and how their data is ingested."""

    sensor_type: str = Field(
        description="Name of the cluster-scoped SensorType every terminal in this fleet is an instance of. "
        "Immutable: readings of another type need another fleet.",
        pattern=DNS_SUBDOMAIN,
        min_length=1,
        max_length=253,
        json_schema_extra=immutable("sensorType"),
    )
    district: str = Field(
        description="The city district the terminals are installed in (for example `pudong`), used to "
        "group readings and locate incidents.",
        pattern=DNS_LABEL,
        min_length=1,
        max_length=63,
    )
    count: int = Field(
        description="Number of terminals installed in the fleet; readings from more terminals than this are "
        "quarantined.",
        ge=0,
        le=100_000_000,
    )
    protocol: Literal["MQTT", "HTTP"] = Field(
        default="MQTT",
        description="How the fleet's readings reach the city: `MQTT` (terminals, or the network server of "
        "NB-IoT/LoRaWAN terminals, publish QoS 1 to topic `readings/<city>/<fleet>` on the city broker, with "
        "the fleet's own credential in Secret `<fleet>-mqtt`) or `HTTP` (gateways post NGSI-LD batch upserts "
        "to the fleet's ingest Service). The operator provisions exactly that way in.",
    )
    sampling_interval_seconds: int = Field(
        default=300,
        ge=1,
        le=86_400,
        description="Seconds between two readings of one terminal; data older than three intervals counts "
        "as stale.",
    )
    owner: Literal["government", "operator", "partner"] = Field(
        description="Who owns the terminals: a government department, the platform operator, or a partner "
        "company under a data-sharing agreement.",
    )
    data_classification: Literal["public", "internal", "confidential", "restricted"] = Field(
        default="internal",
        description="Sensitivity of the readings; `confidential` and `restricted` data never leave the city "
        "and are encrypted at rest.",
    )
    georeference: Georeference | None = Field(
        default=None,
        description="For terminals that are assets of a network model (a water fleet's loggers at "
        "junctions, terminal id = junction): where the model lies in the city. An Incident a live scenario "
        "raises at one of its assets gets that asset's coordinates; without it, the city's centre.",
    )
    window_seconds: int = Field(
        default=300,
        ge=10,
        le=86_400,
        description="Length of the windows readings are aggregated into (per terminal and property: count, "
        "mean, minimum, maximum), on the readings' own clock. Must divide a day (86400 s), so windows align "
        "with days in the history.",
    )
    allowed_lateness_seconds: int = Field(
        default=60,
        ge=0,
        le=3_600,
        description="How long after a window's end its readings are still accepted: a window closes when "
        "the newest reading is this much past its end; a reading for a closed window is quarantined as late.",
    )
    history_retention_days: int = Field(
        default=30,
        ge=1,
        le=3_660,
        description="Days the fleet's closed windows are kept on the city's windows stream and in its "
        "history, for detectors to warm up and for training.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="86400 % self.windowSeconds == 0",
            message="spec.windowSeconds must divide a day (86400 s), for example 60, 300, 900 or 3600",
            field_path=".windowSeconds",
            check=lambda s: 86_400 % s.window_seconds == 0,
        ),
    )


class SensorFleetStatus(StatusBase):
    """Observed health of a SensorFleet's data feed."""

    terminals_online: int | None = Field(
        default=None, ge=0, description="Terminals that reported within the last three sampling intervals."
    )
    data_freshness_seconds: int | None = Field(
        default=None, ge=0, description="Age in seconds of the newest accepted reading."
    )
    data_freshness: str | None = Field(
        default=None,
        description="dataFreshnessSeconds with its units, as `kubectl get` shows it (for example `15s` or "
        "`2m10s`).",
        pattern=DURATION,
        min_length=2,
        max_length=32,
    )
    quality_score: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Percentage of readings in the last window that passed schema and range validation.",
    )
    quarantined_payloads: int | None = Field(
        default=None,
        ge=0,
        description="Payloads refused by validation since the fleet was created; they are kept for "
        "inspection, not scored.",
    )
    late_readings: int | None = Field(
        default=None,
        ge=0,
        description="Readings that arrived after their window had closed (its end plus "
        "spec.allowedLatenessSeconds, on the readings' clock); quarantined with reason `late`.",
    )
    last_reading_time: datetime | None = Field(default=None, description="When the newest reading arrived.")


# --- AnalyticsModel ----------------------------------------------------------------------------


class AnalyticsModelSpec(CrdModel):
    """A model registered in MLflow, pinned by alias or by version, that scenarios score with."""

    registered_model: str = Field(
        description="Name of the registered model in the MLflow model registry (for example "
        "`water-burst-detector`): dot-separated words of letters, digits, `-` and `_`, at most 63 "
        "characters.",
        pattern=MODEL_NAME,
        min_length=1,
        max_length=MODEL_NAME_MAX_LENGTH,
    )
    alias: str | None = Field(
        default=None,
        description="Registry alias to follow (for example `champion`); the operator re-resolves it when "
        "the alias moves. Set exactly one of alias and version.",
        pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
        max_length=63,
    )
    version: str | None = Field(
        default=None,
        description='Registry version number to pin, as a string of digits (for example `"7"`). Set '
        "exactly one of alias and version.",
        pattern=r"^[1-9][0-9]*$",
        max_length=10,
    )
    expected_digest: str | None = Field(
        default=None,
        description="sha256 digest the model artifact must have (`sha256:<64 hex>`); a model whose "
        "artifact differs is refused as untrusted. A ModelPromotion sets it to the digest the hub recorded "
        "at its gate; without it the model resolves but is not Verified, and live scenarios refuse it.",
        pattern=r"^sha256:[a-f0-9]{64}$",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.alias) != has(self.version)",
            message='set exactly one of spec.alias (for example champion) or spec.version (for example "7")',
            check=lambda s: (s.alias is None) != (s.version is None),
        ),
    )


class ModelMetric(CrdModel):
    """One evaluation metric recorded in MLflow for the resolved version."""

    name: str = Field(description="Metric name as logged in MLflow (for example `f1`).", max_length=250)
    value: float = Field(description="Metric value as logged.")


class AnalyticsModelStatus(StatusBase):
    """The model version actually resolved and verified."""

    resolved_version: str | None = Field(
        default=None, description="Registry version the alias or version resolved to."
    )
    model_uri: str | None = Field(
        default=None, description="MLflow URI of the resolved artifact (for example `models:/name/7`)."
    )
    artifact_digest: str | None = Field(
        default=None, description="sha256 digest computed from the downloaded artifact."
    )
    metrics: list[ModelMetric] = Field(
        default_factory=list,
        max_length=256,
        description="Evaluation metrics recorded for the resolved version.",
        json_schema_extra=list_map("name"),
    )


# --- Scenario ----------------------------------------------------------------------------------


class FleetReference(CrdModel):
    """A SensorFleet in the same namespace the scenario reads from."""

    name: str = Field(description="Name of the SensorFleet.", pattern=DNS_SUBDOMAIN, max_length=253)


class ModelReference(CrdModel):
    """An AnalyticsModel in the same namespace the scenario scores with."""

    name: str = Field(description="Name of the AnalyticsModel.", pattern=DNS_SUBDOMAIN, max_length=253)
    role: Literal["detector", "forecaster", "localiser"] = Field(
        default="detector",
        description="What the scenario uses the model for: detect anomalies, forecast a metric, or locate "
        "the source of an anomaly.",
    )


class Threshold(CrdModel):
    """Warning and alarm levels for one metric. Values are integers in the stated unit; higher is worse."""

    metric: str = Field(
        description="camelCase metric the workload computes (for example `pressureDropKpa`, "
        "`waterLevelMm`, `crowdDensityPer100Sqm`).",
        pattern=CAMEL_IDENTIFIER,
        max_length=63,
    )
    unit_code: str = Field(
        description="UN/CEFACT unit code of warning and alarm (for example `KPA`, `MMT` for millimetres, "
        "`C62` for a count). Choose a unit small enough that the levels are integers.",
        pattern=UNIT_CODE,
    )
    warning: int = Field(
        description="Level at or above which an incident of severity `warning` is raised. Must be below "
        "alarm.",
        ge=0,
        le=1_000_000_000,
    )
    alarm: int = Field(
        description="Level at or above which an incident of severity `alarm` is raised and alert routes "
        "are called.",
        ge=0,
        le=1_000_000_000,
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.warning < self.alarm",
            message="warning threshold must be below the alarm threshold; lower warning or raise alarm",
            field_path=".warning",
            check=lambda t: t.warning < t.alarm,
        ),
    )


class AlertRoute(CrdModel):
    """A webhook that incidents are posted to, signed with HMAC-SHA256."""

    name: str = Field(
        description="Name of the route, unique within the scenario.", pattern=DNS_LABEL, max_length=63
    )
    url: str = Field(
        description="Webhook URL the incident is POSTed to as JSON.",
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
        json_schema_extra={"format": "uri"},
    )
    secret_ref: SecretKeyReference = Field(
        description="Secret key holding the HMAC-SHA256 key; each delivery is signed over its timestamp, "
        "delivery id and body in the `X-CityNerve-Signature` header (`t=<unix seconds>,v1=<hex>`).",
    )
    min_severity: Severity = Field(
        default="alarm", description="Lowest incident severity posted to this route."
    )


class SimulationSource(CrdModel):
    """Simulated data a drill rehearses on, produced by a field-grade engine."""

    engine: SimulationEngine = Field(
        description="Simulation engine: `wntr` (EPANET water networks, for `water-burst`), `swmm` (drainage "
        "via pyswmm, for `urban-flood` and `mountain-flood`), `pedestrian-counts` (recorded crowd counts, "
        "for `major-event`) or `replay` (recorded crowd readings, for `major-event`)."
    )
    network: str = Field(
        description="Network model or data set the engine loads (for example `Net3`, `ky4`, "
        "`example-catchment`).",
        min_length=1,
        max_length=253,
    )
    event: str | None = Field(
        default=None,
        description="Event injected into the simulation (for example `burst:pipe-123` or `storm:100y`).",
        max_length=253,
    )
    speedup: int = Field(default=1, ge=1, le=3600, description="Simulated seconds per wall-clock second.")


class ScenarioSpec(CrdModel):
    """A governance scenario: which fleets and models to combine, when to alert, and whom to call."""

    kind: ScenarioKind = Field(
        description="Which scenario this is; it selects the analytics workload: `water-burst`, "
        "`urban-flood`, `mountain-flood` or `major-event`.",
    )
    mode: Literal["live", "drill"] = Field(
        default="live",
        description="`live` scores real readings; `drill` rehearses on simulated data from `simulation` "
        "and marks every incident as a drill.",
    )
    fleets: list[FleetReference] = Field(
        min_length=1,
        max_length=64,
        description="SensorFleets whose readings the scenario scores.",
        json_schema_extra=list_map("name"),
    )
    models: list[ModelReference] = Field(
        default_factory=list,
        max_length=16,
        description="AnalyticsModels the scenario scores with.",
        json_schema_extra=list_map("name"),
    )
    thresholds: list[Threshold] = Field(
        default_factory=list,
        max_length=32,
        description="Warning and alarm levels, one entry per metric.",
        json_schema_extra=list_map("metric"),
    )
    alert_routes: list[AlertRoute] = Field(
        default_factory=list,
        max_length=16,
        description="Webhooks incidents are posted to.",
        json_schema_extra=list_map("name"),
    )
    simulation: SimulationSource | None = Field(
        default=None,
        description="Simulated data to rehearse on; required when mode is `drill`, ignored when `live`.",
    )
    replicas: int = Field(
        default=1,
        ge=0,
        le=64,
        description="Analytics workers scoring the scenario; 0 suspends it without deleting it.",
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.mode != 'drill' || has(self.simulation)",
            message="a drill scenario must name a simulation source in spec.simulation (engine and network)",
            field_path=".simulation",
            reason="FieldValueRequired",
            check=lambda s: s.mode != "drill" or s.simulation is not None,
        ),
        Rule(
            cel=f"!has(self.simulation) || self.kind in {ENGINE_SCENARIO_KINDS_CEL}[self.simulation.engine]",
            message=ENGINE_MESSAGE,
            field_path=".simulation.engine",
            check=lambda s: s.simulation is None or engine_fits_kind(s.simulation.engine, s.kind),
        ),
    )


class WorkloadReference(CrdModel):
    """The analytics workload provisioned for a scenario."""

    api_version: str = Field(description="API version of the workload (for example `ray.io/v1`).")
    kind: str = Field(description="Kind of the workload (for example `RayService`).")
    name: str = Field(description="Name of the workload in the scenario's namespace.")


class RunningModel(CrdModel):
    """A model version the scenario's workload scores with."""

    name: str = Field(description="Name of the AnalyticsModel.", pattern=DNS_SUBDOMAIN, max_length=253)
    version: str | None = Field(
        default=None, description="Registry version the AnalyticsModel resolved to.", max_length=10
    )
    artifact_digest: str | None = Field(
        default=None, description="sha256 digest of the artifact the workload loads.", max_length=71
    )


class ScoredWindows(CrdModel):
    """What a live workload has scored of its fleets' windows, as it reports it."""

    windows: int = Field(ge=0, description="Windows of the bound fleets scored since the workload started.")
    steps: int = Field(ge=0, description="Time steps scored (one step holds a window of every bound fleet).")
    lag_windows: int | None = Field(
        default=None, ge=0, description="Windows on the fleets' streams not yet delivered to the workload."
    )
    last_window_time: datetime | None = Field(
        default=None, description="Start of the newest window scored (the readings' own clock)."
    )


class ScenarioStatus(StatusBase):
    """Observed state of the scenario's workload and incidents."""

    scored: ScoredWindows | None = Field(
        default=None, description="For a live scenario: what its workload has scored, as it reports it."
    )

    workload: WorkloadReference | None = Field(
        default=None, description="The analytics workload running this scenario."
    )
    ready_replicas: int | None = Field(default=None, ge=0, description="Workers scoring readings.")
    open_incidents: int | None = Field(
        default=None, ge=0, description="Incidents of this scenario not yet Resolved."
    )
    last_evaluation_time: datetime | None = Field(
        default=None, description="When the workload last scored a window of readings."
    )
    models: list[RunningModel] = Field(
        default_factory=list,
        max_length=16,
        description="The model versions the running workload scores with; when one changes, the "
        "operator posts a ModelSwapped Event.",
        json_schema_extra=list_map("name"),
    )


# --- Incident ----------------------------------------------------------------------------------


class IncidentLocation(CrdModel):
    """Where the incident is. Coordinates are decimal-degree strings (WGS 84), never floats."""

    latitude: str = Field(
        description='Latitude in decimal degrees, -90 to 90, as a string (for example `"31.2304"`).',
        pattern=DECIMAL,
        max_length=16,
    )
    longitude: str = Field(
        description='Longitude in decimal degrees, -180 to 180, as a string (for example `"121.4737"`).',
        pattern=DECIMAL,
        max_length=16,
    )
    asset_id: str | None = Field(
        default=None,
        description="Identifier of the affected asset (pipe, junction, underpass, gate) in the owner's "
        "asset register.",
        max_length=253,
    )
    description: str | None = Field(
        default=None,
        description="Where it is, for the crew (for example `Yan'an Road underpass, east exit`).",
        max_length=1024,
    )

    rules: ClassVar[tuple[Rule, ...]] = COORDINATE_RULES


class Evidence(CrdModel):
    """A reading or score that made the workload raise the incident."""

    fleet: str = Field(
        description="SensorFleet the reading came from.", pattern=DNS_SUBDOMAIN, max_length=253
    )
    terminal: str | None = Field(default=None, description="Terminal (device) identifier.", max_length=253)
    metric: str = Field(description="camelCase metric observed.", pattern=CAMEL_IDENTIFIER, max_length=63)
    value: str = Field(description="Observed value, as a decimal string.", pattern=DECIMAL, max_length=32)
    unit_code: str = Field(description="UN/CEFACT unit code of value.", pattern=UNIT_CODE)
    observed_at: datetime = Field(description="When the reading was taken.")


class StateTransition(CrdModel):
    """When the incident entered a lifecycle state, and who moved it there."""

    state: IncidentState = Field(description="The state entered.")
    time: datetime = Field(description="When the state was entered.")
    actor: str = Field(
        description="Who made the transition: a workload (`scenario/<name>`), an officer's user name or a "
        "crew identifier.",
        min_length=1,
        max_length=253,
    )
    note: str | None = Field(default=None, description="Free-text note for the record.", max_length=4096)


class DecidingModel(CrdModel):
    """The model that decided: the AnalyticsModel, the registry version the workload loaded and
    the digest it verified, and the windows it had scored when it raised the incident."""

    name: str = Field(description="Name of the AnalyticsModel.", pattern=DNS_SUBDOMAIN, max_length=253)
    registered_model: str = Field(description="Registered model in MLflow.", max_length=253)
    version: str = Field(description="Registry version the workload loaded.", max_length=10)
    artifact_digest: str = Field(
        description="sha256 digest of the loaded artifact, checked against the AnalyticsModel's.",
        max_length=71,
    )
    first_window: datetime = Field(description="Start of the oldest window in the model's context.")
    last_window: datetime = Field(description="Start of the window at which the model raised the incident.")
    windows: int = Field(ge=0, description="Windows in the model's context when it decided.")


class IncidentSpec(CrdModel):
    """An incident detected by a scenario, followed from detection to resolution."""

    scenario_ref: LocalObjectReference = Field(
        description="The Scenario whose workload detected the incident. Immutable.",
        json_schema_extra=immutable("scenarioRef"),
    )
    kind: ScenarioKind = Field(
        description="Kind of scenario that detected it. Immutable.", json_schema_extra=immutable("kind")
    )
    severity: Severity = Field(description="How serious it is: `warning`, `alarm` or `critical`.")
    drill: bool = Field(default=False, description="True when raised by a drill on simulated data.")
    location: IncidentLocation = Field(description="Where the incident is.")
    evidence: list[Evidence] = Field(
        default_factory=list,
        max_length=64,
        description="Readings and scores that made the workload raise the incident.",
        json_schema_extra=LIST_ATOMIC,
    )
    detected_at: datetime = Field(
        description="When the workload detected the incident. Immutable.",
        json_schema_extra=immutable("detectedAt"),
    )
    decided_by: DecidingModel | None = Field(
        default=None,
        description="The model version that raised the incident and the windows it scored (live scoring). "
        "Immutable.",
        json_schema_extra=immutable("decidedBy"),
    )
    state: IncidentState = Field(
        default="Detected",
        description="Where the incident is in its lifecycle: Detected → Dispatched → OnSite → Resolved. It "
        "only moves forward; each move is recorded in transitions.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"{_STATE_ORDER_CEL}[self] >= {_STATE_ORDER_CEL}[oldSelf]",
                    "message": "state only moves forward (Detected, Dispatched, OnSite, Resolved); "
                    "open a new Incident instead",
                }
            ]
        },
    )
    transitions: list[StateTransition] = Field(
        default_factory=list,
        max_length=4,
        description="One entry per lifecycle state entered, with time and actor, so response times are "
        "measured.",
        json_schema_extra=list_map("state"),
    )

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.state == 'Detected' || (has(self.transitions) && "
            "self.transitions.exists(t, t.state == self.state))",
            message="record the move to spec.state in spec.transitions (state, time, actor)",
            field_path=".transitions",
            reason="FieldValueRequired",
            check=lambda s: s.state == "Detected" or any(t.state == s.state for t in s.transitions),
        ),
        Rule(
            cel=f"!has(self.transitions) || "
            f"self.transitions.all(t, {_STATE_ORDER_CEL}[t.state] <= {_STATE_ORDER_CEL}[self.state])",
            message="spec.transitions records a state later than spec.state; spec.state is the last state "
            "entered, so set it to that state or remove the transition",
            field_path=".state",
            check=lambda s: all(_order(t.state) <= _order(s.state) for t in s.transitions),
        ),
        Rule(
            cel=f"!has(self.transitions) || self.transitions.map(t, {_STATE_ORDER_CEL}[t.state]).isSorted()",
            message="list spec.transitions in lifecycle order: Detected, Dispatched, OnSite, Resolved",
            field_path=".transitions",
            check=lambda s: [_order(t.state) for t in s.transitions]
            == sorted(_order(t.state) for t in s.transitions),
        ),
        Rule(
            cel="!has(self.transitions) || self.transitions.all(t, t.time >= self.detectedAt)",
            message="a transition is timed before spec.detectedAt; nothing happens to an incident before it "
            "is detected, so correct the transition's time",
            field_path=".transitions",
            check=lambda s: all(_utc(t.time) >= _utc(s.detected_at) for t in s.transitions),
        ),
        Rule(
            cel=f"!has(self.transitions) || self.transitions.all(a, self.transitions.all(b, "
            f"{_STATE_ORDER_CEL}[a.state] >= {_STATE_ORDER_CEL}[b.state] || a.time <= b.time))",
            message="a later lifecycle state is timed before an earlier one; transition times must not "
            "decrease from Detected to Dispatched, OnSite and Resolved",
            field_path=".transitions",
            check=lambda s: all(
                _order(a.state) >= _order(b.state) or _utc(a.time) <= _utc(b.time)
                for a in s.transitions
                for b in s.transitions
            ),
        ),
    )


def _order(state: IncidentState) -> int:
    return INCIDENT_STATES.index(state)


def _utc(moment: datetime) -> datetime:
    """A timestamp comparable with any other (one without an offset is read as UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class DeliveryRetry(CrdModel):
    """A failed alert delivery to one route and when it is tried again."""

    route: str = Field(description="Name of the alert route.", pattern=DNS_LABEL, max_length=63)
    state: IncidentState = Field(description="The incident state the failed delivery carried.")
    attempts: int = Field(ge=1, description="Failed attempts so far; each doubles the wait before the next.")
    reason: str = Field(
        description="Why the last attempt failed (CamelCase): ReceiverTimeout, ReceiverUnreachable, "
        "Redirected, ReceiverRefused, RouteRefused, SecretNotFound …",
        max_length=128,
    )
    message: str = Field(default="", description="What failed and what to do about it.", max_length=4096)
    last_attempt_time: datetime = Field(description="When the last attempt failed.")
    next_attempt_time: datetime = Field(description="When the route is tried again (not before).")


class IncidentStatus(StatusBase):
    """Measured response times and notifications."""

    dispatch_seconds: int | None = Field(
        default=None, ge=0, description="Seconds from detection to dispatch."
    )
    response_seconds: int | None = Field(
        default=None, ge=0, description="Seconds from detection to a crew on site."
    )
    response_time: str | None = Field(
        default=None,
        description="responseSeconds with its units, as `kubectl get` shows it (for example `4s` or "
        "`1h2m`).",
        pattern=DURATION,
        min_length=2,
        max_length=32,
    )
    resolution_seconds: int | None = Field(
        default=None, ge=0, description="Seconds from detection to resolution."
    )
    notified_routes: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Alert routes the incident was delivered to.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    delivery_retries: list[DeliveryRetry] = Field(
        default_factory=list,
        max_length=16,
        description="Alert deliveries that failed, one per route, each retried after a backoff that "
        "doubles per attempt; gone once delivered.",
        json_schema_extra=list_map("route"),
    )
