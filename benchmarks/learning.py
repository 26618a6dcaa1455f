"""Learning benchmark: rows of the algorithm table on the synthetic world.

Two models (``--model``): ``tiny`` (below) and ``smollm2``, SmolLM2-135M-Instruct with a few-shot prompt
on 1- to 3-hop questions, where a policy makes answer-stage mistakes after good retrieval (see
``learning_smollm2.py``; ``--steps`` and ``--eval-every`` apply to both).

Tiny mode:
Default rows: ``tspo`` (v2 adaptive), ``tspo_turn``, ``tspo_legacy`` (the v1 rule), ``grpo`` and ``dspo``.
For each seed the tiny model is built and warm-started once; every algorithm then trains from that same
checkpoint with the same budget, so differences come from the algorithm alone. Held-out EM is measured
every ``--eval-every`` steps, and once more per question after the last step (greedy), so each algorithm
is compared with GRPO on the same questions: the paired difference per seed with a bootstrap 95 %
interval over questions. Prints a table (mean and spread of final held-out EM, steps to reach a
threshold, fraction of outcome-homogeneous groups over training, near-miss fraction, how often the stage
branch fired), writes JSON and an overlay plot of held-out EM. Finished runs (and warm starts) already in
``--out`` are read back, not rerun, so seeds can run in parallel processes and be summarised together
afterwards.

    python benchmarks/learning.py --seeds 0 1 2 --steps 30 --out benchmarks/results/learning
    python benchmarks/learning.py --model smollm2 --seeds 0 1 2 --steps 8 --eval-every 0 \
        --out benchmarks/results/learning_smollm2
    python benchmarks/learning.py --model smollm2 --workers 2     # two processes of one thread each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import torch

from learning_stats import paired_difference
from tspo.algorithms import ALGORITHMS as ALGORITHM_TABLE

DEFAULT_ALGORITHMS = ["tspo", "tspo_turn", "tspo_legacy", "grpo", "dspo"]
BASELINE = "grpo"
QUESTIONS_FILE = "final_questions.json"


def warm_checkpoint(seed: int, out: Path, overrides: list[str]) -> Path:
    """Build the tiny model for ``seed``, warm-start it once and save it (reused by every algorithm)."""
    from tspo.training.config import load_train_config
    from tspo.training.setup import (
        build_policy,
        build_retriever,
        prepare_data,
        run_warm_start,
        split_demonstrations,
    )

    target = out / f"seed{seed}" / "warm"
    if (target / "config.json").is_file():
        return target
    config = load_train_config("tiny", None, [f"trainer.seed={seed}", *overrides])
    run_dir = out / f"seed{seed}" / "build"
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    train, _, corpus = prepare_data(config, run_dir)
    retriever = build_retriever(config, corpus)
    model, tokenizer = build_policy(config, run_dir, train, corpus, torch.device("cpu"))
    demos, _ = split_demonstrations(config, train)
    run_warm_start(config, model, tokenizer, retriever, demos, corpus.parent if corpus else None)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def run_algorithm(name: str, seed: int, warm: Path, out: Path, args: argparse.Namespace) -> dict:
    from tspo.training.config import load_train_config
    from tspo.training.trainer import Trainer

    run_dir = out / f"seed{seed}" / name
    # RL draws from the same questions as a one-piece run with these settings would.
    warm_settings = load_train_config("tiny", None, [*args.override, f"trainer.seed={seed}"]).warmstart
    rl_prompts = "rest" if warm_settings.excludes_demos else "all"
    # The user's overrides come first so that the per-run settings below (no second warm start) win.
    overrides = [
        *args.override,
        f"model.policy={warm}",
        "warmstart.steps=0",
        f"warmstart.rl_prompts={rl_prompts}",
        f"trainer.seed={seed}",
        f"trainer.steps={args.steps}",
        f"trainer.eval_every={args.eval_every}",
        f"trainer.output_dir={run_dir}",
        "trainer.progress=false",
        "trainer.save_every=0",
        f"algorithm.name={name}",
    ]
    config = load_train_config("tiny", None, overrides)
    if not run_finished(run_dir, args.steps) or not (run_dir / QUESTIONS_FILE).is_file():
        # An unfinished run in run_dir (an interrupted table) is started again from nothing.
        trainer = Trainer(config, overwrite=run_dir.exists())
        trainer.train()
        write_question_outcomes(trainer, run_dir / QUESTIONS_FILE)
    return run_result(name, seed, run_dir, args.threshold)


def write_question_outcomes(trainer: object, path: Path) -> None:
    """Greedy outcome of the trained policy on every held-out question, keyed by question id."""
    from tspo.evaluation.runner import evaluate_policy

    res, config = trainer.resources, trainer.config  # type: ignore[attr-defined]
    result = evaluate_policy(
        res.engine,
        res.tokenizer,
        res.retriever,
        res.eval_examples,
        config.rollout,
        metric=config.reward.metric,
        hit_mode=config.reward.hit_mode,
        seed=config.trainer.seed,
    )
    outcomes = {str(ex.id): score.outcome for ex, score in zip(res.eval_examples, result.scores, strict=True)}
    path.write_text(json.dumps(outcomes, sort_keys=True))


def run_finished(run_dir: Path, steps: int) -> bool:
    """Whether ``run_dir`` holds a completed run of ``steps`` steps (its final evaluation is logged)."""
    from tspo.runs import read_metrics

    if not (run_dir / "metrics.jsonl").is_file():
        return False
    return any(line["step"] == steps and "eval/em" in line for line in read_metrics(run_dir))


def run_result(name: str, seed: int, run_dir: Path, threshold: float) -> dict:
    """One run's row, read back from its metrics (so finished runs are reported without rerunning)."""
    from tspo.runs import read_metrics

    lines = read_metrics(run_dir)
    curve = [(line["step"], line["eval/em"]) for line in lines if line.get("eval/em") is not None]
    train_lines = [line for line in lines if "reward/mean" in line]
    reached = next((step for step, em in curve if em >= threshold), None)
    return {
        "algorithm": name,
        "seed": seed,
        "em_before": curve[0][1],
        "em_after": curve[-1][1],
        "curve": curve,
        "steps_to_threshold": reached,
        "homogeneous_groups": statistics.fmean(line["groups/outcome_homogeneous"] for line in train_lines),
        "near_miss": statistics.fmean(line["category/near_miss"] for line in train_lines),
        "train_outcome": statistics.fmean(line["outcome/mean"] for line in train_lines),
        "stage_level": statistics.fmean(line.get("advantage/stage_level", 0.0) for line in train_lines),
        "questions": json.loads((run_dir / QUESTIONS_FILE).read_text()),
        "rl_seconds": sum(line["time/step"] for line in train_lines),
        "run_dir": str(run_dir),
    }


