"""Time every advantage estimator on one synthetic CPU batch (default 16k trajectories x 4 turns x 512
tokens) and print a table plus JSON.

    python benchmarks/advantages.py                     # full size, torch's default thread count
    python benchmarks/advantages.py --threads 1 --out /tmp/adv.json

Each estimator is timed end to end through ``compute_advantages`` (input validation, group statistics,
turn advantages and the token broadcast), in ``--repeats`` rounds that call every estimator once, after
``--warmup`` untimed rounds; the table reports the median and minimum wall time, the median process CPU
time, and the ratios of medians to ``grpo`` measured in the same run.
Target: ``tspo`` adaptive within 3x of ``grpo`` and under 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from tspo.algorithms import AdvantageInputs, compute_advantages

ESTIMATORS: list[tuple[str, str, dict[str, Any]]] = [
    ("grpo", "grpo", {}),
    ("drgrpo", "drgrpo", {}),
    ("dspo", "dspo", {}),
    ("rloo", "rloo", {}),
    ("tspo traj", "tspo", {"mode": "traj"}),
    ("tspo turn", "tspo", {"mode": "turn"}),
    ("tspo legacy gamma=0.9", "tspo", {"mode": "legacy", "gamma": 0.9}),
    ("tspo adaptive", "tspo", {"mode": "adaptive"}),
]
TARGET_RATIO = 3.0
TARGET_MS = 100.0


def synthetic_batch(
    trajectories: int, max_turns: int, tokens: int, group_size: int, alpha: float, seed: int
) -> AdvantageInputs:
    """A batch shaped like real rollouts: 1..T turns each, 60% of each turn generated and the rest
    observation (the last turn all generated), right padding, FOLR rewards, shuffled group ids, and a mix
    of all-wrong, all-right and mixed groups."""
    gen = torch.Generator().manual_seed(seed)
    batch = trajectories
    num_groups = -(-batch // group_size)
    group_index = (torch.arange(batch) // group_size)[torch.randperm(batch, generator=gen)]
    success_rate = torch.rand(num_groups, generator=gen)
    success_rate[torch.rand(num_groups, generator=gen) < 0.4] = 0.0  # hard prompts: all-wrong groups
    outcome = (torch.rand(batch, generator=gen) < success_rate[group_index]).float()
    num_turns = torch.randint(1, max_turns + 1, (batch,), generator=gen)
    rows = torch.arange(batch)
    turn_rewards = torch.zeros(batch, max_turns)
    hit = torch.rand(batch, generator=gen) < 0.5
    first_hit = (torch.rand(batch, generator=gen) * num_turns).long()
    turn_rewards[rows[hit], first_hit[hit]] += alpha
    turn_rewards[rows, num_turns - 1] += outcome
    turn_mask = torch.arange(max_turns)[None, :] < num_turns[:, None]
    response_length = torch.randint(tokens // 2, tokens + 1, (batch,), generator=gen)
    position = torch.arange(tokens)[None, :].float()
    scaled = position * num_turns[:, None] / response_length[:, None]
    token_turn = scaled.floor().long()
    in_turn = scaled - token_turn
    real = position < response_length[:, None]
    generated = real & ((in_turn < 0.6) | (token_turn == num_turns[:, None] - 1))
    token_turn_index = torch.where(real, token_turn, -1)
    return AdvantageInputs(
        outcome=outcome,
        turn_rewards=turn_rewards,
        turn_mask=turn_mask,
        token_turn_index=token_turn_index,
        loss_mask=generated.float(),
        group_index=group_index,
        first_hit_turn=torch.where(hit, first_hit, -1),
        folr=hit.float() * alpha,
    )


def time_estimators(
    inputs: AdvantageInputs, estimators: list[tuple[str, str, dict[str, Any]]], warmup: int, repeats: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Wall-clock and process CPU times (ms) of each estimator, in rounds: every round calls every
    estimator once (in a rotating order), so that load from other processes hits all of them alike and
    their ratios stay meaningful on a shared machine. CPU time is the fairer absolute figure there."""
    for _ in range(warmup):
        for _, name, options in estimators:
            compute_advantages(name, inputs, **options)
    times: dict[str, tuple[list[float], list[float]]] = {label: ([], []) for label, _, _ in estimators}
    for round_number in range(repeats):
        shift = round_number % len(estimators)
        for label, name, options in estimators[shift:] + estimators[:shift]:
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            compute_advantages(name, inputs, **options)
            cpu_ms = (time.process_time() - cpu_start) * 1e3
            wall_ms = (time.perf_counter() - wall_start) * 1e3
            times[label][0].append(wall_ms)
            times[label][1].append(cpu_ms)
    return times


