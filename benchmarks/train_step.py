"""Step-time breakdown of the local trainer: generate / retrieve / score / update / other, tokens per second.

Runs a few RL steps of each preset (no evaluation, no checkpoints) and reports, per step, the mean
seconds of each phase and its share of the step. "other" is everything but model compute and retrieval
(data drawing, collation, bookkeeping); the target is under 10 % of the step.

Each preset runs once per ``--bf16`` setting (default ``off`` then ``on``: float32 and bf16 autocast,
forced even where the processor has no hardware bf16, so both splits are measured in one run). The
table says whether this CPU has hardware bf16 (``avx512_bf16`` / ``amx_bf16``), which is what
``trainer.bf16=auto`` decides on.

It also measures the **memory of one log-probability pass** (no gradient: the old-policy and reference
passes) on a synthetic batch: ``--memory-rows`` rows of ``--memory-tokens`` tokens (the first
``--memory-prompt`` the prompt, the rest a response scored at every token) under a tiny-width Qwen2 model
with a ``--memory-vocab`` vocabulary (Qwen2.5's 151,936 by default), built from a config with seeded
random weights. Each variant runs in a fresh process; its peak is the process's maximum resident set
(``getrusage``) minus its resident set just before the pass:

- ``full_logits``: the naive definition, reimplemented here as the baseline: full-vocabulary logits of the
  whole sequence (B, S, V), then a float32 ``log_softmax`` and a gather;
- ``library``: :func:`tspo.training.policy.response_scores` (response positions only, chunked
  ``logit - logsumexp``).

A variant whose estimated need exceeds ``--memory-budget-gb`` (default 60 % of the available memory)
is skipped at that size and said so. Values: the largest |difference| of the log-probabilities of the
two variants at each size where both ran.

    python benchmarks/train_step.py --presets tiny quickstart --steps 4
    python benchmarks/train_step.py --presets quickstart --steps 3 --bf16 off on
    python benchmarks/train_step.py --presets --memory-rows 1 2 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHASES = ("generate", "retrieve", "score", "update", "other")
MEMORY_VARIANTS = ("full_logits", "library")


def measure(preset: str, steps: int, out: Path, overrides: list[str], bf16: str) -> dict:
    from tspo.training.config import load_train_config
    from tspo.training.metrics import read_metrics
    from tspo.training.trainer import Trainer

    run_dir = out / f"{preset}-bf16-{bf16}"
    config = load_train_config(
        preset,
        None,
        [
            f"trainer.steps={steps}",
            f"trainer.output_dir={run_dir}",
            "trainer.eval_before=false",
            "data.eval_size=0",
            "trainer.save_every=0",
            "trainer.plots=false",
            "trainer.progress=false",
            "warmstart.steps=0",
            # Quoted: YAML reads a bare on / off as a boolean, which the config refuses.
            f"trainer.bf16='{bf16}'",
            *overrides,
        ],
    )
    Trainer(config, overwrite=True).train()  # a rerun replaces its own earlier run
    # The first step pays one-off costs (lazy imports, allocator warm-up): report the rest.
    lines = [line for line in read_metrics(run_dir) if "time/step" in line][1:]
    row: dict = {"preset": preset, "bf16": bf16, "steps": len(lines)}
    step_time = statistics.fmean(line["time/step"] for line in lines)
    row["step_s"] = step_time
    for phase in PHASES:
        seconds = statistics.fmean(line[f"time/{phase}"] for line in lines)
        row[f"{phase}_s"] = seconds
        row[f"{phase}_share"] = seconds / step_time
    row["tokens_per_s"] = statistics.fmean(line["perf/tokens_per_second"] for line in lines)
    return row


# --------------------------------------------------------------------------- log-prob pass memory
def synthetic_model_and_batch(rows: int, tokens: int, prompt: int, vocab: int):
    """A tiny-width Qwen2 model with a ``vocab``-word vocabulary (seeded, no download) and a batch of
    ``rows`` x ``tokens`` random token ids: ``prompt`` prompt tokens, the rest generated response."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tspo.trajectory import TrajectoryBatch

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=tokens,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (rows, tokens), generator=generator)
    length = tokens - prompt
    batch = TrajectoryBatch(
        prompt_ids=ids[:, :prompt],
        prompt_mask=torch.ones(rows, prompt, dtype=torch.long),
        response_ids=ids[:, prompt:],
        response_mask=torch.ones(rows, length, dtype=torch.long),
        loss_mask=torch.ones(rows, length),
        token_turn_index=torch.zeros(rows, length, dtype=torch.long),
        sample_logprobs=torch.zeros(rows, length),
        turn_mask=torch.ones(rows, 1, dtype=torch.bool),
    )
    return model, batch


