"""Spans that follow a reading batch to an incident and through its lifecycle, across processes.

One trace: ``scenario`` → ``ingest`` → ``detect`` → ``incident.create`` (in the workload) →
``reconcile Incident`` → ``alert.deliver`` → the receiver's span (in the city operator and the
webhook's receiver) → ``incident.transition`` per lifecycle step. The context crosses processes
as a W3C ``traceparent``: in the Incident's annotations (`TRACEPARENT_ANNOTATION`) and in the
webhook's ``traceparent`` header.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from citynerve.models.incidents import IncidentEvent
from citynerve.observability.metrics import (
    ATTR_CITY,
    ATTR_DRILL,
    ATTR_ERROR_TYPE,
    ATTR_FROM_STATE,
    ATTR_HTTP_METHOD,
    ATTR_HTTP_STATUS,
    ATTR_INCIDENT_KIND,
    ATTR_OUTCOME,
    ATTR_QUARANTINE_REASON,
    ATTR_RESOURCE_KIND,
    ATTR_ROUTE,
    ATTR_SCENARIO_KIND,
    ATTR_SENSOR_TYPE,
    ATTR_SERVER_ADDRESS,
    ATTR_SEVERITY,
    ATTR_STATE,
    instruments,
)
from citynerve.observability.telemetry import enabled as telemetry_enabled
from citynerve.observability.telemetry import tracer
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT_ANNOTATION = "citynerve.io/traceparent"
TRACESTATE_ANNOTATION = "citynerve.io/tracestate"
TRACEPARENT_HEADER = "traceparent"
ATTR_K8S_NAMESPACE = "k8s.namespace.name"  # semantic convention
ATTR_RESOURCE_NAME = "citynerve.resource.name"

_PROPAGATOR = TraceContextTextMapPropagator()
_ANNOTATION_OF = {"traceparent": TRACEPARENT_ANNOTATION, "tracestate": TRACESTATE_ANNOTATION}


# ---- carrying the context ------------------------------------------------------------------------
def inject_traceparent(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """Annotations carrying the current span's context (empty when there is no recording span)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return {_ANNOTATION_OF[k]: v for k, v in carrier.items() if k in _ANNOTATION_OF}


