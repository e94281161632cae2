"""A drill water burst's trace, exported over OTLP/HTTP to a local receiver, across a real API server.

The workload creates the Incident in the Shanghai cluster with the trace context in its
annotations; the reconcile (done here with the helpers the city operator calls) reads the
Incident back from the API server, continues the trace, sends the webhook with a
``traceparent`` header, and follows the lifecycle as the duty officer moves it on.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

import httpx
import pytest
from citynerve.models.incidents import IncidentEvent
from citynerve.observability.otlp_receiver import LocalOtlpReceiver
from citynerve.observability.telemetry import configure_telemetry, shutdown_telemetry
from citynerve.observability.tracing import (
    TRACEPARENT_ANNOTATION,
    incident_span,
    reconcile_span,
    record_incident_transitions,
    webhook_receiver_span,
    webhook_span,
)
from citynerve.workloads.runner import run_scenario
from kubernetes import client

pytestmark = pytest.mark.e2e
GROUP, VERSION = "citynerve.io", "v1alpha1"
WATER_DRILL = {
    "kind": "water-burst",
    "mode": "drill",
    "simulation": {"network": "Net3", "leaks": [{"node": "207", "area_m2": 0.01, "start_s": 36000}]},
}


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        with webhook_receiver_span(dict(self.headers.items())):
            self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        return


@pytest.fixture
def webhook_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    finally:
        server.shutdown()
        server.server_close()


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def incident_manifest(event: IncidentEvent, namespace: str, annotations: dict[str, str]) -> dict[str, Any]:
    now = rfc3339(datetime.now(UTC))
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Incident",
        "metadata": {"name": f"water-{event.location.asset_id}", "namespace": namespace,
                     "annotations": annotations},
        "spec": {
            "scenarioRef": {"name": "water-drill"}, "kind": event.kind, "severity": event.severity,
            "drill": True, "evidence": [], "detectedAt": now, "state": "Detected",
            "location": {"latitude": "31.2304", "longitude": "121.4737", "assetId": event.location.asset_id},
            "transitions": [{"state": "Detected", "time": now, "actor": "scenario/water-drill"}],
        },
    }


@pytest.mark.timeout(170)
def test_drill_trace_reaches_the_otlp_receiver_across_the_api_server(
    federation: Any, namespace: str, local_ray: None, webhook_url: str,
) -> None:
    custom = client.CustomObjectsApi(federation.api_client("shanghai"))
    receiver = LocalOtlpReceiver().start()
    telemetry = configure_telemetry("citynerve-city", city="shanghai", cluster="shanghai",
                                    otlp_endpoint=receiver.endpoint)
    created: list[str] = []
    try:
        def job_sink(event: IncidentEvent) -> None:  # the scenario's job
            with incident_span(event, city="shanghai", namespace=namespace) as annotations:
                manifest = incident_manifest(event, namespace, annotations)
                custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "incidents", manifest)
                created.append(manifest["metadata"]["name"])

        run_scenario(WATER_DRILL, job_sink)
        assert created
        name = created[0]

        def reconcile(state: str) -> None:  # the city operator's Incident reconcile
            incident = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "incidents", name)
            annotations = incident["metadata"].get("annotations") or {}
            assert TRACEPARENT_ANNOTATION in annotations
            with reconcile_span("Incident", namespace, name, annotations):
                with webhook_span("duty-officers", webhook_url, state) as headers:
                    response = httpx.post(webhook_url, json={"state": state}, headers=headers, timeout=10)
                    response.raise_for_status()
                record_incident_transitions(incident)

        reconcile("Detected")
        later = rfc3339(datetime.now(UTC) + timedelta(seconds=1))
        incident = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "incidents", name)
        custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "incidents", name, {"spec": {
            "state": "Dispatched",
            "transitions": [*incident["spec"]["transitions"],
                            {"state": "Dispatched", "time": later, "actor": "duty-officer"}]}})
        reconcile("Dispatched")
        telemetry.force_flush()
    finally:
        shutdown_telemetry()
        receiver.stop()

    spans = receiver.spans
    names = {s.name for s in spans}
    for expected in ("scenario water-burst", "ingest", "detect", "incident.create", "reconcile Incident",
                     "alert.deliver", "alert.receive", "incident.transition Detected",
                     "incident.transition Dispatched"):
        assert expected in names, f"the receiver got no {expected!r} span: {sorted(names)}"
    assert len({s.trace_id for s in spans}) == 1
    by_id = {s.span_id: s for s in spans}
    reconciles = [s for s in spans if s.name == "reconcile Incident"]
    assert all(by_id[s.parent_span_id].name == "incident.create" for s in reconciles)
    assert spans[0].resource["service.name"] == "citynerve-city"
    assert spans[0].resource["citynerve.city"] == "shanghai"
