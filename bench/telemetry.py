"""What tracing costs ingestion: bench/ingest.py's workload with telemetry off, then on.

"On" is what a city's ingestion runs with: a span per batch exported over OTLP/HTTP (to a
local receiver in a process of its own, as a collector would be), ingestion metrics, and the
Prometheus endpoint. "Off" is ``OTEL_SDK_DISABLED`` (OpenTelemetry's no-op API). Runs
alternate off/on and the best of each is kept, so the ratio compares like with like. The
target (DESIGN.md): tracing on costs at most 2 % (ratio ≥ 0.98). The last line printed is a
JSON object of the figures.

    .venv/bin/python bench/telemetry.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
from citynerve.observability.telemetry import configure_telemetry, shutdown_telemetry
from citynerve.observability.tracing import IngestRecorder, ingest_span
from citynerve.workloads.ingest.sensor_type import CATALOGUE

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest as ingest_bench  # bench/ingest.py: the workload measured here

ROUNDS = 8


class Receiver:
    """`LocalOtlpReceiver` in a child process: its parsing does not compete with the measured one."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "citynerve.observability.otlp_receiver", "--port", "0"],
            stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.endpoint = self.process.stdout.readline().strip()

    def span_count(self) -> int:
        with urllib.request.urlopen(self.endpoint + "/stats", timeout=10) as response:  # noqa: S310
            return int(json.loads(response.read())["spans"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def alternate(run: Callable[[], float], receiver: Receiver) -> tuple[float, float, int]:
    """Best seconds with telemetry off and on, and the spans one traced run exported.

    Each round runs both, in an order that swaps every round, so that neither side always
    follows the other (or a burst of load on the machine)."""
    off: list[float] = []
    on: list[float] = []
    spans = 0
    for round_ in range(ROUNDS):
        for traced in ((False, True) if round_ % 2 == 0 else (True, False)):
            if not traced:
                configure_telemetry("citynerve-bench", enabled=False)
                off.append(run())
                continue
            telemetry = configure_telemetry("citynerve-bench", city="bench", otlp_endpoint=receiver.endpoint,
                                            prometheus_port=0)
            before = receiver.span_count()
            on.append(run())
            telemetry.force_flush()
            spans = receiver.span_count() - before
    shutdown_telemetry()
    return min(off), min(on), spans


def per_batch_cost(receiver: Receiver, batches: int = 2000) -> tuple[float, float]:
    """Seconds the instrumentation of one batch costs (span + metrics accumulator), off and on."""
    costs = []
    for traced in (False, True):
        configure_telemetry("citynerve-bench", enabled=traced, otlp_endpoint=receiver.endpoint)
        recorder = IngestRecorder("water-pressure-logger")
        started = time.perf_counter()
        for _ in range(batches):
            with ingest_span("water-pressure-logger", 5000):
                recorder.add(5000, {"out-of-range": 1}, 1, lambda: 1.0)
        costs.append((time.perf_counter() - started) / batches)
    shutdown_telemetry()
    return costs[0], costs[1]


def main() -> dict[str, Any]:
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    history, _ = ingest_bench.gateway_stream(seed=1, offset_s=-3600.0)
    stream, rows = ingest_bench.gateway_stream(seed=2, offset_s=0.0)
    pressure = CATALOGUE["water-pressure-logger"]
    payloads, n_ngsi = ingest_bench.ngsi_payloads(pressure, {"pressure": (40.0, 3.0)}, 20_000, 25)
    receiver = Receiver()
    try:
        started = time.perf_counter()
        ipc_off, ipc_on, ipc_spans = alternate(
            lambda: ingest_bench.vectorised_ipc(history, stream)[0], receiver)
        ngsi_off, ngsi_on, ngsi_spans = alternate(
            lambda: ingest_bench.vectorised_ngsi(pressure, payloads), receiver)
        wall = time.perf_counter() - started
        cost_off, cost_on = per_batch_cost(receiver)
    finally:
        receiver.stop()
    ipc_ratio, ngsi_ratio = ipc_off / ipc_on, ngsi_off / ngsi_on
    # the same ratio from the instrumentation's own cost per batch, which load on the machine
    # disturbs far less than whole runs: time(off) / (time(off) + batches x extra cost)
    extra = cost_on - cost_off
    ipc_modelled = ipc_off / (ipc_off + ipc_spans * extra)
    ngsi_modelled = ngsi_off / (ngsi_off + ngsi_spans * extra)
    print(f"gateway batches: {rows:,} readings, off {rows / ipc_off / 1e6:.2f} M/s, "
          f"on {rows / ipc_on / 1e6:.2f} M/s ({ipc_spans} spans/run): ratio {ipc_ratio:.3f}")
    print(f"NGSI-LD payloads: {n_ngsi:,} readings, off {n_ngsi / ngsi_off / 1e6:.2f} M/s, "
          f"on {n_ngsi / ngsi_on / 1e6:.2f} M/s ({ngsi_spans} spans/run): ratio {ngsi_ratio:.3f}")
    print(f"instrumentation per batch: {cost_off * 1e6:.1f} us off, {cost_on * 1e6:.1f} us on; "
          f"modelled ratio: gateway {ipc_modelled:.4f}, NGSI-LD {ngsi_modelled:.4f}")
    print(f"({ROUNDS} alternating rounds each, best kept; {wall:.0f} s)")
    return {
        "throughput_ratio_tracing_on_vs_off": round(min(ipc_ratio, ngsi_ratio), 4),
        "ipc_ratio": round(ipc_ratio, 4),
        "ipc_readings_per_s_off": round(rows / ipc_off),
        "ipc_readings_per_s_on": round(rows / ipc_on),
        "ipc_spans_per_run": ipc_spans,
        "ngsi_ratio": round(ngsi_ratio, 4),
        "ngsi_readings_per_s_off": round(n_ngsi / ngsi_off),
        "ngsi_readings_per_s_on": round(n_ngsi / ngsi_on),
        "ngsi_spans_per_run": ngsi_spans,
        "per_batch_cost_us_off": round(cost_off * 1e6, 1),
        "per_batch_cost_us_on": round(cost_on * 1e6, 1),
        "modelled_ratio_ipc": round(ipc_modelled, 4),
        "modelled_ratio_ngsi": round(ngsi_modelled, 4),
        "target_ratio": 0.98,
        "rounds": ROUNDS,
    }


if __name__ == "__main__":
    figures = main()
    print(json.dumps(figures))
