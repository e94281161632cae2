"""Ingestion throughput: decode → validate → deduplicate → window → score, per core.

Two input forms, each against a plain per-record Python loop doing the same work in the same
process: gateway batches as an Arrow IPC stream, and NGSI-LD entities as JSON arrays (also
with the SensorType's payloadSchema evaluated, the catalogue's kind of schema). Runs on
one core (Arrow's thread pool is pinned to one thread); the last line printed is a JSON
object of the figures.

    .venv/bin/python bench/ingest.py
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import defaultdict
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
from citynerve.operators.api.catalogue import payload_schema
from citynerve.workloads.ingest.pipeline import IngestPipeline, IngestStats
from citynerve.workloads.ingest.sensor_type import CATALOGUE, SensorType
from citynerve.workloads.ngsi import to_ngsi_entities
from citynerve.workloads.sim.readings import READING_SCHEMA, Readings, to_ipc

EPOCH_MS = 1_782_000_000_000
NOW_MS = EPOCH_MS + 3 * 3_600_000
WINDOW_S = 300.0
SENSORS = 250_000  # terminals behind the gateways in this run
STEPS = 40  # one reading every 30 s per terminal: 10 M readings in 20 minutes
BATCH = 500_000
DUPLICATE_SHARE = 0.001  # retransmitted rows
MALFORMED_SHARE = 0.001  # out-of-range values


def gateway_stream(seed: int, offset_s: float) -> tuple[bytes, int]:
    rng = np.random.default_rng(seed)
    values = 40.0 + 3.0 * rng.standard_normal((STEPS, SENSORS))
    values[rng.random(values.shape) < MALFORMED_SHARE] = 1e6
    # built straight as dictionary columns: 10 M Python strings would only time the set-up
    names = pa.array([f"logger-{i:06d}" for i in range(SENSORS)], pa.string())
    n = STEPS * SENSORS
    sensor = pa.DictionaryArray.from_arrays(
        pa.array(np.tile(np.arange(SENSORS, dtype=np.int32), STEPS)), names
    )
    prop = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array(["pressure"]))
    ts = EPOCH_MS + np.repeat((np.arange(STEPS) * 30.0 + offset_s) * 1000, SENSORS).astype(np.int64)
    batch = pa.RecordBatch.from_arrays(
        [sensor, prop, pa.array(ts), pa.array(values.reshape(-1))], schema=READING_SCHEMA
    )
    batches = [batch.slice(i, BATCH) for i in range(0, batch.num_rows, BATCH)]
    # a gateway resends some rows of the batch it just sent
    resent = []
    for b in batches:
        resent.append(b)
        dup = np.flatnonzero(rng.random(b.num_rows) < DUPLICATE_SHARE)
        if dup.size:
            resent.append(b.take(pa.array(dup)))
    return to_ipc(resent), sum(b.num_rows for b in resent)


def vectorised_ipc(history: bytes, stream: bytes) -> tuple[float, IngestPipeline]:
    pipeline = IngestPipeline(CATALOGUE["water-pressure-logger"], window_s=WINDOW_S)
    pipeline.ingest_ipc(history, NOW_MS)
    pipeline.fit_baseline(pipeline.flush())
    pipeline.stats = IngestStats()  # count the timed stream only
    start = time.perf_counter()
    pipeline.ingest_ipc(stream, NOW_MS)
    windows = pipeline.flush()
    elapsed = time.perf_counter() - start
    assert len(windows) > 0
    return elapsed, pipeline


class NaivePipeline:
    """The same work, one record at a time, in plain Python."""

    def __init__(self, sensor_type: SensorType) -> None:
        self.ranges = {p.name: (p.minimum, p.maximum) for p in sensor_type.properties}
        self.earliest = NOW_MS - int(sensor_type.max_age_s * 1000)
        self.latest = NOW_MS + int(sensor_type.max_future_skew_s * 1000)
        self.seen: set[tuple[str, str, int]] = set()
        self.windows: dict[tuple[str, str, int], list[float]] = defaultdict(
            lambda: [0.0, 0.0, math.inf, -math.inf]
        )
        self.quarantined: dict[str, int] = defaultdict(int)
        self.baseline: dict[tuple[str, str], tuple[float, float]] = {}

    def record(self, sensor: str | None, prop: str, ts: int | None, value: float | None) -> None:
        if not sensor:
            self.quarantined["missing-sensor"] += 1
            return
        bounds = self.ranges.get(prop)
        if bounds is None:
            self.quarantined["unknown-property"] += 1
            return
        if ts is None or ts < self.earliest or ts > self.latest:
            self.quarantined["bad-timestamp"] += 1
            return
        if value is None or math.isnan(value):
            self.quarantined["missing-value"] += 1
            return
        if not bounds[0] <= value <= bounds[1]:
            self.quarantined["out-of-range"] += 1
            return
        key = (sensor, prop, ts)
        if key in self.seen:
            return
        self.seen.add(key)
        w = self.windows[(sensor, prop, ts // int(WINDOW_S * 1000))]
        w[0] += value
        w[1] += 1
        w[2] = min(w[2], value)
        w[3] = max(w[3], value)

    def scores(self) -> list[float]:
        out = []
        for (sensor, prop, _), (total, count, _, _) in self.windows.items():
            mean, std = self.baseline.get((sensor, prop), (total / count, 1.0))
            out.append((total / count - mean) / std)
        return out


def naive_ipc(stream: bytes, limit: int) -> tuple[float, int]:
    naive = NaivePipeline(CATALOGUE["water-pressure-logger"])
    start = time.perf_counter()
    done = 0
    for batch in pa.ipc.open_stream(stream):
        cols = [batch.column(i).to_pylist() for i in range(4)]
        for sensor, prop, ts, value in zip(*cols, strict=True):
            naive.record(sensor, prop, ts, value)
        done += batch.num_rows
        if done >= limit:
            break
    naive.scores()
    return time.perf_counter() - start, done


def ngsi_payloads(
    sensor_type: SensorType, props: dict[str, tuple[float, float]], sensors: int, steps: int
) -> tuple[list[bytes], int]:
    rng = np.random.default_rng(5)
    names = [f"probe-{i:05d}" for i in range(sensors)]
    parts = [
        Readings.from_wide(
            np.arange(steps, dtype=np.float64) * 60.0,
            names,
            name,
            mu + sd * rng.standard_normal((steps, sensors)),
        )
        for name, (mu, sd) in props.items()
    ]
    readings = Readings.concat(parts)
    entities = to_ngsi_entities(readings, sensor_type, epoch_ms=EPOCH_MS)
    payloads = [orjson.dumps(entities[i : i + 5000]) for i in range(0, len(entities), 5000)]
    return payloads, len(readings)


def catalogue_schema(sensor_type: SensorType) -> dict[str, Any]:
    """The payloadSchema the SensorType catalogue publishes for these properties (all of it compiled)."""
    return payload_schema([{"name": p.name, "minimum": repr(p.minimum), "maximum": repr(p.maximum)}
                           for p in sensor_type.properties])


def vectorised_ngsi(sensor_type: SensorType, payloads: list[bytes]) -> float:
    pipeline = IngestPipeline(sensor_type, window_s=WINDOW_S)
    pipeline.ingest_ngsi(payloads[0], NOW_MS)  # warm: decoder built, sensors registered
    pipeline.fit_baseline(pipeline.flush())
    pipeline = IngestPipeline(sensor_type, window_s=WINDOW_S)
    start = time.perf_counter()
    for payload in payloads:
        pipeline.ingest_ngsi(payload, NOW_MS)
    pipeline.flush()
    return time.perf_counter() - start


def naive_ngsi(sensor_type: SensorType, payloads: list[bytes]) -> tuple[float, int]:
    naive = NaivePipeline(sensor_type)
    names = sensor_type.property_names
    prefix = f"urn:ngsi-ld:{sensor_type.data_model}:"
    start = time.perf_counter()
    done = 0
    for payload in payloads:
        for entity in json.loads(payload):
            when = np.datetime64(entity["dateObserved"].rstrip("Z"), "ms").astype(np.int64)
            sensor = entity["id"].removeprefix(prefix)
            for name in names:
                if name in entity:
                    naive.record(sensor, name, int(when), float(entity[name]))
                    done += 1
    naive.scores()
    return time.perf_counter() - start, done


def main() -> dict[str, Any]:
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    history, _ = gateway_stream(seed=1, offset_s=-3600.0)
    stream, rows = gateway_stream(seed=2, offset_s=0.0)
    runs = [vectorised_ipc(history, stream) for _ in range(3)]
    best, pipeline = min(runs, key=lambda r: r[0])
    rate = rows / best
    naive_time, naive_rows = naive_ipc(stream, limit=1_000_000)
    naive_rate = naive_rows / naive_time
    print(
        f"columnar: {rows:,} rows in {best:.2f} s = {rate / 1e6:.1f} M/s/core "
        f"(naive {naive_rate / 1e6:.2f} M/s/core); accepted {pipeline.stats.accepted:,}, "
        f"duplicates {pipeline.stats.duplicates:,}, quarantined {dict(pipeline.stats.quarantined)}"
    )

    pressure = CATALOGUE["water-pressure-logger"]
    payloads, n_single = ngsi_payloads(pressure, {"pressure": (40.0, 3.0)}, 20_000, 25)
    single = min(vectorised_ngsi(pressure, payloads) for _ in range(3))
    naive_single, naive_single_n = naive_ngsi(pressure, payloads[:40])
    quality = CATALOGUE["water-quality-probe"]
    multi_payloads, n_multi = ngsi_payloads(
        quality, {"temperature": (15.0, 2.0), "pH": (7.0, 0.2), "turbidity": (2.0, 0.5)}, 10_000, 20
    )
    multi = min(vectorised_ngsi(quality, multi_payloads) for _ in range(3))
    naive_multi, naive_multi_n = naive_ngsi(quality, multi_payloads[:20])
    with_schema = dataclasses.replace(pressure, payload_schema=catalogue_schema(pressure))
    schema_time = min(vectorised_ngsi(with_schema, payloads) for _ in range(3))
    ngsi_bytes = sum(len(p) for p in payloads)
    print(
        f"NGSI-LD, 1 reading/entity: {n_single:,} in {single:.2f} s = {n_single / single / 1e6:.2f} M/s/core "
        f"({ngsi_bytes / n_single:.0f} B/entity; naive {naive_single_n / naive_single / 1e6:.3f} M/s/core)"
    )
    print(
        f"NGSI-LD with payloadSchema, 1 reading/entity: {n_single / schema_time / 1e6:.2f} M entities/s/core"
    )
    print(
        f"NGSI-LD, 3 readings/entity: {n_multi:,} in {multi:.2f} s = {n_multi / multi / 1e6:.2f} M/s/core "
        f"(naive {naive_multi_n / naive_multi / 1e6:.3f} M/s/core)"
    )
    return {
        "readings_per_s_per_core": round(rate),
        "ratio_vs_naive": round(rate / naive_rate, 1),
        "naive_readings_per_s_per_core": round(naive_rate),
        "ngsi_readings_per_s_per_core": round(n_single / single),
        "ngsi_ratio_vs_naive": round((n_single / single) / (naive_single_n / naive_single), 1),
        "ngsi_with_schema_entities_per_s": round(n_single / schema_time),
        "ngsi_multi_readings_per_s_per_core": round(n_multi / multi),
        "ngsi_multi_ratio_vs_naive": round((n_multi / multi) / (naive_multi_n / naive_multi), 1),
        "rows": rows,
        "duplicates": pipeline.stats.duplicates,
        "quarantined": pipeline.stats.quarantined_total,
    }


if __name__ == "__main__":
    figures = main()
    print(json.dumps(figures))
