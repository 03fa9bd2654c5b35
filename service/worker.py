"""One GPU worker thread behind a bounded queue, with per-job progress and cancellation."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from service.errors import Cancelled, GenerationTimeout, Overloaded

T = TypeVar("T")


@dataclass
class Job:
    """One request's life in the queue: when it was queued and started, how far it got."""

    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    step: int = 0
    total_steps: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)

    def progress(self, step: int, total: int) -> None:
        """Called by the pipeline after each denoising step."""
        self.step, self.total_steps = step, total

    @property
    def queue_seconds(self) -> float:
        return (self.started_at or time.perf_counter()) - self.queued_at


class GenerationQueue:
    """Runs jobs one at a time on a dedicated thread; refuses work beyond `max_queue` waiting jobs."""

    def __init__(self, max_queue: int, retry_after_s: int) -> None:
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-worker")
        self._lock = threading.Lock()
        self._waiting: set[int] = set()
        self.running: Job | None = None

    @property
    def depth(self) -> int:
        """Jobs waiting to start (the running one excluded)."""
        with self._lock:
            return len(self._waiting)

    async def run(self, work: Callable[[Job], T], timeout: float) -> tuple[T, Job]:
        """Queue `work`, wait at most `timeout` seconds (queueing included), return its result and job."""
        job = Job()
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise Overloaded(len(self._waiting), self.retry_after_s)
            self._waiting.add(id(job))
        future = self._executor.submit(self._execute, job, work)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), timeout)
        except TimeoutError:
            job.cancelled.set()
            self._forget(job)
            raise GenerationTimeout(
                f"request took longer than {timeout:g} s (queue wait included) and was cancelled"
            ) from None
        except asyncio.CancelledError:  # the client went away
            job.cancelled.set()
            self._forget(job)
            raise
        return result, job

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the GPU worker thread and wait for it (blocking; for loading, not for requests).

        The model is loaded and warmed up on the thread that later runs every request: CUDA graphs recorded
        by torch.compile belong to the thread that recorded them, and recording from another thread fails.
        """
        return self._executor.submit(fn).result()

    def _execute(self, job: Job, work: Callable[[Job], T]) -> T:
        self._forget(job)
        if job.cancelled.is_set():
            raise Cancelled("cancelled before it started")
        job.started_at = time.perf_counter()
        self.running = job
        try:
            return work(job)
        finally:
            self.running = None

    def _forget(self, job: Job) -> None:
        with self._lock:
            self._waiting.discard(id(job))

    def shutdown(self) -> None:
        """Cancel waiting jobs and let the running one finish."""
        self._executor.shutdown(wait=False, cancel_futures=True)
