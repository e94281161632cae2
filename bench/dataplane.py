"""The city data plane end to end: publisher → nats-server (JetStream) → stream worker → windows.

Starts its own broker (a LocalBroker in a temp folder, the pinned nats-server) and, per phase,
a fleet as the city operator provisions it (users, streams, consumer) and its stream worker as
its Deployment runs it (``python -m citynerve.workloads.dataplane.worker``, its own ingest user).
Readings/s run from the first publish to the moment the window message holding the run's last
reading arrives on a subscription of the fleet's windows subject; the window counts must sum to
what was sent. Baseline in the same run: ``IngestPipeline`` alone on the same payloads.

Phases: NGSI-LD JSON batches over JetStream publishes; Arrow IPC gateway batches (1 M readings,
then 9 M more: worker RSS after each); NGSI-LD over MQTT QoS 1 with the fleet's terminal user;
publish → window-closed latency with a steady trickle. ``--soak`` instead runs a steady rate for
``--soak-minutes`` (RSS each minute, its least-squares slope, readings lost). The last line
printed is a JSON object of the figures.

    .venv/bin/python bench/dataplane.py [--soak [--soak-minutes 20]]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pyarrow as pa
from citynerve.operators.localfed import toolchain
from citynerve.workloads.dataplane.broker import (
    OPERATOR_USER,
    BrokerUser,
    LocalBroker,
    hash_password,
    ingest_user,
    new_password,
    operator_user,
    terminal_user,
)
from citynerve.workloads.dataplane.names import (
    CONTENT_ARROW,
    CONTENT_NGSI_LD,
    FLEETS_BUCKET,
    HEADER_CONTENT_TYPE,
    HEADER_MSG_ID,
    readings_subject,
    readings_topic,
    status_key,
    windows_subject,
)
from citynerve.workloads.dataplane.streams import ensure_city_streams, ensure_fleet_streams
from citynerve.workloads.dataplane.windows import Window
from citynerve.workloads.ingest.pipeline import IngestPipeline
from citynerve.workloads.ingest.sensor_type import CATALOGUE, SensorType
from citynerve.workloads.ngsi import to_ngsi_entities
from citynerve.workloads.sim.readings import READING_SCHEMA, Readings
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from paho.mqtt.enums import CallbackAPIVersion

CITY = "bench"
SENSOR_TYPE = CATALOGUE["water-pressure-logger"]
CORES = 2  # this machine's; per-core figures divide by it
# Throughput runs on an accelerated clock: readings are stamped from LEAD_S ahead of the wall
# clock on (within the SensorType's 300 s future skew), so no window of the run closes by the wall
# clock while the worker waits for the publisher; one reading of the CLOSER terminal past the
# run's last window end + lateness closes them by the event clock, as a live feed would.
LEAD_S = 75
CLOSER = "closer"
# Payload sizes: the worker fetches 256 payloads at a time, and nats-server drops a client with
# more than 64 MB pending (a slow consumer), so a payload stays under 64 MB / 256 = 256 KB.
# Columnar: 100 k terminals, one reading each per 2 s step, gateway batches of 5 000 readings
# (≈185 KB), windows of 5 steps. A window message carries a row per terminal (≈45 B): 100 k
# terminals make 4.5 MB, under the broker's 8 MB max_payload.
TERMINALS = 100_000
COLUMNAR_BATCH = 5_000
INTERVAL_S = 2
WINDOW_S = 10
LATENESS_S = 2
STEPS_1M = 10
STEPS_10M = 100
# NGSI-LD: 20 k terminals, 1 000 concise entities (one pressure reading each, ≈137 KB) per message.
NGSI_TERMINALS = 20_000
NGSI_STEPS = 50
NGSI_BATCH = 1_000
MQTT_MESSAGES = 100
# Latency: a trickle of small batches, each reading stamped with its publish time.
TRICKLE_PER_S = 20
TRICKLE_TERMINALS = 1_000
TRICKLE_BATCH = 50
LATENCY_WINDOW_S = 2
LATENCY_LATENESS_S = 1
LATENCY_WINDOWS = 32
# Soak: one message of 50 k readings a second (every terminal once a second).
SOAK_TERMINALS = 50_000
SOAK_WINDOW_S = 10
SOAK_LATENESS_S = 2
IN_FLIGHT = 256  # JetStream publishes awaiting their ack at once


def now_ms() -> int:
    return int(time.time() * 1000)


def sensor_type_spec(sensor_type: SensorType) -> dict[str, Any]:
    """The SensorType resource's spec the city operator hands the worker."""
    return {"dataModel": {"entityType": sensor_type.data_model},
            "properties": [{"name": p.name, "unitCode": p.unit, "minimum": str(p.minimum),
                            "maximum": str(p.maximum)} for p in sensor_type.properties]}