def full_logits_logprobs(model, batch):
    """(B, L) log-probabilities the naive way: (B, S, V) logits, a float32 log-softmax, a gather."""
    from tspo.training.policy import position_ids_from_mask

    logits = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids_from_mask(batch.attention_mask),
        use_cache=False,
    ).logits.float()
    prompt, length = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    logp = logits[:, prompt - 1 : prompt - 1 + length].log_softmax(dim=-1)
    return logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(
    variant: str, rows: int, tokens: int, prompt: int, vocab: int, grad: bool, out: Path
) -> None:
    """One variant's pass in this (fresh) process; writes its peak and its log-probabilities to ``out``.
    With ``grad`` the pass is a forward and a backward of the summed log-probabilities (the policy's)."""
    import torch

    from tspo.training.policy import response_scores

    model, batch = synthetic_model_and_batch(rows, tokens, prompt, vocab)
    before = _resident_bytes()
    start = time.perf_counter()
    with torch.set_grad_enabled(grad):
        if variant == "full_logits":
            logprobs = full_logits_logprobs(model, batch)
        else:
            logprobs = response_scores(model, batch, positions=batch.loss_mask.bool()).logprobs
        if grad:
            logprobs.sum().backward()
    logprobs = logprobs.detach()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    torch.save(logprobs, out.with_suffix(".pt"))
    out.write_text(json.dumps({"rss_before": before, "peak_rss": peak, "seconds": seconds}))


def _estimated_bytes(variant: str, rows: int, tokens: int, prompt: int, vocab: int, grad: bool) -> int:
    """Rough need of a pass: the naive one holds (B, S, V) logits plus a (B, L, V) log-softmax, and with
    gradients about as much again for their gradients."""
    if variant == "full_logits":
        return 4 * rows * vocab * (tokens + tokens - prompt) * (2 if grad else 1)
    from tspo.training.policy import LOGIT_CHUNK_ELEMENTS

    return 4 * 4 * LOGIT_CHUNK_ELEMENTS + 4 * rows * tokens * 64 * 8


def _available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def measure_memory(
    row_counts: list[int], tokens: int, prompt: int, vocab: int, budget: int, grad: bool = False
) -> list[dict]:
    import torch

    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in row_counts:
            logprobs = {}
            for variant in MEMORY_VARIANTS:
                row: dict = {
                    "variant": variant,
                    "rows": rows,
                    "tokens": tokens,
                    "prompt": prompt,
                    "vocab": vocab,
                    "grad": grad,
                }
                need = _estimated_bytes(variant, rows, tokens, prompt, vocab, grad)
                if need > budget:
                    row["skipped"] = f"needs about {need / 2**30:.1f} GiB, budget {budget / 2**30:.1f} GiB"
                    results.append(row)
                    continue
                out = Path(tmp) / f"{variant}-{rows}.json"
                command = [
                    sys.executable,
                    __file__,
                    "--memory-child",
                    variant,
                    str(rows),
                    str(tokens),
                    str(prompt),
                    str(vocab),
                    str(int(grad)),
                    str(out),
                ]
                subprocess.run(command, check=True)
                measured = json.loads(out.read_text())
                row["peak_mib"] = (measured["peak_rss"] - measured["rss_before"]) / 2**20
                row["peak_rss_mib"] = measured["peak_rss"] / 2**20
                row["seconds"] = measured["seconds"]
                logprobs[variant] = torch.load(out.with_suffix(".pt"))
                results.append(row)
            if len(logprobs) == len(MEMORY_VARIANTS):
                difference = float((logprobs["library"] - logprobs["full_logits"]).abs().max())
                for row in results[-len(MEMORY_VARIANTS) :]:
                    row["max_abs_difference"] = difference
    return results


