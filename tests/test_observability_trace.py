"""A drill water burst makes one trace: ingestion → detection → incident → reconcile → webhook → lifecycle.

The scenario runs through `workloads/runner.py`; the sink does what the city's job and operator do
with the observability helpers (the Incident lives in memory here; e2e/test_observability_otlp.py
writes it to a real API server and exports through OTLP).
"""

from __future__ import annotations

from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

import httpx
import pytest
from citynerve.models.incidents import IncidentEvent
from citynerve.observability.telemetry import configure_telemetry, shutdown_telemetry
from citynerve.observability.tracing import (
    incident_span,
    reconcile_span,
    record_incident_transitions,
    webhook_receiver_span,
    webhook_span,
)
from citynerve.workloads.runner import run_scenario
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

WATER_DRILL = {
    "kind": "water-burst",
    "mode": "drill",
    "fleets": ["net3-pressure"],
    "models": ["leak-cusum"],
    "simulation": {"network": "Net3", "leaks": [{"node": "207", "area_m2": 0.01, "start_s": 36000}]},
}


class WebhookReceiver(BaseHTTPRequestHandler):
    """The duty officers' endpoint: continues the sender's trace in a server span."""

    def do_POST(self) -> None:
        with webhook_receiver_span(dict(self.headers.items())):
            self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        return


@pytest.fixture
def webhook_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), WebhookReceiver)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    finally:
        server.shutdown()
        server.server_close()


def incident_sink(url: str, incidents: list[dict[str, Any]]) -> Any:
    """What the scenario's job (create the Incident) and the city operator (reconcile, alert,
    follow the lifecycle) do, in one place."""

    def sink(event: IncidentEvent) -> None:
        name = f"water-{event.location.asset_id}"
        with incident_span(event, city="shanghai", name=name, namespace="citynerve") as annotations:
            incident: dict[str, Any] = {"metadata": {"uid": name, "namespace": "citynerve", "name": name,
                                     "annotations": annotations},
                        "spec": {"kind": event.kind, "severity": event.severity, "state": "Detected",
                                 "detectedAt": "2026-11-25T03:00:00Z",
                                 "transitions": [{"state": "Detected", "time": "2026-11-25T03:00:00Z"}]}}
        with reconcile_span("Incident", "citynerve", name, annotations):
            with webhook_span("duty-officers", url, "Detected") as headers:
                httpx.post(url, json={"incident": name}, headers=headers, timeout=10).raise_for_status()
            record_incident_transitions(incident)
        for state, time in (("Dispatched", "03:06:00"), ("OnSite", "03:31:00"), ("Resolved", "04:10:00")):
            incident["spec"]["transitions"].append({"state": state, "time": f"2026-11-25T{time}Z"})
            with reconcile_span("Incident", "citynerve", name, annotations):
                record_incident_transitions(incident)
        incidents.append(incident)

    return sink


def parent_name(span: ReadableSpan, spans: list[ReadableSpan]) -> str | None:
    if span.parent is None:
        return None
    by_id = {s.context.span_id: s.name for s in spans if s.context is not None}
    return by_id.get(span.parent.span_id)


@pytest.mark.timeout(240)
def test_a_drill_water_burst_is_one_trace(ray_local: None, webhook_url: str) -> None:
    exporter = InMemorySpanExporter()
    configure_telemetry("citynerve-test", city="shanghai", span_exporter=exporter)
    try:
        incidents: list[dict[str, Any]] = []
        summary = run_scenario(WATER_DRILL, incident_sink(webhook_url, incidents))
    finally:
        shutdown_telemetry()
    assert summary["incidents"] == len(incidents) >= 1
    spans = list(exporter.get_finished_spans())
    names = [s.name for s in spans]
    for expected in ("scenario water-burst", "ingest", "detect", "incident.create", "reconcile Incident",
                     "alert.deliver", "alert.receive", "incident.transition Detected",
                     "incident.transition Dispatched", "incident.transition OnSite",
                     "incident.transition Resolved"):
        assert expected in names, f"no {expected!r} span in {sorted(set(names))}"
    assert len({s.context.trace_id for s in spans if s.context is not None}) == 1, "more than one trace"
    first = {s.name: s for s in reversed(spans)}  # the first span of each name
    assert parent_name(first["scenario water-burst"], spans) is None
    assert parent_name(first["ingest"], spans) == "scenario water-burst"
    assert parent_name(first["detect"], spans) == "scenario water-burst"
    assert parent_name(first["incident.create"], spans) == "detect"
    assert parent_name(first["reconcile Incident"], spans) == "incident.create"
    assert parent_name(first["alert.deliver"], spans) == "reconcile Incident"
    assert parent_name(first["alert.receive"], spans) == "alert.deliver"
    assert parent_name(first["incident.transition Resolved"], spans) == "incident.create"
    ingest = first["ingest"]
    assert ingest.attributes is not None
    assert ingest.attributes["citynerve.sensor_type"] == "water-pressure-logger"
    assert int(str(ingest.attributes["citynerve.ingest.batch_size"])) > 0
