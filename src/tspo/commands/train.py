"""``tspo train``: RL-train a search agent (the embedded default needs no argument)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a search agent with TSPO / GRPO / DSPO / RLOO / Dr.GRPO",
        description=(
            "Train a search agent. With no arguments: the quickstart preset (synthetic search world, "
            "in-process BM25, SmolLM2-135M-Instruct offline, TSPO). Settings are "
            "'section.key=value' overrides, e.g. algorithm.name=grpo trainer.steps=50."
        ),
    )
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. trainer.steps=50")
    parser.add_argument("--preset", help="built-in preset: tiny or quickstart (default: quickstart)")
    parser.add_argument("--config", help="YAML config file (applied on top of --preset if both are given)")
    parser.add_argument("--output-dir", help="run directory (same as trainer.output_dir=...)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", action="store_true", help="continue from the run directory's last checkpoint"
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run the output directory holds (checkpoints, metrics, evaluations) and start "
        "again; without it a directory holding another run is refused",
    )
    parser.add_argument("--show-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument(
        "--list-keys", action="store_true", help="list every config key with its help and exit"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from tspo.configuration import ConfigError, describe, to_dict
    from tspo.errors import CLIError
    from tspo.training.config import TrainConfig, load_train_config

    if args.list_keys:
        for key, type_name, default, help_text in describe(TrainConfig):
            print(f"{key:40s} {type_name:28s} {json.dumps(default)!s:24s} {help_text}")
        return 0
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"trainer.output_dir={args.output_dir}")
    try:
        config = load_train_config(args.preset, args.config, overrides)
    except ConfigError as err:
        raise CLIError(str(err)) from None
    if args.show_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0

    from tspo.retrieval.base import RetrievalError
    from tspo.retrieval.corpus import CorpusFormatError
    from tspo.runs import RunDirError
    from tspo.training.checkpoint import CheckpointError
    from tspo.training.setup import ResourceError
    from tspo.training.trainer import Trainer

    trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite)
    try:
        summary = trainer.train()
    except (ResourceError, CheckpointError, RunDirError, CorpusFormatError) as err:
        raise CLIError(str(err)) from None
    except ImportError as err:
        # An optional backend the config asked for (wandb, peft, faiss...) is not installed.
        raise CLIError(str(err)) from None
    except RetrievalError as err:  # e.g. the server stayed down through the client's retry budget
        raise CLIError(
            f"{err}\nthe run stopped; {config.trainer.output_dir} keeps what was written "
            "(`tspo train ... --resume` continues from its last checkpoint, if any)"
        ) from None
    print()
    print(format_summary(summary, config))
    return 0


def _em_line(name: str, before: dict[str, float], after: dict[str, float]) -> str | None:
    key = f"{name}/em"
    if key not in after:
        return None
    if key in before:
        change = after[key] - before[key]
        return f"{before[key]:.3f} -> {after[key]:.3f} ({change:+.3f})"
    return f"{after[key]:.3f} after"


def format_summary(summary: Any, config: Any) -> str:
    """The end-of-run summary: EM before -> after (greedy and sampled), what changed in the model's
    behaviour, warnings, and where the checkpoint, metrics and plots are."""
    from tspo.runs import RunDir
    from tspo.training.progress import format_duration

    before, after = summary.eval_before, summary.eval_after
    questions = int(after.get("greedy/n", after.get("n", 0)))
    steps = f"{summary.steps} step{'s' if summary.steps != 1 else ''}"
    resumed = f", resumed at step {summary.resumed_from}" if summary.resumed_from else ""
    lines = [
        f"trained {steps} of {config.algorithm.name} on {config.model.policy} "
        f"({format_duration(summary.seconds)} in this process{resumed})"
        if resumed
        else f"trained {steps} of {config.algorithm.name} on {config.model.policy} in {format_duration(summary.seconds)}",
        f"held-out questions : {questions} (never trained on)",
    ]
    greedy = _em_line("greedy", before, after)
    if greedy is not None:
        lines.append(f"greedy EM          : {greedy}")
    sampled = _em_line("sampled", before, after)
    if sampled is not None:
        lines.append(
            f"sampled EM         : {sampled} (temperature {config.rollout.temperature:g}, fixed seed)"
        )
    if summary.behaviour:
        lines.append("behaviour          : " + summary.behaviour[0])
        lines.extend(f"                     {line}" for line in summary.behaviour[1:])
    for warning in summary.warnings:
        lines.append(f"warning            : {warning}")
    if summary.skipped_updates:
        lines.append(
            f"skipped updates    : {summary.skipped_updates} (non-finite), rollbacks: {summary.rollbacks}"
        )
    if summary.heldout_files:
        names = ", ".join(path.name for path in summary.heldout_files)
        lines.append(f"held-out answers   : {summary.heldout_files[0].parent}/ ({names})")
    lines.append(f"checkpoint         : {summary.checkpoint}")
    lines.append(f"metrics            : {RunDir(summary.run_dir).metrics}")
    if summary.plots:
        lines.append(
            f"plots              : {Path(summary.plots[0]).parent}/ ({', '.join(Path(p).name for p in summary.plots)})"
        )
    return "\n".join(lines)
