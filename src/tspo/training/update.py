"""One policy-gradient update: PPO-style clipped loss + KL to the reference + entropy bonus.

Micro-batches accumulate gradients; each micro-batch loss is weighted by its share of the
normaliser (tokens for ``token-mean``, sequences otherwise), so the accumulated gradient equals the
gradient of the loss over the whole batch. Each micro-batch is trimmed to its own longest row and
``seq-mean-token-sum-norm`` divides by a constant, so neither the padding nor the micro-batch size
changes the loss. All masks are the loss mask: observation tokens never enter the policy loss, the KL,
the entropy or the normaliser, and log-probabilities are computed only at those tokens.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from tspo.algorithms import aggregate_loss, kl_penalty, policy_loss
from tspo.training.policy import response_scores, trim_padding
from tspo.trajectory import TrajectoryBatch


@dataclass(frozen=True)
class UpdateSettings:
    policy_loss: str = "token_clip"
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    loss_agg: str = "token-mean"
    # seq-mean-token-sum-norm's constant divisor; None: the step batch's padded response width (the old
    # rule: the loss scale then depends on what else is in the batch).
    loss_scale_factor: float | None = None
    kl_coef: float = 0.001
    kl_kind: str = "low_var_kl"
    entropy_coef: float = 0.0
    micro_batch_size: int = 8
    epochs: int = 1
    grad_clip: float = 1.0
    temperature: float = 1.0
    bf16: bool = False
    # Leave out of the forward/backward passes the rows whose advantages are all zero when there is no
    # KL and no entropy term: their loss and gradient are exactly zero (see ``rows_to_update``).
    skip_zero_advantage_rows: bool = True


class NonFiniteUpdate(RuntimeError):
    """The loss or the gradient norm was NaN/inf; the optimizer step was skipped."""


def _share(mask: torch.Tensor, rows: list[int], loss_agg: str) -> float:
    if loss_agg == "token-mean":
        return float(mask[rows].sum() / mask.sum().clamp(min=1))
    return len(rows) / mask.shape[0]


def rows_to_update(advantages: torch.Tensor, settings: UpdateSettings) -> list[int]:
    """Rows of the batch that can move the weights.

    With ``kl_coef == 0`` and ``entropy_coef == 0`` a row whose token advantages are all zero contributes
    exactly 0 to the clipped loss (every clip branch multiplies by its advantage) and so 0 to the
    gradient. Its forward and backward passes can be left out without changing the update: the
    normaliser still counts it (``_share`` divides by the whole batch's tokens or sequences). GRPO gives
    every row of an all-wrong or all-right group zero advantage, which early in a run is most rows.

    Args:
        advantages: (B, L) token advantages.

    Returns:
        the row indices to run, in batch order (all of them when the shortcut does not apply).
    """
    rows = list(range(advantages.shape[0]))
    if not settings.skip_zero_advantage_rows or settings.kl_coef > 0 or settings.entropy_coef > 0:
        return rows
    return advantages.ne(0).any(dim=1).nonzero().flatten().tolist()


def policy_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TrajectoryBatch,
    old_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    settings: UpdateSettings,
    ref_logprobs: torch.Tensor | None = None,
) -> dict[str, float]:
    """Run ``settings.epochs`` passes of clipped policy-gradient steps over ``batch``.

    Args:
        batch: B trajectories (response length L).
        old_logprobs: (B, L) log-probabilities under the policy that sampled the batch; ``None`` for a
            single on-policy pass (``epochs == 1``), where they equal the current policy's log-probabilities
            (same weights, no dropout) and are taken from the loss's own forward pass instead of a second one.
        advantages: (B, L) token advantages, zero off the loss mask.
        ref_logprobs: (B, L) reference-policy log-probabilities; required when ``kl_coef > 0``.

    Rows that cannot move the weights are not run (:func:`rows_to_update`); ``actor/updated_rows`` is
    the share that was, and the loss, clip and entropy metrics are means over those rows.

    Returns averaged metrics. Raises :class:`NonFiniteUpdate` (after zeroing the gradients) when a
    loss or gradient norm is not finite, so the caller can skip the step and count the failure.
    """
    if settings.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    if old_logprobs is None and settings.epochs != 1:
        raise ValueError("old_logprobs may be omitted only for a single pass (epochs == 1)")
    device = next(model.parameters()).device
    mask = batch.loss_mask
    model.train()
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    params = [p for p in model.parameters() if p.requires_grad]
    rows_all = rows_to_update(advantages, settings)
    scale = batch.response_ids.shape[1] if settings.loss_scale_factor is None else settings.loss_scale_factor
    for _ in range(settings.epochs):
        optimizer.zero_grad(set_to_none=True)
        for start in range(0, len(rows_all), settings.micro_batch_size):
            rows = rows_all[start : start + settings.micro_batch_size]
            micro = trim_padding(batch.select(rows))
            width = micro.response_ids.shape[1]  # the (B, L) inputs are cut to the same first columns
            micro_mask = micro.loss_mask.to(device)
            if micro_mask.sum() == 0:
                continue
            scores = response_scores(
                model,
                micro,
                temperature=settings.temperature,
                with_entropy=True,
                entropy_grad=settings.entropy_coef > 0,
                bf16=settings.bf16,
                positions=micro_mask.bool(),
            )
            loss, metrics = policy_loss(
                settings.policy_loss,
                scores.logprobs,
                scores.logprobs.detach() if old_logprobs is None else old_logprobs[rows, :width].to(device),
                advantages[rows, :width].to(device),
                micro_mask,
                eps_low=settings.eps_low,
                eps_high=settings.eps_high,
                dual_clip=settings.dual_clip,
                agg=settings.loss_agg,
                loss_scale_factor=scale,
            )
            total = loss
            if settings.kl_coef > 0:
                kl = aggregate_loss(
                    kl_penalty(
                        scores.logprobs, ref_logprobs[rows, :width].to(device), settings.kl_kind, micro_mask
                    ),
                    micro_mask,
                    settings.loss_agg,
                    scale,
                )
                total = total + settings.kl_coef * kl
                metrics = {**metrics, "kl": kl.detach()}
            if scores.entropy is not None:
                entropy = aggregate_loss(scores.entropy, micro_mask, settings.loss_agg, scale)
                if settings.entropy_coef > 0:
                    total = total - settings.entropy_coef * entropy
                metrics = {**metrics, "entropy": entropy.detach()}
            if not torch.isfinite(total):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteUpdate(f"non-finite loss {total.item()}")
            (total * _share(mask, rows, settings.loss_agg)).backward()
            sums["loss"] += float(total.detach())
            counts["loss"] += 1
            for key, value in metrics.items():
                sums[key] += float(value)
                counts[key] += 1
        if not rows_all:
            # Nothing to run, yet the optimizer steps with zero gradients exactly as it would have
            # (Adam's moments decay and weight decay applies): skipping rows never changes the update.
            for p in params:
                p.grad = torch.zeros_like(p)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        if not math.isfinite(float(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteUpdate(f"non-finite gradient norm {float(grad_norm)}")
        optimizer.step()
        sums["grad_norm"] += float(grad_norm)
        counts["grad_norm"] += 1
    metrics = {f"actor/{key}": sums[key] / counts[key] for key in sums}
    metrics["actor/updated_rows"] = len(rows_all) / max(1, batch.batch_size)
    return metrics
