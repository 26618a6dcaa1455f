"""The SmolLM2 mode of ``benchmarks/learning.py``: a pretrained model whose mistakes include near misses.

SmolLM2-135M-Instruct with two worked examples in the prompt (the quickstart has one), on world
questions of 1, 2 and 3 hops (1-hop as the control: one search, the answer stage is all that can go
wrong). Per seed every algorithm starts from the same weights (the pretrained model; there is no
warm start), the same prompt order (``trainer.seed``) and is scored on the same held-out questions,
greedy and sampled (the rollout temperature, fixed seeds). The start is evaluated once per seed and
shared.

Each finished run leaves ``SEED/ALGORITHM/result.json`` in ``--out``; a rerun reads it back instead of
training again, so an interrupted table resumes where it stopped.
"""

from __future__ import annotations

import ctypes
import gc
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from learning_stats import mean_and_spread, paired_difference, plot_curves_with_band, pooled_difference

BASELINE = "grpo"
PRESET = "quickstart"
EVAL_BATCH = 32
#: The benchmark's settings on top of the quickstart preset (the user's ``--override`` come after).
#: max_turns 4: a 3-hop chain needs three searches and an answer. Two worked examples (a one-hop and a
#: two-hop question): with the quickstart's single one-hop example the model searches once and answers,
#: so multi-hop questions fail before retrieval and near misses are rare (6.5 % of held-out rollouts on
#: a 20/50/30 % hop mix); with two, 19.8 % are near misses and it searches 1.47 times per question
#: (96 held-out questions, measured 2026-12-03).
#: lr 1e-5 and groups of 8: at the quickstart's former 3e-5 with groups of 4, GRPO's first and only
#: update with a signal (one group of four) made the policy stop searching (searches per rollout
#: 1.06 -> 0.13 -> 0 within three steps; Adam keeps moving the weights on the following
#: zero-gradient steps) and held-out greedy EM fell 0.140 -> 0.000 (seed 0, 2026-12-03).
SETTINGS = [
    "data.world.hops=1:0.34,2:0.33,3:0.33",
    "rollout.max_turns=4",
    "rollout.max_context_tokens=1024",
    "rollout.protocol.examples=2",
    "data.eval_size=200",
    "trainer.prompts_per_step=4",
    "trainer.group_size=8",
    "trainer.micro_batch_size=16",
    "trainer.learning_rate=1e-5",
    "trainer.eval_before=false",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.plots=false",
    "trainer.progress=false",
]
#: Per-step training metrics kept in result.json (means over the run are reported).
TRAIN_KEYS = (
    "outcome/mean",
    "groups/all_wrong",
    "groups/all_right",
    "groups/zero_advantage",
    "category/near_miss",
    "category/complete_failure",
    "category/complete_success",
    "advantage/stage_level",
    "advantage/near_miss_retrieval_stage",
    "advantage/near_miss_answer_stage",
    "advantage/abs_mean",
    "actor/grad_norm",
    "data/prompts_drawn",
    "time/step",
)


def _config(seed: int, name: str, run_dir: Path, steps: int, overrides: Sequence[str]) -> Any:
    from tspo.training.config import load_train_config

    return load_train_config(
        PRESET,
        None,
        [
            *SETTINGS,
            *overrides,
            f"trainer.seed={seed}",
            f"trainer.steps={steps}",
            f"trainer.output_dir={run_dir}",
            f"algorithm.name={name}",
        ],
    )


