"""Per-group statistics of one value per trajectory, vectorised over the batch.

A group is the set of rollouts of one prompt, identified by ``group_index`` (arbitrary integers, in any
order). Groups are renumbered densely with ``torch.unique(return_inverse=True)`` and every statistic is a
scatter over that id, so the cost does not depend on how many groups there are and there is no Python
loop over trajectories or groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Spreads at or below this count as zero: such a group carries no learning signal. It is the floor of
# spread_tolerance, which widens it to the rounding of the dtype the values were computed in.
ZERO_SPREAD_TOLERANCE = 1e-9
# Rounding steps (ulps of the source dtype, relative to the largest magnitude) a sum of a few per-turn
# rewards may accumulate: R = 0.3 + 1.0 summed in float32 in two orders differs by about 1 ulp.
_SPREAD_ULPS = 8


def spread_tolerance(dtype: torch.dtype, scale: float) -> float:
    """The largest spread that still counts as zero for values computed in ``dtype`` with magnitude up
    to ``scale``: ``8 * eps(dtype) * max(1, scale)``, at least ``ZERO_SPREAD_TOLERANCE``.

    float64 gives the 1e-9 floor; float32 about 1e-6; bfloat16 about 0.06 (it cannot tell 1.3 from 1.31).
    """
    if not dtype.is_floating_point:
        return ZERO_SPREAD_TOLERANCE
    return max(ZERO_SPREAD_TOLERANCE, _SPREAD_ULPS * torch.finfo(dtype).eps * max(1.0, scale))


@dataclass(frozen=True)
class GroupIds:
    """Dense group ids.

    Attributes:
        of_trajectory: (B,) long, the dense id in [0, G) of each trajectory's group.
        size: (G,) long, number of trajectories in each group.
    """

    of_trajectory: torch.Tensor
    size: torch.Tensor

    @property
    def num_groups(self) -> int:
        return self.size.shape[0]


@dataclass(frozen=True)
class GroupStatistics:
    """Statistics of a (B,) value within each of G groups (float64).

    Attributes:
        mean: (G,) group mean; 0 for a group of one (verl's ``compute_grpo_outcome_advantage``).
        std: (G,) unbiased sample std (``torch.std``, correction=1); 1 for a group of one (as verl).
        spread: (G,) max - min within the group (0 for a group of one).
        total: (G,) sum within the group.
    """

    mean: torch.Tensor
    std: torch.Tensor
    spread: torch.Tensor
    total: torch.Tensor
    tolerance: float = ZERO_SPREAD_TOLERANCE

    def zero_spread(self) -> torch.Tensor:
        """(G,) bool: groups whose values are all equal up to ``tolerance`` (no learning signal)."""
        return self.spread <= self.tolerance


def dense_group_ids(group_index: torch.Tensor) -> GroupIds:
    """Renumber ``group_index`` (B,) integer ids densely as [0, G)."""
    _, inverse = torch.unique(group_index, return_inverse=True)
    inverse = inverse.reshape(-1)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    return GroupIds(of_trajectory=inverse, size=torch.bincount(inverse, minlength=num_groups))


def group_statistics(
    values: torch.Tensor, groups: GroupIds, source_dtype: torch.dtype | None = None
) -> GroupStatistics:
    """Mean, unbiased std, spread and sum of ``values`` (B,) within each group, in float64.

    The variance is computed in two passes (mean first, then squared deviations), which is exact for
    the small groups of RL (n = 5..16) and matches ``torch.std`` to rounding. ``source_dtype`` (default:
    the dtype of ``values``) is the precision the values were computed in; it sets the zero-spread
    tolerance (:func:`spread_tolerance`), so float32 or bf16 rounding never passes for a signal.
    """
    tolerance = spread_tolerance(
        source_dtype or values.dtype, float(values.abs().max()) if values.numel() else 0.0
    )
    values = values.to(torch.float64)
    group_of = groups.of_trajectory
    size = groups.size.to(torch.float64)
    zeros = values.new_zeros(groups.num_groups)
    total = zeros.index_add(0, group_of, values)
    mean = total / size
    deviation = values - mean[group_of]
    variance = zeros.index_add(0, group_of, deviation * deviation) / (size - 1).clamp(min=1)
    highest = zeros.scatter_reduce(0, group_of, values, reduce="amax", include_self=False)
    lowest = zeros.scatter_reduce(0, group_of, values, reduce="amin", include_self=False)
    singleton = groups.size == 1
    return GroupStatistics(
        mean=torch.where(singleton, 0.0, mean),
        std=torch.where(singleton, 1.0, variance.sqrt()),
        spread=highest - lowest,
        total=total,
        tolerance=tolerance,
    )
