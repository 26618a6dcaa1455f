"""Score rollouts: outcome, first-hit turn, per-turn rewards, categories, and group diagnostics (core).

The formulas live in :mod:`tspo.rewards`; this module only applies them to trajectories and lays the
results out as the tensors :mod:`tspo.algorithms` takes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tspo.algorithms import AdvantageInputs, AdvantageOutput, stage_masks
from tspo.protocol import DEFAULT_PROTOCOL, ProtocolConfig
from tspo.rewards import (
    TrajectoryCategory,
    first_hit_turn,
    kimi_length_penalty,
    outcome_score,
    trajectory_category,
    turn_rewards,
)
from tspo.trajectory import Trajectory, TrajectoryBatch


@dataclass(frozen=True)
class TrajectoryScore:
    """Rewards of one trajectory. ``outcome`` is the raw o, kept apart from the shaped rewards;
    ``folr`` is the FOLR part ``F = alpha * [a hit exists]`` of ``total_reward`` (0 when FOLR is off)."""

    answer: str | None
    outcome: float
    first_hit_turn: int | None
    turn_rewards: tuple[float, ...]
    category: str
    folr: float = 0.0

    @property
    def total_reward(self) -> float:
        return sum(self.turn_rewards)


def score_trajectories(
    trajectories: Sequence[Trajectory],
    *,
    metric: str = "em",
    folr_alpha: float = 0.3,
    hit_mode: str = "whole_word",
    length_penalty: float = 0.0,
    protocol: ProtocolConfig = DEFAULT_PROTOCOL,
) -> list[TrajectoryScore]:
    """Score each trajectory; the length penalty, when on, is computed per group (``group_id``)."""
    base: list[tuple[str | None, float, int | None]] = []
    for traj in trajectories:
        answer = traj.final_answer(protocol)
        outcome = outcome_score(answer, traj.golds, metric) if traj.error is None else 0.0
        hit = first_hit_turn(traj.retrieved_passages(protocol), traj.golds, hit_mode)
        base.append((answer, outcome, hit))

    shaping = [0.0] * len(trajectories)
    if length_penalty:
        groups: dict[int, list[int]] = defaultdict(list)
        for row, traj in enumerate(trajectories):
            groups[traj.group_id].append(row)
        for rows in groups.values():
            lengths = [trajectories[r].num_generated_tokens for r in rows]
            correct = [base[r][1] >= 1.0 for r in rows]
            for r, term in zip(rows, kimi_length_penalty(lengths, correct, length_penalty), strict=True):
                shaping[r] = term

    scores = []
    for traj, (answer, outcome, hit), shaped in zip(trajectories, base, shaping, strict=True):
        rewards = turn_rewards(traj.num_turns, hit, outcome, folr_alpha)
        if rewards:
            rewards[-1] += shaped
        scores.append(
            TrajectoryScore(
                answer=answer,
                outcome=outcome,
                first_hit_turn=hit,
                turn_rewards=tuple(rewards),
                category=trajectory_category(hit is not None, outcome),
                folr=folr_alpha if hit is not None and traj.num_turns > 0 else 0.0,
            )
        )
    return scores


def reward_tensors(scores: Sequence[TrajectoryScore], max_turns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(outcome (B,), turn_rewards (B, T)) with T = ``max_turns`` (zero beyond each trajectory's turns)."""
    outcome = torch.tensor([s.outcome for s in scores], dtype=torch.float32)
    rewards = torch.zeros((len(scores), max_turns), dtype=torch.float32)
    for row, score in enumerate(scores):
        if score.turn_rewards:
            rewards[row, : len(score.turn_rewards)] = torch.tensor(score.turn_rewards)
    return outcome, rewards


def hit_tensors(scores: Sequence[TrajectoryScore]) -> tuple[torch.Tensor, torch.Tensor]:
    """(first_hit_turn (B,) long with -1 for none, folr (B,) float32): what TSPO's stages read."""
    first_hit = torch.tensor(
        [-1 if s.first_hit_turn is None else s.first_hit_turn for s in scores], dtype=torch.long
    )
    return first_hit, torch.tensor([s.folr for s in scores], dtype=torch.float32)


