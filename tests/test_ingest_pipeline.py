"""Ingestion: malformed payloads are quarantined with reasons and counted; valid ones are exact."""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa
import pytest
from citynerve.workloads.ingest.parallel import IngestPool
from citynerve.workloads.ingest.pipeline import BatchResult, IngestPipeline
from citynerve.workloads.ingest.sensor_type import CATALOGUE, MeasuredProperty, SensorType
from citynerve.workloads.ngsi import DecodeFailure, NgsiDecoder, to_ngsi_entities
from citynerve.workloads.sim.readings import READING_SCHEMA, Readings, to_ipc

EPOCH_MS = 1_782_000_000_000  # 2026-06-21, early morning UTC
NOW_MS = EPOCH_MS + 86_400_000
PRESSURE = CATALOGUE["water-pressure-logger"]
QUALITY = CATALOGUE["water-quality-probe"]


def valid_pressure(sensors: int = 200, steps: int = 50, seed: int = 0) -> Readings:
    rng = np.random.default_rng(seed)
    values = 40.0 + 3.0 * rng.standard_normal((steps, sensors))
    return Readings.from_wide(
        np.arange(steps, dtype=np.float64) * 60.0, [f"logger-{i}" for i in range(sensors)], "pressure", values
    )


Key = tuple[str, str, int]


