"""Scoring with a shared prompt beginning (a few-shot prompt) computed once per batch: the same
log-probabilities, entropies and gradients as scoring every row whole."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2ForCausalLM

import tspo.training.policy as policy
from conftest import tiny_qwen2
from tspo.training.policy import MIN_SHARED_PREFIX, common_prompt_prefix, response_scores
from tspo.trajectory import TrajectoryBatch, TrajectoryBuilder, TurnAction, collate_trajectories

VOCAB = 64
SHARED = [3 + (i * 7) % (VOCAB - 3) for i in range(MIN_SHARED_PREFIX + 8)]


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    return tiny_qwen2(seed=seed, vocab_size=VOCAB, kv_heads=2, max_positions=256, tied_embeddings=False)


def few_shot_batch(shared: list[int] = SHARED) -> TrajectoryBatch:
    """Five trajectories whose prompts start with ``shared``, then 1-5 tokens of their own (so the
    left padding differs), with ragged searches, observations and answers."""
    trajectories = []
    for row in range(5):
        builder = TrajectoryBuilder(shared + [40 + row + k for k in range(1 + row)], group_id=row // 2)
        builder.add_generation([5 + row, 6, 7][: 1 + row % 3], None, "s", TurnAction.SEARCH, "q")
        builder.add_observation([8, 9, 10, 11, 12][: 1 + (row * 2) % 5], "obs")
        builder.add_generation([13, 14 + row, 15][: 3 - row % 2], None, "a", TurnAction.ANSWER, "a")
        trajectories.append(builder.build())
    return collate_trajectories(trajectories, pad_token_id=0)


def test_the_common_beginning_is_found_and_keeps_a_token_per_row():
    assert common_prompt_prefix(few_shot_batch()) == len(SHARED)
    one_own_token = few_shot_batch(shared=SHARED)
    # Row 0 has one token of its own; a batch of that row alone shares nothing (one row).
    assert common_prompt_prefix(one_own_token.select([0])) == 0
    other = few_shot_batch(shared=[1, *SHARED[1:]])
    mixed = collate_trajectories(
        [*_trajectories(few_shot_batch())[:2], *_trajectories(other)[2:]], pad_token_id=0
    )
    assert common_prompt_prefix(mixed) == 0


def _trajectories(batch: TrajectoryBatch):
    """Rebuild trajectories from a collated batch (prompt and one answer turn per row)."""
    out = []
    for row in range(batch.batch_size):
        prompt = batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist()
        builder = TrajectoryBuilder(prompt, group_id=row)
        response = batch.response_ids[row][batch.response_mask[row].bool()].tolist()
        builder.add_generation(response, None, "a", TurnAction.ANSWER, "a")
        out.append(builder.build())
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prefix_scores_equal_whole_row_scores(temperature, monkeypatch):
    model = tiny_model()
    batch = few_shot_batch()
    calls = []
    original = policy._shared_prefix_hidden
    monkeypatch.setattr(
        policy, "_shared_prefix_hidden", lambda *a, **k: calls.append(a[2]) or original(*a, **k)
    )
    with torch.no_grad():
        shared = response_scores(model, batch, temperature=temperature, with_entropy=True)
        whole = response_scores(model, batch, temperature=temperature, with_entropy=True, share_prefix=False)
    assert calls == [len(SHARED)], "the shared path must have run once, with the whole common beginning"
    mask = batch.response_mask.bool()
    torch.testing.assert_close(shared.logprobs[mask], whole.logprobs[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared.entropy[mask], whole.entropy[mask], atol=1e-5, rtol=0)
    assert (shared.logprobs[~mask] == 0).all()


def test_shared_prefix_gradients_equal_whole_row_gradients():
    """The prefix's keys and values are expanded to every row; backward sums the rows' gradients."""
    batch = few_shot_batch()
    weights = torch.linspace(-1, 1, batch.response_ids.numel()).reshape(batch.response_ids.shape)
    mask = batch.loss_mask
    models = {}
    for share in (True, False):
        model = tiny_model()
        scores = response_scores(
            model, batch, temperature=0.7, with_entropy=True, positions=mask.bool(), share_prefix=share
        )
        ((weights * scores.logprobs * mask).sum() + 0.3 * (scores.entropy * mask).sum()).backward()
        models[share] = model
    for (name, a), b in zip(models[False].named_parameters(), models[True].parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4, msg=name)
    embeddings = models[True].get_input_embeddings().weight.grad
    assert embeddings[SHARED].abs().sum() > 0, "gradient must reach the shared prefix's tokens"
