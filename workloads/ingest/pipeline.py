"""Decode → validate → deduplicate → window → score, on whole batches at a time.

Every reading either lands in a window aggregate, is counted as a duplicate, or is kept in
quarantine with a reason; nothing is dropped silently and nothing malformed stops the
pipeline. All per-reading work is NumPy/Arrow on columns; Python runs per batch, per window
and per newly seen sensor, never per reading.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pandas as pd  # type: ignore[import-untyped]  # no stubs in this environment
import pyarrow as pa
import pyarrow.compute as pc
from citynerve.observability.tracing import IngestRecorder, ingest_span
from citynerve.workloads.ingest.sensor_type import SensorType
from citynerve.workloads.ngsi import DecodeFailure, NgsiDecoder
from citynerve.workloads.sim.readings import READING_SCHEMA

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

#: Quarantine reasons, in the order they are checked (the first that applies is recorded).
REASONS = ("missing-sensor", "unknown-property", "bad-timestamp", "late", "missing-value", "out-of-range")
_REASON_CODE = {r: i + 1 for i, r in enumerate(REASONS)}
_TS_BITS = 40  # key = group << 40 | ms since the oldest acceptable time (2^40 ms ≈ 34 years)


@dataclass
class IngestStats:
    readings: int = 0
    accepted: int = 0
    duplicates: int = 0
    entities: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())


@dataclass(frozen=True)
class WindowAggregates:
    """Closed windows: one row per (sensor, property, window)."""

    sensor: npt.NDArray[np.object_]
    prop: npt.NDArray[np.object_]
    window_start_ms: IntArray
    count: IntArray
    mean: FloatArray
    minimum: FloatArray
    maximum: FloatArray
    score: FloatArray

    def __len__(self) -> int:
        return int(self.count.shape[0])

    def to_arrow(self) -> pa.Table:
        return pa.table({k: getattr(self, k) for k in self.__dataclass_fields__})


class _Accumulator:
    """Sums, counts, minima and maxima of one window, indexed by group id."""

    def __init__(self, size: int) -> None:
        self.sum = np.zeros(size)
        self.count = np.zeros(size, dtype=np.int64)
        self.min = np.full(size, np.inf)
        self.max = np.full(size, -np.inf)

    def grow(self, size: int) -> None:
        extra = size - self.sum.shape[0]
        if extra > 0:
            self.sum = np.concatenate([self.sum, np.zeros(extra)])
            self.count = np.concatenate([self.count, np.zeros(extra, dtype=np.int64)])
            self.min = np.concatenate([self.min, np.full(extra, np.inf)])
            self.max = np.concatenate([self.max, np.full(extra, -np.inf)])

    def add(self, group: IntArray, value: FloatArray) -> None:
        size = self.sum.shape[0]
        self.sum += np.bincount(group, weights=value, minlength=size)
        self.count += np.bincount(group, minlength=size)
        np.minimum.at(self.min, group, value)
        np.maximum.at(self.max, group, value)


class IngestPipeline:
    """Ingestion for one sensor type: feed batches, flush closed windows, read the quarantine.

    Duplicates — the same (sensor, property, timestamp) again — are removed within a batch and
    against the previous batch (a gateway's retransmission); the first copy counts.
    """

    def __init__(
        self,
        sensor_type: SensorType,
        window_s: float = 300.0,
        allowed_lateness_s: float = 0.0,
        track_terminals: bool = False,
    ) -> None:
        self.sensor_type = sensor_type
        self.window_ms = int(window_s * 1000)
        self.lateness_ms = int(allowed_lateness_s * 1000)
        self.stats = IngestStats()
        self.quarantine: list[pa.RecordBatch] = []
        self.rejected_entities: list[DecodeFailure] = []
        self._lo, self._hi = sensor_type.bounds()
        self._props = pa.array(sensor_type.property_names, pa.string())
        self._n_props = len(sensor_type.property_names)
        self._names: list[str] = []
        self._known = pd.Index([], dtype=object)
        self._sensor_lut: tuple[pa.Array, IntArray] | None = None
        self._prop_lut: tuple[pa.Array, IntArray] | None = None
        self._windows: dict[int, _Accumulator] = {}
        self._closed_before = np.iinfo(np.int64).min  # window index: everything below is flushed
        self._prev_keys = np.zeros(0, dtype=np.int64)
        self._baseline: tuple[FloatArray, FloatArray] | None = None
        self._decoder: NgsiDecoder | None = None
        self._metrics = IngestRecorder(sensor_type.name)
        # Newest accepted reading per terminal (ms), for "terminals online"; off in the hot path.
        self._last_seen: IntArray | None = np.zeros(0, dtype=np.int64) if track_terminals else None

    # ---- inputs -------------------------------------------------------------------------
    def ingest_ipc(self, data: bytes | pa.Buffer, now_ms: int) -> None:
        """An Arrow IPC stream of gateway batches (READING_SCHEMA)."""
        for batch in pa.ipc.open_stream(data):
            self.ingest_batch(batch, now_ms)

    def ingest_ngsi(self, payload: bytes, now_ms: int) -> None:
        """A JSON array of NGSI-LD entities of this sensor type."""
        if self._decoder is None:
            self._decoder = NgsiDecoder(self.sensor_type)
        decoded = self._decoder.decode(payload)
        self.stats.entities += decoded.entities
        rejected: Counter[str] = Counter()
        for failure in decoded.failures:
            self.rejected_entities.append(failure)
            rejected[failure.reason.split(":", 1)[0]] += 1
        if rejected:
            self.stats.quarantined.update(rejected)
            self._metrics.add(0, rejected)
        self.ingest_batch(decoded.batch, now_ms)

    def ingest_batch(self, batch: pa.RecordBatch, now_ms: int) -> None:
        n = batch.num_rows
        if n == 0:
            return
        # one span and a few counter adds per batch, never per reading (bench/telemetry.py)
        with ingest_span(self.sensor_type.name, n):
            stats = self.stats
            before = (stats.duplicates, dict(stats.quarantined))
            self._ingest_batch(batch, n, now_ms)
            self._metrics.add(
                n,
                {k: v - before[1].get(k, 0) for k, v in stats.quarantined.items()},
                stats.duplicates - before[0],
                lambda: _lag_s(batch, now_ms),
            )

    def _ingest_batch(self, batch: pa.RecordBatch, n: int, now_ms: int) -> None:
        self.stats.readings += n
        sensor = self._sensor_ids(batch.column(0))
        prop = self._prop_ids(batch.column(1))
        ts_col = batch.column(2)
        ts = np.asarray(ts_col.fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        value = np.asarray(batch.column(3).to_numpy(zero_copy_only=False), dtype=np.float64)

        # ---- validate: the first reason that applies wins, so assign in reverse order
        earliest = now_ms - int(self.sensor_type.max_age_s * 1000)
        latest = now_ms + int(self.sensor_type.max_future_skew_s * 1000)
        known_prop = np.maximum(prop, 0)
        reason = np.zeros(n, dtype=np.uint8)
        reason[(value < self._lo[known_prop]) | (value > self._hi[known_prop])] = _REASON_CODE["out-of-range"]
        reason[np.isnan(value)] = _REASON_CODE["missing-value"]
        reason[ts // self.window_ms < self._closed_before] = _REASON_CODE["late"]
        bad_ts = (ts < earliest) | (ts > latest)
        if ts_col.null_count:
            bad_ts |= np.asarray(ts_col.is_null().to_numpy(zero_copy_only=False))
        reason[bad_ts] = _REASON_CODE["bad-timestamp"]
        reason[prop < 0] = _REASON_CODE["unknown-property"]
        reason[sensor < 0] = _REASON_CODE["missing-sensor"]
        if reason.any():
            bad = reason != 0
            self._quarantine(batch, bad, reason)
            ok = ~bad
            sensor, prop, ts, value = sensor[ok], prop[ok], ts[ok], value[ok]

        # ---- deduplicate
        group = sensor * self._n_props + prop
        key = (group << _TS_BITS) | (ts - earliest)
        dup = self._duplicates(key)
        if dup is not None:
            self.stats.duplicates += int(dup.sum())
            keep = ~dup
            group, ts, value = group[keep], ts[keep], value[keep]
        self.stats.accepted += int(value.shape[0])
        if self._last_seen is not None and value.shape[0]:
            if self._last_seen.shape[0] < len(self._names):
                grown = np.zeros(len(self._names), dtype=np.int64)
                grown[: self._last_seen.shape[0]] = self._last_seen
                self._last_seen = grown
            np.maximum.at(self._last_seen, group // self._n_props, ts)

        # ---- window
        if value.shape[0] == 0:
            return
        window = ts // self.window_ms
        first, last = int(window.min()), int(window.max())
        size = len(self._names) * self._n_props
        for w in range(first, last + 1):
            acc = self._windows.get(w)
            if acc is None:
                acc = self._windows[w] = _Accumulator(size)
            acc.grow(size)
            if first == last:
                acc.add(group, value)
            else:
                sel = window == w
                if sel.any():
                    acc.add(group[sel], value[sel])

    # ---- outputs ------------------------------------------------------------------------
    def flush(self, watermark_ms: int | None = None) -> WindowAggregates:
        """Close windows that end at or before the watermark (all, when None), and score them."""
        self._metrics.flush()
        closing = sorted(
            w
            for w in self._windows
            if watermark_ms is None or (w + 1) * self.window_ms + self.lateness_ms <= watermark_ms
        )
        parts = []
        for w in closing:
            acc = self._windows.pop(w)
            seen = np.flatnonzero(acc.count)
            parts.append((w, seen, acc))
            self._closed_before = max(self._closed_before, w + 1)
        if not parts:
            return _empty_windows()
        groups = np.concatenate([p[1] for p in parts])
        counts = np.concatenate([p[2].count[p[1]] for p in parts])
        mean = np.concatenate([p[2].sum[p[1]] for p in parts]) / counts
        names = np.asarray(self._names, dtype=object)
        return WindowAggregates(
            sensor=names[groups // self._n_props],
            prop=np.asarray(self.sensor_type.property_names, dtype=object)[groups % self._n_props],
            window_start_ms=np.concatenate([np.full(p[1].size, p[0] * self.window_ms) for p in parts]),
            count=counts,
            mean=mean,
            minimum=np.concatenate([p[2].min[p[1]] for p in parts]),
            maximum=np.concatenate([p[2].max[p[1]] for p in parts]),
            score=self._score(groups, mean),
        )

    def terminals_seen_since(self, since_ms: int) -> int:
        """Terminals with an accepted reading at or after ``since_ms`` (needs ``track_terminals``)."""
        if self._last_seen is None:
            raise ValueError("terminals are counted only by a pipeline made with track_terminals=True")
        return int((self._last_seen >= since_ms).sum())

    def newest_reading_ms(self) -> int | None:
        """Time of the newest accepted reading (needs ``track_terminals``); None before the first."""
        if self._last_seen is None or not self._last_seen.shape[0] or not self._last_seen.max():
            return None
        return int(self._last_seen.max())

    def fit_baseline(self, windows: WindowAggregates) -> None:
        """Learn each (sensor, property)'s usual window mean and spread; later windows get z-scores."""
        size = len(self._names) * self._n_props
        group = self._group_of(windows)
        counts = np.bincount(group, minlength=size).astype(np.float64)
        sums = np.bincount(group, weights=windows.mean, minlength=size)
        squares = np.bincount(group, weights=windows.mean**2, minlength=size)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = sums / counts
            std = np.sqrt(np.maximum(squares / counts - mean**2, 0.0))
        span = (self._hi - self._lo)[np.arange(size) % self._n_props]
        self._baseline = (mean, np.maximum(std, 1e-3 * span))

    def quarantined_rows(self) -> pa.Table:
        """Every quarantined reading with its reason (rejected entities are in `rejected_entities`)."""
        schema = READING_SCHEMA.append(pa.field("reason", pa.string()))
        if not self.quarantine:
            return schema.empty_table()
        return pa.Table.from_batches(self.quarantine).cast(schema)

    # ---- internals ----------------------------------------------------------------------
    def _group_of(self, windows: WindowAggregates) -> IntArray:
        ids = self._sensor_ids(pa.array(windows.sensor, pa.string()).dictionary_encode())
        props = self._prop_ids(pa.array(windows.prop, pa.string()).dictionary_encode())
        return ids * self._n_props + props

    def _score(self, groups: IntArray, mean: FloatArray) -> FloatArray:
        if self._baseline is None:
            return np.full(mean.shape, np.nan)
        base_mean, base_std = self._baseline
        inside = groups < base_mean.shape[0]
        score = np.full(mean.shape, np.nan)
        score[inside] = (mean[inside] - base_mean[groups[inside]]) / base_std[groups[inside]]
        return score

    def _lookup(self, column: pa.Array, sensors: bool) -> IntArray:
        """Per-row ids for a (dictionary) string column; a stream's dictionary is mapped once.

        Batches of one IPC stream share their dictionary buffers. The cache holds the mapped
        dictionary itself, so a matching buffer address can only be that same dictionary.
        """
        if not pa.types.is_dictionary(column.type):
            column = pc.dictionary_encode(column)
        dictionary = column.dictionary
        cache = self._sensor_lut if sensors else self._prop_lut
        lut = None
        if cache is not None and _same_buffers(cache[0], dictionary):
            lut = cache[1]
        if lut is None:
            lut = self._map_sensors(dictionary) if sensors else self._map_props(dictionary)
            if sensors:
                self._sensor_lut = (dictionary, lut)
            else:
                self._prop_lut = (dictionary, lut)
        idx = np.asarray(column.indices.fill_null(-1).to_numpy(zero_copy_only=False), dtype=np.int64)
        return np.asarray(np.append(lut, -1)[idx], dtype=np.int64)  # index -1 (null) maps to -1

    def _sensor_ids(self, column: pa.Array) -> IntArray:
        return self._lookup(column, sensors=True)

    def _prop_ids(self, column: pa.Array) -> IntArray:
        return self._lookup(column, sensors=False)

    def _map_sensors(self, dictionary: pa.Array) -> IntArray:
        # a pandas Index keeps its hash table between calls; pc.index_in would rebuild it
        # from the value set on every batch
        strings = dictionary.to_numpy(zero_copy_only=False)
        ids = np.asarray(self._known.get_indexer(strings), dtype=np.int64)
        valid = np.asarray(dictionary.is_valid().to_numpy(zero_copy_only=False)) & (
            np.asarray(pc.fill_null(pc.utf8_length(dictionary), 0).to_numpy(zero_copy_only=False)) > 0
        )
        new = np.flatnonzero((ids < 0) & valid)
        if new.size:
            fresh = list(dict.fromkeys(str(s) for s in strings[new]))
            if (len(self._names) + len(fresh)) * self._n_props >= 1 << (63 - _TS_BITS):
                raise OverflowError(
                    f"sensor type {self.sensor_type.name!r}: too many terminals for one pipeline"
                )
            self._names.extend(fresh)
            self._known = pd.Index(self._names)
            ids[new] = self._known.get_indexer(strings[new])
        ids[~valid] = -1
        return ids

    def _map_props(self, dictionary: pa.Array) -> IntArray:
        return np.asarray(
            pc.index_in(dictionary, value_set=self._props).fill_null(-1).to_numpy(zero_copy_only=False),
            dtype=np.int64,
        )

    def _duplicates(self, key: IntArray) -> npt.NDArray[np.bool_] | None:
        """Rows repeating a key seen earlier in this batch or in the previous one; None if none do."""
        ordered = np.sort(key)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        prev = self._prev_keys
        self._prev_keys = ordered
        seen_before = np.zeros(0, dtype=np.int64)
        if prev.size:
            lo, hi = np.searchsorted(ordered, [prev[0], prev[-1]], side="left")
            overlap = ordered[lo : hi + 1]
            if overlap.size:
                pos = np.minimum(np.searchsorted(prev, overlap), prev.size - 1)
                seen_before = overlap[prev[pos] == overlap]
        if repeated.size == 0 and seen_before.size == 0:
            return None
        dup = np.zeros(key.shape[0], dtype=bool)
        if seen_before.size:
            dup |= _member(key, np.unique(seen_before))
        if repeated.size:
            suspects = np.flatnonzero(_member(key, np.unique(repeated)))
            _, first = np.unique(key[suspects], return_index=True)
            later = np.ones(suspects.size, dtype=bool)
            later[first] = False
            dup[suspects[later]] = True
        return dup

    def _quarantine(
        self, batch: pa.RecordBatch, bad: npt.NDArray[np.bool_], reason: npt.NDArray[np.uint8]
    ) -> None:
        codes = reason[bad]
        counts = np.bincount(codes, minlength=len(REASONS) + 1)
        for name, code in _REASON_CODE.items():
            if counts[code]:
                self.stats.quarantined[name] += int(counts[code])
        labels = pa.array(np.asarray(("", *REASONS), dtype=object)[codes], pa.string())
        rows = batch.filter(pa.array(bad))
        self.quarantine.append(
            pa.RecordBatch.from_arrays([*rows.columns, labels], names=[*rows.schema.names, "reason"])
        )


def _lag_s(batch: pa.RecordBatch, now_ms: int) -> float | None:
    """The ingesting clock minus the batch's newest timestamp, in seconds."""
    newest = pc.max(batch.column(2)).as_py()
    return (now_ms - newest) / 1000.0 if newest is not None else None


def _same_buffers(a: pa.Array, b: pa.Array) -> bool:
    if len(a) != len(b) or a.offset != b.offset:
        return False
    return all(
        (x is None and y is None) or (x is not None and y is not None and x.address == y.address)
        for x, y in zip(a.buffers(), b.buffers(), strict=True)
    )


def _member(values: IntArray, sorted_set: IntArray) -> npt.NDArray[np.bool_]:
    pos = np.minimum(np.searchsorted(sorted_set, values), sorted_set.size - 1)
    return np.asarray(sorted_set[pos] == values)


def _empty_windows() -> WindowAggregates:
    e = np.zeros(0)
    ei = np.zeros(0, dtype=np.int64)
    eo = np.zeros(0, dtype=object)
    return WindowAggregates(eo, eo, ei, ei, e, e, e, e)