# ---- payloads -------------------------------------------------------------------------------
def gateway_batch(names: pa.Array, ts_ms: int, values: np.ndarray) -> bytes:
    """One gateway batch as an Arrow IPC stream: every terminal of ``names`` once, at ``ts_ms``."""
    n = len(names)
    batch = pa.RecordBatch.from_arrays(
        [pa.DictionaryArray.from_arrays(pa.array(np.arange(n, dtype=np.int32)), names),
         pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array(["pressure"])),
         pa.array(np.full(n, ts_ms, dtype=np.int64)), pa.array(values)],
        schema=READING_SCHEMA)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, READING_SCHEMA) as writer:
        writer.write_batch(batch)
    return bytes(sink.getvalue().to_pybytes())


def terminal_names(prefix: str, count: int, batch: int) -> list[pa.Array]:
    """The terminals' names in groups of ``batch``: each gateway batch's own dictionary."""
    return [pa.array([f"{prefix}-{i:06d}" for i in range(first, min(first + batch, count))], pa.string())
            for first in range(0, count, batch)]


def columnar_payloads(base_ms: int, steps: range, seed: int, batch: int) -> list[bytes]:
    """Every terminal once per step, step after step, in gateway batches of ``batch`` readings."""
    rng = np.random.default_rng(seed)
    groups = terminal_names("logger", TERMINALS, batch)
    return [gateway_batch(names, base_ms + step * INTERVAL_S * 1000,
                          40.0 + 3.0 * rng.standard_normal(len(names)))
            for step in steps for names in groups]


def ngsi_payloads(base_ms: int, terminals: int, steps: int, seed: int) -> list[bytes]:
    """JSON arrays of NGSI-LD entities (concise, one pressure reading each), NGSI_BATCH per array."""
    rng = np.random.default_rng(seed)
    readings = Readings.from_wide(np.arange(steps, dtype=np.float64) * INTERVAL_S,
                                  [f"probe-{i:05d}" for i in range(terminals)], "pressure",
                                  40.0 + 3.0 * rng.standard_normal((steps, terminals)))
    entities = to_ngsi_entities(readings, SENSOR_TYPE, epoch_ms=base_ms)
    entities.sort(key=lambda e: str(e["dateObserved"]))  # step after step, as terminals report
    return [orjson.dumps(entities[i : i + NGSI_BATCH]) for i in range(0, len(entities), NGSI_BATCH)]


