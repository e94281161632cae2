"""The city broker against a real nats-server: who may connect, publish, subscribe and read what.

Terminals speak MQTT 3.1.1 with QoS 1 (paho-mqtt); the operator and the stream workers speak
NATS (nats-py). Each permission an identity has is exercised once, and each one it must not
have is tried and refused.
"""

from __future__ import annotations

import asyncio
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import nats
import paho.mqtt.client as mqtt
import pytest
from citynerve.operators.city.broker import derive_password
from citynerve.operators.localfed import toolchain
from citynerve.operators.localfed.federation import LocalFederation
from citynerve.workloads.dataplane.broker import (
    OPERATOR_USER,
    POLL_SECONDS,
    LocalBroker,
    free_ports,
    hash_password,
    ingest_user,
    operator_user,
    render_auth,
    render_server_config,
)
from citynerve.workloads.dataplane.names import (
    FLEETS_BUCKET,
    QUARANTINE_PREFIX,
    QUARANTINE_STREAM,
    READINGS_PREFIX,
    WORKER_CONSUMER,
    checkpoint_key,
    inbox_prefix,
    quarantine_subject,
    readings_stream,
    readings_subject,
    readings_topic,
    status_key,
    windows_stream,
    windows_subject,
)
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, StreamConfig
from paho.mqtt.reasoncodes import ReasonCode

READINGS_ALL = "citynerve-readings-all"


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


class Terminal:
    """A paho-mqtt 2.2 client (MQTT 3.1.1) recording what the server answered."""

    def __init__(self, broker: LocalBroker, user: str, password: str, *, clean_session: bool = True) -> None:
        self.connack: ReasonCode | None = None
        self.connects = 0
        self.disconnected = False
        self.suback: list[ReasonCode] | None = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-terminal-1",
                                  protocol=mqtt.MQTTv311, clean_session=clean_session)
        self.client.username_pw_set(user, password)
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(broker.mqtt_host, broker.mqtt_port)
        self.client.loop_start()
        wait_for(lambda: self.connack is not None or self.disconnected, what="an MQTT CONNACK")

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connack = reason
        self.connects += 1

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _reason: ReasonCode, _p: Any) -> None:
        self.disconnected = True

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        self.suback = reasons

    def publish_all(self, topic: str, count: int) -> None:
        infos = [self.client.publish(topic, f"reading {i}".encode(), qos=1) for i in range(count)]
        for info in infos:
            info.wait_for_publish(timeout=10)  # returns once the server's PUBACK arrived
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def terminal(broker: LocalBroker, user: str, password: str, *,
             clean_session: bool = True) -> Iterator[Terminal]:
    term = Terminal(broker, user, password, clean_session=clean_session)
    try:
        yield term
    finally:
        term.close()


