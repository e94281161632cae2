"""The Prometheus endpoint and the dashboards: exercise every instrument through the code that
records it, scrape the endpoint, and check names, labels and every dashboard query against it."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from threading import Thread
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pytest
from citynerve.models.incidents import IncidentEvent, IncidentLocation
from citynerve.observability import grafana
from citynerve.observability import metrics as m
from citynerve.observability.telemetry import Telemetry, configure_telemetry, shutdown_telemetry
from citynerve.observability.tracing import (
    TransitionRecorder,
    detection_span,
    incident_span,
    propagation_stamp,
    reconcile_span,
    record_detection,
    record_propagation,
    webhook_span,
)
from citynerve.workloads.ingest.pipeline import IngestPipeline
from citynerve.workloads.ingest.sensor_type import CATALOGUE
from citynerve.workloads.sim.readings import READING_SCHEMA

NOW_MS = 1_782_000_000_000
Exposition = dict[str, list[dict[str, str]]]  # sample name -> label sets


class _Ok(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(204 if self.path == "/ok" else 500)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        return


def _batch(values: list[float], ts_offsets_s: list[float]) -> pa.RecordBatch:
    n = len(values)
    sensor = pa.array([f"logger-{i % 3}" for i in range(n)]).dictionary_encode()
    prop = pa.array(["pressure"] * n).dictionary_encode()
    ts = pa.array([NOW_MS + int(s * 1000) for s in ts_offsets_s], pa.int64())
    value = pa.array(values, pa.float64())
    return pa.RecordBatch.from_arrays([sensor, prop, ts, value], schema=READING_SCHEMA)


def exercise_everything() -> None:
    """Drive each instrument through the code path that records it in the running system."""
    pipeline = IngestPipeline(CATALOGUE["water-pressure-logger"])
    pipeline.ingest_batch(_batch([40.0, 41.0, 1e6, 40.5, float("nan")], [-30, -20, -10, -5, -1]), NOW_MS)
    pipeline.ingest_batch(_batch([40.0], [-30]), NOW_MS)  # a retransmission: a duplicate
    pipeline.flush()  # records what the last second's batches counted

    event = IncidentEvent("water-burst", IncidentLocation("206"), "critical", 38700.0, onset_s=36000.0)
    with detection_span("water-burst", "WaterLeakDetector"):
        record_detection(event)
        with incident_span(event, city="shanghai", name="burst-1", namespace="citynerve") as annotations:
            pass
    with reconcile_span("Scenario", "citynerve", "water"):
        pass
    with pytest.raises(RuntimeError), reconcile_span("Scenario", "citynerve", "broken"):
        raise RuntimeError("boom")

    server = HTTPServer(("127.0.0.1", 0), _Ok)
    Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with webhook_span("duty-officers", f"{url}/ok", "Detected") as headers:
            httpx.post(f"{url}/ok", content=b"{}", headers=headers).raise_for_status()
        with (pytest.raises(httpx.HTTPStatusError),
              webhook_span("flaky", f"{url}/fail", "Detected") as headers):
            httpx.post(f"{url}/fail", content=b"{}", headers=headers).raise_for_status()
    finally:
        server.shutdown()
        server.server_close()

    incident = {
        "metadata": {"uid": "u-1", "namespace": "citynerve", "name": "burst-1", "annotations": annotations},
        "spec": {"kind": "water-burst", "severity": "critical", "state": "Dispatched", "drill": True,
                 "detectedAt": "2026-11-25T03:00:00Z",
                 "transitions": [{"state": "Detected", "time": "2026-11-25T03:00:00Z", "actor": "scenario/w"},
                                 {"state": "Dispatched", "time": "2026-11-25T03:04:00Z", "actor": "duty"}]},
    }
    TransitionRecorder().record(incident)
    m.record_incident_counts([incident], city="shanghai")
    m.record_city_health("shanghai", reachable=True, ready=True, sensors_online=120, open_incidents=1,
                         heartbeat_age_s=1.5)
    m.record_city_health("chengdu", reachable=False, ready=False)
    record_propagation("shanghai", propagation_stamp(now=1000.0), now=1000.25)


def scrape(telemetry: Telemetry) -> Exposition:
    assert telemetry.prometheus_url is not None
    with urllib.request.urlopen(telemetry.prometheus_url, timeout=10) as response:  # noqa: S310 - local
        text = response.read().decode()
    samples: Exposition = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s", line)
        assert match, line
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(3) or ""))
        samples.setdefault(match.group(1), []).append(labels)
    return samples


@pytest.fixture(scope="module")
def exposition() -> Iterator[Exposition]:
    telemetry = configure_telemetry("citynerve-test", city="shanghai", cluster="shanghai", prometheus_port=0)
    try:
        exercise_everything()
        yield scrape(telemetry)
    finally:
        shutdown_telemetry()


def _family(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


@pytest.mark.timeout(60)
def test_every_instrument_is_exposed_under_its_prometheus_name(exposition: Exposition) -> None:
    families = {_family(n) for n in exposition}
    missing = [m.prometheus_name(name) for name in m.INSTRUMENTS if m.prometheus_name(name) not in families]
    assert not missing


@pytest.mark.timeout(60)
def test_metrics_carry_the_labels_dashboards_group_by(exposition: Exposition) -> None:
    def labels(name: str) -> list[dict[str, str]]:
        return exposition[m.prometheus_name(name)]

    ingested = labels(m.READINGS_INGESTED)
    assert ingested[0]["citynerve_sensor_type"] == "water-pressure-logger"
    quarantined = {(s["citynerve_sensor_type"], s["citynerve_quarantine_reason"]) for s in
                   labels(m.READINGS_QUARANTINED)}
    assert quarantined == {("water-pressure-logger", "out-of-range"),
                           ("water-pressure-logger", "missing-value")}
    assert [s["citynerve_sensor_type"] for s in labels(m.READINGS_DUPLICATE)] == ["water-pressure-logger"]
    created = labels(m.INCIDENTS_CREATED)[0]
    assert (created["citynerve_incident_kind"], created["citynerve_incident_severity"]) == (
        "water-burst", "critical")
    current = labels(m.INCIDENTS_CURRENT)[0]
    assert current["citynerve_incident_state"] == "Dispatched"
    reconcile = {(s["citynerve_resource_kind"], s["citynerve_outcome"])
                 for s in exposition[m.prometheus_name(m.RECONCILE_DURATION) + "_count"]}
    assert reconcile == {("Scenario", "success"), ("Scenario", "error")}
    errors = labels(m.RECONCILE_ERRORS)[0]
    assert (errors["citynerve_resource_kind"], errors["error_type"]) == ("Scenario", "RuntimeError")
    deliveries = {(s["citynerve_alert_route"], s["citynerve_outcome"]) for s in labels(m.ALERT_DELIVERIES)}
    assert deliveries == {("duty-officers", "delivered"), ("flaky", "failed")}
    statuses = {s.get("http_response_status_code")
                for s in exposition[m.prometheus_name(m.HTTP_CLIENT_DURATION) + "_count"]}
    assert "500" in statuses
    response = exposition[m.prometheus_name(m.INCIDENT_RESPONSE_TIME) + "_count"]
    assert {s["citynerve_incident_state"] for s in response} == {"Dispatched"}
    reachable = {s["citynerve_city"] for s in labels(m.CITY_REACHABLE)}
    assert reachable == {"shanghai", "chengdu"}
    assert {s["citynerve_city"] for s in exposition[m.prometheus_name(m.PROPAGATION_LATENCY) + "_count"]} == {
        "shanghai"}
    target = exposition["target_info"][0]
    assert (target["service_name"], target["citynerve_city"], target["k8s_cluster_name"]) == (
        "citynerve-test", "shanghai", "shanghai")


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                 "unless", "offset"}


def query_metrics(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression refers to."""
    text = re.sub(r'"[^"]*"', '""', expr)
    text = re.sub(r"\[[^\]]*\]", "", text)
    label_names: set[str] = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        label_names |= {g.strip() for g in group.split(",") if g.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", text)
    for selector in re.findall(r"\{([^}]*)\}", text):
        label_names |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*[!=]~?", selector))
    text = re.sub(r"\{[^}]*\}", "", text)
    names = {tok for tok in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text)
             if tok not in _PROMQL_WORDS}
    return names, label_names


