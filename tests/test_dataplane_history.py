"""A fleet's window history: stream windows become Parquet rows once; compaction, reads, retention."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import pytest_asyncio
from citynerve.workloads.dataplane.broker import OPERATOR_USER
from citynerve.workloads.dataplane.history import (
    HISTORY_SCHEMA,
    SORT_KEYS,
    HistoryWriter,
    compact,
    day_dir,
    days,
    live_files,
    prune,
    read_history,
    window_rows,
    write_part,
)
from citynerve.workloads.dataplane.names import HISTORY_CONSUMER, windows_stream, windows_subject
from citynerve.workloads.dataplane.streams import ensure_fleet_streams
from citynerve.workloads.dataplane.windows import Window
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

pytestmark = pytest.mark.timeout(60)
CITY, FLEET = "pudong", "pudong-pressure"
DAY0_MS = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp() * 1000)
FIVE_MIN_MS = 300_000


def window(prop: str, index: int, terminals: int = 3, city: str = CITY) -> Window:
    """The ``index``-th 5-minute window of ``prop`` after 2026-03-01 22:00 UTC (index 24: the next day)."""
    values = 300.0 + index + np.arange(terminals, dtype=np.float64)
    return Window(city=city, fleet=FLEET, prop=prop, start_ms=DAY0_MS + 22 * 3_600_000 + index * FIVE_MIN_MS,
                  seconds=300, sensor=np.asarray([f"g{i}" for i in range(terminals)], dtype=object),
                  count=np.full(terminals, 5, np.int64), mean=values, minimum=values - 1.0,
                  maximum=values + 1.0)


def expected_rows(windows: list[Window]) -> pa.Table:
    return pa.concat_tables([window_rows(w) for w in windows]).sort_by(SORT_KEYS).combine_chunks()


def keys(table: pa.Table) -> list[tuple[object, ...]]:
    columns = (table.column(c).to_pylist() for c in ("property", "window_start", "sensor"))
    return list(zip(*columns, strict=True))


# -- the city's broker (the shared fixture), the fleet's windows stream ---------------------------------
@dataclass(frozen=True)
class Stream:
    js: JetStreamContext
    city: str
    url: str
    password: str  # the operator's (in a city the writer runs in the fleet's worker, as its user)


@pytest_asyncio.fixture
async def stream(broker: Any) -> AsyncIterator[Stream]:
    nc = await nats.connect(broker.broker.url, user=OPERATOR_USER, password=broker.operator_password)
    js = nc.jetstream()
    await ensure_fleet_streams(js, broker.city, FLEET, window_s=300, allowed_lateness_s=60,
                               retention_hours=24)
    # Each test's writer makes the consumer with the acknowledgement wait it needs (seconds, not
    # the operator's default), as a writer does where none was made.
    await js.delete_consumer(windows_stream(FLEET), HISTORY_CONSUMER)
    yield Stream(js, broker.city, broker.broker.url, broker.operator_password)
    await nc.close()


async def publish(stream: Stream, windows: list[Window]) -> None:
    for w in windows:
        await stream.js.publish(windows_subject(stream.city, FLEET, w.prop), w.encode(), headers=w.headers())


async def all_acknowledged(js: JetStreamContext, published: int, writer: asyncio.Task[None],
                           within_s: float = 20.0) -> None:
    """Wait until the history consumer exists and has acknowledged every message of the stream."""
    deadline = time.monotonic() + within_s
    info = None
    while True:
        if writer.done():
            writer.result()  # the writer's error, if it failed
            raise AssertionError("the history writer returned before it was stopped")
        try:
            info = await js.consumer_info(windows_stream(FLEET), HISTORY_CONSUMER)
            if info.ack_floor.stream_seq >= published and info.num_ack_pending == 0:
                return
        except NotFoundError:
            pass  # the writer has not created it yet
        assert time.monotonic() < deadline, f"history consumer stuck: {info}"
        await asyncio.sleep(0.05)


async def run_until_acknowledged(writer: HistoryWriter, published: int) -> None:
    task = asyncio.create_task(writer.run())
    try:
        await all_acknowledged(writer.js, published, task)
    finally:
        writer.stop()
        await asyncio.wait_for(task, 10)


# -- the writer on a real stream ------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_published_windows_become_history_rows_and_a_closed_day_is_one_file(
        stream: Stream, tmp_path: Path) -> None:
    windows = [window(p, i, city=stream.city) for i in range(30) for p in ("pressure", "batteryLevel")]
    await publish(stream, windows)  # 22:00 to 00:25 the next day
    writer = HistoryWriter(stream.js, stream.city, FLEET, tmp_path, flush_windows=8, flush_seconds=0.2)
    await run_until_acknowledged(writer, len(windows))

    history = read_history(tmp_path, FLEET)
    assert history.equals(expected_rows(windows))
    assert history.num_rows == 60 * 3
    assert history.slice(1, 1).to_pylist() == [{  # the first window's second row, column by column
        "city": stream.city, "fleet": FLEET, "property": "batteryLevel",
        "window_start": datetime(2026, 3, 1, 22, 0, tzinfo=UTC), "window_seconds": 300, "sensor": "g1",
        "count": 5, "mean": 301.0, "minimum": 300.0, "maximum": 302.0}]
    assert days(tmp_path, FLEET) == ["2026-03-01", "2026-03-02"]
    first_day = [f.name for f in live_files(day_dir(tmp_path, FLEET, "2026-03-01"))]
    assert len(first_day) == 1, first_day
    assert first_day[0].startswith("compact-")
    assert all(f.name.startswith("part-") for f in live_files(day_dir(tmp_path, FLEET, "2026-03-02")))


@pytest.mark.asyncio
async def test_a_restarted_writer_resumes_without_duplicates(stream: Stream, tmp_path: Path) -> None:
    first = [window("pressure", i, city=stream.city) for i in range(10)]
    await publish(stream, first)
    await run_until_acknowledged(
        HistoryWriter(stream.js, stream.city, FLEET, tmp_path, flush_windows=4, flush_seconds=0.2),
        len(first))
    second = [window("pressure", i, city=stream.city) for i in range(10, 30)]
    await publish(stream, second)
    await run_until_acknowledged(
        HistoryWriter(stream.js, stream.city, FLEET, tmp_path, flush_windows=4, flush_seconds=0.2),
        len(first) + len(second))

    assert read_history(tmp_path, FLEET).equals(expected_rows(first + second))


@pytest.mark.asyncio
async def test_a_message_that_is_not_a_window_is_terminated_and_the_rest_written(
        stream: Stream, tmp_path: Path) -> None:
    windows = [window("pressure", i, city=stream.city) for i in range(3)]
    await publish(stream, windows[:1])
    await stream.js.publish(windows_subject(stream.city, FLEET, "pressure"), b"not arrow")
    await publish(stream, windows[1:])
    await run_until_acknowledged(
        HistoryWriter(stream.js, stream.city, FLEET, tmp_path, flush_windows=8, flush_seconds=0.2), 4)

    assert read_history(tmp_path, FLEET).equals(expected_rows(windows))


KILLED_WRITER = """
import asyncio, os, signal, sys
from pathlib import Path
import nats
from citynerve.workloads.dataplane.history import HistoryWriter

