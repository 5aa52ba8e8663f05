"""Micro-batching: concurrent requests gathered into one batch (one call into the model), run off the event loop.

One collector task on the event loop takes the queued requests (up to `max_batch_size` texts; the first one
waits at most `max_wait_ms` for others to join) and runs them as one call on a single worker thread, so the
loop keeps reading requests and answering /health while the model computes. Every request ends in bounded
time: still queued after `request_timeout_s` -> QueueTimeout (503), its batch running longer than
`inference_timeout_s` -> InferenceTimeout (504), more than `max_queue` texts waiting -> Overloaded (503).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class Refused(Exception):
    """A request the batcher did not answer; `status` is its HTTP code, the message its reason."""

    status = 503


class Overloaded(Refused):
    status = 503


class QueueTimeout(Refused):
    status = 503


class InferenceTimeout(Refused):
    status = 504


class InferenceFailed(Refused):
    """The model raised on this batch: 500 with the reason as JSON (the server keeps serving)."""

    status = 500


@dataclass(eq=False)
class _Item:
    texts: list[str]
    future: asyncio.Future
    timer: asyncio.TimerHandle | None = None
    queued: bool = True  # counted in the waiting texts
    running: bool = False


@dataclass
class Batcher:
    run: Callable[[list[str]], list[Any]]
    """texts -> one result per text; called on the worker thread, one batch at a time."""
    max_batch_size: int
    max_wait_ms: float
    max_queue: int
    request_timeout_s: float
    inference_timeout_s: float
    on_batch: Callable[[int], None] = lambda n: None
    """Called on the loop with the batch's text count before it runs (the batch-size histogram)."""
    on_queue: Callable[[int], None] = lambda n: None
    """Called with the texts waiting whenever that changes (a gauge)."""
    _queue: deque = field(default_factory=deque)
    _queued_texts: int = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lmpipe-inference")
        self._task = asyncio.create_task(self._collect(), name="lmpipe-batcher")

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, texts: list[str]) -> list[Any]:
        """The results for `texts`, computed in whichever batch they land in."""
        if self._queued_texts + len(texts) > self.max_queue:
            raise Overloaded(f"overloaded: {self._queued_texts} texts already waiting (serve.max_queue "
                             f"{self.max_queue})")
        item = _Item(texts, self._loop.create_future())
        item.timer = self._loop.call_later(self.request_timeout_s, self._expire, item)
        self._queue.append(item)
        self._count(len(texts))
        self._wakeup.set()
        return await item.future

    def _count(self, delta: int) -> None:
        self._queued_texts += delta
        self.on_queue(self._queued_texts)

    def _dequeue(self, item: _Item) -> None:
        if item.queued:
            item.queued = False
            self._count(-len(item.texts))

    def _expire(self, item: _Item) -> None:
        if not item.running and not item.future.done():
            self._dequeue(item)  # the collector skips it (future done)
            item.future.set_exception(QueueTimeout(
                f"timed out after {self.request_timeout_s:g} s waiting for a batch slot (serve.request_timeout_s)"))

    def _take(self) -> list[_Item]:
        """Pop queued requests up to max_batch_size texts (at least one), skipping answered ones."""
        batch, n = [], 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # expired in the queue, or its client went away
                self._queue.popleft()
                self._dequeue(item)
                continue
            if batch and n + len(item.texts) > self.max_batch_size:
                break
            self._queue.popleft()
            item.running = True
            item.timer.cancel()
            self._dequeue(item)
            batch.append(item)
            n += len(item.texts)
        return batch

    async def _collect(self) -> None:
        loop = self._loop
        while True:
            # 1) wait for a request, then up to max_wait_ms for the batch to fill
            while not self._queued_texts:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = loop.time() + self.max_wait_ms / 1000
            while self._queued_texts < self.max_batch_size and (left := deadline - loop.time()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            # 2) one call on the worker thread; the loop stays free meanwhile
            texts = [t for item in batch for t in item.texts]
            self.on_batch(len(texts))
            running = loop.run_in_executor(self._executor, self.run, texts)
            try:
                results = await asyncio.wait_for(asyncio.shield(running), self.inference_timeout_s)
            except TimeoutError:
                _fail(batch, InferenceTimeout(f"inference took longer than {self.inference_timeout_s:g} s "
                                              "(serve.inference_timeout_s)"))
                # 3) the thread cannot be interrupted: let it finish before the next batch (queued requests
                # meanwhile time out with 503 rather than pile up behind it)
                await asyncio.gather(running, return_exceptions=True)
                continue
            except Exception as e:  # noqa: BLE001 - a failing batch answers its requests, never kills the loop
                _fail(batch, InferenceFailed(f"inference failed: {type(e).__name__}: {str(e)[:300]}"))
                continue
            # 4) hand each request its slice
            start = 0
            for item in batch:
                if not item.future.done():
                    item.future.set_result(results[start:start + len(item.texts)])
                start += len(item.texts)


def _fail(batch: list[_Item], error: Exception) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(error)
