"""Concurrent single requests share one batch: group commit for the encoder.

A `/route` call embeds one query. Thirty-two concurrent calls each running their own encoder pass
compete for two cores and none finishes early; one pass over all of them costs little more than
one. `RequestCoalescer` needs no timer: while one batch runs, new calls queue up, and the next
batch takes all of them. An idle service therefore adds no wait to a lone request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from mixllm.config.operations import ServiceConfig


class _Slot:
    """One caller's item: its result (or error) once its batch ran, or a turn to lead."""

    __slots__ = ("item", "event", "done", "result", "error")

    def __init__(self, item: Any) -> None:
        self.item = item
        self.event = threading.Event()
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None


class RequestCoalescer:
    """`coalescer(item)` returns `run_batch([... item ...])`'s entry for item, batched with the
    items of concurrent callers (threads).

    The first caller to find no batch running leads: it runs batches of up to `max_batch_size`
    queued items, oldest first, until its own item is done, then hands the lead to the oldest
    waiting caller. `run_batch` gets a list and returns one result per item, in order; if it
    raises, every caller of that batch gets the exception.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]],
                 max_batch_size: int = ServiceConfig.default_for("max_batch_size")) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self._lock = threading.Lock()
        self._queue: list[_Slot] = []
        self._leading = False
        self.batches = 0  # batches run so far, and the items they held (for /metrics and tests)
        self.items = 0

    def __call__(self, item: Any) -> Any:
        slot = _Slot(item)
        with self._lock:
            self._queue.append(slot)
            lead = not self._leading
            self._leading = True
        if not lead:
            slot.event.wait()
            if not slot.done:  # woken to lead: the caller before us finished while we still wait
                slot.event.clear()
                self._lead(slot)
        else:
            self._lead(slot)
        if slot.error is not None:
            raise slot.error
        return slot.result

    def _lead(self, mine: _Slot) -> None:
        try:
            while not mine.done:
                with self._lock:
                    batch = self._queue[: self.max_batch_size]
                    del self._queue[: self.max_batch_size]
                self._run(batch)
        finally:
            with self._lock:
                if self._queue:
                    self._queue[0].event.set()  # not done: it wakes to lead
                else:
                    self._leading = False

    def _run(self, batch: list[_Slot]) -> None:
        try:
            results = list(self.run_batch([slot.item for slot in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # every caller of the batch learns of it; nobody waits forever
            for slot in batch:
                slot.error, slot.done = exc, True
                slot.event.set()
            return
        self.batches += 1
        self.items += len(batch)
        for slot, result in zip(batch, results):
            slot.result, slot.done = result, True
            slot.event.set()
