"""Ingestion in parallel on Ray: a pool of actors, each owning a pipeline for one sensor type.

Payloads are dealt round-robin; each actor validates, deduplicates and windows its share.
Window partials come back keyed by sensor name and are merged (sum, count, min, max) on
the caller's side, so the result does not depend on how payloads were dealt. Deduplication
is per actor: a retransmitted payload must reach the actor that saw the original, which
`ingest` ensures by dealing payloads by a caller-given key (a gateway id) when there is one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from citynerve.workloads.ingest.pipeline import BatchResult, IngestPipeline, WindowAggregates
from citynerve.workloads.ingest.sensor_type import SensorType


class _IngestWorker:
    """One actor's pipeline and what it quarantined over the pool's (finite) run."""

    def __init__(self, sensor_type: SensorType, window_s: float) -> None:
        self.pipeline = IngestPipeline(sensor_type, window_s=window_s)
        self.quarantined = BatchResult()

    def ingest(self, kind: str, payload: bytes, now_ms: int) -> int:
        if kind == "ipc":
            result = self.pipeline.ingest_ipc(payload, now_ms)
        else:
            result = self.pipeline.ingest_ngsi(payload, now_ms)
        self.quarantined.merge(result)
        return self.pipeline.stats.readings

    def finish(self) -> dict[str, Any]:
        windows = self.pipeline.flush()
        stats = self.pipeline.stats
        return {
            "windows": windows.to_arrow(),
            "readings": stats.readings,
            "accepted": stats.accepted,
            "duplicates": stats.duplicates,
            "quarantined": dict(stats.quarantined),
            "quarantine": self.quarantined.quarantined_rows,
            "rejected_entities": [(f.raw, f.reason) for f in self.quarantined.rejected_entities],
        }


@dataclass(frozen=True)
class PoolResult:
    windows: pa.Table
    readings: int
    accepted: int
    duplicates: int
    quarantined: Counter[str]
    quarantine: pa.Table
    rejected_entities: list[tuple[bytes, str]]


class IngestPool:
    """`size` Ray actors ingesting payloads of one sensor type."""

    def __init__(self, sensor_type: SensorType, size: int = 2, window_s: float = 300.0) -> None:
        actor = ray.remote(num_cpus=1)(_IngestWorker)
        self._workers = [actor.remote(sensor_type, window_s) for _ in range(size)]
        self._pending: list[Any] = []
        self._next = 0

    def submit(self, kind: str, payload: bytes, now_ms: int, key: int | None = None) -> None:
        """Queue a payload (`kind` is "ipc" or "ngsi"); `key` pins a source to one actor."""
        if kind not in ("ipc", "ngsi"):
            raise ValueError(f"payload kind {kind!r} is neither 'ipc' nor 'ngsi'")
        index = key % len(self._workers) if key is not None else self._next % len(self._workers)
        self._next += 1
        self._pending.append(self._workers[index].ingest.remote(kind, payload, now_ms))

    def finish(self) -> PoolResult:
        ray.get(self._pending)
        self._pending = []
        parts = ray.get([w.finish.remote() for w in self._workers])
        quarantined: Counter[str] = Counter()
        for p in parts:
            quarantined.update(p["quarantined"])
        return PoolResult(
            windows=merge_windows([p["windows"] for p in parts]),
            readings=sum(p["readings"] for p in parts),
            accepted=sum(p["accepted"] for p in parts),
            duplicates=sum(p["duplicates"] for p in parts),
            quarantined=quarantined,
            quarantine=pa.concat_tables([p["quarantine"] for p in parts]),
            rejected_entities=[u for p in parts for u in p["rejected_entities"]],
        )


def merge_windows(tables: list[pa.Table]) -> pa.Table:
    """Combine window partials from several pipelines (vectorised group-by in Arrow)."""
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        return table
    table = table.append_column("weighted", pa.array(np.asarray(table["mean"]) * np.asarray(table["count"])))
    grouped = table.group_by(["sensor", "prop", "window_start_ms"]).aggregate(
        [("count", "sum"), ("weighted", "sum"), ("minimum", "min"), ("maximum", "max")]
    )
    counts = np.asarray(grouped["count_sum"])
    return pa.table(
        {
            "sensor": grouped["sensor"],
            "prop": grouped["prop"],
            "window_start_ms": grouped["window_start_ms"],
            "count": counts,
            "mean": np.asarray(grouped["weighted_sum"]) / counts,
            "minimum": grouped["minimum_min"],
            "maximum": grouped["maximum_max"],
        }
    )


__all__ = ["IngestPool", "PoolResult", "WindowAggregates", "merge_windows"]
