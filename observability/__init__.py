"""CityNerve's telemetry: one OpenTelemetry set-up, the instruments, the spans that follow an
incident across processes, Grafana dashboards and the hub's situation map.

Never imports ``citynerve.operators`` (checked by import-linter): operators call these helpers.
"""

from citynerve.observability.metrics import instruments, record_city_health, record_incident_counts
from citynerve.observability.telemetry import Telemetry, configure_telemetry, shutdown_telemetry, tracer
from citynerve.observability.tracing import (
    TRACEPARENT_ANNOTATION,
    context_from_annotations,
    detection_span,
    incident_span,
    ingest_span,
    inject_traceparent,
    propagation_stamp,
    reconcile_span,
    record_incident_transitions,
    record_ingest,
    record_propagation,
    scenario_span,
    traceparent_header,
    webhook_receiver_span,
    webhook_span,
)

__all__ = [
    "TRACEPARENT_ANNOTATION",
    "Telemetry",
    "configure_telemetry",
    "context_from_annotations",
    "detection_span",
    "incident_span",
    "ingest_span",
    "inject_traceparent",
    "instruments",
    "propagation_stamp",
    "reconcile_span",
    "record_city_health",
    "record_incident_counts",
    "record_incident_transitions",
    "record_ingest",
    "record_propagation",
    "scenario_span",
    "shutdown_telemetry",
    "traceparent_header",
    "tracer",
    "webhook_receiver_span",
    "webhook_span",
]
