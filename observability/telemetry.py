"""`configure_telemetry`: the one OpenTelemetry set-up every CityNerve process calls at start.

    telemetry = configure_telemetry("citynerve-city-operator", city="chengdu", cluster="chengdu")
    ...
    telemetry.shutdown()   # flushes spans; stops the scrape endpoint

What it turns on, each from an argument or else from the standard environment:

- everything off (no-op): ``enabled=False`` or ``OTEL_SDK_DISABLED=true``;
- service name: ``service_name``, or ``OTEL_SERVICE_NAME``, which wins (as the specification says);
- resource attributes: ``city``, ``cluster`` (``k8s.cluster.name``), plus ``OTEL_RESOURCE_ATTRIBUTES``;
- OTLP/HTTP export of spans and metrics: ``otlp_endpoint``, or ``OTEL_EXPORTER_OTLP_ENDPOINT`` (and
  its ``_TRACES_``/``_METRICS_`` variants, ``_HEADERS``, ``_TIMEOUT``, read by the exporters);
- which exporters: ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` = ``otlp``, ``console``, ``none``;
- a Prometheus scrape endpoint: ``prometheus_port`` (0: any free port), or
  ``CITYNERVE_PROMETHEUS_PORT``; it listens on ``CITYNERVE_PROMETHEUS_ADDRESS`` (default 127.0.0.1);
- sampling: ``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``.

Tests pass ``span_exporter`` (an in-memory exporter, spans exported synchronously) and read
metrics through ``prometheus_port=0`` or ``metric_readers``.

Calling it again replaces the previous set-up (after shutting it down): the tracer and the
instruments CityNerve uses come from this module, not from OpenTelemetry's set-once globals.
The globals are set on the first enabled configuration, for libraries that use them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from citynerve.observability import metrics
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import NoOpTracerProvider, Tracer
from prometheus_client import CollectorRegistry

TRACER_NAME = "citynerve"
ATTR_CLUSTER = "k8s.cluster.name"  # semantic convention
ENV_PROMETHEUS_PORT = "CITYNERVE_PROMETHEUS_PORT"
ENV_PROMETHEUS_ADDRESS = "CITYNERVE_PROMETHEUS_ADDRESS"

_TRUE = ("1", "true", "yes", "on")


@dataclass
class Telemetry:
    """What `configure_telemetry` set up; `shutdown` flushes and stops it."""

    service_name: str
    enabled: bool
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    prometheus_registry: CollectorRegistry | None = None
    prometheus_port: int | None = None
    otlp_endpoint: str | None = None
    _server: Any = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def prometheus_url(self) -> str | None:
        if self.prometheus_port is None:
            return None
        host = os.environ.get(ENV_PROMETHEUS_ADDRESS, "127.0.0.1")
        return f"http://{'127.0.0.1' if host in ('', '0.0.0.0') else host}:{self.prometheus_port}/metrics"  # noqa: S104

    def force_flush(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()
        if self.meter_provider is not None:
            self.meter_provider.force_flush()

    def shutdown(self) -> None:
        """Flush and stop; a second call does nothing."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
            self.tracer_provider = None
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
            self.meter_provider = None


_lock = threading.Lock()
_active: Telemetry | None = None
_tracer: Tracer = NoOpTracerProvider().get_tracer(TRACER_NAME)


def tracer() -> Tracer:
    """The tracer of the current configuration (a no-op tracer when telemetry is off)."""
    return _tracer


def active() -> Telemetry | None:
    return _active


def enabled() -> bool:
    """Whether telemetry is on (lets callers skip work, such as a scan, that only feeds it)."""
    return _active is not None and _active.enabled


