"""The micro-batcher alone: large requests are sliced and interleaved; a failing query fails only itself."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from tspo.doc import Doc
from tspo.retrieval.batching import MicroBatcher, QueryFailedError


class RecordingSearch:
    """A retriever's ``search`` that answers each query with one Doc named after it, records every batch,
    takes ``seconds`` per batch and raises on queries in ``poison``."""

    def __init__(self, seconds: float = 0.0, poison: frozenset[str] = frozenset(), broken: bool = False):
        self.seconds = seconds
        self.poison = poison
        self.broken = broken
        self.batches: list[list[str]] = []
        self.lock = threading.Lock()

    def __call__(self, queries: list[str], k: int) -> list[list[Doc]]:
        with self.lock:
            self.batches.append(list(queries))
        if self.broken:
            raise OSError("index file vanished")
        bad = [q for q in queries if q in self.poison]
        if bad:
            raise UnicodeEncodeError("utf-8", bad[0], 0, 1, "surrogates not allowed")
        time.sleep(self.seconds)
        return [[Doc(id=q, title="", text=q, score=1.0)] for q in queries]


async def run(batcher: MicroBatcher, requests: list[list[str]]) -> list:
    batcher.start()
    try:
        tasks = [asyncio.create_task(batcher.submit(queries, 3)) for queries in requests]
        return await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await batcher.stop()


def test_a_large_request_is_sliced_and_interleaved_with_small_ones():
    search = RecordingSearch(seconds=0.01)
    batcher = MicroBatcher(search, max_batch=32, max_wait=0.001)
    big = [f"big {i}" for i in range(400)]
    singles = [[f"single {i}"] for i in range(40)]

    async def scenario() -> tuple[list, dict[str, float]]:
        batcher.start()
        finished: dict[str, float] = {}

        async def timed(name: str, queries: list[str]):
            result = await batcher.submit(queries, 3)
            finished[name] = time.perf_counter()
            return result

        try:
            big_task = asyncio.create_task(timed("big", big))
            await asyncio.sleep(0)  # the big request is queued first
            small = [asyncio.create_task(timed(f"s{i}", q)) for i, q in enumerate(singles)]
            results = await asyncio.gather(big_task, *small)
        finally:
            await batcher.stop()
        return results, finished

    results, finished = asyncio.run(scenario())
    assert [docs[0].id for docs in results[0]] == big  # the big request's answers, in order
    assert [r[0][0].id for r in results[1:]] == [q[0] for q in singles]
    assert max(len(b) for b in search.batches) <= 32
    # Every single finished long before the big request, which needed 400 / 32 = 13+ batches.
    assert max(t for name, t in finished.items() if name != "big") < finished["big"]
    first_with_singles = next(
        i for i, b in enumerate(search.batches) if any(q.startswith("single") for q in b)
    )
    last_with_singles = max(i for i, b in enumerate(search.batches) if any(q.startswith("single") for q in b))
    assert first_with_singles <= 1 and last_with_singles <= 3
    # While more singles waited than a batch holds, they got three quarters of it and the big request the rest.
    first = search.batches[first_with_singles]
    assert sum(q.startswith("big") for q in first) == 8 and sum(q.startswith("single") for q in first) == 24


def test_under_light_load_a_large_request_adds_at_most_half_of_the_small_ones():
    """Batch time grows with batch size: the small requests' batch grows by 1.5x at most."""
    search = RecordingSearch()
    batcher = MicroBatcher(search, max_batch=64, max_wait=0.05)

    async def scenario():
        batcher.start()
        try:
            big = asyncio.create_task(batcher.submit([f"big {i}" for i in range(200)], 3))
            singles = [asyncio.create_task(batcher.submit([f"single {i}"], 3)) for i in range(6)]
            await asyncio.gather(big, *singles)
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    first = search.batches[0]
    assert sum(q.startswith("single") for q in first) == 6 and sum(q.startswith("big") for q in first) == 3
    # The singles were seen recently: the next batch stays small (a closed-loop client is briefly away
    # between its answer and its next request); then, the average decayed, whole batches.
    sizes = [len(b) for b in search.batches[1:]]
    assert sizes[0] <= 3 and set(sizes[1:-1]) == {64} and sum(sizes) == 197