def test_query_parser_finds_metrics_and_labels() -> None:
    names, labels = query_metrics(
        'histogram_quantile(0.9, sum by (le, city) (rate(a_bucket{x="1"}[5m]))) + b_total')
    assert names == {"a_bucket", "b_total"}
    assert labels == {"le", "city", "x"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(grafana.BUILDERS))
def test_every_dashboard_query_names_exported_metrics_and_labels(name: str, exposition: Exposition) -> None:
    dashboard = json.loads((grafana.DASHBOARDS / name).read_text(encoding="utf-8"))
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names, labels = query_metrics(target["expr"])
            assert names, f"{name}: panel {panel['title']!r} names no metric"
            unknown = names - set(exposition)
            assert not unknown, f"{name}: panel {panel['title']!r} queries {unknown}, which nothing exports"
            exported_labels = {label for n in names for sample in exposition[n] for label in sample}
            missing = labels - exported_labels - {"le"}
            assert not missing, f"{name}: panel {panel['title']!r} groups by {missing}, which {names} lack"


def test_dashboard_files_match_their_builders() -> None:
    assert grafana.main(["--check"]) == 0


def test_histograms_keep_sensible_buckets(exposition: Exposition) -> None:
    buckets = {float(s["le"]) for s in exposition[m.prometheus_name(m.INCIDENT_RESPONSE_TIME) + "_bucket"]
               if s["le"] != "+Inf"}
    assert 2400.0 in buckets  # the 40-minute response the water network is held to
    assert np.isfinite(max(buckets))