@asynccontextmanager
async def connected(broker: LocalBroker, user: str,
                    password: str) -> AsyncIterator[tuple[Client, list[Exception]]]:
    """A nats-py connection and the asynchronous errors (permission violations) it received."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    # A fleet's worker gets its replies on subjects of its own, as the worker connects.
    prefix = inbox_prefix(user) if user.endswith("-ingest") else "_INBOX"
    nc = await nats.connect(broker.url, user=user, password=password, error_cb=on_error,
                            max_reconnect_attempts=-1, reconnect_time_wait=0.2, inbox_prefix=prefix)
    try:
        yield nc, errors
    finally:
        await nc.close()


async def stored(nc: Client, stream: str, subject: str) -> int:
    info = await nc.jetstream().stream_info(stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


async def stored_when_settled(nc: Client, stream: str, subject: str, expected: int) -> int:
    """The count on ``subject`` once it reaches ``expected`` (or after 10 s): MQTT publishes are
    PUBACKed before the readings stream has taken them in."""
    deadline = time.monotonic() + 10
    while (count := await stored(nc, stream, subject)) < expected and time.monotonic() < deadline:  # noqa: ASYNC110 - the server's state, polled
        await asyncio.sleep(0.02)
    return count


async def create_readings_stream(broker: Any) -> None:
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        await nc.jetstream().add_stream(StreamConfig(
            name=READINGS_ALL, subjects=[f"{READINGS_PREFIX}.{broker.city}.>"]))


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_broker_without_users_refuses_every_connection(tmp_path: Path) -> None:
    local = LocalBroker(tmp_path / "broker", "nobody", nats_server=toolchain.binary("nats-server"))
    local.start([])
    try:
        for user, password in ((None, None), ("citynerve-system", ""), (OPERATOR_USER, "guess")):
            with pytest.raises(nats.errors.Error, match="Authorization Violation"):
                await nats.connect(local.url, user=user, password=password, allow_reconnect=False,
                                   connect_timeout=2)
        with terminal(local, "any-fleet", "guess") as term:
            assert term.connack is not None
            assert term.connack.is_failure, term.connack
    finally:
        local.stop()


def test_the_auth_with_no_users_still_defines_a_locked_out_user() -> None:
    text = render_auth([])
    assert "users: [\n    ]" in text  # the city account holds nobody …
    assert '"citynerve-system"' in text  # … and the system account's user makes credentials required
    with pytest.raises(ValueError, match="unique"):
        render_auth([operator_user("h"), operator_user("h")])


@pytest.mark.timeout(90)
@pytest.mark.asyncio
async def test_a_terminal_publishes_qos1_into_its_fleets_subject_only(broker: Any) -> None:
    a = broker.add_fleet("fleet-a")
    broker.add_fleet("fleet-b")
    await create_readings_stream(broker)
    with terminal(broker.broker, "fleet-a", a.terminal, clean_session=False) as term:
        assert term.connack is not None
        assert not term.connack.is_failure, term.connack
        term.publish_all(readings_topic(broker.city, "fleet-a"), 100)
        # Into another fleet's topic: the server acknowledges the QoS-1 publish, drops it and
        # keeps the connection (nats-server logs a "Publish Violation").
        term.publish_all(readings_topic(broker.city, "fleet-b"), 3)
        assert not term.disconnected
        term.publish_all(readings_topic(broker.city, "fleet-a"), 1)
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        fleet_a = readings_subject(broker.city, "fleet-a")
        assert await stored_when_settled(nc, READINGS_ALL, fleet_a, 101) == 101
        # Fleet B's three went in before the last of fleet A's, on the same connection.
        assert await stored(nc, READINGS_ALL, readings_subject(broker.city, "fleet-b")) == 0
        assert (await nc.jetstream().stream_info(READINGS_ALL)).state.messages == 101


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_terminal_cannot_subscribe_to_windows_or_readings(broker: Any) -> None:
    a = broker.add_fleet("fleet-a")
    with terminal(broker.broker, "fleet-a", a.terminal) as term:
        for topic in ("windows/testcity/fleet-a/#", readings_topic(broker.city, "fleet-a"), "#"):
            term.suback = None
            term.client.subscribe(topic, qos=1)
            wait_for(lambda: term.suback is not None, what="a SUBACK")
            assert term.suback is not None
            assert [r.is_failure for r in term.suback] == [True], topic
    # Over NATS with the same credentials: a subscription is refused as well.
    async with connected(broker.broker, "fleet-a", a.terminal) as (nc, errors):
        await nc.subscribe(windows_subject(broker.city, "fleet-a"))
        await nc.flush()
        await asyncio.wait_for(_until(lambda: bool(errors)), 5)
        assert "permissions violation for subscription" in str(errors[0]).lower()


async def _until(condition: Callable[[], bool]) -> None:
    """Poll a condition the client's callbacks change (an error callback fills a list)."""
    while not condition():  # noqa: ASYNC110 - the condition is a list nats-py's callback appends to
        await asyncio.sleep(0.02)


