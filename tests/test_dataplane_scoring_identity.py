"""A Scenario's scoring identity against a real nats-server: its fleets' windows, through its own
consumers, and nothing else. Each permission it has is used once; each it must not have is tried
and refused. Also how the city operator hands the identity to a RayJob (by Secret reference).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats
import pytest
from citynerve.operators.city import children
from citynerve.operators.city.broker import BrokerOptions
from citynerve.operators.city.config import CityOptions
from citynerve.workloads.dataplane.broker import (
    OPERATOR_USER,
    LocalBroker,
    hash_password,
    new_password,
    scoring_user,
)
from citynerve.workloads.dataplane.names import (
    FLEETS_BUCKET,
    HISTORY_CONSUMER,
    WORKER_CONSUMER,
    inbox_prefix,
    readings_stream,
    readings_subject,
    scoring_identity,
    windows_stream,
    windows_subject,
)
from citynerve.workloads.dataplane.streams import (
    SCORING_ACK_WAIT_S,
    SCORING_MAX_ACK_PENDING,
    delete_scoring_consumer,
    ensure_city_streams,
    ensure_fleet_streams,
    ensure_scoring_consumer,
)
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

FLEETS = ("fleet-a", "fleet-b", "fleet-c")
SCENARIO_UID = "0b6c1a52-5f0e-4a57-9d6c-1f0a5e2c3b41"
OTHER_UID = "7d1e2f30-9a8b-4c6d-8e7f-0a1b2c3d4e5f"


@asynccontextmanager
async def connected(
    broker: LocalBroker, user: str, password: str
) -> AsyncIterator[tuple[Client, list[Exception]]]:
    """A nats-py connection with the identity's own reply prefix, and the errors it was sent."""
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(broker.url, user=user, password=password, error_cb=on_error,
                            max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                            inbox_prefix=inbox_prefix(user) if user != OPERATOR_USER else "_INBOX")
    try:
        yield nc, errors
    finally:
        await nc.close()


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - a list nats-py's error callback appends to
            await asyncio.sleep(0.02)


async def set_up(broker: Any, start: datetime) -> tuple[str, str, str]:
    """Three fleets' streams as the operator makes them, two windows on each, and the consumers of
    two scoring identities: ours on fleets a and b, another Scenario's on a. Returns passwords."""
    ingest = broker.add_fleet("fleet-a").ingest
    ours, other = scoring_identity(SCENARIO_UID), scoring_identity(OTHER_UID)
    ours_password, other_password = new_password(), new_password()
    broker.users += [scoring_user(broker.city, ours, ["fleet-a", "fleet-b"], hash_password(ours_password)),
                     scoring_user(broker.city, other, ["fleet-a"], hash_password(other_password))]
    broker.broker.set_users(broker.users)
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        js = nc.jetstream()
        await ensure_city_streams(js, broker.city)
        for fleet in FLEETS:
            await ensure_fleet_streams(js, broker.city, fleet, window_s=60, allowed_lateness_s=10,
                                       retention_hours=24)
            for prop in ("pressure", "flow"):
                await js.publish(windows_subject(broker.city, fleet, prop), f"{fleet} {prop}".encode())
        for fleet in ("fleet-a", "fleet-b"):
            await ensure_scoring_consumer(js, fleet, ours, start)
        await ensure_scoring_consumer(js, "fleet-a", other, start)
        # a consumer of our name on fleet c, so that refusing it is the permission's doing
        await ensure_scoring_consumer(js, "fleet-c", ours, start)
    return ingest, ours_password, other_password


