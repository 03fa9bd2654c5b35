"""One GPU worker thread behind a bounded queue: per-job progress and cancellation, and coalescing of
compatible waiting jobs into one batched call.

Coalescing: a job may carry a `group` (a hashable key; equal keys mean "these can run in one pipeline call")
and a number of `images`. When the worker takes a job, it also takes the waiting jobs of the same group, in
arrival order, as long as the total number of images stays within the largest of `batch_sizes`; then it
drops the last ones until the total is one of `batch_sizes` (the shapes that were compiled ahead). With
`batch_sizes == (1,)` every job runs alone, which is the default.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from service.errors import Cancelled, GenerationTimeout, Overloaded

T = TypeVar("T")

BatchWork = Callable[[list["Job"]], list[Any]]
"""Runs jobs together on the worker thread and returns one outcome per job, in order: a result, or an
exception instance for a job that failed on its own (raising fails every job of the call)."""


@dataclass(eq=False)
class Job:
    """One request's life in the queue: when it was queued and started, how far it got."""

    work: BatchWork | None = None
    payload: Any = None  # what `work` needs to know about this job (the generation parameters)
    group: Hashable | None = None  # jobs of one group may run in one call; None: always alone
    images: int = 1
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    step: int = 0
    total_steps: int = 0
    batched_with: int = 1  # how many jobs ran in the call this one ran in (itself included)
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future[Any] = field(default_factory=Future, repr=False)

    def progress(self, step: int, total: int) -> None:
        """Called by the pipeline after each denoising step."""
        self.step, self.total_steps = step, total

    @property
    def queue_seconds(self) -> float:
        return (self.started_at or time.perf_counter()) - self.queued_at


class GenerationQueue:
    """Runs jobs on one dedicated thread; refuses work beyond `max_queue` waiting jobs."""

    def __init__(self, max_queue: int, retry_after_s: int, batch_sizes: tuple[int, ...] = (1,)) -> None:
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.batch_sizes = batch_sizes
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self.running: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="gpu-worker", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting to start (the running ones excluded)."""
        with self._cv:
            return len(self._pending)

    async def run(
        self,
        work: BatchWork,
        timeout: float,
        *,
        payload: Any = None,
        group: Hashable | None = None,
        images: int = 1,
    ) -> tuple[Any, Job]:
        """Queue one job that may run together with waiting jobs of the same `group` (see the module doc).

        Raises Overloaded (429) when `max_queue` jobs wait already, GenerationTimeout (504) past `timeout`.
        """
        job = self._enqueue(Job(work=work, payload=payload, group=group, images=images), bounded=True)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(job.future), timeout)
        except TimeoutError:
            self._cancel(job)
            raise GenerationTimeout(
                f"request took longer than {timeout:g} s (queue wait included) and was cancelled"
            ) from None
        except asyncio.CancelledError:  # the client went away
            self._cancel(job)
            raise
        return result, job

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the GPU worker thread and wait for it (blocking; for loading, not for requests).

        The model is loaded and warmed up on the thread that later runs every request: CUDA graphs recorded
        by torch.compile belong to the thread that recorded them, and recording from another thread fails.
        """
        return self._enqueue(Job(work=lambda jobs: [fn()]), bounded=False).future.result()

    def _enqueue(self, job: Job, *, bounded: bool) -> Job:
        """Append `job` for the worker; refused once shut down, and past `max_queue` when `bounded`."""
        with self._cv:
            if self._closed:
                raise Cancelled("the worker is shut down")
            if bounded and len(self._pending) >= self.max_queue:
                raise Overloaded(len(self._pending), self.retry_after_s)
            self._pending.append(job)
            self._cv.notify()
        return job

    def shutdown(self) -> None:
        """Cancel waiting jobs and let the running one finish."""
        with self._cv:
            self._closed = True
            for job in self._pending:
                job.cancelled.set()
                job.future.cancel()
            self._pending.clear()
            self._cv.notify()

    # ----- the worker thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                batch = self._take()
            self._execute(batch)

    def _take(self) -> list[Job]:
        """The next job and the waiting jobs that can run with it (called with the lock held)."""
        first = self._pending.popleft()
        batch = [first]
        limit = max(self.batch_sizes)
        if first.group is None or limit <= 1:
            return batch
        total = first.images
        for job in self._pending:
            if job.group == first.group and not job.cancelled.is_set() and total + job.images <= limit:
                batch.append(job)
                total += job.images
        while len(batch) > 1 and total not in self.batch_sizes:
            total -= batch.pop().images
        for job in batch[1:]:
            self._pending.remove(job)
        return batch

    def _execute(self, batch: list[Job]) -> None:
        live: list[Job] = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():
                continue  # its waiter gave up (timeout or disconnect) and cancelled the future
            if job.cancelled.is_set():
                job.future.set_exception(Cancelled("cancelled before it started"))
                continue
            live.append(job)
        if not live:
            return
        started = time.perf_counter()
        for job in live:
            job.started_at, job.batched_with = started, len(live)
        self.running = live[0]
        work = live[0].work
        assert work is not None
        results: list[Any] = []
        error: BaseException | None = None
        try:
            results = work(live)
            if len(results) != len(live):
                raise RuntimeError(f"batched work returned {len(results)} results for {len(live)} jobs")
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter, the thread lives on
            error = exc
        # idle before any waiter hears back: a client that asks for progress right after its answer
        # must not see its own finished job still running
        self.running = None
        for i, job in enumerate(live):
            outcome = error if error is not None else results[i]
            if isinstance(outcome, BaseException):
                job.future.set_exception(outcome)
            else:
                job.future.set_result(outcome)

    def _cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._cv:
            if job in self._pending:
                self._pending.remove(job)
