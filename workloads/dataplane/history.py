"""A fleet's window history: Parquet files partitioned by fleet and day, written from its windows stream.

``HistoryWriter`` is the durable consumer ``history`` of a fleet's windows stream. It buffers
windows (at most ``flush_windows`` of them) and, per flush, writes one file per day the
buffered windows start in::

    <root>/fleet=<fleet>/day=<YYYY-MM-DD>/part-<first seq>-<last seq>.parquet
    <root>/fleet=<fleet>/day=<YYYY-MM-DD>/compact-<first seq>-<last seq>-<windows>.parquet

Each file is written under a hidden temporary name, fsynced and renamed; only then are its
messages acknowledged. Every file records the exact stream sequences it holds (Parquet
key-value metadata), so a writer that restarts after a crash between the rename and the
acknowledgement acknowledges the redelivered windows without writing them again: each
window appears once, whatever the redelivery brings along with it.

A day's parts are merged into one ``compact-`` file when the day is over; the merged file
names the files it replaces, so a reader that lists both keeps the merged one only and a
reader never sees a row twice or misses one. One process writes a fleet's history: the
durable consumer's single writer (compaction and retention run inside it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from citynerve.workloads.dataplane.names import HISTORY_CONSUMER, windows_stream, windows_subject
from citynerve.workloads.dataplane.windows import Window
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

log = logging.getLogger(__name__)
DEFAULT_FLUSH_WINDOWS = 1000  # windows held before a Parquet file is written
DEFAULT_FLUSH_SECONDS = 10.0  # or this long after the oldest held window arrived


def default_ack_wait(flush_seconds: float) -> float:
    """How long a delivered window waits for its file: a flush's wait and write, with a margin. A
    writer that died holding windows sees them again this long after (a restart's gap in the history)."""
    return 2 * flush_seconds + 10.0

HISTORY_SCHEMA = pa.schema(
    [
        pa.field("city", pa.string()),
        pa.field("fleet", pa.string()),
        pa.field("property", pa.string()),
        pa.field("window_start", pa.timestamp("ms", tz="UTC")),
        pa.field("window_seconds", pa.int32()),
        pa.field("sensor", pa.string()),
        pa.field("count", pa.int64()),
        pa.field("mean", pa.float64()),
        pa.field("minimum", pa.float64()),
        pa.field("maximum", pa.float64()),
    ]
)
SORT_KEYS = [("window_start", "ascending"), ("property", "ascending"), ("sensor", "ascending")]
SEQS_KEY = b"citynerve.stream_seqs"  # the stream sequences a file holds, as ranges "1-10,12"
REPLACES_KEY = b"citynerve.replaces"  # in a compact file: the names of the files it merged
_PARTITIONING = ds.partitioning(pa.schema([("fleet", pa.string()), ("day", pa.string())]), flavor="hive")
_FILE = re.compile(r"^(?:part-(\d+)-(\d+)|compact-(\d+)-(\d+)-\d+)\.parquet$")
_DAY = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")
_READ_ATTEMPTS = 5  # a compaction or a prune may move files between listing and reading them


# -- files -----------------------------------------------------------------------------------------
def fleet_dir(root: Path, fleet: str) -> Path:
    return root / f"fleet={fleet}"


def day_dir(root: Path, fleet: str, day: str) -> Path:
    return fleet_dir(root, fleet) / f"day={day}"


def day_of(start_ms: int) -> str:
    """The UTC day a window belongs to: the day it starts in."""
    return datetime.fromtimestamp(start_ms / 1000, UTC).strftime("%Y-%m-%d")


def format_seqs(seqs: Iterable[int]) -> str:
    """Sorted stream sequences as ranges: ``1-10,12,15-20``."""
    ranges: list[str] = []
    ordered = sorted(set(seqs))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        ranges.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(ranges)


def parse_seqs(text: str) -> list[int]:
    seqs: list[int] = []
    for item in filter(None, text.split(",")):
        first, _, last = item.partition("-")
        seqs.extend(range(int(first), int(last or first) + 1))
    return seqs


def window_rows(window: Window) -> pa.Table:
    """The history rows of one window: one per terminal that reported in it."""
    n = len(window.sensor)
    return pa.table(
        [pa.repeat(window.city, n), pa.repeat(window.fleet, n), pa.repeat(window.prop, n),
         pa.array(np.full(n, window.start_ms, np.int64), pa.timestamp("ms", tz="UTC")),
         pa.array(np.full(n, window.seconds, np.int32)), pa.array(window.sensor, pa.string()),
         window.count, window.mean, window.minimum, window.maximum],
        schema=HISTORY_SCHEMA,
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dir(path: Path) -> None:
    """Create a directory durably: its entry in the parent is fsynced too."""
    if path.is_dir():
        return
    _make_dir(path.parent)
    path.mkdir(exist_ok=True)
    _fsync_dir(path.parent)


def _write_atomic(directory: Path, name: str, table: pa.Table, metadata: dict[bytes, bytes]) -> Path:
    """Write ``table`` as ``directory/name``: a temporary name, fsync, rename, fsync the folder."""
    _make_dir(directory)
    final, temporary = directory / name, directory / f".{name}.tmp"
    table = table.sort_by(SORT_KEYS).replace_schema_metadata(metadata)
    with temporary.open("wb") as sink:
        pq.write_table(table, sink, compression="zstd")
        sink.flush()
        os.fsync(sink.fileno())
    temporary.replace(final)
    _fsync_dir(directory)
    return final


def write_part(root: Path, fleet: str, day: str, seqs: Sequence[int], table: pa.Table) -> Path:
    """One flush's windows of one day, named by the range of stream sequences they came from."""
    name = f"part-{min(seqs)}-{max(seqs)}.parquet"
    return _write_atomic(day_dir(root, fleet, day), name, table, {SEQS_KEY: format_seqs(seqs).encode()})


def _file_metadata(path: Path) -> dict[bytes, bytes]:
    return dict(pq.read_metadata(path).metadata or {})


def live_files(directory: Path) -> list[Path]:
    """A day's files a reader reads: those no compact file present replaces (sorted by name)."""
    try:
        names = sorted(e.name for e in os.scandir(directory) if _FILE.match(e.name))
    except FileNotFoundError:
        return []
    replaced: set[str] = set()
    if len(names) > 1:
        for name in names:
            if name.startswith("compact-"):
                replaces = _file_metadata(directory / name).get(REPLACES_KEY, b"").decode()
                replaced.update(filter(None, replaces.split(",")))
    return [directory / n for n in names if n not in replaced]


def days(root: Path, fleet: str) -> list[str]:
    """The days a fleet's history holds, oldest first."""
    try:
        entries = os.scandir(fleet_dir(root, fleet))
    except FileNotFoundError:
        return []
    with entries:
        return sorted(m.group(1) for e in entries if (m := _DAY.match(e.name)) and e.is_dir())


def written_seqs(root: Path, fleet: str, after: int = 0) -> set[int]:
    """The stream sequences above ``after`` that the fleet's history already holds."""
    held: set[int] = set()
    for day in days(root, fleet):
        for path in live_files(day_dir(root, fleet, day)):
            match = _FILE.match(path.name)
            assert match is not None
            last = int(match.group(2) or match.group(4))
            if last > after:
                seqs = parse_seqs(_file_metadata(path).get(SEQS_KEY, b"").decode())
                held.update(s for s in seqs if s > after)
    return held


# -- compaction and retention ------------------------------------------------------------------------
def compact(root: Path, fleet: str, day: str) -> Path | None:
    """Merge a day's files into one; returns it, or None when the day already is one file.

    The merged file is renamed into place before the files it replaces are removed, and names
    them: a reader that lists the folder in between keeps the merged file only.
    """
    directory = day_dir(root, fleet, day)
    for leftover in directory.glob(".*.tmp"):
        leftover.unlink()
    present = {e.name for e in os.scandir(directory)} if directory.is_dir() else set()
    files = live_files(directory)
    for superseded in sorted(present - {f.name for f in files}):
        if _FILE.match(superseded):
            (directory / superseded).unlink()
    if len(files) <= 1:
        return None
    seqs: list[int] = []
    tables = []
    for path in files:
        seqs.extend(parse_seqs(_file_metadata(path).get(SEQS_KEY, b"").decode()))
        tables.append(pq.read_table(path, schema=HISTORY_SCHEMA))
    merged = pa.concat_tables(tables)
    name = f"compact-{min(seqs)}-{max(seqs)}-{len(set(seqs))}.parquet"
    metadata = {SEQS_KEY: format_seqs(seqs).encode(), REPLACES_KEY: ",".join(f.name for f in files).encode()}
    path = _write_atomic(directory, name, merged, metadata)
    for replaced in files:
        replaced.unlink()
    _fsync_dir(directory)
    log.info("history of fleet %s, %s: %d files compacted into %s (%d rows)",
             fleet, day, len(files), name, merged.num_rows)
    return path


def prune(root: Path, fleet: str, keep_days: int, today: date | None = None) -> list[str]:
    """Remove the fleet's day partitions older than ``today - keep_days``; returns the days removed.

    A day is first renamed to a hidden name (readers list ``day=`` folders only), then deleted.
    """
    today = today or datetime.now(UTC).date()
    cutoff = (today - timedelta(days=keep_days)).isoformat()
    removed = [d for d in days(root, fleet) if d < cutoff]
    for day in removed:
        doomed = fleet_dir(root, fleet) / f".day={day}.pruned"
        day_dir(root, fleet, day).rename(doomed)
        shutil.rmtree(doomed)
    if removed:
        _fsync_dir(fleet_dir(root, fleet))
        log.info("history of fleet %s: %d days older than %s removed", fleet, len(removed), cutoff)
    return removed


# -- reading -----------------------------------------------------------------------------------------
def _utc(moment: datetime, name: str) -> datetime:
    if moment.tzinfo is None:
        msg = f"read_history: {name}={moment.isoformat()} has no time zone; give an aware datetime (UTC)"
        raise ValueError(msg)
    return moment.astimezone(UTC)


def _day_groups(root: Path, fleet: str, selected: list[str]) -> list[tuple[bool, list[Path]]]:
    """The days' files in day order, each group with whether it needs sorting once read.

    Days do not overlap in time and every file is written sorted, so consecutive one-file days
    read in order are sorted already (one group); a day of several files is a group of its own.
    """
    groups: list[tuple[bool, list[Path]]] = []
    for day in selected:
        files = live_files(day_dir(root, fleet, day))
        if len(files) == 1 and groups and not groups[-1][0]:
            groups[-1][1].extend(files)
        elif files:
            groups.append((len(files) > 1, files))
    return groups


def _scan(root: Path, files: list[Path], condition: pc.Expression, *, sort: bool) -> pa.Table:
    # a dataset's to_table keeps the files' order and each file's row order
    dataset = ds.dataset([str(f) for f in files], format="parquet", partitioning=_PARTITIONING,
                         partition_base_dir=str(root))
    table = dataset.to_table(columns=HISTORY_SCHEMA.names, filter=condition).cast(HISTORY_SCHEMA)
    return table.sort_by(SORT_KEYS) if sort else table


def read_history(
    root: Path,
    fleet: str,
    start: datetime | None = None,
    end: datetime | None = None,
    properties: Sequence[str] | None = None,
    sensors: Sequence[str] | None = None,
) -> pa.Table:
    """A fleet's windows starting in ``[start, end)``, sorted by (window_start, property, sensor).

    Days outside the range are never listed (partition pruning); the time, property and sensor
    filters are pushed down to the Parquet row groups.
    """
    start = _utc(start, "start") if start else None
    end = _utc(end, "end") if end else None
    first_day = start.date().isoformat() if start else None
    last_day = (end - timedelta(milliseconds=1)).date().isoformat() if end else None
    condition = pc.scalar(True)
    if first_day:
        condition &= pc.field("day") >= first_day
    if last_day:
        condition &= pc.field("day") <= last_day
    if start:
        condition &= pc.field("window_start") >= pa.scalar(start, HISTORY_SCHEMA.field("window_start").type)
    if end:
        condition &= pc.field("window_start") < pa.scalar(end, HISTORY_SCHEMA.field("window_start").type)
    if properties is not None:
        condition &= pc.field("property").isin(list(properties))
    if sensors is not None:
        condition &= pc.field("sensor").isin(list(sensors))
    for _ in range(_READ_ATTEMPTS):
        selected = [d for d in days(root, fleet)
                    if (first_day is None or d >= first_day) and (last_day is None or d <= last_day)]
        try:
            pieces = [_scan(root, files, condition, sort=needs_sort)
                      for needs_sort, files in _day_groups(root, fleet, selected)]
        except FileNotFoundError:
            continue  # compacted or pruned between the listing and the reading: list again
        if not pieces:
            return HISTORY_SCHEMA.empty_table()
        return pa.concat_tables(pieces)
    msg = f"the history of fleet {fleet} under {root} kept changing while read ({_READ_ATTEMPTS} tries)"
    raise RuntimeError(msg)


# -- the writer --------------------------------------------------------------------------------------
def history_consumer_config(
    city: str, fleet: str, flush_windows: int = DEFAULT_FLUSH_WINDOWS,
    ack_wait_seconds: float = default_ack_wait(DEFAULT_FLUSH_SECONDS),
) -> ConsumerConfig:
    """The durable consumer the history reads a fleet's windows with (the city operator makes it
    with the fleet's streams, so the fleet's worker needs no right to create consumers)."""
    return ConsumerConfig(
        durable_name=HISTORY_CONSUMER, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
        ack_wait=ack_wait_seconds, max_ack_pending=flush_windows, filter_subject=windows_subject(city, fleet),
    )


class HistoryWriter:
    """The durable consumer of a fleet's windows stream that writes the fleet's Parquet history.

    At most ``flush_windows`` windows are held; they are written when that many are held or
    ``flush_seconds`` after the oldest of them arrived. The consumer is created if missing
    (acknowledgement wait ``ack_wait_seconds``: longer than a flush takes, or windows come
    again while they are held) and bound as it is if it exists. A day is compacted once a
    window of a later day is written; with ``retention_days``, older days are then pruned
    (by the windows' clock, so a drill's replayed past is not pruned by the wall clock).
    """

    def __init__(
        self,
        js: JetStreamContext,
        city: str,
        fleet: str,
        root: Path,
        *,
        flush_windows: int = DEFAULT_FLUSH_WINDOWS,
        flush_seconds: float = DEFAULT_FLUSH_SECONDS,
        ack_wait_seconds: float | None = None,
        retention_days: int | None = None,
    ) -> None:
        if flush_windows < 1 or flush_seconds <= 0:
            msg = f"history of fleet {fleet}: flush_windows ≥ 1 and flush_seconds > 0 (got {flush_windows}, "
            msg += f"{flush_seconds})"
            raise ValueError(msg)
        self.js, self.city, self.fleet, self.root = js, city, fleet, root
        self.flush_windows, self.flush_seconds = flush_windows, flush_seconds
        wait = default_ack_wait(flush_seconds) if ack_wait_seconds is None else ack_wait_seconds
        self.ack_wait_seconds: float = wait
        self.retention_days = retention_days
        self.stream = windows_stream(fleet)
        self._buffer: dict[int, tuple[Msg, Window]] = {}  # by stream sequence: a redelivery replaces
        self._oldest_at = 0.0
        self._written: set[int] = set()  # sequences in files, not yet below the consumer's ack floor
        self._open_days: set[str] = set()  # days written to and not compacted since
        self._newest_day = ""
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Ask ``run`` to write what it holds and return."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume the fleet's windows until ``stop``; what is held when stopped is written."""
        config = history_consumer_config(self.city, self.fleet, self.flush_windows, self.ack_wait_seconds)
        sub = await self.js.pull_subscribe(windows_subject(self.city, self.fleet), durable=HISTORY_CONSUMER,
                                           stream=self.stream, config=config)
        info = await self.js.consumer_info(self.stream, HISTORY_CONSUMER)
        floor = info.ack_floor.stream_seq
        self._written = await asyncio.to_thread(written_seqs, self.root, self.fleet, floor)
        self._open_days = {d for d in days(self.root, self.fleet)
                           if len(live_files(day_dir(self.root, self.fleet, d))) > 1}
        try:
            while not self._stopping.is_set():
                timeout = 1.0
                if self._buffer:
                    timeout = min(timeout, max(0.05, self._oldest_at + self.flush_seconds - time.monotonic()))
                try:
                    msgs = await sub.fetch(self.flush_windows - len(self._buffer), timeout=timeout)
                except TimeoutError:  # nats-py raises its own subclass, or asyncio's, when nothing came
                    msgs = []
                for msg in msgs:
                    await self._take(msg)
                due = self._buffer and time.monotonic() >= self._oldest_at + self.flush_seconds
                if len(self._buffer) >= self.flush_windows or due:
                    await self.flush()
            await self.flush()
        finally:
            await sub.unsubscribe()

    async def _take(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq in self._written:
            await msg.ack()  # written before a crash that came before its acknowledgement
            return
        try:
            window = Window.decode(msg.data)
            problem = "" if (window.city, window.fleet) == (self.city, self.fleet) else (
                f"a window of {window.city}/{window.fleet}")
        except ValueError as exc:  # pyarrow's ArrowInvalid is one
            problem = f"not a window ({exc})"
        if problem:
            log.error("history of fleet %s: message %s:%d is %s; terminated, not written",
                      self.fleet, self.stream, seq, problem)
            await msg.term()
            return
        if not self._buffer:
            self._oldest_at = time.monotonic()
        self._buffer[seq] = (msg, window)

    async def flush(self) -> None:
        """Write the held windows (a file per day), then acknowledge them."""
        if not self._buffer:
            return
        held, self._buffer = self._buffer, {}
        by_day: dict[str, list[int]] = {}
        for seq, (_, window) in held.items():
            by_day.setdefault(day_of(window.start_ms), []).append(seq)
        for day, seqs in sorted(by_day.items()):
            table = pa.concat_tables([window_rows(held[s][1]) for s in seqs])
            path = await asyncio.to_thread(write_part, self.root, self.fleet, day, seqs, table)
            log.debug("history of fleet %s: %s written (%d windows, %d rows)",
                      self.fleet, path, len(seqs), table.num_rows)
        await self._acknowledge([msg for msg, _ in held.values()])
        self._written.update(held)
        info = await self.js.consumer_info(self.stream, HISTORY_CONSUMER)
        self._written = {s for s in self._written if s > info.ack_floor.stream_seq}
        self._open_days.update(by_day)
        self._newest_day = max(self._newest_day, *by_day)
        await self._close_days()

    async def _acknowledge(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            await msg.ack()

    async def _close_days(self) -> None:
        """Compact the days before the newest one written; prune past retention."""
        closed = sorted(d for d in self._open_days if d < self._newest_day)
        for day in closed:
            await asyncio.to_thread(compact, self.root, self.fleet, day)
            self._open_days.discard(day)
        if closed and self.retention_days is not None:
            today = date.fromisoformat(self._newest_day)
            await asyncio.to_thread(prune, self.root, self.fleet, self.retention_days, today)
