"""First-Occurrence Latent Reward (FOLR; TSPO, Ma et al. 2026, arXiv 2601.22776).

``hit(o_k)``: some gold alias occurs inside one retrieved passage of turn k's observation. ``k*`` is the first turn with a
hit. Turn rewards are ``r_k = alpha * [k == k*] + o * [k == K]`` and the trajectory total is
``R = o + alpha * [a hit exists]``: only the first hit pays, and ``0 < alpha < 1`` ranks a near miss
below any success. Only observation text is inspected, never the model's own text or the question.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import Enum

from tspo.rewards.answer_match import normalize_answer

# Markup characters that separate words in retrieved text ("Paris</information>", "Doc 1(Title: X)").
# SQuAD normalisation deletes punctuation, which would glue such words together, so for whole-word
# matching these become spaces first (on both the text and the alias, so both sides agree).
_WORD_SEPARATORS = str.maketrans({char: " " for char in "<>()[]{}/|\\"})


def _normalize_for_match(text: str) -> str:
    return normalize_answer(text.translate(_WORD_SEPARATORS))


class HitMode(str, Enum):
    """How a gold alias must occur in an observation to count as a hit."""

    # The normalized alias occurs as a whole-word sequence of the normalized observation.
    WHOLE_WORD = "whole_word"
    # Plain substring of the normalized observation (Search-R1's ``is_retrieval_correct``).
    SUBSTRING = "substring"


def answer_in_text(text: str, golds: str | Iterable[str], mode: HitMode | str = HitMode.WHOLE_WORD) -> bool:
    """Whether some normalized, non-empty gold alias occurs in the normalized ``text``."""
    mode = HitMode(mode)
    if isinstance(golds, str):
        golds = [golds]
    # Substring mode is Search-R1's is_retrieval_correct: plain SQuAD normalisation on both sides.
    normalize = normalize_answer if mode is HitMode.SUBSTRING else _normalize_for_match
    normalized_text = normalize(text)
    if not normalized_text:
        return False
    padded_text = f" {normalized_text} "
    for gold in golds:
        normalized_gold = normalize(gold)
        if not normalized_gold:
            continue
        if mode is HitMode.SUBSTRING:
            if normalized_gold in normalized_text:
                return True
        elif f" {normalized_gold} " in padded_text:
            return True
    return False


def first_hit_turn(
    observations: Sequence[str | Sequence[str]],
    golds: str | Iterable[str],
    mode: HitMode | str = HitMode.WHOLE_WORD,
) -> int | None:
    """``k*``: the index of the first turn whose retrieved text holds a gold alias, or ``None``.

    Args:
        observations: one entry per turn: the turn's retrieved passages (a list; an alias must occur
            inside one passage, never across two, as in Search-R1's ``is_retrieval_correct``), or one
            string treated as a single passage (``""`` or ``[]`` for a turn without an observation).
    """
    golds = [golds] if isinstance(golds, str) else list(golds)
    for turn, passages in enumerate(observations):
        if isinstance(passages, str):
            passages = [passages]
        if any(passage and answer_in_text(passage, golds, mode) for passage in passages):
            return turn
    return None


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"FOLR alpha must be in [0, 1) so a near miss ranks below a success, got {alpha}")


def turn_rewards(
    num_turns: int, first_hit_turn: int | None, outcome: float, alpha: float = 0.3
) -> list[float]:
    """Per-turn rewards ``r_k = alpha * [k == k*] + o * [k == K]`` (K = last turn).

    ``alpha = 0`` gives plain outcome rewards (GRPO). A trajectory with no turn gets no reward.
    """
    _check_alpha(alpha)
    if num_turns < 0:
        raise ValueError(f"num_turns must be >= 0, got {num_turns}")
    if first_hit_turn is not None and not 0 <= first_hit_turn < num_turns:
        raise ValueError(f"first_hit_turn {first_hit_turn} is outside the {num_turns} turns")
    rewards = [0.0] * num_turns
    if num_turns == 0:
        return rewards
    if first_hit_turn is not None:
        rewards[first_hit_turn] += alpha
    rewards[-1] += outcome
    return rewards


def trajectory_total(first_hit_turn: int | None, outcome: float, alpha: float = 0.3) -> float:
    """``R = o + alpha * [a hit exists]``."""
    _check_alpha(alpha)
    return outcome + (alpha if first_hit_turn is not None else 0.0)