def write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
        json.dump(payload, handle, indent=2)
        temporary = handle.name
    os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trajectories", type=int, default=16384, help="batch size B (default 16384)")
    parser.add_argument("--turns", type=int, default=4, help="max turns T (default 4)")
    parser.add_argument("--tokens", type=int, default=512, help="response length L (default 512)")
    parser.add_argument("--group-size", type=int, default=8, help="rollouts per prompt (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per estimator (default 2)")
    parser.add_argument("--repeats", type=int, default=9, help="timed calls per estimator (default 9)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "advantages.json",
        help="JSON output path",
    )
    args = parser.parse_args(argv)
    for flag in ("trajectories", "turns", "tokens", "group_size", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    inputs = synthetic_batch(args.trajectories, args.turns, args.tokens, args.group_size, 0.3, args.seed)
    times = time_estimators(inputs, ESTIMATORS, args.warmup, args.repeats)
    results = []
    for label, name, options in ESTIMATORS:
        wall_ms, cpu_ms = times[label]
        results.append(
            {
                "estimator": label,
                "name": name,
                "options": options,
                "median_ms": statistics.median(wall_ms),
                "min_ms": min(wall_ms),
                "median_cpu_ms": statistics.median(cpu_ms),
                "runs_ms": wall_ms,
                "runs_cpu_ms": cpu_ms,
            }
        )
    # Floor: allocating and writing the (B, L) float32 output alone, which every estimator must do.
    floor_wall, floor_cpu = [], []
    for _ in range(args.repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        torch.empty(inputs.loss_mask.shape, dtype=torch.float32).fill_(0.0)
        floor_cpu.append((time.process_time() - cpu_start) * 1e3)
        floor_wall.append((time.perf_counter() - wall_start) * 1e3)
    floor = {"median_ms": statistics.median(floor_wall), "median_cpu_ms": statistics.median(floor_cpu)}
    grpo = results[0]
    for row in results:
        row["ratio_to_grpo"] = row["median_ms"] / grpo["median_ms"]
        row["cpu_ratio_to_grpo"] = row["median_cpu_ms"] / grpo["median_cpu_ms"]
    adaptive = next(row for row in results if row["estimator"] == "tspo adaptive")
    targets = {
        "tspo_adaptive_ms": adaptive["median_ms"],
        "tspo_adaptive_over_grpo": adaptive["ratio_to_grpo"],
        "tspo_adaptive_cpu_ms": adaptive["median_cpu_ms"],
        "tspo_adaptive_cpu_over_grpo": adaptive["cpu_ratio_to_grpo"],
        "ratio_target": TARGET_RATIO,
        "ms_target": TARGET_MS,
        "met": adaptive["ratio_to_grpo"] <= TARGET_RATIO and adaptive["median_ms"] < TARGET_MS,
    }
    config = {
        "trajectories": args.trajectories,
        "turns": args.turns,
        "tokens": args.tokens,
        "group_size": args.group_size,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
        "generated_tokens": int(inputs.loss_mask.sum()),
    }
    environment = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "malloc_env": {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")},
    }

    print(
        f"advantage estimators on CPU: B={args.trajectories} trajectories x T={args.turns} turns x "
        f"L={args.tokens} tokens, groups of {args.group_size}, {torch.get_num_threads()} thread(s), "
        f"median of {args.repeats} after {args.warmup} warm-up"
    )
    floor_label = "(floor: write (B, L) f32)"
    width = max(len(floor_label), *(len(row["estimator"]) for row in results))
    print(
        f"{'estimator':<{width}}  {'median ms':>9}  {'min ms':>7}  {'x grpo':>6}  {'cpu ms':>7}  {'cpu x grpo':>10}"
    )
    for row in results:
        print(
            f"{row['estimator']:<{width}}  {row['median_ms']:>9.1f}  {row['min_ms']:>7.1f}  "
            f"{row['ratio_to_grpo']:>6.2f}  {row['median_cpu_ms']:>7.1f}  {row['cpu_ratio_to_grpo']:>10.2f}"
        )
    print(
        f"{floor_label:<{width}}  {floor['median_ms']:>9.1f}  {'':>7}  {'':>6}  "
        f"{floor['median_cpu_ms']:>7.1f}"
    )
    verdict = "met" if targets["met"] else "NOT met"
    print(
        f"target (tspo adaptive <= {TARGET_RATIO:g}x grpo and < {TARGET_MS:g} ms): {verdict} "
        f"({adaptive['ratio_to_grpo']:.2f}x, {adaptive['median_ms']:.1f} ms)"
    )
    write_json_atomically(
        args.out,
        {
            "benchmark": "advantages",
            "config": config,
            "environment": environment,
            "results": results,
            "output_write_floor": floor,
            "targets": targets,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
