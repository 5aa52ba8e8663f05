"""Batching of /generate: requests that arrive together run as the rows of one `generate` call, each streamed.

One collector task on the event loop takes the oldest queued request, lets it wait at most `serve.max_wait_ms`
for company, then runs it with up to `serve.max_batch_size` queued requests that share its
model and sampling settings (lmpipe.generation.Sampling.batch_key: everything but max_new_tokens, each row stops
at its own) as one lmpipe.generation.generate_rows call on the generating thread. Requests with other settings
wait for a later call, in arrival order; a seeded sampling request runs alone. Requests arriving while a call
runs wait for the next one (no joining mid-call: transformers' generate takes its batch once). The wait for
company happens only when the last call had some (more than one row, or requests queued behind it), so a lone
client's requests start at once; it counts from the request's arrival or the last call's end, whichever is later,
so the clients a call answered can send again and join the requests that queued behind it.

Each decoding step's new text is gathered on the generating thread and goes to the loop in one hop at most every
`serve.stream_interval_ms` (a request's first text and its end at once), onto each request's queue: text
chunks, then one `Done`. A request whose client went away is cancelled: its row stops at the next step (the whole call
when it was the last row running). Every request ends in bounded time: more than `serve.max_queue` requests
waiting -> Overloaded (503), still queued after `serve.request_timeout_s` -> QueueTimeout (503), and a run is
bounded by its rows' max_new_tokens (capped by serve.max_new_tokens).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lmpipe.generation import Row, RowStep, Sampling, generate_rows
from lmpipe.serving.batching import InferenceFailed, Overloaded, QueueTimeout, Refused
from lmpipe.serving.metrics import Metrics


class ClientGone(Refused):
    """The client closed the connection while its request waited: nobody reads the answer (nginx's 499)."""

    status = 499


@dataclass
class Done:
    """A request's last event: token counts, how it ended (eos | length | cancelled), its timings in seconds."""

    prompt_tokens: int
    new_tokens: int
    finish_reason: str
    time_to_first_token_s: float | None
    total_s: float

    def as_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens, "finish_reason": self.finish_reason,
                "time_to_first_token_s": self.time_to_first_token_s, "total_s": self.total_s}


@dataclass(eq=False)
class Job:
    """One /generate request. `events` yields str chunks, then a Done (or an exception: its call failed);
    `started` resolves when its generate call begins (or fails with QueueTimeout)."""

    served: Any  # the reload.Served it was tokenized for: its generate call runs on that model
    ids: list[int]
    sampling: Sampling
    events: asyncio.Queue
    started: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)
    timer: asyncio.TimerHandle | None = None
    queued: bool = True
    # written on the generating thread only
    finished: bool = False
    spoke: bool = False  # some text of it went to the loop
    new_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def key(self) -> tuple | None:
        """Jobs with equal keys may share a call; None: alone."""
        key = self.sampling.batch_key()
        return None if key is None else (id(self.served), key)