def print_memory(rows: list[dict]) -> None:
    mode = "forward + backward" if rows[0]["grad"] else "no grad"
    print(
        f"\nlog-prob pass memory ({mode}; tiny-width Qwen2, vocabulary {rows[0]['vocab']:,}; peak RSS above "
        "the RSS before the pass)"
    )
    print(f"{'variant':12s} {'batch':>12s} {'peak MiB':>10s} {'seconds':>8s} {'max |diff|':>11s}")
    for row in rows:
        batch = f"{row['rows']} x {row['tokens']}"
        if "skipped" in row:
            print(f"{row['variant']:12s} {batch:>12s} skipped: {row['skipped']}")
            continue
        difference = f"{row['max_abs_difference']:.2e}" if "max_abs_difference" in row else "-"
        print(
            f"{row['variant']:12s} {batch:>12s} {row['peak_mib']:10.1f} {row['seconds']:8.2f} {difference:>11s}"
        )
    by_size: dict[int, dict[str, dict]] = {}
    for row in rows:
        if "peak_mib" in row:
            by_size.setdefault(row["rows"], {})[row["variant"]] = row
    for size, variants in by_size.items():
        if len(variants) == len(MEMORY_VARIANTS):
            ratio = variants["full_logits"]["peak_mib"] / max(variants["library"]["peak_mib"], 1e-9)
            print(f"{size} x {variants['library']['tokens']}: full_logits / library peak = {ratio:.1f}x")


def main() -> None:
    from tspo.training.policy import cpu_bf16_features

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="*", default=["tiny", "quickstart"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--bf16",
        nargs="+",
        choices=["off", "on", "auto"],
        default=["off", "on"],
        help="trainer.bf16 settings",
    )
    parser.add_argument("--override", nargs="*", default=[])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_step"))
    parser.add_argument(
        "--memory-rows", nargs="*", type=int, default=[8], help="batch rows of the log-prob memory pass"
    )
    parser.add_argument("--memory-tokens", type=int, default=2048, help="tokens per row (prompt + response)")
    parser.add_argument("--memory-prompt", type=int, default=512, help="prompt tokens per row")
    parser.add_argument("--memory-vocab", type=int, default=151_936, help="vocabulary size")
    parser.add_argument(
        "--memory-budget-gb",
        type=float,
        default=None,
        help="skip a pass estimated above this (default: 60%% of free)",
    )
    parser.add_argument(
        "--memory-grad", action="store_true", help="measure the pass with gradients (forward + backward)"
    )
    parser.add_argument("--memory-child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        variant, rows_, tokens, prompt, vocab, grad, out = args.memory_child
        memory_child(variant, int(rows_), int(tokens), int(prompt), int(vocab), grad == "1", Path(out))
        return
    features = cpu_bf16_features()
    print(f"CPU hardware bf16: {', '.join(features) if features else 'none (bf16 autocast is emulated)'}")
    budget = int(args.memory_budget_gb * 2**30) if args.memory_budget_gb else int(0.6 * _available_bytes())
    memory = (
        measure_memory(
            args.memory_rows,
            args.memory_tokens,
            args.memory_prompt,
            args.memory_vocab,
            budget,
            grad=args.memory_grad,
        )
        if args.memory_rows
        else []
    )
    rows = [
        measure(preset, args.steps, args.out, args.override, bf16)
        for preset in args.presets
        for bf16 in args.bf16
    ]
    if rows:
        print_steps(rows, args.presets)
    if memory:
        print_memory(memory)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"cpu_bf16_features": list(features), "rows": rows, "logprob_memory": memory}
    (args.out / "train_step.json").write_text(json.dumps(payload, indent=2))
    print(f"\nwrote {args.out / 'train_step.json'}")


def print_steps(rows: list[dict], presets: list[str]) -> None:
    print(
        f"{'preset':12s} {'bf16':>4s} {'step s':>8s} "
        + " ".join(f"{p:>14s}" for p in PHASES)
        + f" {'tok/s':>8s}"
    )
    for row in rows:
        phases = " ".join(f"{row[f'{p}_s']:7.2f} ({row[f'{p}_share']:4.0%})" for p in PHASES)
        print(
            f"{row['preset']:12s} {row['bf16']:>4s} {row['step_s']:8.2f} {phases} {row['tokens_per_s']:8.1f}"
        )
    for preset in presets:
        by_setting = {row["bf16"]: row for row in rows if row["preset"] == preset}
        if "off" in by_setting and "on" in by_setting:
            off, on = by_setting["off"], by_setting["on"]
            print(
                f"{preset}: bf16 on / off: step {on['step_s'] / off['step_s']:.2f}x, "
                f"update {on['update_s'] / off['update_s']:.2f}x, generate {on['generate_s'] / off['generate_s']:.2f}x"
            )


if __name__ == "__main__":
    main()
