"""`configure_telemetry` and the context helpers: no-op when off, environment honoured, context carried."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from citynerve.observability import metrics as m
from citynerve.observability.otlp_receiver import LocalOtlpReceiver
from citynerve.observability.telemetry import configure_telemetry, shutdown_telemetry, tracer
from citynerve.observability.tracing import (
    TRACEPARENT_ANNOTATION,
    TransitionRecorder,
    context_from_annotations,
    context_from_headers,
    inject_traceparent,
    reconcile_span,
    traceparent_header,
)
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    configure_telemetry("citynerve-test", span_exporter=exporter)
    try:
        yield exporter
    finally:
        shutdown_telemetry()


def test_disabled_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    monkeypatch.setenv("CITYNERVE_PROMETHEUS_PORT", "0")
    telemetry = configure_telemetry("citynerve-test")
    try:
        assert not telemetry.enabled
        assert telemetry.prometheus_url is None
        with tracer().start_as_current_span("x") as span:
            assert not span.is_recording()
            assert inject_traceparent() == {}
        m.instruments().readings_ingested.add(1, {})  # accepted and dropped
        with reconcile_span("City", None, "shanghai"):
            pass
    finally:
        shutdown_telemetry()


def test_resource_has_service_city_cluster_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=drill,team=water")
    telemetry = configure_telemetry("citynerve-city-operator", city="chengdu", cluster="chengdu-1")
    try:
        assert telemetry.tracer_provider is not None
        attrs = dict(telemetry.tracer_provider.resource.attributes)
        assert attrs["service.name"] == "citynerve-city-operator"
        assert attrs["citynerve.city"] == "chengdu"
        assert attrs["k8s.cluster.name"] == "chengdu-1"
        assert attrs["deployment.environment"] == "drill"
        monkeypatch.setenv("OTEL_SERVICE_NAME", "renamed")
        telemetry = configure_telemetry("citynerve-city-operator")
        assert telemetry.tracer_provider is not None
        assert telemetry.tracer_provider.resource.attributes["service.name"] == "renamed"
    finally:
        shutdown_telemetry()


@pytest.mark.timeout(30)
def test_otlp_endpoint_from_the_standard_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = LocalOtlpReceiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    try:
        telemetry = configure_telemetry("citynerve-test", city="shanghai")
        with tracer().start_as_current_span("exported"):
            pass
        m.instruments().readings_ingested.add(3, {m.ATTR_SENSOR_TYPE: "water-pressure-logger"})
        telemetry.force_flush()
        shutdown_telemetry()
        assert [s.name for s in receiver.spans] == ["exported"]
        assert receiver.spans[0].resource["citynerve.city"] == "shanghai"
        assert m.READINGS_INGESTED in receiver.metric_names
    finally:
        shutdown_telemetry()
        receiver.stop()


def test_context_travels_through_annotations_and_headers(spans: InMemorySpanExporter) -> None:
    with tracer().start_as_current_span("incident.create") as parent:
        annotations = inject_traceparent()
        headers = traceparent_header()
    trace_id = parent.get_span_context().trace_id
    assert annotations[TRACEPARENT_ANNOTATION].startswith(f"00-{trace_id:032x}-")
    assert headers["traceparent"] == annotations[TRACEPARENT_ANNOTATION]
    from_headers = context_from_headers({"Traceparent": headers["traceparent"]})  # any case
    for ctx in (context_from_annotations(annotations), from_headers):
        assert ctx is not None
        with tracer().start_as_current_span("child", context=ctx) as child:
            assert child.get_span_context().trace_id == trace_id
    assert context_from_annotations({}) is None
    assert context_from_annotations({TRACEPARENT_ANNOTATION: "not-a-traceparent"}) is None
    assert context_from_annotations(None) is None


def test_reconcile_span_names_the_object_and_its_outcome(spans: InMemorySpanExporter) -> None:
    with reconcile_span("Scenario", "citynerve", "water") as span:
        span.set_attribute(m.ATTR_OUTCOME, "noop")
    with pytest.raises(ValueError, match="bad"), reconcile_span("City", None, "chengdu"):
        raise ValueError("bad")
    ok, failed = spans.get_finished_spans()
    assert ok.name == "reconcile Scenario"
    assert ok.attributes is not None
    assert failed.attributes is not None
    assert (ok.attributes["citynerve.resource.kind"], ok.attributes["k8s.namespace.name"],
            ok.attributes["citynerve.resource.name"], ok.attributes["citynerve.outcome"]) == (
        "Scenario", "citynerve", "water", "noop")
    assert failed.attributes["citynerve.outcome"] == "error"
    assert failed.attributes["error.type"] == "ValueError"
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert failed.events[0].name == "exception"


def test_an_incident_reconcile_continues_the_incident_trace(spans: InMemorySpanExporter) -> None:
    with tracer().start_as_current_span("incident.create") as created:
        annotations = inject_traceparent()
    with reconcile_span("Incident", "citynerve", "burst-1", annotations):
        pass
    reconcile = spans.get_finished_spans()[-1]
    assert reconcile.parent is not None
    assert reconcile.parent.span_id == created.get_span_context().span_id


def test_each_transition_is_recorded_once(spans: InMemorySpanExporter) -> None:
    with tracer().start_as_current_span("incident.create"):
        annotations = inject_traceparent()
    incident = {
        "metadata": {"uid": "u-1", "namespace": "citynerve", "name": "burst-1", "annotations": annotations},
        "spec": {"kind": "water-burst", "severity": "critical", "detectedAt": "2026-11-25T03:00:00Z",
                 "transitions": [{"state": "Detected", "time": "2026-11-25T03:00:00Z"}]},
    }
    recorder = TransitionRecorder()
    assert recorder.record(incident) == 1
    incident["spec"]["transitions"] = [  # type: ignore[index]
        *incident["spec"]["transitions"],  # type: ignore[index]
        {"state": "Dispatched", "time": "2026-11-25T03:05:00Z", "actor": "duty"},
        {"state": "OnSite", "time": "2026-11-25T03:40:00Z", "actor": "crew-7"},
    ]
    assert recorder.record(incident) == 3
    assert recorder.record(incident) == 3  # nothing new: nothing recorded
    names = [s.name for s in spans.get_finished_spans() if s.name.startswith("incident.transition")]
    assert names == ["incident.transition Detected", "incident.transition Dispatched",
                     "incident.transition OnSite"]
    onsite = spans.get_finished_spans()[-1]
    assert onsite.end_time is not None
    assert onsite.start_time is not None
    assert (onsite.end_time - onsite.start_time) / 1e9 == 35 * 60
    parent_trace = {s.context.trace_id for s in spans.get_finished_spans() if s.context is not None}
    assert len(parent_trace) == 1
    # a restarted operator that knows (from status) two were recorded records only the third
    assert TransitionRecorder().record(incident, already_recorded=2) == 3
    assert [s.name for s in spans.get_finished_spans()][-1] == "incident.transition OnSite"
