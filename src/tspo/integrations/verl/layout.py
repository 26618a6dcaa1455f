"""verl batch <-> tspo turn layout: where rewards sit on response tokens, and how to read them back.

verl hands an advantage estimator only ``token_level_rewards`` (B, L), ``response_mask`` (B, L) and the
group ``index`` (``verl/trainer/ppo/ray_trainer.py::compute_advantage``); no per-sample side channel
reaches it. So the turn structure and the raw outcome travel *inside* those two tensors, under one
placement convention that the tspo agent loop writes and the tspo estimator reads:

- a **turn** is a maximal run of ``response_mask == 1`` tokens (the policy's generation ``g_k``) plus the
  mask-0 tokens after it up to the next run (its observation ``o_k``; DESIGN section 2);
- the **outcome** ``o`` sits on the *last generated token* of the response (``response_mask == 1``);
- every shaped per-turn term (the FOLR partial reward ``alpha`` of the first-hit turn) sits on the
  *turn-end token*: the last token of the turn, i.e. the last observation token of a turn that has an
  observation (a hit always has one, so the partial reward always lands on a mask-0 token);
- so ``r_k`` = sum of ``token_level_rewards`` over turn k's span, and ``o`` = the value on the last
  generated token, exactly and independently, for every trajectory (including one cut off right after
  a search observation, whose last turn both hits and ends the response);
- and the first-hit turn ``k*`` and the FOLR part ``F`` are the turn and value of the one reward on an
  observation (mask-0) token: the agent loop writes them there (:func:`place_rewards`) and
  :func:`read_first_hit` reads exactly that token, so TSPO's stages come from the agent loop's record,
  never from the per-turn sums.

In-reward KL (``algorithm.use_kl_in_reward``) would add ``-beta * KL`` to generated tokens and blur ``o``;
the estimator refuses it (TSPO uses the KL term in the actor loss instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TurnLayout:
    """Turn structure recovered from a verl response mask.

    Shapes: B rows, L response tokens, T = the largest number of turns in the batch (at least 1).

    Attributes:
        token_turn_index: (B, L) long, turn of each generated token; -1 on mask-0 tokens.
        span_turn_index: (B, L) long, turn whose span holds each position (generated and observation
            tokens, and the padding after the last turn); -1 before the first generated token.
        turn_mask: (B, T) bool, True where turn k exists.
        num_turns: (B,) long, number of turns (generated runs) of each row.
        last_generated: (B,) long, position of the last generated token; -1 for a row without one.
    """

    token_turn_index: torch.Tensor
    span_turn_index: torch.Tensor
    turn_mask: torch.Tensor
    num_turns: torch.Tensor
    last_generated: torch.Tensor

    @property
    def max_turns(self) -> int:
        return self.turn_mask.shape[1]


def turn_layout(response_mask: torch.Tensor) -> TurnLayout:
    """Recover turns from the runs of generated tokens in ``response_mask``.

    Args:
        response_mask: (B, L) int/bool/float, 1 on policy-generated tokens, 0 on observation and padding.
    """
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be 2-D (B, L), got shape {tuple(response_mask.shape)}")
    mask = response_mask.bool()
    batch, length = mask.shape
    previous = torch.zeros_like(mask)
    previous[:, 1:] = mask[:, :-1]
    starts = mask & ~previous
    span_turn_index = starts.long().cumsum(dim=1) - 1
    num_turns = starts.sum(dim=1)
    max_turns = max(int(num_turns.max().item()) if batch else 0, 1)
    token_turn_index = torch.where(mask, span_turn_index, torch.full_like(span_turn_index, -1))
    turn_mask = torch.arange(max_turns, device=mask.device).unsqueeze(0) < num_turns.unsqueeze(1)
    positions = torch.arange(length, device=mask.device).expand(batch, length)
    last_generated = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)
    if length == 0:
        last_generated = torch.full((batch,), -1, dtype=torch.long, device=mask.device)
    return TurnLayout(
        token_turn_index=token_turn_index,
        span_turn_index=span_turn_index,
        turn_mask=turn_mask,
        num_turns=num_turns,
        last_generated=last_generated,
    )


def read_turn_rewards(token_level_rewards: torch.Tensor, layout: TurnLayout) -> torch.Tensor:
    """Per-turn rewards ``r_{i,k}``: the sum of ``token_level_rewards`` over each turn's span.

    Args:
        token_level_rewards: (B, L) float.

    Returns:
        (B, T) float, 0 beyond each row's last turn.

    Raises:
        ValueError: a reward sits before a row's first generated token (or on a row without one),
            where no turn can own it.
    """
    orphan = (layout.span_turn_index < 0) & (token_level_rewards != 0)
    if orphan.any():
        row, position = (int(v) for v in orphan.nonzero()[0])
        raise ValueError(
            f"token_level_rewards[{row}, {position}] = {token_level_rewards[row, position].item()} lies before "
            f"the first generated token of row {row}; no turn owns it (is response_mask right?)"
        )
    owned = layout.span_turn_index >= 0
    rewards = torch.zeros(
        (token_level_rewards.shape[0], layout.max_turns),
        dtype=token_level_rewards.dtype,
        device=token_level_rewards.device,
    )
    return rewards.scatter_add_(
        1, layout.span_turn_index.clamp(min=0), torch.where(owned, token_level_rewards, 0.0)
    )


def read_outcome(token_level_rewards: torch.Tensor, layout: TurnLayout) -> torch.Tensor:
    """The raw outcome ``o_i``: the reward on each row's last generated token (0 without one).

    Args:
        token_level_rewards: (B, L) float.

    Returns:
        (B,) float.
    """
    has_token = layout.last_generated >= 0
    values = token_level_rewards.gather(1, layout.last_generated.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(has_token, values, torch.zeros_like(values))


def read_first_hit(
    token_level_rewards: torch.Tensor, layout: TurnLayout, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The agent loop's first-hit record: ``k*`` (-1 for none) and the FOLR part ``F`` of each row.

    Args:
        token_level_rewards: (B, L) float.
        response_mask: (B, L), 1 on generated tokens.

    Returns:
        (first_hit_turn (B,) long, folr (B,) float).

    Raises:
        ValueError: a row holds rewards on two observation tokens (the convention places one).
    """
    on_observation = (response_mask == 0) & (token_level_rewards != 0) & (layout.span_turn_index >= 0)
    count = on_observation.sum(dim=1)
    if bool((count > 1).any()):
        row = int((count > 1).nonzero()[0])
        raise ValueError(
            f"row {row} holds rewards on {int(count[row])} observation tokens; the tspo agent loop places "
            "one (the FOLR reward on the first-hit turn's end token)"
        )
    position = on_observation.long().argmax(dim=1, keepdim=True)
    has_hit = count > 0
    turn = layout.span_turn_index.gather(1, position).squeeze(1)
    value = token_level_rewards.gather(1, position).squeeze(1)
    return torch.where(has_hit, turn, -1), torch.where(has_hit, value, 0.0)