def heldout(trainer: Any, greedy: bool, label: str = "") -> dict[str, Any]:
    """One rollout per held-out question: the summary, EM per hop count and EM per question id.

    The trainer's own evaluation rollouts (:func:`tspo.evaluation.heldout.heldout_records`: the same
    seeds per batch of questions), so the start and every algorithm draw from the same random stream.
    """
    from tspo.evaluation.heldout import heldout_records
    from tspo.evaluation.summary import summarize_records

    res, cfg = trainer.resources, trainer.config
    examples = res.eval_examples
    done = [0]

    def progress(count: int) -> None:
        done[0] += count
        decoding = "greedy" if greedy else "sampled"
        print(f"    {label} {decoding} evaluation: {done[0]}/{len(examples)}", flush=True)

    with trainer._generation_precision():
        records = heldout_records(
            res.engine,
            res.tokenizer,
            res.retriever,
            examples,
            cfg.rollout,
            greedy=greedy,
            metric=cfg.reward.metric,
            hit_mode=cfg.reward.hit_mode,
            seed=cfg.trainer.seed,
            batch_size=EVAL_BATCH,
            progress=progress,
        )
    hops = {str(ex.id): len(ex.metadata["chain"]) for ex in examples}
    by_hops: dict[int, list[float]] = defaultdict(list)
    for record in records:
        by_hops[hops[record["id"]]].append(record["scores"]["em"])
    return {
        "summary": summarize_records(records),
        "em_by_hops": {str(h): statistics.fmean(v) for h, v in sorted(by_hops.items())},
        "questions": {r["id"]: r["scores"]["em"] for r in records},
    }


def evaluate_both(trainer: Any, label: str) -> dict[str, Any]:
    return {"greedy": heldout(trainer, True, label), "sampled": heldout(trainer, False, label)}


def _new_trainer(config: Any, run_dir: Path) -> Any:
    from tspo.training.trainer import Trainer

    # A run directory without result.json is an interrupted run: start it again from nothing.
    trainer = Trainer(config, overwrite=run_dir.exists())
    trainer.setup()
    return trainer


def seed_start(seed: int, out: Path, args: Any) -> dict[str, Any]:
    """The shared start of ``seed``: held-out results of the pretrained policy (computed once)."""
    path = out / f"seed{seed}" / "start.json"
    if path.is_file():
        return json.loads(path.read_text())
    run_dir = out / f"seed{seed}" / "start"
    started = time.perf_counter()
    trainer = _new_trainer(_config(seed, BASELINE, run_dir, 0, args.override), run_dir)
    start = evaluate_both(trainer, f"seed {seed} start")
    start["eval_seconds"] = time.perf_counter() - started
    start["torch_threads"] = _torch_threads()
    path.write_text(json.dumps(start))
    del trainer
    gc.collect()
    return start


def run_algorithm(name: str, seed: int, out: Path, args: Any) -> dict[str, Any]:
    """Train ``name`` from the seed's start for ``args.steps`` steps and evaluate it (or read it back)."""
    run_dir = out / f"seed{seed}" / name
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    trainer = _new_trainer(_config(seed, name, run_dir, args.steps, args.override), run_dir)
    train: list[dict[str, float]] = []
    curve: list[dict[str, Any]] = []
    rl_seconds = eval_seconds = 0.0
    while trainer.step < args.steps:
        started = time.perf_counter()
        metrics = trainer.train_step()
        trainer.step += 1
        rl_seconds += time.perf_counter() - started
        train.append({k: float(metrics[k]) for k in TRAIN_KEYS if k in metrics})
        if args.eval_every and trainer.step % args.eval_every == 0 and trainer.step < args.steps:
            started = time.perf_counter()
            point = evaluate_both(trainer, f"seed {seed} {name} step {trainer.step}")
            eval_seconds += time.perf_counter() - started
            curve.append(_curve_point(trainer.step, point))
            metrics.update(_eval_metrics(point))
        trainer.logger.log(trainer.step, metrics)
        print(
            f"  seed {seed} {name} step {trainer.step}/{args.steps}: train EM {metrics['outcome/mean']:.3f}, "
            f"near misses {metrics.get('category/near_miss', 0.0):.2f}, {metrics['time/step']:.0f} s",
            flush=True,
        )
    started = time.perf_counter()
    final = evaluate_both(trainer, f"seed {seed} {name} final")
    eval_seconds += time.perf_counter() - started
    curve.append(_curve_point(trainer.step, final))
    trainer.logger.log(trainer.step, _eval_metrics(final))
    trainer.logger.close()
    result = {
        "algorithm": name,
        "seed": seed,
        "steps": args.steps,
        "train": train,
        "curve": curve,
        "final": final,
        "rl_seconds": rl_seconds,
        "eval_seconds": eval_seconds,
        "torch_threads": _torch_threads(),
    }
    result_path.write_text(json.dumps(result))
    del trainer
    gc.collect()
    return result


