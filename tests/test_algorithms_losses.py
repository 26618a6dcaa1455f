"""Policy losses, the sequence-level ratio and loss aggregation: hand-computed numbers, gradients, errors."""

from __future__ import annotations

import math

import pytest
import torch

from tspo.algorithms import aggregate_loss, policy_loss, sequence_log_ratio, sequence_ratio


def one_token(
    ratio: float, advantage: float, **options: object
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logp_old = torch.zeros(1, 1)
    logp_new = torch.full((1, 1), math.log(ratio), requires_grad=True)
    return policy_loss(
        "token_clip", logp_new, logp_old, torch.full((1, 1), advantage), torch.ones(1, 1), **options
    )


@pytest.mark.parametrize(
    ("ratio", "advantage", "options", "expected_loss", "clipped"),
    [
        (1.0, 2.0, {}, -2.0, False),  # on-policy: -A
        (1.1, 1.0, {}, -1.1, False),  # inside the range
        (1.5, 1.0, {}, -1.2, True),  # A > 0, ratio above 1 + eps_high: clipped at 1.2
        (1.5, 1.0, {"eps_high": 0.28}, -1.28, True),  # clip-higher
        (0.5, 1.0, {}, -0.5, False),  # A > 0, ratio below: the unclipped term is the pessimistic one
        (0.5, -1.0, {}, 0.8, True),  # A < 0, ratio below 1 - eps_low: clipped at 0.8
        (0.5, -1.0, {"eps_low": 0.1}, 0.9, True),
        (5.0, -1.0, {}, 5.0, False),  # A < 0, large ratio: unbounded without dual clip
        (5.0, -1.0, {"dual_clip": 3.0}, 3.0, False),  # dual clip bounds it at c * |A|
        (2.0, -1.0, {"dual_clip": 3.0}, 2.0, False),  # below the dual bound: unchanged
        (5.0, 1.0, {"dual_clip": 3.0}, -1.2, True),  # dual clip only acts on negative advantages
    ],
)
def test_token_clip_numbers(
    ratio: float, advantage: float, options: dict, expected_loss: float, clipped: bool
) -> None:
    loss, metrics = one_token(ratio, advantage, **options)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    assert float(metrics["clip_fraction"]) == (1.0 if clipped else 0.0)
    dual = options.get("dual_clip") is not None and advantage < 0 and ratio * -advantage > 3.0
    assert float(metrics["dual_clip_fraction"]) == (1.0 if dual else 0.0)
    assert float(metrics["ratio_mean"]) == pytest.approx(ratio, rel=1e-6)
    assert float(metrics["approx_kl"]) == pytest.approx(-math.log(ratio), abs=1e-6)


def test_token_clip_gradient_is_zero_when_clipped_and_minus_a_ratio_otherwise() -> None:
    logp_old = torch.zeros(1, 3)
    logp_new = torch.tensor([[math.log(1.1), math.log(1.5), math.log(0.5)]], requires_grad=True)
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    loss, _ = policy_loss("token_clip", logp_new, logp_old, advantages, torch.ones(1, 3))
    loss.backward()
    # token-mean over 3 tokens: d/dlogp (-A r) / 3 = -A r / 3 where unclipped; 0 where clipped.
    torch.testing.assert_close(logp_new.grad, torch.tensor([[-1.1 / 3, 0.0, 0.0]]))


def test_metrics_over_several_tokens_and_mask() -> None:
    logp_old = torch.zeros(2, 3)
    logp_new = torch.log(torch.tensor([[1.0, 1.5, 0.7], [2.0, 9.0, 1.0]]))
    advantages = torch.ones(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    loss, metrics = policy_loss("token_clip", logp_new, logp_old, advantages, mask)
    # Generated ratios 1.0, 1.5, 0.7, 2.0; losses -1.0, -1.2, -0.7, -1.2 -> mean -1.025.
    assert loss.item() == pytest.approx(-1.025, rel=1e-6)
    assert float(metrics["clip_fraction"]) == 0.5
    assert float(metrics["ratio_mean"]) == pytest.approx((1.0 + 1.5 + 0.7 + 2.0) / 4, rel=1e-6)
    assert float(metrics["ratio_min"]) == pytest.approx(0.7, rel=1e-6)
    assert float(metrics["ratio_max"]) == pytest.approx(2.0, rel=1e-6)  # 9.0 is masked
    assert all(not value.requires_grad and value.dim() == 0 for value in metrics.values())


def test_sequence_ratio_is_exp_of_mean_log_ratio_over_generated_tokens() -> None:
    logp_new = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 7.0, 7.0], [0.0, 0.0, 0.0]])
    logp_old = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    log_ratio = sequence_log_ratio(logp_new, logp_old, mask)
    torch.testing.assert_close(log_ratio, torch.tensor([(0.5 + 0.0 - 1.0) / 3, 0.5, 0.0]))
    torch.testing.assert_close(sequence_ratio(logp_new, logp_old, mask), log_ratio.exp())


