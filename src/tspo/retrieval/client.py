"""Async HTTP client of a Search-R1-style retrieval server, implementing ``Retriever``.

* pooled keep-alive connections (``httpx.AsyncClient``), one pool per event loop;
* client-side micro-batching: concurrent ``asearch`` calls made within ``coalesce_ms`` of each other
  (e.g. one per trajectory of a rollout) share one request, because an HTTP round trip costs far more
  CPU than searching a query; large batches are split into requests of ``batch_size`` queries;
* per-request timeout; retries with exponential backoff and jitter on connection errors, timeouts,
  429 and 5xx (a server restarting or still loading its index answers 503) -- never on other 4xx,
  which mean the request itself is wrong;
* a time-based retry budget (``retry_budget_s``, default 5 minutes, long enough for a server to be
  restarted and reload a large index): retries go on until the budget is spent *and* at least
  ``retries`` were made, so callers that only pass ``retries`` (the verl agent loop) get it too; after a
  connection failure or a 503 the client waits on ``GET /health`` (one poll per event loop, shared by
  every waiting request) instead of hammering ``/retrieve``;
* after the last retry a :class:`~tspo.retrieval.base.RetrievalUnavailableError` naming the URL;
* an optional LRU cache of ``(query, k)`` results, the same one the server and ``CachedRetriever`` use.

``search`` is the synchronous face (it runs on a private event-loop thread); ``asearch`` is for
callers already inside an event loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import weakref
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from tspo.retrieval.base import (
    Doc,
    RetrievalError,
    RetrievalRequestError,
    RetrievalUnavailableError,
    check_k,
    check_queries,
)
from tspo.retrieval.cache import LRUCache
from tspo.retrieval.wire import dumps, loads, parse_response

__all__ = ["HTTPRetriever"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread, for the synchronous API."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="retrieval-client", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class _Waiting:
    queries: list[str]
    k: int
    future: asyncio.Future[list[list[Doc]]]


class _Coalescer:
    """Gathers the misses of concurrent ``asearch`` calls on one event loop into shared requests."""

    def __init__(self, owner: HTTPRetriever, wait: float) -> None:
        self.owner = owner
        self.wait = wait
        self.waiting: list[_Waiting] = []
        self.queued = 0
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def submit(self, queries: list[str], k: int) -> list[list[Doc]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[list[Doc]]] = loop.create_future()
        self.waiting.append(_Waiting(queries, k, future))
        self.queued += len(queries)
        if self.queued >= self.owner.batch_size:
            self.flush()
        elif self.timer is None:
            self.timer = loop.call_later(self.wait, self.flush)
        return await future

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiting, self.waiting, self.queued = self.waiting, [], 0
        group: list[_Waiting] = []
        size = 0
        for item in waiting:
            if group and size + len(item.queries) > self.owner.batch_size:
                self._start(group)
                group, size = [], 0
            group.append(item)
            size += len(item.queries)
        if group:
            self._start(group)

    def _start(self, group: list[_Waiting]) -> None:
        task = asyncio.get_running_loop().create_task(self._send(group))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, group: list[_Waiting]) -> None:
        distinct = list(dict.fromkeys(q for item in group for q in item.queries))
        k = max(item.k for item in group)  # results are sorted, so smaller k are prefixes
        try:
            found = dict(zip(distinct, await self.owner._send_all(distinct, k), strict=True))
        except BaseException as err:
            for item in group:
                if not item.future.done():
                    item.future.set_exception(err)
            if not isinstance(err, Exception):
                raise
            return
        for item in group:
            if not item.future.done():
                item.future.set_result([found[q][: item.k] for q in item.queries])


@dataclass
class _LoopState:
    loop: weakref.ref[asyncio.AbstractEventLoop]
    client: Any
    coalescer: _Coalescer
    health_wait: asyncio.Task[bool] | None = None


class HTTPRetriever:
    """``Retriever`` backed by ``POST {url}/retrieve``.

    Args:
        url: server base URL (``http://127.0.0.1:8000``) or the full ``.../retrieve`` endpoint.
        timeout: seconds allowed for one request (connect, send, wait, read).
        retries: further attempts after the first fails with a retryable error, made even when
            ``retry_budget_s`` is spent.
        token: bearer token, if the server wants one.
        retry_budget_s: keep retrying a failed request until this many seconds have passed since its
            first attempt (default 300: a server restart plus an index reload); 0 counts ``retries`` only.
        backoff: delay before the first retry; doubles each retry (with jitter) up to ``max_backoff``.
        batch_size: most queries per request (keep it at or below the server's ``max_queries``).
        max_connections: connection pool size per event loop.
        cache_size: LRU entries of ``(query, k)`` results kept client-side; 0 disables.
        coalesce_ms: how long a request waits for concurrent ``asearch`` calls to join it; 0 sends
            every call on its own.
    """

    kind = "http"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        token: str | None = None,
        retry_budget_s: float = 300.0,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        batch_size: int = 256,
        max_connections: int = 16,
        cache_size: int = 0,
        coalesce_ms: float = 1.0,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"retrieval server URL must start with http:// or https://, got {url!r}")
        if (
            retries < 0
            or retry_budget_s < 0
            or timeout <= 0
            or batch_size < 1
            or max_connections < 1
            or coalesce_ms < 0
        ):
            raise ValueError(
                "retries, retry_budget_s and coalesce_ms must be >= 0, timeout > 0, batch_size and "
                "max_connections >= 1"
            )
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/retrieve") else base + "/retrieve"
        self.url = self.endpoint[: -len("/retrieve")]
        self.timeout = timeout
        self.retries = retries
        self.retry_budget_s = retry_budget_s
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.batch_size = batch_size
        self.max_connections = max_connections
        self.coalesce_ms = coalesce_ms
        self._headers = {"content-type": "application/json"}
        if token:
            self._headers["authorization"] = f"Bearer {token}"
        self.cache = LRUCache(cache_size)
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "queries": 0, "seconds": 0.0}
        self._loops: dict[int, _LoopState] = {}
        self._loop_thread: _LoopThread | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HTTPRetriever({self.endpoint!r})"

    # -------------------------------------------------------------- public API
    def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        """Blocking search (runs on the client's own event-loop thread)."""
        with self._lock:
            if self._loop_thread is None:
                self._loop_thread = _LoopThread()
            loop_thread = self._loop_thread
        return loop_thread.run(self.asearch(queries, k))

    async def asearch(self, queries: list[str], k: int) -> list[list[Doc]]:
        """Top-``k`` passages of each query; concurrent calls share requests (see ``coalesce_ms``)."""
        queries = check_queries(queries)
        check_k(k)
        started = time.perf_counter()
        try:
            results: list[list[Doc] | None] = [self.cache.get((q, k)) for q in queries]
            missing = list(dict.fromkeys(q for q, r in zip(queries, results, strict=True) if r is None))
            if missing:
                if self.coalesce_ms > 0:
                    answers = await self._state().coalescer.submit(missing, k)
                else:
                    answers = await self._send_all(missing, k)
                found = dict(zip(missing, answers, strict=True))
                for query, docs in found.items():
                    self.cache.put((query, k), docs)
                results = [found[q] if r is None else r for q, r in zip(queries, results, strict=True)]
            return [list(r) for r in results if r is not None]
        finally:
            self.stats["seconds"] += time.perf_counter() - started

    async def ahealth(self) -> dict[str, Any]:
        """The server's ``/health`` body (raises ``RetrievalUnavailableError`` if unreachable)."""
        client = self._state().client
        try:
            response = await client.get(self.url + "/health")
        except Exception as err:
            raise RetrievalUnavailableError(
                f"retrieval server {self.url} unreachable: {_describe(err)}"
            ) from err
        return loads(response.content)

    def check_reachable(self, wait_s: float = 10.0, poll_s: float = 0.5) -> None:
        """Raise :class:`RetrievalUnavailableError` naming the URL when no server accepts a connection
        there within ``wait_s`` seconds (a server being started alongside gets that long to bind).

        Any HTTP answer to ``GET /health`` counts: 200 (ready), 503 (still loading its index: requests
        wait for it on their own), 404 / 405 (Search-R1's server has no ``/health``), even 401, and a
        connection accepted but not answered in time. Only "nothing listens" fails, so a wrong URL or a
        server never started is reported at once instead of after the retry budget of the first search
        (``retry_budget_s``, 300 s by default).
        """
        import httpx

        deadline = time.monotonic() + wait_s
        waiting = False
        while True:
            try:
                httpx.get(self.url + "/health", timeout=min(5.0, self.timeout), headers=self._headers)
                return
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                if time.monotonic() + poll_s > deadline:
                    raise RetrievalUnavailableError(
                        f"no retrieval server answers at {self.url} ({_describe(err)}); start one with "
                        "`tspo serve --index DIR --port PORT` or fix the URL"
                    ) from None
                if not waiting:
                    logger.info("waiting up to %.0f s for a retrieval server at %s", wait_s, self.url)
                    waiting = True
            except httpx.TransportError:  # it accepted the connection: something listens (busy, or slow)
                return
            time.sleep(poll_s)

    def close(self) -> None:
        """Close connection pools and the private event-loop thread."""
        with self._lock:
            loop_thread, self._loop_thread = self._loop_thread, None
        if loop_thread is not None:
            state = self._loops.pop(id(loop_thread.loop), None)
            if state is not None:
                loop_thread.run(state.client.aclose())
            loop_thread.stop()

    async def aclose(self) -> None:
        """Close the connection pool of the running event loop."""
        state = self._loops.pop(id(asyncio.get_running_loop()), None)
        if state is not None:
            if state.health_wait is not None:
                state.health_wait.cancel()
            await state.client.aclose()

    # ---------------------------------------------------------------- internals
    def _state(self) -> _LoopState:
        """Connection pool and coalescer of the running event loop (httpx pools are loop-bound)."""
        import httpx

        loop = asyncio.get_running_loop()
        state = self._loops.get(id(loop))
        if state is not None and state.loop() is loop:
            return state
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
            limits=httpx.Limits(
                max_connections=self.max_connections, max_keepalive_connections=self.max_connections
            ),
            headers=self._headers,
            trust_env=False,  # never send loopback traffic through an HTTP(S)_PROXY from the environment
        )
        state = _LoopState(weakref.ref(loop), client, _Coalescer(self, self.coalesce_ms / 1000))
        self._loops[id(loop)] = state
        return state

    async def _send_all(self, queries: list[str], k: int) -> list[list[Doc]]:
        """``queries`` in concurrent requests of at most ``batch_size``."""
        chunks = [queries[i : i + self.batch_size] for i in range(0, len(queries), self.batch_size)]
        answers = await asyncio.gather(*(self._post(chunk, k) for chunk in chunks))
        return [docs for answer in answers for docs in answer]

    async def _post(self, queries: list[str], k: int) -> list[list[Doc]]:
        import httpx

        client = self._state().client
        body = dumps({"queries": queries, "topk": k, "return_scores": True})
        started = time.monotonic()
        deadline = started + self.retry_budget_s
        last_error = ""
        attempt = 0
        while True:
            attempt += 1
            self.stats["requests"] += 1
            server_down = False
            try:
                response = await client.post(self.endpoint, content=body)
            except (
                httpx.TransportError
            ) as err:  # connect / read / write errors, timeouts, dropped connections
                last_error = _describe(err)
                server_down = not isinstance(err, httpx.TimeoutException)
            else:
                status = response.status_code
                if status == 200:
                    try:
                        docs = parse_response(loads(response.content), len(queries))
                    except ValueError as err:
                        raise RetrievalError(f"malformed response from {self.endpoint}: {err}") from None
                    self.stats["queries"] += len(queries)
                    return docs
                message = _error_message(response)
                if status != 429 and status < 500:
                    raise RetrievalRequestError(
                        f"{self.endpoint} rejected the request (HTTP {status}): {message}"
                    )
                last_error = f"HTTP {status}: {message}"
                server_down = status == 503
            now = time.monotonic()
            if attempt > self.retries and now >= deadline:
                break
            self.stats["retries"] += 1
            delay = min(self.max_backoff, self.backoff * 2 ** min(attempt - 1, 30)) * random.uniform(0.5, 1.0)
            if attempt > self.retries:  # only the budget keeps this going: never sleep past it
                delay = min(delay, deadline - now)
            logger.warning(
                "retrieval request to %s failed (%s); retry %d in %.2fs (%.0fs of the %.0fs budget left)",
                self.endpoint,
                last_error,
                attempt,
                delay,
                max(0.0, deadline - now),
                self.retry_budget_s,
            )
            await asyncio.sleep(delay)
            if server_down and time.monotonic() < deadline:
                await self._wait_for_health(deadline)
        self.stats["failures"] += 1
        raise RetrievalUnavailableError(
            f"retrieval server {self.endpoint} failed after {attempt} attempt(s) over "
            f"{time.monotonic() - started:.1f}s: {last_error}"
        )

    async def _wait_for_health(self, deadline: float) -> None:
        """Wait (at most until ``deadline``) for ``GET /health`` to answer 200; one poll per event loop,
        shared by every request waiting on it."""
        state = self._state()
        if state.health_wait is None or state.health_wait.done():
            state.health_wait = asyncio.get_running_loop().create_task(
                self._poll_health(state.client, time.monotonic() + self.retry_budget_s)
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            await asyncio.wait_for(asyncio.shield(state.health_wait), remaining)
        except Exception:  # timed out, or the poll failed: the retry itself tells what is wrong
            return

    async def _poll_health(self, client: Any, until: float) -> bool:
        """Poll ``/health`` until 200 (True), or ``until`` passes (False). A server without ``/health``
        (Search-R1's own) answers 404 or 405: nothing to wait on, so return at once."""
        import httpx

        delay = min(self.backoff, 0.5)
        while time.monotonic() < until:
            try:
                response = await client.get(self.url + "/health", timeout=min(5.0, self.timeout))
                if response.status_code == 200 or response.status_code in (404, 405):
                    return True
            except httpx.TransportError:
                pass
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 1.5)
        return False


def _describe(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _error_message(response: Any) -> str:
    try:
        payload = loads(response.content)
    except ValueError:
        return response.text[:200]
    if isinstance(payload, dict):
        return str(payload.get("error") or payload.get("detail") or payload)[:500]
    return str(payload)[:500]
