"""A work queue of object keys, as Kubernetes controllers keep one: deduplicated, one worker per key.

Kopf hands every watch event to a handler; the city operator's handlers only put the object's
key here and return, so Kopf lets go of the event's body at once. A fixed set of worker threads
takes keys and reconciles each from a fresh read. A key added again while it waits is queued
once; a key added while a worker holds it is queued again when that worker is done, so no
change is missed and one object is never reconciled by two workers at once. A failed
reconcile is retried after a per-key backoff (1, 2, 4 … 30 s). Memory is a few bytes per
waiting key however many objects are watched.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)
MAX_BACKOFF_SECONDS = 30.0


class WorkQueue:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[Hashable] = deque()
        self._dirty: set[Hashable] = set()  # waiting in the queue, or due again after processing
        self._processing: set[Hashable] = set()
        self._delayed: list[tuple[float, int, Hashable]] = []  # a heap of (due, order, key)
        self._order = itertools.count()
        self._closed = False

    def add(self, key: Hashable) -> None:
        with self._cond:
            self._add(key)

    def _add(self, key: Hashable) -> None:
        if self._closed or key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._cond.notify()

    def add_after(self, key: Hashable, seconds: float) -> None:
        """Add ``key`` once ``seconds`` have passed (a retry)."""
        with self._cond:
            if not self._closed:
                heapq.heappush(self._delayed, (time.monotonic() + seconds, next(self._order), key))
                self._cond.notify()

    def get(self) -> Hashable | None:
        """The next key, held until ``done``; None once the queue is closed."""
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    self._add(heapq.heappop(self._delayed)[2])
                if self._queue:
                    break
                self._cond.wait(self._delayed[0][0] - now if self._delayed else None)
            if self._closed:
                return None
            key = self._queue.popleft()
            self._dirty.discard(key)
            self._processing.add(key)
            return key

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty and not self._closed:
                self._queue.append(key)
                self._cond.notify()

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._processing)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._dirty.clear()
            self._delayed.clear()
            self._cond.notify_all()


def start_workers(queue: WorkQueue, process: Callable[[Hashable], None], count: int,
                  name: str) -> list[threading.Thread]:
    """``count`` threads taking keys from ``queue`` until it closes; a failure is retried with backoff."""
    failures: dict[Hashable, int] = {}
    lock = threading.Lock()

    def work() -> None:
        while (key := queue.get()) is not None:
            try:
                process(key)
            except Exception:
                with lock:
                    failures[key] = failures.get(key, 0) + 1
                    delay = min(MAX_BACKOFF_SECONDS, 2.0 ** (failures[key] - 1))
                log.exception("reconcile of %s failed; trying again in %.0f s", key, delay)
                queue.add_after(key, delay)
            else:
                with lock:
                    failures.pop(key, None)
            finally:
                queue.done(key)

    threads = [threading.Thread(target=work, name=f"{name}-{i}", daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads
