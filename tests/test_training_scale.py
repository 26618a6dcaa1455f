"""The trainer at scale: chunked response-only log-probabilities equal the full-softmax definition;
micro-batches are trimmed to their own rows; the loss does not depend on padding or micro-batch size."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2ForCausalLM

import tspo.training.policy as policy
from conftest import tiny_qwen2
from tspo.training.config import load_train_config
from tspo.training.policy import (
    float32_output_head,
    position_ids_from_mask,
    response_scores,
    trim_padding,
)
from tspo.training.update import UpdateSettings, policy_update
from tspo.trajectory import TrajectoryBatch, TrajectoryBuilder, TurnAction, collate_trajectories

VOCAB = 64


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    return tiny_qwen2(seed=seed, vocab_size=VOCAB, max_positions=128, tied_embeddings=False)


def ragged_batch() -> tuple[TrajectoryBatch, torch.Tensor]:
    """Four trajectories of different prompt and response lengths (search, observation, answer)."""
    trajectories = []
    for row in range(4):
        builder = TrajectoryBuilder(list(range(1, 3 + 2 * row)), group_id=row // 2)
        builder.add_generation([5 + row, 6, 7][: 1 + row % 3], None, "s", TurnAction.SEARCH, "q")
        builder.add_observation([8, 9, 10, 11, 12][: 1 + (row * 2) % 5], "obs")
        builder.add_generation([13, 14 + row, 15][: 3 - row % 2], None, "a", TurnAction.ANSWER, "a")
        trajectories.append(builder.build())
    batch = collate_trajectories(trajectories, pad_token_id=0)
    advantages = torch.tensor([[1.0], [-1.0], [0.5], [-0.25]]) * batch.loss_mask
    return batch, advantages


def with_extra_padding(batch: TrajectoryBatch, left: int, right: int) -> TrajectoryBatch:
    """The same trajectories with ``left`` more prompt padding columns and ``right`` more response ones."""
    size = batch.batch_size

    def pad(tensor: torch.Tensor, value: float, before: int, after: int) -> torch.Tensor:
        shape = (size, before), (size, after)
        return torch.cat(
            [
                torch.full(shape[0], value, dtype=tensor.dtype),
                tensor,
                torch.full(shape[1], value, dtype=tensor.dtype),
            ],
            dim=1,
        )

    return TrajectoryBatch(
        prompt_ids=pad(batch.prompt_ids, 0, left, 0),
        prompt_mask=pad(batch.prompt_mask, 0, left, 0),
        response_ids=pad(batch.response_ids, 0, 0, right),
        response_mask=pad(batch.response_mask, 0, 0, right),
        loss_mask=pad(batch.loss_mask, 0, 0, right),
        token_turn_index=pad(batch.token_turn_index, -1, 0, right),
        sample_logprobs=pad(batch.sample_logprobs, 0, 0, right),
        turn_mask=batch.turn_mask,
    )


def naive_scores(
    model: torch.nn.Module, batch: TrajectoryBatch, temperature: float = 1.0, bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) log-probabilities and entropies from the full (B, P + L, V) logits and a float32 log-softmax:
    the plain definition (and the old implementation's memory profile)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), float32_output_head(model, enabled=bf16):
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=position_ids_from_mask(batch.attention_mask),
        ).logits.float()
    prompt, length = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    logits = logits[:, prompt - 1 : prompt - 1 + length] / temperature
    log_softmax = torch.log_softmax(logits, dim=-1)
    logprobs = log_softmax.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return logprobs, entropy


@pytest.fixture(params=["decoder_then_head", "model_forward"])
def head_path(request, monkeypatch) -> str:
    """Both ways of reaching the logits: hidden states cut before the head (Qwen2, Llama, ...) and the
    model's own forward (any other architecture)."""
    if request.param == "model_forward":
        monkeypatch.setattr(policy, "_decoder_and_head", lambda model: None)
    return request.param


