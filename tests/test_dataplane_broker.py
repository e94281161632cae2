"""The city broker against a real nats-server: who may connect, publish, subscribe and read what.

Terminals speak MQTT 3.1.1 with QoS 1 (paho-mqtt); the operator and the stream workers speak
NATS (nats-py). Each permission an identity has is exercised once, and each one it must not
have is tried and refused.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import nats
import paho.mqtt.client as mqtt
import pytest
from citynerve.operators.localfed import toolchain
from citynerve.workloads.dataplane.broker import (
    OPERATOR_USER,
    LocalBroker,
    hash_password,
    ingest_user,
    operator_user,
    render_auth,
)
from citynerve.workloads.dataplane.names import (
    FLEETS_BUCKET,
    QUARANTINE_PREFIX,
    QUARANTINE_STREAM,
    READINGS_PREFIX,
    WORKER_CONSUMER,
    checkpoint_key,
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
        self.disconnected = False
        self.suback: list[ReasonCode] | None = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-terminal-1",
                                  protocol=mqtt.MQTTv311, clean_session=clean_session)
        self.client.username_pw_set(user, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(broker.mqtt_host, broker.mqtt_port)
        self.client.loop_start()
        wait_for(lambda: self.connack is not None or self.disconnected, what="an MQTT CONNACK")

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connack = reason

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

    nc = await nats.connect(broker.url, user=user, password=password, error_cb=on_error,
                            max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield nc, errors
    finally:
        await nc.close()


async def stored(nc: Client, stream: str, subject: str) -> int:
    info = await nc.jetstream().stream_info(stream, subjects_filter=subject)
    return (info.state.subjects or {}).get(subject, 0)


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
        assert await stored(nc, READINGS_ALL, readings_subject(broker.city, "fleet-a")) == 101
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


def test_ingest_permissions_name_the_fleets_own_subjects() -> None:
    user = ingest_user("testcity", "fleet-a", hash_password("x"))
    assert user.name == "fleet-a-ingest"
    assert user.subscribe == ("_INBOX.>",)
    assert all("fleet-b" not in s for s in user.publish)
    assert f"$JS.API.DIRECT.GET.KV_{FLEETS_BUCKET}.$KV.{FLEETS_BUCKET}.fleet-a.>" in user.publish