def expected_windows(readings: Readings, window_ms: int) -> dict[Key, tuple[int, float]]:
    """The windows computed the slow, obvious way, reading by reading."""
    out: dict[Key, list[float]] = {}
    starts = ((EPOCH_MS + np.round(readings.time_s * 1000).astype(np.int64)) // window_ms) * window_ms
    for sensor, prop, start, value in zip(
        readings.sensor, readings.prop, starts, readings.value, strict=True
    ):
        out.setdefault((str(sensor), str(prop), int(start)), []).append(float(value))
    return {k: (len(v), float(np.mean(v))) for k, v in out.items()}


def assert_same_windows(got: dict[Key, tuple[int, float]], want: dict[Key, tuple[int, float]]) -> None:
    assert got.keys() == want.keys()
    for key, (count, mean) in want.items():
        assert got[key][0] == count, key
        assert got[key][1] == pytest.approx(mean, rel=1e-12), key


def windows_as_dict(pipeline: IngestPipeline) -> dict[Key, tuple[int, float]]:
    w = pipeline.flush()
    return {
        (str(s), str(p), int(t)): (int(c), float(m))
        for s, p, t, c, m in zip(w.sensor, w.prop, w.window_start_ms, w.count, w.mean, strict=True)
    }


def malformed_rows(n: int, seed: int = 1) -> tuple[pa.RecordBatch, dict[str, int]]:
    """n malformed gateway rows, cycling through every reason."""
    rng = np.random.default_rng(seed)
    kinds = ["missing-sensor", "unknown-property", "bad-timestamp", "missing-value", "out-of-range"]
    sensor: list[str | None] = []
    prop: list[str] = []
    ts: list[int | None] = []
    value: list[float] = []
    counts = dict.fromkeys(kinds, 0)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        counts[kind] += 1
        sensor.append(None if kind == "missing-sensor" else f"logger-{i % 200}")
        prop.append("pressur" if kind == "unknown-property" else "pressure")
        if kind == "bad-timestamp":
            ts.append(None if i % 2 else NOW_MS + 10 * 86_400_000)
        else:
            ts.append(EPOCH_MS + int(rng.integers(0, 3_000_000)))
        if kind == "missing-value":
            value.append(float("nan"))
        elif kind == "out-of-range":
            value.append(float(rng.choice([-50.0, 1e6])))
        else:
            value.append(41.0)
    batch = pa.RecordBatch.from_arrays(
        [
            pa.array(sensor, pa.string()).dictionary_encode(),
            pa.array(prop, pa.string()).dictionary_encode(),
            pa.array(ts, pa.int64()),
            pa.array(value, pa.float64()),
        ],
        schema=READING_SCHEMA,
    )
    return batch, counts


@pytest.mark.timeout(30)
def test_ten_thousand_malformed_columnar_rows_are_quarantined_exactly() -> None:
    good = valid_pressure()
    bad, counts = malformed_rows(10_000)
    good_batch = good.to_arrow(EPOCH_MS)
    # interleave: slices of good and bad rows in one IPC stream
    table = pa.Table.from_batches([good_batch, bad]).combine_chunks()
    order = np.random.default_rng(2).permutation(table.num_rows)
    mixed = table.take(pa.array(order)).combine_chunks().to_batches(max_chunksize=1000)
    pipeline = IngestPipeline(PRESSURE, window_s=300)
    result = pipeline.ingest_ipc(to_ipc(mixed), NOW_MS)
    assert pipeline.stats.readings == result.readings == len(good) + 10_000
    assert pipeline.stats.accepted == result.accepted == len(good)
    assert pipeline.stats.duplicates == 0
    assert dict(pipeline.stats.quarantined) == dict(result.quarantined) == counts
    rows = result.quarantined_rows
    assert rows.num_rows == 10_000
    assert all(rows["reason"].to_pylist())
    assert_same_windows(windows_as_dict(pipeline), expected_windows(good, 300_000))


def malformed_entities(n: int) -> tuple[list[bytes], dict[str, int]]:
    """n malformed NGSI-LD entities of several kinds, as raw JSON."""
    kinds = ["undecodable", "undecodable-id", "wrong-entity-type", "no-measured-property", "out-of-range"]
    out: list[bytes] = []
    counts: dict[str, int] = {}
    for i in range(n):
        kind = kinds[i % len(kinds)]
        base: dict[str, object] = {
            "id": f"urn:ngsi-ld:WaterQualityObserved:probe-{i}",
            "type": "WaterQualityObserved",
        }
        base["dateObserved"] = str(np.datetime64(EPOCH_MS + 3_600_000, "ms").astype("datetime64[s]")) + "Z"
        if kind == "undecodable":
            entity = {**base, "pH": "seven"}
        elif kind == "undecodable-id":
            entity = {k: v for k, v in base.items() if k != "id"} | {"pH": 7.0}
        elif kind == "wrong-entity-type":
            entity = {**base, "type": "AirQualityObserved", "pH": 7.0}
        elif kind == "no-measured-property":
            entity = {**base, "colour": 3.0}
        else:
            entity = {**base, "pH": 15.5}
        reason = {"undecodable-id": "undecodable"}.get(kind, kind)
        counts[reason] = counts.get(reason, 0) + 1
        out.append(orjson.dumps(entity))
    return out, counts


@pytest.mark.timeout(30)
def test_ten_thousand_malformed_entities_are_quarantined_exactly() -> None:
    rng = np.random.default_rng(3)
    probes = [f"probe-{i}" for i in range(100)]
    steps = 60
    parts = [
        Readings.from_wide(np.arange(steps, dtype=np.float64) * 60.0, probes, name, values)
        for name, values in (
            ("temperature", 15 + rng.standard_normal((steps, 100))),
            ("pH", 7 + 0.1 * rng.standard_normal((steps, 100))),
            ("turbidity", np.abs(rng.standard_normal((steps, 100)))),
        )
    ]
    good = Readings.concat(parts)
    entities = [orjson.dumps(e) for e in to_ngsi_entities(good, QUALITY, epoch_ms=EPOCH_MS)]
    bad, counts = malformed_entities(10_000)
    mixed = entities + bad
    order = np.random.default_rng(4).permutation(len(mixed))
    pipeline = IngestPipeline(QUALITY, window_s=600)
    rejected: list[DecodeFailure] = []
    quarantined_rows = 0
    for chunk in np.array_split(order, 20):
        payload = b"[" + b",".join(mixed[i] for i in chunk) + b"]"
        result = pipeline.ingest_ngsi(payload, NOW_MS)
        rejected.extend(result.rejected_entities)
        quarantined_rows += result.quarantined_rows.num_rows
    assert pipeline.stats.entities == len(mixed)
    assert pipeline.stats.accepted == len(good)
    assert dict(pipeline.stats.quarantined) == counts
    assert len(rejected) + quarantined_rows == 10_000
    assert all(":" in f.reason for f in rejected)  # a reason with its detail
    assert_same_windows(windows_as_dict(pipeline), expected_windows(good, 600_000))


@pytest.mark.timeout(30)
def test_duplicates_within_and_across_batches_count_once() -> None:
    good = valid_pressure(sensors=50, steps=20)
    batch = good.to_arrow(EPOCH_MS)
    repeated = pa.Table.from_batches([batch, batch.slice(0, 100)]).combine_chunks().to_batches()[0]
    pipeline = IngestPipeline(PRESSURE, window_s=300)
    pipeline.ingest_batch(repeated, NOW_MS)  # 100 repeats inside one batch
    pipeline.ingest_batch(batch.slice(500, 200), NOW_MS)  # a retransmission of part of it
    assert pipeline.stats.duplicates == 300
    assert pipeline.stats.accepted == len(good)
    assert_same_windows(windows_as_dict(pipeline), expected_windows(good, 300_000))


@pytest.mark.timeout(30)
def test_late_readings_after_a_window_closed_are_quarantined_not_folded_in() -> None:
    good = valid_pressure(sensors=10, steps=20)
    pipeline = IngestPipeline(PRESSURE, window_s=300)
    pipeline.ingest_batch(good.to_arrow(EPOCH_MS), NOW_MS)
    pipeline.flush()
    pipeline.ingest_batch(good.to_arrow(EPOCH_MS).slice(0, 5), NOW_MS)
    assert pipeline.stats.quarantined["late"] == 5


@pytest.mark.timeout(30)
def test_baseline_scores_windows() -> None:
    pipeline = IngestPipeline(PRESSURE, window_s=300)
    pipeline.ingest_batch(valid_pressure(steps=60).to_arrow(EPOCH_MS), NOW_MS)
    pipeline.fit_baseline(pipeline.flush())
    shifted = valid_pressure(steps=10, seed=5)
    shifted = Readings(shifted.sensor, shifted.prop, shifted.time_s + 7200.0, shifted.value - 20.0)
    pipeline.ingest_batch(shifted.to_arrow(EPOCH_MS), NOW_MS)
    scores = pipeline.flush().score
    assert np.all(scores < -3.0)


@pytest.mark.timeout(10)
def test_decoder_reads_normalized_entities_with_their_own_times() -> None:
    good = valid_pressure(sensors=3, steps=4)
    entities = to_ngsi_entities(good, PRESSURE, epoch_ms=EPOCH_MS, concise=False)
    assert entities[0]["pressure"]["unitCode"] == "MTR"
    decoded = NgsiDecoder(PRESSURE).decode(orjson.dumps(entities))
    assert decoded.failures == []
    assert decoded.batch.num_rows == len(good)
    assert set(decoded.batch.column(0).dictionary.to_pylist()) == {"logger-0", "logger-1", "logger-2"}


@pytest.mark.timeout(10)
def test_fractional_seconds_and_offsets_parse_in_every_batch_shape() -> None:
    # Fractional seconds take the general parser; with no entity missing a time (no nulls) the
    # fast path's array is read-only, which once made this raise instead of parse.
    stamps = ["2026-11-25T08:00:00.250Z", "2026-11-25T16:00:00+08:00"]
    entities = [{"id": f"urn:ngsi-ld:WaterObserved:p{i}", "type": "WaterObserved", "dateObserved": stamp,
                 "pressure": 40.0} for i, stamp in enumerate(stamps)]
    decoded = NgsiDecoder(PRESSURE).decode(orjson.dumps(entities))
    assert decoded.failures == []
    assert decoded.batch.column(2).cast(pa.int64()).to_pylist() == [1795593600250, 1795593600000]


@pytest.mark.timeout(10)
def test_a_payload_that_is_not_json_is_one_failure() -> None:
    pipeline = IngestPipeline(PRESSURE)
    pipeline.ingest_ngsi(b"{not json", NOW_MS)
    assert pipeline.stats.quarantined == {"undecodable": 1}


def test_sensor_type_from_resource_spec() -> None:
    st = SensorType.from_dict(
        {
            "name": "level",
            "dataModel": "FloodMonitoring",
            "measuredProperties": [
                {"name": "currentLevel", "unit": "MTR", "validRange": {"min": 0, "max": 9}}
            ],
        }
    )
    assert st.properties == (MeasuredProperty("currentLevel", "MTR", 0.0, 9.0),)
    with pytest.raises(ValueError, match="minimum"):
        MeasuredProperty("x", "C62", 1.0, 1.0)
    with pytest.raises(ValueError, match="measuredProperties"):
        SensorType.from_dict({"name": "x", "dataModel": "Device"})


@pytest.mark.timeout(60)
def test_ray_pool_gives_the_same_windows_as_one_pipeline(ray_local: None) -> None:
    good = valid_pressure(sensors=100, steps=40)
    batch = good.to_arrow(EPOCH_MS)
    bad, counts = malformed_rows(500)
    pool = IngestPool(PRESSURE, size=2, window_s=300)
    for i in range(0, batch.num_rows, 1000):
        pool.submit("ipc", to_ipc([batch.slice(i, 1000)]), NOW_MS)
    pool.submit("ipc", to_ipc([bad]), NOW_MS)
    result = pool.finish()
    assert result.accepted == len(good)
    assert dict(result.quarantined) == counts
    got = {
        (s, p, t): (c, m)
        for s, p, t, c, m in zip(
            result.windows["sensor"].to_pylist(),
            result.windows["prop"].to_pylist(),
            result.windows["window_start_ms"].to_pylist(),
            result.windows["count"].to_pylist(),
            result.windows["mean"].to_pylist(),
            strict=True,
        )
    }
    assert_same_windows(got, expected_windows(good, 300_000))


# ---- a stream's guarantees: arrival-independent dedup, lateness, redelivery, bounded state ----


def pressure_batch(start_s: float, steps: int, sensors: int = 20, interval_s: float = 60.0,
                   seed: int = 0, first: int = 0) -> pa.RecordBatch:
    """Fresh pressure readings of terminals ``logger-<first>…``, every ``interval_s`` from ``start_s``."""
    values = 40.0 + np.random.default_rng(seed).standard_normal((steps, sensors))
    readings = Readings.from_wide(
        start_s + np.arange(steps, dtype=np.float64) * interval_s,
        [f"logger-{first + i}" for i in range(sensors)],
        "pressure",
        values,
    )
    return readings.to_arrow(EPOCH_MS)


def balanced(result: BatchResult) -> bool:
    """Every row of a call is accounted for exactly once."""
    reading_level: int = result.quarantined_rows.num_rows
    assert sum(result.quarantined.values()) == reading_level + len(result.rejected_entities)
    return result.readings == result.accepted + result.duplicates + result.redelivered + reading_level


@pytest.mark.timeout(30)
def test_a_retransmitted_batch_arriving_later_counts_once() -> None:
    batch = pressure_batch(0.0, steps=5)  # one 300 s window
    pipeline = IngestPipeline(PRESSURE, window_s=300, sampling_interval_s=60)
    first = pipeline.ingest_batch(batch, NOW_MS)
    again = pipeline.ingest_batch(batch, NOW_MS + 97_000)  # the gateway resends it 97 s later
    assert (first.accepted, first.duplicates) == (100, 0)
    assert (again.accepted, again.duplicates) == (0, 100)
    assert balanced(first)
    assert balanced(again)
    counts = pipeline.flush().count
    assert counts.sum() == 100
    assert set(counts) == {5}


@pytest.mark.timeout(30)
def test_duplicates_are_found_against_every_batch_of_an_open_window() -> None:
    pipeline = IngestPipeline(PRESSURE, window_s=600, sampling_interval_s=60)
    early = pressure_batch(0.0, steps=3)
    pipeline.ingest_batch(early, NOW_MS)
    for step in range(3, 9):  # six more batches in the same window
        pipeline.ingest_batch(pressure_batch(step * 60.0, steps=1, seed=step), NOW_MS)
    resent = pipeline.ingest_batch(early.slice(10, 30), NOW_MS)
    assert (resent.accepted, resent.duplicates) == (0, 30)
    assert pipeline.stats.accepted == 9 * 20
    assert set(pipeline.flush().count) == {9}


@pytest.mark.timeout(30)
def test_a_reading_for_a_closed_window_is_late_and_quarantined() -> None:
    pipeline = IngestPipeline(PRESSURE, window_s=300, allowed_lateness_s=60)
    first = pipeline.ingest_batch(pressure_batch(0.0, steps=5), NOW_MS)
    assert first.newest_window == EPOCH_MS // 300_000
    assert pipeline.newest_event_ms == EPOCH_MS + 240_000
    # the window [0, 300 s) stays open through its lateness, then closes on the event clock
    assert len(pipeline.flush(EPOCH_MS + 359_999)) == 0
    assert len(pipeline.flush(EPOCH_MS + 360_000)) == 20
    assert pipeline.closed_before == EPOCH_MS // 300_000 + 1
    late = pipeline.ingest_batch(pressure_batch(200.0, steps=2, seed=3), NOW_MS)
    assert late.accepted == 0
    assert late.quarantined == {"late": 40}
    assert set(late.quarantined_rows["reason"].to_pylist()) == {"late"}
    assert late.newest_window is None
    assert balanced(late)
    # a later window closing makes every window below it closed, one that held nothing too
    pipeline.ingest_batch(pressure_batch(900.0, steps=1), NOW_MS)
    pipeline.flush(EPOCH_MS + 1_260_000)
    assert pipeline.ingest_batch(pressure_batch(700.0, steps=1), NOW_MS).quarantined == {"late": 20}
    assert pipeline.stats.quarantined == {"late": 60}


@pytest.mark.timeout(30)
def test_a_redelivered_payload_skips_closed_windows_and_windows_open_ones_once() -> None:
    payload = to_ipc([pressure_batch(0.0, steps=10)])  # windows [0, 300 s) and [300 s, 600 s)
    before_crash = IngestPipeline(PRESSURE, window_s=300)
    before_crash.ingest_ipc(payload, NOW_MS)
    published = before_crash.flush(EPOCH_MS + 300_000)  # the first window closed and published
    assert set(published.count) == {5}
    checkpoint = before_crash.closed_before
    restarted = IngestPipeline(PRESSURE, window_s=300)  # open windows were lost with the process
    restarted.restore(checkpoint)
    result = restarted.ingest_ipc(payload, NOW_MS + 30_000, redelivered=True)
    assert (result.redelivered, result.accepted, result.duplicates) == (100, 100, 0)
    assert result.quarantined == {}
    assert balanced(result)
    second = restarted.flush()
    assert set(second.count) == {5}
    assert set(second.window_start_ms) == {EPOCH_MS + 300_000}
    # the same rows not flagged as a redelivery are late: another source resent them
    assert restarted.ingest_ipc(payload, NOW_MS).quarantined == {"late": 200}


@pytest.mark.timeout(120)
def test_state_stays_bounded_over_two_thousand_batches() -> None:
    sensors = 50
    pipeline = IngestPipeline(PRESSURE, window_s=300, sampling_interval_s=30, track_terminals=True)
    sizes: list[int] = []
    arrow_bytes: list[int] = []
    accepted = quarantined = 0
    for step in range(2_000):  # one reading per terminal every 30 s: 200 windows of 300 s
        batch = pressure_batch(step * 30.0, steps=1, sensors=sensors, seed=step)
        values = np.asarray(batch.column(3)).copy()
        values[:3] = 1e6  # a few out-of-range rows in every batch, returned and not kept
        batch = batch.set_column(3, "value", pa.array(values))
        result = pipeline.ingest_batch(batch, EPOCH_MS + step * 30_000)
        accepted += result.accepted
        quarantined += result.quarantined_rows.num_rows
        del batch, result
        pipeline.flush(pipeline.newest_event_ms)
        sizes.append(pipeline.state_nbytes)
        arrow_bytes.append(pa.total_allocated_bytes())
    assert accepted == 2_000 * (sensors - 3)
    assert quarantined == 2_000 * 3
    assert pipeline.closed_before > EPOCH_MS // 300_000 + 190
    assert max(sizes[100:]) <= sizes[100]
    assert max(arrow_bytes[100:]) <= arrow_bytes[100] + 64 * 1024
    assert pipeline.state_nbytes < 64 * (11 * 8 + 1 + 8 + 8) + 2 * 32 * sensors + 4096


@pytest.mark.timeout(30)
def test_a_fleet_declared_with_ten_terminals_takes_ten() -> None:
    pipeline = IngestPipeline(PRESSURE, window_s=300, max_terminals=10)
    result = pipeline.ingest_batch(pressure_batch(0.0, steps=3, sensors=1_000), NOW_MS)
    assert result.accepted == 30
    assert result.quarantined == {"over-terminal-count": 2_970}
    assert balanced(result)
    assert set(result.quarantined_rows["reason"].to_pylist()) == {"over-terminal-count"}
    later = pipeline.ingest_batch(pressure_batch(180.0, steps=2, sensors=20, first=5, seed=1), NOW_MS)
    assert later.accepted == 10  # logger-5 … logger-9 were admitted, logger-10 … are not
    assert later.quarantined == {"over-terminal-count": 30}
    windows = pipeline.flush()
    assert len(set(windows.sensor)) == 10
    assert windows.count.sum() == 40
    assert pipeline.state_nbytes <= 10 * (16 * 8 + 1 + 8) + 10 * 32


def test_the_dedup_ring_spans_window_and_lateness_in_sampling_intervals() -> None:
    assert IngestPipeline(PRESSURE, window_s=300, sampling_interval_s=30).ring_slots == 11
    with_lateness = IngestPipeline(PRESSURE, window_s=300, allowed_lateness_s=60, sampling_interval_s=60)
    assert with_lateness.ring_slots == 7
    assert IngestPipeline(PRESSURE, window_s=300, sampling_interval_s=1).ring_slots == 16
    assert IngestPipeline(PRESSURE, window_s=300).ring_slots == 16
