"""Micro-batching: coalesce concurrent search requests into batched ``search`` calls, fairly and safely.

Rollout workers send many small requests at once (often one query each). Searching them one by one
wastes the batched kernels; instead requests wait in a queue and a single worker takes up to
``max_batch`` queries, waiting at most ``max_wait`` for more when the queue is short. While one batch
is being searched the next one accumulates, so the batch size adapts to the load. Results are top-``k``
prefixes of one sorted order, so requests with different ``k`` share a batch searched with the largest
``k``.

Fairness. A batch's search time grows with its size, so what keeps small requests fast is keeping
batches the size *they* need. Requests of at most ``quantum`` queries are *small* and taken whole, in
arrival order; larger ones are *large*, searched slice by slice, round robin among themselves
(Shreedhar & Varghese 1996). While small requests keep coming, large ones earn a credit of half a
query per small query searched and spend it on their slices (``min_slice`` per batch at least), and
small requests get at most three quarters of ``max_batch``: the work the small requests wait for grows
by about 1.5x at most. "Keep coming" is a moving average of small queries per batch, not the queue of
the moment: a closed-loop client is briefly absent between its answer and its next request, and a large
request must not take a whole (slow) batch in that gap. Once small requests stop, the average decays
within a few batches and large requests fill whole batches. A 10,000-query request thus no longer stalls
everyone for its whole search time, and alone it is searched at full speed.

Isolation: when a batched ``search`` raises, the batch is bisected and searched again so that every
query that can be answered is, and each query that cannot fails only its own request
(:class:`QueryFailedError`). If a query known to work fails too, the index itself is broken and the
whole batch gets the error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tspo.retrieval.base import Doc

__all__ = ["BatchStats", "MicroBatcher", "QueryFailedError"]

logger = logging.getLogger(__name__)

SearchFn = Callable[[list[str], int], list[list[Doc]]]


class QueryFailedError(RuntimeError):
    """A query that the retriever fails on while other queries are answered: the request's fault."""

    def __init__(self, query: str, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.query = query
        self.error = error


@dataclass(eq=False)
class _Pending:
    queries: list[str]
    k: int
    future: asyncio.Future[list[list[Doc]]]
    results: list[list[Doc] | None]
    taken: int = 0  # queries handed to batches so far
    answered: int = 0

    @property
    def remaining(self) -> int:
        return len(self.queries) - self.taken


@dataclass(frozen=True)
class _Slice:
    pending: _Pending
    start: int
    stop: int


@dataclass
class BatchStats:
    batches: int = 0
    requests: int = 0
    queries: int = 0
    largest_batch: int = 0
    search_seconds: float = 0.0
    errors: int = 0
    failed_queries: int = 0
    sizes: deque[int] = field(default_factory=lambda: deque(maxlen=1000))

    def as_dict(self) -> dict[str, float]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "queries": self.queries,
            "largest_batch": self.largest_batch,
            "mean_batch": (sum(self.sizes) / len(self.sizes)) if self.sizes else 0.0,
            "search_seconds": round(self.search_seconds, 6),
            "errors": self.errors,
            "failed_queries": self.failed_queries,
        }


