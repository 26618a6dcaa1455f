"""bf16 autocast: which processors turn it on (capabilities injected), what the trainer logs, and the
numerics of the log-probabilities computed under it (float32 head, response-only logits)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tspo.rollout import build_tiny_model, load_policy
from tspo.training import setup as training_setup
from tspo.training.policy import (
    cpu_bf16_features,
    decide_bf16_autocast,
    float32_output_head,
    position_ids_from_mask,
    response_scores,
)
from tspo.trajectory import TrajectoryBatch, TrajectoryBuilder, TurnAction, collate_trajectories

SAPPHIRE_RAPIDS = "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
ZEN3 = "flags\t\t: fpu sse avx avx2 fma sha_ni vaes\n"
ARM = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n"


def test_cpu_features_from_capabilities_and_cpuinfo():
    assert cpu_bf16_features(capabilities={"avx512_bf16": True, "amx_bf16": True}) == (
        "avx512_bf16",
        "amx_bf16",
    )
    assert cpu_bf16_features(capabilities={"avx512_bf16": False, "amx_bf16": True}) == ("amx_bf16",)
    assert cpu_bf16_features(capabilities={"avx2": True}) == ()
    assert cpu_bf16_features(cpuinfo=SAPPHIRE_RAPIDS) == ("avx512_bf16", "amx_bf16")
    assert cpu_bf16_features(cpuinfo=ZEN4) == ("avx512_bf16",)
    assert cpu_bf16_features(cpuinfo=ZEN3) == ()
    assert cpu_bf16_features(cpuinfo=ARM) == ()
    assert cpu_bf16_features(cpuinfo="") == ()


@pytest.mark.parametrize(
    ("setting", "device", "cuda_bf16", "features", "enabled", "warn"),
    [
        ("auto", "cpu", False, ("avx512_bf16",), True, False),
        ("auto", "cpu", False, ("amx_bf16",), True, False),
        ("auto", "cpu", False, (), False, False),
        ("on", "cpu", False, ("avx512_bf16", "amx_bf16"), True, False),
        ("on", "cpu", False, (), True, True),  # honoured, with a warning: emulated bf16 is slow
        ("off", "cpu", False, ("avx512_bf16",), False, False),
        ("auto", "cuda", True, (), True, False),
        ("auto", "cuda", False, (), False, False),
        ("on", "cuda", False, (), False, True),  # autocast would fail on such a GPU
        ("off", "cuda", True, (), False, False),
        ("auto", "mps", False, (), False, False),
        ("on", "mps", False, (), True, False),
    ],
)
def test_bf16_decision(setting, device, cuda_bf16, features, enabled, warn):
    decision = decide_bf16_autocast(setting, device, cuda_bf16=cuda_bf16, cpu_features=features)
    assert (decision.enabled, decision.warn) == (enabled, warn)
    assert setting in decision.reason
    for feature in features if device == "cpu" and setting != "off" else ():
        assert feature in decision.reason


def test_bf16_decision_rejects_unknown_settings():
    with pytest.raises(ValueError, match="auto, on or off"):
        decide_bf16_autocast("yes", "cpu")


@pytest.mark.parametrize(("features", "expected"), [(("avx512_bf16",), True), ((), False)])
def test_trainer_setting_auto_follows_the_cpu_and_says_so(monkeypatch, caplog, features, expected):
    monkeypatch.setattr("tspo.training.policy.cpu_bf16_features", lambda: features)
    with caplog.at_level(logging.INFO, logger="tspo.training.setup"):
        assert training_setup.use_bf16_autocast("auto", torch.device("cpu")) is expected
    (record,) = [r for r in caplog.records if "bf16 autocast" in r.getMessage()]
    assert record.getMessage().startswith(f"bf16 autocast {'on' if expected else 'off'}")
    with caplog.at_level(logging.INFO, logger="tspo.training.setup"):
        assert training_setup.use_bf16_autocast("on", torch.device("cpu")) is True


# ---------------------------------------------------------------------- numerics
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    texts = ["who founded acme corporation ? jane doe founded it in lorvik .", "lorvik is a harbour city ."]
    directory: Path = build_tiny_model(texts, tmp_path_factory.mktemp("tiny") / "m", hidden_size=64, seed=2)
    model, tokenizer = load_policy(directory, device="cpu", dtype="float32")
    # Sharper logits than a random init (magnitudes like a trained model's), where bf16 rounding shows.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    return model, tokenizer


def make_batch(tokenizer) -> TrajectoryBatch:
    trajectories = []
    for prompt, response in [
        ("who founded acme corporation ?", "jane doe founded it"),
        ("lorvik is", "a harbour"),
    ]:
        builder = TrajectoryBuilder(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        builder.add_generation(ids, None, response, TurnAction.ANSWER, content=response)
        trajectories.append(builder.build())
    return collate_trajectories(trajectories, pad_token_id=tokenizer.pad_token_id)


def full_logits_reference(model, batch: TrajectoryBatch) -> torch.Tensor:
    """(B, L) log-probabilities from the full (B, P + L, V) logits in float32: the plain definition."""
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids_from_mask(batch.attention_mask),
        ).logits.float()
    prompt, length = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    logp = torch.log_softmax(logits[:, prompt - 1 : prompt - 1 + length], dim=-1)
    return logp.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)


def test_response_scores_equal_the_full_logits_definition(tiny):
    model, tokenizer = tiny
    batch = make_batch(tokenizer)
    with torch.no_grad():
        scores = response_scores(model, batch, with_entropy=True).logprobs
    mask = batch.response_mask.bool()
    torch.testing.assert_close(scores[mask], full_logits_reference(model, batch)[mask], atol=1e-5, rtol=0)


def test_bf16_logprobs_stay_close_to_float32_with_a_float32_head(tiny):
    model, tokenizer = tiny
    batch = make_batch(tokenizer)
    mask = batch.response_mask.bool()
    reference = full_logits_reference(model, batch)[mask]
    with torch.no_grad():
        bf16 = response_scores(model, batch, bf16=True).logprobs[mask]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_head_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert bf16_head_logits.dtype == torch.bfloat16, "plain autocast computes the head in bf16"
    error = (bf16 - reference).abs()
    assert error.max() < 0.1
    # The bf16 head alone (logits rounded to bf16) is worse than a float32 head on the same bf16 body.
    prompt, length = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    rounded = torch.log_softmax(bf16_head_logits[:, prompt - 1 : prompt - 1 + length].float(), dim=-1)
    rounded = rounded.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)[mask]
    assert error.mean() < (rounded - reference).abs().mean()


def test_float32_head_keeps_gradients_and_restores_the_module(tiny):
    model, tokenizer = tiny
    head = model.get_output_embeddings()
    batch = make_batch(tokenizer)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16), float32_output_head(model):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert logits.dtype == torch.float32
    logits.logsumexp(-1).mean().backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    assert "forward" not in head.__dict__, "the head's own forward is back"
    with float32_output_head(model, enabled=False):
        assert "forward" not in head.__dict__
