"""The consumer loop of a live scenario: its fleets' windows, off the broker, into its scorer.

One durable pull consumer per bound fleet (``scoring-<scenario uid>`` on ``citynerve-windows-<fleet>``,
made by the city operator), read with the scenario's own broker identity. Windows become steps
(``StepAssembler``), steps are scored (``scoring.WaterScorer``), detections go to the sink.

The unacknowledged tail of the consumers is the scorer's memory: a step's windows are acknowledged
only once the step has left the scorer's context. A workload that dies is started again, resets its
consumers (everything unacknowledged comes back at once), scores the context again — its
detections have deterministic Incident names, so nothing is raised twice — and goes on where it
stopped: no window is lost.

A new model takes over at a step boundary (``swap``): it adopts the old scorer's context and what
it raised, so no step is scored twice or skipped and an excursion already raised is not raised again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats
from citynerve.models.incidents import IncidentEvent
from citynerve.workloads.dataplane.names import inbox_prefix, windows_stream
from citynerve.workloads.dataplane.windows import Window
from citynerve.workloads.scoring import Step, StepAssembler, WaterScorer
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import Error as JetStreamError

log = logging.getLogger(__name__)

FETCH_BATCH = 256
LAG_EVERY_S = 2.0


@dataclass(frozen=True)
class BrokerAccess:
    """Where and as whom a scenario's workload reads its windows (the password never leaves memory)."""

    url: str
    user: str
    password: str = field(repr=False)
    consumer: str


@dataclass
class Progress:
    """What the loop has done, as the workload reports it."""

    windows: int = 0
    steps: int = 0
    lag_windows: int | None = None
    last_window_ms: int | None = None
    swaps: int = 0
    connected: bool = False

    def last_window_time(self) -> str | None:
        if self.last_window_ms is None:
            return None
        return datetime.fromtimestamp(self.last_window_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Sink = Callable[[IncidentEvent, WaterScorer, Any], None]  # event, the scorer that raised it, its tag


class LiveScoring:
    """Reads a scenario's windows and scores them until ``stop``; one asyncio loop on its own thread."""

    def __init__(self, access: BrokerAccess, scorer: WaterScorer, tag: Any,
                 fleets: Sequence[dict[str, Any]], sink: Sink, max_wait_s: float = 120.0) -> None:
        self.access = access
        self.scorer, self.tag = scorer, tag
        self.bindings = scorer.bindings(fleets)
        self.fleets = sorted({b.fleet for b in self.bindings})
        self.assembler = StepAssembler(self.bindings, scorer.step_s, max_wait_s)
        self.sink = sink
        self.progress = Progress()
        self.error: BaseException | None = None
        self._next: tuple[WaterScorer, Any] | None = None
        self._held: deque[list[Any]] = deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- control, from any thread --------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="live-scoring", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def swap(self, scorer: WaterScorer, tag: Any) -> None:
        """Score with ``scorer`` from the next step on (it takes over the current one's context)."""
        self._next = (scorer, tag)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the loop ------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            log.exception("live scoring stopped")
            self.error = exc

    async def _run(self) -> None:
        nc = await nats.connect(
            self.access.url, user=self.access.user, password=self.access.password,
            name=self.access.user, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
            inbox_prefix=inbox_prefix(self.access.user),
        )
        try:
            js = nc.jetstream()
            subs = {}
            for fleet in self.fleets:
                stream = windows_stream(fleet)
                info = await js.consumer_info(stream, self.access.consumer)
                if info.num_ack_pending:
                    # what a workload before this one held: back at once, so the context is whole
                    with contextlib.suppress(NatsError, JetStreamError, asyncio.TimeoutError):
                        await js.reset_consumer(stream, self.access.consumer)
                subs[fleet] = await js.pull_subscribe_bind(self.access.consumer, stream)
            self.progress.connected = True
            queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=4 * FETCH_BATCH)
            pullers = [asyncio.create_task(self._pull(sub, queue)) for sub in subs.values()]
            lag_at = 0.0
            try:
                while not self._stop.is_set():
                    try:
                        msg = await asyncio.wait_for(queue.get(), timeout=0.5)
                    except TimeoutError:
                        msg = None
                    if msg is not None:
                        window = Window.decode(msg.data)
                        steps, done = self.assembler.add(window, msg)
                        for token in done:
                            await token.ack()
                    else:
                        steps = self.assembler.expire()
                    for step in steps:
                        await self._score(step)
                    if time.monotonic() - lag_at > LAG_EVERY_S:
                        lag_at = time.monotonic()
                        await self._measure_lag(js)
                    for task in pullers:
                        if task.done() and task.exception() is not None:
                            raise task.exception()  # type: ignore[misc]
            finally:
                for task in pullers:
                    task.cancel()
        finally:
            self.progress.connected = False
            with contextlib.suppress(NatsError, asyncio.TimeoutError):
                await nc.close()

    async def _pull(self, sub: Any, queue: asyncio.Queue[Any]) -> None:
        while not self._stop.is_set():
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                continue
            for msg in msgs:
                await queue.put(msg)

    async def _score(self, step: Step) -> None:
        if self._next is not None:
            scorer, tag = self._next
            self._next = None
            scorer.adopt(self.scorer)
            self.scorer, self.tag = scorer, tag
            self.progress.swaps += 1
        events = self.scorer.score(step)
        for event in events:
            await asyncio.to_thread(self.sink, event, self.scorer, self.tag)
        self.progress.windows += len(step.windows)
        self.progress.steps += 1
        self.progress.last_window_ms = step.start_ms
        # acknowledged once out of the scorer's context: until then a restarted workload gets it back
        self._held.append(step.tokens)
        while len(self._held) > self.scorer.context_steps:
            for token in self._held.popleft():
                await token.ack()

    async def _measure_lag(self, js: Any) -> None:
        pending = 0
        for fleet in self.fleets:
            try:
                info = await js.consumer_info(windows_stream(fleet), self.access.consumer)
            except (TimeoutError, NatsError, JetStreamError):
                return
            pending += int(info.num_pending or 0)
        self.progress.lag_windows = pending + self.assembler.pending_windows
