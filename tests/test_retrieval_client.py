"""The async HTTP client against real servers: parity, batching, retries through a restart, dead servers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tspo.retrieval import (
    BM25Retriever,
    HTTPRetriever,
    RetrievalRequestError,
    RetrievalUnavailableError,
    Retriever,
    load_retriever,
)
from tspo.retrieval.server import ServerSettings, start_server
from tspo.retrieval.synthetic import passage_query, synthetic_passages


@pytest.fixture(scope="module")
def corpus():
    return list(synthetic_passages(400, seed=9, vocab_size=8000))


@pytest.fixture(scope="module")
def queries(corpus):
    return [passage_query(doc, None, words=5) for doc in corpus[:60]]


@pytest.fixture(scope="module")
def retriever(corpus):
    return BM25Retriever.build(corpus)


@pytest.fixture(scope="module")
def index_dir(retriever, tmp_path_factory):
    return retriever.save(tmp_path_factory.mktemp("client") / "bm25")


@pytest.fixture(scope="module")
def server(retriever):
    with start_server(retriever, ServerSettings(port=0, max_topk=10, token="tok")) as running:
        yield running


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"server exited early with code {process.returncode}"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not healthy within {timeout}s")


# The `tspo serve` command's own parser and handler, without importing every other tspo command.
SERVE = """
import argparse, sys
from tspo.commands import serve
parser = argparse.ArgumentParser(prog="tspo")
serve.register(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args))
"""


def start_subprocess_server(index_dir, port: int) -> subprocess.Popen:
    command = [sys.executable, "-c", SERVE, "serve", "--index", str(index_dir), "--port", str(port)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


def ids(results):
    return [[d.id for d in docs] for docs in results]


def test_client_returns_what_the_index_returns(server, retriever, queries):
    client = HTTPRetriever(server.url, token="tok", batch_size=16)
    try:
        assert isinstance(client, Retriever)
        results = client.search(queries, 4)
        assert results == [
            [d.__class__(d.id, d.title, d.text, pytest.approx(d.score, rel=1e-6)) for d in docs]
            for docs in retriever.search(queries, 4)
        ]
        assert client.stats["requests"] == 4  # 60 queries in requests of at most 16
        assert client.stats["retries"] == 0 and client.stats["seconds"] > 0
    finally:
        client.close()


def test_async_api_duplicates_and_endpoint_url(server, retriever, queries):
    async def run():
        client = HTTPRetriever(server.url + "/retrieve", token="tok", batch_size=5)
        try:
            batch = queries[:7] + queries[:3]
            found = await client.asearch(batch, 2)
            assert ids(found) == ids(retriever.search(batch, 2))
            assert client.stats["requests"] == 2  # 7 distinct queries
            assert await client.asearch([], 2) == []
            health = await client.ahealth()
            assert health["status"] == "ready"
        finally:
            await client.aclose()

    asyncio.run(run())


def test_concurrent_calls_share_requests(server, retriever, queries):
    """One-query calls from many concurrent tasks (one per trajectory) are coalesced client-side."""

    async def run():
        client = HTTPRetriever(server.url, token="tok", batch_size=64, coalesce_ms=20)
        try:
            found = await asyncio.gather(
                *(client.asearch([q], 1 + i % 3) for i, q in enumerate(queries[:30]))
            )
        finally:
            await client.aclose()
        return client, found

    client, found = asyncio.run(run())
    expected = [retriever.search([q], 1 + i % 3)[0] for i, q in enumerate(queries[:30])]
    assert [[d.id for d in docs[0]] for docs in found] == [[d.id for d in docs] for docs in expected]
    assert client.stats["requests"] < 30 // 2


def test_client_cache(server, queries):
    client = HTTPRetriever(server.url, token="tok", cache_size=100)
    try:
        first = client.search(queries[:5], 3)
        assert client.search(queries[:5], 3) == first
        assert client.stats["requests"] == 1 and client.cache.hits == 5
    finally:
        client.close()


def test_4xx_is_not_retried_and_names_the_problem(server, queries):
    client = HTTPRetriever(server.url, token="tok", retries=5, backoff=0.01)
    try:
        with pytest.raises(RetrievalRequestError, match=r"HTTP 422.*must be at most 10, got 11"):
            client.search(queries[:1], 11)
        assert client.stats["requests"] == 1
        unauthorised = HTTPRetriever(server.url, token="wrong", retries=5)
        with pytest.raises(RetrievalRequestError, match="HTTP 401"):
            unauthorised.search(queries[:1], 1)
        assert unauthorised.stats["requests"] == 1
        unauthorised.close()
    finally:
        client.close()


def test_retries_ride_out_a_server_that_is_still_loading(retriever, queries):
    release = threading.Event()

    def slow_loader():
        assert release.wait(20)
        return retriever

    with start_server(slow_loader, ServerSettings(port=0)) as running:
        timer = threading.Timer(0.6, release.set)
        timer.start()
        client = HTTPRetriever(running.url, retries=10, backoff=0.1, max_backoff=0.5)
        try:
            assert ids(client.search(queries[:3], 2)) == ids(retriever.search(queries[:3], 2))
            assert client.stats["retries"] >= 1  # 503 "loading" answers were retried
        finally:
            timer.cancel()
            client.close()


def test_client_carries_a_batch_through_a_server_restart(index_dir, retriever, queries):
    """Kill the server (SIGKILL) while batches are in flight, restart it: every batch completes."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = start_subprocess_server(index_dir, port)
    second = None
    client = HTTPRetriever(url, retries=30, backoff=0.05, max_backoff=1.0, timeout=5, batch_size=4)
    batches = [queries[i : i + 6] for i in range(0, len(queries), 6)] * 3  # 30 batches
    done: list = []
    failure: list = []

    def run_batches():
        try:
            for batch in batches:
                done.append(client.search(batch, 3))
                time.sleep(0.05)
        except Exception as err:  # reported by the assertion below
            failure.append(err)

    try:
        wait_healthy(url, first)
        worker = threading.Thread(target=run_batches)
        worker.start()
        deadline = time.monotonic() + 60
        while len(done) < 5:
            assert time.monotonic() < deadline and not failure, failure
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        killed_at = len(done)
        time.sleep(0.3)
        second = start_subprocess_server(index_dir, port)
        worker.join(timeout=120)
        assert not worker.is_alive(), "client loop did not finish"
    finally:
        stop(first)
        if second is not None:
            stop(second)
        client.close()
    assert failure == []
    assert killed_at < len(batches)  # the kill happened mid-run
    assert len(done) == len(batches)
    assert [ids(r) for r in done] == [ids(retriever.search(b, 3)) for b in batches]
    assert client.stats["retries"] > 0 and client.stats["failures"] == 0