async def pending(broker: Any, fleet: str, consumer: str) -> tuple[int, int]:
    """(delivered and not acknowledged, acknowledged) of a consumer, as the operator sees it."""
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        info = await nc.jetstream().consumer_info(windows_stream(fleet), consumer)
        return info.num_ack_pending or 0, info.ack_floor.stream_seq if info.ack_floor else 0


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_the_consumer_starts_at_its_start_time_and_is_made_once(broker: Any) -> None:
    consumer = scoring_identity(SCENARIO_UID)
    start = datetime(2026, 12, 1, 8, 30, tzinfo=UTC)
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        js = nc.jetstream()
        await ensure_city_streams(js, broker.city)
        await ensure_fleet_streams(js, broker.city, "fleet-a", window_s=60, allowed_lateness_s=10,
                                   retention_hours=24)
        await ensure_scoring_consumer(js, "fleet-a", consumer, start)
        await ensure_scoring_consumer(js, "fleet-a", consumer, start + timedelta(days=3))  # kept as is
        config = (await js.consumer_info(windows_stream("fleet-a"), consumer)).config
        assert config.deliver_policy == DeliverPolicy.BY_START_TIME
        assert config.opt_start_time == start
        assert config.ack_wait == SCORING_ACK_WAIT_S
        assert config.max_ack_pending == SCORING_MAX_ACK_PENDING
        assert config.filter_subject == windows_subject(broker.city, "fleet-a")  # every property
        await delete_scoring_consumer(js, "fleet-a", consumer)
        await delete_scoring_consumer(js, "fleet-a", consumer)  # gone already: fine
        await delete_scoring_consumer(js, "fleet-none", consumer)  # no stream: fine
        assert {c.name for c in await js.consumers_info(windows_stream("fleet-a"))} == {HISTORY_CONSUMER}


@pytest.mark.timeout(90)
@pytest.mark.asyncio
async def test_a_scoring_identity_reads_and_acks_its_fleets_windows_through_its_consumers(
    broker: Any,
) -> None:
    _, password, _ = await set_up(broker, datetime.now(UTC) - timedelta(days=1))
    user = scoring_identity(SCENARIO_UID)
    async with connected(broker.broker, user, password) as (nc, errors):
        js = nc.jetstream()
        for fleet in ("fleet-a", "fleet-b"):
            assert (await js.stream_info(windows_stream(fleet))).state.messages == 2
            sub = await js.pull_subscribe_bind(durable=user, stream=windows_stream(fleet))
            msgs = await sub.fetch(2, timeout=5)
            assert sorted(m.data for m in msgs) == [f"{fleet} flow".encode(), f"{fleet} pressure".encode()]
            for msg in msgs:
                await msg.ack_sync()
            assert (await js.consumer_info(windows_stream(fleet), user)).num_ack_pending == 0
        assert not errors
    for fleet in ("fleet-a", "fleet-b"):
        assert await pending(broker, fleet, user) == (0, 2)
    assert await pending(broker, "fleet-a", HISTORY_CONSUMER) == (0, 0)  # the history's are its own


@pytest.mark.timeout(90)
@pytest.mark.asyncio
async def test_a_scoring_identity_is_refused_everything_else(broker: Any) -> None:
    _, password, _ = await set_up(broker, datetime.now(UTC) - timedelta(days=1))
    user, other = scoring_identity(SCENARIO_UID), scoring_identity(OTHER_UID)
    async with connected(broker.broker, user, password) as (nc, errors):
        # The server drops each refused request and reports a permissions violation, so the
        # requester hears nothing back.
        js = nc.jetstream(timeout=1)
        a_windows = windows_subject(broker.city, "fleet-a", "pressure")
        refused: list[tuple[str, Any]] = [
            ("the history's consumer", lambda: fetch(js, windows_stream("fleet-a"), HISTORY_CONSUMER)),
            ("another scenario's consumer", lambda: fetch(js, windows_stream("fleet-a"), other)),
            ("a fleet not its own", lambda: fetch(js, windows_stream("fleet-c"), user)),
            ("a fleet not its own's stream", lambda: js.stream_info(windows_stream("fleet-c"))),
            ("readings", lambda: fetch(js, readings_stream("fleet-a"), WORKER_CONSUMER)),
            ("the readings stream", lambda: js.stream_info(readings_stream("fleet-a"))),
            ("the fleets' bucket", lambda: js.key_value(FLEETS_BUCKET)),
            ("a consumer of its own making", lambda: js.add_consumer(
                windows_stream("fleet-a"), ConsumerConfig(durable_name=f"{user}-2", ack_policy="explicit"))),
            ("deleting its consumer", lambda: js.delete_consumer(windows_stream("fleet-a"), user)),
            ("the history gone", lambda: js.delete_consumer(windows_stream("fleet-a"), HISTORY_CONSUMER)),
            ("a forged window", lambda: js.publish(a_windows, b"x")),
            ("a forged reading", lambda: js.publish(readings_subject(broker.city, "fleet-a"), b"x")),
            ("the stream names", lambda: js.find_stream_name_by_subject(a_windows)),
        ]
        for what, attempt in refused:
            try:
                await attempt()
            except TimeoutError:  # nats-py's own or asyncio's: no answer came
                continue
            pytest.fail(f"{what} was allowed")
        await _until(lambda: len(errors) >= len(refused))
        assert all("permissions violation for publish" in str(e).lower() for e in errors), errors

        # Nor may it listen: not to the windows themselves, nor to another identity's replies.
        errors.clear()
        for subject in (windows_subject(broker.city, "fleet-a"), "_INBOX.>",
                        f"{inbox_prefix(other)}.>", ">"):
            await nc.subscribe(subject)
        await _until(lambda: len(errors) >= 4)
        assert all("permissions violation for subscription" in str(e).lower() for e in errors), errors

    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        js = nc.jetstream()
        assert (await js.stream_info(windows_stream("fleet-a"))).state.messages == 2  # nothing forged
        names = {c.name for c in await js.consumers_info(windows_stream("fleet-a"))}
        assert names == {HISTORY_CONSUMER, user, other}  # none made, none deleted
    for fleet, consumer in (("fleet-a", HISTORY_CONSUMER), ("fleet-a", other), ("fleet-c", user)):
        assert await pending(broker, fleet, consumer) == (0, 0)  # nothing was delivered to it


