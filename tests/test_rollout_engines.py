"""Generation engines: the shared contract (stop strings, EOS, limits), the HF engine on a real tiny
model (log-probabilities, seeding, left padding, early stop), and the vLLM engine where vLLM exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tspo.protocol import DEFAULT_PROTOCOL
from tspo.rollout import (
    GenerationOutput,
    SamplingParams,
    ScriptedEngine,
    StopScanner,
    build_tiny_model,
    load_policy,
    load_tokenizer,
    make_engine,
)
from tspo.rollout.engines.hf import HFEngine

STOP = DEFAULT_PROTOCOL.stop_strings
TEXTS = [
    "Acme Corporation was founded by Jane Doe in the city of Lorvik.",
    "Lorvik is a harbour city on the northern coast; its mayor is Tomas Brandt.",
    "Jane Doe is an engineer who studied at Kessel University.",
    "who founded acme corporation ? extra words after the stop",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        TEXTS, tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, num_heads=4, seed=3
    )


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    return load_policy(tiny_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A byte-level BPE tokenizer (the kind real models use): ``</search>`` spans several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator([*TEXTS, "search answer information think"], trainer)
    directory = tmp_path_factory.mktemp("bpe")
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|eos|>").save_pretrained(directory)
    return load_tokenizer(directory)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------- contract pieces
def test_sampling_params_validation():
    assert SamplingParams(temperature=0.0).greedy
    for bad in (
        {"temperature": -0.1},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"max_new_tokens": 0},
        {"stop": ("",)},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="logprobs"):
        GenerationOutput([1, 2], [0.0], "x", "stop")
    with pytest.raises(ValueError, match="finish_reason"):
        GenerationOutput([1], [0.0], "x", "eos")


def test_stop_scanner_with_multi_token_stop_strings(bpe_tokenizer):
    text = "<search> who founded acme </search> extra words after the stop"
    ids = encode(bpe_tokenizer, text)
    stop_ids = encode(bpe_tokenizer, "</search>")
    assert len(stop_ids) > 1, "the test needs a stop string that spans tokens"
    scanner = StopScanner(bpe_tokenizer, STOP, frozenset({bpe_tokenizer.eos_token_id}))
    keep, finish = scanner.cut(ids, limit=100)
    assert finish == "stop"
    assert bpe_tokenizer.decode(ids[:keep]).endswith("</search>")
    assert "</search>" not in bpe_tokenizer.decode(ids[: keep - 1])
    assert scanner.cut(ids, limit=3) == (3, "length")
    with_eos = [*encode(bpe_tokenizer, "<search> who"), bpe_tokenizer.eos_token_id, *ids]
    assert scanner.cut(with_eos, limit=100) == (len(encode(bpe_tokenizer, "<search> who")) + 1, "stop")
    # The instruction quotes the tags: only generated tokens are scanned, so a prompt never stops anything.
    assert scanner.cut(encode(bpe_tokenizer, "extra words"), limit=100) == (
        len(encode(bpe_tokenizer, "extra words")),
        "stop",
    )


def test_stop_scanner_agrees_with_brute_force(bpe_tokenizer):
    """The cheap scan finds exactly the shortest prefix whose decoded text holds a stop string."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    pieces = ["</", "search", ">", "</search>", "answer", "</answer>", "<", "/", " who", "s", "ch>", "x"]
    alphabet = sorted({i for piece in pieces for i in encode(bpe_tokenizer, piece)})
    scanner = StopScanner(bpe_tokenizer, STOP)

    def brute_force(ids: list[int]) -> int:
        for end in range(1, len(ids) + 1):
            if any(stop in bpe_tokenizer.decode(ids[:end]) for stop in STOP):
                return end
        return len(ids)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(alphabet), max_size=14))
    def check(ids: list[int]) -> None:
        assert scanner.cut(ids, limit=100)[0] == brute_force(ids)

    check()


