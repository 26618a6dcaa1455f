"""Throughput of the multi-turn rollout loop against plain batched ``model.generate``.

For each model, in one process and interleaved over ``--repeats`` rounds:

- ``tiny``: a Qwen2 model built on a tiny synthetic world and warm-started for a few SFT steps so that it
  searches and answers, with Search-R1's zero-shot prompt;
- ``smollm2``: SmolLM2-135M-Instruct as ``tspo train`` runs it (the ``quickstart`` preset: its world, BM25
  index, worked example in the prompt, temperature, turn and token limits), on one step's worth of
  training questions (prompts per step x group size);

and for each:

- rollout: ``run_rollouts`` with the HF engine (KV cache kept across turns) and a BM25 index over the
  world's corpus; generated tokens per second over the whole loop, and its time split
  generate / retrieve / other;
- no-cache: the same loop and seed with ``HFEngine(kv_cache=False)`` (every turn prefills the whole
  context); the share of trajectories identical to the rollout's is reported (the cache must not
  change what is sampled);
- replay: the rollout's very batched calls (same left-padded inputs, ``max_new_tokens``, stop strings,
  seeds) through plain ``model.generate``, which is what the engine did per call before it kept a
  cache: the same tokens are sampled, so ``replay`` is the previous engine's generation time;
- plain: one ``model.generate`` over the same prompts with a fixed length equal to the mean number of
  tokens the rollout generated per trajectory (``min_new_tokens = max_new_tokens``): single-turn
  generation of the same volume, the upper bound a multi-turn loop is compared to;
- plain, same row lengths: one ``model.generate`` over the same prompts in which each row generates
  exactly as many tokens as its trajectory generated over all its turns (then EOS), so the batch runs
  until its longest row ends, as any batched generation of that length spread does. A reference that
  separates what multi-turn costs (turn boundaries, observations to prefill) from what the spread of
  lengths costs; the target stays against ``plain``.

Target: rollout throughput >= 0.8x plain generate on the same prompts and lengths.

    python benchmarks/rollout.py                       # tiny and smollm2
    python benchmarks/rollout.py --models tiny --repeats 5 --out /tmp/rollout.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from tspo.data.world import WorldConfig, generate_world
from tspo.protocol import format_observation
from tspo.retrieval.bm25 import BM25Retriever
from tspo.rollout import (
    GenerationOutput,
    RolloutConfig,
    RolloutTask,
    SamplingParams,
    build_prompt_ids,
    build_tiny_model,
    load_policy,
    run_rollouts,
)
from tspo.rollout.engines.hf import HFEngine

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "rollout.json"


@dataclass
class ModelSetting:
    name: str
    questions: int
    group_size: int
    max_new_tokens: int
    max_turns: int
    batch_size: int


SETTINGS = {
    "tiny": ModelSetting("tiny", questions=16, group_size=4, max_new_tokens=48, max_turns=2, batch_size=64),
    # 0: the quickstart preset's own value (one step's prompts x group size, its batch, turn and token
    # limits), so the case measures what `tspo train` runs.
    "smollm2": ModelSetting(
        "smollm2", questions=0, group_size=0, max_new_tokens=0, max_turns=0, batch_size=0
    ),
}


class RecordingEngine:
    """Passes calls to ``engine`` and records each one (for the replay baseline)."""

    def __init__(self, engine: HFEngine) -> None:
        self.engine = engine
        self.calls: list[tuple[list[list[int]], SamplingParams]] = []
        self.outputs: list[list[GenerationOutput]] = []

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        self.calls.append(([list(p) for p in prompts], params))
        self.outputs.append(self.engine.generate(prompts, params))
        return self.outputs[-1]

    def release_cache(self) -> None:
        self.engine.release_cache()


def left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt))
        mask[row, width - len(prompt) :] = 1
    return ids, mask


@torch.no_grad()
def timed_generate(
    model: Any, pad_token_id: int, prompts: Sequence[Sequence[int]], seed: int | None, **kwargs: Any
) -> tuple[list[list[int]], float]:
    """(generated ids (B, N), seconds) of one plain ``model.generate`` call."""
    ids, mask = left_pad(prompts, pad_token_id)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=pad_token_id, **kwargs)
    seconds = time.perf_counter() - start
    return out[:, ids.shape[1] :].tolist(), seconds


def stop_kwargs(tokenizer: Any, stop: tuple[str, ...], engine: HFEngine) -> dict[str, Any]:
    """How plain ``generate`` stops at ``stop``: as extra EOS ids when every stop string is one token
    (the tiny tokenizer; transformers' ``StopStringCriteria`` cannot handle a word-level vocabulary),
    else with ``stop_strings``."""
    ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in stop]
    if all(len(i) == 1 for i in ids):
        return {"eos_token_id": sorted(engine.eos_ids | {i[0] for i in ids})}
    return {"stop_strings": list(stop), "tokenizer": tokenizer}


def replay(model: Any, engine: HFEngine, recorder: RecordingEngine) -> tuple[float, float]:
    """(seconds, share of rows sampled identically) for the rollout's own engine calls through plain
    ``model.generate`` with the same seeds."""
    tokenizer = engine.tokenizer
    total, same, rows = 0.0, 0, 0
    for (prompts, params), outputs in zip(recorder.calls, recorder.outputs, strict=True):
        generated, seconds = timed_generate(
            model,
            engine.pad_token_id,
            prompts,
            params.seed,
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            temperature=params.temperature if not params.greedy else 1.0,
            top_p=params.top_p,
            top_k=0,
            **stop_kwargs(tokenizer, params.stop, engine),
        )
        total += seconds
        scanner = engine._scanner(params.stop)[0]
        for tokens, output in zip(generated, outputs, strict=True):
            keep, _ = scanner.cut(tokens, params.max_new_tokens)
            same += tokens[:keep] == output.token_ids
            rows += 1
    return total, same / max(1, rows)


def plain(
    model: Any, tokenizer: Any, prompts: list[list[int]], length: int, batch_size: int, seed: int
) -> float:
    """Seconds to generate exactly ``length`` tokens after each prompt, in batches of ``batch_size``."""
    total = 0.0
    for start in range(0, len(prompts), batch_size):
        _, seconds = timed_generate(
            model,
            tokenizer.pad_token_id,
            prompts[start : start + batch_size],
            seed + start,
            max_new_tokens=length,
            min_new_tokens=length,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
        )
        total += seconds
    return total


class RowLengths:
    """A logits processor that makes row ``i`` of a ``generate`` call emit exactly ``lengths[i]`` tokens and
    then ``eos_token_id`` (EOS is masked before that step; at it, every other token is)."""

    def __init__(self, lengths: Sequence[int], prompt_width: int, eos_token_id: int) -> None:
        self.lengths = torch.tensor(list(lengths), dtype=torch.long)
        self.prompt_width = prompt_width
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        lengths = self.lengths.to(scores.device)
        scores[lengths > step, self.eos_token_id] = float("-inf")
        at_end = lengths == step
        if bool(at_end.any()):
            eos_score = scores[at_end, self.eos_token_id].clone()
            scores[at_end] = float("-inf")
            scores[at_end, self.eos_token_id] = torch.where(
                torch.isfinite(eos_score), eos_score, torch.zeros_like(eos_score)
            )
        return scores


def plain_row_lengths(
    model: Any,
    tokenizer: Any,
    engine: HFEngine,
    prompts: list[list[int]],
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
) -> tuple[float, int]:
    """(seconds, tokens) to generate exactly ``lengths[i]`` tokens after prompt ``i`` (then EOS, not
    counted), in batches of ``batch_size`` through plain ``model.generate``."""
    from transformers import LogitsProcessorList

    eos = min(engine.eos_ids)
    total, tokens = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        batch_lengths = [max(1, n) for n in lengths[start : start + batch_size]]
        width = max(len(p) for p in batch)
        generated, seconds = timed_generate(
            model,
            tokenizer.pad_token_id,
            batch,
            seed + start,
            max_new_tokens=max(batch_lengths) + 1,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            eos_token_id=eos,
            logits_processor=LogitsProcessorList([RowLengths(batch_lengths, width, eos)]),
        )
        for row, n in zip(generated, batch_lengths, strict=True):
            if len(row) <= n or row[n] != eos or eos in row[:n]:
                raise RuntimeError(f"a row was meant to generate {n} tokens then EOS, got {row[: n + 1]}")
        total += seconds
        tokens += sum(batch_lengths)
    return total, tokens


def warm_start_tiny(
    model: Any, tokenizer: Any, world: Any, retriever: BM25Retriever, steps: int, seed: int
) -> float:
    """A few SFT steps on the world's intended search chains so the random tiny model uses the protocol.

    Returns the final loss. Demonstrations: ``<search> hop </search>`` per hop, the real observation,
    then ``<answer> gold </answer>``; the loss covers generated tokens only.
    """
    rng = torch.Generator().manual_seed(seed)
    demos: list[tuple[list[int], list[int]]] = []
    for question in world.train[:128]:
        ids = build_prompt_ids(question.question, tokenizer)
        labels = [-100] * len(ids)
        for hop in question.chain:
            call = tokenizer(f"<search> {hop} </search>", add_special_tokens=False)["input_ids"]
            obs = format_observation(retriever.search([hop], 3)[0])
            obs_ids = tokenizer(obs, add_special_tokens=False)["input_ids"]
            ids += call + obs_ids
            labels += call + [-100] * len(obs_ids)
        answer = tokenizer(f"<answer> {question.golden_answers[0]} </answer>", add_special_tokens=False)[
            "input_ids"
        ]
        ids += answer
        labels += answer
        demos.append((ids, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        picks = torch.randint(len(demos), (8,), generator=rng).tolist()
        width = max(len(demos[i][0]) for i in picks)
        ids = torch.full((8, width), tokenizer.pad_token_id)
        labels = torch.full((8, width), -100)
        mask = torch.zeros((8, width), dtype=torch.long)
        for row, i in enumerate(picks):
            n = len(demos[i][0])
            ids[row, :n], labels[row, :n], mask[row, :n] = (
                torch.tensor(demos[i][0]),
                torch.tensor(demos[i][1]),
                1,
            )
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def quickstart(workdir: Path, seed: int, setting: ModelSetting) -> tuple[Any, Any, Any, Any, list[Any]]:
    """(model, tokenizer, retriever, train config, training questions) of ``tspo train``'s default run.

    Built by the trainer itself on the ``quickstart`` preset, so the prompt (worked examples with real
    BM25 results), the world and every rollout limit are the ones users run.
    """
    from tspo.training.config import load_train_config
    from tspo.training.trainer import Trainer

    config = load_train_config(
        "quickstart",
        None,
        [
            f"trainer.output_dir={workdir / 'quickstart'}",
            f"trainer.seed={seed}",
            *([f"rollout.generation_batch_size={setting.batch_size}"] if setting.batch_size else []),
            "data.eval_size=8",
        ],
    )
    trainer = Trainer(config)
    trainer.setup()
    res = trainer.resources
    return res.model, res.tokenizer, res.retriever, config, res.rl_examples


@dataclass
class Round:
    rollout_s: float
    generate_s: float
    retrieve_s: float
    other_s: float
    nocache_s: float
    replay_s: float
    plain_s: float
    plain_rows_s: float
    generated_tokens: int
    nocache_tokens: int
    plain_tokens: int
    plain_rows_tokens: int
    prompt_tokens: int
    reused_tokens: int
    prefill_tokens: int
    identical_to_nocache: float


@dataclass
class ModelReport:
    model: str
    setting: dict[str, Any]
    trajectories: int
    turns_per_trajectory: float
    searches_per_trajectory: float
    counters: dict[str, int]
    rounds: list[Round] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float]:
        def med(values: list[float]) -> float:
            return statistics.median(values)

        def vs_plain(tokens: int, seconds: float, r: Round) -> float:
            return (tokens / seconds) / (r.plain_tokens / r.plain_s)

        return {
            "rollout_tokens_per_s": med([r.generated_tokens / r.rollout_s for r in self.rounds]),
            "nocache_tokens_per_s": med([r.nocache_tokens / r.nocache_s for r in self.rounds]),
            "replay_tokens_per_s": med([r.generated_tokens / r.replay_s for r in self.rounds]),
            "plain_tokens_per_s": med([r.plain_tokens / r.plain_s for r in self.rounds]),
            "rollout_vs_plain": med([vs_plain(r.generated_tokens, r.rollout_s, r) for r in self.rounds]),
            "nocache_vs_plain": med([vs_plain(r.nocache_tokens, r.nocache_s, r) for r in self.rounds]),
            "replay_vs_plain": med([vs_plain(r.generated_tokens, r.replay_s, r) for r in self.rounds]),
            "plain_rows_tokens_per_s": med([r.plain_rows_tokens / r.plain_rows_s for r in self.rounds]),
            "rollout_vs_plain_rows": med(
                [
                    (r.generated_tokens / r.rollout_s) / (r.plain_rows_tokens / r.plain_rows_s)
                    for r in self.rounds
                ]
            ),
            "rollout_vs_replay": med([r.replay_s / r.rollout_s for r in self.rounds]),
            "share_generate": med([r.generate_s / r.rollout_s for r in self.rounds]),
            "share_retrieve": med([r.retrieve_s / r.rollout_s for r in self.rounds]),
            "share_other": med([r.other_s / r.rollout_s for r in self.rounds]),
            "reused_share_of_context": med([r.reused_tokens / r.prompt_tokens for r in self.rounds]),
            "identical_to_nocache": min(r.identical_to_nocache for r in self.rounds),
            "rollout_seconds": med([r.rollout_s for r in self.rounds]),
        }


def same_responses(first: Sequence[Any], second: Sequence[Any]) -> float:
    """Share of trajectories whose response ids are identical in two runs."""
    same = sum(a.response_ids == b.response_ids for a, b in zip(first, second, strict=True))
    return same / max(1, len(first))


def bench_model(
    name: str, args: argparse.Namespace, world: Any, retriever: BM25Retriever, workdir: Path
) -> ModelReport:
    overrides = {
        "questions": args.questions,
        "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens,
    }
    setting = replace(SETTINGS[name], **{k: v for k, v in overrides.items() if v is not None})
    notes: dict[str, Any] = {}
    start = time.perf_counter()
    if name == "tiny":
        texts = [p.contents for p in world.passages] + [q.question for q in world.questions]
        model_dir = build_tiny_model(
            texts, workdir / "tiny", hidden_size=128, num_layers=2, num_heads=4, seed=args.seed
        )
        model, tokenizer = load_policy(model_dir, device="cpu", dtype="float32")
        notes["warm_start_steps"] = args.tiny_warmup_steps
        notes["warm_start_loss"] = warm_start_tiny(
            model, tokenizer, world, retriever, args.tiny_warmup_steps, args.seed
        )
        questions = [(q.question, q.golden_answers) for q in world.test[: setting.questions]]
        config = RolloutConfig(
            max_turns=setting.max_turns,
            max_new_tokens=setting.max_new_tokens,
            max_observation_tokens=256,
            generation_batch_size=setting.batch_size,
            temperature=1.0,
        )
    else:
        model, tokenizer, retriever, train_config, examples = quickstart(workdir, args.seed, setting)
        config = train_config.rollout
        if args.max_new_tokens is not None:
            config = replace(config, max_new_tokens=args.max_new_tokens)
        setting = replace(
            setting,
            questions=setting.questions or train_config.trainer.prompts_per_step,
            group_size=setting.group_size or train_config.trainer.group_size,
            batch_size=config.generation_batch_size,
            max_new_tokens=config.max_new_tokens,
            max_turns=config.max_turns,
        )
        questions = [(ex.question, ex.golds) for ex in examples[: setting.questions]]
        notes["prompt"] = "quickstart preset: worked example(s) in the prompt, no chat template"
    notes["load_seconds"] = time.perf_counter() - start
    notes["parameters"] = int(sum(p.numel() for p in model.parameters()))
    notes["temperature"] = config.temperature
    model.eval()

    tasks = [
        RolloutTask(question=question, golds=golds, group_id=g, sample_id=f"q{g}#{s}")
        for g, (question, golds) in enumerate(questions)
        for s in range(setting.group_size)
    ]
    engine = HFEngine(model, tokenizer, kv_cache=True)
    nocache = HFEngine(model, tokenizer, kv_cache=False)
    prompts = [build_prompt_ids(t.question, tokenizer, config.protocol) for t in tasks]
    notes["prompt_tokens"] = statistics.fmean(len(p) for p in prompts)
    for warm in (engine, nocache):
        warm.generate(
            prompts[:2], SamplingParams(max_new_tokens=2, stop=config.protocol.stop_strings, seed=0)
        )
    report = ModelReport(name, asdict(setting), len(tasks), 0.0, 0.0, {}, notes=notes)
    for round_index in range(args.repeats):
        seed = args.seed + round_index
        recorder = RecordingEngine(engine)
        before = replace(engine.stats)
        result = run_rollouts(recorder, tokenizer, retriever, tasks, config, seed=seed)
        after = engine.stats
        baseline = run_rollouts(nocache, tokenizer, retriever, tasks, config, seed=seed)
        identical = same_responses(result.trajectories, baseline.trajectories)
        replay_s, replay_identical = replay(model, engine, recorder)
        notes.setdefault("replay_identical_rows", []).append(replay_identical)
        length = max(1, round(result.generated_tokens / len(tasks)))
        plain_s = plain(model, tokenizer, prompts, length, setting.batch_size, seed)
        row_lengths = [t.num_generated_tokens for t in result.trajectories]
        plain_rows_s, plain_rows_tokens = plain_row_lengths(
            model, tokenizer, engine, prompts, row_lengths, setting.batch_size, seed
        )
        report.rounds.append(
            Round(
                rollout_s=result.seconds,
                generate_s=result.timings["generate"],
                retrieve_s=result.timings["retrieve"],
                other_s=result.timings["other"],
                nocache_s=baseline.seconds,
                replay_s=replay_s,
                plain_s=plain_s,
                plain_rows_s=plain_rows_s,
                generated_tokens=result.generated_tokens,
                nocache_tokens=baseline.generated_tokens,
                plain_tokens=length * len(tasks),
                plain_rows_tokens=plain_rows_tokens,
                prompt_tokens=after.prompt_tokens - before.prompt_tokens,
                reused_tokens=after.reused_tokens - before.reused_tokens,
                prefill_tokens=after.prefill_tokens - before.prefill_tokens,
                identical_to_nocache=identical,
            )
        )
        report.counters = result.counters
        report.turns_per_trajectory = sum(t.num_turns for t in result.trajectories) / len(tasks)
        report.searches_per_trajectory = sum(t.num_searches for t in result.trajectories) / len(tasks)
        print(
            f"  [{name} round {round_index + 1}/{args.repeats}] rollout {result.seconds:.2f}s "
            f"no-cache {baseline.seconds:.2f}s replay {replay_s:.2f}s plain {plain_s:.2f}s "
            f"plain-rows {plain_rows_s:.2f}s, "
            f"{result.generated_tokens} tokens, {identical:.0%} trajectories identical without the cache",
            flush=True,
        )
    return report


def print_table(reports: list[ModelReport]) -> None:
    header = (
        f"{'model':8} {'trajs':>5} {'turns':>5} {'srch':>5} {'rollout':>8} {'no-cache':>8} {'replay':>8} "
        f"{'plain':>8} {'vs plain':>8} {'no-cache':>8} {'replay':>8} {'rows':>8} {'vs rows':>7} {'reused':>6} "
        f"{'gen%':>5} {'ret%':>5} {'oth%':>5}"
    )
    print(header)
    print("-" * len(header))
    for report in reports:
        s = report.summary()
        print(
            f"{report.model:8} {report.trajectories:5d} {report.turns_per_trajectory:5.2f} "
            f"{report.searches_per_trajectory:5.2f} {s['rollout_tokens_per_s']:8.1f} "
            f"{s['nocache_tokens_per_s']:8.1f} {s['replay_tokens_per_s']:8.1f} {s['plain_tokens_per_s']:8.1f} "
            f"{s['rollout_vs_plain']:8.2f} {s['nocache_vs_plain']:8.2f} {s['replay_vs_plain']:8.2f} "
            f"{s['plain_rows_tokens_per_s']:8.1f} {s['rollout_vs_plain_rows']:7.2f} "
            f"{100 * s['reused_share_of_context']:5.0f}% {100 * s['share_generate']:5.1f} "
            f"{100 * s['share_retrieve']:5.1f} {100 * s['share_other']:5.1f}"
        )
    print(
        "(generated tokens per second; rollout: the loop with the KV cache across turns; no-cache: the same "
        "engine with kv_cache=False; replay: the rollout's calls through plain model.generate (the previous "
        "engine); plain: one single-turn generate of the same volume. 'vs plain' columns: throughput / plain "
        "throughput, target >= 0.80 for the rollout. rows: single-turn generate with each row as long as its "
        "trajectory's generated tokens (a reference, not the target); vs rows: the rollout's throughput / rows'. "
        "reused: share of context tokens served from the cache)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", choices=sorted(SETTINGS), default=["tiny", "smollm2"])
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved measurement rounds (median reported)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tiny-warmup-steps", type=int, default=60, help="SFT steps before timing the tiny model"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--questions", type=int, default=None, help="override: questions per model")
    parser.add_argument("--group-size", type=int, default=None, help="override: rollouts per question")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override: tokens per generation")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    world = generate_world(WorldConfig(seed=args.seed, size="tiny"))
    retriever = BM25Retriever.build(world.docs(), threads=1)
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            print(f"benchmarking {name} ...", flush=True)
            reports.append(bench_model(name, args, world, retriever, Path(tmp)))
    print_table(reports)

    payload = {
        "benchmark": "rollout",
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "models": [{**asdict(r), "summary": r.summary()} for r in reports],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".rollout-", suffix=".json", dir=args.out.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
    os.replace(tmp_name, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