def _curve_point(step: int, point: dict[str, Any]) -> dict[str, Any]:
    return {"step": step, **{d: point[d]["summary"]["em"] for d in ("greedy", "sampled")}}


def _eval_metrics(point: dict[str, Any]) -> dict[str, float]:
    return {f"eval/{d}/{k}": v for d in ("greedy", "sampled") for k, v in point[d]["summary"].items()}


def _train_mean(run: dict[str, Any], key: str) -> float | None:
    values = [line[key] for line in run["train"] if key in line]
    return statistics.fmean(values) if values else None


def summarize(starts: dict[int, dict], runs: list[dict], algorithms: Sequence[str]) -> dict[str, Any]:
    """Per-seed rows and the mean over seeds, with paired differences to GRPO (greedy and sampled)."""
    by_key = {(r["algorithm"], r["seed"]): r for r in runs}
    seeds = sorted(starts)
    per_seed, rows = [], []
    for name in algorithms:
        mine = [by_key[(name, s)] for s in seeds if (name, s) in by_key]
        if not mine:
            continue
        row: dict[str, Any] = {"algorithm": name, "seeds": len(mine)}
        for decoding in ("greedy", "sampled"):
            finals = [r["final"][decoding]["summary"]["em"] for r in mine]
            row[f"{decoding}_em"], row[f"{decoding}_em_std"] = mean_and_spread(finals)
            pairs = [
                (
                    r["final"][decoding]["questions"],
                    by_key[(BASELINE, r["seed"])]["final"][decoding]["questions"],
                )
                for r in mine
                if (BASELINE, r["seed"]) in by_key and name != BASELINE
            ]
            row[f"{decoding}_vs_grpo"] = pooled_difference(pairs, seed=0) if pairs else None
        for hops in ("1", "2", "3"):
            values = [r["final"]["greedy"]["em_by_hops"].get(hops) for r in mine]
            row[f"greedy_em_{hops}hop"] = statistics.fmean(v for v in values if v is not None)
        row["steps_to_grpo_final"] = [_steps_to_reach(r, by_key.get((BASELINE, r["seed"]))) for r in mine]
        for key in TRAIN_KEYS:
            values = [v for v in (_train_mean(r, key) for r in mine) if v is not None]
            row[f"train/{key}"] = statistics.fmean(values) if values else None
        rows.append(row)
        for r in mine:
            line = {"algorithm": name, "seed": r["seed"]}
            for decoding in ("greedy", "sampled"):
                line[f"{decoding}_before"] = starts[r["seed"]][decoding]["summary"]["em"]
                line[f"{decoding}_after"] = r["final"][decoding]["summary"]["em"]
                baseline = by_key.get((BASELINE, r["seed"]))
                if baseline is not None and name != BASELINE:
                    line[f"{decoding}_vs_grpo"] = paired_difference(
                        r["final"][decoding]["questions"], baseline["final"][decoding]["questions"], r["seed"]
                    )
            per_seed.append(line)
    start_rows = {
        seed: {
            d: {k: starts[seed][d]["summary"][k] for k in ("em", "near_miss", "complete_failure", "searches")}
            | {"em_by_hops": starts[seed][d]["em_by_hops"]}
            for d in ("greedy", "sampled")
        }
        for seed in seeds
    }
    first_step_near_miss = [r["train"][0]["category/near_miss"] for r in runs if r["train"]]
    compute = sum(s.get("eval_seconds", 0.0) for s in starts.values()) + sum(
        r["rl_seconds"] + r["eval_seconds"] for r in runs
    )
    return {
        "compute_seconds": compute,
        "start": start_rows,
        "start_near_miss_sampled": statistics.fmean(s["sampled"]["near_miss"] for s in start_rows.values()),
        "first_step_near_miss_train": statistics.fmean(first_step_near_miss)
        if first_step_near_miss
        else None,
        "rows": rows,
        "per_seed": per_seed,
    }