def test_scripted_engine_follows_the_contract(bpe_tokenizer):
    engine = ScriptedEngine(bpe_tokenizer, ["<answer> jane doe </answer> and then rambling on", "x" * 50])
    prompt = encode(bpe_tokenizer, "who founded acme ?")
    (first,) = engine.generate([prompt], SamplingParams(max_new_tokens=64, stop=STOP))
    assert first.text.endswith("</answer>") and first.finish_reason == "stop"
    assert first.logprobs == [0.0] * len(first.token_ids)
    (second,) = engine.generate(
        [prompt + first.token_ids + [5, 6]], SamplingParams(max_new_tokens=4, stop=STOP)
    )
    assert second.finish_reason == "length" and len(second.token_ids) == 4
    with pytest.raises(IndexError, match="2 turns"):
        engine.generate([prompt + first.token_ids + [5, 6] + second.token_ids], SamplingParams(stop=STOP))


def test_make_engine(tiny, bpe_tokenizer):
    model, tokenizer = tiny
    assert isinstance(make_engine("hf", model=model, tokenizer=tokenizer), HFEngine)
    assert isinstance(make_engine("scripted", tokenizer=bpe_tokenizer, script=["x"]), ScriptedEngine)
    with pytest.raises(ValueError, match="unknown engine kind"):
        make_engine("tgi")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model= and tokenizer="):
        make_engine("hf", model=model)


# ---------------------------------------------------------------------- the HF engine
def teacher_forced_logprobs(
    model, prompt: list[int], generated: list[int], temperature: float
) -> torch.Tensor:
    """log p(generated[t] | prompt, generated[:t]) under softmax(logits / temperature), no padding."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    scaled = logits / temperature if temperature > 0 else logits
    return torch.log_softmax(scaled, dim=-1).gather(-1, torch.tensor(generated)[:, None]).squeeze(-1)


@pytest.mark.parametrize(("temperature", "top_p"), [(0.7, 1.0), (1.0, 0.5), (0.0, 1.0)])
def test_hf_logprobs_match_a_teacher_forced_pass(tiny, temperature, top_p):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    prompts = [encode(tokenizer, "who founded acme corporation ?"), encode(tokenizer, "lorvik")]
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=12, stop=STOP, seed=11)
    outputs = engine.generate(prompts, params)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert len(output.token_ids) >= 1
        expected = teacher_forced_logprobs(model, prompt, output.token_ids, temperature)
        # Logprobs are of the temperature-scaled distribution *before* top-p (not renormalized).
        torch.testing.assert_close(torch.tensor(output.logprobs), expected, atol=2e-4, rtol=1e-4)
        assert output.text == tokenizer.decode(output.token_ids, skip_special_tokens=True)


def test_hf_greedy_batch_equals_one_by_one(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    prompts = [
        encode(tokenizer, t) for t in ("jane doe studied at", "who founded acme corporation ? lorvik is")
    ]
    params = SamplingParams(temperature=0.0, max_new_tokens=10, stop=STOP)
    batched = engine.generate(prompts, params)
    single = [engine.generate([p], params)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]
    for b, s in zip(batched, single, strict=True):
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(s.logprobs), atol=2e-4, rtol=1e-4)


def test_hf_sampling_is_seeded_and_leaves_global_rng_alone(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    prompts = [encode(tokenizer, "jane doe")] * 3
    params = SamplingParams(temperature=1.0, max_new_tokens=16, seed=5)
    state = torch.get_rng_state()
    first = engine.generate(prompts, params)
    assert torch.equal(state, torch.get_rng_state())
    again = engine.generate(prompts, params)
    other = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16, seed=6))
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert [o.token_ids for o in first] != [o.token_ids for o in other]
    # Identical prompts in one batch still get different samples (a group must not collapse).
    assert len({tuple(o.token_ids) for o in first}) > 1


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 0.9)])
def test_hf_samples_what_model_generate_samples(tiny_dir, temperature, top_p):
    """Same seed, same tokens as ``model.generate`` (rows stopping at different steps included): the
    engine's own decoding loop draws from the same distribution with the same random stream."""
    model, tokenizer = load_policy(tiny_dir, device="cpu", dtype="float32")
    # A stop token that a random model emits now and then, so rows end at different steps.
    stop_word = "doe"
    stop_id = encode(tokenizer, stop_word)[0]
    with torch.no_grad():
        model.get_output_embeddings().weight[stop_id] *= 4.0
    words = ["who", "founded", "acme", "corporation", "?", "lorvik", "is", "a", "harbour", "city"]
    prompts = [encode(tokenizer, " ".join(words[: 2 + row])) for row in range(6)]
    params = SamplingParams(
        temperature=temperature, top_p=top_p, max_new_tokens=20, stop=(stop_word,), seed=3
    )
    outputs = HFEngine(model, tokenizer).generate(prompts, params)
    lengths = {len(o.token_ids) for o in outputs}
    assert len(lengths) > 1, "the rows must stop at different steps for this test to mean anything"
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.tensor(prompt), 1
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(3)
        reference = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=20,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            eos_token_id=[tokenizer.eos_token_id, stop_id],
            pad_token_id=tokenizer.pad_token_id,
        )[:, width:].tolist()
    scanner = StopScanner(tokenizer, (stop_word,), frozenset({tokenizer.eos_token_id}))
    for row, output in zip(reference, outputs, strict=True):
        assert row[: scanner.cut(row, 20)[0]] == output.token_ids