class KilledBeforeAcknowledging(HistoryWriter):
    async def _acknowledge(self, msgs):
        os.kill(os.getpid(), signal.SIGKILL)  # the file is renamed into place; no message is acknowledged

async def main():
    url, user, city, fleet, root = sys.argv[1:]
    nc = await nats.connect(url, user=user, password=os.environ["BROKER_PASSWORD"])
    writer = KilledBeforeAcknowledging(nc.jetstream(), city, fleet, Path(root),
                                       flush_windows=4, flush_seconds=30, ack_wait_seconds=1)
    await writer.run()

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_killed_between_rename_and_ack_every_window_appears_once(
        stream: Stream, tmp_path: Path) -> None:
    root = tmp_path / "history"
    first = [window("pressure", i, city=stream.city) for i in range(6)]
    await publish(stream, first)
    script = tmp_path / "killed_writer.py"
    script.write_text(KILLED_WRITER)
    killed = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stream.url, OPERATOR_USER, stream.city, FLEET, str(root),
        env={**os.environ, "BROKER_PASSWORD": stream.password})
    assert await asyncio.wait_for(killed.wait(), 30) == -signal.SIGKILL
    written = [f.name for f in live_files(day_dir(root, FLEET, "2026-03-01"))]
    assert written == ["part-1-4.parquet"]  # renamed, then killed
    inode = (day_dir(root, FLEET, "2026-03-01") / written[0]).stat().st_ino
    info = await stream.js.consumer_info(windows_stream(FLEET), HISTORY_CONSUMER)
    assert info.ack_floor.stream_seq == 0

    # redelivered after the 1 s acknowledgement wait, then the windows published since
    second = [window("pressure", i, city=stream.city) for i in range(6, 12)]
    await publish(stream, second)
    writer = HistoryWriter(stream.js, stream.city, FLEET, root, flush_windows=5, flush_seconds=0.3,
                           ack_wait_seconds=1)
    await run_until_acknowledged(writer, len(first) + len(second))

    history = read_history(root, FLEET)
    assert len(set(keys(history))) == history.num_rows  # no row twice
    assert history.equals(expected_rows(first + second))
    # the redelivered windows were acknowledged as written, not written again
    assert (day_dir(root, FLEET, "2026-03-01") / written[0]).stat().st_ino == inode


