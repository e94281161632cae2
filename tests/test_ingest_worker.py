"""The ingest worker a SensorFleet's Deployment runs, and how the operator reads its reports."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from citynerve.operators.city.status import compute_fleet_status, merge_ingest_reports
from citynerve.workloads.ingest.sensor_type import SensorType
from citynerve.workloads.ingest.worker import UPSERT_PATH, FleetConfig, IngestWorker, _handler
from citynerve.workloads.ngsi import to_ngsi_entities
from citynerve.workloads.sim.gateway import gateway_batch
from citynerve.workloads.sim.readings import Readings

pytestmark = pytest.mark.timeout(60)
SAMPLES = Path(__file__).resolve().parents[1] / "samples"
GAUGE = SensorType.from_resource(
    "pipe-pressure-gauge",
    yaml.safe_load((SAMPLES / "sensortypes" / "pipe-pressure-gauge.yaml").read_text())["spec"])
CONFIG = FleetConfig("pudong-pressure", "pipe-pressure-gauge", 60, "pudong-pressure-ingest-report")


def payload(terminals: int, end_ms: int, steps: int = 3) -> bytes:
    """Readings of ``terminals`` gauges, one a minute, the newest at ``end_ms``."""
    values = 300.0 + np.arange(steps * terminals, dtype=np.float64).reshape(steps, terminals) % 7
    readings = Readings.from_wide(np.arange(steps) * 60.0, [f"g{i}" for i in range(terminals)], "pressure",
                                  values)
    start = end_ms - (steps - 1) * 60_000
    return json.dumps(to_ngsi_entities(readings, GAUGE, epoch_ms=start)).encode()


def test_the_catalogues_sensor_type_reads_as_published() -> None:
    assert GAUGE.data_model == "Junction"
    assert [(p.name, p.unit, p.minimum, p.maximum) for p in GAUGE.properties] == [
        ("pressure", "KPA", 0.0, 1600.0), ("batteryLevel", "P1", 0.0, 100.0)]


def test_report_counts_terminals_quality_and_quarantine() -> None:
    worker = IngestWorker(CONFIG, GAUGE)
    now = int(time.time() * 1000)
    worker.ingest(payload(12, now - 1000), now)
    observed = datetime.fromtimestamp(now / 1000 - 1, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    bad = [{"type": "Junction", "dateObserved": observed, "pressure": 1.0},  # no id
           {"id": "urn:ngsi-ld:Junction:g99", "type": "Junction", "dateObserved": observed,
            "pressure": 99999.0}]  # out of range
    result = worker.ingest(json.dumps(bad).encode(), now)
    assert result == {"accepted": 0, "quarantined": 2}
    report = worker.report(now)
    assert report["terminalsOnline"] == 12
    assert report["acceptedReadings"] == 36
    assert report["quarantinedPayloads"] == 2
    assert report["quarantineReasons"] == {"undecodable": 1, "out-of-range": 1}
    # Three sampling intervals later nobody has sent anything: nobody is online.
    assert worker.report(now + 3 * 60_000 + 2000)["terminalsOnline"] == 0


@pytest.fixture
def server() -> Iterator[tuple[str, IngestWorker]]:
    worker = IngestWorker(CONFIG, GAUGE)
    http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(worker))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{http.server_address[1]}", worker
    finally:
        http.shutdown()


def post(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")  # noqa: S310 - a local test server
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - a local test server
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_terminals_post_ngsi_ld_batches_and_learn_what_was_quarantined(
        server: tuple[str, IngestWorker]) -> None:
    url, worker = server
    status, _ = post(url + UPSERT_PATH, payload(5, int(time.time() * 1000)))
    assert status == 204
    status, body = post(url + UPSERT_PATH, b"{not json")
    assert (status, json.loads(body)) == (207, {"accepted": 0, "quarantined": 1})
    assert post(url + "/elsewhere", b"[]")[0] == 404
    with urllib.request.urlopen(url + "/report", timeout=10) as response:  # noqa: S310 - a local test server
        assert json.loads(response.read())["terminalsOnline"] == 5
    assert worker.pipeline.stats.accepted == 15


def test_the_operator_adds_up_its_workers_and_forgets_a_silent_one() -> None:
    def worker(reported: str, online: int, accepted: int, last: str) -> str:
        return json.dumps({"reportedAt": reported, "terminalsOnline": online, "acceptedReadings": accepted,
                           "rejectedReadings": 1, "quarantinedPayloads": 1, "lastReadingTime": last})

    data = {"worker.a": worker("2026-11-25T08:00:00Z", 100, 1000, "2026-11-25T07:59:50Z"),
            "worker.b": worker("2026-11-25T07:59:45Z", 50, 500, "2026-11-25T07:59:40Z"),
            "worker.gone": worker("2026-11-25T07:40:00Z", 70, 700, "2026-11-25T07:39:00Z")}
    merged = merge_ingest_reports(data)
    assert merged == {"reportedAt": "2026-11-25T08:00:00Z", "acceptedReadings": 2200, "rejectedReadings": 3,
                      "quarantinedPayloads": 3, "terminalsOnline": 150,
                      "lastReadingTime": "2026-11-25T07:59:50Z"}
    assert merge_ingest_reports({}) is None
    fleet = {"metadata": {"name": "pudong-pressure", "generation": 1},
             "spec": {"samplingIntervalSeconds": 60}}
    deployment = {"metadata": {"name": "pudong-pressure-ingest"}, "spec": {"replicas": 2},
                  "status": {"availableReplicas": 2}}
    status = compute_fleet_status(fleet, deployment, merged, datetime(2026, 11, 25, 8, 0, 5, tzinfo=UTC))
    figures = (status["terminalsOnline"], status["qualityScore"], status["dataFreshnessSeconds"])
    assert figures == (150, 100, 10)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


def test_a_gateway_batch_brings_every_terminal_online_and_its_broken_entities_to_quarantine() -> None:
    worker = IngestWorker(CONFIG, GAUGE)
    now = int(time.time() * 1000)
    body = gateway_batch(GAUGE, 40, now - 2000, np.random.default_rng(7), malformed=3, prefix="pudong-")
    assert worker.ingest(body, now) == {"accepted": 40 * len(GAUGE.properties), "quarantined": 3}
    report = worker.report(now)
    assert (report["terminalsOnline"], report["quarantinedPayloads"]) == (40, 3)
    assert report["quarantineReasons"] == {"undecodable": 1, "out-of-range": 2}