def _memorize(model, prompt: list[int], target: list[int], max_steps: int = 300) -> None:
    """Overfit ``model`` on ``target`` after ``prompt`` so that greedy decoding replays it (a known policy)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    batch = torch.tensor([prompt + target])
    labels = torch.tensor([[-100] * len(prompt) + target])
    model.train()
    for _ in range(max_steps):
        loss = model(input_ids=batch, labels=labels).loss
        if loss.item() < 0.02:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_hf_stops_at_the_stop_string_eos_and_limit(tiny_dir):
    model, tokenizer = load_policy(tiny_dir, device="cpu")
    prompt = encode(tokenizer, "who founded acme corporation ?")
    target = encode(tokenizer, "<search> acme corporation </search> extra words after the stop")
    _memorize(model, prompt, [*target, tokenizer.eos_token_id])
    engine = HFEngine(model, tokenizer)
    forward_calls = 0

    def count(*args, **kwargs):
        nonlocal forward_calls
        forward_calls += 1

    handle = model.register_forward_pre_hook(count)
    try:
        (stopped,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=30, stop=STOP))
    finally:
        handle.remove()
    assert stopped.text == "<search> acme corporation </search>" and stopped.finish_reason == "stop"
    assert stopped.token_ids == target[:4]
    assert forward_calls == len(stopped.token_ids), "generation must stop early, not run to the limit and cut"

    (free,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=30))
    assert free.token_ids == [*target, tokenizer.eos_token_id] and free.finish_reason == "stop"
    assert free.text == tokenizer.decode(target)
    (short,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=2, stop=STOP))
    assert short.token_ids == target[:2] and short.finish_reason == "length"


def test_hf_engine_restores_training_mode(tiny):
    model, tokenizer = tiny
    engine = HFEngine(model, tokenizer)
    model.train()
    try:
        engine.generate([encode(tokenizer, "lorvik")], SamplingParams(max_new_tokens=2))
        assert model.training
    finally:
        model.eval()
    assert engine.generate([], SamplingParams()) == []
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], SamplingParams())


# ---------------------------------------------------------------------- vLLM (GPU, optional)
@pytest.mark.vllm
@pytest.mark.gpu
def test_vllm_engine_matches_the_contract(tiny_dir):
    from tspo.rollout.engines.vllm import VLLMEngine

    tokenizer = load_tokenizer(tiny_dir)
    engine = VLLMEngine(str(tiny_dir), tokenizer=tokenizer, gpu_memory_utilization=0.2, max_model_len=512)
    prompts = [encode(tokenizer, "who founded acme corporation ?")] * 2
    outputs = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16, stop=STOP, seed=1))
    for output in outputs:
        assert len(output.token_ids) == len(output.logprobs) <= 16
        assert output.finish_reason in ("stop", "length")
        assert all(lp <= 0.0 for lp in output.logprobs)