def test_a_dead_server_gives_a_clear_error_not_a_hang():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = HTTPRetriever(url, retries=2, retry_budget_s=0, backoff=0.01, timeout=2)
    started = time.monotonic()
    try:
        with pytest.raises(RetrievalUnavailableError) as err:
            client.search(["anything"], 3)
    finally:
        client.close()
    assert time.monotonic() - started < 10
    message = str(err.value)
    assert f"retrieval server {url}/retrieve failed after 3 attempt(s)" in message
    assert "ConnectError" in message
    assert client.stats["requests"] == 3 and client.stats["failures"] == 1


def test_a_server_that_never_answers_times_out():
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        client = HTTPRetriever(url, retries=1, retry_budget_s=0, backoff=0.01, timeout=0.5)
        started = time.monotonic()
        try:
            with pytest.raises(RetrievalUnavailableError, match=r"failed after 2 attempt\(s\).*ReadTimeout"):
                client.search(["anything"], 3)
        finally:
            client.close()
        assert time.monotonic() - started < 10


def test_constructor_and_factory(server, queries):
    with pytest.raises(ValueError, match="must start with http"):
        HTTPRetriever("127.0.0.1:8000")
    client = load_retriever({"kind": "http", "url": server.url, "token": "tok", "retries": 1})
    assert isinstance(client, HTTPRetriever) and client.endpoint == server.url + "/retrieve"
    assert len(client.search(queries[:2], 2)) == 2
    client.close()


def test_check_reachable_fails_fast_on_a_dead_url_and_passes_anything_that_listens(server):
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(
        RetrievalUnavailableError, match=rf"no retrieval server answers at {dead} .*tspo serve"
    ):
        HTTPRetriever(dead).check_reachable(wait_s=0.6, poll_s=0.2)
    assert time.monotonic() - started < 5
    HTTPRetriever(server.url).check_reachable(wait_s=0)  # a ready server
    with socket.socket() as silent:  # accepts connections, never answers: something listens
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        HTTPRetriever(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3).check_reachable(wait_s=0)


def test_check_reachable_waits_for_a_server_started_alongside(retriever):
    port = free_port()
    started = threading.Event()

    def start_late():
        time.sleep(0.8)
        with start_server(lambda: retriever, ServerSettings(port=port)):
            started.set()
            time.sleep(3)

    thread = threading.Thread(target=start_late, daemon=True)
    began = time.monotonic()
    thread.start()
    HTTPRetriever(f"http://127.0.0.1:{port}").check_reachable(wait_s=10, poll_s=0.2)
    assert time.monotonic() - began >= 0.8  # it waited for the server instead of failing or passing early
    assert started.wait(5)
    thread.join()


def test_factory_reports_a_dead_url_at_once():
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(RetrievalUnavailableError, match="no retrieval server answers"):
        load_retriever({"kind": "http", "url": dead})
    assert time.monotonic() - started < 20  # the 10 s grace, not the 300 s retry budget
