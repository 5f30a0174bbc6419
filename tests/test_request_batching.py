"""RequestCoalescer: concurrent single calls share batches, each caller gets its own answer."""

from __future__ import annotations

import threading
import time

import pytest

from mixllm.service.request_batching import RequestCoalescer


def _wait_until(condition, limit_s=10.0):
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


def test_callers_that_arrive_during_a_batch_share_the_next_one():
    release = threading.Event()
    seen: list[list[int]] = []

    def run_batch(items):
        seen.append(list(items))
        if len(seen) == 1:
            release.wait(10)  # the first batch runs while the others queue up
        return [item * 10 for item in items]

    coalescer = RequestCoalescer(run_batch, max_batch_size=64)
    results: dict[int, int] = {}

    def call(i):
        results[i] = coalescer(i)

    first = threading.Thread(target=call, args=(0,))
    first.start()
    _wait_until(lambda: len(seen) == 1)
    others = [threading.Thread(target=call, args=(i,)) for i in range(1, 16)]
    for thread in others:
        thread.start()
    _wait_until(lambda: len(coalescer._queue) == 15)
    release.set()
    for thread in [first, *others]:
        thread.join(10)
    assert results == {i: i * 10 for i in range(16)}  # each caller gets its own item's result
    assert [len(batch) for batch in seen] == [1, 15]  # the fifteen latecomers ran as one batch
    assert coalescer.batches == 2 and coalescer.items == 16
    assert coalescer(7) == 70 and seen[-1] == [7]  # idle again: a lone caller runs at once, alone


def test_batches_respect_the_size_limit_and_keep_arrival_order():
    release = threading.Event()
    seen: list[list[int]] = []

    def run_batch(items):
        seen.append(list(items))
        if len(seen) == 1:
            release.wait(10)
        return items

    coalescer = RequestCoalescer(run_batch, max_batch_size=4)
    threads = [threading.Thread(target=coalescer, args=(0,))]
    threads[0].start()
    _wait_until(lambda: len(seen) == 1)
    for i in range(1, 11):  # enqueued one by one, so their order is known
        threads.append(threading.Thread(target=coalescer, args=(i,)))
        threads[-1].start()
        _wait_until(lambda: len(coalescer._queue) == i)
    release.set()
    for thread in threads:
        thread.join(10)
    assert seen == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]


def test_a_failing_batch_fails_its_own_callers_only():
    def run_batch(items):
        if "bad" in items:
            raise ValueError("bad batch")
        return [item.upper() for item in items]

    coalescer = RequestCoalescer(run_batch)
    with pytest.raises(ValueError, match="bad batch"):
        coalescer("bad")
    assert coalescer("good") == "GOOD"  # the coalescer is not stuck after a failure
    with pytest.raises(ValueError, match="max_batch_size"):
        RequestCoalescer(run_batch, max_batch_size=0)


def test_a_wrong_number_of_results_is_an_error_not_a_mismatch():
    coalescer = RequestCoalescer(lambda items: items[:-1])
    with pytest.raises(RuntimeError, match="0 results for 1 items"):
        coalescer("x")
