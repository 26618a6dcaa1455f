"""``tspo data``: prepare QA datasets (FlashRAG JSONL -> cleaned JSONL + verl parquet) and convert files."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="prepare QA datasets: FlashRAG JSONL -> JSONL + verl/Search-R1 parquet",
        description="Prepare QA datasets for training and evaluation. See docs/data.md.",
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    parser.set_defaults(handler=lambda args: _missing_action(parser))

    prepare = actions.add_parser(
        "prepare",
        help="build the training mix and evaluation sets from FlashRAG files",
        description=(
            "Read <src>/<dataset>/<split>.jsonl (FlashRAG layout; evaluation sets from the split each "
            "benchmark reports on: NQ/TriviaQA/PopQA/Bamboogle test, HotpotQA/2Wiki/MuSiQue dev), build "
            "the training mix from the train splits, and write JSONL + verl parquet under --out. Prints a "
            "table of counts (read, malformed, duplicates, empty gold lists, written)."
        ),
    )
    prepare.add_argument("--src", required=True, help="FlashRAG_datasets directory (one folder per dataset)")
    prepare.add_argument("--out", required=True, help="output directory")
    prepare.add_argument(
        "--datasets",
        default=None,
        help="comma-separated evaluation datasets (default: nq,triviaqa,popqa,hotpotqa,2wikimultihopqa,"
        "musique,bamboogle; '' for none; synthetic_world accepted)",
    )
    prepare.add_argument(
        "--train-mix",
        default=None,
        help="comma-separated datasets whose train split forms the mix (default: nq,hotpotqa; '' for none)",
    )
    prepare.add_argument("--seed", type=int, default=0, help="shuffle seed of the training mix (default 0)")
    prepare.add_argument(
        "--no-shuffle",
        action="store_true",
        help="keep the training mix in source order (each dataset in turn, as Search-R1 writes it)",
    )
    prepare.add_argument(
        "--duplicates",
        choices=("keep-first", "keep-all", "error"),
        default="keep-first",
        help="records repeating an id or a normalised question: keep the first (default), keep all "
        "(row-for-row Search-R1), or stop",
    )
    prepare.add_argument(
        "--empty-golds",
        choices=("drop", "keep", "error"),
        default="drop",
        help="records with no usable gold answer: drop and count (default), keep, or stop",
    )
    prepare.add_argument(
        "--on-malformed",
        choices=("fail", "skip"),
        default="fail",
        help="a malformed line: stop naming file and line (default) or skip and count it",
    )
    prepare.add_argument(
        "--data-source-prefix",
        default="",
        help="prefix for parquet data_source, e.g. searchR1_ for verl's built-in Search-R1 scorer",
    )
    prepare.add_argument("--no-progress", action="store_true", help="no progress bars")
    prepare.set_defaults(handler=run_prepare)

    convert = actions.add_parser(
        "convert",
        help="convert one FlashRAG-layout QA JSONL (e.g. the synthetic world's) to verl parquet",
        description="Write every record of a QA JSONL file as a verl / Search-R1 parquet row (no filtering).",
    )
    convert.add_argument("input", help="QA JSONL file (.jsonl or .jsonl.gz)")
    convert.add_argument("--out", required=True, help="output .parquet path")
    convert.add_argument("--dataset", help="data_source name (default: the record's, else the parent folder)")
    convert.add_argument("--split", help="extra_info.split, e.g. train or test (default: the record's split)")
    convert.add_argument("--data-source-prefix", default="", help="prefix for data_source, e.g. searchR1_")
    convert.add_argument("--on-malformed", choices=("fail", "skip"), default="fail")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")
    convert.set_defaults(handler=run_convert)


def _missing_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and sys.stderr.isatty()


def run_prepare(args: argparse.Namespace) -> int:
    from tspo.data.prepare import DataPrepError, prepare_datasets
    from tspo.data.qa import QAFormatError
    from tspo.errors import CLIError

    try:
        report = prepare_datasets(
            args.src,
            args.out,
            args.datasets,
            train_mix=args.train_mix,
            seed=None if args.no_shuffle else args.seed,
            duplicates=args.duplicates.replace("-", "_"),
            empty_golds=args.empty_golds,
            on_malformed="skip" if args.on_malformed == "skip" else "raise",
            data_source_prefix=args.data_source_prefix,
            progress=_progress(args),
        )
    except (DataPrepError, QAFormatError, FileNotFoundError) as err:
        raise CLIError(f"{err} (nothing was written)") from None
    print(report.format_table())
    print(f"written      : {report.out_dir} ({len(report.outputs)} files, report in prepare_report.json)")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from tspo.data.prepare import DataPrepError, convert_qa_file
    from tspo.data.qa import QAFormatError
    from tspo.errors import CLIError

    try:
        rows, stats = convert_qa_file(
            args.input,
            args.out,
            dataset=args.dataset,
            role=args.split,
            data_source_prefix=args.data_source_prefix,
            on_malformed="skip" if args.on_malformed == "skip" else "raise",
            progress=_progress(args),
        )
    except (DataPrepError, QAFormatError, FileNotFoundError) as err:
        raise CLIError(f"{err} (nothing was written)") from None
    skipped = f", {stats.malformed} malformed line(s) skipped" if stats.malformed else ""
    print(f"{rows} rows -> {args.out}{skipped}")
    return 0