def test_alone_a_large_request_fills_every_batch():
    search = RecordingSearch()
    batcher = MicroBatcher(search, max_batch=50, max_wait=0.0)
    (result,) = asyncio.run(run(batcher, [[f"q{i}" for i in range(230)]]))
    assert len(result) == 230
    assert [len(b) for b in search.batches] == [50, 50, 50, 50, 30]


def test_a_poison_query_fails_only_its_own_request():
    search = RecordingSearch(poison=frozenset({"poison"}))
    batcher = MicroBatcher(search, max_batch=64, max_wait=0.02)
    requests = [[f"good {i}", f"also good {i}"] for i in range(20)]
    requests.insert(7, ["fine", "poison", "fine too"])
    results = asyncio.run(run(batcher, requests))
    failure = results[7]
    assert isinstance(failure, QueryFailedError) and failure.query == "poison"
    assert "surrogates not allowed" in str(failure)
    for queries, result in zip(requests[:7] + requests[8:], results[:7] + results[8:], strict=True):
        assert [docs[0].id for docs in result] == queries
    assert batcher.stats.failed_queries == 1
    assert len(search.batches[0]) > 40  # they were batched together, then isolated


def test_a_broken_index_fails_every_request_with_its_own_error():
    search = RecordingSearch()
    batcher = MicroBatcher(search, max_batch=64, max_wait=0.02)

    async def scenario():
        batcher.start()
        try:
            assert (await batcher.submit(["works"], 3))[0][0].id == "works"  # known to work before
            search.broken = True
            return await asyncio.gather(
                *(batcher.submit([f"q{i}"], 3) for i in range(5)), return_exceptions=True
            )
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert all(isinstance(r, OSError) and not isinstance(r, QueryFailedError) for r in results)


@pytest.mark.parametrize("quantum", [0, -3])
def test_quantum_is_at_least_one(quantum):
    assert MicroBatcher(RecordingSearch(), max_batch=8, quantum=quantum).quantum == 1


class CountingSearch(RecordingSearch):
    """Search time proportional to the batch (``per_query`` seconds each), and a running count of the
    queries searched: the work a request waited for, independent of the machine's speed."""

    def __init__(self, per_query: float) -> None:
        super().__init__()
        self.per_query = per_query
        self.searched = 0

    def __call__(self, queries: list[str], k: int) -> list[list[Doc]]:
        time.sleep(self.per_query * len(queries))
        self.searched += len(queries)
        return [[Doc(id=q, title="", text=q, score=1.0)] for q in queries]


def work_waited_p99(big: int, clients: int = 64, rounds: int = 12) -> float:
    """p99 over closed-loop one-query clients of the queries searched while each waited for its answer,
    with a ``big``-query request arriving among them (0: none)."""
    search = CountingSearch(per_query=0.0002)
    batcher = MicroBatcher(search, max_batch=256, max_wait=0.002)
    waited: list[int] = []

    async def client(index: int) -> None:
        for round_ in range(rounds):
            before = search.searched
            await batcher.submit([f"c{index} r{round_}"], 3)
            waited.append(search.searched - before)
            await asyncio.sleep(0.003)  # the answer travels back, the next request comes

    async def scenario() -> None:
        batcher.start()
        try:
            clients_done = asyncio.gather(*(client(i) for i in range(clients)))
            await asyncio.sleep(0.05)  # the huge request arrives while the clients are busy
            huge = batcher.submit([f"big {i}" for i in range(big)], 3) if big else asyncio.sleep(0)
            await asyncio.gather(clients_done, huge)
        finally:
            await batcher.stop()

    asyncio.run(scenario())
    waited.sort()
    return waited[int(0.99 * (len(waited) - 1))]


def test_closed_loop_clients_wait_for_at_most_about_1_5x_the_work_beside_a_huge_request():
    """The issue-17 fairness run in miniature: 64 one-query clients, alone and beside 10,000 queries."""
    alone = work_waited_p99(big=0)
    beside = work_waited_p99(big=10_000)
    assert alone <= 2 * 64
    assert beside <= 2 * alone, (alone, beside)
