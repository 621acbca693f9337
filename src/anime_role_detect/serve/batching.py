"""Micro-batching: concurrent single-image `/api/classify` requests run through the recognizer as one batch.

Each request decodes its own upload first (a bad image is answered alone and never joins a batch), then
hands the image to the `MicroBatcher`. One asyncio task collects the queued jobs: it waits until a model
slot is free, gathers up to `max_batch` jobs for at most `max_wait_ms` after the first one was queued (and
only while more requests are on their way, so a lone client never waits), groups them by (recognizer lease,
mode, rerank) and runs each group in a worker thread through `Recognizer.recognize_batch` under one read
lock. Every answer, or the error its own item raised, goes back to the request that sent it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, Sequence

from PIL import Image

from ..log import get_logger
from ..recognition.schema import Answer
from .errors import ApiError
from .live import Loaded
from .settings import BatchingSettings

_log = get_logger("inference")


@dataclass(eq=False)
class Job:
    """One decoded upload waiting for its batch, and the future its request awaits."""

    loaded: Loaded
    mode: str | None
    rerank: bool | None
    image: Image.Image
    filename: str
    sha256: str
    data: bytes
    future: asyncio.Future
    queued_at: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[int, str | None, bool | None]:
        """Jobs with the same key can share one recognizer call: same lease (version), mode and rerank."""
        return (id(self.loaded), self.mode, self.rerank)


#: Blocking: one group of same-key jobs -> one answer or exception per job, in order.
GroupRunner = Callable[[Sequence[Job]], list[Any]]
#: Async: run a blocking function in the model worker threads (`Services.to_thread`).
ThreadRunner = Callable[..., Awaitable[Any]]


def _recognize(rec: Any, jobs: Sequence[Job]) -> list[Answer]:
    """One `recognize_batch` call: content hashes as cache keys and the uploaded bytes for the sinks (feature log)."""
    first = jobs[0]
    return rec.recognize_batch([(j.image, j.filename) for j in jobs], mode=first.mode, rerank=first.rerank,
                               hashes=[j.sha256 for j in jobs], data=[j.data for j in jobs])


def recognize_group(jobs: Sequence[Job]) -> list[Answer | Exception]:
    """Blocking: the group in one recognizer call under one read lock; if that call fails, each job alone,
    so an item that breaks the batch fails only its own request."""
    with jobs[0].loaded.lock.read():
        rec = jobs[0].loaded.recognizer
        try:
            return list(_recognize(rec, jobs))
        except Exception as exc:  # noqa: BLE001 - reported per item below
            if len(jobs) == 1:
                return [exc]
            _log.warning(f"batch of {len(jobs)} failed ({exc!r}); retrying its images one by one")
        out: list[Answer | Exception] = []
        for job in jobs:
            try:
                out.append(_recognize(rec, [job])[0])
            except Exception as exc:  # noqa: BLE001 - this item's own error, for its own request
                out.append(exc)
        return out


@dataclass
class BatchStats:
    """What the batcher has done since start (for logs, tests and the load test)."""

    batches: int = 0
    images: int = 0
    largest: int = 0
    sizes: Counter = field(default_factory=Counter)

    def add(self, n: int) -> None:
        self.batches += 1
        self.images += n
        self.largest = max(self.largest, n)
        self.sizes[n] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "images": self.images, "largest": self.largest,
                "mean": round(self.images / self.batches, 2) if self.batches else 0.0,
                "sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class MicroBatcher:
    """Gathers jobs into batches of at most `max_batch`, waiting at most `max_wait_ms`, one batch per free slot."""

    def __init__(self, settings: BatchingSettings, to_thread: ThreadRunner, slots: int = 1,
                 run_group: GroupRunner = recognize_group) -> None:
        self.max_wait_s = settings.max_wait_ms / 1000.0
        self.max_batch = settings.max_batch
        self.slots = max(1, slots)
        self._to_thread = to_thread
        self._run_group = run_group
        self.stats = BatchStats()
        self._incoming = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Job] | None = None
        self._free: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Create the queue and the collecting task on the running event loop (again after a new loop)."""
        loop = asyncio.get_running_loop()
        if self._task is not None and self._loop is loop and not self._task.done():
            return
        self._loop, self._closed = loop, False
        self._queue = asyncio.Queue()
        self._free = asyncio.Semaphore(self.slots)
        self._running = set()
        self._task = loop.create_task(self._collect(), name="micro-batcher")

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """Stop collecting, answer queued jobs with 503 and let running batches finish (app shutdown)."""
        self._closed = True
        if self._task is not None and self._loop is asyncio.get_running_loop():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            if self._running:
                await asyncio.wait(set(self._running), timeout=timeout_s)
        while self._queue is not None and not self._queue.empty():
            self._deliver([self._queue.get_nowait()], [_shutting_down()])
        self._task = None

    # -- requests -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Count a request on its way to `recognize` (decoding), so the collector waits for it to join."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    async def recognize(self, loaded: Loaded, image: Image.Image, filename: str, sha256: str, data: bytes,
                        mode: str | None = None, rerank: bool | None = None) -> Answer:
        """The answer for one decoded image, computed in the next batch with the same lease and options."""
        if self._closed:
            raise _shutting_down()
        self.start()
        assert self._loop is not None and self._queue is not None
        job = Job(loaded, mode, rerank, image, filename, sha256, data, self._loop.create_future())
        self._queue.put_nowait(job)
        return await job.future  # a cancelled request (timeout) cancels its future; the batch then skips it

    # -- collecting ---------------------------------------------------------------------------
    async def _collect(self) -> None:
        assert self._queue is not None and self._free is not None
        while True:
            await self._free.acquire()  # queue while every model slot is busy: the batch grows meanwhile
            try:
                first = await self._next()
                batch = await self._gather(first)
            except BaseException:
                self._free.release()
                raise
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _next(self) -> Job:
        """The next job whose request still waits."""
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            if not job.future.done():
                return job

    async def _gather(self, first: Job) -> list[Job]:
        """Up to `max_batch` jobs: all already queued, then late ones until `max_wait_ms` after the first was queued."""
        assert self._queue is not None
        batch = [first]
        deadline = first.queued_at + self.max_wait_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                job = self._queue.get_nowait()
            else:
                left = deadline - time.monotonic()
                if left <= 0 or self._incoming <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), left)
                except TimeoutError:
                    break
            if not job.future.done():
                batch.append(job)
        return batch

    async def _run(self, batch: list[Job]) -> None:
        """Each same-key group of the batch in one worker-thread call; frees the slot when done."""
        assert self._free is not None
        try:
            groups: dict[tuple, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.key, []).append(job)
            for jobs in groups.values():
                jobs = [j for j in jobs if not j.future.done()]
                if not jobs:
                    continue
                self.stats.add(len(jobs))
                try:
                    outcomes = await self._to_thread(self._run_group, jobs)
                except Exception as exc:  # noqa: BLE001 - the thread call itself failed: tell every request
                    outcomes = [exc] * len(jobs)
                self._deliver(jobs, outcomes)
        finally:
            self._free.release()

    @staticmethod
    def _deliver(jobs: Sequence[Job], outcomes: Sequence[Any]) -> None:
        """Each outcome to its own request (answers as results, errors as exceptions); gone requests are skipped."""
        for job, out in zip(jobs, outcomes):
            if job.future.done():
                continue
            if isinstance(out, BaseException):
                job.future.set_exception(out)
            else:
                job.future.set_result(out)


def _shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down; retry in a moment", None, headers={"Retry-After": "5"})
