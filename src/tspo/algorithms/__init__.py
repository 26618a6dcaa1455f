"""Pure tensor functions of RL for search agents (DESIGN section 5): advantage estimators, policy losses,
loss aggregation, KL estimators, entropy and group filters, each family in a name registry.

Shapes: B trajectories, T turns, L response tokens. See ``docs/algorithms.md`` for the formulas.
"""

from tspo.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    DEFAULT_EPS,
    DEFAULT_RECLAIM,
    TSPO_MODES,
    AdvantageInputs,
    AdvantageOutput,
    broadcast_turn_advantages,
    check_estimator_options,
    compute_advantages,
    discounted_turn_returns,
    drgrpo_advantages,
    dspo_advantages,
    grpo_advantages,
    rloo_advantages,
    stage_masks,
    tspo_advantages,
)
from tspo.algorithms.entropy import entropy_from_logits
from tspo.algorithms.filters import GROUP_FILTERS, group_filter_mask
from tspo.algorithms.groups import ZERO_SPREAD_TOLERANCE, GroupStatistics, dense_group_ids, group_statistics
from tspo.algorithms.kl import KL_ESTIMATORS, kl_penalty
from tspo.algorithms.losses import (
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    aggregate_loss,
    policy_loss,
    sequence_log_ratio,
    sequence_ratio,
)
from tspo.algorithms.registry import Registry, UnknownNameError
from tspo.algorithms.table import (
    ALGORITHMS,
    DEFAULT_DUAL_CLIP,
    AlgorithmSpec,
    ResolvedAlgorithm,
    resolve_algorithm,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "ALGORITHMS",
    "DEFAULT_DUAL_CLIP",
    "DEFAULT_EPS",
    "DEFAULT_RECLAIM",
    "GROUP_FILTERS",
    "KL_ESTIMATORS",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "TSPO_MODES",
    "ZERO_SPREAD_TOLERANCE",
    "AdvantageInputs",
    "AdvantageOutput",
    "AlgorithmSpec",
    "GroupStatistics",
    "Registry",
    "ResolvedAlgorithm",
    "UnknownNameError",
    "aggregate_loss",
    "broadcast_turn_advantages",
    "check_estimator_options",
    "compute_advantages",
    "dense_group_ids",
    "discounted_turn_returns",
    "drgrpo_advantages",
    "dspo_advantages",
    "entropy_from_logits",
    "group_filter_mask",
    "group_statistics",
    "grpo_advantages",
    "kl_penalty",
    "policy_loss",
    "resolve_algorithm",
    "rloo_advantages",
    "sequence_log_ratio",
    "sequence_ratio",
    "stage_masks",
    "tspo_advantages",
]