def advantage_inputs(
    scores: Sequence[TrajectoryScore], batch: TrajectoryBatch, group_ids: Sequence[int]
) -> AdvantageInputs:
    """The estimator's inputs for collated trajectories and their scores (rows in the same order)."""
    outcome, turn_rewards = reward_tensors(scores, batch.turn_mask.shape[1])
    first_hit, folr = hit_tensors(scores)
    return AdvantageInputs(
        outcome=outcome,
        turn_rewards=turn_rewards,
        turn_mask=batch.turn_mask,
        token_turn_index=batch.token_turn_index,
        loss_mask=batch.loss_mask,
        group_index=torch.tensor(list(group_ids)),
        first_hit_turn=first_hit,
        folr=folr,
    )


def stage_diagnostics(inputs: AdvantageInputs, output: AdvantageOutput) -> dict[str, float]:
    """Where TSPO's signal goes: the share of trajectories that got stage (turn-level) advantages and
    the mean advantage of near misses' retrieval-stage and answer-stage turns (keys absent when empty)."""
    metrics: dict[str, float] = {}
    if output.turn_level is not None:
        metrics["advantage/stage_level"] = float(output.turn_level.float().mean())
    if inputs.first_hit_turn is None:
        return metrics
    near_miss = (inputs.first_hit_turn >= 0) & (inputs.outcome < 1.0)
    retrieval, answer = stage_masks(inputs, inputs.first_hit_turn)
    for name, stage in (("retrieval", retrieval), ("answer", answer)):
        cells = stage & near_miss[:, None]
        if bool(cells.any()):
            metrics[f"advantage/near_miss_{name}_stage"] = float(output.turn_advantages[cells].mean())
    return metrics


def group_diagnostics(scores: Sequence[TrajectoryScore], group_ids: Sequence[int]) -> dict[str, float]:
    """Homogenisation diagnostics of DESIGN section 8 (fractions of groups and of trajectories).

    ``groups/all_wrong`` and ``groups/all_right`` use the raw outcome o, never the shaped reward.
    """
    rows_by_group: dict[int, list[int]] = defaultdict(list)
    for row, gid in enumerate(group_ids):
        rows_by_group[gid].append(row)
    n_groups = max(1, len(rows_by_group))
    all_wrong = all_right = 0
    stds = []
    for rows in rows_by_group.values():
        outcomes = [scores[r].outcome for r in rows]
        totals = torch.tensor([scores[r].total_reward for r in rows])
        all_wrong += all(o <= 0.0 for o in outcomes)
        all_right += all(o >= 1.0 for o in outcomes)
        stds.append(totals.std().item() if len(rows) > 1 else 0.0)
    metrics = {
        "groups/all_wrong": all_wrong / n_groups,
        "groups/all_right": all_right / n_groups,
        "groups/outcome_homogeneous": (all_wrong + all_right) / n_groups,
        "reward/std_in_group": sum(stds) / n_groups,
    }
    n = max(1, len(scores))
    for category in TrajectoryCategory:
        metrics[f"category/{category.value}"] = sum(s.category == category.value for s in scores) / n
    return metrics


def zero_advantage_fraction(
    token_advantages: torch.Tensor | None, kept_group_ids: Sequence[int], groups_drawn: int
) -> float:
    """Share of the drawn groups that give no gradient: filtered out, or kept with all-zero advantages.

    Args:
        token_advantages: (B, L) advantages of the kept trajectories, or None when none was kept.
        kept_group_ids: (B,) group id of each kept trajectory.
        groups_drawn: groups rolled out this step, filtered ones included.
    """
    kept = set(kept_group_ids)
    zero = 0
    if token_advantages is not None and kept:
        ids = torch.tensor(list(kept_group_ids))
        zero = sum(bool((token_advantages[ids == gid] == 0).all()) for gid in kept)
    return (zero + groups_drawn - len(kept)) / max(1, groups_drawn)
