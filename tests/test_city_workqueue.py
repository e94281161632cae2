"""The city operator's work queue: deduplicated keys, one worker per key, nothing missed."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Hashable

import pytest
from citynerve.operators.city.workqueue import WorkQueue, start_workers

pytestmark = pytest.mark.timeout(10)


def test_a_waiting_key_is_queued_once() -> None:
    queue = WorkQueue()
    for key in ("a", "b", "a", "a"):
        queue.add(key)
    assert [queue.get(), queue.get()] == ["a", "b"]
    assert len(queue) == 2  # both held by a worker


def test_a_key_added_while_processed_comes_back_after_done() -> None:
    queue = WorkQueue()
    queue.add("a")
    held = queue.get()
    queue.add("a")  # a change arrives while a worker holds it: not handed to a second worker
    queue.add("a")
    queue.add("b")
    assert queue.get() == "b"
    queue.done(held)
    assert queue.get() == "a"  # once, after the first pass


def test_workers_never_reconcile_one_key_twice_at_once_and_survive_failures() -> None:
    queue = WorkQueue()
    active: set[Hashable] = set()
    overlaps, seen = [], []
    lock = threading.Lock()

    def process(key: Hashable) -> None:
        with lock:
            if key in active:
                overlaps.append(key)
            active.add(key)
            seen.append(key)
        time.sleep(0.002)
        with lock:
            active.discard(key)
        if key == "boom":
            raise RuntimeError("a failed reconcile")

    threads = start_workers(queue, process, 4, "test")
    for i in range(400):
        queue.add(("k", i % 7))
        queue.add("boom")
    deadline = time.monotonic() + 5
    while len(queue) and time.monotonic() < deadline:
        time.sleep(0.01)
    queue.close()
    for thread in threads:
        thread.join(2)
    assert overlaps == []
    assert {("k", i) for i in range(7)} | {"boom"} <= set(seen)
    assert not any(thread.is_alive() for thread in threads)


def test_a_failed_reconcile_is_retried_after_a_growing_delay() -> None:
    queue = WorkQueue()
    attempts: list[float] = []
    succeeded = threading.Event()

    def process(key: Hashable) -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise RuntimeError("the API server is away")
        succeeded.set()

    threads = start_workers(queue, process, 2, "retry")
    queue.add("fleet")
    assert succeeded.wait(8)
    queue.close()
    for thread in threads:
        thread.join(2)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(attempts) == 3
    assert gaps[0] >= 0.9, gaps  # 1 s
    assert gaps[1] >= 1.9, gaps  # then 2 s


def test_a_delayed_key_waits_its_turn_and_a_closed_queue_drops_it() -> None:
    queue = WorkQueue()
    queue.add_after("later", 0.2)
    queue.add("now")
    started = time.monotonic()
    assert queue.get() == "now"
    assert queue.get() == "later"
    assert time.monotonic() - started >= 0.19
    queue.add_after("never", 0.1)
    queue.close()
    assert queue.get() is None
