"""Window history: reading a year of a fleet's 5-minute windows, against one un-partitioned file.

A year (365 days) of 5-minute windows of 2 properties for ``TERMINALS`` terminals is written
as the history keeps it (a compacted file per day, ``fleet=<fleet>/day=<day>/``) and, as the
baseline, as one Parquet file of the same rows (same sort, same zstd, default row groups).
Each query is answered by ``read_history`` and by the same filter on the one file through
pyarrow.dataset (its row-group statistics pushed down too; the file is written in the
history's order, so it needs no sort), and the answers are checked equal. Writing figures
come from the history's own code: a day of ``Window`` messages written as hourly parts, then
compacted into one file.

The ask is 1,000 terminals (≈ 210 M rows a year); that does not fit the bench's minute (nor
this machine's memory as one table of plain strings, ≈ 100 B a row), so it runs 50 terminals
(10.5 M rows) and states rows/s, from which the full size follows linearly (a day's file is
then twenty times larger, the number of files the same). Reads use Arrow's thread pool; the
machine's load average is part of the figures, as the cores are shared.

    .venv/bin/python bench/history.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from citynerve.workloads.dataplane.history import (
    HISTORY_SCHEMA,
    compact,
    read_history,
    window_rows,
    write_part,
)
from citynerve.workloads.dataplane.windows import Window

CITY, FLEET = "shanghai", "pudong-pressure"
TERMINALS = 50
PROPERTIES = ("batteryLevel", "pressure")  # sorted, as the history sorts them
DAYS = 365
WINDOW_S = 300
WINDOWS_PER_DAY = 86_400 // WINDOW_S
FIRST_DAY = date(2025, 1, 1)
SENSORS = pa.array([f"logger-{i:04d}" for i in range(TERMINALS)], pa.string())


def day_table(day: date, rng: np.random.Generator) -> pa.Table:
    """A day of windows of every terminal and property, sorted as the history stores it."""
    per_window = len(PROPERTIES) * TERMINALS
    n = WINDOWS_PER_DAY * per_window
    day_ms = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
    starts = day_ms + np.repeat(np.arange(WINDOWS_PER_DAY, dtype=np.int64) * WINDOW_S * 1000, per_window)
    prop = pa.DictionaryArray.from_arrays(
        pa.array(np.tile(np.repeat(np.arange(len(PROPERTIES), dtype=np.int32), TERMINALS), WINDOWS_PER_DAY)),
        pa.array(PROPERTIES)).cast(pa.string())
    sensor = pa.DictionaryArray.from_arrays(
        pa.array(np.tile(np.arange(TERMINALS, dtype=np.int32), WINDOWS_PER_DAY * len(PROPERTIES))),
        SENSORS).cast(pa.string())
    mean = 300.0 + rng.standard_normal(n)
    return pa.table(
        [pa.repeat(CITY, n), pa.repeat(FLEET, n), prop, pa.array(starts, pa.timestamp("ms", tz="UTC")),
         pa.array(np.full(n, WINDOW_S, np.int32)), sensor, pa.array(rng.integers(5, 11, n)),
         pa.array(mean), pa.array(mean - 1.0), pa.array(mean + 1.0)],
        schema=HISTORY_SCHEMA,
    )


def write_year(root: Path, single: Path) -> tuple[int, float, float]:
    """The year as the history keeps it and as one file; returns rows and seconds of each."""
    rng = np.random.default_rng(7)
    rows, history_s, single_s = 0, 0.0, 0.0
    with pq.ParquetWriter(single, HISTORY_SCHEMA, compression="zstd") as writer:
        for offset in range(DAYS):
            day = FIRST_DAY + timedelta(days=offset)
            table = day_table(day, rng)
            seq = offset * WINDOWS_PER_DAY * len(PROPERTIES) + 1
            t0 = time.perf_counter()
            write_part(root, FLEET, day.isoformat(), range(seq, seq + WINDOWS_PER_DAY * len(PROPERTIES)),
                       table)
            t1 = time.perf_counter()
            writer.write_table(table)
            single_s += time.perf_counter() - t1
            history_s += t1 - t0
            rows += table.num_rows
    return rows, history_s, single_s


def one_file(single: Path, condition: pc.Expression) -> pa.Table:
    """The baseline: the same filter on the un-partitioned file, pushed down (written sorted: no sort)."""
    return ds.dataset(single, format="parquet").to_table(filter=condition)


def best_of(runs: int, read: Callable[[], pa.Table]) -> tuple[float, pa.Table]:
    """The fastest of ``runs`` reads (the first pays for touching fresh memory) and its answer."""
    best, table = float("inf"), None
    for _ in range(runs):
        table = None  # freed before the next read
        t0 = time.perf_counter()
        table = read()
        best = min(best, time.perf_counter() - t0)
    assert table is not None
    return best, table


def at(day: date, hour: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)


def day_of_windows(day: date, rng: np.random.Generator) -> list[Window]:
    day_ms = int(at(day).timestamp() * 1000)
    sensors = np.asarray(SENSORS.to_pylist(), dtype=object)
    windows = []
    for i in range(WINDOWS_PER_DAY):
        for prop in PROPERTIES:
            mean = 300.0 + rng.standard_normal(TERMINALS)
            windows.append(Window(CITY, FLEET, prop, day_ms + i * WINDOW_S * 1000, WINDOW_S, sensors,
                                  rng.integers(5, 11, TERMINALS), mean, mean - 1.0, mean + 1.0))
    return windows


def writing_figures(root: Path) -> dict[str, float]:
    """A day of window messages written as 24 hourly parts (a flush an hour), then compacted."""
    rng = np.random.default_rng(11)
    windows = day_of_windows(date(2026, 1, 1), rng)
    per_hour = len(windows) // 24
    t0 = time.perf_counter()
    for hour in range(24):
        batch = windows[hour * per_hour:(hour + 1) * per_hour]
        first = hour * per_hour + 1
        write_part(root, FLEET, "2026-01-01", range(first, first + len(batch)),
                   pa.concat_tables([window_rows(w) for w in batch]))
    written_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    merged = compact(root, FLEET, "2026-01-01")
    compact_s = time.perf_counter() - t0
    assert merged is not None
    assert pq.read_metadata(merged).num_rows == len(windows) * TERMINALS
    return {"write_windows_per_s": round(len(windows) / written_s),
            "write_rows_per_s": round(len(windows) * TERMINALS / written_s),
            "compact_day_of_24_parts_s": round(compact_s, 3)}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="citynerve-history-bench-") as folder:
        root, single = Path(folder) / "history", Path(folder) / "one-file.parquet"
        rows, history_write_s, single_write_s = write_year(root, single)
        history_bytes = sum(f.stat().st_size for f in root.rglob("*.parquet"))
        print(f"{rows:,} rows over {DAYS} days: history {history_bytes / 1e6:.0f} MB in {DAYS} files "
              f"written in {history_write_s:.1f} s; one file {single.stat().st_size / 1e6:.0f} MB in "
              f"{single_write_s:.1f} s")

        ts = pc.field("window_start")
        ts_type = HISTORY_SCHEMA.field("window_start").type
        week = (at(date(2025, 6, 2)), at(date(2025, 6, 9)))
        a_day = (at(date(2025, 9, 15)), at(date(2025, 9, 16)))
        queries: dict[str, tuple[dict[str, Any], pc.Expression, int]] = {
            "year": ({}, pc.scalar(True), 2),
            "week_one_property": (
                {"start": week[0], "end": week[1], "properties": ["pressure"]},
                (ts >= pa.scalar(week[0], ts_type)) & (ts < pa.scalar(week[1], ts_type))
                & (pc.field("property") == "pressure"), 3),
            "one_sensor_year": (
                {"properties": ["pressure"], "sensors": ["logger-0042"]},
                (pc.field("property") == "pressure") & (pc.field("sensor") == "logger-0042"), 2),
            "one_day": (
                {"start": a_day[0], "end": a_day[1]},
                (ts >= pa.scalar(a_day[0], ts_type)) & (ts < pa.scalar(a_day[1], ts_type)), 3),
        }
        figures: dict[str, float] = {"rows": rows, "terminals": TERMINALS, "days": DAYS,
                                     "load_average_1min": round(os.getloadavg()[0], 1),
                                     "history_mb": round(history_bytes / 1e6, 1),
                                     "one_file_mb": round(single.stat().st_size / 1e6, 1)}
        for name, (arguments, condition, runs) in queries.items():
            history_s, got = best_of(runs, partial(read_history, root, FLEET, **arguments))
            baseline_s, expected = best_of(runs, partial(one_file, single, condition))
            assert got.equals(expected), f"{name}: the history and the one file disagree"
            figures[f"{name}_rows"] = got.num_rows
            figures[f"{name}_s"] = round(history_s, 4)
            figures[f"{name}_one_file_s"] = round(baseline_s, 4)
            figures[f"{name}_ratio_vs_one_file"] = round(baseline_s / history_s, 2)
            print(f"{name}: {got.num_rows:,} rows, history {history_s:.3f} s "
                  f"({got.num_rows / history_s / 1e6:.1f} M rows/s), one file {baseline_s:.3f} s "
                  f"(ratio {baseline_s / history_s:.2f})")
        figures["year_rows_per_s"] = round(figures["year_rows"] / figures["year_s"])
        figures["year_at_1000_terminals_s_extrapolated"] = round(figures["year_s"] * 1000 / TERMINALS, 1)
        figures.update(writing_figures(Path(folder) / "writing"))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
