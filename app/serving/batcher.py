"""One dedicated inference thread that batches the requests already waiting.

The event loop never runs the model. The worker takes the first waiting request, adds whatever
else is already queued (up to `max_batch`, never waiting for more), and runs one forward pass for
all of them: one per model, when a model swap (SIGHUP) left requests prepared for the old model and
the new one in the queue together, so that each request is answered by the model it was prepared
for. A bounded number of requests may be in the service at once; past that, callers get
`Overloaded` and the client a 503 with Retry-After, instead of latency growing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.core.errors import DomainError

log = logging.getLogger(__name__)

BatchObserver = Callable[[int, list[float], float], None]  # (batch size, queue waits, inference seconds)


class Overloaded(DomainError):
    """More requests are in the service than `capacity` allows."""

    def __init__(self) -> None:
        super().__init__("overloaded", "The server is busy; try again in a moment.")


@dataclass
class _Job:
    array: np.ndarray
    model: Any  # what `infer` runs the array with: jobs for different models never share a pass
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()


class InferenceWorker:
    def __init__(self, infer: Callable[[Any, np.ndarray], Sequence[Any]], max_batch: int, capacity: int,
                 observe: BatchObserver | None = None):
        self._infer = infer
        self._max_batch = max_batch
        self._capacity = capacity
        self._observe = observe
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._admitted = 0
        self._lock = threading.Lock()

    @property
    def in_service(self) -> int:
        """Requests admitted and not yet answered (decoding, queued or in a forward pass)."""
        return self._admitted

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @contextmanager
    def admission(self) -> Iterator[None]:
        """Hold a place in the service for one request, or raise `Overloaded`."""
        with self._lock:
            if self._admitted >= self._capacity:
                raise Overloaded()
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    async def predict(self, model: Any, array: np.ndarray) -> Any:
        """The result for one input prepared for `model` (`infer(model, batch)`'s row for it). Cancelling
        the caller (a client that went away) cancels the job if it has not started, so no work is
        wasted on it."""
        job = _Job(array, model)
        self._queue.put(job)
        return await asyncio.wrap_future(job.future)

    def _take_batch(self, first: _Job) -> list[_Job]:
        jobs = [first]
        while len(jobs) < self._max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                self._queue.put(_STOP)  # finish this batch, then stop
                break
            jobs.append(job)
        # Jobs whose callers were cancelled are dropped here; the rest are marked running.
        return [job for job in jobs if job.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            # One pass per model (by identity: almost always one) and input shape (always one for a
            # model with a Resize; a model without one takes every photo at its own size).
            groups: list[tuple[Any, tuple[int, ...], list[_Job]]] = []
            for job in self._take_batch(first):
                group = next((g for g in groups if g[0] is job.model and g[1] == job.array.shape), None)
                if group is None:
                    groups.append((job.model, job.array.shape, [job]))
                else:
                    group[2].append(job)
            for model, _, jobs in groups:
                self._run_batch(model, jobs)

    def _run_batch(self, model: Any, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        try:
            results = self._infer(model, np.stack([job.array for job in jobs]))
        except Exception as exc:  # reported to each caller; the worker keeps serving
            log.exception("inference failed")
            for job in jobs:
                job.future.set_exception(exc)
            return
        done = time.perf_counter()
        for job, row in zip(jobs, results, strict=True):
            job.future.set_result(row)
        if self._observe is not None:
            self._observe(len(jobs), [started - job.enqueued for job in jobs], done - started)
