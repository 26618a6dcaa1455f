"""``tspo analyze``: figures and a Markdown report of a training run and/or an evaluation."""

from __future__ import annotations

import argparse
from pathlib import Path

from tspo.evaluation.store import TRAJECTORIES_FILE


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="PNG plots and a Markdown report of a run (categories, homogeneity, curves, examples)",
        description=(
            "Read RUN_DIR/metrics.jsonl (category fractions, group homogeneity, reward / EM and validation "
            "curves) and, when present, an evaluation's trajectories.jsonl (per-dataset table, example "
            "trajectories of each category, near misses first). Writes PNG figures and report.md to --out "
            "(default RUN_DIR/analysis). See docs/evaluation.md."
        ),
    )
    parser.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="run directory of tspo train")
    parser.add_argument(
        "--eval-dir",
        metavar="DIR",
        help="a tspo eval --out directory, or a folder of them such as RUN_DIR/eval (its newest; default: newest RUN_DIR/eval/*)",
    )
    parser.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/analysis)")
    parser.add_argument(
        "--examples", type=int, default=2, metavar="N", help="example trajectories per category (default 2)"
    )
    parser.add_argument(
        "--smooth", type=float, default=0.6, help="EMA weight in [0, 1) of training curves; 0: raw"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tspo.errors import CLIError

    if args.run_dir is None and args.eval_dir is None:
        raise CLIError("give a RUN_DIR, an --eval-dir DIR, or both")
    if not 0.0 <= args.smooth < 1.0:
        raise CLIError(f"--smooth must be in [0, 1), got {args.smooth}")
    if args.examples < 0:
        raise CLIError(f"--examples must be >= 0, got {args.examples}")

    from tspo.analysis import AnalysisError, analyze
    from tspo.evaluation.records import RecordFormatError

    try:
        result = analyze(
            args.run_dir,
            eval_dir=_evaluation_dir(args.eval_dir),
            out_dir=args.out,
            examples_per_category=args.examples,
            smooth=args.smooth,
        )
    except (AnalysisError, RecordFormatError, FileNotFoundError) as err:
        raise CLIError(str(err)) from None
    print(f"report : {result.report}")
    for path in result.plots:
        print(f"figure : {path}")
    if result.eval_dir is not None:
        print(f"eval   : {result.eval_dir}")
    return 0


def _evaluation_dir(given: str | None) -> Path | None:
    """``--eval-dir`` as given, or, for a directory of evaluations such as ``RUN_DIR/eval`` (``tspo eval``
    writes one ``step-XXXXXXXX`` folder per checkpoint there), its newest evaluation."""
    if given is None:
        return None
    path = Path(given)
    if (path / TRAJECTORIES_FILE).is_file() or not path.is_dir():
        return path
    found = [p.parent for p in path.glob(f"*/{TRAJECTORIES_FILE}")]
    if not found:
        return path
    return max(found, key=lambda d: (d.name, (d / TRAJECTORIES_FILE).stat().st_mtime))
