"""A fleet's stream worker: its readings stream in, closed windows out, each window exactly once.

``python -m citynerve.workloads.dataplane.worker --config-env CITYNERVE_FLEET_CONFIG
--credentials-dir DIR`` binds to the fleet's durable consumer with the fleet's ingest user,
runs every payload through ``IngestPipeline`` (NGSI-LD JSON or Arrow IPC gateway batches),
publishes quarantined readings and entities with their reason, publishes each closed window to
``windows.<city>.<fleet>.<property>`` and acknowledges a payload only once every window its
readings went to is published and the checkpoint says so. It serves the fleet's NGSI-LD HTTP
gateway in the same event loop. docs/data-plane.md gives the exactly-once argument, the
watermark rules and the state bounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import nats
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from citynerve.observability.logs import configure_logging
from citynerve.workloads.dataplane import http_gateway
from citynerve.workloads.dataplane.history import HistoryWriter
from citynerve.workloads.dataplane.names import (
    CONTENT_ARROW,
    CONTENT_JSON,
    CONTENT_NGSI_LD,
    FLEETS_BUCKET,
    HEADER_CONTENT_TYPE,
    HEADER_MSG_ID,
    HEADER_REASON,
    HEADER_SOURCE,
    WORKER_CONSUMER,
    checkpoint_key,
    inbox_prefix,
    quarantine_subject,
    readings_stream,
    readings_subject,
    status_key,
    windows_subject,
)
from citynerve.workloads.dataplane.windows import Window
from citynerve.workloads.ingest.pipeline import BatchResult, IngestPipeline, WindowAggregates
from citynerve.workloads.ingest.sensor_type import SensorType
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import SlowConsumerError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger("citynerve.workloads.dataplane.worker")  # also when run as __main__

ONLINE_INTERVALS = 3  # a terminal is online while its newest reading is this many intervals old at most
ARROW_CONTINUATION = b"\xff\xff\xff\xff"  # how every Arrow IPC stream message begins
_JSON_START = re.compile(rb"\s*([\[{])")
UNDECODABLE = "undecodable"
# A fetch's payloads arrive at once: past 64 MB the server cuts the connection as too slow (and
# the client drops what overflows its buffer). Fetch about this many bytes' worth, judged by the
# previous fetch; what is lost anyway is delivered again after the reconnect (see ``_bind``).
FETCH_BYTES = 32 * 1024 * 1024
PUBLISH_TIMEOUT_S = 10.0  # a window or quarantine publish not stored by then is retried
PayloadFormat = Literal["arrow", "json"]


def _rfc3339(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_ms() -> int:
    return int(time.time() * 1000)


# ---- configuration ----------------------------------------------------------------------
@dataclass(frozen=True)
class FleetConfig:
    """What the city operator writes into the worker's pod template (``CITYNERVE_FLEET_CONFIG``)."""

    city: str
    fleet: str
    sensor_type: SensorType
    count: int
    sampling_interval_s: int
    window_s: int
    allowed_lateness_s: int
    broker_url: str
    history_retention_days: int = 30

    @classmethod
    def parse(cls, text: str) -> FleetConfig:
        """From the operator's JSON; a one-line error names the field that is missing or wrong."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"the fleet configuration is not JSON: {exc}") from exc
        # every mistake is a ValueError: the caller reports one kind of configuration error
        if not isinstance(raw, dict):
            raise ValueError("the fleet configuration is not a JSON object")  # noqa: TRY004

        def wrong(name: str, what: str) -> ValueError:
            return ValueError(f"the fleet configuration's {name!r} must be {what}, not {raw.get(name)!r}")

        def text_field(name: str) -> str:
            value = raw.get(name)
            if not isinstance(value, str) or not value:
                raise wrong(name, "a non-empty string")
            return value

        def int_field(name: str, minimum: int) -> int:
            value = raw.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise wrong(name, f"an integer ≥ {minimum}")
            return value

        spec = raw.get("sensorTypeSpec")
        if not isinstance(spec, dict):
            raise wrong("sensorTypeSpec", "an object (the SensorType's spec)")
        sensor_type_name = text_field("sensorType")
        try:
            sensor_type = SensorType.from_resource(sensor_type_name, spec)
        except (ValueError, TypeError, AttributeError) as exc:
            msg = f"the fleet configuration's 'sensorTypeSpec' is not a SensorType spec: {exc}"
            raise ValueError(msg) from exc
        return cls(
            city=text_field("city"),
            fleet=text_field("fleet"),
            sensor_type=sensor_type,
            count=int_field("count", 1),
            sampling_interval_s=int_field("samplingIntervalSeconds", 1),
            window_s=int_field("windowSeconds", 1),
            allowed_lateness_s=int_field("allowedLatenessSeconds", 0),
            broker_url=text_field("brokerUrl"),
            history_retention_days=int_field("historyRetentionDays", 1) if "historyRetentionDays" in raw
            else FleetConfig.history_retention_days,
        )


@dataclass(frozen=True)
class Credentials:
    """The fleet's ingest user, from files ``username`` and ``password`` (a mounted Secret)."""

    username: str
    password: str = field(repr=False)

    @classmethod
    def read(cls, folder: Path) -> Credentials:
        try:
            return cls((folder / "username").read_text().strip(), (folder / "password").read_text().strip())
        except OSError as exc:
            raise ValueError(f"no broker credentials in {folder}: {exc.strerror} ({exc.filename})") from exc