def context_from_annotations(annotations: Mapping[str, str] | None) -> otel_context.Context | None:
    """The context an object's annotations carry, or None when they carry none (or a bad one)."""
    carrier = {k: (annotations or {}).get(v) for k, v in _ANNOTATION_OF.items()}
    present = {k: v for k, v in carrier.items() if v}
    if "traceparent" not in present:
        return None
    ctx = _PROPAGATOR.extract(present)
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def traceparent_header(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """HTTP headers carrying the current span's context (``traceparent``, ``tracestate``)."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier


def context_from_headers(headers: Mapping[str, str]) -> otel_context.Context:
    """A webhook receiver's parent context, from the request's headers (case-insensitive)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return _PROPAGATOR.extract(lowered)


def trace_id_hex(span: Span | None = None) -> str:
    """The current (or given) span's trace id as 32 hex digits, for logs and the situation map."""
    span = span or trace.get_current_span()
    return format(span.get_span_context().trace_id, "032x")


# ---- reconciles ----------------------------------------------------------------------------------
@contextmanager
def reconcile_span(
    kind: str, namespace: str | None, name: str, annotations: Mapping[str, str] | None = None,
) -> Iterator[Span]:
    """One reconcile of one object: a span, its duration and, when it raises, an error.

    Objects whose annotations carry a trace (Incidents) are reconciled inside that trace; other
    reconciles start their own. The outcome is ``success`` or ``error``; set another (for
    example ``noop`` when nothing was written) with ``span.set_attribute(ATTR_OUTCOME, ...)``.
    """
    parent = context_from_annotations(annotations)
    attributes: dict[str, Any] = {ATTR_RESOURCE_KIND: kind, ATTR_RESOURCE_NAME: name}
    if namespace:
        attributes[ATTR_K8S_NAMESPACE] = namespace
    started = time.perf_counter()
    outcome = "success"
    error_type: str | None = None
    with tracer().start_as_current_span(
        f"reconcile {kind}", context=parent, kind=SpanKind.INTERNAL, attributes=attributes,
        record_exception=True, set_status_on_exception=True,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            outcome, error_type = "error", type(exc).__qualname__
            span.set_attribute(ATTR_ERROR_TYPE, error_type)
            raise
        finally:
            recorded = getattr(span, "attributes", None) or {}
            outcome = str(recorded.get(ATTR_OUTCOME, outcome)) if error_type is None else outcome
            span.set_attribute(ATTR_OUTCOME, outcome)
            inst = instruments()
            inst.reconcile_duration.record(
                time.perf_counter() - started, {ATTR_RESOURCE_KIND: kind, ATTR_OUTCOME: outcome})
            if error_type is not None:
                inst.reconcile_errors.add(1, {ATTR_RESOURCE_KIND: kind, ATTR_ERROR_TYPE: error_type})


# ---- the workload: scenario, ingestion, detection, incident ---------------------------------------
@contextmanager
def scenario_span(kind: str, mode: str, name: str | None = None) -> Iterator[Span]:
    """The root of a workload run (a scenario's analytics)."""
    attributes: dict[str, Any] = {ATTR_SCENARIO_KIND: kind, "citynerve.scenario.mode": mode}
    if name:
        attributes["citynerve.scenario.name"] = name
    with tracer().start_as_current_span(f"scenario {kind}", attributes=attributes) as span:
        yield span


@contextmanager
def ingest_span(sensor_type: str, readings: int | None = None) -> Iterator[Span]:
    """Ingestion of one batch of readings (its counts go to `record_ingest`)."""
    attributes: dict[str, Any] = {ATTR_SENSOR_TYPE: sensor_type}
    if readings is not None:
        attributes["citynerve.ingest.batch_size"] = readings
    with tracer().start_as_current_span("ingest", attributes=attributes) as span:
        yield span


def record_ingest(
    sensor_type: str,
    readings: int,
    quarantined: Mapping[str, int] | None = None,
    duplicates: int = 0,
    lag_s: float | None = None,
) -> None:
    """Metrics of one ingested batch (per sensor type; quarantine per reason)."""
    inst = instruments()
    attrs = {ATTR_SENSOR_TYPE: sensor_type}
    if readings:
        inst.readings_ingested.add(readings, attrs)
    for reason, count in (quarantined or {}).items():
        if count:
            inst.readings_quarantined.add(
                count, {ATTR_SENSOR_TYPE: sensor_type, ATTR_QUARANTINE_REASON: reason})
    if duplicates:
        inst.readings_duplicate.add(duplicates, attrs)
    if lag_s is not None:
        inst.ingest_lag.record(max(lag_s, 0.0), attrs)


class IngestRecorder:
    """One pipeline's ingestion metrics, kept in plain integers per batch and recorded to the
    instruments at most every ``interval`` seconds (and on `flush`).

    Recording an instrument costs tens of microseconds; per batch that is a measurable share of
    ingesting a few thousand readings (bench/telemetry.py), per second it is nothing. The
    ingestion lag is sampled likewise: ``lag_s`` is called only for the batch that triggers a
    recording (it scans the batch's timestamps).
    """

    def __init__(self, sensor_type: str, interval: float = 1.0) -> None:
        self.sensor_type = sensor_type
        self.interval = interval
        self._readings = 0
        self._duplicates = 0
        self._quarantined: dict[str, int] = {}
        self._last = -float("inf")

    def add(
        self, readings: int, quarantined: Mapping[str, int] | None = None, duplicates: int = 0,
        lag_s: Callable[[], float | None] | None = None,
    ) -> None:
        self._readings += readings
        self._duplicates += duplicates
        for reason, count in (quarantined or {}).items():
            if count:
                self._quarantined[reason] = self._quarantined.get(reason, 0) + count
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.flush(lag_s() if lag_s is not None and telemetry_enabled() else None)

    def flush(self, lag_s: float | None = None) -> None:
        if self._readings or self._quarantined or self._duplicates or lag_s is not None:
            record_ingest(self.sensor_type, self._readings, self._quarantined, self._duplicates, lag_s)
        self._readings = self._duplicates = 0
        self._quarantined = {}


_detection_started: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "citynerve_detection_started", default=None)


@contextmanager
def detection_span(kind: str, detector: str | None = None) -> Iterator[Span]:
    """A detector scoring a window; incidents it emits meanwhile measure their latency from its start."""
    attributes: dict[str, Any] = {ATTR_SCENARIO_KIND: kind}
    if detector:
        attributes["citynerve.detector"] = detector
    token = _detection_started.set(time.perf_counter())
    try:
        with tracer().start_as_current_span("detect", attributes=attributes) as span:
            yield span
    finally:
        _detection_started.reset(token)


def record_detection(event: IncidentEvent) -> None:
    """Detection latency (wall time since `detection_span` began) and, in drills, the delay from onset."""
    inst = instruments()
    attrs = {ATTR_SCENARIO_KIND: event.kind, ATTR_SEVERITY: event.severity}
    started = _detection_started.get()
    if started is not None:
        inst.detection_latency.record(time.perf_counter() - started, attrs)
    if event.onset_s is not None:
        inst.detection_delay.record(max(event.detected_at_s - event.onset_s, 0.0), attrs)


@contextmanager
def incident_span(
    event: IncidentEvent, *, city: str | None = None, name: str | None = None, namespace: str | None = None,
) -> Iterator[dict[str, str]]:
    """Turning one detection into an Incident: a child of the current (detection) span.

    Yields the annotations to put on the Incident so that the city operator's reconciles and
    the webhook continue this trace; counts the incident by kind and severity::

        with incident_span(event, city=city, name=manifest_name) as annotations:
            manifest["metadata"].setdefault("annotations", {}).update(annotations)
            create(manifest)
    """
    attributes: dict[str, Any] = {
        ATTR_INCIDENT_KIND: event.kind,
        ATTR_SEVERITY: event.severity,
        "citynerve.incident.asset": event.location.asset_id,
        "citynerve.incident.detected_at_s": float(event.detected_at_s),
    }
    if city:
        attributes[ATTR_CITY] = city
    if name:
        attributes[ATTR_RESOURCE_NAME] = name
    if namespace:
        attributes[ATTR_K8S_NAMESPACE] = namespace
    with tracer().start_as_current_span("incident.create", attributes=attributes) as span:
        counted: dict[str, str] = {ATTR_INCIDENT_KIND: event.kind, ATTR_SEVERITY: event.severity}
        if city:
            counted[ATTR_CITY] = city
        instruments().incidents_created.add(1, counted)
        yield inject_traceparent(None if span.get_span_context().is_valid else _fresh_trace())
        span.set_status(Status(StatusCode.OK))


def _fresh_trace() -> otel_context.Context:
    """A new trace for an Incident raised where no trace is recorded (telemetry off in the workload).

    The Incident still carries a ``traceparent``, so the city operator's reconciles and webhooks of
    that Incident share one trace id (and record it, if their telemetry is on: the sampled flag is
    set because the decision to record is theirs). Its parent span is never exported.
    """
    ids = RandomIdGenerator()
    parent = SpanContext(ids.generate_trace_id(), ids.generate_span_id(), is_remote=False,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(parent))


# ---- the city operator: webhooks and lifecycle ----------------------------------------------------
@contextmanager
def webhook_span(route: str, url: str, state: str, method: str = "POST") -> Iterator[dict[str, str]]:
    """One webhook delivery (client span). Yields the headers to add (``traceparent``)::

        with webhook_span(route["name"], route["url"], delivery.state) as headers:
            post_alert(..., extra_headers=headers)

    Raising inside marks the delivery failed; an ``httpx.HTTPStatusError``'s status is recorded.
    """
    from urllib.parse import urlsplit  # noqa: PLC0415

    host = urlsplit(url).hostname or ""
    attributes: dict[str, Any] = {
        ATTR_HTTP_METHOD: method, "url.full": url, ATTR_SERVER_ADDRESS: host,
        ATTR_ROUTE: route, ATTR_STATE: state,
    }
    started = time.perf_counter()
    outcome, status_code = "delivered", None
    with tracer().start_as_current_span(
        "alert.deliver", kind=SpanKind.CLIENT, attributes=attributes,
    ) as span:
        try:
            yield traceparent_header()
        except BaseException as exc:
            outcome = "failed"
            span.set_attribute(ATTR_ERROR_TYPE, type(exc).__qualname__)
            response = getattr(exc, "response", None)
            status_code = getattr(response, "status_code", None)
            raise
        finally:
            span.set_attribute(ATTR_OUTCOME, outcome)
            http_attrs: dict[str, Any] = {ATTR_HTTP_METHOD: method, ATTR_SERVER_ADDRESS: host}
            if status_code is not None:
                span.set_attribute(ATTR_HTTP_STATUS, int(status_code))
                http_attrs[ATTR_HTTP_STATUS] = int(status_code)
            inst = instruments()
            inst.http_client_duration.record(time.perf_counter() - started, http_attrs)
            inst.alert_deliveries.add(1, {ATTR_ROUTE: route, ATTR_OUTCOME: outcome})


@contextmanager
def webhook_receiver_span(headers: Mapping[str, str], name: str = "alert.receive") -> Iterator[Span]:
    """The receiving side of a webhook (a server span continuing the sender's trace)."""
    with tracer().start_as_current_span(
        name, context=context_from_headers(headers), kind=SpanKind.SERVER,
    ) as span:
        yield span


def _parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


class TransitionRecorder:
    """Records each lifecycle transition of an Incident once: a span in the incident's trace
    (timed from the previous transition to this one) and the response time since Detected.

    It remembers, per Incident uid, how many transitions it has recorded. A restarted operator
    starts from ``already_recorded`` (pass what the object's status says, when it keeps it) or
    else records only the transitions it has not seen in this process.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}

    def record(self, incident: Mapping[str, Any], already_recorded: int | None = None) -> int:
        """Record the new transitions of ``incident``; returns how many it has recorded in all."""
        meta = incident.get("metadata") or {}
        spec = incident.get("spec") or {}
        key = str(meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}")
        transitions = list(spec.get("transitions") or [])
        with self._lock:
            start = self._seen.get(key, already_recorded if already_recorded is not None else 0)
            self._seen[key] = len(transitions)
        if start >= len(transitions):
            return len(transitions)
        parent = context_from_annotations(meta.get("annotations"))
        detected = _parse_time(spec.get("detectedAt")) or _parse_time(transitions[0].get("time"))
        kind, severity = str(spec.get("kind", "unknown")), str(spec.get("severity", "unknown"))
        inst = instruments()
        for index in range(start, len(transitions)):
            step = transitions[index]
            state = str(step.get("state", "unknown"))
            previous = str(transitions[index - 1].get("state")) if index else ""
            at = _parse_time(step.get("time"))
            before = _parse_time(transitions[index - 1].get("time")) if index else at
            attrs: dict[str, Any] = {
                ATTR_INCIDENT_KIND: kind, ATTR_SEVERITY: severity, ATTR_STATE: state,
                ATTR_DRILL: bool(spec.get("drill", False)),
            }
            if previous:
                attrs[ATTR_FROM_STATE] = previous
            if step.get("actor"):
                attrs["citynerve.incident.actor"] = str(step["actor"])
            start_ns = int(before.timestamp() * 1e9) if before else None
            end_ns = int(at.timestamp() * 1e9) if at else None
            span = tracer().start_span(
                f"incident.transition {state}", context=parent, attributes=attrs, start_time=start_ns)
            span.end(end_time=end_ns if end_ns is not None and (start_ns is None or end_ns >= start_ns)
                     else None)
            counted = {ATTR_INCIDENT_KIND: kind, ATTR_SEVERITY: severity, ATTR_STATE: state}
            inst.incident_transitions.add(1, counted)
            if index and detected is not None and at is not None:
                inst.incident_response_time.record(
                    max((at - detected).total_seconds(), 0.0), {**counted, ATTR_FROM_STATE: "Detected"})
        return len(transitions)


_recorder = TransitionRecorder()


def record_incident_transitions(incident: Mapping[str, Any], already_recorded: int | None = None) -> int:
    """`TransitionRecorder.record` on the process's one recorder (what the city operator calls)."""
    return _recorder.record(incident, already_recorded)


# ---- federation -----------------------------------------------------------------------------------
PROPAGATED_AT_ANNOTATION = "citynerve.io/propagated-at"


def propagation_stamp(now: float | None = None) -> dict[str, str]:
    """An annotation with the hub's write time (epoch seconds), for the city's agent to measure."""
    return {PROPAGATED_AT_ANNOTATION: f"{time.time() if now is None else now:.6f}"}


def record_propagation(
    city: str, annotations: Mapping[str, str] | None, now: float | None = None,
) -> float | None:
    """Hub → city propagation latency of one work item, from its `propagation_stamp`; returns it."""
    raw = (annotations or {}).get(PROPAGATED_AT_ANNOTATION)
    if not raw:
        return None
    try:
        written = float(raw)
    except ValueError:
        return None
    latency = max((time.time() if now is None else now) - written, 0.0)
    instruments().propagation_latency.record(latency, {ATTR_CITY: city})
    return latency

