"""A fleet's NGSI-LD HTTP gateway: checks a batch upsert, stores it on JetStream, then answers.

``POST /ngsi-ld/v1/entityOperations/upsert`` is where field gateways that speak NGSI-LD post a
fleet's readings. The gateway does not validate readings (the fleet's stream worker does, in one
place, downstream); it checks the request as a whole and hands the body, unchanged, to
``publish``, answering 204 only once the broker has stored it:

- the body is read by the gateway itself, counted in bytes actually received, so a lying,
  negative or missing ``Content-Length`` and a chunked body meet the same limit, and it must
  arrive within the read timeout (a client that stalls mid-body is answered 408 and cut off);
- its nesting depth and entity count are measured by a vectorised scan of its brackets outside
  strings, before any parser recurses on it;
- only then is it parsed, as an array of objects that each hold an ``id`` and a ``type``;
- the bodies of all requests in flight share one byte budget, so memory stays bounded however
  many clients send at once (past it: 503 with Retry-After).

A broken whole payload is answered 400 with an NGSI-LD ProblemDetails body, never 207. The
message id is the body's SHA-256, so a batch posted twice (a gateway retrying after a lost
answer) is stored once by the stream's duplicate window. ``docs/ngsi-ld-gateway.md`` tables
every answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import msgspec
import nats.errors
import numpy as np
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from citynerve.workloads.dataplane.names import (
    CONTENT_JSON,
    CONTENT_NGSI_LD,
    HEADER_CONTENT_TYPE,
    HEADER_MSG_ID,
)
from nats.js import JetStreamContext

log = logging.getLogger(__name__)

UPSERT_PATH = "/ngsi-ld/v1/entityOperations/upsert"
ACCEPTED_CONTENT_TYPES = (CONTENT_JSON, CONTENT_NGSI_LD)
# NGSI-LD ProblemDetails types (ETSI GS CIM 009, 5.5.2).
BAD_REQUEST_TYPE = "https://uri.etsi.org/ngsi-ld/errors/BadRequestData"
INTERNAL_ERROR_TYPE = "https://uri.etsi.org/ngsi-ld/errors/InternalError"
# Bodies above this size are scanned and parsed on a worker thread, so the event loop keeps
# answering other connections meanwhile (16 MiB take ≈ 0.2 s).
_OFF_LOOP_BYTES = 1024 * 1024
_READ_CHUNK = 64 * 1024

Publish = Callable[[bytes, str, str], Awaitable[None]]
"""Stores ``body`` durably with its content type under a message id; returns once stored."""


class BrokerUnavailableError(Exception):
    """The broker did not store the body (not connected, no answer in time, or the stream is
    full): nothing was stored for sure, and the client must retry."""


class BodyTooLargeForBrokerError(Exception):
    """The body is larger than the broker's largest message (its ``max_payload``)."""


@dataclass(frozen=True)
class GatewayLimits:
    """What the gateway accepts, and how long it waits."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_entities: int = 10_000
    max_depth: int = 32  # ``[{"p": {"value": …}}]`` is 3 deep; NGSI-LD entities rarely pass 8
    read_timeout_s: float = 30.0  # the whole body must have arrived by then
    keepalive_timeout_s: float = 75.0  # an idle connection (or one that never sends a request)
    # After an answer sent before the body was read (413, 415, 503), the rest is drained this
    # long, so the client reads the answer rather than a connection reset.
    linger_s: float = 2.0
    retry_after_s: int = 5  # the Retry-After of a 503
    # Body bytes all requests together may hold while they are read, checked and published:
    # what bounds the gateway's memory, whatever the number of clients. Past it: 503.
    max_pending_bytes: int = 64 * 1024 * 1024


@dataclass
class GatewayCounters:
    """What the gateway did, for the fleet's status."""

    answers: Counter[int] = field(default_factory=Counter)
    body_bytes: int = 0  # request body bytes received
    stored_batches: int = 0
    stored_bytes: int = 0
    stalled_cut: int = 0  # connections cut because the body did not arrive in time
    abandoned: int = 0  # requests whose client closed the connection mid-body

    def as_status(self) -> dict[str, Any]:
        return {"answers": {str(status): n for status, n in sorted(self.answers.items())},
                "bodyBytes": self.body_bytes, "storedBatches": self.stored_batches,
                "storedBytes": self.stored_bytes, "stalledConnectionsCut": self.stalled_cut,
                "abandonedRequests": self.abandoned}