# -- files, compaction, reading, retention (no broker) --------------------------------------------------
def write_windows(root: Path, windows: list[Window], first_seq: int) -> Path:
    day = datetime.fromtimestamp(windows[0].start_ms / 1000, UTC).date().isoformat()
    seqs = list(range(first_seq, first_seq + len(windows)))
    return write_part(root, FLEET, day, seqs, pa.concat_tables([window_rows(w) for w in windows]))


def test_compaction_keeps_every_row_once_even_while_replaced_parts_are_still_there(tmp_path: Path) -> None:
    windows = [window(prop, i) for i in range(20) for prop in ("pressure", "batteryLevel")]  # all on 03-01
    parts = [write_windows(tmp_path, windows[i:i + 7], i + 1) for i in range(0, 40, 7)]
    before = read_history(tmp_path, FLEET)
    assert before.equals(expected_rows(windows))

    merged = compact(tmp_path, FLEET, "2026-03-01")
    assert merged is not None
    assert merged.name == "compact-1-40-40.parquet"
    assert [p.exists() for p in parts] == [False] * len(parts)
    assert read_history(tmp_path, FLEET).equals(before)
    assert compact(tmp_path, FLEET, "2026-03-01") is None  # one file: nothing to do

    # what a reader lists between the merged file's rename and the parts' removal
    write_windows(tmp_path, windows[0:7], 1)
    assert read_history(tmp_path, FLEET).equals(before)
    # a late window after the compaction: a new part, merged with the compact file next time
    late = window("pressure", 21)
    write_windows(tmp_path, [late], 41)
    assert read_history(tmp_path, FLEET).equals(expected_rows([*windows, late]))
    again = compact(tmp_path, FLEET, "2026-03-01")
    assert again is not None
    assert [f.name for f in live_files(again.parent)] == ["compact-1-41-41.parquet"]
    assert sorted(p.name for p in again.parent.iterdir()) == ["compact-1-41-41.parquet"]
    assert read_history(tmp_path, FLEET).equals(expected_rows([*windows, late]))


def test_read_filters_by_time_property_and_sensor(tmp_path: Path) -> None:
    windows = [window(prop, i, terminals=4) for i in range(40) for prop in ("pressure", "batteryLevel")]
    write_windows(tmp_path, [w for w in windows if w.start_ms < DAY0_MS + 86_400_000], 1)
    write_windows(tmp_path, [w for w in windows if w.start_ms >= DAY0_MS + 86_400_000], 100)
    everything = expected_rows(windows)

    start = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)
    end = datetime(2026, 3, 2, 0, 45, tzinfo=UTC)
    ts = everything.column("window_start")
    in_range = pc.and_(pc.greater_equal(ts, pa.scalar(start, ts.type)), pc.less(ts, pa.scalar(end, ts.type)))
    assert read_history(tmp_path, FLEET, start=start, end=end).equals(everything.filter(in_range))
    assert read_history(tmp_path, FLEET, start=start, end=end).num_rows == 15 * 2 * 4

    pressure = pc.equal(everything.column("property"), "pressure")
    assert read_history(tmp_path, FLEET, properties=["pressure"]).equals(everything.filter(pressure))
    sensors = pc.is_in(everything.column("sensor"), pa.array(["g1", "g3"]))
    got = read_history(tmp_path, FLEET, start=start, properties=["pressure"], sensors=["g1", "g3"])
    ts_from = pc.greater_equal(ts, pa.scalar(start, ts.type))
    assert got.equals(everything.filter(pc.and_(pc.and_(pressure, sensors), ts_from)))
    assert set(got.column("sensor").to_pylist()) == {"g1", "g3"}

    # only the next day's files are listed; an empty answer keeps the schema
    assert read_history(tmp_path, FLEET, start=datetime(2026, 3, 2, tzinfo=UTC)).num_rows == 16 * 2 * 4
    nothing = read_history(tmp_path, FLEET, start=datetime(2027, 1, 1, tzinfo=UTC))
    assert nothing.num_rows == 0
    assert nothing.schema == HISTORY_SCHEMA
    assert read_history(tmp_path, "another-fleet").num_rows == 0
    with pytest.raises(ValueError, match="no time zone"):
        read_history(tmp_path, FLEET, start=datetime(2026, 3, 1))  # noqa: DTZ001 (the case refused)


