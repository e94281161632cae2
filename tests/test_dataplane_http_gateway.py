"""The NGSI-LD HTTP gateway on a real aiohttp server in front of a real nats-server (JetStream).

Malformed requests go over raw sockets, so each reaches the server exactly as an attacker would
send it; every case checks the documented answer, what the stream holds and the counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
import pytest_asyncio
from citynerve.workloads.dataplane.broker import OPERATOR_USER
from citynerve.workloads.dataplane.http_gateway import (
    UPSERT_PATH,
    BatchShape,
    GatewayLimits,
    batch_shape,
    counters,
    jetstream_publisher,
    make_app,
    serve,
)
from citynerve.workloads.dataplane.names import (
    CONTENT_NGSI_LD,
    HEADER_CONTENT_TYPE,
    HEADER_MSG_ID,
    inbox_prefix,
    readings_stream,
    readings_subject,
)
from citynerve.workloads.dataplane.streams import ensure_fleet_streams
from nats.aio.client import Client
from nats.js import JetStreamContext

from tests.conftest import RunningBroker

pytestmark = pytest.mark.timeout(90)
FLEET = "pudong-pressure"
LIMITS = GatewayLimits(max_body_bytes=1024 * 1024, max_entities=100, max_depth=32, read_timeout_s=1.5,
                       keepalive_timeout_s=5.0, linger_s=0.5, retry_after_s=3)


def entities(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"id": f"urn:ngsi-ld:Device:g{i}", "type": "Device",
             "pressure": {"type": "Property", "value": 300.5 + i, "observedAt": "2026-12-06T20:00:00Z"}}
            for i in range(start, start + n)]


def batch(n: int = 3, start: int = 0) -> bytes:
    return json.dumps(entities(n, start)).encode()


async def wait_until(condition: Callable[[], bool], within_s: float, what: str) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {within_s} s")
        await asyncio.sleep(0.02)


@dataclass
class Gateway:
    """A served gateway app, its broker connection (the fleet's ingest user) and the stream."""

    app: Any
    port: int
    nc: Client
    admin: JetStreamContext  # the operator's: it may read the stream, the gateway may not

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stored(self) -> list[Any]:
        """Every message of the fleet's readings stream."""
        state = (await self.admin.stream_info(readings_stream(FLEET))).state
        if not state.messages:
            return []
        return [await self.admin.get_msg(readings_stream(FLEET), seq)
                for seq in range(state.first_seq, state.last_seq + 1)]

    def answers(self) -> dict[str, int]:
        answers: dict[str, int] = counters(self.app).as_status()["answers"]
        return answers


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest_asyncio.fixture
async def make_gateway(broker: RunningBroker) -> AsyncIterator[GatewayFactory]:
    """Builds the fleet's streams as the city operator does, and a served gateway publishing into
    them as the fleet's ingest user (the identity the worker that runs the gateway has)."""
    passwords = broker.add_fleet(FLEET)
    admin = await nats.connect(broker.broker.url, user=OPERATOR_USER, password=broker.operator_password)
    runners, connections = [], [admin]

    async def build(limits: GatewayLimits = LIMITS, max_bytes: int | None = None) -> Gateway:
        await ensure_fleet_streams(admin.jetstream(), broker.city, FLEET, window_s=60, allowed_lateness_s=30,
                                   retention_hours=1, max_bytes=max_bytes)
        nc = await nats.connect(broker.broker.url, user=f"{FLEET}-ingest", password=passwords.ingest,
                                reconnect_time_wait=0.1, max_reconnect_attempts=-1,
                                inbox_prefix=inbox_prefix(f"{FLEET}-ingest"))  # as the worker connects
        connections.append(nc)
        publish = jetstream_publisher(nc.jetstream(), readings_subject(broker.city, FLEET), timeout_s=2.0)
        app = make_app(publish, limits, broker_connected=lambda: nc.is_connected)
        runner = await serve(app, "127.0.0.1", 0)
        runners.append(runner)
        return Gateway(app, runner.addresses[0][1], nc, admin.jetstream())

    yield build
    for runner in runners:
        await runner.cleanup()
    for nc in connections:
        await nc.close()


@pytest_asyncio.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


async def post(gateway: Gateway, body: bytes,
               content_type: str = CONTENT_NGSI_LD) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(
            gateway.url + UPSERT_PATH, data=body, headers={"Content-Type": content_type}) as resp:
        text = await resp.read()
        return resp.status, (json.loads(text) if text else {})


async def raw(gateway: Gateway, request: bytes) -> bytes:
    """Send bytes as they are and read the answer until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def request_head(content_length: str | None = None, content_type: str = CONTENT_NGSI_LD,
                 extra: str = "") -> bytes:
    length = f"Content-Length: {content_length}\r\n" if content_length is not None else ""
    return (f"POST {UPSERT_PATH} HTTP/1.1\r\nHost: gateway\r\nContent-Type: {content_type}\r\n"
            f"{length}{extra}\r\n").encode()


# -- the depth scan, pure --------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "depth", "top_level"), [
    (b"[]", 1, 0),
    (b'[{"id": "a", "type": "b"}, {"id": "c", "type": "d"}]', 2, 2),
    (b'[{"v": {"value": [1, [2]]}}]', 5, 1),
    (b'[{"s": "[[[{{{"}]', 2, 1),  # brackets inside a string are text
    (b'[{"s": "a \\" [[["}]', 2, 1),  # an escaped quote does not end the string
    (b'[{"s": "a \\\\"}, [[1]]]', 3, 2),  # an escaped backslash does not escape the quote
    (b'[{"s": "\\\\\\"[["}]', 2, 1),  # three backslashes: the quote is escaped
    (b"[" * 100_000 + b"]" * 100_000, 100_000, 1),
])
def test_batch_shape_counts_brackets_outside_strings(text: bytes, depth: int, top_level: int) -> None:
    assert batch_shape(text) == BatchShape(depth, top_level)


# -- stored, once ------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_a_batch_is_stored_with_its_hash_and_content_type_before_204(gateway: Gateway) -> None:
    body = batch(3)
    status, _ = await post(gateway, body)
    assert status == 204
    [message] = await gateway.stored()
    assert message.data == body
    assert message.headers[HEADER_MSG_ID] == hashlib.sha256(body).hexdigest()
    assert message.headers[HEADER_CONTENT_TYPE] == CONTENT_NGSI_LD
    assert counters(gateway.app).as_status() == {
        "answers": {"204": 1}, "bodyBytes": len(body), "storedBatches": 1, "storedBytes": len(body),
        "stalledConnectionsCut": 0, "abandonedRequests": 0}


@pytest.mark.asyncio
async def test_the_same_batch_posted_twice_is_stored_once(gateway: Gateway) -> None:
    body = batch(5)
    assert (await post(gateway, body))[0] == 204
    assert (await post(gateway, body, "application/json"))[0] == 204
    assert [m.data for m in await gateway.stored()] == [body]


@pytest.mark.asyncio
async def test_a_chunked_body_is_stored_whole(gateway: Gateway) -> None:
    body = batch(40)
    chunks = [body[i:i + 100] for i in range(0, len(body), 100)]
    wire = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    head = request_head(extra="Transfer-Encoding: chunked\r\nConnection: close\r\n")
    answer = await raw(gateway, head + wire)
    assert status_of(answer) == 204
    assert [m.data for m in await gateway.stored()] == [body]


# -- refused as a whole: 400 with a ProblemDetails body, never 207 ----------------------------------
BROKEN_PAYLOADS = [
    (b"this is not json", "not JSON"),
    (b'[{"id": "a", "type": "b"}', "not JSON"),  # cut short
    (b'{"id": "a", "type": "b"}', "not a batch of entities"),  # an entity, not an array
    (b"[1, 2]", "not a batch of entities"),
    (b'[{"id": "a", "type": "b"}, 7]', "not a batch of entities"),  # a number among the entities
    (b"[]", "empty batch"),
    (b"", "not JSON"),
]


@pytest.mark.asyncio
async def test_a_broken_whole_payload_is_400_with_a_problem(gateway: Gateway) -> None:
    # One gateway for every case: a broker per case would cost seconds each.
    for body, title in BROKEN_PAYLOADS:
        status, problem = await post(gateway, body)
        assert (status, problem["title"]) == (400, title), body
        assert set(problem) == {"type", "title", "detail"}, body
        assert problem["type"] == "https://uri.etsi.org/ngsi-ld/errors/BadRequestData", body
    _, stray = await post(gateway, BROKEN_PAYLOADS[4][0])
    assert "at `$[1]`" in stray["detail"], stray  # the detail names the entity
    assert await gateway.stored() == []
    assert gateway.answers() == {"400": len(BROKEN_PAYLOADS) + 1}


@pytest.mark.asyncio
async def test_an_entity_without_id_or_type_is_the_workers_to_quarantine_not_the_batchs_end(
        gateway: Gateway) -> None:
    body = b'[{"id": "a", "type": "b"}, {"type": "b"}, {"id": "c"}]'
    status, _ = await post(gateway, body)
    assert status == 204  # stored whole: the stream worker quarantines the two, windows the first
    assert [m.data for m in await gateway.stored()] == [body]


@pytest.mark.asyncio
async def test_json_nested_100000_deep_is_400_and_the_gateway_stays_healthy(gateway: Gateway) -> None:
    status, problem = await post(gateway, b"[" * 100_000 + b"]" * 100_000)
    assert (status, problem["title"]) == (400, "nesting too deep")
    assert "100000 deep" in problem["detail"]
    inside = b'[{"id": "a", "type": "b", "p": ' + b"[" * 31 + b"]" * 31 + b"}]"  # 33 deep
    assert (await post(gateway, inside))[1]["title"] == "nesting too deep"
    assert (await post(gateway, b'[{"id": "a", "type": "b", "p": ' + b"[" * 30 + b"]" * 30 + b"}]"))[0] == 204
    async with aiohttp.ClientSession() as session, session.get(gateway.url + "/healthz") as resp:
        assert resp.status == 200
    assert gateway.answers() == {"200": 1, "204": 1, "400": 2}
    assert len(await gateway.stored()) == 1


@pytest.mark.asyncio
async def test_a_batch_over_the_entity_limit_is_413(gateway: Gateway) -> None:
    status, problem = await post(gateway, batch(LIMITS.max_entities + 1))
    assert (status, problem["title"]) == (413, "too many entities")
    assert (await post(gateway, batch(LIMITS.max_entities)))[0] == 204
    assert gateway.answers() == {"204": 1, "413": 1}


@pytest.mark.asyncio
async def test_another_content_type_is_415(gateway: Gateway) -> None:
    body = batch()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/json-patch+json"):
        assert status_of(await raw(gateway, request_head(str(len(body)), content_type) + body)) == 415
    none = f"POST {UPSERT_PATH} HTTP/1.1\r\nHost: g\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    assert status_of(await raw(gateway, none + body)) == 415
    assert await gateway.stored() == []
    assert gateway.answers() == {"415": 4}


@pytest.mark.asyncio
async def test_other_paths_and_methods_are_404_and_405(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + UPSERT_PATH) as resp:
            assert resp.status == 405
        async with session.post(gateway.url + "/ngsi-ld/v1/entities", data=batch()) as resp:
            assert resp.status == 404
    assert gateway.answers() == {"404": 1, "405": 1}


# -- the body limit holds whatever the headers say -------------------------------------------------
@pytest.mark.asyncio
async def test_a_garbage_content_length_is_400_from_the_parser(gateway: Gateway) -> None:
    lengths = ["-1", "abc", "1e3", "12, 12", "99999999999999999999999", ""]
    for length in lengths:
        assert status_of(await raw(gateway, request_head(length) + batch())) == 400, length
    assert await gateway.stored() == []
    assert gateway.answers() == {"400": len(lengths)}


@pytest.mark.asyncio
async def test_a_declared_length_over_the_limit_is_413_before_reading(gateway: Gateway) -> None:
    answer = await raw(gateway, request_head(str(LIMITS.max_body_bytes + 1)) + b"[")
    assert status_of(answer) == 413
    assert counters(gateway.app).body_bytes == 0
    assert gateway.answers() == {"413": 1}


@pytest.mark.asyncio
async def test_a_chunked_body_over_the_limit_is_413(gateway: Gateway) -> None:
    chunk = b" " * 65536
    chunks = LIMITS.max_body_bytes // len(chunk) + 2
    wire = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(chunks))
    answer = await raw(gateway, request_head(extra="Transfer-Encoding: chunked\r\n") + wire + b"0\r\n\r\n")
    assert status_of(answer) == 413
    assert LIMITS.max_body_bytes < counters(gateway.app).body_bytes <= LIMITS.max_body_bytes + 65536
    assert await gateway.stored() == []


@pytest.mark.asyncio
async def test_20_mb_under_a_content_length_of_100_stores_nothing(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(request_head("100") + b"[" + b'{"id": "a", "type": "b"},' * (20 * 1024 * 1024 // 25))
    with contextlib.suppress(ConnectionError):  # closed after the answer: the rest never read
        await asyncio.wait_for(writer.drain(), 10)
    try:
        answer = await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        answer = b""
    finally:
        writer.close()
    if answer:  # else the connection was reset under the answer, the rest of the 20 MB unread
        assert status_of(answer) in {400, 413}
    # The parser meets the garbage after byte 100 as a second request line; whether the first
    # request reached the app first depends on how the bytes were segmented: never past byte 100.
    assert counters(gateway.app).body_bytes <= 100
    assert gateway.answers() == {"400": 1}
    assert await gateway.stored() == []


# -- stalled clients ------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_64_stalled_connections_do_not_hold_back_a_65th_and_are_cut(gateway: Gateway) -> None:
    stalled = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(64)]
    for _, writer in stalled:
        writer.write(request_head("1000") + b'[{"id": "a", ')  # and then nothing more
        await writer.drain()
    await wait_until(lambda: counters(gateway.app).body_bytes == 64 * 13, 10, "the stalled bodies read")
    started = time.monotonic()
    assert (await post(gateway, batch(2)))[0] == 204
    assert time.monotonic() - started < 1.0
    answers = await asyncio.gather(*(asyncio.wait_for(reader.read(), LIMITS.read_timeout_s + 5)
                                     for reader, _ in stalled))
    for answer, (_, writer) in zip(answers, stalled, strict=True):
        assert status_of(answer) == 408  # then the connection closed: read() returned at its end
        writer.close()
    assert counters(gateway.app).stalled_cut == 64
    assert gateway.answers() == {"204": 1, "408": 64}
    assert len(await gateway.stored()) == 1


@pytest.mark.asyncio
async def test_bodies_in_flight_are_bounded_in_bytes_and_released(make_gateway: GatewayFactory) -> None:
    limits = GatewayLimits(max_body_bytes=1_000_000, max_entities=10_000, read_timeout_s=1.5, linger_s=0.5,
                           max_pending_bytes=2 * 1024 * 1024)
    gateway = await make_gateway(limits)
    clients = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(3)]
    for _, writer in clients:  # 900 kB each of a declared 1 MB, then nothing: 2.7 MB offered
        writer.write(request_head("1000000") + b"[" + b" " * 899_999)
    answers = await asyncio.gather(*(asyncio.wait_for(reader.read(), limits.read_timeout_s + 5)
                                     for reader, _ in clients))
    for _, writer in clients:
        writer.close()
    assert sorted(status_of(answer) for answer in answers) == [408, 408, 503]
    assert b"Retry-After: 5" in next(answer for answer in answers if status_of(answer) == 503)
    # Every byte held was released: two bodies of nearly 1 MB each fit in the 2 MiB together again.
    first, second = batch(7000), batch(6900, start=7000)
    assert 1_950_000 < len(first) + len(second) < 2_000_000
    stored = await asyncio.gather(post(gateway, first), post(gateway, second))
    assert [status for status, _ in stored] == [204, 204]
    assert gateway.answers() == {"204": 2, "408": 2, "503": 1}


@pytest.mark.asyncio
async def test_a_client_that_closes_mid_body_is_counted_and_nothing_is_stored(
        gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(request_head("1000") + b'[{"id": "a", ')
    await writer.drain()
    await wait_until(lambda: counters(gateway.app).body_bytes == 13, 10, "the partial body read")
    writer.close()
    await wait_until(lambda: counters(gateway.app).abandoned == 1, 10, "the abandoned request counted")
    assert gateway.answers() == {"400": 1}  # the answer no one read
    assert await gateway.stored() == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.asyncio
async def test_a_connection_that_never_completes_a_request_is_closed_after_the_keepalive(
        make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(GatewayLimits(keepalive_timeout_s=0.5))
    silent = await asyncio.open_connection("127.0.0.1", gateway.port)
    trickling = await asyncio.open_connection("127.0.0.1", gateway.port)
    started = time.monotonic()
    trickling[1].write(b"POST " + UPSERT_PATH.encode() + b" HTTP/1.1\r\nHost: gate")  # and no more
    for reader, writer in (silent, trickling):
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    assert 0.4 < time.monotonic() - started < 3
    assert gateway.answers() == {}


# -- the broker: 503 and nothing lost ---------------------------------------------------------------
@pytest.mark.asyncio
async def test_broker_down_is_503_with_retry_after_and_the_retry_is_stored_once(
        gateway: Gateway, broker: RunningBroker) -> None:
    body = batch(4)
    broker.broker.stop()
    await wait_until(lambda: not gateway.nc.is_connected, 10, "the gateway's connection to notice")
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + UPSERT_PATH, data=body,
                                headers={"Content-Type": CONTENT_NGSI_LD}) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == str(LIMITS.retry_after_s)
            assert (await resp.json())["title"] == "not stored: retry"
        for probe in ("/healthz", "/readyz"):
            async with session.get(gateway.url + probe) as resp:
                assert resp.status == 503
        broker.broker.start(broker.users)
        await wait_until(lambda: gateway.nc.is_connected, 15, "the gateway to reconnect")
        for probe in ("/healthz", "/readyz"):
            async with session.get(gateway.url + probe) as resp:
                assert resp.status == 200
    assert (await post(gateway, body))[0] == 204
    assert (await post(gateway, body))[0] == 204  # the client's own retry of a lost answer
    assert [m.data for m in await gateway.stored()] == [body]
    assert gateway.answers() == {"200": 2, "204": 2, "503": 3}


@pytest.mark.asyncio
async def test_readyz_turns_503_when_the_app_shuts_down_while_healthz_stays_200(gateway: Gateway) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/readyz") as resp:
            assert (resp.status, await resp.json()) == (200, {"ready": True})
        await gateway.app.shutdown()  # what the runner's cleanup does first
        async with session.get(gateway.url + "/readyz") as resp:
            assert (resp.status, (await resp.json())["reason"]) == (503, "shutting down")
        async with session.get(gateway.url + "/healthz") as resp:
            assert resp.status == 200
    assert gateway.answers() == {"200": 2, "503": 1}


@pytest.mark.asyncio
async def test_a_full_stream_is_503_and_stores_nothing_more(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(max_bytes=len(batch(2)) + 200)  # one batch, its subject and headers
    assert (await post(gateway, batch(2)))[0] == 204
    status, problem = await post(gateway, batch(2, start=10))
    assert status == 503
    assert "maximum bytes exceeded" in problem["detail"]
    assert [m.data for m in await gateway.stored()] == [batch(2)]
    assert counters(gateway.app).stored_batches == 1


# -- memory under a fuzz of bad requests ------------------------------------------------------------
def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def bad_request(i: int) -> bytes:
    """One of ten kinds of bad request, each different from the last (bodies up to 64 kB)."""
    filler = b"x" * (i * 97 % 65_536)
    chunked = request_head(extra="Transfer-Encoding: chunked\r\n")
    kinds = [
        request_head("-1") + filler,
        request_head("abc") + filler,
        request_head(str(len(filler) + 2)) + b'["' + filler,  # not JSON
        request_head("5000000") + filler,  # over the limit, declared
        chunked + b"%x\r\n%s\r\n0\r\n\r\n" % (len(filler), filler),
        request_head(str(len(filler)), "text/plain") + filler,
        request_head(str(2 * (i % 5000) + 2)) + b"[" * (i % 5000 + 1) + b"]" * (i % 5000 + 1),  # deep
        request_head("40") + b'[{"id": "a"}, 7]' + b" " * 24,  # a number among the entities
        b"GARBAGE / HTTP/1.1\r\n\r\n" + filler,
        request_head(extra="X-" + "a" * 9000 + ": 1\r\n"),  # a header line over aiohttp's 8190
    ]
    return kinds[i % len(kinds)]


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_rss_stays_bounded_over_2000_bad_requests(gateway: Gateway,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    # aiohttp logs every request its parser refuses, with a traceback: kept, those records
    # would be the test's memory, not the gateway's.
    caplog.set_level(logging.CRITICAL, logger="aiohttp.server")

    async def run(indices: range, clients: int = 100) -> list[int]:
        """``clients`` at a time: a refused body that never arrives is drained for ``linger_s``."""
        statuses: list[int] = []
        for first in range(indices.start, indices.stop, clients):
            answers = await asyncio.gather(*(raw(gateway, bad_request(i))
                                             for i in range(first, min(first + clients, indices.stop))))
            statuses += [status_of(answer) for answer in answers]
        return statuses

    warm = await run(range(500))  # the allocator's arenas reach their size for this mix
    before = rss_bytes()
    statuses = await run(range(500, 2500))
    grown = rss_bytes() - before
    assert set(warm) | set(statuses) <= {400, 413, 415, 431}
    assert await gateway.stored() == []
    assert sum(gateway.answers().values()) == 2500
    # Measured: 72.6 MiB after the warm-up, within 2 MiB of it over 4,500 more requests.
    assert grown < 8 * 1024 * 1024, f"RSS grew by {grown / 2**20:.1f} MiB over 2,000 bad requests"


@pytest.mark.asyncio
async def test_a_body_over_the_brokers_largest_message_is_413(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(GatewayLimits(max_entities=200_000))  # 16 MiB; the broker takes 8 MiB
    two_mb, nine_mb = batch(16_000), batch(72_000)
    assert 2_000_000 < len(two_mb) < 2_500_000
    assert 9_000_000 < len(nine_mb) < 16 * 2**20
    assert (await post(gateway, two_mb))[0] == 204  # checked off the event loop (over 1 MiB)
    status, problem = await post(gateway, nine_mb)
    assert (status, problem["title"]) == (413, "body too large for the broker")
    assert [m.data for m in await gateway.stored()] == [two_mb]
    assert gateway.answers() == {"204": 1, "413": 1}