DEFAULT_LIMITS = GatewayLimits()


@dataclass
class _Gateway:
    """What the handlers of one app share."""

    publish: Publish
    broker_connected: Callable[[], bool]
    limits: GatewayLimits
    counters: GatewayCounters = field(default_factory=GatewayCounters)
    pending_bytes: int = 0  # body bytes held by requests in flight (see ``max_pending_bytes``)
    draining: bool = False
    # Large bodies are checked here, one at a time: the scan's copies of a 16 MiB body take
    # about 100 MB while it runs.
    checker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-check"))


_GATEWAY = web.AppKey("gateway", _Gateway)


class _Entity(msgspec.Struct):
    """All the gateway asks of an entity: that it is a JSON object. Its members are skipped, not
    decoded: an entity without an id or type is the stream worker's to quarantine, with a reason
    and counted, while the rest of its batch is windowed (one bad entity never costs a batch)."""


_BATCH = msgspec.json.Decoder(list[_Entity])


@dataclass(frozen=True)
class BatchShape:
    """The nesting depth of a JSON text and how many containers its outermost one holds."""

    depth: int
    top_level: int


def batch_shape(body: bytes) -> BatchShape:
    """Measure nesting without parsing: brackets outside strings, in a few vectorised passes.

    Escaped backslashes, then escaped quotes, are removed first (a run of backslashes leaves
    its parity), so every remaining ``"`` opens or closes a string. Garbage may be measured
    deeper than it is, never shallower than what a parser would reach before rejecting it.
    ``top_level`` counts the containers (objects) directly inside the outermost one.
    """
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    data = np.frombuffer(plain, np.uint8)
    folded = data | 0x20  # '[' → '{', ']' → '}'; '"' (0x22) stays itself
    marks = folded[np.flatnonzero((folded == 0x7B) | (folded == 0x7D) | (data == 0x22))]
    quotes = marks == 0x22
    outside = ~quotes & ((np.cumsum(quotes, dtype=np.int64) & 1) == 0)
    steps = np.where(marks[outside] == 0x7B, 1, -1).astype(np.int32)
    depth = np.cumsum(steps, dtype=np.int32)
    return BatchShape(int(depth.max()) if depth.size else 0,
                      int(np.count_nonzero((steps == 1) & (depth == 2))))


class _Refused(Exception):  # noqa: N818 - a refusal with its answer, not an error of ours
    def __init__(self, status: HTTPStatus, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


def check_batch(body: bytes, limits: GatewayLimits) -> None:
    """Refuse a body that is not a batch of at most ``max_entities`` entities with id and type."""
    shape = batch_shape(body)
    if shape.depth > limits.max_depth:
        raise _Refused(HTTPStatus.BAD_REQUEST, "nesting too deep",
                       f"the payload nests {shape.depth} deep; at most {limits.max_depth} is accepted")
    if shape.top_level > limits.max_entities:
        raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "too many entities",
                       f"the batch holds {shape.top_level} entities; at most {limits.max_entities} "
                       "are accepted: split it")
    try:
        entities = _BATCH.decode(body)
    except msgspec.ValidationError as exc:
        raise _Refused(HTTPStatus.BAD_REQUEST, "not a batch of entities",
                       f"an upsert is a JSON array of entities (JSON objects): {exc}") from exc
    except msgspec.DecodeError as exc:
        raise _Refused(HTTPStatus.BAD_REQUEST, "not JSON", str(exc)) from exc
    if not entities:
        raise _Refused(HTTPStatus.BAD_REQUEST, "empty batch", "the array holds no entity")


