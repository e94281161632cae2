"""The fleet's stream worker against a real nats-server: windows, exactly once, quarantine, bounded memory.

Readings go in as a terminal or a gateway sends them (NGSI-LD over NATS and MQTT, Arrow IPC);
what comes out is read back from the broker's streams and KV bucket and compared with
aggregates the test computes itself from what the broker accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import numpy as np
import paho.mqtt.client as mqtt
import pyarrow as pa
import pytest
from citynerve.workloads.dataplane.broker import OPERATOR_USER
from citynerve.workloads.dataplane.http_gateway import UPSERT_PATH
from citynerve.workloads.dataplane.names import (
    FLEETS_BUCKET,
    HEADER_REASON,
    HEADER_SOURCE,
    QUARANTINE_STREAM,
    WORKER_CONSUMER,
    checkpoint_key,
    readings_stream,
    readings_subject,
    readings_topic,
    status_key,
    windows_stream,
)
from citynerve.workloads.dataplane.streams import ensure_city_streams, ensure_fleet_streams
from citynerve.workloads.dataplane.windows import Window
from citynerve.workloads.dataplane.worker import Credentials, FleetConfig, StreamWorker, payload_format
from citynerve.workloads.sim.readings import READING_SCHEMA
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg
from nats.js.errors import KeyNotFoundError, NotFoundError
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import RunningBroker

DATA_MODEL = "WaterObserved"
PREFIX = f"urn:ngsi-ld:{DATA_MODEL}:"
SENSOR_TYPE_SPEC = {
    "dataModel": {"entityType": DATA_MODEL},
    "properties": [
        {"name": "pressure", "unitCode": "MTR", "minimum": "0", "maximum": "100"},
        {"name": "flow", "unitCode": "MQS", "minimum": "-20", "maximum": "20"},
    ],
}
Key = tuple[str, str, int]  # terminal, property, window start (ms)
Reading = tuple[str, str, int, float]  # terminal, property, time (ms), value


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def now_ms() -> int:
    return int(time.time() * 1000)


def entity(terminal: str, ts: int, **values: float) -> dict[str, Any]:
    return {"id": PREFIX + terminal, "type": DATA_MODEL, "dateObserved": iso(ts), **values}


def ngsi(readings: list[Reading]) -> bytes:
    """One entity per reading (a terminal's property at a time), as a JSON array."""
    return json.dumps([entity(t, ts, **{p: v}) for t, p, ts, v in readings]).encode()


def arrow(readings: list[Reading]) -> bytes:
    terminals, props, ts, values = zip(*readings, strict=True)
    batch = pa.RecordBatch.from_arrays(
        [pa.array(terminals).dictionary_encode(), pa.array(props).dictionary_encode(),
         pa.array(ts, pa.int64()), pa.array(values, pa.float64())], schema=READING_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, READING_SCHEMA) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def expected_windows(readings: list[Reading], window_s: int) -> dict[Key, tuple[int, float, float, float]]:
    """(count, mean, minimum, maximum) per terminal, property and window: what the worker should say."""
    groups: dict[Key, list[float]] = defaultdict(list)
    for terminal, prop, ts, value in readings:
        groups[terminal, prop, ts // (window_s * 1000) * window_s * 1000].append(value)
    return {k: (len(v), sum(v) / len(v), min(v), max(v)) for k, v in groups.items()}


def window_counts(windows: list[Window]) -> dict[Key, int]:
    counts: dict[Key, int] = defaultdict(int)
    for w in windows:
        for sensor, count in zip(w.sensor, w.count, strict=True):
            counts[str(sensor), w.prop, w.start_ms] += int(count)
    return dict(counts)


async def stream_messages(js: JetStreamContext, stream: str) -> list[RawStreamMsg]:
    info = await js.stream_info(stream)
    messages: list[RawStreamMsg] = []
    if not info.state.messages:
        return messages
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(NotFoundError):
            messages.append(await js.get_msg(stream, seq))
    return messages


async def wait_for(condition: Callable[[], Awaitable[bool]], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s: {what}")
        await asyncio.sleep(0.2)


@dataclass
class Fleet:
    """A fleet provisioned on the test's broker: its streams, its users, its worker's configuration."""

    running: RunningBroker
    name: str
    config: dict[str, Any]
    credentials: Path
    terminal_password: str
    nc: Client
    js: JetStreamContext
    windows_seen: list[Window] = field(default_factory=list)

    @property
    def subject(self) -> str:
        return readings_subject(self.running.city, self.name)

    @property
    def window_s(self) -> int:
        return int(self.config["windowSeconds"])

    def worker(self, **options: Any) -> StreamWorker:
        return StreamWorker(FleetConfig.parse(json.dumps(self.config)), Credentials.read(self.credentials),
                            **{"fetch_timeout_s": 0.2, "status_seconds": 0.5, **options})

    async def windows(self) -> list[Window]:
        messages = await stream_messages(self.js, windows_stream(self.name))
        ids = [m.headers["Nats-Msg-Id"] for m in messages if m.headers]
        assert len(ids) == len(set(ids)) == len(messages), "a window was stored twice"
        return [Window.decode(m.data) for m in messages if m.data]

    async def status(self) -> dict[str, Any]:
        kv = await self.js.key_value(FLEETS_BUCKET)
        try:
            entry = await kv.get(status_key(self.name))
        except KeyNotFoundError:
            return {}
        return dict(json.loads(entry.value or b"{}"))

    async def checkpoint(self) -> dict[str, Any]:
        kv = await self.js.key_value(FLEETS_BUCKET)
        try:
            entry = await kv.get(checkpoint_key(self.name))
        except KeyNotFoundError:
            return {}
        return dict(json.loads(entry.value or b"{}"))

    async def windowed(self, total: int) -> bool:
        return sum(window_counts(await self.windows()).values()) >= total


@contextlib.asynccontextmanager
async def provisioned(broker: RunningBroker, tmp_path: Path, name: str = "f1", *, count: int = 50,
                      window_s: int = 2, lateness_s: int = 1, interval_s: int = 10,
                      sensor_type_spec: dict[str, Any] = SENSOR_TYPE_SPEC) -> AsyncIterator[Fleet]:
    """A fleet as the city operator makes it: users, streams, consumer, the worker's config and secret."""
    passwords = broker.add_fleet(name)
    credentials = tmp_path / f"{name}-credentials"
    credentials.mkdir()
    (credentials / "username").write_text(f"{name}-ingest")
    (credentials / "password").write_text(passwords.ingest)
    nc = await nats.connect(broker.broker.url, user=OPERATOR_USER, password=broker.operator_password,
                            max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    js = nc.jetstream()
    await ensure_city_streams(js, broker.city)
    await ensure_fleet_streams(js, broker.city, name, window_s=window_s, allowed_lateness_s=lateness_s,
                               retention_hours=1)
    config = {"city": broker.city, "fleet": name, "sensorType": "pressure-and-flow",
              "sensorTypeSpec": sensor_type_spec, "count": count, "samplingIntervalSeconds": interval_s,
              "windowSeconds": window_s, "allowedLatenessSeconds": lateness_s, "brokerUrl": broker.broker.url}
    try:
        yield Fleet(broker, name, config, credentials, passwords.terminal, nc, js)
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def running(worker: StreamWorker) -> AsyncIterator[StreamWorker]:
    await worker.connect()
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await task
        await worker.close()


@contextlib.contextmanager
def worker_process(fleet: Fleet, log: Path, *http: str) -> Iterator[subprocess.Popen[bytes]]:
    """The worker as its Deployment runs it: ``python -m …worker`` with the configuration in its env."""
    env = {**os.environ, "CITYNERVE_FLEET_CONFIG": json.dumps(fleet.config)}
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "citynerve.workloads.dataplane.worker", "--credentials-dir",
             str(fleet.credentials), *http], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def mqtt_terminal(fleet: Fleet) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{fleet.name}-terminal",
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(fleet.name, fleet.terminal_password)
    client.connect(fleet.running.broker.mqtt_host, fleet.running.broker.mqtt_port)
    client.loop_start()
    return client


# ---- 1. readings in, windows out ----------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_ngsi_arrow_and_mqtt_readings_become_windows_and_terminals_show_online(
    broker: RunningBroker, tmp_path: Path
) -> None:
    rng = random.Random(7)
    # the sources' readings interleave over 6 s of event time: a lateness that covers it
    async with provisioned(broker, tmp_path, lateness_s=10) as fleet, running(fleet.worker()):
        start = now_ms() - 12_000
        over_nats = [(f"t{i}", prop, start + k * 250 + i, round(rng.uniform(0, 20), 3))
                     for i in range(6) for k in range(12) for prop in ("pressure", "flow")]
        for half in (over_nats[: len(over_nats) // 2], over_nats[len(over_nats) // 2 :]):
            await fleet.js.publish(fleet.subject, ngsi(half))
        as_arrow = [(f"g{i}", "pressure", start + k * 300, rng.uniform(0, 100)) for i in range(4)
                    for k in range(20)]
        await fleet.js.publish(fleet.subject, arrow(as_arrow))
        over_mqtt = [(f"m{i}", "flow", start + k * 500, round(rng.uniform(-20, 20), 3)) for i in range(3)
                     for k in range(10)]
        terminal = mqtt_terminal(fleet)
        try:
            for t, p, ts, v in over_mqtt:  # one entity per message, as a terminal sends it
                terminal.publish(readings_topic(broker.city, fleet.name), json.dumps(entity(t, ts, **{p: v})),
                                 qos=1).wait_for_publish(10)
        finally:
            terminal.loop_stop()
            terminal.disconnect()
        sent = over_nats + as_arrow + over_mqtt

        await wait_for(lambda: fleet.windowed(len(sent)), 60, f"{len(sent)} readings windowed")
        windows = await fleet.windows()
        got = {(str(s), w.prop, w.start_ms): (int(c), float(m), float(lo), float(hi)) for w in windows
               for s, c, m, lo, hi in zip(w.sensor, w.count, w.mean, w.minimum, w.maximum, strict=True)}
        expected = expected_windows(sent, fleet.window_s)
        assert got.keys() == expected.keys()
        for key, (count, mean, lo, hi) in expected.items():
            assert got[key][0] == count, key
            assert got[key][1:] == pytest.approx((mean, lo, hi)), key
        assert {w.seconds for w in windows} == {fleet.window_s}

        async def reported() -> bool:
            status = await fleet.status()
            return status.get("acceptedReadings") == len(sent) and status.get("pendingMessages") == 0
        await wait_for(reported, 30, "the status counts every reading and holds no payload")
        status = await fleet.status()
        assert status["terminalsOnline"] == 6 + 4 + 3
        assert status["windowsPublished"] == len(windows)
        assert status["quarantinedPayloads"] == 0
        assert status["duplicateReadings"] == 0
        assert status["lastReadingTime"] == iso(max(r[2] for r in sent))[:19] + "Z"
        assert (await fleet.checkpoint())["acceptedReadings"] == len(sent)
        # the readings stream is a work queue: nothing is left once windowed
        assert (await fleet.js.stream_info(readings_stream(fleet.name))).state.messages == 0


# ---- 2. kill -9 mid-stream: every accepted reading windowed exactly once -----------------------
@dataclass
class Publisher:
    """Publishes NGSI-LD batches continuously, each retried under its own Nats-Msg-Id until stored."""

    js: JetStreamContext
    subject: str
    prefix: str = "t"  # of its terminals' names and its batches' message ids
    terminals: int = 4
    accepted: list[Reading] = field(default_factory=list)
    batches: int = 0
    _last_ts: int = 0

    async def run(self, stop: asyncio.Event, rng: random.Random) -> None:
        while not stop.is_set():
            ts = self._last_ts = max(now_ms(), self._last_ts + 1)
            batch = [(f"{self.prefix}{i}", prop, ts, round(rng.uniform(0, 20), 3))
                     for i in range(self.terminals) for prop in ("pressure", "flow")]
            body = ngsi(batch)
            while True:  # what the HTTP gateway's clients do: retry the same batch until it is stored
                try:
                    await self.js.publish(self.subject, body, timeout=2.0,
                                          headers={"Nats-Msg-Id": f"{self.prefix}{self.batches}"})
                    break
                except (nats.errors.Error, TimeoutError):
                    await asyncio.sleep(0.1)
            self.accepted += batch
            self.batches += 1
            await asyncio.sleep(0.01)


@pytest.mark.asyncio
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_worker_killed_mid_stream_and_restarted_windows_every_accepted_reading_exactly_once(
    broker: RunningBroker, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    async with provisioned(broker, tmp_path, window_s=1, lateness_s=3) as fleet:
        publisher = Publisher(fleet.js, fleet.subject)
        stop = asyncio.Event()
        publishing = asyncio.create_task(publisher.run(stop, rng))
        log = tmp_path / "worker.log"
        try:
            with worker_process(fleet, log) as first:
                await wait_for(lambda: fleet.windowed(1), 60, "the first worker publishes windows")
                await asyncio.sleep(rng.uniform(0.0, 2.0))  # kill at a random point of its work
                first.send_signal(signal.SIGKILL)
                first.wait(10)
            await asyncio.sleep(rng.uniform(0.0, 1.0))
            with worker_process(fleet, log) as second:
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                stop.set()
                await publishing
                expected = expected_windows(publisher.accepted, fleet.window_s)
                total = len(publisher.accepted)
                await wait_for(lambda: fleet.windowed(total), 150, f"{total} accepted readings windowed")

                async def settled() -> bool:
                    status = await fleet.status()
                    return status.get("pendingMessages") == 0 and status.get("acceptedReadings") == total
                await wait_for(settled, 30, "the restarted worker holds nothing and has counted everything")
                assert second.poll() is None, log.read_text()
        finally:
            stop.set()
            await publishing
        counts = window_counts(await fleet.windows())
        assert counts == {k: v[0] for k, v in expected.items()}, "a reading was lost or counted twice"
        assert (await fleet.js.stream_info(readings_stream(fleet.name))).state.messages == 0


# ---- 3. the broker restarts under load ----------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.timeout(240)
async def test_a_broker_restart_under_load_loses_nothing_acknowledged_and_doubles_nothing(
    broker: RunningBroker, tmp_path: Path
) -> None:
    rng = random.Random(11)
    # a lateness longer than the outage: readings held up by it are not late
    async with provisioned(broker, tmp_path, window_s=1, lateness_s=10) as fleet, running(fleet.worker()):
        publishers = [Publisher(fleet.js, fleet.subject, prefix=f"p{n}-") for n in range(2)]
        stop = asyncio.Event()
        publishing = asyncio.gather(*(p.run(stop, rng) for p in publishers))
        try:
            await wait_for(lambda: fleet.windowed(1), 60, "windows before the restart")
            for _ in range(2):
                await asyncio.to_thread(broker.broker.restart)
                again = [p.batches + 20 for p in publishers]
                await wait_for(lambda: asyncio.sleep(0, all(
                    p.batches > n for p, n in zip(publishers, again, strict=True))), 60,  # noqa: B023
                    "the publishers store again after the restart")
        finally:
            stop.set()
            await publishing
        accepted = [r for p in publishers for r in p.accepted]
        await wait_for(lambda: fleet.windowed(len(accepted)), 90, f"{len(accepted)} readings windowed")

        async def settled() -> bool:
            status = await fleet.status()
            return status.get("pendingMessages") == 0 and status.get("consumerPending") == 0
        await wait_for(settled, 30, "the worker holds nothing")
        counts = window_counts(await fleet.windows())
        assert counts == {k: v[0] for k, v in expected_windows(accepted, fleet.window_s).items()}


# ---- 4. what is not windowed: duplicates, late readings, extra terminals, garbage ----------------
async def quarantined(fleet: Fleet) -> dict[str, list[RawStreamMsg]]:
    by_reason: dict[str, list[RawStreamMsg]] = defaultdict(list)
    for message in await stream_messages(fleet.js, QUARANTINE_STREAM):
        assert message.headers is not None
        by_reason[message.headers[HEADER_REASON]].append(message)
    return by_reason


def rows(message: RawStreamMsg) -> pa.Table:
    assert message.data is not None
    return pa.ipc.open_stream(message.data).read_all()


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_retransmissions_late_readings_extra_terminals_and_garbage_are_counted_and_quarantined(
    broker: RunningBroker, tmp_path: Path
) -> None:
    # the SensorType's payloadSchema is tighter than its pressure range
    schema = {"type": "object", "required": ["id", "type", "dateObserved"],
              "properties": {"pressure": {"type": "number", "maximum": 50}}}
    spec = {**SENSOR_TYPE_SPEC, "payloadSchema": schema}
    async with provisioned(broker, tmp_path, count=10, window_s=2, lateness_s=1,
                           sensor_type_spec=spec) as fleet, running(fleet.worker()):
        at = now_ms() + 4_000  # in a window that stays open for a few seconds of wall clock
        batch = [(f"t{i}", "pressure", at, float(i)) for i in range(10)]
        await fleet.js.publish(fleet.subject, ngsi(batch))
        await fleet.js.publish(fleet.subject, ngsi(batch))  # a gateway's retransmission: counted once
        garbage = await fleet.js.publish(fleet.subject, b"\x00\x01 not a reading")
        # 1,000 terminals reporting in a fleet of 10
        crowd = [(f"t{i}", "pressure", at + 1, 1.0) for i in range(1000)]
        over = await fleet.js.publish(fleet.subject, ngsi(crowd))
        # in the property's range, not in the payload schema
        await fleet.js.publish(fleet.subject, ngsi([("t5", "pressure", at + 3, 70.0)]))
        accepted = batch + crowd[:10]

        await wait_for(lambda: fleet.windowed(len(accepted)), 60, "the window closed")
        late = await fleet.js.publish(fleet.subject, ngsi([("t3", "pressure", at + 2, 9.0)]))

        async def counted() -> bool:
            return (await fleet.status()).get("lateReadings") == 1
        await wait_for(counted, 30, "the late reading counted")
        status = await fleet.status()
        assert status["acceptedReadings"] == len(accepted)
        assert status["duplicateReadings"] == len(batch)
        assert status["quarantineReasons"] == {
            "late": 1, "over-terminal-count": 990, "payload-schema": 1, "undecodable": 1}
        assert status["quarantinedPayloads"] == 993
        assert status["terminalsOnline"] == 10
        assert window_counts(await fleet.windows()) == {
            k: v[0] for k, v in expected_windows(accepted, fleet.window_s).items()}

        stream = readings_stream(fleet.name)
        held = await quarantined(fleet)
        assert held.keys() == {"late", "over-terminal-count", "payload-schema", "undecodable"}
        (schema_msg,) = held["payload-schema"]
        assert schema_msg.data is not None
        (rejected,) = json.loads(schema_msg.data)
        assert rejected["reason"].startswith("payload-schema: ")
        assert json.loads(rejected["entity"])["pressure"] == 70.0
        (garbage_msg,) = held["undecodable"]
        assert garbage_msg.data == b"\x00\x01 not a reading"
        assert garbage_msg.headers is not None
        assert garbage_msg.headers[HEADER_SOURCE] == f"{stream}:{garbage.seq}"
        (over_msg,) = held["over-terminal-count"]
        assert over_msg.headers is not None
        assert over_msg.headers[HEADER_SOURCE] == f"{stream}:{over.seq}"
        extra = rows(over_msg)
        assert extra.num_rows == 990
        assert set(extra.column("sensor").to_pylist()) == {f"t{i}" for i in range(10, 1000)}
        (late_msg,) = held["late"]
        assert late_msg.headers is not None
        assert late_msg.headers[HEADER_SOURCE] == f"{stream}:{late.seq}"
        assert rows(late_msg).to_pylist() == [
            {"sensor": "t3", "prop": "pressure", "ts_ms": at + 2, "value": 9.0, "reason": "late"}]


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_at_the_consumers_limit_the_oldest_window_closes_early_and_later_readings_for_it_are_late(
    broker: RunningBroker, tmp_path: Path
) -> None:
    async with provisioned(broker, tmp_path, window_s=600, lateness_s=60) as fleet:
        consumer = await fleet.js.consumer_info(readings_stream(fleet.name), WORKER_CONSUMER)
        await fleet.js.add_consumer(readings_stream(fleet.name), consumer.config, max_ack_pending=20)
        at = now_ms() // 600_000 * 600_000  # the current window's start: all 50 readings fall in it
        sent = [("t1", "pressure", at + k, float(k)) for k in range(50)]
        for reading in sent:  # one reading a message, as an MQTT terminal sends them
            await fleet.js.publish(fleet.subject, ngsi([reading]))
        async with running(fleet.worker()):
            async def accounted() -> bool:
                status = await fleet.status()
                return status.get("acceptedReadings", 0) + status.get("lateReadings", 0) == len(sent) \
                    and status.get("pendingMessages") == 0
            await wait_for(accounted, 60, "every reading windowed or late, nothing held")
        status = await fleet.status()
        windows = await fleet.windows()
        # the first 20 filled the worker's hands; their window closed early, the other 30 came late
        assert [w.readings for w in windows] == [20]
        assert (status["acceptedReadings"], status["lateReadings"]) == (20, 30)


# ---- 5. memory stays flat ------------------------------------------------------------------------
def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# after warm-up, over 800,000 more readings: 0.2 MiB measured over 9 M (docs/data-plane.md)
RSS_GROWTH_BOUND = 16 * 1024 * 1024


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_a_million_readings_through_one_worker_keep_its_memory_flat(
    broker: RunningBroker, tmp_path: Path
) -> None:
    terminals, steps, batches = 1000, 10, 100  # 10,000 readings a payload, 1,000,000 in all
    async with provisioned(broker, tmp_path, count=terminals, window_s=10, lateness_s=1,
                           interval_s=1) as fleet, running(fleet.worker()) as worker:
        sensors = pa.array([f"t{i}" for i in range(terminals)] * steps).dictionary_encode()
        props = pa.array(["pressure"] * (terminals * steps)).dictionary_encode()
        start = now_ms() - 6 * 86_400_000  # a day's replay, on the event clock, within the types' max age
        offsets = np.repeat(np.arange(steps, dtype=np.int64) * 1000, terminals)
        values = pa.array(np.random.default_rng(5).uniform(0, 100, terminals * steps))

        def payload(n: int) -> bytes:
            ts = pa.array(start + n * steps * 1000 + offsets)
            batch = pa.RecordBatch.from_arrays([sensors, props, ts, values], schema=READING_SCHEMA)
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, READING_SCHEMA) as writer:
                writer.write_batch(batch)
            return bytes(sink.getvalue().to_pybytes())

        async def send(first: int, last: int) -> None:
            for n in range(first, last):
                await fleet.js.publish(fleet.subject, payload(n), timeout=30)
            readings = last * terminals * steps
            await wait_for(lambda: asyncio.sleep(0, worker.pipeline.stats.readings >= readings), 120,
                           f"{readings} readings taken")

        await send(0, 20)
        warm = rss_bytes()
        await send(20, batches)
        grown = rss_bytes() - warm

        async def settled() -> bool:
            status = await fleet.status()
            return status.get("acceptedReadings") == terminals * steps * batches and \
                status.get("pendingMessages") == 0
        await wait_for(settled, 60, "every reading accepted, no payload held")
        assert grown < RSS_GROWTH_BOUND, f"RSS grew {grown / 2**20:.1f} MiB over 800,000 readings"
        # per terminal and per open window, never per payload or per reading
        assert worker.pipeline.state_nbytes < 2 * 1024 * 1024


# ---- the process: the stream worker and the fleet's NGSI-LD gateway ------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(method: str, url: str, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method,  # noqa: S310 - a loopback URL
                                     headers={"Content-Type": "application/ld+json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)
    except OSError:
        return 0


@pytest.mark.asyncio
@pytest.mark.timeout(120)
async def test_the_worker_process_serves_the_fleets_gateway_and_stops_on_sigterm(
    broker: RunningBroker, tmp_path: Path
) -> None:
    async with provisioned(broker, tmp_path) as fleet:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with worker_process(fleet, tmp_path / "worker.log", "--http-address", "127.0.0.1",
                            "--http-port", str(port)) as process:
            await wait_for(lambda: asyncio.to_thread(lambda: http("GET", f"{base}/healthz") == 200), 30,
                           "the gateway answers")
            at = now_ms() - 5_000
            batch = [(f"t{i}", "pressure", at, float(i)) for i in range(5)]
            body = ngsi(batch)
            for _ in range(2):  # a retransmitted batch is stored once (its hash is its message id)
                assert await asyncio.to_thread(http, "POST", base + UPSERT_PATH, body) == 204
            await wait_for(lambda: fleet.windowed(len(batch)), 30, "the posted batch windowed")

            async def reported() -> bool:
                status = await fleet.status()
                return bool(status.get("gateway", {}).get("answers", {}).get("204") == 2)
            await wait_for(reported, 30, "the status shows the gateway's two answers")
            status = await fleet.status()
            assert status["acceptedReadings"] == len(batch)
            assert status["duplicateReadings"] == 0  # the broker stored the retransmission once
            assert window_counts(await fleet.windows()) == {
                k: v[0] for k, v in expected_windows(batch, fleet.window_s).items()}
            process.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(process.wait, 30) == 0


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_a_backlog_of_large_payloads_is_windowed_whole(broker: RunningBroker, tmp_path: Path) -> None:
    """A backlog of about 100 MB, more than one fetch may bring in (64 MB): windowed whole."""
    terminals, payloads = 500, 96
    async with provisioned(broker, tmp_path, count=terminals, window_s=10, lateness_s=1) as fleet:
        names = [f"t{i:04d}-" + "x" * 2000 for i in range(terminals)]  # ≈ 1 MB of names a payload
        start = now_ms() - 3_600_000
        sent = []
        for n in range(payloads):
            batch = [(name, "pressure", start + n * 1000, float(n % 100)) for name in names]
            await fleet.js.publish(fleet.subject, arrow(batch), timeout=30)
            sent += batch
        async with running(fleet.worker()):
            await wait_for(lambda: fleet.windowed(len(sent)), 120, f"{len(sent)} readings windowed")

            async def settled() -> bool:
                status = await fleet.status()
                return status.get("acceptedReadings") == len(sent) and status.get("pendingMessages") == 0
            await wait_for(settled, 60, "every reading accepted once, nothing held")
        assert window_counts(await fleet.windows()) == {
            k: v[0] for k, v in expected_windows(sent, fleet.window_s).items()}


# ---- pure parts: the configuration, the payload's format ------------------------------------------
GOOD_CONFIG = {"city": "c", "fleet": "f1", "sensorType": "pressure-and-flow",
               "sensorTypeSpec": SENSOR_TYPE_SPEC, "count": 10, "samplingIntervalSeconds": 60,
               "windowSeconds": 300, "allowedLatenessSeconds": 60, "brokerUrl": "nats://127.0.0.1:4222"}


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("field_name", "value"), [
    ("city", None), ("fleet", ""), ("count", 0), ("count", "10"), ("samplingIntervalSeconds", True),
    ("windowSeconds", 2.5), ("allowedLatenessSeconds", -1), ("brokerUrl", 4222), ("sensorTypeSpec", []),
    ("sensorTypeSpec", {"properties": []}),
])
def test_a_wrong_fleet_configuration_is_refused_in_one_line_naming_the_field(
    field_name: str, value: object
) -> None:
    config = {**GOOD_CONFIG, field_name: value}
    if value is None:
        del config[field_name]
    with pytest.raises(ValueError, match=field_name) as refused:
        FleetConfig.parse(json.dumps(config))
    assert "\n" not in str(refused.value)
    parsed = FleetConfig.parse(json.dumps(GOOD_CONFIG))
    assert (parsed.fleet, parsed.count, parsed.window_s, parsed.sensor_type.property_names) == (
        "f1", 10, 300, ("pressure", "flow"))


@pytest.mark.timeout(10)
def test_a_payload_is_taken_by_its_content_type_or_its_first_bytes() -> None:
    ipc = arrow([("t1", "pressure", 0, 1.0)])
    assert payload_format(ipc, None) == "arrow"
    assert payload_format(b' \n [{"id": "x"}]', None) == "json"
    assert payload_format(b'{"id": "x"}', None) == "json"
    assert payload_format(b"pressure=3", None) is None
    assert payload_format(b"pressure=3", "application/ld+json; charset=utf-8") == "json"
    assert payload_format(ipc, "text/plain") == "arrow"