@dataclass
class Generating:
    max_batch_size: int
    max_wait_ms: float
    stream_interval_ms: float
    max_queue: int
    request_timeout_s: float
    metrics: Metrics
    _queue: deque = field(default_factory=deque)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._company = False  # the last call had more than one row, or requests queued behind it
        self._ended = 0.0  # when it ended (perf_counter)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="lmpipe-generate")
        self._task = asyncio.create_task(self._collect(), name="lmpipe-generating")

    async def stop(self) -> None:
        for job in self._queue:
            job.cancel.set()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, served, ids: list[int], sampling: Sampling) -> Job:
        """Queue a request (Overloaded when serve.max_queue are already waiting); await job.started next."""
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"overloaded: {len(self._queue)} requests already waiting (serve.max_queue "
                             f"{self.max_queue})")
        job = Job(served, ids, sampling, asyncio.Queue(), self._loop.create_future())
        job.timer = self._loop.call_later(self.request_timeout_s, self._expire, job)
        self._queue.append(job)
        self.metrics.queue_texts.set(len(self._queue))
        self._wakeup.set()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: a queued job is dropped, a running one's row stops at the next step."""
        job.cancel.set()
        if job.queued:
            self._dequeue(job)
            if not job.started.done():
                job.started.set_exception(ClientGone("the client went away while its request waited"))

    def _dequeue(self, job: Job) -> None:
        if job.queued:
            job.queued = False
            job.timer.cancel()
            self._queue.remove(job)
            self.metrics.queue_texts.set(len(self._queue))

    def _expire(self, job: Job) -> None:
        if job.queued:
            self._dequeue(job)
            job.started.set_exception(QueueTimeout(
                f"timed out after {self.request_timeout_s:g} s waiting for a generate slot (serve.request_timeout_s)"))

    def _take(self) -> list[Job]:
        """The oldest job and the queued jobs that may share its call, up to max_batch_size, in arrival order."""
        first = self._queue[0]
        jobs = [first] if first.key is None else [j for j in self._queue if j.key == first.key][:self.max_batch_size]
        for job in jobs:
            self._dequeue(job)
        return jobs

    async def _collect(self) -> None:
        loop = self._loop
        while True:
            # 1) wait for a request, then, when the last call had company, until max_wait_ms are up from its arrival
            # or that call's end (or a full call is waiting)
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._queue[0]
            wait = self.max_wait_ms / 1000 if self._company else 0.0
            deadline = loop.time() + wait - (time.perf_counter() - max(first.arrived, self._ended))
            while (first.queued and first.key is not None and len(self._queue) < self.max_batch_size
                   and (left := deadline - loop.time()) > 0):
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            if not self._queue:  # the ones waiting were cancelled or timed out
                continue
            jobs = self._take()
            self._company = len(jobs) > 1
            for job in jobs:
                job.started.set_result(None)
            self.metrics.batch_size.observe(len(jobs))
            # 2) one generate call on the generating thread; the loop stays free to stream and take requests
            try:
                await loop.run_in_executor(self._executor, self._run, jobs)
            except Exception as e:  # noqa: BLE001 - a failing call answers its requests, never kills the loop
                error = InferenceFailed(f"generation failed: {type(e).__name__}: {str(e)[:300]}")
                for job in jobs:
                    if not job.finished:
                        job.events.put_nowait(error)
                        self.metrics.generations.labels("error").inc()
            self._company = self._company or bool(self._queue)
            self._ended = time.perf_counter()

    def _run(self, jobs: list[Job]) -> None:
        """On the generating thread: one generate_rows call; the rows' text since the last hop goes to the loop in one
        hop every stream_interval_ms, at once for a row's first text or any row's end."""
        predictor = jobs[0].served.predictor
        rows = [Row(job.ids, job.sampling.max_new_tokens, job.cancel) for job in jobs]
        m = self.metrics
        interval = self.stream_interval_ms / 1000
        unsent, ends = [""] * len(jobs), [None] * len(jobs)
        last_hop = time.perf_counter()

        def on_step(steps: list[RowStep]) -> None:
            nonlocal last_hop
            now = time.perf_counter()
            urgent = False
            for step in steps:
                job = jobs[step.row]
                if step.new_tokens > job.new_tokens:
                    m.generated_tokens.inc(step.new_tokens - job.new_tokens)
                    if job.first_token_at is None:
                        job.first_token_at = now
                        m.time_to_first_token.observe(now - job.arrived)
                    else:
                        m.time_per_token.observe((now - job.last_token_at) / (step.new_tokens - job.new_tokens))
                    job.new_tokens, job.last_token_at = step.new_tokens, now
                if step.text:
                    urgent, job.spoke = urgent or not job.spoke, True
                    unsent[step.row] += step.text
                if step.finish is not None:
                    job.finished, urgent = True, True
                    m.generations.labels(step.finish).inc()
                    ttft = None if job.first_token_at is None else job.first_token_at - job.arrived
                    ends[step.row] = Done(len(job.ids), step.new_tokens, step.finish, ttft, now - job.arrived)
            if urgent or now - last_hop >= interval:
                last_hop = now
                out = [(job, text, done) for job, text, done in zip(jobs, unsent, ends) if text or done is not None]
                unsent[:], ends[:] = [""] * len(jobs), [None] * len(jobs)
                if out:
                    self._loop.call_soon_threadsafe(_deliver, out)

        generate_rows(predictor.model, predictor.tokenizer, rows, jobs[0].sampling, on_step)


def _deliver(events: list[tuple[Job, str, Done | None]]) -> None:
    for job, text, done in events:
        if text:
            job.events.put_nowait(text)
        if done is not None:
            job.events.put_nowait(done)
