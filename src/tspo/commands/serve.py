"""``tspo serve``: serve an index over HTTP in the Search-R1 wire format (``POST /retrieve``)."""

from __future__ import annotations

import argparse
import os


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a retrieval index over HTTP (Search-R1 compatible)",
        description=(
            "Serve a saved index (or a corpus indexed with BM25 at startup) at POST /retrieve with "
            '{"queries": [...], "topk": 3, "return_scores": true}. GET /health answers 200 once the index '
            "is loaded. Any Search-R1-style client can point its retriever URL at http://HOST:PORT/retrieve."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--index", help="index directory from `tspo index build`")
    source.add_argument("--corpus", help="corpus JSONL to index with BM25 in memory at startup")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument(
        "--token",
        default=os.environ.get("TSPO_RETRIEVAL_TOKEN"),
        help="require 'Authorization: Bearer TOKEN' (default: $TSPO_RETRIEVAL_TOKEN; unset = no token)",
    )
    parser.add_argument(
        "--topk", type=int, default=3, help="topk when a request omits it or sends <= 0 (default 3)"
    )
    parser.add_argument("--max-topk", type=int, default=100, help="largest topk accepted (default 100)")
    limits = parser.add_argument_group(
        "request limits",
        "A request is bounded by its size in bytes, not by a query count, so Search-R1's 512 x 5 = "
        "2,560-query batches pass. Over-long queries are cut, not refused: to --max-query-chars, then "
        "to what the index reads (the dense encoder's token window, BM25's first 1,024 words), and "
        "counted in the X-Truncated-Queries response header.",
    )
    limits.add_argument(
        "--max-body-bytes",
        type=int,
        default=16 * 1024 * 1024,
        help="largest request body in bytes (default 16 MiB); larger gets 413",
    )
    limits.add_argument(
        "--max-queries", type=int, help="most queries per request (default: no count limit); more gets 422"
    )
    limits.add_argument(
        "--max-query-chars",
        type=int,
        default=16384,
        help="queries are first cut to this many characters (default 16384)",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=256,
        help="most queries per batched search (default 256); larger requests are split into slices "
        "interleaved with other clients' queries",
    )
    parser.add_argument(
        "--max-wait-ms", type=float, default=2.0, help="wait for a fuller batch (default 2 ms)"
    )
    parser.add_argument("--cache-size", type=int, default=100_000, help="LRU result entries; 0 disables")
    hygiene = parser.add_argument_group("connections")
    hygiene.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=30.0,
        help="close a connection idle this many seconds, from its opening or its last response (default 30)",
    )
    hygiene.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        help="close a connection whose request head is incomplete this many seconds after its first "
        "byte (default 10)",
    )
    hygiene.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        help="answer 408 and close when a request body is incomplete this many seconds after its head "
        "(default 30)",
    )
    hygiene.add_argument(
        "--max-connections",
        type=int,
        default=2048,
        help="most connections open at once (default 2048); one more gets 503 with Retry-After and is "
        "closed. The open-file limit is raised to fit where the hard limit allows",
    )
    parser.add_argument(
        "--no-mmap", action="store_true", help="read the index into memory instead of mapping it"
    )
    parser.add_argument("--threads", type=int, help="BM25 search threads (default: all cores)")
    parser.add_argument("--device", help="dense query encoder device (default: cuda if present)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tspo.errors import CLIError
    from tspo.retrieval.server import ServerSettings, serve

    try:
        settings = ServerSettings(
            host=args.host,
            port=args.port,
            token=args.token or None,
            default_topk=args.topk,
            max_topk=args.max_topk,
            max_queries=args.max_queries,
            max_query_chars=args.max_query_chars,
            max_body_bytes=args.max_body_bytes,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            cache_size=args.cache_size,
            keep_alive_s=args.keep_alive_timeout,
            header_timeout_s=args.header_timeout,
            body_timeout_s=args.body_timeout,
            max_connections=args.max_connections,
        )
    except ValueError as err:
        raise CLIError(str(err)) from None

    from tspo.retrieval import RetrieverSpec, load_retriever

    if args.index:
        from tspo.retrieval.index_io import read_manifest

        try:  # a missing or broken index, or a dense index without faiss, is reported now, not from the loading thread
            if read_manifest(args.index).get("kind") == "dense":
                from tspo.retrieval.extras import import_dense_dependency

                import_dense_dependency("faiss")
                import_dense_dependency("sentence_transformers")
        except (FileNotFoundError, ValueError, ImportError) as err:
            raise CLIError(str(err)) from None
    elif not Path(args.corpus).is_file():
        raise CLIError(f"corpus file not found: {args.corpus}")
    spec = RetrieverSpec(
        index=args.index,
        corpus=None if args.index else args.corpus,
        mmap=not args.no_mmap,
        threads=args.threads,
        device=args.device,
    )

    def load():  # runs in a thread while /health answers "loading"
        return load_retriever(spec)

    try:
        return serve(load, settings)
    except OSError as err:
        raise CLIError(str(err)) from None