def test_seq_clip_clips_whole_sequences_and_has_gspo_gradient() -> None:
    logp_old = torch.zeros(2, 4)
    # Sequence 0: mean log ratio log(1.1) (inside); sequence 1: mean log(1.5) (clipped for A > 0).
    values = torch.tensor([[0.3, -0.1, math.log(1.1) * 3 - 0.2, 0.0], [math.log(1.5) * 2, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    logp_new = values.clone().requires_grad_(True)
    advantages = torch.tensor([[2.0] * 4, [1.0] * 4])
    loss, metrics = policy_loss("seq_clip", logp_new, logp_old, advantages, mask, agg="seq-mean-token-mean")
    # Per sequence: -A * s (unclipped) = -2.2; -A * clip(1.5) = -1.2 -> mean -1.7.
    assert loss.item() == pytest.approx(-1.7, rel=1e-6)
    assert float(metrics["sequence_clip_fraction"]) == 0.5
    loss.backward()
    # GSPO: the gradient of -A_i * s_i / B with s_i = exp(mean log ratio); 0 for the clipped sequence.
    reference = values.clone().requires_grad_(True)
    s0 = sequence_ratio(reference, logp_old, mask)[0]
    (-2.0 * s0 / 2).backward()
    torch.testing.assert_close(logp_new.grad, reference.grad)
    assert torch.all(logp_new.grad[1] == 0)


def test_seq_clip_equals_token_clip_when_every_sequence_has_one_token() -> None:
    gen = torch.Generator().manual_seed(0)
    logp_new, logp_old = torch.randn(6, 1, generator=gen) * 0.3, torch.randn(6, 1, generator=gen) * 0.3
    advantages, mask = torch.randn(6, 1, generator=gen), torch.ones(6, 1)
    for options in ({}, {"eps_high": 0.28}, {"dual_clip": 2.0}):
        seq, _ = policy_loss("seq_clip", logp_new, logp_old, advantages, mask, **options)
        token, _ = policy_loss("token_clip", logp_new, logp_old, advantages, mask, **options)
        torch.testing.assert_close(seq, token)


def test_aggregation_modes() -> None:
    loss_mat = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert float(aggregate_loss(loss_mat, mask)) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert float(aggregate_loss(loss_mat, mask, "token-mean")) == pytest.approx(2.5)
    assert float(aggregate_loss(loss_mat, mask, "seq-mean-token-mean")) == pytest.approx((2.0 + 4.0) / 2)
    # Token sums 6 and 4, each divided by L = 4, averaged over the 2 sequences.
    assert float(aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm")) == pytest.approx(
        (6 / 4 + 4 / 4) / 2
    )


def test_seq_mean_token_sum_norm_divides_by_the_loss_scale_factor() -> None:
    """verl's ``loss_scale_factor``: a constant divisor, so padding columns change nothing."""
    loss_mat = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    expected = (6 / 10 + 4 / 10) / 2
    assert float(aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm", 10)) == pytest.approx(expected)
    wider = (
        torch.cat([loss_mat, torch.full((2, 3), 7.0)], dim=1),
        torch.cat([mask, torch.zeros(2, 3, dtype=torch.bool)], 1),
    )
    assert float(aggregate_loss(*wider, "seq-mean-token-sum-norm", 10)) == pytest.approx(expected)
    assert float(aggregate_loss(*wider, "seq-mean-token-sum-norm")) == pytest.approx((6 / 7 + 4 / 7) / 2)
    # The other modes ignore it (as verl).
    assert float(aggregate_loss(loss_mat, mask, "token-mean", 10)) == pytest.approx(2.5)
    loss, _ = policy_loss(
        "token_clip",
        torch.zeros(2, 4),
        torch.zeros(2, 4),
        -loss_mat,
        mask,
        agg="seq-mean-token-sum-norm",
        loss_scale_factor=10,
    )
    assert float(loss) == pytest.approx(expected)
    with pytest.raises(ValueError, match="loss_scale_factor must be > 0"):
        aggregate_loss(loss_mat, mask, "seq-mean-token-sum-norm", 0)


def test_aggregation_of_empty_mask_is_zero_not_nan() -> None:
    loss_mat, mask = torch.ones(2, 3), torch.zeros(2, 3)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        assert float(aggregate_loss(loss_mat, mask, mode)) == 0.0
    loss, metrics = policy_loss("token_clip", torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), mask)
    assert loss.item() == 0.0 and all(torch.isfinite(value) for value in metrics.values())


def test_row_weighted_microbatches_reproduce_seq_mean_aggregations() -> None:
    gen = torch.Generator().manual_seed(1)
    loss_mat = torch.randn(6, 5, generator=gen)
    mask = torch.rand(6, 5, generator=gen) < 0.6
    mask[2] = False  # a sequence without generated tokens
    for mode in ("seq-mean-token-mean", "seq-mean-token-sum-norm"):
        whole = aggregate_loss(loss_mat, mask, mode)
        parts = sum(
            aggregate_loss(loss_mat[rows], mask[rows], mode) * len(rows) / 6
            for rows in ([0, 1, 2], [3, 4, 5])
        )
        torch.testing.assert_close(whole, parts)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "ppo"}, r"unknown policy loss 'ppo'; valid names: seq_clip, token_clip"),
        ({"agg": "sum"}, r"unknown loss aggregation 'sum'; valid names: seq-mean-token-mean"),
        ({"eps_low": 1.0}, r"eps_low must be in \[0, 1\)"),
        ({"eps_high": -0.1}, "eps_high must be >= 0"),
        ({"dual_clip": 1.0}, "dual_clip must be > 1"),
        ({"advantages": torch.zeros(2, 4)}, r"advantages has shape \(2, 4\) but logp_new has shape \(2, 3\)"),
        ({"loss_mask": torch.ones(3, 3)}, r"loss_mask has shape \(3, 3\) but logp_new has shape \(2, 3\)"),
        ({"logp_new": torch.zeros(6)}, r"logp_new must be \(B, L\)"),
    ],
)
def test_policy_loss_errors(kwargs: dict, message: str) -> None:
    arguments = {
        "name": "token_clip",
        "logp_new": torch.zeros(2, 3),
        "logp_old": torch.zeros(2, 3),
        "advantages": torch.zeros(2, 3),
        "loss_mask": torch.ones(2, 3),
    }
    options = {key: kwargs.pop(key) for key in list(kwargs) if key not in arguments}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=message):
        policy_loss(*arguments.values(), **options)


def test_aggregate_loss_errors() -> None:
    with pytest.raises(ValueError, match=r"mask has shape \(2, 2\) but loss_mat has shape \(2, 3\)"):
        aggregate_loss(torch.zeros(2, 3), torch.ones(2, 2))
    with pytest.raises(ValueError, match="unknown loss aggregation 'mean'"):
        aggregate_loss(torch.zeros(2, 3), torch.ones(2, 3), "mean")