# ---- counters ---------------------------------------------------------------------------
@dataclass(slots=True)
class Tally:
    """What a set of payloads amounted to: the status's counters and the checkpoint's."""

    readings: int = 0
    accepted: int = 0
    duplicates: int = 0
    redelivered: int = 0
    reasons: Counter[str] = field(default_factory=Counter)

    def add_result(self, result: BatchResult) -> None:
        self.readings += result.readings
        self.accepted += result.accepted
        self.duplicates += result.duplicates
        self.redelivered += result.redelivered
        self.reasons.update(result.quarantined)

    def add(self, other: Tally) -> None:
        self.readings += other.readings
        self.accepted += other.accepted
        self.duplicates += other.duplicates
        self.redelivered += other.redelivered
        self.reasons.update(other.reasons)

    def to_json(self) -> dict[str, Any]:
        return {"readings": self.readings, "acceptedReadings": self.accepted,
                "duplicateReadings": self.duplicates, "redeliveredReadings": self.redelivered,
                "quarantineReasons": dict(sorted(self.reasons.items()))}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Tally:
        return cls(int(data.get("readings", 0)), int(data.get("acceptedReadings", 0)),
                   int(data.get("duplicateReadings", 0)), int(data.get("redeliveredReadings", 0)),
                   Counter({str(k): int(v) for k, v in dict(data.get("quarantineReasons", {})).items()}))


