"""Micro-batching: concurrent requests become one call of a batch function, behind a bounded queue.

Request handlers ``await batcher.submit(payload)``. One worker task takes up to
``max_batch_size`` waiting payloads, runs ``fn(payloads) -> results`` in a single
background thread, so the event loop keeps accepting, validating and rejecting requests
while the model runs, and hands each handler its result. Under load (the last batch held
more than one request, or several are waiting) a batch first gathers: until it is full, or
no request has arrived for ``arrival_gap_s``, or its first request has waited
``max_wait_s``; a lone request on an idle service starts at once. Under load the queue
fills while a batch runs, so the next batch starts full: throughput grows with load
instead of latency.

The queue is bounded: ``submit`` raises ``QueueFull`` (the service answers 503 with a
Retry-After estimated from the recent batch time) rather than letting latency and memory
grow without limit. ``close`` stops taking new payloads and finishes every accepted one.
A handler that gives up (client gone) cancels its future; the worker then skips it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


class QueueFull(Exception):
    """The queue holds ``max_queue`` payloads; retry after ``retry_after`` seconds."""

    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the request queue is full ({depth} requests waiting); retry after {retry_after} s")
        self.depth, self.retry_after = depth, retry_after


class ShuttingDown(Exception):
    """The batcher is not running (not started yet, or closing) and takes no new payloads."""

    def __init__(self):
        super().__init__("the service is starting up or shutting down and takes no new requests")


@dataclass
class _Job:
    payload: Any
    future: asyncio.Future


class MicroBatcher:
    def __init__(
        self,
        fn: Callable[[list[Any]], Sequence[Any]],
        max_batch_size: int = 32,
        max_wait_s: float = 0.02,
        arrival_gap_s: float = 0.002,
        max_queue: int = 256,
    ):
        if max_batch_size < 1 or max_queue < 1 or min(max_wait_s, arrival_gap_s) < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_s and arrival_gap_s >= 0")
        self.fn, self.max_batch_size, self.max_queue = fn, max_batch_size, max_queue
        self.max_wait_s, self.arrival_gap_s = max_wait_s, arrival_gap_s
        self._pending: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._last_batch_size = 0
        # Counters for /ready and the tests; batch_seconds is a moving average for Retry-After.
        self.batches = self.completed = self.failed = self.rejected = self.largest_batch = 0
        self.batch_seconds = 0.0

    @property
    def depth(self) -> int:
        """Payloads waiting for a batch (not counting the batch running now)."""
        return len(self._pending)

    async def start(self) -> None:
        self._closing = False
        self._wakeup = asyncio.Event()
        # One thread: batches run one after another, and the model is only ever used from it.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genrec-batch")
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def run_in_worker(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` in the batch thread (e.g. a warm-up decode), after any batch in progress."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def submit(self, payload: Any) -> Any:
        if self._worker is None or self._closing:
            raise ShuttingDown()
        if len(self._pending) >= self.max_queue:
            self.rejected += 1
            raise QueueFull(len(self._pending), self.retry_after())
        job = _Job(payload, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    def retry_after(self) -> int:
        """Seconds until the queue has room again, roughly: the batches ahead times the recent batch time."""
        batches_ahead = len(self._pending) / self.max_batch_size + 1
        return max(1, math.ceil(batches_ahead * self.batch_seconds))

    async def close(self, timeout: float | None = None) -> None:
        """Take no new payloads; finish the accepted ones (those left after ``timeout`` fail with ShuttingDown)."""
        if self._worker is None:
            return
        self._closing = True
        self._wakeup.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._worker), timeout)
        except asyncio.TimeoutError:
            self._worker.cancel()
            while self._pending:
                job = self._pending.popleft()
                if not job.future.done():
                    job.future.set_exception(ShuttingDown())
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._worker = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            # Gather only under load (the last batch had company): a lone request on an idle
            # service goes straight to the model, so batching never adds latency at low load.
            if self._last_batch_size > 1 or len(self._pending) > 1:
                await self._gather(loop)
            size = min(self.max_batch_size, len(self._pending))
            batch = [job for job in (self._pending.popleft() for _ in range(size)) if not job.future.cancelled()]
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.fn, [job.payload for job in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the batch function returned {len(results)} results for {len(batch)} payloads")
                for job, result in zip(batch, results):
                    if not job.future.done():
                        job.future.set_result(result)
                self.completed += len(batch)
            except Exception as exc:  # one failing batch fails its own requests, never the worker
                self.failed += len(batch)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:  # the worker cancelled by close(timeout): its batch must not wait forever
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(ShuttingDown())
            seconds = time.perf_counter() - started
            self.batch_seconds = seconds if self.batches == 0 else 0.8 * self.batch_seconds + 0.2 * seconds
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            self._last_batch_size = len(batch)

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> None:
        """Let the batch fill: until it is full, or no request came for arrival_gap_s, or max_wait_s has passed.

        Under load requests arrive in bursts (a finished batch's clients send their next requests
        together), so a batch keeps gathering while they keep coming; an idle service waits only
        arrival_gap_s.
        """
        deadline = loop.time() + self.max_wait_s
        while len(self._pending) < self.max_batch_size and not self._closing:
            left = min(self.arrival_gap_s, deadline - loop.time())
            if left <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), left)
            except asyncio.TimeoutError:
                return

    def stats(self) -> dict:
        return {
            "queue_depth": len(self._pending),
            "max_queue": self.max_queue,
            "batches": self.batches,
            "completed": self.completed,
            "failed": self.failed,
            "rejected": self.rejected,
            "largest_batch": self.largest_batch,
            "mean_batch_size": round((self.completed + self.failed) / self.batches, 2) if self.batches else 0.0,
            "batch_seconds": round(self.batch_seconds, 4),
        }