async def fetch(js: Any, stream: str, consumer: str) -> Any:
    sub = await js.pull_subscribe_bind(durable=consumer, stream=stream)
    return await sub.fetch(1, timeout=1)


@pytest.mark.timeout(90)
@pytest.mark.asyncio
async def test_a_fleets_worker_acks_its_history_but_not_a_scenarios_windows(broker: Any) -> None:
    ingest, password, _ = await set_up(broker, datetime.now(UTC) - timedelta(days=1))
    user = scoring_identity(SCENARIO_UID)
    async with connected(broker.broker, user, password) as (scorer, _):
        sub = await scorer.jetstream().pull_subscribe_bind(durable=user, stream=windows_stream("fleet-a"))
        [held] = await sub.fetch(1, timeout=5)  # delivered to the scenario, not yet acknowledged
        async with connected(broker.broker, "fleet-a-ingest", ingest) as (worker, errors):
            await worker.publish(held.reply, b"+ACK")  # what msg.ack() sends, forged by the worker
            await worker.flush()
            await _until(lambda: len(errors) >= 1)
            assert "permissions violation for publish" in str(errors[0]).lower()
            assert await pending(broker, "fleet-a", user) == (1, 0)  # still the scenario's to ack

            # The worker's own history consumer it still reads and acknowledges.
            errors.clear()
            history = await worker.jetstream().pull_subscribe_bind(durable=HISTORY_CONSUMER,
                                                                   stream=windows_stream("fleet-a"))
            [window] = await history.fetch(1, timeout=5)
            await window.ack_sync()
            assert not errors
        await held.ack_sync()
    assert await pending(broker, "fleet-a", HISTORY_CONSUMER) == (0, 1)
    assert await pending(broker, "fleet-a", user) == (0, 1)


@pytest.mark.timeout(10)
def test_scoring_permissions_name_its_own_consumers_and_fleets_only() -> None:
    user = scoring_identity(SCENARIO_UID)
    identity = scoring_user("testcity", user, ["fleet-a", "fleet-b"], hash_password("x"))
    assert identity.name == user
    assert identity.subscribe == (f"{inbox_prefix(user)}.>",)
    assert not any("fleet-c" in s or HISTORY_CONSUMER in s or s.startswith(("$JS.API.CONSUMER.CREATE",
                   "$JS.API.CONSUMER.DELETE", "windows.", "readings.", "$KV")) for s in identity.publish)
    assert f"$JS.ACK.{windows_stream('fleet-b')}.{user}.>" in identity.publish
    with pytest.raises(ValueError, match="city"):
        scoring_user("no.city", user, ["fleet-a"], "h")


