"""HTTP retrieval server (FastAPI + uvicorn) speaking the Search-R1 wire format.

Endpoints:

* ``POST /retrieve`` -- ``{"queries": [...], "topk": 3, "return_scores": true}`` -> ``{"result": [...]}``
  (see :mod:`tspo.retrieval.wire`); any Search-R1-style client can point at it unchanged.
* ``GET /health`` -- 200 ``{"status": "ready", ...}`` once the index is loaded; 503 with
  ``"loading"`` (or ``"failed"`` and the error) before that. The server listens while the index loads.
* ``GET /stats`` -- request, batch and cache counters.

Requests are checked before any work: bearer token when one is set (401, scheme case-insensitive),
body size in bytes (413), JSON syntax and depth (400), fields and ``topk`` (422); every error is a JSON
object ``{"error": "..."}``, whatever raised it. Queries longer than the retriever reads (the encoder's
token window, BM25's 1,024 words, and ``max_query_chars``) are cut, as Search-R1's tokenizer does, and
counted in the ``X-Truncated-Queries`` header; lone surrogates become U+FFFD (``X-Repaired-Queries``).
Queries already answered come from an LRU cache keyed by ``(query, topk)``; the rest go through a
:class:`~tspo.retrieval.batching.MicroBatcher` that coalesces concurrent requests, splits large ones
into slices interleaved with everyone else's, and, when a batch fails, fails only the request whose
query caused it (422 naming it).

Connections: idle ones close after ``keep_alive_s``, a request head must arrive within
``header_timeout_s`` and its body within ``body_timeout_s`` (408), and at most ``max_connections`` are
open at once (503 with ``Retry-After`` beyond); see :mod:`tspo.retrieval.connections`.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import inspect
import logging
import resource
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from tspo.retrieval.base import Doc, Retriever
from tspo.retrieval.batching import MicroBatcher, QueryFailedError
from tspo.retrieval.cache import LRUCache
from tspo.retrieval.connections import guarded_protocol
from tspo.retrieval.window import CharWindow, QueryWindow, apply_windows, needs_work
from tspo.retrieval.wire import WireError, dumps, parse_request, results_to_wire

__all__ = ["RetrievalService", "RunningServer", "ServerSettings", "create_app", "serve", "start_server"]

logger = logging.getLogger("tspo.retrieval.server")

RetrieverLoader = Callable[[], Retriever]


@dataclass
class ServerSettings:
    """Limits and behaviour of the retrieval server.

    Attributes:
        host: interface to bind; loopback unless you mean to expose the index.
        port: TCP port (0 picks a free one).
        token: when set, ``/retrieve`` and ``/stats`` need ``Authorization: Bearer <token>``.
        default_topk: ``topk`` when a request leaves it out, or sends 0 or less (Search-R1's default is 3).
        max_topk: largest ``topk`` accepted.
        max_queries: most queries in one request; ``None`` (default): bounded by ``max_body_bytes`` only,
            so Search-R1's 512 x 5 = 2,560-query batches pass.
        max_query_chars: queries are first cut to this many characters (then to the retriever's window).
        max_body_bytes: largest request body accepted (16 MiB: hundreds of thousands of short queries).
        max_batch: most queries searched in one batched call; larger requests are split.
        max_wait_ms: how long a short batch waits for more requests.
        cache_size: LRU entries of ``(query, topk)`` results; 0 disables the cache.
        keep_alive_s: an idle connection (none of a request received) is closed after this long.
        header_timeout_s: a request head must be complete this long after its first byte.
        body_timeout_s: a request body must be complete this long after its head (else 408).
        max_connections: most connections open at once; one more gets 503 and is closed.
        telemetry: keep FastAPI's built-in OpenTelemetry spans, metrics and logs (recent FastAPI
            versions enable them by default; they cost a noticeable share of a request's CPU).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None
    default_topk: int = 3
    max_topk: int = 100
    max_queries: int | None = None
    max_query_chars: int = 16384
    max_body_bytes: int = 16 * 1024 * 1024
    max_batch: int = 256
    max_wait_ms: float = 2.0
    cache_size: int = 100_000
    keep_alive_s: float = 30.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 2048
    telemetry: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0-65535 (0 picks a free one), got {self.port}")
        for name in (
            "default_topk",
            "max_topk",
            "max_query_chars",
            "max_body_bytes",
            "max_batch",
            "max_connections",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1 (or None), got {self.max_queries}")
        if self.default_topk > self.max_topk:
            raise ValueError(f"default_topk ({self.default_topk}) exceeds max_topk ({self.max_topk})")
        if self.max_wait_ms < 0 or self.cache_size < 0:
            raise ValueError("max_wait_ms and cache_size must be >= 0")
        for name in ("keep_alive_s", "header_timeout_s", "body_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class RetrievalService:
    """State behind the app: the retriever once loaded, the batcher, the cache and counters."""

    def __init__(
        self, source: Retriever | RetrieverLoader, settings: ServerSettings, freeze_gc: bool = False
    ) -> None:
        self.settings = settings
        self.freeze_gc = freeze_gc
        self._loader: RetrieverLoader | None = None
        self.retriever: Retriever | None = None
        if hasattr(source, "search"):
            self.retriever = source  # type: ignore[assignment]
        elif callable(source):
            self._loader = source
        else:
            raise TypeError("create_app needs a retriever or a function that loads one")
        self.status = "loading"
        self.error: str | None = None
        self.load_started = time.monotonic()
        self.load_seconds: float | None = None
        self.cache = LRUCache(settings.cache_size)
        self.batcher: MicroBatcher | None = None
        self.windows: list[QueryWindow] = [CharWindow(settings.max_query_chars)]
        self.requests = 0
        self.rejected = 0
        self.failed = 0
        self.truncated = 0
        self.repaired = 0
        self._truncation_logged = 0.0
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        self.load_started = time.monotonic()
        if self.retriever is None:
            assert self._loader is not None
            logger.info("loading index ...")
            ticker = asyncio.create_task(self._log_progress())
            try:
                self.retriever = await asyncio.to_thread(self._loader)
            except Exception as err:
                self.status, self.error = "failed", f"{type(err).__name__}: {err}"
                logger.error("index failed to load: %s", self.error)
                self.loaded.set()
                return
            finally:
                ticker.cancel()
        retriever = self.retriever
        if self.freeze_gc:
            # Everything loaded so far (index, vocabulary, imported libraries) lives as long as the
            # server: move it out of the collector's reach, so full collections stay short (no stalls).
            gc.collect()
            gc.freeze()
        query_windows = getattr(retriever, "query_windows", None)
        if query_windows is not None:
            self.windows += query_windows()
        self.batcher = MicroBatcher(
            retriever.search, max_batch=self.settings.max_batch, max_wait=self.settings.max_wait_ms / 1000
        )
        self.batcher.start()
        self.load_seconds = time.monotonic() - self.load_started
        self.status = "ready"
        self.loaded.set()
        logger.info("index ready: %s passages, loaded in %.1fs", self.passages(), self.load_seconds)

    async def _log_progress(self, every: float = 10.0) -> None:
        while True:
            await asyncio.sleep(every)
            logger.info("still loading the index (%.0fs so far)", time.monotonic() - self.load_started)

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        # Close only what this service loaded; a retriever handed in belongs to the caller.
        close = getattr(self.retriever, "close", None) if self._loader is not None else None
        if close is not None:
            close()

    def passages(self) -> int | None:
        try:
            return len(self.retriever)  # type: ignore[arg-type]
        except TypeError:
            return None

    async def fit_queries(self, queries: list[str]) -> tuple[list[str], int]:
        """``queries`` cut to the retriever's windows, and how many were cut (logged now and then)."""
        if not needs_work(queries, self.windows):
            return queries, 0
        # Tokenizing long queries takes a while: not on the event loop.
        queries, cut = await asyncio.to_thread(apply_windows, queries, self.windows)
        if cut:
            self.truncated += cut
            now = time.monotonic()
            if now - self._truncation_logged > 60:
                self._truncation_logged = now
                logger.info("%d over-long queries cut to the retriever's window so far", self.truncated)
        return queries, cut

    async def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        cache = self.cache
        results: list[list[Doc] | None] = [cache.get((q, k)) for q in queries]
        missing = list(dict.fromkeys(q for q, r in zip(queries, results, strict=True) if r is None))
        if missing:
            assert self.batcher is not None
            found = dict(zip(missing, await self.batcher.submit(missing, k), strict=True))
            for query, docs in found.items():
                cache.put((query, k), docs)
            results = [found[q] if r is None else r for q, r in zip(queries, results, strict=True)]
        return results  # type: ignore[return-value]

    def stats(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "requests": self.requests,
            "rejected": self.rejected,
            "failed": self.failed,
            "truncated_queries": self.truncated,
            "repaired_queries": self.repaired,
            "cache": self.cache.stats(),
            "batching": self.batcher.stats.as_dict() if self.batcher else None,
        }


def _json(status: int, payload: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(payload), status_code=status, media_type="application/json", headers=headers)


def create_app(
    source: Retriever | RetrieverLoader, settings: ServerSettings | None = None, freeze_gc: bool = False
) -> FastAPI:
    """The FastAPI app serving ``source``: a retriever, or a function that loads one (called in a thread
    at startup while ``/health`` answers ``loading``). ``freeze_gc`` (for a dedicated server process)
    exempts everything alive once the index is loaded from garbage collection."""
    settings = settings or ServerSettings()
    service = RetrievalService(source, settings, freeze_gc=freeze_gc)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        task = asyncio.create_task(service.start())
        try:
            yield
        finally:
            if not task.done():
                task.cancel()
            await service.stop()

    options: dict[str, Any] = {}
    if not settings.telemetry and "telemetry" in inspect.signature(FastAPI).parameters:
        options["telemetry"] = {"tracing": False, "metrics": False, "logs": False}
    app = FastAPI(
        title="tspo retrieval", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None, **options
    )
    app.state.service = service
    expected_token = settings.token.encode() if settings.token else None

    def unauthorized(request: Request) -> Any:
        if expected_token is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        # RFC 9110: the scheme is case-insensitive ("bearer" is "Bearer").
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), expected_token):
            return None
        service.rejected += 1
        return _json(401, {"error": "missing or wrong bearer token"}, {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return _json(
            exc.status_code, {"error": f"{message}: {request.method} {request.url.path}"}, exc.headers
        )

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Any:
        logger.error("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
        return _json(500, {"error": f"internal error: {type(exc).__name__}: {exc}"})

    # Plain Starlette routes: the handlers validate requests themselves, so FastAPI's per-request
    # dependency solving would be pure overhead on the hot path.
    async def health(request: Request) -> Response:
        body: dict[str, Any] = {"status": service.status}
        if service.status == "ready":
            body.update(
                kind=getattr(service.retriever, "kind", type(service.retriever).__name__),
                passages=service.passages(),
                load_seconds=round(service.load_seconds or 0.0, 3),
            )
            return _json(200, body)
        if service.status == "failed":
            body["error"] = service.error
        else:
            body["elapsed_seconds"] = round(time.monotonic() - service.load_started, 3)
        return _json(503, body, {"Retry-After": "1"})

    async def stats(request: Request) -> Response:
        denied = unauthorized(request)
        return denied if denied is not None else _json(200, service.stats())

    async def retrieve(request: Request) -> Response:
        service.requests += 1
        denied = unauthorized(request)
        if denied is not None:
            return denied
        try:
            body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_s)
            parsed = parse_request(
                body,
                default_topk=settings.default_topk,
                max_topk=settings.max_topk,
                max_queries=settings.max_queries,
            )
        except WireError as err:
            service.rejected += 1
            headers = {"Connection": "close"} if err.status == 408 else None
            return _json(err.status, {"error": err.message}, headers)
        if service.status != "ready":
            message = (
                "index is still loading"
                if service.status == "loading"
                else f"index failed to load: {service.error}"
            )
            return _json(503, {"error": message}, {"Retry-After": "1"})
        queries, cut = await service.fit_queries(parsed.queries)
        service.repaired += parsed.repaired
        try:
            results = await service.search(queries, parsed.topk)
        except QueryFailedError as err:
            service.failed += 1
            index = queries.index(err.query)
            return _json(422, {"error": f'"queries[{index}]" cannot be searched: {err}'})
        except Exception as err:
            service.failed += 1
            return _json(500, {"error": f"search failed: {type(err).__name__}: {err}"})
        headers = {}
        if cut:
            headers["X-Truncated-Queries"] = str(cut)
        if parsed.repaired:
            headers["X-Repaired-Queries"] = str(parsed.repaired)
        return _json(200, results_to_wire(results, parsed.return_scores), headers or None)

    app.add_route("/health", health, methods=["GET"])
    app.add_route("/stats", stats, methods=["GET"])
    app.add_route("/retrieve", retrieve, methods=["POST"])
    return app


async def _read_body(request: Any, limit: int, timeout: float) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes whether or not Content-Length is sent,
    and (408) a body still incomplete after ``timeout`` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise WireError(400, f"invalid Content-Length header {declared!r}") from None
        if size > limit:
            raise WireError(413, f"request body of {size} bytes exceeds the {limit}-byte limit")
    chunks = []
    received = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise WireError(413, f"request body exceeds the {limit}-byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise WireError(
            408, f"request body incomplete after {timeout:g}s ({received} bytes received)"
        ) from None
    return b"".join(chunks)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this on Linux. Without it, a response written as headers + body
    # waits for the client's delayed ACK (Nagle): about 40 ms per request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror or err}") from err
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app: Any, settings: ServerSettings, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app,
        http=guarded_protocol(settings.header_timeout_s, settings.max_connections),
        log_level=log_level,
        access_log=False,
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
        backlog=2048,
        lifespan="on",
        proxy_headers=False,  # no proxy in front by default; saves a middleware per request
        server_header=False,
        date_header=False,
    )
    return uvicorn.Server(config)


def _allow_open_files(needed: int) -> None:
    """Raise this process's open-file limit to ``needed`` where the hard limit allows (one per connection)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        target = soft
    if target < needed:
        logger.warning(
            "open-file limit %d is below --max-connections + 256 = %d; raise it (ulimit -n) or lower the cap",
            target,
            needed,
        )


def _run_event_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main`` on uvloop when it is installed (what uvicorn picks by default), else asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def serve(
    source: Retriever | RetrieverLoader, settings: ServerSettings | None = None, log_level: str = "info"
) -> int:
    """Run the server in the foreground until interrupted; returns 1 if the index failed to load."""
    settings = settings or ServerSettings()
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.token:
        logger.warning(
            "listening on %s without a token: anyone who can reach it can query the index", settings.host
        )
    _allow_open_files(settings.max_connections + 256)
    app = create_app(source, settings, freeze_gc=True)
    service: RetrievalService = app.state.service
    server = _uvicorn_server(app, settings, log_level)
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    logger.info("retrieval server listening on http://%s:%d (POST /retrieve, GET /health)", host, port)

    async def main() -> None:
        async def stop_on_failure() -> None:
            await service.loaded.wait()
            if service.status == "failed":
                server.should_exit = True

        watcher = asyncio.create_task(stop_on_failure())
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()

    _run_event_loop(main())
    return 1 if service.status == "failed" else 0


class RunningServer:
    """A server running in a background thread of this process (tests, benchmarks, notebooks)."""

    def __init__(self, app: Any, server: Any, thread: threading.Thread, host: str, port: int) -> None:
        self.app = app
        self.server = server
        self.thread = thread
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def service(self) -> RetrievalService:
        return self.app.state.service

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"retrieval server {self.url} did not stop within {timeout}s")

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_server(
    source: Retriever | RetrieverLoader,
    settings: ServerSettings | None = None,
    log_level: str = "warning",
    startup_timeout: float = 30.0,
) -> RunningServer:
    """Start the server in a daemon thread and return once it accepts connections (not once it is ready:
    poll ``/health`` for that). ``settings.port = 0`` picks a free port."""
    settings = settings or ServerSettings(port=0)
    app = create_app(source, settings)
    server = _uvicorn_server(app, settings, log_level)
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]

    def run() -> None:
        _run_event_loop(server.serve(sockets=[sock]))

    thread = threading.Thread(target=run, name=f"retrieval-server-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"retrieval server on {host}:{port} exited during startup")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"retrieval server on {host}:{port} did not start within {startup_timeout}s")
        time.sleep(0.01)
    return RunningServer(app, server, thread, host, port)
