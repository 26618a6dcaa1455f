"""The policy update: single-pass old log-probs and micro-batch accumulation are exact."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Qwen2ForCausalLM

from conftest import tiny_qwen2
from tspo.training.policy import batched_logprobs
from tspo.training.update import UpdateSettings, policy_update
from tspo.trajectory import TrajectoryBuilder, TurnAction, collate_trajectories


def tiny_model() -> Qwen2ForCausalLM:
    return tiny_qwen2()


def batch_of_four():
    trajectories = []
    for row in range(4):
        builder = TrajectoryBuilder(list(range(1, 3 + row)), group_id=row // 2)
        builder.add_generation([5 + row, 6, 7], None, "<search>q</search>", TurnAction.SEARCH, "q")
        builder.add_observation([8, 9, 10, 11][: 2 + row % 3], "obs")
        builder.add_generation([12, 13 + row], None, "<answer>a</answer>", TurnAction.ANSWER, "a")
        trajectories.append(builder.build())
    batch = collate_trajectories(trajectories, pad_token_id=0)
    advantages = torch.tensor([[1.0], [-1.0], [0.5], [-0.5]]) * batch.loss_mask
    return batch, advantages


def run_update(old_logprobs_mode: str, micro_batch_size: int, epochs: int = 1):
    model = tiny_model()
    batch, advantages = batch_of_four()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = UpdateSettings(kl_coef=0.0, micro_batch_size=micro_batch_size, epochs=epochs, grad_clip=1e9)
    old = None if old_logprobs_mode == "single_pass" else batched_logprobs(model, batch, 4)
    metrics = policy_update(model, optimizer, batch, old, advantages, settings)
    return model, metrics


def test_single_pass_old_logprobs_equal_a_separate_forward_pass():
    explicit, explicit_metrics = run_update("explicit", micro_batch_size=4)
    single, single_metrics = run_update("single_pass", micro_batch_size=4)
    for a, b in zip(explicit.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert single_metrics["actor/ratio_mean"] == pytest.approx(1.0)
    assert explicit_metrics["actor/loss"] == pytest.approx(single_metrics["actor/loss"], abs=1e-6)


def test_micro_batches_accumulate_to_the_full_batch_gradient():
    whole, _ = run_update("single_pass", micro_batch_size=4)
    pieces, _ = run_update("single_pass", micro_batch_size=1)
    moved = any(
        not torch.equal(p, q) for p, q in zip(whole.parameters(), tiny_model().parameters(), strict=True)
    )
    assert moved, "the update changed nothing"
    for a, b in zip(whole.parameters(), pieces.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_several_epochs_need_explicit_old_logprobs():
    model = tiny_model()
    batch, advantages = batch_of_four()
    with pytest.raises(ValueError, match="only for a single pass"):
        policy_update(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            batch,
            None,
            advantages,
            UpdateSettings(kl_coef=0.0, epochs=2),
        )


def test_kl_needs_reference_logprobs():
    model = tiny_model()
    batch, advantages = batch_of_four()
    with pytest.raises(ValueError, match="kl_coef > 0 needs ref_logprobs"):
        policy_update(
            model,
            torch.optim.SGD(copy.deepcopy(model).parameters(), lr=0.1),
            batch,
            None,
            advantages,
            UpdateSettings(kl_coef=0.1),
        )


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("zero_rows", [[1, 2], [0, 1, 2, 3]])
def test_rows_with_zero_advantage_are_skipped_without_changing_the_update(loss_agg, zero_rows):
    """Leaving zero-advantage rows out (no KL, no entropy term) gives the update of the whole batch,
    also when no row is left: the optimizer still steps (momentum and weight decay) as with zero
    gradients. SGD with momentum keeps float differences at float size (Adam divides tiny gradients by
    their own size and amplifies summation-order noise); AdamW is checked on the all-zero batch."""
    batch, advantages = batch_of_four()
    advantages[zero_rows] = 0.0
    results = {}
    for skip in (False, True):
        model = tiny_model()
        optimizer = (
            torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
            if len(zero_rows) == 4
            else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        )
        settings = UpdateSettings(
            kl_coef=0.0,
            loss_agg=loss_agg,
            loss_scale_factor=8.0,
            micro_batch_size=2,
            grad_clip=1e9,
            skip_zero_advantage_rows=skip,
        )
        # Two updates: the second shows the optimizer state after a skipped batch is the same too.
        first = policy_update(model, optimizer, batch, None, advantages, settings)
        policy_update(model, optimizer, batch, None, batch_of_four()[1], settings)
        results[skip] = (model, first)
    (full, full_metrics), (skipped, skipped_metrics) = results[False], results[True]
    assert full_metrics["actor/updated_rows"] == 1.0
    assert skipped_metrics["actor/updated_rows"] == (4 - len(zero_rows)) / 4
    assert skipped_metrics["actor/grad_norm"] == pytest.approx(full_metrics["actor/grad_norm"], rel=1e-5)
    for a, b in zip(full.parameters(), skipped.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_rows_are_not_skipped_when_a_kl_or_entropy_term_touches_them():
    from tspo.training.update import rows_to_update

    advantages = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, -2.0]])
    assert rows_to_update(advantages, UpdateSettings(kl_coef=0.0)) == [0, 2]
    assert rows_to_update(advantages, UpdateSettings(kl_coef=0.001)) == [0, 1, 2]
    assert rows_to_update(advantages, UpdateSettings(kl_coef=0.0, entropy_coef=0.01)) == [0, 1, 2]
    assert rows_to_update(advantages, UpdateSettings(kl_coef=0.0, skip_zero_advantage_rows=False)) == [
        0,
        1,
        2,
    ]