def ahead_base_ms() -> int:
    """The run's first reading time: a window start LEAD_S or more ahead of the wall clock."""
    window_ms = WINDOW_S * 1000
    return -(-(now_ms() + LEAD_S * 1000) // window_ms) * window_ms


def closing_batch(base_ms: int, steps: int) -> bytes:
    """One reading past the end + lateness of step ``steps - 1``'s window: the run's windows close."""
    window_ms = WINDOW_S * 1000
    last = base_ms + (steps - 1) * INTERVAL_S * 1000
    return gateway_batch(pa.array([CLOSER]), (last // window_ms + 1) * window_ms + LATENESS_S * 1000,
                         np.array([40.0]))


def in_process(payloads: list[bytes], fmt: str, terminals: int) -> float:
    """Readings/s of the pipeline alone (as the worker configures it): ingest every payload, flush."""
    pipeline = IngestPipeline(SENSOR_TYPE, window_s=WINDOW_S, allowed_lateness_s=LATENESS_S,
                              track_terminals=True, max_terminals=terminals, sampling_interval_s=INTERVAL_S)
    now = now_ms()
    start = time.perf_counter()
    for payload in payloads:
        if fmt == "arrow":
            pipeline.ingest_ipc(payload, now)
        else:
            pipeline.ingest_ngsi(payload, now)
    windows = pipeline.flush()
    elapsed = time.perf_counter() - start
    assert int(windows.count.sum()) == pipeline.stats.readings, "the baseline lost readings"
    return pipeline.stats.readings / elapsed


# ---- the broker, fleets and workers ------------------------------------------------------------
@dataclass
class City:
    """The bench's broker, its operator connection and the users given so far."""

    broker: LocalBroker
    folder: Path
    operator_password: str
    users: list[BrokerUser]
    nc: Client | None = None

    @property
    def js(self) -> JetStreamContext:
        assert self.nc is not None
        return self.nc.jetstream()

    async def connect(self) -> Client:
        return await nats.connect(self.broker.url, user=OPERATOR_USER, password=self.operator_password,
                                  max_reconnect_attempts=-1, pending_size=1 << 30)


@dataclass
class Fleet:
    """A provisioned fleet: its streams and users, its worker process and the windows seen so far."""

    name: str
    terminal_password: str
    process: subprocess.Popen[bytes]
    windows: int = 0
    readings: int = 0
    arrivals: list[tuple[float, Window]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def subject(self) -> str:
        return readings_subject(CITY, self.name)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for the worker (pid {self.process.pid})")

    def on_window(self, msg: Msg) -> None:
        window = Window.decode(msg.data)
        self.arrivals.append((time.time(), window))
        self.windows += 1
        self.readings += int(window.count[window.sensor != CLOSER].sum())
        self.changed.set()

    async def windowed(self, total: int, within_s: float) -> float:
        """Wait until the windows hold ``total`` readings; the time (epoch s) the last one arrived."""
        deadline = time.monotonic() + within_s
        while self.readings < total:
            if self.process.poll() is not None:
                raise RuntimeError(f"the worker of fleet {self.name} exited with {self.process.returncode}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                raise AssertionError(f"fleet {self.name}: {self.readings:,} of {total:,} readings windowed "
                                     f"after {within_s:.0f} s")
        if self.readings != total:
            msg = f"fleet {self.name}: windows hold {self.readings:,} readings, sent {total:,}"
            raise AssertionError(msg)
        return self.arrivals[-1][0]


@contextlib.asynccontextmanager
async def fleet(city: City, name: str, *, terminals: int, interval_s: int, window_s: int,
                lateness_s: int) -> AsyncIterator[Fleet]:
    """A fleet as the city operator makes it, its worker running and bound, its windows subscribed."""
    assert city.nc is not None
    terminal_password, ingest_password = new_password(), new_password()
    city.users += [terminal_user(CITY, name, hash_password(terminal_password)),
                   ingest_user(CITY, name, hash_password(ingest_password))]
    city.broker.set_users(city.users)
    await ensure_fleet_streams(city.js, CITY, name, window_s=window_s, allowed_lateness_s=lateness_s,
                               retention_hours=1)
    credentials = city.folder / f"{name}-credentials"
    credentials.mkdir()
    (credentials / "username").write_text(f"{name}-ingest")
    (credentials / "password").write_text(ingest_password)
    config = {"city": CITY, "fleet": name, "sensorType": SENSOR_TYPE.name,
              "sensorTypeSpec": sensor_type_spec(SENSOR_TYPE), "count": terminals + 1,  # and the closer
              "samplingIntervalSeconds": interval_s, "windowSeconds": window_s,
              "allowedLatenessSeconds": lateness_s, "brokerUrl": city.broker.url}
    process = start_worker(config, credentials, city.folder / f"{name}-worker.log")
    this = Fleet(name, terminal_password, process)
    sub = await city.nc.subscribe(windows_subject(CITY, name), cb=_sync_cb(this.on_window),
                                  pending_msgs_limit=-1, pending_bytes_limit=-1)
    try:
        await _bound(city, this)
        yield this
    finally:
        await sub.unsubscribe()
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def start_worker(config: dict[str, Any], credentials: Path, log: Path) -> subprocess.Popen[bytes]:
    """The worker as its Deployment runs it: ``python -m …worker``, its configuration in its env."""
    env = {**os.environ, "CITYNERVE_FLEET_CONFIG": json.dumps(config)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "citynerve.workloads.dataplane.worker",
             "--credentials-dir", str(credentials)],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _sync_cb(handler: Callable[[Msg], None]) -> Callable[[Msg], Any]:
    async def cb(msg: Msg) -> None:
        handler(msg)

    return cb


async def _bound(city: City, this: Fleet, within_s: float = 60.0) -> None:
    """The worker has bound and reported its first status: it is fetching."""
    kv = await city.js.key_value(FLEETS_BUCKET)
    deadline = time.monotonic() + within_s
    while True:
        with contextlib.suppress(KeyNotFoundError):
            await kv.get(status_key(this.name))
            return
        if this.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker of fleet {this.name} did not start (see {city.folder})")
        await asyncio.sleep(0.1)


@contextlib.contextmanager
def local_broker() -> Iterator[City]:
    """A broker in a temp folder whose one user is the operator; stopped and removed on the way out."""
    with tempfile.TemporaryDirectory(prefix="citynerve-bench-dataplane-") as tmp:
        folder = Path(tmp)
        password = new_password()
        users = [operator_user(hash_password(password))]
        broker = LocalBroker(folder / "broker", CITY, nats_server=toolchain.binary("nats-server"))
        broker.start(users)
        try:
            yield City(broker, folder, password, users)
        finally:
            broker.stop()


# ---- publishers -----------------------------------------------------------------------------
async def publish_all(js: JetStreamContext, subject: str, payloads: list[bytes], content_type: str,
                      run: str) -> None:
    """JetStream publishes, many in flight, each acknowledged by the broker (as a gateway sends)."""
    in_flight: set[asyncio.Future[Any]] = set()
    for i, payload in enumerate(payloads):
        headers = {HEADER_MSG_ID: f"{run}-{i}", HEADER_CONTENT_TYPE: content_type}
        in_flight.add(await js.publish_async(subject, payload, headers=headers))
        if len(in_flight) >= IN_FLIGHT:
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                future.result()
    for future in in_flight:
        await future


async def through_broker(city: City, this: Fleet, payloads: list[bytes], content_type: str, run: str,
                         readings: int, closer: bytes) -> tuple[float, float]:
    """Publish, then the closing reading; wait for the windows to hold every reading; (readings/s, s)."""
    publisher = await city.connect()
    try:
        before = this.readings
        start = time.time()
        js = publisher.jetstream()
        await publish_all(js, this.subject, payloads, content_type, run)
        await js.publish(this.subject, closer, headers={HEADER_MSG_ID: f"{run}-closer",
                                                        HEADER_CONTENT_TYPE: CONTENT_ARROW})
        last = await this.windowed(before + readings, within_s=300.0)
    finally:
        await publisher.close()
    return readings / (last - start), last - start


def mqtt_publish(city: City, this: Fleet, payloads: list[bytes]) -> None:
    """QoS 1 publishes with the fleet's terminal user, each acknowledged by the broker (PUBACK)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{this.name}-terminal",
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(this.name, this.terminal_password)
    client.connect(city.broker.mqtt_host, city.broker.mqtt_port)
    client.loop_start()
    try:
        infos = [client.publish(readings_topic(CITY, this.name), payload, qos=1) for payload in payloads]
        for info in infos:
            info.wait_for_publish(60.0)
            if not info.is_published():
                raise RuntimeError("an MQTT publish was not acknowledged within 60 s")
    finally:
        client.disconnect()
        client.loop_stop()


async def trickle(js: JetStreamContext, this: Fleet, *, per_s: float, seconds: float, batch: int,
                  terminals: int, sent: list[tuple[float, int]],
                  sample: Callable[[], None] | None = None, sample_every_s: float = 60.0) -> int:
    """A steady rate of gateway batches, each reading stamped with its publish time; readings sent.

    ``sent`` gets (publish time, reading time in ms) per publish; ``sample`` is called every
    ``sample_every_s``.
    """
    groups = terminal_names("trickle", terminals, batch)
    rng = np.random.default_rng(7)
    start = time.monotonic()
    next_sample = start + sample_every_s
    readings = 0
    i = 0
    while time.monotonic() - start < seconds:
        chunk = groups[i % len(groups)]
        ts = now_ms()
        payload = gateway_batch(chunk, ts, 40.0 + 3.0 * rng.standard_normal(len(chunk)))
        sent.append((time.time(), ts))
        await js.publish(this.subject, payload, headers={HEADER_MSG_ID: f"{this.name}-{i}",
                                                         HEADER_CONTENT_TYPE: CONTENT_ARROW})
        readings += len(chunk)
        i += 1
        if sample is not None and time.monotonic() >= next_sample:
            sample()
            next_sample += sample_every_s
        await asyncio.sleep(max(0.0, start + i / per_s - time.monotonic()))
    return readings


# ---- phases -----------------------------------------------------------------------------------
async def ngsi_phase(city: City) -> dict[str, Any]:
    entities = NGSI_TERMINALS * NGSI_STEPS
    async with fleet(city, "ngsi", terminals=NGSI_TERMINALS, interval_s=INTERVAL_S, window_s=WINDOW_S,
                     lateness_s=LATENESS_S) as this:
        base = ahead_base_ms()
        payloads = ngsi_payloads(base, NGSI_TERMINALS, NGSI_STEPS, seed=1)
        rate, seconds = await through_broker(city, this, payloads, CONTENT_NGSI_LD, "ngsi", entities,
                                             closing_batch(base, NGSI_STEPS))
    baseline = in_process(payloads, "json", NGSI_TERMINALS)
    size = sum(map(len, payloads)) / entities
    print(f"NGSI-LD over JetStream: {entities:,} entities ({len(payloads)} messages of {NGSI_BATCH:,}, "
          f"{size:.0f} B/entity) in {seconds:.2f} s = {rate / 1e3:.0f} k/s ({rate / CORES / 1e3:.0f} k/s per "
          f"core, {CORES} cores); in-process alone {baseline / 1e3:.0f} k/s (x{rate / baseline:.2f})")
    return {"ngsi_readings_per_s": round(rate), "ngsi_readings_per_s_per_core": round(rate / CORES),
            "in_process_ngsi_readings_per_s": round(baseline),
            "ratio_vs_in_process_ngsi": round(rate / baseline, 3),
            "ngsi_entities": entities}


async def mqtt_phase(city: City) -> dict[str, Any]:
    steps = MQTT_MESSAGES * NGSI_BATCH // NGSI_TERMINALS
    entities = NGSI_TERMINALS * steps
    async with fleet(city, "mqtt", terminals=NGSI_TERMINALS, interval_s=INTERVAL_S, window_s=WINDOW_S,
                     lateness_s=LATENESS_S) as this:
        base = ahead_base_ms()
        payloads = ngsi_payloads(base, NGSI_TERMINALS, steps, seed=3)
        start = time.time()
        await asyncio.to_thread(mqtt_publish, city, this, [*payloads, closing_batch(base, steps)])
        last = await this.windowed(entities, within_s=300.0)
    rate = entities / (last - start)
    print(f"NGSI-LD over MQTT QoS 1: {entities:,} entities ({len(payloads)} messages) in "
          f"{last - start:.2f} s = {rate / 1e3:.0f} k/s ({rate / CORES / 1e3:.0f} k/s per core)")
    return {"mqtt_readings_per_s": round(rate), "mqtt_entities": entities}


async def columnar_phase(city: City, batch: int) -> dict[str, Any]:
    n_first, n_rest = STEPS_1M * TERMINALS, (STEPS_10M - STEPS_1M) * TERMINALS
    async with fleet(city, "columnar", terminals=TERMINALS, interval_s=INTERVAL_S, window_s=WINDOW_S,
                     lateness_s=LATENESS_S) as this:
        base = ahead_base_ms()
        first = columnar_payloads(base, range(STEPS_1M), seed=1, batch=batch)
        rest = columnar_payloads(base, range(STEPS_1M, STEPS_10M), seed=2, batch=batch)
        rate_1m, s_1m = await through_broker(city, this, first, CONTENT_ARROW, "c1", n_first,
                                             closing_batch(base, STEPS_1M))
        rss_1m = this.rss_mb()
        rate_rest, s_rest = await through_broker(city, this, rest, CONTENT_ARROW, "c2", n_rest,
                                                 closing_batch(base, STEPS_10M))
        rss_10m = this.rss_mb()
        windows = this.windows
    baseline = in_process(first + rest, "arrow", TERMINALS)
    # the same readings in batches of a whole step: what the pipeline does when batches are large
    whole_steps = columnar_payloads(ahead_base_ms(), range(STEPS_10M), seed=1, batch=TERMINALS)
    baseline_whole = in_process(whole_steps, "arrow", TERMINALS)
    total = n_first + n_rest
    rate = total / (s_1m + s_rest)
    size = len(first[0]) / batch
    print(f"columnar over JetStream: {total:,} readings from {TERMINALS:,} terminals "
          f"({len(first) + len(rest)} messages of {batch:,} readings, {size:.0f} B/reading) in "
          f"{s_1m + s_rest:.2f} s = {rate / 1e6:.2f} M/s ({rate / CORES / 1e6:.2f} M/s per core, "
          f"{CORES} cores); first 1 M "
          f"{rate_1m / 1e6:.2f} M/s, next 9 M {rate_rest / 1e6:.2f} M/s; {windows} windows, counts sum "
          f"to what was sent; in-process alone "
          f"{baseline / 1e6:.1f} M/s (x{rate / baseline:.3f}); in-process in batches of {TERMINALS:,} "
          f"{baseline_whole / 1e6:.1f} M/s")
    print(f"worker RSS: {rss_1m:.0f} MB after 1 M readings, {rss_10m:.0f} MB after 10 M")
    return {"columnar_readings_per_s": round(rate), "columnar_readings_per_s_per_core": round(rate / CORES),
            "in_process_columnar_readings_per_s": round(baseline),
            "ratio_vs_in_process_columnar": round(rate / baseline, 4), "columnar_readings": total,
            "columnar_batch": batch, "in_process_columnar_whole_step_readings_per_s": round(baseline_whole),
            "worker_rss_mb_1m": round(rss_1m, 1), "worker_rss_mb_10m": round(rss_10m, 1)}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


async def latency_phase(city: City) -> dict[str, Any]:
    """Publish of the reading that closes a window (first past end + lateness) → its window arrives."""
    assert city.nc is not None
    window_ms, lateness_ms = LATENCY_WINDOW_S * 1000, LATENCY_LATENESS_S * 1000
    sent: list[tuple[float, int]] = []
    async with fleet(city, "latency", terminals=TRICKLE_TERMINALS, interval_s=1, window_s=LATENCY_WINDOW_S,
                     lateness_s=LATENCY_LATENESS_S) as this:
        seconds = (LATENCY_WINDOWS + 2) * LATENCY_WINDOW_S + LATENCY_LATENESS_S
        readings = await trickle(city.js, this, per_s=TRICKLE_PER_S, seconds=seconds, batch=TRICKLE_BATCH,
                                 terminals=TRICKLE_TERMINALS, sent=sent)
        await this.windowed(readings, within_s=60.0)
    times = np.array([t for t, _ in sent])
    stamps = np.array([ts for _, ts in sent])
    latencies, early = [], 0
    for arrived, window in this.arrivals:
        closing = np.searchsorted(stamps, window.start_ms + window_ms + lateness_ms)
        if closing == len(stamps):
            continue  # the run's last windows: closed by the wall clock once the trickle stopped
        latency = arrived - times[closing]
        if latency < 0:
            early += 1  # closed by the wall clock while the worker idled, before the closing reading came
        latencies.append(latency)
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    print(f"latency publish → window closed: p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max "
          f"{max(latencies) * 1000:.0f} ms over {len(latencies)} windows ({LATENCY_WINDOW_S} s windows, "
          f"lateness {LATENCY_LATENESS_S} s, {TRICKLE_PER_S} publishes/s of {TRICKLE_BATCH} readings; "
          f"{early} closed by the idle wall clock before their closing reading)")
    return {"latency_p50_s": round(p50, 4), "latency_p99_s": round(p99, 4), "latency_windows": len(latencies)}


async def soak(city: City, minutes: float) -> dict[str, Any]:
    """A steady rate for ``minutes``: worker RSS each minute, its slope, readings lost."""
    rss: list[tuple[float, float]] = []
    sent: list[tuple[float, int]] = []
    async with fleet(city, "soak", terminals=SOAK_TERMINALS, interval_s=1, window_s=SOAK_WINDOW_S,
                     lateness_s=SOAK_LATENESS_S) as this:
        start = time.monotonic()
        rss.append((0.0, this.rss_mb()))

        def sample() -> None:
            rss.append(((time.monotonic() - start) / 60, this.rss_mb()))

        readings = await trickle(city.js, this, per_s=1.0, seconds=minutes * 60, batch=SOAK_TERMINALS,
                                 terminals=SOAK_TERMINALS, sent=sent, sample=sample)
        within = SOAK_WINDOW_S + SOAK_LATENESS_S + 60.0
        with contextlib.suppress(AssertionError):
            await this.windowed(readings, within_s=within)
        windowed = this.readings
        rss.append(((time.monotonic() - start) / 60, this.rss_mb()))
    minute, mb = np.array(rss).T
    # the first minute is warm-up (the pipeline's per-terminal arrays, the first windows): left out
    warm = minute >= 1.0
    slope = float(np.polyfit(minute[warm], mb[warm], 1)[0]) if warm.sum() > 1 else float("nan")
    lost = readings - windowed
    print(f"soak {minutes:g} min at {SOAK_TERMINALS:,} readings/s: {readings:,} sent, {windowed:,} windowed, "
          f"lost {lost:,}; worker RSS {' '.join(f'{m:.0f}' for m in mb)} MB (start, each minute, end), "
          f"slope after the first minute {slope:+.2f} MB/min")
    return {"soak_minutes": minutes, "soak_readings": readings, "readings_lost": lost,
            "soak_rss_mb": [round(m, 1) for m in mb], "soak_rss_slope_mb_per_min": round(slope, 3)}


async def run(args: argparse.Namespace, city: City) -> dict[str, Any]:
    city.nc = await city.connect()
    try:
        await ensure_city_streams(city.js, CITY)
        if args.soak:
            return await soak(city, args.soak_minutes)
        figures: dict[str, Any] = {"cores": CORES}
        figures |= await ngsi_phase(city)
        figures |= await columnar_phase(city, args.columnar_batch)
        figures |= await mqtt_phase(city)
        figures |= await latency_phase(city)
        figures["readings_lost"] = 0  # every phase checked that its windows hold every reading sent
        return figures
    finally:
        await city.nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak", action="store_true", help="run the steady-rate soak instead")
    parser.add_argument("--columnar-batch", type=int, default=COLUMNAR_BATCH,
                        help="readings per gateway batch (default: %(default)s; above ≈7 000 a batch passes "
                             "256 KB and the worker's fetch of 256 overruns the broker's 64 MB)")
    parser.add_argument("--soak-minutes", type=float, default=20.0, help="its length (default: %(default)s)")
    args = parser.parse_args()
    # Ctrl-C and SIGTERM unwind through the context managers: workers and the broker are stopped
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with local_broker() as city:
        figures = asyncio.run(run(args, city))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