@pytest.mark.timeout(10)
def test_a_rayjob_reads_its_broker_credential_from_the_scenarios_secret(tmp_path: Path) -> None:
    scenario = {"apiVersion": "citynerve.io/v1alpha1", "kind": "Scenario",
                "metadata": {"name": "burst-live", "namespace": "city", "uid": SCENARIO_UID},
                "spec": {"kind": "water-burst", "mode": "live", "fleets": [{"name": "fleet-a"}]}}
    fleet = {"spec": {"sensorType": "pipe-pressure-gauge", "district": "d", "count": 3, "owner": "o"}}
    payload = children.scenario_payload(scenario, {"fleet-a": fleet}, {}, "testcity")
    url = "nats://citynerve-broker.citynerve-system.svc:4222"
    options = CityOptions(city="testcity", workload_mode="cluster",
                          broker=BrokerOptions(url, tmp_path / "key", "citynerve-system"))
    job = children.desired_rayjob(scenario, payload, options)
    secret = children.scoring_secret_name("burst-live")
    cluster = job["spec"]["rayClusterSpec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env[children.ENV_BROKER_URL] == {"name": children.ENV_BROKER_URL, "value": url}
        for name, key in ((children.ENV_BROKER_USER, "username"), (children.ENV_BROKER_PASSWORD, "password")):
            assert env[name]["valueFrom"] == {"secretKeyRef": {"name": secret, "key": key}}
    assert "password" not in json.dumps(payload)
    # without a broker, no broker variables
    bare = children.desired_rayjob(scenario, payload, CityOptions(city="testcity", workload_mode="cluster"))
    assert "env" not in bare["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_a_scoring_identity_removed_from_the_users_is_disconnected(broker: Any) -> None:
    _, password, _ = await set_up(broker, datetime.now(UTC) - timedelta(days=1))
    user = scoring_identity(SCENARIO_UID)
    closed = asyncio.Event()

    async def on_closed() -> None:
        closed.set()

    nc = await nats.connect(broker.broker.url, user=user, password=password, allow_reconnect=False,
                            inbox_prefix=inbox_prefix(user), closed_cb=on_closed)
    try:
        await nc.jetstream().stream_info(windows_stream("fleet-a"))
        broker.users = [u for u in broker.users if u.name != user]
        await asyncio.to_thread(broker.broker.set_users, broker.users)
        async with asyncio.timeout(10):
            await closed.wait()  # the reload closed it: a Scenario gone reads nothing more
    finally:
        with contextlib.suppress(ConnectionError):
            await nc.close()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):  # nor is it let back in
        await nats.connect(broker.broker.url, user=user, password=password, allow_reconnect=False,
                           max_reconnect_attempts=0, connect_timeout=2)


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_windows_kept_less_long_than_two_ack_waits_still_get_their_stream(broker: Any) -> None:
    """15-min windows kept an hour: the windows stream's duplicate window is capped at its age (the
    server refuses a longer one), not the two ack waits (over an hour) it would otherwise be."""
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        js = nc.jetstream()
        await ensure_city_streams(js, broker.city)
        await ensure_fleet_streams(js, broker.city, "fleet-long", window_s=900, allowed_lateness_s=60,
                                   retention_hours=1)
        config = (await js.stream_info(windows_stream("fleet-long"))).config
        assert config.max_age == 3600
        assert config.duplicate_window == 3600


@pytest.mark.timeout(60)
@pytest.mark.asyncio
async def test_the_scenarios_consumers_are_listed_for_the_sweep_and_orphans_found(broker: Any) -> None:
    """What the operator's resync sweeps: consumers of Scenarios no longer there (deleted while it
    was down), never the history consumer nor a live Scenario's."""
    from citynerve.operators.city.reconcile import orphan_consumers  # noqa: PLC0415
    from citynerve.workloads.dataplane.streams import scoring_consumers  # noqa: PLC0415

    live, gone = scoring_identity("uid-live"), scoring_identity("uid-gone")
    async with connected(broker.broker, OPERATOR_USER, broker.operator_password) as (nc, _):
        js = nc.jetstream()
        await ensure_city_streams(js, broker.city)
        await ensure_fleet_streams(js, broker.city, "fleet-s", window_s=60, allowed_lateness_s=10,
                                   retention_hours=24)
        start = datetime(2026, 12, 1, tzinfo=UTC)
        for consumer in (live, gone):
            await ensure_scoring_consumer(js, "fleet-s", consumer, start)
        listed = {"fleet-s": await scoring_consumers(js, "fleet-s"),
                  "fleet-none": await scoring_consumers(js, "fleet-none")}
    assert listed == {"fleet-s": sorted([live, gone]), "fleet-none": []}
    assert orphan_consumers(listed, {live}) == {"fleet-s": [gone]}
    assert orphan_consumers(listed, {live, gone}) == {}
