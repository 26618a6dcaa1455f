"""What computing a few-shot prompt's shared beginning once saves: generation and the update.

A few-shot prompt (instruction + worked examples) is the same for every question, and with SmolLM2 it
is most of each prompt's tokens. The HF engine prefills a call's common beginning once
(``tspo.rollout.engines.hf``), and the update scores it once per micro-batch
(``tspo.training.policy.response_scores(share_prefix=True)``). This script measures both against the
same code with the sharing turned off, in one run, alternating the two so a busy machine slows both:

- **generation**: greedy held-out rollouts of ``--questions`` questions (the trainer's evaluation);
  the outcomes must be identical with and without sharing;
- **update**: one forward + backward pass of the log-probabilities of a step's trajectories (the policy
  loss's cost); the log-probabilities must agree within 1e-4.

    python benchmarks/shared_prefix.py --preset quickstart --questions 32 --repeats 2
    python benchmarks/shared_prefix.py --override rollout.protocol.examples=2 rollout.max_turns=4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch

import tspo.rollout.engines.hf as hf_engine
from tspo.evaluation.runner import evaluate_policy
from tspo.training.config import load_train_config
from tspo.training.policy import common_prompt_prefix, response_scores
from tspo.training.trainer import Trainer
from tspo.trajectory import collate_trajectories


def timed(function: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def generation(trainer: Trainer, questions: int, share: bool) -> tuple[float, list[float]]:
    res, cfg = trainer.resources, trainer.config
    saved = hf_engine.MIN_SHARED_PREFIX
    hf_engine.MIN_SHARED_PREFIX = saved if share else 10**9
    try:
        seconds, result = timed(
            lambda: evaluate_policy(
                res.engine,
                res.tokenizer,
                res.retriever,
                res.eval_examples[:questions],
                cfg.rollout,
                greedy=True,
            )
        )
    finally:
        hf_engine.MIN_SHARED_PREFIX = saved
    return seconds, [s.outcome for s in result.scores]


def update_pass(trainer: Trainer, batch: Any, share: bool) -> tuple[float, torch.Tensor]:
    model = trainer.model
    model.zero_grad(set_to_none=True)

    def run() -> torch.Tensor:
        scores = response_scores(model, batch, positions=batch.loss_mask.bool(), share_prefix=share)
        (scores.logprobs * batch.loss_mask).sum().backward()
        return scores.logprobs.detach()

    seconds, logprobs = timed(run)
    model.zero_grad(set_to_none=True)
    return seconds, logprobs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--override", nargs="*", default=[])
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = load_train_config(
        args.preset,
        None,
        [
            f"data.eval_size={args.questions}",
            f"trainer.output_dir={tempfile.mkdtemp(prefix='tspo-shared-prefix-')}",
            "trainer.progress=false",
            *args.override,
        ],
    )
    trainer = Trainer(config)
    trainer.setup()
    collected = trainer.collect()
    batch = collate_trajectories(collected.trajectories, trainer.resources.pad_token_id)
    shared = common_prompt_prefix(batch)
    print(
        f"{args.preset} {' '.join(args.override)}: prompts {batch.prompt_mask.sum(1).float().mean():.0f} tokens "
        f"on average, {shared} of them shared; {batch.batch_size} trajectories, responses "
        f"{batch.response_mask.sum(1).float().mean():.0f} tokens",
        flush=True,
    )
    times: dict[str, dict[bool, list[float]]] = {
        "generation": {True: [], False: []},
        "update": {True: [], False: []},
    }
    outcomes: dict[bool, list[float]] = {}
    logprobs: dict[bool, torch.Tensor] = {}
    for _ in range(args.repeats):
        for share in (False, True):
            seconds, outcomes[share] = generation(trainer, args.questions, share)
            times["generation"][share].append(seconds)
            seconds, logprobs[share] = update_pass(trainer, batch, share)
            times["update"][share].append(seconds)
            print(
                f"  {'shared' if share else 'separate'}: generation {times['generation'][share][-1]:.1f} s, "
                f"update {seconds:.1f} s",
                flush=True,
            )
    if outcomes[True] != outcomes[False]:
        raise SystemExit("greedy outcomes differ with and without the shared prefill")
    diff = float((logprobs[True] - logprobs[False]).abs().max())
    if diff > 1e-4:
        raise SystemExit(f"log-probabilities differ by {diff:.2e} with and without the shared prefix")
    print("\n| pass | separate prompts (s) | shared beginning (s) | speed-up |\n|---|---|---|---|")
    for name, by_share in times.items():
        off, on = statistics.median(by_share[False]), statistics.median(by_share[True])
        print(f"| {name} | {off:.1f} | {on:.1f} | {off / on:.2f}x |")
    print(
        f"\ngreedy EM {statistics.fmean(outcomes[True]):.3f} on {args.questions} questions either way; "
        f"log-probabilities agree to {diff:.1e}"
    )


if __name__ == "__main__":
    main()