def test_prune_removes_whole_days_older_than_retention_only(tmp_path: Path) -> None:
    first = date(2026, 3, 1)
    for offset in range(10):
        day = first + timedelta(days=offset)
        start_ms = int(datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp() * 1000)
        w = Window(CITY, FLEET, "pressure", start_ms, 300, np.asarray(["g0"], dtype=object),
                   np.ones(1, np.int64), np.ones(1), np.ones(1), np.ones(1))
        write_windows(tmp_path, [w], offset + 1)

    removed = prune(tmp_path, FLEET, keep_days=3, today=date(2026, 3, 10))
    assert removed == [f"2026-03-0{d}" for d in range(1, 7)]
    assert days(tmp_path, FLEET) == ["2026-03-07", "2026-03-08", "2026-03-09", "2026-03-10"]
    assert sorted(p.name for p in (tmp_path / f"fleet={FLEET}").iterdir()) == [
        "day=2026-03-07", "day=2026-03-08", "day=2026-03-09", "day=2026-03-10"]
    kept = read_history(tmp_path, FLEET).column("window_start").to_pylist()
    assert [t.date() for t in kept] == [date(2026, 3, d) for d in range(7, 11)]
    assert prune(tmp_path, FLEET, keep_days=3, today=date(2026, 3, 10)) == []



def test_a_reader_during_writes_and_compactions_sees_every_finished_window_once(tmp_path: Path) -> None:
    windows = [window("pressure", i) for i in range(24)]  # all on 2026-03-01
    finished = 0
    failure: list[BaseException] = []

    def write_and_compact() -> None:
        nonlocal finished
        try:
            for i, w in enumerate(windows):
                write_windows(tmp_path, [w], i + 1)
                finished = i + 1
                if i % 3 == 2:
                    compact(tmp_path, FLEET, "2026-03-01")
        except BaseException as exc:  # noqa: BLE001 (handed to the test's thread)
            failure.append(exc)

    writer = threading.Thread(target=write_and_compact)
    writer.start()
    reads = 0
    while writer.is_alive() or reads == 0:
        before = finished
        history = read_history(tmp_path, FLEET)
        seen = keys(history)
        assert len(set(seen)) == len(seen), "a row read twice"
        if before:
            assert set(keys(expected_rows(windows[:before]))) <= set(seen), "a finished window missing"
        reads += 1
    writer.join()
    assert not failure, failure
    assert reads > 1
    assert read_history(tmp_path, FLEET).equals(expected_rows(windows))


def test_a_window_is_filed_under_the_day_it_starts_in(tmp_path: Path) -> None:
    start_ms = DAY0_MS + 86_400_000 - 600_000  # 23:50, a 20-minute window (does not divide a day)
    w = Window(CITY, FLEET, "pressure", start_ms, 1200, np.asarray(["g0"], dtype=object),
               np.ones(1, np.int64), np.ones(1), np.ones(1), np.ones(1))
    write_windows(tmp_path, [w], 1)
    assert days(tmp_path, FLEET) == ["2026-03-01"]
    assert read_history(tmp_path, FLEET, start=datetime(2026, 3, 2, tzinfo=UTC)).num_rows == 0
    assert read_history(tmp_path, FLEET, end=datetime(2026, 3, 2, tzinfo=UTC)).equals(expected_rows([w]))