async def operator_sets_up(broker: Any, fleets: tuple[str, ...]) -> None:
    """What the city operator creates: each fleet's streams and worker consumer, the KV bucket, quarantine."""
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        js = nc.jetstream()
        for fleet in fleets:
            await js.add_stream(StreamConfig(name=readings_stream(fleet),
                                             subjects=[readings_subject(broker.city, fleet)],
                                             retention="workqueue"))
            await js.add_stream(StreamConfig(name=windows_stream(fleet),
                                             subjects=[windows_subject(broker.city, fleet)]))
            await js.add_consumer(readings_stream(fleet), ConsumerConfig(
                durable_name=WORKER_CONSUMER, ack_policy="explicit"))
        await js.create_key_value(bucket=FLEETS_BUCKET, direct=True)
        await js.add_stream(StreamConfig(name=QUARANTINE_STREAM,
                                         subjects=[f"{QUARANTINE_PREFIX}.{broker.city}.>"]))


@pytest.mark.timeout(90)
@pytest.mark.asyncio
async def test_an_ingest_worker_reaches_its_own_fleet_only(broker: Any) -> None:
    a = broker.add_fleet("fleet-a")
    broker.add_fleet("fleet-b")
    await operator_sets_up(broker, ("fleet-a", "fleet-b"))
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        kv = await nc.jetstream().key_value(FLEETS_BUCKET)
        await kv.put(status_key("fleet-b"), b"fleet b's status")

    async with connected(broker.broker, "fleet-a-ingest", a.ingest) as (nc, errors):
        js = nc.jetstream()
        # Everything the worker and its HTTP gateway do for fleet A works …
        ack = await js.publish(readings_subject(broker.city, "fleet-a"), b"a reading")
        assert ack.stream == readings_stream("fleet-a")
        sub = await js.pull_subscribe_bind(durable=WORKER_CONSUMER, stream=readings_stream("fleet-a"))
        [msg] = await sub.fetch(1, timeout=5)
        assert msg.data == b"a reading"
        await msg.ack_sync()
        ack = await js.publish(windows_subject(broker.city, "fleet-a", "level"), b"a window")
        assert ack.stream == windows_stream("fleet-a")
        await js.publish(quarantine_subject(broker.city, "fleet-a"), b"a bad payload")
        kv = await js.key_value(FLEETS_BUCKET)
        await kv.put(checkpoint_key("fleet-a"), b"42")
        assert (await kv.get(checkpoint_key("fleet-a"))).value == b"42"
        assert not errors

        # … and nothing of fleet B's: its windows, its KV keys, its stream's API. The server drops
        # the request and reports a permissions violation, so the requester hears nothing back.
        js = nc.jetstream(timeout=1)
        kv = await js.key_value(FLEETS_BUCKET)
        with pytest.raises(nats.errors.TimeoutError):
            await js.publish(windows_subject(broker.city, "fleet-b", "level"), b"a forged window")
        with pytest.raises(nats.errors.TimeoutError):
            await kv.put(status_key("fleet-b"), b"forged")
        with pytest.raises(nats.errors.TimeoutError):
            await kv.get(status_key("fleet-b"))
        with pytest.raises(nats.errors.TimeoutError):  # the non-direct get would show any key
            await js.get_msg(f"KV_{FLEETS_BUCKET}", subject=f"$KV.{FLEETS_BUCKET}.{status_key('fleet-b')}")
        with pytest.raises(nats.errors.TimeoutError):
            await js.stream_info(readings_stream("fleet-b"))
        await _until(lambda: len(errors) >= 5)
        assert all("permissions violation for publish" in str(e).lower() for e in errors), errors

    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        forged = windows_subject(broker.city, "fleet-b", "level")
        assert await stored(nc, windows_stream("fleet-b"), forged) == 0
        kv = await nc.jetstream().key_value(FLEETS_BUCKET)
        assert (await kv.get(status_key("fleet-b"))).value == b"fleet b's status"


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_one_fleets_worker_cannot_listen_to_the_replies_another_gets(broker: Any) -> None:
    a, b = broker.add_fleet("fleet-a"), broker.add_fleet("fleet-b")
    await operator_sets_up(broker, ("fleet-a", "fleet-b"))
    async with connected(broker.broker, "fleet-a-ingest", a.ingest) as (spy, errors):
        overheard: list[bytes] = []

        async def keep(msg: Any) -> None:
            overheard.append(msg.data)

        for subject in ("_INBOX.>", f"{inbox_prefix('fleet-b-ingest')}.>", ">"):
            await spy.subscribe(subject, cb=keep)
        await spy.flush()
        await _until(lambda: len(errors) >= 3)
        assert all("permissions violation for subscription" in str(e).lower() for e in errors), errors
        async with connected(broker.broker, "fleet-b-ingest", b.ingest) as (nc, _):
            kv = await nc.jetstream().key_value(FLEETS_BUCKET)
            await kv.put(status_key("fleet-b"), b"fleet b's own status")
            assert (await kv.get(status_key("fleet-b"))).value == b"fleet b's own status"
        await spy.flush()
        assert overheard == []  # not the reply carrying fleet B's status, nor anything else


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_set_users_adds_a_user_without_a_restart(broker: Any) -> None:
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        pid = broker.broker.pid
        passwords = broker.add_fleet("fleet-new")
        assert broker.broker.pid == pid
        async with connected(broker.broker, "fleet-new-ingest", passwords.ingest) as (worker, _):
            assert worker.is_connected
        # The operator's connection lived through the reload: never dropped, still answered.
        assert nc.is_connected
        assert nc.stats["reconnects"] == 0
        await nc.jetstream().account_info()


