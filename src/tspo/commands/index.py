"""``tspo index``: build a BM25 or dense index from a JSONL corpus, and describe a saved one."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="build or inspect a retrieval index",
        description="Build a BM25 or dense (faiss) index from a JSONL corpus, or describe a saved index.",
    )
    actions = parser.add_subparsers(dest="index_command", metavar="ACTION")

    build = actions.add_parser(
        "build",
        help="index a JSONL corpus",
        description=(
            'Index a corpus with one passage per line, {"id", "contents": "title\\ntext"} (wiki-18) or '
            '{"id", "title", "text"}. The index directory is written atomically.'
        ),
    )
    build.add_argument("--corpus", required=True, help="corpus JSONL file (.jsonl or .jsonl.gz)")
    build.add_argument("--out", required=True, help="index directory to create (replaced if it is an index)")
    build.add_argument("--kind", choices=("bm25", "dense"), default="bm25", help="index type (default: bm25)")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    bm25 = build.add_argument_group("bm25")
    bm25.add_argument("--k1", type=float, default=1.5, help="BM25 k1 (default 1.5)")
    bm25.add_argument("--b", type=float, default=0.75, help="BM25 b (default 0.75)")
    bm25.add_argument(
        "--method", default="lucene", choices=("lucene", "robertson", "atire"), help="BM25 variant"
    )
    bm25.add_argument("--no-stem", action="store_true", help="do not stem terms")
    bm25.add_argument("--keep-stopwords", action="store_true", help="index English stopwords too")
    dense = build.add_argument_group("dense")
    dense.add_argument(
        "--encoder", help="sentence-transformers model directory or name (e.g. intfloat/e5-base-v2)"
    )
    dense.add_argument(
        "--index-type", choices=("flat", "hnsw", "ivf"), default="flat", help="faiss index type"
    )
    dense.add_argument("--fp16", action="store_true", help="store vectors in float16 (half the memory)")
    dense.add_argument(
        "--query-prefix",
        help='prefix of queries (default: "query: " for E5-family encoders, none for others; recorded in '
        "the index manifest)",
    )
    dense.add_argument(
        "--passage-prefix",
        help='prefix of passages (default: "passage: " for E5-family encoders, none for others)',
    )
    dense.add_argument("--max-length", type=int, default=256, help="encoder max tokens (default 256)")
    dense.add_argument("--batch-size", type=int, default=64, help="texts per encoder forward pass")
    dense.add_argument("--device", help="encoder device, e.g. cpu or cuda (default: cuda if present)")
    dense.add_argument("--hnsw-m", type=int, default=32, help="HNSW graph degree M")
    dense.add_argument("--ef-construction", type=int, default=80, help="HNSW build beam width")
    dense.add_argument("--ef-search", type=int, default=128, help="HNSW search beam width")
    dense.add_argument("--nlist", type=int, help="IVF lists (default 4*sqrt(N))")
    dense.add_argument("--nprobe", type=int, default=64, help="IVF lists probed per query")
    dense.add_argument(
        "--work-dir",
        help="where embeddings are saved as they are computed (default: OUT.work); rerun to resume",
    )
    dense.add_argument(
        "--keep-work", action="store_true", help="keep the work directory after a successful build"
    )
    dense.add_argument(
        "--faiss-index",
        help="adopt this inner-product faiss index (row i = corpus line i, e.g. Search-R1's e5_Flat.index) "
        "instead of encoding the corpus",
    )
    build.set_defaults(handler=run_build)

    info = actions.add_parser("info", help="describe a saved index", description="Describe a saved index.")
    info.add_argument("index", help="index directory")
    info.add_argument("--json", action="store_true", help="print the manifest as JSON")
    info.set_defaults(handler=run_info)

    parser.set_defaults(handler=lambda args: parser.print_help() or 2)


def _corpus_fingerprint(path: Path) -> dict[str, object]:
    stat = path.stat()
    return {"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def run_build(args: argparse.Namespace) -> int:
    from tspo.errors import CLIError
    from tspo.retrieval.corpus import CorpusFormatError, count_lines, read_corpus

    corpus = Path(args.corpus)
    if not corpus.is_file():
        raise CLIError(f"corpus file not found: {corpus}")
    out = Path(args.out)
    if args.kind == "bm25" and not (args.k1 >= 0 and 0 <= args.b <= 1):
        raise CLIError(f"--k1 must be >= 0 and --b in [0, 1], got k1={args.k1} and b={args.b}")
    from tspo.retrieval.index_io import check_index_target

    try:  # before the build, which can take hours
        check_index_target(out)
    except FileExistsError as err:
        raise CLIError(f"--out: {err}") from None
    try:
        total = count_lines(corpus)
    except CorpusFormatError as err:
        raise CLIError(str(err)) from None
    show = not args.no_progress
    print(f"indexing {corpus} ({total:,} lines) -> {out} [{args.kind}]")
    try:
        if args.kind == "bm25":
            from tspo.retrieval.analyzer import AnalyzerConfig
            from tspo.retrieval.bm25 import BM25Retriever, bm25_memory_estimate, default_threads

            analyzer = AnalyzerConfig(
                stopwords=None if args.keep_stopwords else "en", stemmer=None if args.no_stem else "auto"
            )
            staging = out.parent / f".{out.name}.build"
            try:
                retriever = BM25Retriever.build(
                    read_corpus(corpus),
                    k1=args.k1,
                    b=args.b,
                    method=args.method,
                    analyzer=analyzer,
                    work_dir=staging,
                    show_progress=show,
                    total=total,
                )
                retriever.save(out)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            _, line = bm25_memory_estimate(
                len(retriever), len(retriever.matrix.data), len(retriever.vocab), default_threads()
            )
            print(line)
        else:
            if not args.encoder:
                raise CLIError(
                    "--kind dense needs --encoder MODEL (a sentence-transformers directory or name)"
                )
            from tspo.retrieval.dense import DenseRetriever
            from tspo.retrieval.encoder import EncoderConfig
            from tspo.retrieval.extras import import_dense_dependency

            for module in ("faiss", "sentence_transformers"):  # before anything is written
                import_dense_dependency(module)

            encoder = EncoderConfig(
                model=args.encoder,
                query_prefix=args.query_prefix,
                passage_prefix=args.passage_prefix,
                max_length=args.max_length,
                batch_size=args.batch_size,
                device=args.device,
            )
            work = Path(args.work_dir) if args.work_dir else out.parent / f"{out.name}.work"
            if args.faiss_index:
                retriever = DenseRetriever.from_faiss(
                    read_corpus(corpus),
                    args.faiss_index,
                    encoder=encoder,
                    work_dir=work,
                    ef_search=args.ef_search,
                    nprobe=args.nprobe,
                    show_progress=show,
                    total=total,
                )
                retriever.save(out)
                shutil.rmtree(work, ignore_errors=True)
                print(f"saved {len(retriever):,} passages to {out} ({_disk_size(out)})")
                print(f"serve it with: tspo serve --index {out}")
                return 0
            print(f"embeddings are saved in {work} as they are computed; rerun the same command to resume")
            retriever = DenseRetriever.build(
                read_corpus(corpus),
                encoder=encoder,
                index_type=args.index_type,
                fp16=args.fp16,
                work_dir=work,
                hnsw_m=args.hnsw_m,
                ef_construction=args.ef_construction,
                ef_search=args.ef_search,
                nlist=args.nlist,
                nprobe=args.nprobe,
                show_progress=show,
                total=total,
                corpus_fingerprint=_corpus_fingerprint(corpus),
            )
            retriever.save(out)
            if not args.keep_work:
                shutil.rmtree(work, ignore_errors=True)
    except (CorpusFormatError, FileNotFoundError, FileExistsError, ValueError, ImportError) as err:
        raise CLIError(str(err)) from None
    print(f"saved {len(retriever):,} passages to {out} ({_disk_size(out)})")
    print(f"serve it with: tspo serve --index {out}")
    return 0


def _disk_size(directory: Path) -> str:
    from tspo.retrieval.index_io import format_bytes

    return format_bytes(sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()))


def run_info(args: argparse.Namespace) -> int:
    from tspo.errors import CLIError
    from tspo.retrieval.index_io import read_manifest

    directory = Path(args.index)
    try:
        manifest = read_manifest(directory)
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
    if args.json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return 0
    kind = manifest.get("kind")
    print(f"index       : {directory}")
    print(f"kind        : {kind}")
    print(f"passages    : {manifest.get('passages', 0):,}")
    print(f"on disk     : {_disk_size(directory)}")
    print(f"created     : {manifest.get('created', '?')}")
    if kind == "bm25":
        from tspo.retrieval.bm25 import bm25_memory_estimate, default_threads

        params = manifest["bm25"]
        print(f"bm25        : k1={params['k1']} b={params['b']} method={params['method']}")
        print(f"terms       : {manifest['terms']:,}   postings: {manifest['postings']:,}")
        print(f"analyzer    : {manifest['analyzer']}")
        print(
            bm25_memory_estimate(
                manifest["passages"], manifest["postings"], manifest["terms"], default_threads()
            )[1]
        )
    elif kind == "dense":
        from tspo.retrieval.dense import dense_memory_estimate

        params = manifest["dense"]
        encoder = manifest["encoder"]
        print(
            f"faiss       : {params['index_type']} ({'fp16' if params['fp16'] else 'fp32'}), dim {params['dim']}"
        )
        print(f"encoder     : {encoder['model']}")
        print(f"prefixes    : query={encoder['query_prefix']!r} passage={encoder['passage_prefix']!r}")
        print(
            dense_memory_estimate(
                manifest["passages"], params["dim"], params["fp16"], params["index_type"], params["hnsw_m"]
            )[1]
        )
    return 0
