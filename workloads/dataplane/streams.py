"""A city's and a fleet's JetStream objects: streams, the worker's durable consumer, the KV bucket.

The city operator calls these with its own broker user (a stream worker never creates what it
consumes); tests and benches do the same. Every function is idempotent: called again with the
same arguments it changes nothing, called with new limits it updates the stream in place.

Per city: the quarantine stream (``quarantine.<city>.>``, kept 7 days) and the KV bucket holding
every fleet's status and window checkpoint. Per fleet: the readings stream (a work queue: a
payload is gone once its windows are published and it is acknowledged), the windows stream
(kept ``retention_hours``), and the durable pull consumer its stream worker binds to. Per
Scenario scoring live: a durable consumer on each of its fleets' windows streams, named by its
broker identity (``names.scoring_identity``), which its workload binds to and cannot make itself.
"""

from __future__ import annotations

import contextlib
from datetime import datetime

from citynerve.workloads.dataplane.history import history_consumer_config
from citynerve.workloads.dataplane.names import (
    FLEETS_BUCKET,
    QUARANTINE_STREAM,
    SCORING_PREFIX,
    WORKER_CONSUMER,
    checkpoint_key,
    quarantine_subjects,
    readings_stream,
    readings_subject,
    status_key,
    windows_stream,
    windows_subject,
)
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, NotFoundError

QUARANTINE_MAX_AGE_S = 7 * 86400.0
QUARANTINE_MAX_BYTES = 1 << 30  # 1 GiB per city unless the operator says otherwise
QUARANTINE_DUPLICATE_WINDOW_S = 600.0  # a redelivered payload's quarantine is stored once
# The HTTP gateway sets Nats-Msg-Id to the body's hash: a batch retransmitted within this
# window is stored once.
READINGS_DUPLICATE_WINDOW_S = 120.0
# Messages a worker may hold unacknowledged. It holds each one until every window its readings
# fell in is published (window + allowed lateness), keeping only the message's ack subject, its
# newest window index and its counters (about 450 bytes, measured): 50,000 messages are about
# 22 MB of worker memory, and the single-reading MQTT messages 10,000 terminals send in 5 minutes
# at one reading a minute. Gateways send batches, so a fleet of gateways stays far below it. At
# the limit the server stops delivering; the worker then closes its oldest open window early
# (docs/data-plane.md, "Back-pressure").
MAX_ACK_PENDING = 50_000
# A scoring workload acknowledges a window only once it has left its context (two days of 15-min
# steps): what it holds unacknowledged is its memory, given back at once to the workload that
# replaces it (it resets its consumer at start). So the ack wait outlasts the context, or a running
# workload would be sent its own context again.
SCORING_ACK_WAIT_S = 7 * 86400.0
# Window messages (one per property and window, every terminal in it) a scoring workload may hold
# unacknowledged: its context of every property of its fleets, many times over.
SCORING_MAX_ACK_PENDING = 100_000
_STREAM_EXISTS_ERR = 10058  # "stream name already in use with a different configuration"


def worker_ack_wait_s(window_s: float, allowed_lateness_s: float) -> float:
    """How long the broker waits for a worker's ack before redelivering a payload.

    A payload is acknowledged once its newest window is closed: at most window + lateness after
    it arrived, plus the time to publish. Twice that and a minute to spare, so a live worker is
    never sent a payload it still holds.
    """
    return 2.0 * (window_s + allowed_lateness_s) + 60.0


def _readings_config(city: str, fleet: str, max_bytes: int | None) -> StreamConfig:
    """The work-queue stream a fleet's terminals and gateway publish into."""
    return StreamConfig(
        name=readings_stream(fleet),
        subjects=[readings_subject(city, fleet)],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        duplicate_window=READINGS_DUPLICATE_WINDOW_S,
        max_bytes=max_bytes if max_bytes is not None else -1,
        discard=DiscardPolicy.NEW,  # a full stream refuses the publish: the publisher sees it and retries
    )


def _windows_config(
    city: str, fleet: str, window_s: float, allowed_lateness_s: float, retention_hours: int,
    max_bytes: int | None,
) -> StreamConfig:
    """The stream of a fleet's closed windows, one subject per property."""
    return StreamConfig(
        name=windows_stream(fleet),
        subjects=[windows_subject(city, fleet, "*")],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=retention_hours * 3600.0,
        max_bytes=max_bytes if max_bytes is not None else -1,
        discard=DiscardPolicy.OLD,
        # a window published again by a worker restarted before its checkpoint is stored once; the
        # server refuses a duplicate window longer than the stream keeps messages (long windows,
        # short retention), and past that age a second publish has nothing to be a duplicate of
        duplicate_window=min(2.0 * worker_ack_wait_s(window_s, allowed_lateness_s), retention_hours * 3600.0),
    )