@pytest.mark.timeout(90)
@pytest.mark.asyncio
async def test_kill_9_and_restart_keeps_acknowledged_messages(broker: Any) -> None:
    await create_readings_stream(broker)
    subject = readings_subject(broker.city, "fleet-a")
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        for i in range(50):
            await nc.jetstream().publish(subject, f"acknowledged {i}".encode())
    ports = broker.broker.ports
    broker.broker.kill()
    assert not broker.broker.is_running()
    broker.broker.restart()
    assert broker.broker.ports == ports
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        assert await stored(nc, READINGS_ALL, subject) == 50


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_a_terminal_reconnects_after_a_broker_crash_and_publishes_on(broker: Any) -> None:
    """kill -9 and a restart: the terminal comes back by itself and the stored readings are kept.

    The test waits for the 50 readings to be in the stream before the crash: nats-server sends a
    PUBACK once the message is in its own MQTT stream, and the readings stream takes it in
    asynchronously, so a crash right after a PUBACK can lose it (docs/broker.md).
    """
    a = broker.add_fleet("fleet-a")
    await create_readings_stream(broker)
    topic, subject = readings_topic(broker.city, "fleet-a"), readings_subject(broker.city, "fleet-a")
    with terminal(broker.broker, "fleet-a", a.terminal, clean_session=False) as term:
        term.publish_all(topic, 50)
        async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
            assert await stored_when_settled(nc, READINGS_ALL, subject, 50) == 50
        broker.broker.kill()
        wait_for(lambda: term.disconnected, what="the terminal noticing the crash")
        broker.broker.restart()
        wait_for(lambda: term.connects == 2, timeout=30, what="the terminal's reconnection")
        term.publish_all(topic, 50)
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        assert await stored_when_settled(nc, READINGS_ALL, subject, 100) == 100


def test_ingest_permissions_name_the_fleets_own_subjects() -> None:
    user = ingest_user("testcity", "fleet-a", hash_password("x"))
    assert user.name == "fleet-a-ingest"
    assert user.subscribe == ("_INBOX_fleet-a-ingest.>",)  # replies to it alone
    assert all("fleet-b" not in s for s in user.publish)
    assert f"$JS.API.DIRECT.GET.KV_{FLEETS_BUCKET}.$KV.{FLEETS_BUCKET}.fleet-a.>" in user.publish


