"""Every CityNerve instrument, defined once: names, units, descriptions and attribute keys.

Dashboards and tests refer to metrics through these constants. Names follow OpenTelemetry's
conventions (dotted, lower case, unit in ``unit`` not in the name, ``error.type`` for
failures); Prometheus sees them as ``citynerve_<...>_<unit>`` (see `prometheus_name`).

Instruments come from the meter provider that `configure_telemetry` installed; with telemetry
off they are OpenTelemetry's no-op instruments, so callers never check whether it is on.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeterProvider, Observation

METER_NAME = "citynerve"

# ---- attribute keys ----------------------------------------------------------------------------
ATTR_SENSOR_TYPE = "citynerve.sensor_type"
ATTR_QUARANTINE_REASON = "citynerve.quarantine.reason"
ATTR_SCENARIO_KIND = "citynerve.scenario.kind"
ATTR_INCIDENT_KIND = "citynerve.incident.kind"
ATTR_SEVERITY = "citynerve.incident.severity"
ATTR_STATE = "citynerve.incident.state"
ATTR_FROM_STATE = "citynerve.incident.from_state"
ATTR_DRILL = "citynerve.incident.drill"
ATTR_RESOURCE_KIND = "citynerve.resource.kind"
ATTR_OUTCOME = "citynerve.outcome"
ATTR_CITY = "citynerve.city"
ATTR_ROUTE = "citynerve.alert.route"
ATTR_ERROR_TYPE = "error.type"  # OpenTelemetry semantic convention
ATTR_HTTP_METHOD = "http.request.method"
ATTR_HTTP_STATUS = "http.response.status_code"
ATTR_SERVER_ADDRESS = "server.address"

# ---- instrument names --------------------------------------------------------------------------
READINGS_INGESTED = "citynerve.ingest.readings"
READINGS_QUARANTINED = "citynerve.ingest.quarantined"
READINGS_DUPLICATE = "citynerve.ingest.duplicates"
INGEST_LAG = "citynerve.ingest.lag"
DETECTION_LATENCY = "citynerve.detection.latency"
DETECTION_DELAY = "citynerve.detection.delay"
INCIDENTS_CREATED = "citynerve.incidents.created"
INCIDENTS_CURRENT = "citynerve.incidents.current"
INCIDENT_TRANSITIONS = "citynerve.incident.transitions"
INCIDENT_RESPONSE_TIME = "citynerve.incident.response_time"
ALERT_DELIVERIES = "citynerve.alert.deliveries"
HTTP_CLIENT_DURATION = "http.client.request.duration"  # semantic convention, for webhooks
RECONCILE_DURATION = "citynerve.reconcile.duration"
RECONCILE_ERRORS = "citynerve.reconcile.errors"
PROPAGATION_LATENCY = "citynerve.federation.propagation.latency"
CITY_REACHABLE = "citynerve.city.reachable"
CITY_READY = "citynerve.city.ready"
CITY_SENSORS_ONLINE = "citynerve.city.sensors_online"
CITY_OPEN_INCIDENTS = "citynerve.city.open_incidents"
CITY_HEARTBEAT_AGE = "citynerve.city.heartbeat.age"

#: name -> (kind, unit, description); kind is one of counter, histogram, gauge.
INSTRUMENTS: dict[str, tuple[str, str, str]] = {
    READINGS_INGESTED: ("counter", "{reading}", "Readings received by ingestion, per sensor type"),
    READINGS_QUARANTINED: ("counter", "{reading}", "Readings kept in quarantine, per sensor type and reason"),
    READINGS_DUPLICATE: ("counter", "{reading}", "Retransmitted readings dropped as duplicates"),
    INGEST_LAG: ("histogram", "s", "Ingesting clock minus the newest reading's timestamp, per batch"),
    DETECTION_LATENCY: ("histogram", "s", "Wall time from the start of detection to an incident's emission"),
    DETECTION_DELAY: ("histogram", "s", "Scenario time from a simulated onset to its detection (drills)"),
    INCIDENTS_CREATED: ("counter", "{incident}", "Incidents created, by kind and severity"),
    INCIDENTS_CURRENT: ("gauge", "{incident}", "Incidents known now, by kind, severity and state"),
    INCIDENT_TRANSITIONS: ("counter", "{transition}", "Incident lifecycle transitions, by target state"),
    INCIDENT_RESPONSE_TIME: ("histogram", "s", "Time from Detected to each later lifecycle state"),
    ALERT_DELIVERIES: ("counter", "{delivery}", "Webhook alert deliveries, by route and outcome"),
    HTTP_CLIENT_DURATION: ("histogram", "s", "Duration of webhook HTTP requests"),
    RECONCILE_DURATION: ("histogram", "s", "Duration of one reconcile, by resource kind and outcome"),
    RECONCILE_ERRORS: ("counter", "{error}", "Reconciles that raised, by resource kind and error type"),
    PROPAGATION_LATENCY: ("histogram", "s", "Hub write of a city's work to the city agent applying it"),
    CITY_REACHABLE: ("gauge", "1", "1 when the city's agent heartbeat is fresh, else 0"),
    CITY_READY: ("gauge", "1", "1 when the City is Ready on the hub, else 0"),
    CITY_SENSORS_ONLINE: ("gauge", "{terminal}", "Terminals online in a city, as its agent reports"),
    CITY_OPEN_INCIDENTS: ("gauge", "{incident}", "Open (not Resolved) incidents in a city"),
    CITY_HEARTBEAT_AGE: ("gauge", "s", "Seconds since the city's last heartbeat"),
}

_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_RESPONSE_BUCKETS = (10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 2400.0, 3600.0, 7200.0, 10800.0, 21600.0)
_BUCKETS: dict[str, tuple[float, ...]] = {
    INGEST_LAG: (0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0),
    DETECTION_DELAY: (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0),
    INCIDENT_RESPONSE_TIME: _RESPONSE_BUCKETS,
}

_UNIT_SUFFIX = {"s": "_seconds", "1": "_ratio"}


def prometheus_name(name: str) -> str:
    """The name Prometheus shows for an instrument (counters add ``_total``, histograms ``_bucket`` …).

    Gauges of unit ``1`` keep a bare name in the OpenTelemetry exporter; ``_ratio`` is only
    added to non-gauges, matching `opentelemetry-exporter-prometheus`.
    """
    kind, unit, _ = INSTRUMENTS[name]
    base = name.replace(".", "_")
    if unit == "s":
        base += "_seconds"
    elif unit == "1" and kind != "gauge":
        base += "_ratio"
    return base + ("_total" if kind == "counter" else "")


class _Snapshot:
    """Values an observable gauge reports: the latest set per attribute set (zero once gone)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[tuple[str, Any], ...], float] = {}

    def replace(self, values: Mapping[tuple[tuple[str, Any], ...], float], scope: Mapping[str, Any]) -> None:
        """Set values for every attribute set matching ``scope``; others of that scope drop to 0."""
        with self._lock:
            for key in list(self._values):
                attrs = dict(key)
                if all(attrs.get(k) == v for k, v in scope.items()):
                    self._values[key] = 0.0
            self._values.update(values)

    def set(self, attributes: Mapping[str, Any], value: float) -> None:
        with self._lock:
            self._values[tuple(sorted(attributes.items()))] = value

    def observe(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            items = list(self._values.items())
        return [Observation(value, dict(key)) for key, value in items]


@dataclass
class Instruments:
    """The instruments of one meter provider (rebuilt when `configure_telemetry` runs)."""

    readings_ingested: Any
    readings_quarantined: Any
    readings_duplicate: Any
    ingest_lag: Any
    detection_latency: Any
    detection_delay: Any
    incidents_created: Any
    incident_transitions: Any
    incident_response_time: Any
    alert_deliveries: Any
    http_client_duration: Any
    reconcile_duration: Any
    reconcile_errors: Any
    propagation_latency: Any
    incidents_current: _Snapshot
    city_reachable: _Snapshot
    city_ready: _Snapshot
    city_sensors_online: _Snapshot
    city_open_incidents: _Snapshot
    city_heartbeat_age: _Snapshot

    @classmethod
    def create(cls, meter: Meter) -> Instruments:
        made: dict[str, Any] = {}
        for name, (kind, unit, description) in INSTRUMENTS.items():
            field_name = _FIELD[name]
            if kind == "counter":
                made[field_name] = meter.create_counter(name, unit=unit, description=description)
            elif kind == "histogram":
                made[field_name] = meter.create_histogram(
                    name, unit=unit, description=description,
                    explicit_bucket_boundaries_advisory=list(_BUCKETS.get(name, _SECONDS_BUCKETS)),
                )
            else:
                snapshot = _Snapshot()
                meter.create_observable_gauge(name, [snapshot.observe], unit=unit, description=description)
                made[field_name] = snapshot
        return cls(**made)


_FIELD = {
    READINGS_INGESTED: "readings_ingested",
    READINGS_QUARANTINED: "readings_quarantined",
    READINGS_DUPLICATE: "readings_duplicate",
    INGEST_LAG: "ingest_lag",
    DETECTION_LATENCY: "detection_latency",
    DETECTION_DELAY: "detection_delay",
    INCIDENTS_CREATED: "incidents_created",
    INCIDENTS_CURRENT: "incidents_current",
    INCIDENT_TRANSITIONS: "incident_transitions",
    INCIDENT_RESPONSE_TIME: "incident_response_time",
    ALERT_DELIVERIES: "alert_deliveries",
    HTTP_CLIENT_DURATION: "http_client_duration",
    RECONCILE_DURATION: "reconcile_duration",
    RECONCILE_ERRORS: "reconcile_errors",
    PROPAGATION_LATENCY: "propagation_latency",
    CITY_REACHABLE: "city_reachable",
    CITY_READY: "city_ready",
    CITY_SENSORS_ONLINE: "city_sensors_online",
    CITY_OPEN_INCIDENTS: "city_open_incidents",
    CITY_HEARTBEAT_AGE: "city_heartbeat_age",
}

_current = Instruments.create(NoOpMeterProvider().get_meter(METER_NAME))


def instruments() -> Instruments:
    """The instruments of the configured meter provider (no-op ones before configuration)."""
    return _current


def install(meter: Meter) -> Instruments:
    """Build the instruments on ``meter`` and make them current (called by `configure_telemetry`)."""
    global _current  # noqa: PLW0603 - one set of instruments per process, swapped on (re)configuration
    _current = Instruments.create(meter)
    return _current


# ---- recording helpers that more than one process uses ------------------------------------------
def record_city_health(
    city: str,
    *,
    reachable: bool,
    ready: bool,
    sensors_online: int | None = None,
    open_incidents: int | None = None,
    heartbeat_age_s: float | None = None,
) -> None:
    """The hub's view of one city (call on each City check)."""
    attrs = {ATTR_CITY: city}
    inst = instruments()
    inst.city_reachable.set(attrs, 1.0 if reachable else 0.0)
    inst.city_ready.set(attrs, 1.0 if ready else 0.0)
    if sensors_online is not None:
        inst.city_sensors_online.set(attrs, float(sensors_online))
    if open_incidents is not None:
        inst.city_open_incidents.set(attrs, float(open_incidents))
    if heartbeat_age_s is not None:
        inst.city_heartbeat_age.set(attrs, float(heartbeat_age_s))


def record_incident_counts(incidents: Iterable[Mapping[str, Any]], city: str | None = None) -> None:
    """Incidents by kind, severity and state, from Incident resources (or the agent's digest)."""
    counts: dict[tuple[tuple[str, Any], ...], float] = {}
    for incident in incidents:
        spec = incident.get("spec", incident)
        attrs = {
            ATTR_INCIDENT_KIND: str(spec.get("kind", "unknown")),
            ATTR_SEVERITY: str(spec.get("severity", "unknown")),
            ATTR_STATE: str(spec.get("state", "Detected")),
        }
        if city is not None:
            attrs[ATTR_CITY] = city
        key = tuple(sorted(attrs.items()))
        counts[key] = counts.get(key, 0.0) + 1.0
    instruments().incidents_current.replace(counts, {ATTR_CITY: city} if city is not None else {})