def _consumer_config(window_s: float, allowed_lateness_s: float) -> ConsumerConfig:
    """The durable pull consumer a fleet's stream worker binds to."""
    return ConsumerConfig(
        durable_name=WORKER_CONSUMER,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=worker_ack_wait_s(window_s, allowed_lateness_s),
        max_ack_pending=MAX_ACK_PENDING,
    )


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one to ``config`` (a no-op when it already is)."""
    try:
        await js.add_stream(config)
    except BadRequestError as err:
        if err.err_code != _STREAM_EXISTS_ERR:
            raise
        await js.update_stream(config)


async def ensure_city_streams(
    js: JetStreamContext, city: str, *, quarantine_max_bytes: int = QUARANTINE_MAX_BYTES
) -> None:
    """The city's quarantine stream and the KV bucket of its fleets' status and checkpoints."""
    await _ensure_stream(js, StreamConfig(
        name=QUARANTINE_STREAM,
        subjects=[quarantine_subjects(city)],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=QUARANTINE_MAX_AGE_S,
        max_bytes=quarantine_max_bytes,
        discard=DiscardPolicy.OLD,
        duplicate_window=QUARANTINE_DUPLICATE_WINDOW_S,
    ))
    # direct gets: a worker reads its checkpoint with the one subject its user may use for it
    await js.create_key_value(bucket=FLEETS_BUCKET, history=1, storage=StorageType.FILE, direct=True)


async def ensure_fleet_streams(
    js: JetStreamContext,
    city: str,
    fleet: str,
    *,
    window_s: int,
    allowed_lateness_s: int,
    retention_hours: int,
    max_bytes: int | None = None,
) -> None:
    """A fleet's readings and windows streams and its worker's consumer, as the arguments say.

    ``max_bytes`` bounds each of the two streams (None: unbounded); a full readings stream
    refuses publishes (the MQTT client and the HTTP gateway see it), a full windows stream
    drops its oldest windows.
    """
    await _ensure_stream(js, _readings_config(city, fleet, max_bytes))
    await _ensure_stream(
        js, _windows_config(city, fleet, window_s, allowed_lateness_s, retention_hours, max_bytes)
    )
    # creating a durable consumer that exists with another ack wait updates it
    await js.add_consumer(readings_stream(fleet), _consumer_config(window_s, allowed_lateness_s))
    # the history's, so the fleet's worker needs no right to create consumers
    await js.add_consumer(windows_stream(fleet), history_consumer_config(city, fleet))


async def delete_fleet_streams(js: JetStreamContext, fleet: str) -> None:
    """Everything ``ensure_fleet_streams`` made for the fleet, and its status and checkpoint keys."""
    for name in (readings_stream(fleet), windows_stream(fleet)):
        with contextlib.suppress(NotFoundError):
            await js.delete_stream(name)
    try:
        kv = await js.key_value(FLEETS_BUCKET)
    except NotFoundError:
        return
    for key in (status_key(fleet), checkpoint_key(fleet)):
        await kv.purge(key)


async def ensure_scoring_consumer(
    js: JetStreamContext, fleet: str, consumer: str, start_time: datetime
) -> None:
    """A Scenario's durable pull consumer ``consumer`` on the fleet's windows stream, delivering
    every property's windows stored from ``start_time`` on (timezone-aware; naive is UTC).

    Made once: an existing consumer is kept as it is (never moved back to ``start_time``), so
    what the workload acknowledged stays acknowledged across operator restarts. The filter is the
    windows stream's own subject (every property of the fleet), as the history's consumer has.
    """
    stream = windows_stream(fleet)
    with contextlib.suppress(NotFoundError):
        await js.consumer_info(stream, consumer)
        return
    info = await js.stream_info(stream)  # a fleet without its streams yet: NotFoundError, retried
    [subject] = info.config.subjects or []  # windows.<city>.<fleet>.*, as _windows_config made it
    await js.add_consumer(stream, ConsumerConfig(
        durable_name=consumer,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=start_time,
        ack_wait=SCORING_ACK_WAIT_S,
        max_ack_pending=SCORING_MAX_ACK_PENDING,
        filter_subject=subject,
    ))


async def scoring_consumers(js: JetStreamContext, fleet: str) -> list[str]:
    """The Scenarios' consumers on a fleet's windows stream (none when the stream is not there)."""
    try:
        infos = await js.consumers_info(windows_stream(fleet))
    except NotFoundError:
        return []
    return sorted(c.name for c in infos if c.name.startswith(SCORING_PREFIX))


async def delete_scoring_consumer(js: JetStreamContext, fleet: str, consumer: str) -> None:
    """Remove a Scenario's consumer from the fleet's windows stream; gone already is fine."""
    with contextlib.suppress(NotFoundError):
        await js.delete_consumer(windows_stream(fleet), consumer)
