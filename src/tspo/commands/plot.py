"""``tspo plot``: PNG curves of one run, or several runs overlaid."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="plot training curves (PNG) from run directories",
        description=(
            "One RUN_DIR: write curves.png, actor.png, categories.png and timing.png (each when its metrics "
            "were logged) to --out (default RUN_DIR/plots). Several RUN_DIRs, or --keys: overlay the runs, "
            "one panel per key, in OUT/compare.png."
        ),
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directory holding metrics.jsonl")
    parser.add_argument("--out", metavar="DIR", help="output directory (required when comparing runs)")
    parser.add_argument("--keys", help="comma-separated metric keys to overlay, e.g. reward/mean,eval/em")
    parser.add_argument("--labels", help="comma-separated legend labels, one per RUN_DIR")
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.6,
        help="EMA weight in [0, 1) for the bold curves; 0: raw (default 0.6)",
    )
    parser.set_defaults(handler=run)


def _split(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def run(args: argparse.Namespace) -> int:
    from tspo.errors import CLIError
    from tspo.runs import RunDir

    run_dirs = [Path(d) for d in args.run_dirs]
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise CLIError(f"run directory not found: {run_dir}")
        if not RunDir(run_dir).metrics.is_file():
            raise CLIError(f"{run_dir} has no {RunDir(run_dir).metrics.name} (is it a tspo run directory?)")
    if not 0.0 <= args.smooth < 1.0:
        raise CLIError(f"--smooth must be in [0, 1), got {args.smooth}")
    keys, labels = _split(args.keys), _split(args.labels)
    if labels is not None and len(labels) != len(run_dirs):
        raise CLIError(f"--labels has {len(labels)} entries for {len(run_dirs)} run directories")
    compare = len(run_dirs) > 1 or keys is not None
    if compare and args.out is None and len(run_dirs) > 1:
        raise CLIError("--out DIR is required when comparing several runs")

    from tspo.analysis.plots import plot_run, plot_runs
    from tspo.runs import MetricsFileError

    try:
        if compare:
            out_dir = Path(args.out) if args.out else RunDir(run_dirs[0]).plots
            written = [
                plot_runs(run_dirs, out_dir / "compare.png", keys=keys, labels=labels, smooth=args.smooth)
            ]
        else:
            written = plot_run(run_dirs[0], args.out, smooth=args.smooth)
    except (MetricsFileError, ValueError) as err:
        raise CLIError(str(err)) from None
    if not written:
        raise CLIError(f"nothing to plot: {run_dirs[0] / 'metrics.jsonl'} holds none of the plotted keys")
    for path in written:
        print(path)
    return 0