def summarize(results: list[dict], threshold: float, algorithms: list[str]) -> list[dict]:
    rows = []
    for name in algorithms:
        runs = [r for r in results if r["algorithm"] == name]
        if not runs:
            continue
        finals = [r["em_after"] for r in runs]
        gains = [r["em_after"] - r["em_before"] for r in runs]
        reached = [r["steps_to_threshold"] for r in runs if r["steps_to_threshold"] is not None]
        paired = [r["vs_grpo"]["diff"] for r in runs if r.get("vs_grpo")]
        rows.append(
            {
                "algorithm": name,
                "seeds": len(runs),
                "final_em_mean": statistics.fmean(finals),
                "final_em_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "em_gain_mean": statistics.fmean(gains),
                "vs_grpo_mean": statistics.fmean(paired) if paired else None,
                f"reached_{threshold}": f"{len(reached)}/{len(runs)}",
                "steps_to_threshold_mean": statistics.fmean(reached) if reached else None,
                "homogeneous_groups": statistics.fmean(r["homogeneous_groups"] for r in runs),
                "near_miss": statistics.fmean(r["near_miss"] for r in runs),
                "stage_level": statistics.fmean(r["stage_level"] for r in runs),
            }
        )
    return rows


def add_paired_differences(results: list[dict]) -> None:
    """Give each run ``vs_grpo``: its paired difference to the GRPO run of the same seed."""
    baselines = {r["seed"]: r for r in results if r["algorithm"] == BASELINE}
    for run in results:
        baseline = baselines.get(run["seed"])
        if baseline is not None and run is not baseline:
            run["vs_grpo"] = paired_difference(run["questions"], baseline["questions"], seed=run["seed"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--algorithms", nargs="+", default=DEFAULT_ALGORITHMS, choices=list(ALGORITHM_TABLE.names())
    )
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (tiny 30, smollm2 8)")
    parser.add_argument(
        "--eval-every", type=int, default=None, help="held-out evaluation every N steps (tiny 10, smollm2 0)"
    )
    parser.add_argument("--threshold", type=float, default=0.6, help="held-out EM for steps-to-threshold")
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides for every run")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="smollm2: run the table's units (a seed's start, one algorithm's run) in this many processes",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per process (default: all cores with one worker, cores / workers with more)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default benchmarks/results/learning[_smollm2]"
    )
    args = parser.parse_args()
    smollm2 = args.model == "smollm2"
    if args.workers < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--workers and --threads must be >= 1")
    if args.workers > 1 and not smollm2:
        parser.error("--workers applies to --model smollm2 (tiny mode: run seeds in separate processes)")
    if args.threads is None and args.workers > 1:
        args.threads = max(1, (os.cpu_count() or 1) // args.workers)
    args.steps = args.steps if args.steps is not None else (8 if smollm2 else 30)
    args.eval_every = args.eval_every if args.eval_every is not None else (0 if smollm2 else 10)
    args.out = args.out or Path("benchmarks/results/learning" + ("_smollm2" if smollm2 else ""))
    if smollm2:
        import learning_smollm2

        learning_smollm2.main(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        warm = warm_checkpoint(seed, args.out, args.override)
        for name in args.algorithms:
            result = run_algorithm(name, seed, warm, args.out, args)
            results.append(result)
            print(
                f"seed {seed} {name:10s} held-out EM {result['em_before']:.3f} -> {result['em_after']:.3f} "
                f"({result['rl_seconds']:.0f} s of RL steps)",
                flush=True,
            )
    add_paired_differences(results)
    rows = summarize(results, args.threshold, args.algorithms)
    header = list(rows[0])
    print()
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    print("\npaired difference to grpo, final greedy EM on the same held-out questions (bootstrap 95 % CI):")
    for run in results:
        if run.get("vs_grpo"):
            d = run["vs_grpo"]
            print(
                f"seed {run['seed']} {run['algorithm']:12s} {d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                f" on {d['questions']} questions"
            )
    runs_out = [{k: v for k, v in r.items() if k != "questions"} for r in results]
    (args.out / "learning.json").write_text(json.dumps({"summary": rows, "runs": runs_out}, indent=2))
    from tspo.analysis.plots import plot_runs

    plot_runs(
        [Path(r["run_dir"]) for r in results],
        args.out / "learning.png",
        keys=["eval/em", "outcome/mean", "category/near_miss", "groups/outcome_homogeneous"],
        labels=[f"{r['algorithm']} s{r['seed']}" for r in results],
    )
    print(f"\nwrote {args.out / 'learning.json'} and {args.out / 'learning.png'}")


if __name__ == "__main__":
    main()