def start_supervisor(folder: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    """The supervisor as the chart runs it: a read-only config, a Secret mount, a writable include."""
    client, mqtt_port, monitor = free_ports("127.0.0.1", 3)
    for sub in ("config", "secret", "run", "jetstream"):
        (folder / sub).mkdir()
    (folder / "config" / "nats.conf").write_text(render_server_config(
        server_name="mounted", host="127.0.0.1", client_port=client, mqtt_port=mqtt_port,
        monitor_port=monitor, store_dir=str(folder / "jetstream"), auth_file="../run/auth.conf"))
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "citynerve.workloads.dataplane.broker",
         "--config", str(folder / "config" / "nats.conf"),
         "--auth-file", str(folder / "secret" / "auth.conf"),
         "--auth-include", str(folder / "run" / "auth.conf"),
         "--nats-server", str(toolchain.binary("nats-server"))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return supervisor, client, monitor


@pytest.mark.timeout(90)
@pytest.mark.asyncio
async def test_the_supervisor_follows_a_mounted_auth_file_and_forwards_sigterm(tmp_path: Path) -> None:
    supervisor, client, monitor = start_supervisor(tmp_path)
    secret = tmp_path / "secret" / "auth.conf"
    url = f"nats://127.0.0.1:{client}"
    try:
        wait_for(lambda: _healthy(monitor), what="the supervised nats-server's health")
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):  # no Secret yet: nobody
            await nats.connect(url, user=OPERATOR_USER, password="pw", allow_reconnect=False)
        # The kubelet swaps a mounted Secret's content in with a rename.
        written = secret.with_name(".new")
        written.write_text(render_auth([operator_user(hash_password("pw"))]))
        written.replace(secret)
        started = time.monotonic()
        while True:
            try:
                nc = await nats.connect(url, user=OPERATOR_USER, password="pw", allow_reconnect=False)
                break
            except nats.errors.Error:
                # The supervisor looks every POLL_SECONDS; a busy machine may add a few seconds.
                assert time.monotonic() - started < 5 * POLL_SECONDS, "the new auth file was not loaded"
                await asyncio.sleep(0.1)
        await nc.close()
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(timeout=20) == 0
        assert not _healthy(monitor)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait()


def _healthy(monitor_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{monitor_port}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.mark.timeout(90)
@pytest.mark.asyncio
async def test_a_local_federation_city_keeps_its_broker_key_ports_and_users(tmp_path: Path) -> None:
    federation = LocalFederation(tmp_path / "state", cities=("chengdu",))
    assert federation.cluster("hub").broker is None
    cluster = federation.cluster("chengdu")
    try:
        cluster.start_broker()
        city = federation.broker("chengdu")
        assert stat.S_IMODE(city.key_file.stat().st_mode) == 0o600
        password = derive_password(city.key_file.read_bytes().strip(), "operator", "operator")
        async with connected(city.broker, OPERATOR_USER, password) as (nc, _):
            await nc.jetstream().add_stream(StreamConfig(name="kept", subjects=["readings.chengdu.>"]))
        worker = ingest_user("chengdu", "fleet-a", hash_password("worker-pw"))
        city.broker.set_users([operator_user(hash_password(password)), worker])
        assert federation.status()[1]["broker"]["running"] is True
        assert "chengdu/broker" in federation.running_components()
        federation.down()
        assert federation.running_components() == []
        # Users given while it is down are the ones it starts with.
        late = ingest_user("chengdu", "fleet-b", hash_password("late-pw"))
        city.broker.set_users([operator_user(hash_password(password)), worker, late])

        again = LocalFederation(tmp_path / "state")  # another process finds the same broker
        again.cluster("chengdu").start_broker()
        city2 = again.broker("chengdu")
        assert city2.key_file.read_bytes() == city.key_file.read_bytes()
        assert city2.broker.url == city.broker.url
        async with connected(city2.broker, "fleet-a-ingest", "worker-pw") as (nc, _):
            assert nc.is_connected  # the users set before ``down`` are still there
        async with connected(city2.broker, "fleet-b-ingest", "late-pw") as (nc, _):
            assert nc.is_connected
        async with connected(city2.broker, OPERATOR_USER, password) as (nc, _):
            assert (await nc.jetstream().stream_info("kept")).config.subjects == ["readings.chengdu.>"]
    finally:
        federation.cluster("chengdu").stop_broker()
        LocalFederation(tmp_path / "state").cluster("chengdu").stop_broker()