@dataclass(frozen=True)
class Checkpoint:
    """Windows below ``closed_before`` are published; ``acked`` counts the payloads acknowledged."""

    closed_before: int
    windows_published: int
    acked: Tally

    def encode(self) -> bytes:
        return json.dumps({"closedBefore": self.closed_before, "windowsPublished": self.windows_published,
                           **self.acked.to_json()}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        raw = json.loads(data)
        return cls(int(raw["closedBefore"]), int(raw.get("windowsPublished", 0)), Tally.from_json(raw))


# ---- payloads ---------------------------------------------------------------------------
def payload_format(payload: bytes, content_type: str | None) -> PayloadFormat | None:
    """Arrow IPC or JSON, from the Content-Type when it names one, else from the first bytes."""
    if content_type:
        base = content_type.split(";", 1)[0].strip().lower()
        if base == CONTENT_ARROW:
            return "arrow"
        if base in (CONTENT_JSON, CONTENT_NGSI_LD):
            return "json"
    if payload.startswith(ARROW_CONTINUATION):
        return "arrow"
    if _JSON_START.match(payload):
        return "json"
    return None


def windows_of(aggregates: WindowAggregates, city: str, fleet: str, window_s: int) -> list[Window]:
    """One window message per (window, property), oldest window first."""
    if not len(aggregates):
        return []
    starts, start_of = np.unique(aggregates.window_start_ms, return_inverse=True)
    props, prop_of = np.unique(aggregates.prop.astype(str), return_inverse=True)
    key = start_of * len(props) + prop_of
    order = np.argsort(key, kind="stable")
    windows = []
    for rows in np.split(order, np.flatnonzero(np.diff(key[order])) + 1):
        first = rows[0]
        windows.append(Window(
            city=city, fleet=fleet, prop=str(props[prop_of[first]]), start_ms=int(starts[start_of[first]]),
            seconds=window_s, sensor=aggregates.sensor[rows], count=aggregates.count[rows],
            mean=aggregates.mean[rows], minimum=aggregates.minimum[rows], maximum=aggregates.maximum[rows],
        ))
    return windows


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


@dataclass(frozen=True)
class QuarantineMessage:
    """One message on the fleet's quarantine subject: what was set aside from one payload, and why."""

    reason: str
    body: bytes
    content_type: str
    part: str  # what of the payload: "payload", "rows" or "entities"

    def headers(self, source: str) -> dict[str, str]:
        # the source sequence names it: a redelivered payload's quarantine is stored once
        return {HEADER_REASON: self.reason, HEADER_SOURCE: source, HEADER_CONTENT_TYPE: self.content_type,
                HEADER_MSG_ID: f"{source}:{self.part}:{self.reason}"}


def quarantine_messages(result: BatchResult) -> list[QuarantineMessage]:
    """Quarantined readings (Arrow IPC, one message per reason) and rejected entities (JSON, per reason)."""
    messages = []
    rows = result.quarantined_rows
    if rows.num_rows:
        for reason in pc.unique(rows.column("reason")).to_pylist():
            part = rows.filter(pc.equal(rows.column("reason"), reason))
            messages.append(QuarantineMessage(str(reason), _ipc(part), CONTENT_ARROW, "rows"))
    by_reason: dict[str, list[dict[str, str]]] = {}
    for failure in result.rejected_entities:
        by_reason.setdefault(failure.reason.split(":", 1)[0], []).append(
            {"reason": failure.reason, "entity": failure.raw.decode("utf-8", errors="replace")})
    for reason, entities in by_reason.items():
        messages.append(QuarantineMessage(reason, json.dumps(entities).encode(), CONTENT_JSON, "entities"))
    return messages


# ---- the worker -------------------------------------------------------------------------
@dataclass(slots=True)
class _Held:
    """An unacknowledged payload: where to ack it and the newest window it fed. Never the payload."""

    reply: str
    newest_window: int | None
    tally: Tally


class StreamWorker:
    """Consumes a fleet's readings stream, publishes its closed windows, reports its status.

    One worker per fleet: the windows are aggregates of every reading of the fleet, so a second
    worker on the same consumer would split them.
    """

    def __init__(
        self,
        config: FleetConfig,
        credentials: Credentials,
        *,
        fetch_batch: int = 256,
        fetch_timeout_s: float = 1.0,
        status_seconds: float = 5.0,
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.fetch_batch = fetch_batch
        self.fetch_timeout_s = fetch_timeout_s
        self.status_seconds = status_seconds
        self.stream = readings_stream(config.fleet)
        self.pipeline = IngestPipeline(
            config.sensor_type, window_s=config.window_s, allowed_lateness_s=config.allowed_lateness_s,
            track_terminals=True, max_terminals=config.count, sampling_interval_s=config.sampling_interval_s,
        )
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._held: dict[int, _Held] = {}  # stream sequence → held payload
        self._outbox: deque[Window] = deque()  # closed, not yet stored by the broker
        self._quarantine: deque[tuple[QuarantineMessage, str]] = deque()  # with its source, not yet stored
        self._acked = Tally()
        self._windows_published = 0
        self._committed_before = 0
        self._delivered_through = 0  # stream sequences up to here were delivered before we (re)bound
        # payloads delivered before we (re)bound and not held: no window closes until they are back
        self._awaiting = 0
        self._awaiting_until = 0.0
        self._closing = False
        self._rebind = True
        self._max_ack_pending = 0
        self._consumer_pending: int | None = None
        self._next_status = 0.0
        # the previous fetch's largest payload: large ones are fetched fewer at a time (16 at first)
        self._largest = FETCH_BYTES // 16
        self.gateway_status: Callable[[], Mapping[str, Any]] | None = None  # the HTTP gateway's counters

    # ---- connection ----------------------------------------------------------------
    async def connect(self) -> None:
        """Connect as the fleet's ingest user and read the checkpoint; reconnects are automatic."""

        async def disconnected() -> None:
            if self._closing:
                return
            log.warning("fleet %s: lost the broker at %s; reconnecting", self.config.fleet,
                        self.config.broker_url)

        async def reconnected() -> None:
            log.info("fleet %s: reconnected to the broker", self.config.fleet)
            self._rebind = True

        async def error(exc: Exception) -> None:
            log.warning("fleet %s: broker connection: %s", self.config.fleet, exc)
            if isinstance(exc, SlowConsumerError):
                self._rebind = True  # payloads were dropped on the way in: have them delivered again

        self.nc = await nats.connect(
            self.config.broker_url, user=self.credentials.username, password=self.credentials.password,
            name=f"{self.config.fleet}-worker", max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            inbox_prefix=inbox_prefix(self.credentials.username),
            disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error,
        )
        self.js = self.nc.jetstream()
        self._kv = await self.js.key_value(FLEETS_BUCKET)
        await self._restore()
        self._sub = await self.js.pull_subscribe_bind(WORKER_CONSUMER, self.stream)

    async def _restore(self) -> None:
        assert self._kv is not None
        try:
            entry = await self._kv.get(checkpoint_key(self.config.fleet))
        except KeyNotFoundError:
            return
        if not entry.value:
            return
        checkpoint = Checkpoint.decode(entry.value)
        self.pipeline.restore(checkpoint.closed_before)
        self._committed_before = checkpoint.closed_before
        self._acked = checkpoint.acked
        self._windows_published = checkpoint.windows_published
        log.info("fleet %s: resuming after window %d (%d readings accepted so far)", self.config.fleet,
                 checkpoint.closed_before, checkpoint.acked.accepted)

    async def _bind(self) -> None:
        """After a (re)connect: payloads the broker delivered before come back first, flagged as redelivered.

        Until every payload delivered before (to a killed worker, or lost in a reconnect) is back,
        no window closes: its readings may belong to one. A consumer reset redelivers them at
        once; without it they come back after the ack wait. The ones this worker still holds
        only get their new ack subject.
        """
        assert self.js is not None
        info = await self.js.consumer_info(self.stream, WORKER_CONSUMER)
        self._max_ack_pending = int(info.config.max_ack_pending or 0)
        ack_wait = float(info.config.ack_wait or 0.0)
        delivered = info.delivered.stream_seq if info.delivered else 0
        self._delivered_through = max(self._delivered_through, delivered)
        self._awaiting = max(0, int(info.num_ack_pending or 0) - len(self._held))
        self._awaiting_until = time.monotonic() + 2 * ack_wait
        if self._awaiting:
            try:
                await self.js.reset_consumer(self.stream, WORKER_CONSUMER)
            except (TimeoutError, NatsError) as exc:
                log.warning("fleet %s: could not reset consumer %s (%s); unacknowledged payloads (%d) come "
                            "back after its ack wait of %.0f s", self.config.fleet, WORKER_CONSUMER, exc,
                            self._awaiting, ack_wait)
        self._rebind = False

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def close(self) -> None:
        self._closing = True
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(NatsError, asyncio.TimeoutError):
                await self._report()
            await self.nc.close()

    # ---- the loop ------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Fetch, ingest, close windows, commit, report — until ``stop`` is set."""
        failing = False
        while not stop.is_set():
            try:
                await self.step()
                if failing:
                    log.info("fleet %s: the broker answers again", self.config.fleet)
                failing = False
            except (TimeoutError, NatsError) as exc:
                if not failing:
                    log.warning("fleet %s: broker unavailable (%s); retrying", self.config.fleet,
                                type(exc).__name__)
                failing = True
                self._rebind = True  # payloads may have been delivered and lost on the way
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

    async def step(self) -> None:
        """One fetch and everything it allows: windows closed, published, checkpointed, acknowledged."""
        assert self._sub is not None
        if self._rebind:
            await self._bind()
        if self._outbox or self._quarantine:
            await self._publish_held_back()
            await self._commit()
        try:
            messages = await self._sub.fetch(self._batch_size(), timeout=self.fetch_timeout_s)
        except TimeoutError:  # nats-py's, or asyncio's when the fetch's own wait runs out first
            messages = []
        for msg in messages:
            self._ingest(msg)
        if messages:
            self._largest = max(len(msg.data) for msg in messages)
        await self._publish_held_back()
        newest = self.pipeline.newest_event_ms
        if messages:
            if newest is not None:
                await self._close_windows(newest)
        else:
            await self._idle(newest)
        if time.monotonic() >= self._next_status:
            await self._commit(always=False)
            await self._report()

    def _batch_size(self) -> int:
        """Payloads per fetch: ``fetch_batch``, fewer when payloads are large (the client buffers a fetch)."""
        return max(1, min(self.fetch_batch, FETCH_BYTES // max(1, self._largest)))

    async def _idle(self, newest: int | None) -> None:
        """Nothing came: the wall clock closes windows if nothing waits; back-pressure if we hold too much."""
        assert self.js is not None
        info = await self.js.consumer_info(self.stream, WORKER_CONSUMER)
        self._consumer_pending = info.num_pending
        if not info.num_pending:
            # a quiet fleet still gets its last windows; during a backlog the event clock rules alone
            await self._close_windows(max(newest or 0, _now_ms()))
        elif self._max_ack_pending and len(self._held) >= self._max_ack_pending:
            oldest = min((h.newest_window for h in self._held.values() if h.newest_window is not None),
                         default=None)
            if oldest is not None:
                log.warning("fleet %s: %d payloads held (the consumer's limit); closing window %d early",
                            self.config.fleet, len(self._held), oldest)
                await self._close_windows((oldest + 1) * self.pipeline.window_ms + self.pipeline.lateness_ms)

    def _ingest(self, msg: Msg) -> None:
        """One payload into the pipeline; it is held (never its bytes) and its quarantine queued."""
        meta = msg.metadata
        seq = meta.sequence.stream
        held = self._held.get(seq)
        if held is not None:  # delivered again after a reset or a reconnect: only the ack subject is new
            held.reply = msg.reply
            return
        redelivered = meta.num_delivered > 1 or seq <= self._delivered_through
        if seq <= self._delivered_through and self._awaiting:
            self._awaiting -= 1
        source = f"{self.stream}:{seq}"
        payload = msg.data
        content_type = msg.headers.get(HEADER_CONTENT_TYPE) if msg.headers else None
        fmt = payload_format(payload, content_type)
        result: BatchResult | None = None
        now = _now_ms()
        if fmt == "arrow":
            try:
                # a broken stream is refused whole, before any of its batches counts
                pa.ipc.open_stream(payload).read_all()
                result = self.pipeline.ingest_ipc(payload, now, redelivered)
            except (pa.ArrowException, ValueError, KeyError, IndexError, TypeError) as exc:
                log.debug("fleet %s: %s is not an Arrow stream of readings: %s", self.config.fleet,
                          source, exc)
        elif fmt == "json":
            start = _JSON_START.match(payload)
            if start is not None and start.group(1) == b"{":  # one entity, as a terminal sends it
                payload = b"[" + payload + b"]"
            result = self.pipeline.ingest_ngsi(payload, now, redelivered)
        tally = Tally()
        if result is None:
            tally.reasons[UNDECODABLE] += 1
            quarantine = [QuarantineMessage(UNDECODABLE, msg.data, content_type or "application/octet-stream",
                                            "payload")]
        else:
            tally.add_result(result)
            quarantine = quarantine_messages(result)
        self._held[seq] = _Held(msg.reply, result.newest_window if result else None, tally)
        self._quarantine.extend((q, source) for q in quarantine)

    async def _publish(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        """Publish and wait for the broker to store it (or to say it already has: a duplicate id)."""
        assert self.js is not None
        await self.js.publish(subject, body, headers=headers, timeout=PUBLISH_TIMEOUT_S)

    async def _close_windows(self, watermark_ms: int) -> None:
        if self._awaiting:
            if time.monotonic() < self._awaiting_until:
                return
            log.warning("fleet %s: %d payloads delivered before never came back; closing windows anyway",
                        self.config.fleet, self._awaiting)
            self._awaiting = 0
        aggregates = self.pipeline.flush(watermark_ms)
        if len(aggregates):
            self._outbox.extend(windows_of(aggregates, self.config.city, self.config.fleet,
                                           self.config.window_s))
        await self._publish_held_back()
        if self.pipeline.closed_before > self._committed_before:
            await self._commit()

    async def _publish_held_back(self) -> None:
        """Quarantine and closed windows not yet stored, in order; what fails stays for the next try."""
        subject = quarantine_subject(self.config.city, self.config.fleet)
        while self._quarantine:
            message, source = self._quarantine[0]
            await self._publish(subject, message.body, message.headers(source))
            self._quarantine.popleft()
        while self._outbox:
            window = self._outbox[0]
            await self._publish(windows_subject(self.config.city, self.config.fleet, window.prop),
                                window.encode(), window.headers())
            # a duplicate too: it is the republish of one stored before a restart
            self._windows_published += 1
            self._outbox.popleft()

    async def _commit(self, always: bool = True) -> None:
        """Checkpoint, then acknowledge every held payload whose windows are all published."""
        assert self._kv is not None
        assert self.nc is not None
        if self._outbox or self._quarantine:  # not all stored yet: nothing new may be acknowledged
            return
        closed_before = self.pipeline.closed_before
        done = [seq for seq, held in self._held.items()
                if held.newest_window is None or held.newest_window < closed_before]
        if not done and not always:
            return
        acked = Tally()
        acked.add(self._acked)
        for seq in done:
            acked.add(self._held[seq].tally)
        checkpoint = Checkpoint(closed_before, self._windows_published, acked)
        await self._kv.put(checkpoint_key(self.config.fleet), checkpoint.encode())
        self._acked, self._committed_before = acked, closed_before
        for seq in done:
            await self.nc.publish(self._held.pop(seq).reply)
        await self.nc.flush()

    # ---- status --------------------------------------------------------------------
    def status(self, now_ms: int | None = None) -> dict[str, Any]:
        """The fleet's ingest status: counters of every payload taken so far (acknowledged or held)."""
        now_ms = now_ms if now_ms is not None else _now_ms()
        total = Tally()
        total.add(self._acked)
        for held in self._held.values():
            total.add(held.tally)
        online_since = now_ms - ONLINE_INTERVALS * self.config.sampling_interval_s * 1000
        newest = self.pipeline.newest_reading_ms()
        quarantined = sum(total.reasons.values())
        report: dict[str, Any] = {
            "reportedAt": _rfc3339(now_ms),
            "terminalsOnline": self.pipeline.terminals_seen_since(online_since),
            "acceptedReadings": total.accepted,
            "duplicateReadings": total.duplicates,
            "lateReadings": total.reasons.get("late", 0),
            "redeliveredReadings": total.redelivered,
            "rejectedReadings": quarantined,
            "quarantinedPayloads": quarantined,
            "quarantineReasons": dict(sorted(total.reasons.items())),
            "windowsPublished": self._windows_published,
            "pendingMessages": len(self._held),
            "consumerPending": self._consumer_pending,
        }
        if newest is not None:
            report["lastReadingTime"] = _rfc3339(newest)
        if self.gateway_status is not None:
            report["gateway"] = dict(self.gateway_status())
        return report

    async def _report(self) -> None:
        assert self._kv is not None
        assert self.js is not None
        self._next_status = time.monotonic() + self.status_seconds
        info = await self.js.consumer_info(self.stream, WORKER_CONSUMER)
        self._consumer_pending = info.num_pending
        await self._kv.put(status_key(self.config.fleet), json.dumps(self.status()).encode())


# ---- the process ------------------------------------------------------------------------
async def serve(config: FleetConfig, credentials: Credentials, http_address: str | None, http_port: int,
                stop: asyncio.Event, history_dir: Path | None = None) -> None:
    """The worker, the fleet's HTTP gateway and its history writer in one event loop, until ``stop``."""
    worker = StreamWorker(config, credentials)
    await worker.connect()
    history = None
    if history_dir is not None:
        assert worker.js is not None
        writer = HistoryWriter(worker.js, config.city, config.fleet, history_dir,
                               retention_days=config.history_retention_days)
        history = (writer, asyncio.create_task(writer.run(), name="history"))
    runner = None
    if http_address is not None:
        assert worker.js is not None
        publish = http_gateway.jetstream_publisher(worker.js, readings_subject(config.city, config.fleet))
        app = http_gateway.make_app(publish, broker_connected=lambda: worker.connected)
        worker.gateway_status = http_gateway.counters(app).as_status
        runner = await http_gateway.serve(app, http_address, http_port)
    log.info("fleet %s (%s, %d terminals): consuming %s, windows of %d s, lateness %d s", config.fleet,
             config.sensor_type.name, config.count, worker.stream, config.window_s, config.allowed_lateness_s)
    try:
        await worker.run(stop)
    finally:
        if runner is not None:
            await runner.cleanup()
        if history is not None:
            history[0].stop()  # what it holds is written before the connection closes
            await asyncio.wait({history[1]}, timeout=30)
        await worker.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m citynerve.workloads.dataplane.worker", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-env", default="CITYNERVE_FLEET_CONFIG",
                        help="environment variable holding the fleet configuration (default: %(default)s)")
    parser.add_argument("--credentials-dir", type=Path, required=True,
                        help="folder with the fleet's ingest user: files 'username' and 'password'")
    parser.add_argument("--http-address", default=None,
                        help="serve the fleet's NGSI-LD gateway on this address (default: no gateway)")
    parser.add_argument("--http-port", type=int, default=8080, help="its port (default: %(default)s)")
    parser.add_argument("--history-dir", type=Path, default=None,
                        help="write the fleet's window history here, Parquet by day (default: none)")
    args = parser.parse_args(argv)
    configure_logging("INFO")
    try:
        config = FleetConfig.parse(os.environ.get(args.config_env, ""))
        credentials = Credentials.read(args.credentials_dir)
    except ValueError as exc:
        log.error("%s", exc)  # noqa: TRY400 - a configuration error, not a crash to trace
        return 2

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, credentials, args.http_address, args.http_port, stop, args.history_dir)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