@pytest.mark.parametrize("chunk_elements", [1, 3 * VOCAB, policy.LOGIT_CHUNK_ELEMENTS])
def test_chunked_logprobs_and_entropy_equal_the_full_softmax(head_path, chunk_elements):
    model = tiny_model()
    batch, _ = ragged_batch()
    expected_logp, expected_entropy = naive_scores(model, batch, temperature=0.7)
    with torch.no_grad():
        scores = response_scores(
            model, batch, temperature=0.7, with_entropy=True, chunk_elements=chunk_elements
        )
    mask = batch.response_mask.bool()
    torch.testing.assert_close(scores.logprobs[mask], expected_logp[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.entropy[mask], expected_entropy[mask], atol=1e-5, rtol=0)
    assert (scores.logprobs[~mask] == 0).all() and (scores.entropy[~mask] == 0).all()


def test_only_the_asked_positions_are_scored():
    model = tiny_model()
    batch, _ = ragged_batch()
    loss_positions = batch.loss_mask.bool()
    with torch.no_grad():
        scores = response_scores(model, batch, positions=loss_positions, with_entropy=True)
    expected, _ = naive_scores(model, batch)
    torch.testing.assert_close(scores.logprobs[loss_positions], expected[loss_positions], atol=1e-5, rtol=0)
    assert (scores.logprobs[~loss_positions] == 0).all()
    observed = batch.response_mask.bool() & ~loss_positions
    assert observed.any(), "the batch has observation tokens"


def test_gradients_equal_the_full_softmax_gradients(head_path):
    """Checkpointed chunks give the gradient of the plain definition (log-probs and entropy bonus)."""
    batch, _ = ragged_batch()
    weights = torch.linspace(-1, 1, batch.response_ids.numel()).reshape(batch.response_ids.shape)
    mask = batch.loss_mask

    def objective(logprobs: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        return (weights * logprobs * mask).sum() + 0.3 * (entropy * mask).sum()

    naive, chunked = tiny_model(), tiny_model()
    objective(*naive_scores(naive, batch, temperature=0.7)).backward()
    scores = response_scores(
        chunked, batch, temperature=0.7, with_entropy=True, positions=mask.bool(), chunk_elements=2 * VOCAB
    )
    objective(scores.logprobs, scores.entropy).backward()
    for (name, a), b in zip(naive.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_keeps_the_float32_head_numerics():
    """Under bf16 autocast the cut hidden states meet the same float32 head as the full forward did."""
    model = tiny_model()
    batch, _ = ragged_batch()
    expected, _ = naive_scores(model, batch, bf16=True)
    with torch.no_grad():
        got = response_scores(model, batch, bf16=True, chunk_elements=2 * VOCAB).logprobs
    mask = batch.response_mask.bool()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)


def test_trim_padding_keeps_the_rows_own_width_and_their_scores():
    batch, _ = ragged_batch()
    padded = with_extra_padding(batch, left=5, right=7)
    micro = trim_padding(padded.select([0, 1]))
    own = trim_padding(batch.select([0, 1]))
    prompt_lengths = batch.prompt_mask[:2].sum(1)
    response_lengths = batch.response_mask[:2].sum(1)
    assert micro.prompt_ids.shape[1] == int(prompt_lengths.max()) < padded.prompt_ids.shape[1]
    assert micro.response_ids.shape[1] == int(response_lengths.max()) < padded.response_ids.shape[1]
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "loss_mask"):
        assert torch.equal(getattr(micro, name), getattr(own, name)), name
    model = tiny_model()
    with torch.no_grad():
        trimmed = response_scores(model, micro).logprobs
        full = response_scores(model, padded.select([0, 1])).logprobs
    width = micro.response_ids.shape[1]
    torch.testing.assert_close(trimmed, full[:, :width], atol=1e-5, rtol=0)


AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def updated(batch: TrajectoryBatch, advantages: torch.Tensor, loss_agg: str, micro_batch_size: int):
    """Parameters and metrics after one update with KL and an entropy bonus on."""
    model = tiny_model()
    reference = tiny_model(seed=1)
    ref_logprobs = policy.batched_logprobs(reference, batch, micro_batch_size=2)
    settings = UpdateSettings(
        loss_agg=loss_agg,
        loss_scale_factor=40,
        kl_coef=0.5,
        entropy_coef=0.1,
        micro_batch_size=micro_batch_size,
        grad_clip=1e9,
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    metrics = policy_update(model, optimizer, batch, None, advantages, settings, ref_logprobs=ref_logprobs)
    return model, metrics


@pytest.mark.parametrize("loss_agg", AGGREGATIONS)
def test_loss_is_invariant_to_extra_padding_columns(loss_agg):
    batch, advantages = ragged_batch()
    padded = with_extra_padding(batch, left=6, right=9)
    padded_advantages = torch.cat([advantages, torch.zeros(advantages.shape[0], 9)], dim=1)
    plain_model, plain = updated(batch, advantages, loss_agg, micro_batch_size=4)
    padded_model, wide = updated(padded, padded_advantages, loss_agg, micro_batch_size=4)
    assert plain["actor/loss"] == pytest.approx(wide["actor/loss"], abs=1e-6)
    assert plain["actor/kl"] == pytest.approx(wide["actor/kl"], abs=1e-6)
    moved = max(
        float((p - q).detach().abs().max())
        for p, q in zip(plain_model.parameters(), tiny_model().parameters(), strict=True)
    )
    assert moved > 1e-3, "the update changed nothing"
    for a, b in zip(plain_model.parameters(), padded_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_agg", AGGREGATIONS)
def test_loss_is_invariant_to_micro_batch_size(loss_agg):
    batch, advantages = ragged_batch()
    whole, _ = updated(batch, advantages, loss_agg, micro_batch_size=4)
    for size in (1, 3):
        pieces, _ = updated(batch, advantages, loss_agg, micro_batch_size=size)
        for a, b in zip(whole.parameters(), pieces.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_seq_mean_token_sum_norm_without_a_constant_depends_on_padding():
    """Why the constant: with the old divisor (the batch's padded width) extra padding changes the loss."""
    batch, advantages = ragged_batch()
    padded = with_extra_padding(batch, left=0, right=9)
    padded_advantages = torch.cat([advantages, torch.zeros(advantages.shape[0], 9)], dim=1)
    settings = UpdateSettings(loss_agg="seq-mean-token-sum-norm", kl_coef=0.0, grad_clip=1e9)
    losses = []
    for rows, adv in ((batch, advantages), (padded, padded_advantages)):
        model = tiny_model()
        old = policy.batched_logprobs(copy.deepcopy(model), rows, 4) - 0.1 * rows.loss_mask
        metrics = policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), rows, old, adv, settings)
        losses.append(metrics["actor/loss"])
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


def test_loss_scale_factor_defaults_to_the_generation_budget():
    tiny = load_train_config("tiny")
    assert tiny.algorithm.loss_scale_factor is None
    assert tiny.loss_scale_factor == (tiny.rollout.max_turns + 1) * tiny.rollout.max_new_tokens == 64
    capped = load_train_config("tiny", None, ["rollout.max_new_tokens=400", "rollout.max_context_tokens=512"])
    assert capped.loss_scale_factor == 512
    assert load_train_config("tiny", None, ["algorithm.loss_scale_factor=3000"]).loss_scale_factor == 3000
    with pytest.raises(Exception, match="loss_scale_factor must be > 0"):
        load_train_config("tiny", None, ["algorithm.loss_scale_factor=0"])


def test_lora_adapters_are_scored_through_the_cut_decoder():
    """With peft the body keeps its adapters: the scores equal the wrapped model's own full logits."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model(),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    assert policy._decoder_and_head(model) is not None
    batch, _ = ragged_batch()
    expected, _ = naive_scores(model, batch)
    with torch.no_grad():
        got = response_scores(model, batch).logprobs
        with model.disable_adapter():
            base = response_scores(model, batch).logprobs
    mask = batch.response_mask.bool()
    torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=0)
    assert (got[mask] - base[mask]).abs().max() > 1e-3, "the adapters changed nothing"