def configure_telemetry(
    service_name: str,
    *,
    city: str | None = None,
    cluster: str | None = None,
    enabled: bool | None = None,
    otlp_endpoint: str | None = None,
    prometheus_port: int | None = None,
    span_exporter: SpanExporter | None = None,
    metric_readers: Sequence[MetricReader] = (),
    attributes: dict[str, str] | None = None,
) -> Telemetry:
    """Set up tracing and metrics for this process (see the module docstring for the knobs)."""
    global _active, _tracer  # noqa: PLW0603 - the process's one telemetry set-up
    with _lock:
        if _active is not None:
            _active.shutdown()
            _active = None
        if enabled is None:
            enabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() not in _TRUE
        if not enabled:
            _tracer = NoOpTracerProvider().get_tracer(TRACER_NAME)
            metrics.install(otel_metrics.NoOpMeterProvider().get_meter(metrics.METER_NAME))
            _active = Telemetry(service_name, enabled=False)
            return _active

        resource = build_resource(service_name, city=city, cluster=cluster, attributes=attributes)
        endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
        telemetry = Telemetry(service_name, enabled=True, otlp_endpoint=endpoint)

        tracer_provider = TracerProvider(resource=resource)
        if span_exporter is not None:
            tracer_provider.add_span_processor(SimpleSpanProcessor(span_exporter))
        for exporter in _span_exporters(otlp_endpoint):
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        telemetry.tracer_provider = tracer_provider

        readers = list(metric_readers) + _metric_readers(otlp_endpoint)
        if prometheus_port is None and os.environ.get(ENV_PROMETHEUS_PORT):
            prometheus_port = int(os.environ[ENV_PROMETHEUS_PORT])
        if prometheus_port is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: PLC0415

            registry = CollectorRegistry(auto_describe=True)
            readers.append(PrometheusMetricReader(registry=registry))
            telemetry.prometheus_registry = registry
            telemetry._server, telemetry._thread = _serve_prometheus(registry, prometheus_port)
            telemetry.prometheus_port = int(telemetry._server.server_port)
        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        telemetry.meter_provider = meter_provider

        _tracer = tracer_provider.get_tracer(TRACER_NAME)
        metrics.install(meter_provider.get_meter(metrics.METER_NAME))
        _set_globals_once(tracer_provider, meter_provider)
        _active = telemetry
        return telemetry


def shutdown_telemetry() -> None:
    """Flush and stop the current configuration; CityNerve's tracer and instruments become no-ops."""
    configure_telemetry("citynerve", enabled=False)


def build_resource(
    service_name: str, *, city: str | None = None, cluster: str | None = None,
    attributes: dict[str, str] | None = None,
) -> Resource:
    """Service, city and cluster; ``OTEL_RESOURCE_ATTRIBUTES``/``OTEL_SERVICE_NAME`` win (merged last)."""
    attrs: dict[str, str] = {SERVICE_NAME: service_name, "service.namespace": "citynerve"}
    if city:
        attrs[metrics.ATTR_CITY] = city
    if cluster:
        attrs[ATTR_CLUSTER] = cluster
    attrs.update(attributes or {})
    base = Resource(attrs)
    # Resource.create reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; without them it
    # would default service.name to "unknown_service", so only its environment part is kept.
    from_env = Resource.create({})
    env_attrs = {k: v for k, v in from_env.attributes.items()
                 if not (k == SERVICE_NAME and not os.environ.get("OTEL_SERVICE_NAME"))}
    return base.merge(Resource(env_attrs))


def _exporter_names(variable: str) -> list[str]:
    raw = os.environ.get(variable, "otlp")
    return [n.strip().lower() for n in raw.split(",") if n.strip()]


def _span_exporters(endpoint: str | None) -> list[SpanExporter]:
    exporters: list[SpanExporter] = []
    names = _exporter_names("OTEL_TRACES_EXPORTER")
    has_endpoint = bool(endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    if "otlp" in names and has_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        exporters.append(OTLPSpanExporter(endpoint=_signal_url(endpoint, "traces")))
    if "console" in names:
        exporters.append(ConsoleSpanExporter())
    return exporters


def _metric_readers(endpoint: str | None) -> list[MetricReader]:
    readers: list[MetricReader] = []
    names = _exporter_names("OTEL_METRICS_EXPORTER")
    has_endpoint = bool(endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                        or os.environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
    if "otlp" in names and has_endpoint:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter  # noqa: PLC0415

        exporter = OTLPMetricExporter(endpoint=_signal_url(endpoint, "metrics"))
        readers.append(PeriodicExportingMetricReader(exporter))
    if "console" in names:
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    return readers


def _signal_url(endpoint: str | None, signal: str) -> str | None:
    """An explicit endpoint is a base URL, like OTEL_EXPORTER_OTLP_ENDPOINT; None lets the exporter read
    the environment (including the per-signal variables)."""
    if endpoint is None:
        return None
    return endpoint.rstrip("/") + f"/v1/{signal}"


def _serve_prometheus(registry: CollectorRegistry, port: int) -> tuple[Any, threading.Thread]:
    from prometheus_client import start_http_server  # noqa: PLC0415

    address = os.environ.get(ENV_PROMETHEUS_ADDRESS, "127.0.0.1")
    server, thread = start_http_server(port, addr=address, registry=registry)
    return server, thread


_globals_set = False


def _set_globals_once(tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
    """OpenTelemetry's globals may be set once per process; libraries that use them get the first."""
    global _globals_set  # noqa: PLW0603
    if not _globals_set:
        otel_trace.set_tracer_provider(tracer_provider)
        otel_metrics.set_meter_provider(meter_provider)
        _globals_set = True
