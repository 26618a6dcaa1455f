"""Rollout throughput of the vLLM engine beside the HF engine: SmolLM2-135M-Instruct, float32, CPU.

Both engines get the same prompts and settings, each in its own process (vLLM's CPU backend pins the
OpenMP threads of the process it runs in and disables ``torch.set_num_threads``; an HF run after it in
the same process would not be measured on the same terms). Per engine, ``--repeats`` rounds of:

- rollout: ``run_rollouts`` over the synthetic world's questions and a BM25 index (multi-turn, the
  HF engine with its KV cache across turns, vLLM with its prefix cache), temperature 1;
- single: one batched ``generate`` of the prompts, temperature 1, a fixed ``--max-new-tokens`` with no
  stop string (pure decoding throughput).

Reported: generated tokens per wall second of the generate calls (median over rounds) and per CPU
second of the process (``time.process_time``: every thread; steadier than wall time on a shared
machine), plus engine start-up time. Needs the environment ``scripts/vllm_venv.sh`` builds.

    DIR/bin/python benchmarks/vllm_engine.py                   # both engines, table + JSON
    DIR/bin/python benchmarks/vllm_engine.py --engine vllm --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "vllm_engine.json"


def timed(fn: Any) -> tuple[Any, float, float]:
    """(result, wall seconds, CPU seconds of this process) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_engine(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one engine in this process."""
    import torch

    from tspo.data.world import WorldConfig, generate_world
    from tspo.retrieval.bm25 import BM25Retriever
    from tspo.rollout import (
        RolloutConfig,
        RolloutTask,
        SamplingParams,
        build_prompt_ids,
        load_policy,
        run_rollouts,
    )

    torch.set_num_threads(args.threads)
    world = generate_world(WorldConfig(seed=args.seed, size="tiny"))
    retriever = BM25Retriever.build(world.docs(), threads=1)
    model, tokenizer = load_policy("smollm2", device="cpu", dtype="float32")
    start = time.perf_counter()
    if kind == "hf":
        from tspo.rollout.engines.hf import HFEngine

        engine: Any = HFEngine(model, tokenizer)
    else:
        from tspo.rollout.engines.vllm import VLLMEngine

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        engine = VLLMEngine(
            "smollm2", dtype="float32", max_model_len=4096, enforce_eager=not args.compile, seed=args.seed
        )
    startup = time.perf_counter() - start
    questions = world.test[: args.questions]
    tasks = [
        RolloutTask(question=q.question, golds=q.golden_answers, group_id=g, sample_id=f"{q.id}#{s}")
        for g, q in enumerate(questions)
        for s in range(args.group_size)
    ]
    config = RolloutConfig(
        max_turns=args.max_turns,
        max_new_tokens=args.max_new_tokens,
        max_observation_tokens=256,
        max_context_tokens=4096,
        temperature=1.0,
    )
    prompts = [build_prompt_ids(t.question, tokenizer) for t in tasks]
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=2, seed=0))  # warm-up
    rounds = []
    for index in range(args.repeats):
        seed = args.seed + index
        result, wall, cpu = timed(
            lambda s=seed: run_rollouts(engine, tokenizer, retriever, tasks, config, seed=s)
        )
        single_params = SamplingParams(max_new_tokens=args.max_new_tokens, seed=seed)
        # No stop strings: each row decodes to max_new_tokens or its EOS (tokens counted as produced).
        single, single_wall, single_cpu = timed(lambda p=single_params: engine.generate(prompts, p))
        single_tokens = sum(len(o.token_ids) for o in single)
        rounds.append(
            {
                "rollout_tokens": result.generated_tokens,
                "rollout_generate_seconds": result.timings["generate"],
                "rollout_seconds": wall,
                "rollout_cpu_seconds": cpu,
                "turns_per_trajectory": sum(t.num_turns for t in result.trajectories) / len(tasks),
                "single_tokens": single_tokens,
                "single_seconds": single_wall,
                "single_cpu_seconds": single_cpu,
            }
        )
        print(f"  {kind} round {index}: {rounds[-1]}", flush=True)

    def median(key: str, per: str) -> float:
        return statistics.median(r[key] / r[per] for r in rounds)

    return {
        "engine": kind,
        "startup_seconds": startup,
        "trajectories": len(tasks),
        "rounds": rounds,
        "rollout_tok_s": median("rollout_tokens", "rollout_generate_seconds"),
        "rollout_tok_cpu_s": median("rollout_tokens", "rollout_cpu_seconds"),
        "single_tok_s": median("single_tokens", "single_seconds"),
        "single_tok_cpu_s": median("single_tokens", "single_cpu_seconds"),
    }


def print_table(results: list[dict[str, Any]]) -> None:
    header = f"{'engine':<7}{'start s':>9}{'rollout tok/s':>15}{'tok/CPU-s':>11}{'single tok/s':>14}{'tok/CPU-s':>11}"
    print(header)
    for r in results:
        print(
            f"{r['engine']:<7}{r['startup_seconds']:>9.1f}{r['rollout_tok_s']:>15.1f}{r['rollout_tok_cpu_s']:>11.1f}"
            f"{r['single_tok_s']:>14.1f}{r['single_tok_cpu_s']:>11.1f}"
        )
    if len(results) == 2:
        hf, vl = results
        print(
            f"vllm / hf: rollout {vl['rollout_tok_s'] / hf['rollout_tok_s']:.2f}x "
            f"({vl['rollout_tok_cpu_s'] / hf['rollout_tok_cpu_s']:.2f}x per CPU second), "
            f"single {vl['single_tok_s'] / hf['single_tok_s']:.2f}x "
            f"({vl['single_tok_cpu_s'] / hf['single_tok_cpu_s']:.2f}x per CPU second)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engine", choices=("hf", "vllm", "both"), default="both")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-turns", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="measurement rounds (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of either engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="let vLLM torch.compile (default: eager)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)

    if args.engine != "both":
        results = [run_engine(args.engine, args)]
    else:
        results = []
        # Same thread count for both: vLLM otherwise drops to one thread unless OMP_NUM_THREADS is set.
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        for kind in ("hf", "vllm"):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / f"{kind}.json"
                command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
                command += ["--engine", kind, "--out", str(out)]
                print(f"benchmarking {kind} ...", flush=True)
                subprocess.run(command, env=env, check=True)
                results.append(json.loads(out.read_text())["results"][0])
    print_table(results)
    payload = {
        "benchmark": "vllm_engine",
        "model": "smollm2",
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    payload["results"] = results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
