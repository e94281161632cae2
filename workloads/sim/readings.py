"""Columnar sensor readings: what every simulator produces and what a gateway forwards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa

#: Arrow schema of a gateway batch. Sensor and property names are dictionary-encoded, as
#: gateways send them: a batch carries few distinct terminals and many readings each.
READING_SCHEMA = pa.schema(
    [
        pa.field("sensor", pa.dictionary(pa.int32(), pa.string())),
        pa.field("prop", pa.dictionary(pa.int32(), pa.string())),
        pa.field("ts_ms", pa.int64()),
        pa.field("value", pa.float64()),
    ]
)


@dataclass(frozen=True)
class Readings:
    """Readings in long form: one row per (sensor, property, time). Missing values are NaN."""

    sensor: npt.NDArray[np.str_]
    prop: npt.NDArray[np.str_]
    time_s: npt.NDArray[np.float64]
    value: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return int(self.value.shape[0])

    @classmethod
    def from_wide(
        cls, times_s: npt.NDArray[np.float64], sensors: list[str], prop: str, values: npt.NDArray[np.float64]
    ) -> Readings:
        """Readings of one property from a (time x sensor) matrix."""
        n_t, n_s = values.shape
        return cls(
            sensor=np.tile(np.asarray(sensors, dtype=np.str_), n_t),
            prop=np.full(n_t * n_s, prop),
            time_s=np.repeat(times_s.astype(np.float64), n_s),
            value=values.reshape(-1).astype(np.float64),
        )

    @classmethod
    def concat(cls, parts: list[Readings]) -> Readings:
        return cls(
            sensor=np.concatenate([p.sensor for p in parts]),
            prop=np.concatenate([p.prop for p in parts]),
            time_s=np.concatenate([p.time_s for p in parts]),
            value=np.concatenate([p.value for p in parts]),
        )

    def without_missing(self) -> Readings:
        keep = ~np.isnan(self.value)
        return Readings(self.sensor[keep], self.prop[keep], self.time_s[keep], self.value[keep])

    def to_arrow(self, epoch_ms: int = 0) -> pa.RecordBatch:
        """A gateway batch; simulated seconds become epoch milliseconds from `epoch_ms`."""
        sensor = _one_chunk(pa.array(self.sensor).dictionary_encode())
        prop = _one_chunk(pa.array(self.prop).dictionary_encode())
        ts = pa.array(np.int64(epoch_ms) + np.round(self.time_s * 1000).astype(np.int64))
        return pa.RecordBatch.from_arrays([sensor, prop, ts, pa.array(self.value)], schema=READING_SCHEMA)


def _one_chunk(array: pa.Array | pa.ChunkedArray) -> pa.Array:
    # very large string columns come back from pa.array() in chunks
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def to_ipc(batches: list[pa.RecordBatch]) -> bytes:
    """Serialise gateway batches as one Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, READING_SCHEMA) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())
