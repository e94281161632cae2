"""Decode → validate → deduplicate → window → score, on whole batches at a time.

Every reading either lands in a window aggregate, is counted as a duplicate, is skipped as a
redelivery of a window already closed, or is quarantined with a reason; nothing is dropped
silently and nothing malformed stops the pipeline. All per-reading work is NumPy/Arrow on
columns; Python runs per batch, per window and per newly seen sensor, never per reading.

Windows close on the event clock: ``flush(watermark_ms)`` closes every window whose end plus
the allowed lateness is at or before the watermark, and from then on a reading for it is
``late`` (quarantined, never folded in). Duplicates — the same (terminal, property,
timestamp) again, whenever it arrives — are found by sorting within a batch and, across
batches, against a ring of the K most recently accepted timestamps per (terminal, property),
K = ceil((window + lateness) / sampling interval) + 1, at most 16 (16 when the interval is not
given): a retransmission is caught for as long as its window is open, provided the terminal
keeps to its sampling interval. State is bounded by the number of terminals, never by time or
by the number of batches: per (terminal, property) the ring (8·K bytes), its write position
(1 byte) and newest timestamp (8 bytes), plus 32 bytes per open window; per terminal its name
and, with ``track_terminals``, 8 bytes of last-seen time. ``max_terminals`` caps the number of
terminals (further ones are quarantined as ``over-terminal-count``), hence all of it.
Quarantined readings and rejected entities are returned with each call, not kept.
"""

from __future__ import annotations

import math
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
REASONS = (
    "missing-sensor",
    "over-terminal-count",
    "unknown-property",
    "bad-timestamp",
    "late",
    "missing-value",
    "out-of-range",
)
_REASON_CODE = {r: i + 1 for i, r in enumerate(REASONS)}
_REDELIVERED = 255  # in place of "late" for a redelivered payload: skipped, not quarantined
QUARANTINE_SCHEMA = READING_SCHEMA.append(pa.field("reason", pa.string()))
_TS_BITS = 40  # within a batch, key = group << 40 | ms since the batch's oldest reading
_RING_CAP = 16  # most timestamps remembered per (terminal, property)
_NO_TS = np.iinfo(np.int64).min
_OVER_COUNT = -2  # sensor id of a terminal beyond max_terminals (-1: no sensor at all)


@dataclass
class IngestStats:
    """Counts since the pipeline was made; ``quarantined`` holds reading- and entity-level reasons."""

    readings: int = 0
    accepted: int = 0
    duplicates: int = 0
    redelivered: int = 0
    entities: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)

    @property
    def quarantined_total(self) -> int:
        return sum(self.quarantined.values())