class MicroBatcher:
    """Runs ``search`` on batches gathered from concurrent ``submit`` calls (one batch at a time).

    Args:
        search: the batched search, called in a worker thread.
        max_batch: most queries per ``search`` call; larger requests are split across batches.
        max_wait: seconds to wait for more requests when fewer than ``max_batch`` queries are queued.
        quantum: requests of more queries than this are *large* (default ``max_batch // 4``).
        min_slice: queries large requests add to a batch however few small ones it holds (default
            ``max(1, quantum // 8)``), so they always progress.
    """

    def __init__(
        self,
        search: SearchFn,
        max_batch: int = 256,
        max_wait: float = 0.002,
        quantum: int | None = None,
        min_slice: int | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait}")
        self._search = search
        self.max_batch = max_batch
        self.max_wait = max_wait
        # A small request must always fit in the share of a batch that small requests get.
        self.quantum = min(
            max(1, quantum if quantum is not None else max_batch // 4), max_batch - max_batch // 4
        )
        self.min_slice = max(1, min_slice if min_slice is not None else self.quantum // 8)
        self.stats = BatchStats()
        self._small: deque[_Pending] = deque()
        self._large: deque[_Pending] = deque()
        self._queued_queries = 0
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="retrieval-batch")
        self._small_average = 0.0  # small queries per batch, exponential moving average
        self._large_credit = 0.0  # queries large requests may still add while small ones keep coming
        self._known_good: str | None = None  # a query answered before: tells a broken index from a bad query

    def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._worker is None:
            self._arrived = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for pending in (*self._small, *self._large):
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("retrieval server is shutting down"))
        self._small.clear()
        self._large.clear()
        self._executor.shutdown(wait=False)

    async def submit(self, queries: list[str], k: int) -> list[list[Doc]]:
        """Search ``queries`` as part of the next batches; raises :class:`QueryFailedError` naming a query
        the retriever cannot answer, or the retriever's own error when it answers nothing."""
        if self._worker is None or self._arrived is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if not queries:
            return []
        future: asyncio.Future[list[list[Doc]]] = asyncio.get_running_loop().create_future()
        queue = self._large if len(queries) > self.quantum else self._small
        queue.append(_Pending(queries, k, future, [None] * len(queries)))
        self._queued_queries += len(queries)
        self._arrived.set()
        return await future

    async def _run(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._arrived.wait()
            deadline = loop.time() + self.max_wait
            while self._queued_queries < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take_batch()
            if not self._small and not self._large:
                self._arrived.clear()
            if batch:
                await self._execute(batch, loop)

    def _take_batch(self) -> list[_Slice]:
        """Up to ``max_batch`` queries: small requests whole, then slices of large ones (module doc)."""
        slices: list[_Slice] = []
        self._drop_abandoned()
        room = self.max_batch
        small_room = room - room // 4 if self._large else room
        small_taken = 0
        while self._small and self._small[0].remaining <= small_room - small_taken:
            pending = self._small.popleft()
            slices.append(_Slice(pending, 0, len(pending.queries)))
            pending.taken = len(pending.queries)
            small_taken += len(pending.queries)
        room -= small_taken
        self._small_average = 0.7 * self._small_average + 0.3 * small_taken
        if self._small_average < 1 or not self._large:  # credit is earned only while a large one waits
            self._large_credit = 0.0
            share = room
        else:
            self._large_credit = min(self._large_credit + small_taken / 2, self.max_batch / 2)
            share = min(room, max(self.min_slice, int(self._large_credit)))
        large_taken = 0
        while share and self._large:
            pending = self._large.popleft()
            take = min(pending.remaining, share, self.quantum if len(self._large) else share)
            slices.append(_Slice(pending, pending.taken, pending.taken + take))
            pending.taken += take
            share -= take
            large_taken += take
            if pending.remaining:
                self._large.append(pending)
        self._large_credit = max(0.0, self._large_credit - large_taken)
        self._queued_queries -= sum(part.stop - part.start for part in slices)
        return slices

    def _drop_abandoned(self) -> None:
        """Forget requests whose client went away or that already failed."""
        for queue in (self._small, self._large):
            if any(pending.future.done() for pending in queue):
                kept = [pending for pending in queue if not pending.future.done()]
                self._queued_queries -= sum(p.remaining for p in queue if p.future.done())
                queue.clear()
                queue.extend(kept)

    async def _execute(self, batch: list[_Slice], loop: asyncio.AbstractEventLoop) -> None:
        distinct = list(
            dict.fromkeys(q for part in batch for q in part.pending.queries[part.start : part.stop])
        )
        k = max(part.pending.k for part in batch)
        started = loop.time()
        try:
            found = dict(
                zip(
                    distinct,
                    await loop.run_in_executor(self._executor, self._search, distinct, k),
                    strict=True,
                )
            )
            failed: dict[str, BaseException] = {}
            if distinct:
                self._known_good = distinct[0]
        except Exception as err:
            self.stats.errors += 1
            logger.warning(
                "batched search of %d queries failed (%s); isolating the cause", len(distinct), err
            )
            found, failed = await loop.run_in_executor(self._executor, self._isolate, distinct, k, err)
        stats = self.stats
        stats.batches += 1
        stats.queries += len(distinct)
        stats.largest_batch = max(stats.largest_batch, len(distinct))
        stats.sizes.append(len(distinct))
        stats.search_seconds += loop.time() - started
        stats.failed_queries += len(failed)
        for part in batch:
            self._deliver(part, found, failed)

    def _deliver(self, part: _Slice, found: dict[str, list[Doc]], failed: dict[str, BaseException]) -> None:
        pending = part.pending
        if pending.future.done():
            return
        for index in range(part.start, part.stop):
            query = pending.queries[index]
            error = failed.get(query)
            if error is not None:
                pending.future.set_exception(error)
                return
            pending.results[index] = found[query][: pending.k]
        pending.answered += part.stop - part.start
        if pending.answered == len(pending.queries):
            self.stats.requests += 1
            pending.future.set_result(pending.results)  # type: ignore[arg-type]

    def _isolate(
        self, queries: list[str], k: int, error: BaseException
    ) -> tuple[dict[str, list[Doc]], dict[str, BaseException]]:
        """After ``search(queries)`` raised ``error``: answers for every query that can be answered and,
        for each that cannot, a :class:`QueryFailedError`. Runs in the worker thread."""
        index_works = False
        if self._known_good is not None and self._known_good not in queries:
            try:
                self._search([self._known_good], 1)
                index_works = True
            except Exception:  # the index fails on a query it answered before: nothing is the batch's fault
                logger.exception("the retriever fails on every query")
                return {}, dict.fromkeys(queries, error)
        found: dict[str, list[Doc]] = {}
        failed: dict[str, BaseException] = {}

        def bisect(part: list[str], part_error: BaseException | None) -> None:
            if part_error is None:
                try:
                    found.update(zip(part, self._search(part, k), strict=True))
                    self._known_good = part[0]
                    return
                except Exception as err:
                    part_error = err
            if len(part) == 1:
                failed[part[0]] = QueryFailedError(part[0], part_error)
                return
            middle = len(part) // 2
            bisect(part[:middle], None)
            bisect(part[middle:], None)

        bisect(queries, error)
        if not found and not index_works:  # nothing ever worked: a broken index, not bad queries
            return {}, dict.fromkeys(queries, error)
        for query, failure in failed.items():
            logger.warning("query %r cannot be searched: %s", query[:200], failure)
        return found, failed