def _problem(status: HTTPStatus, title: str, detail: str, problem: str = BAD_REQUEST_TYPE,
             headers: dict[str, str] | None = None) -> web.Response:
    response = web.json_response({"type": problem, "title": title, "detail": detail},
                                 status=status, headers=headers)
    if status >= HTTPStatus.BAD_REQUEST:
        response.force_close()  # a refused client starts afresh; what it sent after is not read
    return response


class _Busy(Exception):  # noqa: N818 - an answer (503), not an error of ours
    """The requests in flight hold ``max_pending_bytes`` already."""


@dataclass
class _Held:
    """The body bytes one request holds against the gateway's ``pending_bytes``."""

    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


async def _read_body(request: web.Request, gateway: _Gateway, held: _Held) -> bytes:
    """The body as received, refused once it passes the limit, whatever the headers said."""
    limits = gateway.limits
    while chunk := await request.content.read(_READ_CHUNK):
        gateway.counters.body_bytes += len(chunk)
        if held.size + len(chunk) > limits.max_body_bytes:
            raise _Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large",
                           f"the body passed {limits.max_body_bytes} bytes")
        if gateway.pending_bytes + len(chunk) > limits.max_pending_bytes:
            raise _Busy
        held.size += len(chunk)
        gateway.pending_bytes += len(chunk)
        held.chunks.append(chunk)
    body = b"".join(held.chunks)
    held.chunks.clear()
    return body


async def _upsert(request: web.Request) -> web.Response:
    gateway = request.app[_GATEWAY]
    limits, counters = gateway.limits, gateway.counters
    held = _Held()
    try:
        if request.content_type not in ACCEPTED_CONTENT_TYPES:
            return _problem(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "unsupported content type",
                            f"{request.content_type} is not one of {', '.join(ACCEPTED_CONTENT_TYPES)}")
        declared = request.content_length
        if declared is not None and declared > limits.max_body_bytes:
            return _problem(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large",
                            f"Content-Length {declared} is over {limits.max_body_bytes} bytes")
        if not gateway.broker_connected():
            return _unavailable(limits, "the broker is not connected")
        try:
            async with asyncio.timeout(limits.read_timeout_s):
                body = await _read_body(request, gateway, held)
        except TimeoutError:
            counters.stalled_cut += 1
            return _problem(HTTPStatus.REQUEST_TIMEOUT, "body too slow",
                            f"the body did not arrive within {limits.read_timeout_s:g} s")
        except ConnectionError:  # the client closed mid-body: the answer reaches no one
            counters.abandoned += 1
            return _problem(HTTPStatus.BAD_REQUEST, "body incomplete", "the client closed the connection")
        if len(body) > _OFF_LOOP_BYTES:
            await asyncio.get_running_loop().run_in_executor(gateway.checker, check_batch, body, limits)
        else:
            check_batch(body, limits)
        await gateway.publish(body, request.content_type, hashlib.sha256(body).hexdigest())
    except _Refused as refused:
        return _problem(refused.status, refused.title, refused.detail)
    except _Busy:
        return _unavailable(limits, f"the gateway holds {limits.max_pending_bytes} bytes of bodies in flight")
    except BodyTooLargeForBrokerError as exc:
        return _problem(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "body too large for the broker", str(exc))
    except BrokerUnavailableError as exc:
        log.warning("a batch was not stored; the client is told to retry: %s", exc)
        return _unavailable(limits, str(exc))
    finally:
        gateway.pending_bytes -= held.size
    counters.stored_batches += 1
    counters.stored_bytes += len(body)
    return web.Response(status=HTTPStatus.NO_CONTENT)


def _unavailable(limits: GatewayLimits, detail: str) -> web.Response:
    return _problem(HTTPStatus.SERVICE_UNAVAILABLE, "not stored: retry", detail, INTERNAL_ERROR_TYPE,
                    headers={"Retry-After": str(limits.retry_after_s)})