@dataclass
class BatchResult:
    """What one call did: ``readings == accepted + duplicates + redelivered`` + reading-level quarantine.

    ``quarantined_rows`` and ``rejected_entities`` are this call's only; the pipeline keeps no
    copy (the caller publishes them to the quarantine stream).
    """

    readings: int = 0
    accepted: int = 0
    duplicates: int = 0
    redelivered: int = 0
    quarantined: Counter[str] = field(default_factory=Counter)
    quarantined_rows: pa.Table = field(default_factory=QUARANTINE_SCHEMA.empty_table)
    rejected_entities: list[DecodeFailure] = field(default_factory=list)
    newest_window: int | None = None

    def merge(self, other: BatchResult) -> None:
        """Add another call's result to this one (the batches of one IPC stream)."""
        self.readings += other.readings
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.redelivered += other.redelivered
        self.quarantined.update(other.quarantined)
        if other.quarantined_rows.num_rows:
            self.quarantined_rows = pa.concat_tables([self.quarantined_rows, other.quarantined_rows])
        self.rejected_entities.extend(other.rejected_entities)
        if other.newest_window is not None and (
            self.newest_window is None or other.newest_window > self.newest_window
        ):
            self.newest_window = other.newest_window


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

    @property
    def nbytes(self) -> int:
        return self.sum.nbytes + self.count.nbytes + self.min.nbytes + self.max.nbytes

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
    """Ingestion for one sensor type: feed batches, flush closed windows; each call says what it did.

    ``sampling_interval_s`` (the fleet's declared interval) sizes the dedup ring; ``max_terminals``
    (the fleet's declared terminal count) bounds the terminals it takes.
    """

    def __init__(
        self,
        sensor_type: SensorType,
        window_s: float = 300.0,
        allowed_lateness_s: float = 0.0,
        track_terminals: bool = False,
        max_terminals: int | None = None,
        sampling_interval_s: float | None = None,
    ) -> None:
        if (sensor_type.max_age_s + sensor_type.max_future_skew_s) * 1000 >= 1 << _TS_BITS:
            raise ValueError(
                f"sensor type {sensor_type.name!r}: maxAge plus maxFutureSkew must stay below 34 years"
            )
        if max_terminals is not None and max_terminals < 1:
            raise ValueError(f"max_terminals must be at least 1, not {max_terminals}")
        if sampling_interval_s is not None and sampling_interval_s <= 0:
            raise ValueError(f"sampling_interval_s must be positive, not {sampling_interval_s}")
        self.sensor_type = sensor_type
        self.window_ms = int(window_s * 1000)
        self.lateness_ms = int(allowed_lateness_s * 1000)
        self.max_terminals = max_terminals
        self.ring_slots = (
            _RING_CAP
            if sampling_interval_s is None
            else min(_RING_CAP, math.ceil((window_s + allowed_lateness_s) / sampling_interval_s) + 1)
        )
        self.stats = IngestStats()
        self._lo, self._hi = sensor_type.bounds()
        self._props = pa.array(sensor_type.property_names, pa.string())
        self._n_props = len(sensor_type.property_names)
        self._names: list[str] = []
        self._known = pd.Index([], dtype=object)
        self._sensor_lut: tuple[pa.Array, IntArray] | None = None
        self._prop_lut: tuple[pa.Array, IntArray] | None = None
        self._windows: dict[int, _Accumulator] = {}
        self._closed_before = 0  # window index: everything below is closed
        self._newest_event_ms: int | None = None
        # per (terminal, property) group, sized for `_capacity` terminals: the dedup ring, its
        # next write slot, and the newest timestamp it ever held (a fresh reading skips the ring)
        self._capacity = 0
        self._ring = np.full((0, self.ring_slots), _NO_TS, dtype=np.int64)
        self._ring_pos = np.zeros(0, dtype=np.uint8)
        self._ring_newest = np.zeros(0, dtype=np.int64)
        self._baseline: tuple[FloatArray, FloatArray] | None = None
        # built now when there is a payload schema, so a broken one is refused at once
        self._decoder = NgsiDecoder(sensor_type) if sensor_type.payload_schema is not None else None
        self._metrics = IngestRecorder(sensor_type.name)
        # Newest accepted reading per terminal (ms), for "terminals online"; off in the hot path.
        self._last_seen: IntArray | None = np.zeros(0, dtype=np.int64) if track_terminals else None

    # ---- inputs -------------------------------------------------------------------------
    def ingest_ipc(self, data: bytes | pa.Buffer, now_ms: int, redelivered: bool = False) -> BatchResult:
        """An Arrow IPC stream of gateway batches (READING_SCHEMA)."""
        result = BatchResult()
        for batch in pa.ipc.open_stream(data):
            result.merge(self.ingest_batch(batch, now_ms, redelivered))
        return result

    def ingest_ngsi(self, payload: bytes, now_ms: int, redelivered: bool = False) -> BatchResult:
        """A JSON array of NGSI-LD entities of this sensor type."""
        if self._decoder is None:
            self._decoder = NgsiDecoder(self.sensor_type)
        decoded = self._decoder.decode(payload)
        self.stats.entities += decoded.entities
        result = self.ingest_batch(decoded.batch, now_ms, redelivered)
        if decoded.failures:
            rejected = Counter(f.reason.split(":", 1)[0] for f in decoded.failures)
            self.stats.quarantined.update(rejected)
            self._metrics.add(0, rejected)
            result.quarantined.update(rejected)
            result.rejected_entities = decoded.failures
        return result

    def ingest_batch(self, batch: pa.RecordBatch, now_ms: int, redelivered: bool = False) -> BatchResult:
        """Gateway rows (READING_SCHEMA); ``redelivered``: rows for closed windows were windowed before."""
        n = batch.num_rows
        if n == 0:
            return BatchResult()
        # one span and a few counter adds per batch, never per reading (bench/telemetry.py)
        with ingest_span(self.sensor_type.name, n):
            result = self._ingest_batch(batch, n, now_ms, redelivered)
            stats = self.stats
            stats.readings += n
            stats.accepted += result.accepted
            stats.duplicates += result.duplicates
            stats.redelivered += result.redelivered
            stats.quarantined.update(result.quarantined)
            self._metrics.add(n, result.quarantined, result.duplicates, lambda: _lag_s(batch, now_ms))
        return result

    def _ingest_batch(self, batch: pa.RecordBatch, n: int, now_ms: int, redelivered: bool) -> BatchResult:
        result = BatchResult(readings=n)
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
        reason[ts // self.window_ms < self._closed_before] = (
            _REDELIVERED if redelivered else _REASON_CODE["late"]
        )
        bad_ts = (ts < earliest) | (ts > latest)
        if ts_col.null_count:
            bad_ts |= np.asarray(ts_col.is_null().to_numpy(zero_copy_only=False))
        reason[bad_ts] = _REASON_CODE["bad-timestamp"]
        reason[prop < 0] = _REASON_CODE["unknown-property"]
        reason[sensor == _OVER_COUNT] = _REASON_CODE["over-terminal-count"]
        reason[sensor == -1] = _REASON_CODE["missing-sensor"]
        if reason.any():
            bad = reason != 0
            skipped = reason == _REDELIVERED
            result.redelivered = int(skipped.sum())
            if result.redelivered < int(bad.sum()):
                self._quarantine(batch, bad & ~skipped, reason, result)
            ok = ~bad
            sensor, prop, ts, value = sensor[ok], prop[ok], ts[ok], value[ok]
        if value.shape[0] == 0:
            return result

        # ---- deduplicate
        group = sensor * self._n_props + prop
        dup = self._duplicates(group, ts)
        if dup is not None:
            result.duplicates = int(dup.sum())
            keep = ~dup
            group, ts, value = group[keep], ts[keep], value[keep]
        result.accepted = int(value.shape[0])
        if result.accepted == 0:
            return result
        newest = int(ts.max())
        if self._newest_event_ms is None or newest > self._newest_event_ms:
            self._newest_event_ms = newest
        if self._last_seen is not None:
            np.maximum.at(self._last_seen, group // self._n_props, ts)

        # ---- window
        window = ts // self.window_ms
        first, last = int(window.min()), int(window.max())
        result.newest_window = last
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
        return result

    # ---- outputs ------------------------------------------------------------------------
    def flush(self, watermark_ms: int | None = None) -> WindowAggregates:
        """Close windows whose end plus the allowed lateness is at or before the watermark (all,
        when None), and score them. ``closed_before`` moves past the last window closed."""
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

    @property
    def closed_before(self) -> int:
        """Window index below which every window is closed (0 before the first closes)."""
        return self._closed_before

    def restore(self, closed_before: int) -> None:
        """Resume from a checkpoint: windows below ``closed_before`` were closed and published."""
        self._closed_before = max(self._closed_before, closed_before)
        for w in [w for w in self._windows if w < self._closed_before]:
            del self._windows[w]

    @property
    def newest_event_ms(self) -> int | None:
        """The event clock: the newest accepted reading's time; None before the first."""
        return self._newest_event_ms

    @property
    def state_nbytes(self) -> int:
        """Bytes held by per-terminal and per-window arrays (names and lookup tables aside)."""
        held = self._ring.nbytes + self._ring_pos.nbytes + self._ring_newest.nbytes
        held += sum(acc.nbytes for acc in self._windows.values())
        return held + (self._last_seen.nbytes if self._last_seen is not None else 0)

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
        """Ids of a dictionary's terminals: -1 for none, ``_OVER_COUNT`` past ``max_terminals``."""
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
            if self.max_terminals is not None:
                fresh = fresh[: max(self.max_terminals - len(self._names), 0)]
            if fresh:
                if (len(self._names) + len(fresh)) * self._n_props >= 1 << (63 - _TS_BITS):
                    raise OverflowError(
                        f"sensor type {self.sensor_type.name!r}: too many terminals for one pipeline"
                    )
                self._names.extend(fresh)
                self._known = pd.Index(self._names)
                self._reserve(len(self._names))
                ids[new] = self._known.get_indexer(strings[new])
            ids[new[ids[new] < 0]] = _OVER_COUNT
        ids[~valid] = -1
        return ids

    def _map_props(self, dictionary: pa.Array) -> IntArray:
        return np.asarray(
            pc.index_in(dictionary, value_set=self._props).fill_null(-1).to_numpy(zero_copy_only=False),
            dtype=np.int64,
        )

    def _reserve(self, terminals: int) -> None:
        """Per-terminal arrays for at least ``terminals``, doubling (up to ``max_terminals``)."""
        if terminals <= self._capacity:
            return
        capacity = max(terminals, 2 * self._capacity, 64)
        if self.max_terminals is not None:
            capacity = max(terminals, min(capacity, self.max_terminals))
        old, size = self._capacity * self._n_props, capacity * self._n_props
        ring = np.full((size, self.ring_slots), _NO_TS, dtype=np.int64)
        ring[:old] = self._ring
        pos = np.zeros(size, dtype=np.uint8)
        pos[:old] = self._ring_pos
        newest = np.full(size, _NO_TS, dtype=np.int64)
        newest[:old] = self._ring_newest
        self._ring, self._ring_pos, self._ring_newest = ring, pos, newest
        if self._last_seen is not None:
            seen = np.zeros(capacity, dtype=np.int64)
            seen[: self._capacity] = self._last_seen
            self._last_seen = seen
        self._capacity = capacity

    def _duplicates(self, group: IntArray, ts: IntArray) -> npt.NDArray[np.bool_] | None:
        """Rows repeating an earlier row of this batch or a timestamp in their group's ring; None if none do.

        The rows that remain are remembered in the ring. A stable sort by (group, time) puts
        copies next to each other in arrival order, so the first copy is the one kept.
        """
        key = (group << _TS_BITS) | (ts - ts.min())
        order = np.argsort(key, kind="stable")
        ordered = key[order]
        g, t = group[order], ts[order]
        repeat = np.zeros(key.shape[0], dtype=bool)
        repeat[1:] = ordered[1:] == ordered[:-1]
        # only a row no newer than its group's newest remembered time can be in the ring
        suspect = np.flatnonzero((t <= self._ring_newest[g]) & ~repeat)
        if suspect.size:
            hit = (self._ring[g[suspect]] == t[suspect, None]).any(axis=1)
            repeat[suspect[hit]] = True
        if not repeat.any():
            self._remember(g, t)
            return None
        self._remember(g[~repeat], t[~repeat])
        dup = np.zeros(key.shape[0], dtype=bool)
        dup[order[repeat]] = True
        return dup

    def _remember(self, g: IntArray, t: IntArray) -> None:
        """Write accepted timestamps, sorted by (group, time), into their groups' rings."""
        m = g.shape[0]
        if m == 0:
            return
        starts = np.flatnonzero(np.concatenate(([True], g[1:] != g[:-1])))
        lengths = np.diff(np.append(starts, m))
        run_group = g[starts]
        self._ring_newest[run_group] = np.maximum(self._ring_newest[run_group], t[starts + lengths - 1])
        slots = self.ring_slots
        pos = self._ring_pos[run_group].astype(np.int64)
        self._ring_pos[run_group] = (pos + lengths) % slots
        if starts.shape[0] == m:  # one reading per group: no ranks to compute
            self._ring[run_group, pos] = t
            return
        rank = np.arange(m) - np.repeat(starts, lengths)
        newest_k = rank >= np.repeat(lengths - slots, lengths)  # a longer run keeps its newest K
        slot = (np.repeat(pos, lengths) + rank) % slots
        self._ring[g[newest_k], slot[newest_k]] = t[newest_k]

    def _quarantine(
        self,
        batch: pa.RecordBatch,
        bad: npt.NDArray[np.bool_],
        reason: npt.NDArray[np.uint8],
        result: BatchResult,
    ) -> None:
        codes = reason[bad]
        counts = np.bincount(codes, minlength=len(REASONS) + 1)
        for name, code in _REASON_CODE.items():
            if counts[code]:
                result.quarantined[name] += int(counts[code])
        labels = pa.array(np.asarray(("", *REASONS), dtype=object)[codes], pa.string())
        rows = batch.filter(pa.array(bad))
        result.quarantined_rows = pa.Table.from_batches(
            [pa.RecordBatch.from_arrays([*rows.columns, labels], names=[*rows.schema.names, "reason"])]
        ).cast(QUARANTINE_SCHEMA)


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


def _empty_windows() -> WindowAggregates:
    e = np.zeros(0)
    ei = np.zeros(0, dtype=np.int64)
    eo = np.zeros(0, dtype=object)
    return WindowAggregates(eo, eo, ei, ei, e, e, e, e)
