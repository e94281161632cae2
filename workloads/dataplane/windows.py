"""The window message: what a fleet's stream worker publishes for each closed window and property.

One message per (fleet, property, window) on ``windows.<city>.<fleet>.<property>``: an Arrow IPC
stream of one record batch, one row per terminal that reported in the window. The schema's
metadata carries the window's identity, and the ``Nats-Msg-Id`` header is built from it, so a
window published twice (a worker restarted between publishing and acknowledging) is stored once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import pyarrow as pa
from citynerve.workloads.dataplane.names import (
    CONTENT_ARROW,
    HEADER_CONTENT_TYPE,
    HEADER_MSG_ID,
    HEADER_WINDOW_SECONDS,
    HEADER_WINDOW_START,
)

WINDOW_SCHEMA = pa.schema(
    [
        pa.field("sensor", pa.string()),
        pa.field("count", pa.int64()),
        pa.field("mean", pa.float64()),
        pa.field("minimum", pa.float64()),
        pa.field("maximum", pa.float64()),
    ]
)


@dataclass(frozen=True)
class Window:
    """One closed window of one property of one fleet: a row per terminal that reported in it."""

    city: str
    fleet: str
    prop: str
    start_ms: int
    seconds: int
    sensor: npt.NDArray[np.object_]
    count: npt.NDArray[np.int64]
    mean: npt.NDArray[np.float64]
    minimum: npt.NDArray[np.float64]
    maximum: npt.NDArray[np.float64]

    @property
    def msg_id(self) -> str:
        """The window's identity: the broker stores a second publish of it once."""
        return f"{self.city}.{self.fleet}.{self.prop}.{self.start_ms}"

    @property
    def readings(self) -> int:
        return int(self.count.sum())

    def headers(self) -> dict[str, str]:
        start = datetime.fromtimestamp(self.start_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {HEADER_MSG_ID: self.msg_id, HEADER_WINDOW_START: start,
                HEADER_WINDOW_SECONDS: str(self.seconds), HEADER_CONTENT_TYPE: CONTENT_ARROW}

    def to_table(self) -> pa.Table:
        metadata = {"city": self.city, "fleet": self.fleet, "property": self.prop,
                    "window_start_ms": str(self.start_ms), "window_seconds": str(self.seconds)}
        columns = [pa.array(self.sensor, pa.string()), self.count, self.mean, self.minimum, self.maximum]
        return pa.table(columns, schema=WINDOW_SCHEMA.with_metadata(metadata))

    def encode(self) -> bytes:
        sink = pa.BufferOutputStream()
        table = self.to_table()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return bytes(sink.getvalue().to_pybytes())

    @classmethod
    def decode(cls, data: bytes) -> Window:
        table = pa.ipc.open_stream(data).read_all()
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        try:
            return cls(
                city=meta["city"], fleet=meta["fleet"], prop=meta["property"],
                start_ms=int(meta["window_start_ms"]), seconds=int(meta["window_seconds"]),
                sensor=np.asarray(table.column("sensor").to_pylist(), dtype=object),
                count=table.column("count").to_numpy(),
                mean=table.column("mean").to_numpy(),
                minimum=table.column("minimum").to_numpy(),
                maximum=table.column("maximum").to_numpy(),
            )
        except KeyError as exc:
            msg = f"not a CityNerve window message: its schema metadata lacks {exc}"
            raise ValueError(msg) from exc