async def _healthz(request: web.Request) -> web.Response:
    """Healthy while the broker is connected: without it, no batch can be stored."""
    if request.app[_GATEWAY].broker_connected():
        return web.json_response({"broker": "connected"})
    return web.json_response({"broker": "disconnected"}, status=HTTPStatus.SERVICE_UNAVAILABLE)


async def _readyz(request: web.Request) -> web.Response:
    """Ready while healthy and not shutting down (a load balancer stops sending first)."""
    gateway = request.app[_GATEWAY]
    if gateway.draining:
        return web.json_response({"ready": False, "reason": "shutting down"},
                                 status=HTTPStatus.SERVICE_UNAVAILABLE)
    if not gateway.broker_connected():
        return web.json_response({"ready": False, "reason": "the broker is not connected"},
                                 status=HTTPStatus.SERVICE_UNAVAILABLE)
    return web.json_response({"ready": True})


def make_app(publish: Publish, limits: GatewayLimits = DEFAULT_LIMITS, *,
             broker_connected: Callable[[], bool] = lambda: True) -> web.Application:
    """The gateway of one fleet; ``publish`` stores a body durably, ``broker_connected`` says
    whether it can (``nc.is_connected`` of the NATS connection behind ``publish``)."""
    app = web.Application()
    app[_GATEWAY] = _Gateway(publish, broker_connected, limits)

    async def drain(app: web.Application) -> None:
        app[_GATEWAY].draining = True

    async def close(app: web.Application) -> None:
        app[_GATEWAY].checker.shutdown(wait=True)

    app.on_shutdown.append(drain)
    app.on_cleanup.append(close)
    app.router.add_post(UPSERT_PATH, _upsert)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


def counters(app: web.Application) -> GatewayCounters:
    """The app's counters (``.as_status()`` for the fleet status)."""
    return app[_GATEWAY].counters


def _counting_access_log(tally: GatewayCounters) -> type[AbstractAccessLogger]:
    """An access logger that counts every answer, those of aiohttp's own parser included (a
    garbage Content-Length, an over-long header line) which never reach the app."""

    class CountingAccessLogger(AbstractAccessLogger):
        def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
            tally.answers[response.status] += 1
            self.logger.debug("%s %s %s %d %.3fs", request.remote, request.method, request.path,
                              response.status, time)

    return CountingAccessLogger


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve a gateway app on ``host:port`` (0: any free port, see ``runner.addresses``).

    Stop it with ``await runner.cleanup()``; requests in flight get the read timeout to finish.
    """
    gateway = app[_GATEWAY]
    limits = gateway.limits
    runner = web.AppRunner(app, access_log_class=_counting_access_log(gateway.counters), access_log=log,
                           keepalive_timeout=limits.keepalive_timeout_s, lingering_time=limits.linger_s,
                           shutdown_timeout=limits.read_timeout_s)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def jetstream_publisher(js: JetStreamContext, subject: str, timeout_s: float = 5.0) -> Publish:
    """A ``publish`` storing each body on ``subject`` with its message id and content type.

    A stream full (discard-new), a broker away, or no answer within ``timeout_s`` raise
    ``BrokerUnavailableError``; a body over the broker's ``max_payload``,
    ``BodyTooLargeForBrokerError``.
    """

    async def publish(body: bytes, content_type: str, msg_id: str) -> None:
        try:
            await js.publish(subject, body, timeout=timeout_s,
                             headers={HEADER_MSG_ID: msg_id, HEADER_CONTENT_TYPE: content_type})
        except nats.errors.MaxPayloadError as exc:
            msg = f"{len(body)} bytes is over the broker's largest message: {exc}"
            raise BodyTooLargeForBrokerError(msg) from exc
        except nats.errors.Error as exc:
            msg = f"{subject}: {type(exc).__name__}: {exc}"
            raise BrokerUnavailableError(msg) from exc

    return publish
