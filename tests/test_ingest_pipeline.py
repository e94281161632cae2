"""Ingestion: malformed payloads are quarantined with reasons and counted; valid ones are exact."""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa
import pytest
from citynerve.workloads.ingest.parallel import IngestPool
from citynerve.workloads.ingest.pipeline import IngestPipeline
from citynerve.workloads.ingest.sensor_type import CATALOGUE, MeasuredProperty, SensorType
from citynerve.workloads.ngsi import NgsiDecoder, to_ngsi_entities
from citynerve.workloads.sim.readings import READING_SCHEMA, Readings, to_ipc

EPOCH_MS = 1_782_000_000_000  # 2026-06-21, early morning UTC
NOW_MS = EPOCH_MS + 86_400_000
PRESSURE = CATALOGUE["water-pressure-logger"]
QUALITY = CATALOGUE["water-quality-probe"]


def valid_pressure(sensors: int = 200, steps: int = 50, seed: int = 0) -> Readings:
    rng = np.random.default_rng(seed)
    values = 40.0 + 3.0 * rng.standard_normal((steps, sensors))
    return Readings.from_wide(
        np.arange(steps) * 60.0, [f"logger-{i}" for i in range(sensors)], "pressure", values
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
    pipeline.ingest_ipc(to_ipc(mixed), NOW_MS)
    assert pipeline.stats.readings == len(good) + 10_000
    assert pipeline.stats.accepted == len(good)
    assert pipeline.stats.duplicates == 0
    assert dict(pipeline.stats.quarantined) == counts
    rows = pipeline.quarantined_rows()
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
        base = {"id": f"urn:ngsi-ld:WaterQualityObserved:probe-{i}", "type": "WaterQualityObserved"}
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
        Readings.from_wide(np.arange(steps) * 60.0, probes, name, values)
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
    for chunk in np.array_split(order, 20):
        payload = b"[" + b",".join(mixed[i] for i in chunk) + b"]"
        pipeline.ingest_ngsi(payload, NOW_MS)
    assert pipeline.stats.entities == len(mixed)
    assert pipeline.stats.accepted == len(good)
    assert dict(pipeline.stats.quarantined) == counts
    assert len(pipeline.rejected_entities) + pipeline.quarantined_rows().num_rows == 10_000
    assert all(":" in f.reason for f in pipeline.rejected_entities)  # a reason with its detail
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