def _steps_to_reach(run: dict[str, Any], baseline: dict[str, Any] | None) -> int | None:
    """First evaluated step at which ``run``'s greedy held-out EM reaches GRPO's final (same seed)."""
    if baseline is None:
        return None
    target = baseline["final"]["greedy"]["summary"]["em"]
    return next((p["step"] for p in run["curve"] if p["greedy"] >= target), None)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict) and "diff" in value:
        return f"{value['diff']:+.3f} [{value['low']:+.3f}, {value['high']:+.3f}]"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown(summary: dict[str, Any], wall_seconds: float, args: Any) -> str:
    lines = [
        "# Learning benchmark: SmolLM2-135M-Instruct, few-shot, world questions of 1-3 hops",
        "",
        f"Seeds {args.seeds}, {args.steps} RL steps per run, settings `{' '.join(SETTINGS + args.override)}` "
        f"on the `{PRESET}` preset. Time of the whole table: {summary['compute_seconds'] / 60:.1f} min of runs "
        f"and evaluations, summed over units ({wall_seconds / 60:.1f} min of wall time in the last invocation, "
        f"{getattr(args, 'workers', 1)} worker(s)).",
        "",
        f"Near misses at the start (answer retrieved, not given; held-out, sampled): "
        f"{summary['start_near_miss_sampled']:.3f}; in the first step's training rollouts: "
        f"{_fmt(summary['first_step_near_miss_train'])}.",
        "",
        "## Mean over seeds (paired difference to GRPO with a 95 % bootstrap interval over questions)",
        "",
        "| algorithm | greedy EM | sampled EM | greedy vs GRPO | sampled vs GRPO | greedy EM 1 / 2 / 3 hops |"
        " all-wrong groups | near misses (train) | stage-level share | near-miss answer-stage adv |"
        " prompts drawn per step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        hops = " / ".join(_fmt(row[f"greedy_em_{h}hop"]) for h in ("1", "2", "3"))
        lines.append(
            f"| {row['algorithm']} | {row['greedy_em']:.3f} ± {row['greedy_em_std']:.3f} "
            f"| {row['sampled_em']:.3f} ± {row['sampled_em_std']:.3f} | {_fmt(row['greedy_vs_grpo'])} "
            f"| {_fmt(row['sampled_vs_grpo'])} | {hops} | {_fmt(row['train/groups/all_wrong'])} "
            f"| {_fmt(row['train/category/near_miss'])} | {_fmt(row['train/advantage/stage_level'])} "
            f"| {_fmt(row['train/advantage/near_miss_answer_stage'])} "
            f"| {_fmt(row['train/data/prompts_drawn'])} |"
        )
    lines += [
        "",
        "## Per seed",
        "",
        "| seed | algorithm | greedy EM before -> after | sampled EM before -> after | greedy vs GRPO | sampled vs GRPO |",
        "|---|---|---|---|---|---|",
    ]
    for line in sorted(summary["per_seed"], key=lambda x: (x["seed"], x["algorithm"])):
        lines.append(
            f"| {line['seed']} | {line['algorithm']} | {line['greedy_before']:.3f} -> {line['greedy_after']:.3f} "
            f"| {line['sampled_before']:.3f} -> {line['sampled_after']:.3f} "
            f"| {_fmt(line.get('greedy_vs_grpo'))} | {_fmt(line.get('sampled_vs_grpo'))} |"
        )
    lines += ["", "## Steps to reach GRPO's final greedy EM (per seed; '-': not reached)", ""]
    for row in summary["rows"]:
        lines.append(f"- {row['algorithm']}: {', '.join(_fmt(s) for s in row['steps_to_grpo_final'])}")
    return "\n".join(lines) + "\n"


def unit_order(seeds: Sequence[int], algorithms: Sequence[str]) -> list[tuple[int, str | None]]:
    """The table's units, ``(seed, algorithm)`` with ``None`` for a seed's shared start, in run order.

    Seed by seed, the start and GRPO first: a table cut short still holds complete paired comparisons
    for the seeds it reached (a rerun with more algorithms or seeds reads the finished units back).
    Algorithms with a group filter (DSPO) come next: they are the longest runs (the filter redraws most
    groups here), so parallel workers do not end with one of them alone on such a run.
    """
    from tspo.algorithms import ALGORITHMS

    rest = [name for name in algorithms if name != BASELINE]
    rest.sort(key=lambda name: ALGORITHMS.get(name).group_filter == "none")
    return [(seed, name) for seed in seeds for name in (None, BASELINE, *rest)]


def run_unit(seed: int, name: str | None, out: Path, args: Any) -> dict[str, Any]:
    """One unit of the table (a seed's start, or one algorithm's run), read back if already on disk."""
    if name is None:
        start = seed_start(seed, out, args)
        print(
            f"seed {seed} start: greedy EM {start['greedy']['summary']['em']:.3f}, sampled EM "
            f"{start['sampled']['summary']['em']:.3f}, near misses (sampled) "
            f"{start['sampled']['summary']['near_miss']:.3f}, greedy EM by hops {start['greedy']['em_by_hops']}",
            flush=True,
        )
        return start
    run_started = time.perf_counter()
    run = run_algorithm(name, seed, out, args)
    print(
        f"seed {seed} {name:12s} greedy EM {run['final']['greedy']['summary']['em']:.3f}, sampled EM "
        f"{run['final']['sampled']['summary']['em']:.3f} ({time.perf_counter() - run_started:.0f} s here; "
        f"{run['rl_seconds']:.0f} s RL, {run['eval_seconds']:.0f} s eval)",
        flush=True,
    )
    return run


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    import torch

    torch.set_num_threads(threads)


def _init_worker(threads: int | None, parent: int) -> None:
    _exit_with_parent(parent)
    _set_threads(threads)


def _exit_with_parent(parent: int) -> None:
    """Have the kernel stop this worker when ``parent`` exits (Linux), so that a table killed with
    ``kill`` does not leave its workers training on; elsewhere Ctrl-C still reaches the whole group."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request was made
        os._exit(1)


def run_units(units: Sequence[tuple[int, str | None]], out: Path, args: Any) -> list[dict[str, Any]]:
    """Every unit's result, in ``units`` order: in this process, or in ``args.workers`` processes.

    Units are independent (each trains from the pretrained weights and writes its own result), so
    they run in parallel as they are: each worker is a fresh process per unit with ``args.threads``
    torch threads, and the results are the same as in one process. On 2 cores two workers of one
    thread each did 1.1-1.4x the work per hour of one process with two threads (2026-12-03: SmolLM2's
    decoding scales poorly across two threads, but two processes contend for memory bandwidth).
    """
    if args.workers <= 1:
        _set_threads(args.threads)
        return [run_unit(seed, name, out, args) for seed, name in units]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=args.workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(args.threads, os.getpid()),
        max_tasks_per_child=1,
    ) as pool:
        futures = [pool.submit(run_unit, seed, name, out, args) for seed, name in units]
        return [future.result() for future in futures]


def main(args: Any) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    units = unit_order(args.seeds, args.algorithms)
    results = run_units(units, out, args)
    starts = {seed: result for (seed, name), result in zip(units, results, strict=True) if name is None}
    runs = [result for (_, name), result in zip(units, results, strict=True) if name is not None]
    wall = time.perf_counter() - started
    summary = summarize(starts, runs, args.algorithms)
    summary["wall_seconds"] = wall
    summary["workers"] = args.workers
    summary["torch_threads"] = sorted({r.get("torch_threads") for r in [*starts.values(), *runs]} - {None})
    (out / "learning.json").write_text(json.dumps(summary, indent=2))
    text = markdown(summary, wall, args)
    (out / "learning.md").write_text(text)
    for decoding in ("greedy", "sampled"):
        curves: dict[str, list[list[tuple[int, float]]]] = defaultdict(list)
        for run in runs:
            start_em = starts[run["seed"]][decoding]["summary"]["em"]
            curves[run["algorithm"]].append(
                [(0, start_em)] + [(p["step"], p[decoding]) for p in run["curve"]]
            )
        plot_curves_with_band(
            curves,
            out / f"learning_{decoding}.png",
            ylabel=f"held-out EM ({decoding})",
            title=f"SmolLM2-135M, {len(args.seeds)} seeds: mean and min-max band",
        )
    print()
    print(text)
    print(
        f"wrote {out / 'learning.json'}, {out / 'learning.md'} and learning_{{greedy,sampled}}.png in {out}"
    )
