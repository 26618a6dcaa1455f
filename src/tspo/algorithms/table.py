"""The algorithm table: what each ``algorithm.name`` means, decided in one place for every path.

An algorithm is an advantage estimator with its options, whether FOLR is paid (the reward), the policy
loss and the group filter. The local trainer, ``tspo algo-demo``, ``tspo verl launch`` and the learning
benchmark all read :data:`ALGORITHMS`, so a baseline can never be trained on a different reward or loss
on one path than on another. No baseline is paid FOLR; an explicit override that asks for it is allowed
(``pay_folr=True``) and reported by :func:`resolve_algorithm` so that callers can log it.

On verl, each algorithm maps to a verl ``adv_estimator`` plus Hydra overrides
(:attr:`AlgorithmSpec.verl_overrides`): ``dspo`` runs there as verl's GRPO with sequence-level clipping
(the ``gspo`` loss mode) and the V1 trainer's group filter on the reward function's ``outcome``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from tspo.algorithms.advantages import TSPO_MODES, check_estimator_options
from tspo.algorithms.filters import GROUP_FILTERS
from tspo.algorithms.losses import POLICY_LOSSES
from tspo.algorithms.registry import Registry

# verl 0.9.1's ``actor.clip_ratio_c``: with A < 0 the clipped loss is bounded by c * |A| (dual clip,
# Ye et al. 2020). The local trainer uses the same default so one algorithm trains alike on both paths.
DEFAULT_DUAL_CLIP = 3.0


@dataclass(frozen=True)
class AlgorithmSpec:
    """One row of the table.

    Attributes:
        name: the ``algorithm.name`` users write.
        summary: one line for tables and ``--help``.
        estimator: registered advantage estimator (:data:`tspo.algorithms.ADVANTAGE_ESTIMATORS`).
        estimator_options: keyword options of the estimator (e.g. ``{"mode": "adaptive"}``).
        pays_folr: whether the First-Occurrence Latent Reward is part of R (only TSPO's rows).
        policy_loss: registered policy loss (``token_clip`` or ``seq_clip``).
        group_filter: registered group filter (``none``, ``outcome``, ``reward``).
        verl_estimator: verl's ``algorithm.adv_estimator`` that implements the row.
        verl_overrides: further Hydra overrides of ``verl.trainer.main_ppo`` the row needs.
    """

    name: str
    summary: str
    estimator: str
    estimator_options: Mapping[str, Any] = field(default_factory=dict)
    pays_folr: bool = False
    policy_loss: str = "token_clip"
    group_filter: str = "none"
    verl_estimator: str = "grpo"
    verl_overrides: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_estimator_options(self.estimator, self.estimator_options)
        POLICY_LOSSES.get(self.policy_loss)
        GROUP_FILTERS.get(self.group_filter)
        object.__setattr__(self, "estimator_options", MappingProxyType(dict(self.estimator_options)))


ALGORITHMS: Registry[AlgorithmSpec] = Registry("algorithm")


def _add(spec: AlgorithmSpec) -> None:
    ALGORITHMS.register(spec.name)(spec)


_TSPO_SUMMARY = {
    "adaptive": "TSPO v2: stage advantages in outcome-homogeneous groups, GRPO on R elsewhere",
    "turn": "TSPO v2 stage advantages in every group",
    "traj": "GRPO on R = o + FOLR (trajectory-level everywhere)",
    "legacy": "TSPO v1 rule (return-to-go minus mean R), kept for ablation",
}
for _mode in TSPO_MODES:
    _add(
        AlgorithmSpec(
            name="tspo" if _mode == "adaptive" else f"tspo_{_mode}",
            summary=_TSPO_SUMMARY[_mode],
            estimator="tspo",
            estimator_options={"mode": _mode},
            pays_folr=True,
            verl_estimator="tspo",
        )
    )
_add(AlgorithmSpec(name="grpo", summary="GRPO on the outcome o", estimator="grpo"))
_add(
    AlgorithmSpec(
        name="drgrpo",
        summary="Dr.GRPO: GRPO without the std division",
        estimator="grpo",
        estimator_options={"norm_by_std": False},
        verl_overrides=("algorithm.norm_adv_by_std_in_grpo=false",),
    )
)
_add(
    AlgorithmSpec(
        name="rloo", summary="RLOO: leave-one-out baseline on o", estimator="rloo", verl_estimator="rloo"
    )
)
_add(
    AlgorithmSpec(
        name="dspo",
        summary="DSPO: GRPO on o, sequence-level clip, groups with zero outcome spread re-drawn",
        estimator="dspo",
        policy_loss="seq_clip",
        group_filter="outcome",
        verl_overrides=(
            "actor_rollout_ref.actor.policy_loss.loss_mode=gspo",
            # verl's V1 trainer re-draws groups (DAPO dynamic sampling) on the reward function's outcome
            "algorithm.filter_groups.enable=true",
            "algorithm.filter_groups.metric=outcome",
        ),
    )
)


@dataclass(frozen=True)
class ResolvedAlgorithm:
    """An algorithm with the user's overrides applied: what a run actually trains with.

    Attributes:
        spec: the table row.
        estimator_options: the row's options updated by the overrides.
        pays_folr: whether R includes FOLR.
        policy_loss, group_filter: as the row says unless overridden.
        overrides: human-readable notes on each setting that departs from the row (to be logged).
    """

    spec: AlgorithmSpec
    estimator_options: Mapping[str, Any]
    pays_folr: bool
    policy_loss: str
    group_filter: str
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def estimator(self) -> str:
        return self.spec.estimator

    def folr_alpha(self, alpha: float) -> float:
        """The FOLR alpha this algorithm trains with: ``alpha`` if FOLR is paid, else 0."""
        return alpha if self.pays_folr else 0.0


def resolve_algorithm(
    name: str,
    *,
    estimator_options: Mapping[str, Any] | None = None,
    pay_folr: bool | None = None,
    policy_loss: str | None = None,
    group_filter: str | None = None,
) -> ResolvedAlgorithm:
    """Look ``name`` up in the table and apply explicit overrides (None keeps the row's choice).

    Raises:
        UnknownNameError: ``name`` is not in the table (the message lists the valid names).
        ValueError: an option the estimator does not take, or an unknown loss or filter.
    """
    spec = ALGORITHMS.get(name)
    notes: list[str] = []
    options = dict(spec.estimator_options)
    for key, value in (estimator_options or {}).items():
        if options.get(key, _MISSING) != value:
            notes.append(f"{spec.estimator} option {key}={value!r}")
        options[key] = value
    check_estimator_options(spec.estimator, options)
    folr = spec.pays_folr if pay_folr is None else pay_folr
    if folr != spec.pays_folr:
        notes.append("FOLR paid" if folr else "FOLR not paid")
    loss = policy_loss or spec.policy_loss
    POLICY_LOSSES.get(loss)
    if loss != spec.policy_loss:
        notes.append(f"policy loss {loss}")
    group = group_filter or spec.group_filter
    GROUP_FILTERS.get(group)
    if group != spec.group_filter:
        notes.append(f"group filter {group}")
    return ResolvedAlgorithm(
        spec=spec,
        estimator_options=MappingProxyType(options),
        pays_folr=folr,
        policy_loss=loss,
        group_filter=group,
        overrides=tuple(notes),
    )


_MISSING = object()

__all__ = [
    "ALGORITHMS",
    "DEFAULT_DUAL_CLIP",
    "AlgorithmSpec",
    "ResolvedAlgorithm",
    "resolve_algorithm",
]