def group_ids(
    index: Sequence[object] | np.ndarray | torch.Tensor, device: torch.device | None = None
) -> torch.Tensor:
    """Dense group ids (B,) long from verl's per-row group key (``uid``: strings or ints).

    Rows with equal keys share an id; ids are numbered in order of first appearance.
    """
    keys = index.tolist() if isinstance(index, (np.ndarray, torch.Tensor)) else list(index)
    numbering: dict[object, int] = {}
    ids = [numbering.setdefault(key, len(numbering)) for key in keys]
    return torch.tensor(ids, dtype=torch.long, device=device)


def place_rewards(
    response_mask: Sequence[int],
    turn_ends: Sequence[int],
    turn_terms: Sequence[float],
    outcome: float,
) -> list[float]:
    """Token rewards of one response under the placement convention of this module (the writer side).

    Args:
        response_mask: one 0/1 entry per response token.
        turn_ends: position of each turn's last token (its last observation token, or its last generated
            token when the turn has no observation); one per turn, increasing.
        turn_terms: shaped per-turn rewards without the outcome (the FOLR partial reward), one per turn.
        outcome: raw outcome ``o``, placed on the last generated token.

    Returns:
        One float per response token.
    """
    if len(turn_ends) != len(turn_terms):
        raise ValueError(f"{len(turn_ends)} turn ends but {len(turn_terms)} turn rewards")
    rewards = [0.0] * len(response_mask)
    generated = [position for position, flag in enumerate(response_mask) if flag]
    if not generated:
        if outcome or any(turn_terms):
            raise ValueError("a response without generated tokens cannot carry a reward")
        return rewards
    last_generated = generated[-1]
    for end, term in zip(turn_ends, turn_terms, strict=True):
        if not 0 <= end < len(rewards):
            raise ValueError(f"turn end {end} is outside the response of {len(rewards)} tokens")
        if term and end == last_generated:
            # Only an observation-less last turn ends on the last generated token, and a turn without an
            # observation cannot hold a retrieval hit, so a shaped term here would be inseparable from o.
            raise ValueError(f"a shaped turn reward on the last generated token {end} would mix with o")
        rewards[end] += float(term)
    rewards[last_generated] += float(outcome)
    return rewards
