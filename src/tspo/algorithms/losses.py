"""Policy-gradient losses and their aggregation over tokens (DESIGN section 5).

Shapes: B trajectories, L response tokens. ``loss_mask`` is non-zero only on policy-generated tokens;
observation and padding tokens never enter a loss, a metric or a normaliser. Masking uses
``torch.where`` before anything is computed, so whatever sits at a masked position (even NaN or inf)
changes neither the loss nor the metrics, and its gradient is exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tspo.algorithms._checks import (
    as_bool_mask,
    require_ndim,
    require_same_shape,
    require_tensor,
)
from tspo.algorithms.registry import Registry

# ------------------------------------------------------------------------------------------ aggregation

LossAggregation = Callable[..., torch.Tensor]
LOSS_AGGREGATIONS: Registry[LossAggregation] = Registry("loss aggregation")


@LOSS_AGGREGATIONS.register("token-mean")
def _token_mean(
    loss_mat: torch.Tensor, mask: torch.Tensor, loss_scale_factor: float | None = None
) -> torch.Tensor:
    """Mean over all generated tokens of the batch (DAPO's token-level loss; verl's default)."""
    return torch.where(mask, loss_mat, 0.0).sum() / mask.sum().clamp(min=1)


@LOSS_AGGREGATIONS.register("seq-mean-token-mean")
def _seq_mean_token_mean(
    loss_mat: torch.Tensor, mask: torch.Tensor, loss_scale_factor: float | None = None
) -> torch.Tensor:
    """Mean over sequences of each sequence's token mean (the original GRPO objective, GSPO).

    A sequence without generated tokens contributes 0 and still counts in the mean over B, so the loss
    of a batch is the row-weighted average of the losses of its micro-batches.
    """
    per_sequence = torch.where(mask, loss_mat, 0.0).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    return per_sequence.mean()


@LOSS_AGGREGATIONS.register("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(
    loss_mat: torch.Tensor, mask: torch.Tensor, loss_scale_factor: float | None = None
) -> torch.Tensor:
    """Mean over sequences of the token sum divided by a constant (Dr.GRPO, arXiv 2503.20783), so that
    long and short answers are not weighted by their length.

    The constant is ``loss_scale_factor``, as verl's ``actor.loss_scale_factor``; without one it is the
    width L of ``loss_mat`` (verl's fallback), which depends on how the batch was padded.
    """
    scale = loss_mat.shape[-1] if loss_scale_factor is None else loss_scale_factor
    per_sequence = torch.where(mask, loss_mat, 0.0).sum(dim=-1) / max(1, scale)
    return per_sequence.mean()


def aggregate_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    loss_scale_factor: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar over the generated tokens.

    Args:
        loss_mat: (B, L) float, per-token loss.
        mask: (B, L) float or bool, non-zero on generated tokens.
        mode: a name in ``LOSS_AGGREGATIONS``: ``token-mean`` (default), ``seq-mean-token-mean``,
            ``seq-mean-token-sum-norm``.
        loss_scale_factor: the constant normaliser of ``seq-mean-token-sum-norm`` (> 0; other modes
            ignore it, as verl). ``None`` divides by L, which changes with the padding of the batch.

    Returns:
        0-dim tensor.
    """
    aggregation = LOSS_AGGREGATIONS.get(mode)
    require_tensor("loss_mat", loss_mat)
    require_tensor("mask", mask)
    require_ndim("loss_mat", loss_mat, 2, "(B, L)")
    require_same_shape("mask", mask, "loss_mat", loss_mat)
    _check_scale_factor(loss_scale_factor)
    return aggregation(loss_mat, as_bool_mask(mask), loss_scale_factor=loss_scale_factor)


def _check_scale_factor(loss_scale_factor: float | None) -> None:
    if loss_scale_factor is not None and not loss_scale_factor > 0:
        raise ValueError(f"loss_scale_factor must be > 0 (or None), got {loss_scale_factor}")


# ---------------------------------------------------------------------------------- sequence-level ratio


def sequence_log_ratio(
    logp_new: torch.Tensor, logp_old: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """``log s_i = mean over generated tokens of (logp_new - logp_old)`` (DSPO / GSPO, arXiv 2507.18071).

    Args:
        logp_new, logp_old: (B, L) float, log-probabilities of the sampled tokens.
        loss_mask: (B, L) float or bool.

    Returns:
        (B,) float, 0 for a sequence without generated tokens. Differentiable in ``logp_new``.
    """
    _check_token_tensors(logp_new=logp_new, logp_old=logp_old, loss_mask=loss_mask)
    mask = as_bool_mask(loss_mask)
    difference = torch.where(mask, logp_new - logp_old, 0.0)
    return difference.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)


def sequence_ratio(logp_new: torch.Tensor, logp_old: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """DSPO's sequence-level importance ratio ``s_i = exp(log s_i)`` (B,): the length-normalised
    likelihood ratio of the whole generated sequence."""
    return sequence_log_ratio(logp_new, logp_old, loss_mask).exp()


# --------------------------------------------------------------------------------------- policy losses

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")

# Bounds on log-ratios before exp(), for numerical safety (as verl).
_TOKEN_LOG_RATIO_BOUND = 20.0
_SEQUENCE_LOG_RATIO_MAX = 10.0


def policy_loss(
    name: str,
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    loss_scale_factor: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss ``name`` from ``POLICY_LOSSES`` (``token_clip``, ``seq_clip``).

    Args:
        logp_new: (B, L) float, log-probabilities under the policy being trained (with grad).
        logp_old: (B, L) float, log-probabilities under the policy that sampled (treated as constant).
        advantages: (B, L) float, per-token advantages (treated as constant).
        loss_mask: (B, L) float or bool, non-zero on generated tokens.
        eps_low, eps_high: clip range ``[1 - eps_low, 1 + eps_high]`` (eps_high = 0.28 is DAPO's
            clip-higher).
        dual_clip: constant c > 1 of dual-clip PPO (Ye et al. 2020, arXiv 1912.09729): for negative
            advantages the loss is bounded by ``-c * A``. None disables it.
        agg: a name in ``LOSS_AGGREGATIONS``.
        loss_scale_factor: the constant normaliser of ``seq-mean-token-sum-norm`` (see
            :func:`aggregate_loss`).

    Returns:
        ``(loss, metrics)``: a 0-dim loss to minimise and detached 0-dim metrics ``clip_fraction``,
        ``dual_clip_fraction``, ``approx_kl`` (mean of ``logp_old - logp_new``), ``ratio_mean``,
        ``ratio_min``, ``ratio_max``, all over generated tokens.
    """
    loss_fn = POLICY_LOSSES.get(name)
    aggregation = LOSS_AGGREGATIONS.get(agg)
    _check_token_tensors(logp_new=logp_new, logp_old=logp_old, advantages=advantages, loss_mask=loss_mask)
    if not 0.0 <= eps_low < 1.0:
        raise ValueError(f"eps_low must be in [0, 1), got {eps_low}")
    if not eps_high >= 0.0:
        raise ValueError(f"eps_high must be >= 0, got {eps_high}")
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable it), got {dual_clip}")
    _check_scale_factor(loss_scale_factor)
    mask = as_bool_mask(loss_mask)
    # Zero every masked position first: nothing an observation token holds can reach the loss or grads.
    logp_new = torch.where(mask, logp_new, 0.0)
    logp_old = torch.where(mask, logp_old.detach(), 0.0)
    advantages = torch.where(mask, advantages.detach(), 0.0)
    loss_mat, ratio, extra = loss_fn(logp_new, logp_old, advantages, mask, eps_low, eps_high, dual_clip)
    loss = aggregation(loss_mat, mask, loss_scale_factor=loss_scale_factor)
    metrics = {**extra, **_ratio_metrics(ratio.detach(), logp_new.detach() - logp_old, mask)}
    return loss, metrics


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` per token, and
    with dual clip ``min(that, -c A)`` where A < 0. Returns (loss, clipped, dual_clipped) (B, L)."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = clipped > unclipped
    if dual_clip is None:
        return loss, was_clipped, torch.zeros_like(was_clipped)
    bound = -advantages * dual_clip
    negative = advantages < 0
    dual_clipped = negative & (loss > bound)
    return torch.where(negative, torch.minimum(loss, bound), loss), was_clipped, dual_clipped


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values.to(torch.float32), 0.0).sum() / mask.sum().clamp(min=1)


def _ratio_metrics(
    ratio: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    if not bool(mask.any()):
        zero = ratio.new_zeros(())
        return {"approx_kl": zero, "ratio_mean": zero + 1, "ratio_min": zero + 1, "ratio_max": zero + 1}
    return {
        "approx_kl": _masked_mean(-log_ratio, mask),
        "ratio_mean": _masked_mean(ratio, mask),
        "ratio_min": torch.where(mask, ratio, torch.inf).min(),
        "ratio_max": torch.where(mask, ratio, -torch.inf).max(),
    }


@POLICY_LOSSES.register("token_clip")
def token_clip_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level PPO clip (Schulman et al. 2017, eq. 7) with asymmetric range and optional dual clip.

    Ratio ``r_t = exp(logp_new - logp_old)`` per token. Inputs are already masked by
    :func:`policy_loss`. Returns (loss (B, L), ratio (B, L), metrics).
    """
    log_ratio = (logp_new - logp_old).clamp(-_TOKEN_LOG_RATIO_BOUND, _TOKEN_LOG_RATIO_BOUND)
    ratio = log_ratio.exp()
    loss, clipped, dual_clipped = _clipped_surrogate(ratio, advantages, eps_low, eps_high, dual_clip)
    metrics = {
        "clip_fraction": _masked_mean(clipped, mask).detach(),
        "dual_clip_fraction": _masked_mean(dual_clipped, mask).detach(),
    }
    return loss, ratio, metrics


@POLICY_LOSSES.register("seq_clip")
def seq_clip_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Sequence-level clip (DSPO; GSPO, Zheng et al. 2025, arXiv 2507.18071).

    Every token of sequence i uses the sequence ratio ``s_i`` (:func:`sequence_ratio`), so the clip
    decision is taken once per sequence. Written in GSPO's token form
    ``s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]``: its value is ``s_i`` and its gradient
    ``s_i * grad log pi(y_t)``, which equals the gradient of ``s_i * A_i`` when the advantage is constant
    over the sequence and also accepts per-turn advantages. GSPO aggregates with
    ``seq-mean-token-mean``. Returns (loss (B, L), ratio (B, L), metrics).
    """
    log_sequence_ratio = (logp_new - logp_old).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    token_log_ratio = logp_new - logp_new.detach() + log_sequence_ratio.detach()[:, None]
    ratio = token_log_ratio.clamp(max=_SEQUENCE_LOG_RATIO_MAX).exp()
    loss, clipped, dual_clipped = _clipped_surrogate(ratio, advantages, eps_low, eps_high, dual_clip)
    has_tokens = mask.any(dim=-1)
    sequence_clipped = (clipped & mask).any(dim=-1)
    metrics = {
        "clip_fraction": _masked_mean(clipped, mask).detach(),
        "dual_clip_fraction": _masked_mean(dual_clipped, mask).detach(),
        "sequence_clip_fraction": (sequence_clipped.sum() / has_tokens.sum().clamp(min=1)).to(torch.float32),
    }
    return loss, ratio, metrics


def _check_token_tensors(**tensors: torch.Tensor) -> None:
    """All (B, L) and of one shape; the first one named is the reference in the message."""
    (first_name, first), *rest = tensors.items()
    require_tensor(first_name, first)
    require_ndim(first_name, first, 2, "(B, L): one value per response token")
    for name, tensor in rest:
        require_tensor(name, tensor)
        require_same_shape(name, tensor, first_name, first)


__all__ = [
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "aggregate_loss",
    "policy_loss",
    "seq_clip_loss",
    "sequence_log_ratio",
    "sequence_ratio",
    "token_clip_loss",
]
