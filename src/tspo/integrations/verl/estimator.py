"""The ``tspo`` advantage estimator (TSPO v2 stage advantages), registered in verl's ``ADV_ESTIMATOR_REGISTRY``.

verl's ``compute_advantage`` (``verl/trainer/ppo/ray_trainer.py``) calls a registered estimator with
``token_level_rewards``, ``response_mask``, ``index`` (the group ``uid``) and ``config``
(``config.algorithm``). This adapter recovers the turn layout, the per-turn rewards and the raw outcome
from those tensors (:mod:`tspo.integrations.verl.layout`) and hands them to
:func:`tspo.algorithms.compute_advantages`: the formula lives there and only there.

Options come from ``algorithm.tspo`` in verl's config (add the keys with Hydra's ``++`` prefix)::

    algorithm.adv_estimator=tspo ++algorithm.tspo.mode=adaptive ++algorithm.tspo.reclaim=1.0

- ``mode``: ``adaptive`` (default), ``turn``, ``traj`` or ``legacy`` (as in :mod:`tspo.algorithms`);
- ``reclaim``: beta, the search credit a wrong answer gives back (default 1.0);
- ``gamma``: the legacy mode's turn discount (default 1.0); ``eps``: std epsilon (default 1e-6);
- ``length_penalty``: weight of the Kimi k1.5 length shaping added to the last turn (default 0: off).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from verl.trainer.ppo.core_algos import register_adv_est

from tspo.algorithms import DEFAULT_EPS, DEFAULT_RECLAIM, TSPO_MODES, AdvantageInputs, compute_advantages
from tspo.integrations.verl.layout import (
    TurnLayout,
    group_ids,
    read_first_hit,
    read_outcome,
    read_turn_rewards,
    turn_layout,
)
from tspo.rewards import kimi_length_penalty

ESTIMATOR_NAME = "tspo"
_OPTION_DEFAULTS: dict[str, Any] = {
    "mode": "adaptive",
    "reclaim": DEFAULT_RECLAIM,
    "gamma": 1.0,
    "eps": DEFAULT_EPS,
    "length_penalty": 0.0,
}


def tspo_options(config: Any) -> dict[str, Any]:
    """The estimator options from verl's algorithm config (``algorithm.tspo``), defaults filled in.

    Raises:
        ValueError: an unknown option, an unknown mode, or in-reward KL switched on.
    """
    if config is not None and bool(_get(config, "use_kl_in_reward", False)):
        raise ValueError(
            "adv_estimator=tspo reads the outcome from the last generated token, which "
            "algorithm.use_kl_in_reward=True changes; use actor_rollout_ref.actor.use_kl_loss=True instead"
        )
    section = _get(config, "tspo", None) if config is not None else None
    given = dict(_to_mapping(section)) if section is not None else {}
    unknown = sorted(set(given) - set(_OPTION_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown algorithm.tspo option(s) {unknown}; valid: {sorted(_OPTION_DEFAULTS)}")
    options = {**_OPTION_DEFAULTS, **given}
    if options["mode"] not in TSPO_MODES:
        raise ValueError(f"algorithm.tspo.mode must be one of {TSPO_MODES}, got {options['mode']!r}")
    if float(options["gamma"]) != 1.0 and options["mode"] != "legacy":
        raise ValueError(f"algorithm.tspo.gamma applies only to mode legacy, not {options['mode']}")
    return options


def _get(config: Any, key: str, default: Any) -> Any:
    getter = getattr(config, "get", None)
    return getter(key, default) if getter is not None else getattr(config, key, default)


def _to_mapping(section: Any) -> Mapping[str, Any]:
    if isinstance(section, Mapping):
        return section
    try:  # omegaconf.DictConfig
        from omegaconf import DictConfig, OmegaConf

        if isinstance(section, DictConfig):
            return OmegaConf.to_container(section, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf ships with verl
        pass
    raise ValueError(f"algorithm.tspo must be a mapping of options, got {section!r}")


def build_advantage_inputs(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any,
    length_penalty: float = 0.0,
) -> tuple[AdvantageInputs, TurnLayout]:
    """The :class:`AdvantageInputs` encoded in a verl batch (see :mod:`tspo.integrations.verl.layout`).

    Args:
        token_level_rewards: (B, L) float, rewards placed by the tspo agent loop.
        response_mask: (B, L), 1 on generated tokens.
        index: (B,) group keys (verl's ``uid``).
        length_penalty: weight of the Kimi length shaping (:func:`tspo.rewards.kimi_length_penalty`)
            added to each trajectory's last turn; 0 leaves the rewards as placed.
    """
    if token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_level_rewards has shape {tuple(token_level_rewards.shape)} but response_mask has shape "
            f"{tuple(response_mask.shape)}"
        )
    if index is None:
        raise ValueError("adv_estimator=tspo needs the group index (verl's uid) to form groups")
    rewards = token_level_rewards.float()
    layout = turn_layout(response_mask)
    turn_rewards = read_turn_rewards(rewards, layout)
    outcome = read_outcome(rewards, layout)
    first_hit, folr = read_first_hit(rewards, layout, response_mask)
    groups = group_ids(index, device=rewards.device)
    if groups.shape[0] != rewards.shape[0]:
        raise ValueError(f"index has {groups.shape[0]} entries but the batch has {rewards.shape[0]} rows")
    if length_penalty:
        shaping = _length_shaping(response_mask, outcome, groups, length_penalty)
        last_turn = (layout.num_turns - 1).clamp(min=0).unsqueeze(1)
        has_turn = (layout.num_turns > 0).unsqueeze(1)
        turn_rewards = turn_rewards.scatter_add(
            1, last_turn, torch.where(has_turn, shaping.unsqueeze(1), 0.0)
        )
    inputs = AdvantageInputs(
        outcome=outcome,
        turn_rewards=turn_rewards,
        turn_mask=layout.turn_mask,
        token_turn_index=layout.token_turn_index,
        loss_mask=response_mask.float(),
        group_index=groups,
        first_hit_turn=first_hit,
        folr=folr,
    )
    return inputs, layout


def _length_shaping(
    response_mask: torch.Tensor, outcome: torch.Tensor, groups: torch.Tensor, weight: float
) -> torch.Tensor:
    """(B,) Kimi length shaping per row, computed group by group on generated-token counts."""
    lengths = response_mask.bool().sum(dim=1).tolist()
    correct = (outcome >= 1.0).tolist()
    shaping = torch.zeros_like(outcome)
    group_array = groups.cpu().numpy()
    for group in np.unique(group_array):
        rows = np.flatnonzero(group_array == group).tolist()
        terms = kimi_length_penalty([lengths[r] for r in rows], [correct[r] for r in rows], weight)
        shaping[rows] = torch.tensor(terms, dtype=shaping.dtype, device=shaping.device)
    return shaping


@register_adv_est(ESTIMATOR_NAME)
def compute_tspo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Any = None,
    config: Any = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TSPO advantages for verl (our v2 reconstruction of Ma et al. 2026, arXiv 2601.22776; the formula
    lives in :func:`tspo.algorithms.tspo_advantages` and only there).

    Args:
        token_level_rewards: (B, L) float, the FOLR partial reward on the first-hit turn's end token and
            the outcome on the last generated token (the tspo agent loop's placement).
        response_mask: (B, L), 1 on generated tokens, 0 on observation and padding tokens.
        index: (B,) group keys (verl passes ``non_tensor_batch["uid"]``).
        config: verl's ``algorithm`` config; options under ``algorithm.tspo``.
        **unused: other keyword arguments verl may pass (e.g. ``reward_baselines``).

    Returns:
        (advantages, returns), both (B, L) float, 0 wherever ``response_mask`` is 0 (no critic: the
        returns are the advantages, as for verl's GRPO).
    """
    options = tspo_options(config)
    with torch.no_grad():
        inputs, _ = build_advantage_inputs(
            token_level_rewards, response_mask, index, length_penalty=float(options["length_penalty"])
        )
        estimator_options: dict[str, Any] = {"mode": options["mode"], "eps": float(options["eps"])}
        if options["mode"] == "legacy":
            estimator_options["gamma"] = float(options["gamma"])
        else:
            estimator_options["reclaim"] = float(options["reclaim"])
        output = compute_advantages(ESTIMATOR_NAME, inputs, **estimator_options)
        advantages = output.token_advantages.to(token_level_rewards.dtype)
    return advantages, advantages
