"""Every Incident carries the ``citynerve.io/traceparent`` annotation the docs promise, telemetry or not."""

from __future__ import annotations

import pytest
from citynerve.models.incidents import IncidentEvent, IncidentLocation
from citynerve.observability.telemetry import configure_telemetry, shutdown_telemetry
from citynerve.observability.tracing import (
    TRACEPARENT_ANNOTATION,
    context_from_annotations,
    incident_span,
    reconcile_span,
    webhook_span,
)
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytestmark = pytest.mark.timeout(20)
EVENT = IncidentEvent(
    "water-burst", IncidentLocation("pipe-DN600-PD-01872", 31.2231, 121.544), "alarm", 120.0
)


@pytest.fixture
def telemetry_off() -> None:
    shutdown_telemetry()  # what a workload runs with when nobody configured an exporter


def _trace_id(traceparent: str) -> str:
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
    assert int(trace_id, 16)
    assert int(span_id, 16)
    assert flags == "01"
    return trace_id


def test_without_telemetry_an_incident_still_carries_a_trace_its_reconciles_and_webhooks_continue(
    telemetry_off: None,
) -> None:
    with incident_span(EVENT, city="shanghai", name="burst-1", namespace="citynerve") as annotations:
        pass
    trace_id = _trace_id(annotations[TRACEPARENT_ANNOTATION])
    assert context_from_annotations(annotations) is not None
    # The operator reconciles the Incident inside that trace, and the webhook carries it on.
    with reconcile_span("Incident", "citynerve", "burst-1", annotations), \
            webhook_span("duty-desk", "https://desk.example/alerts", "Detected") as headers:
        assert _trace_id(headers["traceparent"]) == trace_id
    with incident_span(EVENT, name="burst-2") as other:
        pass
    assert _trace_id(other[TRACEPARENT_ANNOTATION]) != trace_id  # one trace per incident


def test_with_telemetry_the_annotation_is_the_recorded_span() -> None:
    exporter = InMemorySpanExporter()
    configure_telemetry("citynerve-test", span_exporter=exporter)
    try:
        with incident_span(EVENT, name="burst-1") as annotations:
            recorded = trace.get_current_span().get_span_context()
        expected = f"00-{recorded.trace_id:032x}-{recorded.span_id:016x}-"
        assert annotations[TRACEPARENT_ANNOTATION].startswith(expected)
        assert [s.name for s in exporter.get_finished_spans()] == ["incident.create"]
    finally:
        shutdown_telemetry()
