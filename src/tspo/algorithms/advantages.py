"""Group-relative advantage estimators: GRPO, Dr.GRPO, DSPO, RLOO and TSPO (DESIGN section 5).

Shapes: B trajectories, T turns (``T`` = the most turns any trajectory has), L response tokens.

Every estimator reads an :class:`AdvantageInputs` and returns per-turn advantages ``A_{i,k}`` (B, T)
together with their token-level broadcast (B, L): each generated token of turn k gets ``A_{i,k}``, every
other token (observation, padding) gets exactly 0. Group statistics are scatters over dense group ids
(:mod:`tspo.algorithms.groups`), so there is no Python loop over trajectories or groups; the only loops
are over the T turns (discounted returns) and, on CPU, over cache-sized blocks of rows in
:func:`broadcast_turn_advantages`.

Notation: ``R_i = sum_k r_{i,k}`` is the trajectory's total reward (outcome plus FOLR and any shaping),
``o_i`` its raw outcome, ``mean_g`` / ``std_g`` the mean and unbiased std over the trajectory's group
(``eps = 1e-6``; a group of one has mean 0 and std 1, as verl's ``compute_grpo_outcome_advantage``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tspo.algorithms._checks import (
    as_bool_mask,
    require_finite,
    require_integer,
    require_ndim,
    require_rows,
    require_same_shape,
    require_tensor,
)
from tspo.algorithms.groups import GroupIds, GroupStatistics, dense_group_ids, group_statistics
from tspo.algorithms.registry import Registry

DEFAULT_EPS = 1e-6
TSPO_MODES = ("adaptive", "turn", "traj", "legacy")
DEFAULT_RECLAIM = 1.0


@dataclass(frozen=True)
class AdvantageInputs:
    """What every advantage estimator reads (the contract between scoring and the trainer).

    Attributes:
        outcome: (B,) float, raw outcome ``o_i`` in [0, 1] (EM / F1), never shaped.
        turn_rewards: (B, T) float, per-turn rewards ``r_{i,k}`` (FOLR alpha on the first-hit turn,
            ``o_i`` plus optional length shaping on the last turn); 0 beyond the last turn.
        turn_mask: (B, T) bool, True where turn k exists (``k < K_i``; a prefix of each row).
        token_turn_index: (B, L) integer, turn of each response token; -1 on padding.
        loss_mask: (B, L) float (0/1) or bool, 1 only on policy-generated tokens.
        group_index: (B,) integer, id of the prompt group (arbitrary ints, in any order).
        first_hit_turn: (B,) integer or None, ``k*_i``: the first turn whose retrieved passages hold a
            gold answer, -1 for none. Filled by scoring (local trainer) or the agent loop (verl); TSPO's
            stage advantages read it here and never re-derive it from where rewards sit.
        folr: (B,) float or None, the FOLR part ``F_i = alpha * h_i`` of the trajectory's total reward
            (0 without a hit; 0 everywhere when FOLR is off). ``O_i = R_i - F_i`` is the rest.
    """

    outcome: torch.Tensor
    turn_rewards: torch.Tensor
    turn_mask: torch.Tensor
    token_turn_index: torch.Tensor
    loss_mask: torch.Tensor
    group_index: torch.Tensor
    first_hit_turn: torch.Tensor | None = None
    folr: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.outcome.shape[0]

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first problem: wrong type, shape or dtype, an empty batch,
        a non-finite reward, a turn mask that is not a prefix, or a reward on a turn that does not exist.
        Token-level checks (turn indices in range, generated tokens on existing turns) are done while
        broadcasting, where they cost nothing extra."""
        for name in ("outcome", "turn_rewards", "turn_mask", "token_turn_index", "loss_mask", "group_index"):
            require_tensor(name, getattr(self, name))
        require_ndim("outcome", self.outcome, 1, "(B,): one outcome per trajectory")
        if self.outcome.shape[0] == 0:
            raise ValueError("empty batch: outcome has no trajectories (a group needs at least one)")
        batch = self.outcome.shape[0]
        require_ndim("turn_rewards", self.turn_rewards, 2, "(B, T): one reward per turn")
        require_rows("turn_rewards", self.turn_rewards, batch, "outcome")
        require_same_shape("turn_rewards", self.turn_rewards, "turn_mask", self.turn_mask)
        if self.turn_mask.dtype != torch.bool:
            raise ValueError(f"turn_mask must be a bool tensor, got dtype {self.turn_mask.dtype}")
        require_ndim("token_turn_index", self.token_turn_index, 2, "(B, L): one turn index per token")
        require_rows("token_turn_index", self.token_turn_index, batch, "outcome")
        require_integer("token_turn_index", self.token_turn_index)
        require_same_shape("loss_mask", self.loss_mask, "token_turn_index", self.token_turn_index)
        require_ndim("group_index", self.group_index, 1, "(B,): one group id per trajectory")
        require_rows("group_index", self.group_index, batch, "outcome")
        require_integer("group_index", self.group_index)
        if not self.outcome.dtype.is_floating_point or not self.turn_rewards.dtype.is_floating_point:
            raise ValueError(
                f"outcome and turn_rewards must be floating point, got {self.outcome.dtype} and "
                f"{self.turn_rewards.dtype}"
            )
        require_finite("outcome", self.outcome)
        require_finite("turn_rewards", self.turn_rewards)
        gaps = self.turn_mask[:, 1:] & ~self.turn_mask[:, :-1]
        if bool(gaps.any()):
            row, turn = (int(i) for i in gaps.nonzero()[0])
            raise ValueError(
                f"turn_mask must be a prefix of each row (turns 0..K-1), but trajectory {row} has turn "
                f"{turn + 1} without turn {turn}"
            )
        stray = (self.turn_rewards != 0) & ~self.turn_mask
        if bool(stray.any()):
            row, turn = (int(i) for i in stray.nonzero()[0])
            raise ValueError(
                f"turn_rewards[{row}, {turn}] is {self.turn_rewards[row, turn].item()} but turn {turn} of "
                f"trajectory {row} does not exist (turn_mask is False); rewards beyond the last turn must be 0"
            )
        if (self.first_hit_turn is None) != (self.folr is None):
            raise ValueError("first_hit_turn and folr come together: give both or neither")
        if self.first_hit_turn is not None and self.folr is not None:
            self._validate_folr(self.first_hit_turn, self.folr)

    def _validate_folr(self, first_hit_turn: torch.Tensor, folr: torch.Tensor) -> None:
        batch = self.outcome.shape[0]
        require_tensor("first_hit_turn", first_hit_turn)
        require_tensor("folr", folr)
        require_ndim("first_hit_turn", first_hit_turn, 1, "(B,): one first-hit turn per trajectory")
        require_rows("first_hit_turn", first_hit_turn, batch, "outcome")
        require_integer("first_hit_turn", first_hit_turn)
        require_ndim("folr", folr, 1, "(B,): one FOLR reward per trajectory")
        require_rows("folr", folr, batch, "outcome")
        if not folr.dtype.is_floating_point:
            raise ValueError(f"folr must be floating point, got {folr.dtype}")
        require_finite("folr", folr)
        num_turns = self.turn_mask.sum(dim=1)
        bad_turn = (first_hit_turn < -1) | (first_hit_turn >= num_turns)
        if bool(bad_turn.any()):
            row = int(bad_turn.nonzero()[0])
            raise ValueError(
                f"first_hit_turn[{row}] is {int(first_hit_turn[row])} but trajectory {row} has "
                f"{int(num_turns[row])} turn(s); it must be -1 (no hit) or a turn index"
            )
        unpaid = (first_hit_turn < 0) & (folr != 0)
        if bool(unpaid.any()):
            row = int(unpaid.nonzero()[0])
            raise ValueError(
                f"folr[{row}] is {float(folr[row])} but trajectory {row} has no hit (first_hit_turn -1); "
                "FOLR pays only a hit"
            )

    def trajectory_reward(self) -> torch.Tensor:
        """(B,) float64: ``R_i = sum_k r_{i,k}`` over existing turns."""
        return torch.where(self.turn_mask, self.turn_rewards.to(torch.float64), 0.0).sum(dim=1)


@dataclass(frozen=True)
class AdvantageOutput:
    """Advantages of one batch.

    Attributes:
        token_advantages: (B, L) float, ``A_{i,k}`` on each generated token of turn k, exactly 0 wherever
            the loss mask is 0.
        turn_advantages: (B, T) float, ``A_{i,k}``, 0 where the turn does not exist.
        turn_level: (B,) bool or None: for ``tspo``, whether the trajectory's group got turn-level
            (True) or trajectory-level (False) advantages; None for estimators without that choice.
    """

    token_advantages: torch.Tensor
    turn_advantages: torch.Tensor
    turn_level: torch.Tensor | None = None


AdvantageEstimator = Callable[..., AdvantageOutput]
ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")


def compute_advantages(name: str, inputs: AdvantageInputs, **options: Any) -> AdvantageOutput:
    """Run the estimator registered as ``name`` (``ADVANTAGE_ESTIMATORS.names()``) with ``options``.

    An unknown name or an option the estimator does not take raises ``ValueError`` listing what is valid.
    """
    check_estimator_options(name, options)
    return ADVANTAGE_ESTIMATORS.get(name)(inputs, **options)


def check_estimator_options(name: str, options: Any) -> None:
    """Raise ``ValueError`` if the estimator ``name`` does not take one of the ``options`` keys."""
    estimator = ADVANTAGE_ESTIMATORS.get(name)
    accepted = [
        parameter.name
        for parameter in inspect.signature(estimator).parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"advantage estimator {name!r} does not take option(s) {', '.join(unknown)}; "
            f"its options are: {', '.join(accepted) or '(none)'}"
        )


# --------------------------------------------------------------------------------------------- helpers


def discounted_turn_returns(
    turn_rewards: torch.Tensor, turn_mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Turn-level returns ``G_{i,k} = sum_{k' >= k} gamma^(k' - k) r_{i,k'}`` over existing turns.

    Args:
        turn_rewards: (B, T) float.
        turn_mask: (B, T) bool, True where the turn exists.
        gamma: discount in (0, 1].

    Returns:
        (B, T) float64, 0 where the turn does not exist.
    """
    rewards = torch.where(turn_mask, turn_rewards.to(torch.float64), 0.0)
    returns = torch.zeros_like(rewards)
    running = rewards.new_zeros(rewards.shape[0])
    for turn in range(rewards.shape[1] - 1, -1, -1):  # a loop over turns, vectorised over the batch
        running = rewards[:, turn] + gamma * running
        returns[:, turn] = running
    return torch.where(turn_mask, returns, 0.0)


# Block size (tokens per thread) and padding marker of broadcast_turn_advantages' fast path; see there.
_CPU_BLOCK_TOKENS = 1 << 20
_PADDING_SENTINEL = 2.0**100  # a power of two: sentinel * 1.0 is exact
_SENTINEL_SAFE = 2.0**60  # advantages at least this large make a block sum ambiguous: check explicitly


def broadcast_turn_advantages(
    turn_advantages: torch.Tensor,
    turn_mask: torch.Tensor,
    token_turn_index: torch.Tensor,
    loss_mask: torch.Tensor,
) -> torch.Tensor:
    """Give each generated token of turn k the advantage ``A_{i,k}``; every other token gets exactly 0.

    Also checks the token layout: every turn index is in [-1, T), every token with an index >= 0 belongs
    to an existing turn, and no generated token is padding (index -1).

    Args:
        turn_advantages: (B, T) float.
        turn_mask: (B, T) bool.
        token_turn_index: (B, L) integer, -1 on padding.
        loss_mask: (B, L) float (0/1) or bool, 1 on generated tokens (it multiplies the advantages).

    Returns:
        (B, L) with the dtype of ``turn_advantages``.
    """
    require_ndim("turn_advantages", turn_advantages, 2, "(B, T): one advantage per turn")
    require_same_shape("turn_mask", turn_mask, "turn_advantages", turn_advantages)
    require_ndim("token_turn_index", token_turn_index, 2, "(B, L): one turn index per token")
    require_rows("token_turn_index", token_turn_index, turn_advantages.shape[0], "turn_advantages")
    require_same_shape("loss_mask", loss_mask, "token_turn_index", token_turn_index)
    if turn_advantages.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"turn_advantages must be float32 or float64, got {turn_advantages.dtype}")
    require_finite("turn_advantages", turn_advantages)
    batch, num_turns = turn_advantages.shape
    length = token_turn_index.shape[1]
    device = turn_advantages.device
    out = torch.empty((batch, length), dtype=turn_advantages.dtype, device=device)
    if length == 0 or batch == 0:
        return out
    # What this computes is one gather and one multiply: table[i, 1 + turn(i, t)] * loss_mask[i, t],
    # column 0 of the table being padding (turn -1). Why it is not written as that plus a separate layout
    # check: the check's extra passes over (B, L) tripled the time (benchmarks/advantages.py, 16k x 512
    # tokens, 1 thread, CPU time: 52 ms here, 156 ms plain; the target is < 100 ms). So the check rides
    # on the gather: padding holds a huge finite sentinel that the mask zeroes unless a generated token
    # is padding, a missing turn holds NaN, and one sum per block reveals either; only then does the
    # explicit check run, for its message. Blocks of 2^20 tokens per thread reuse one index buffer.
    table = turn_advantages.new_empty((batch, num_turns + 1))
    table[:, 0] = _PADDING_SENTINEL
    table[:, 1:] = torch.where(turn_mask, turn_advantages, float("nan"))
    sentinel_checks = turn_advantages.numel() == 0 or float(turn_advantages.abs().max()) < _SENTINEL_SAFE
    if not sentinel_checks:  # advantages this large would make the sentinel sums ambiguous
        _check_token_layout(turn_mask, token_turn_index, loss_mask)
    on_cpu = device.type == "cpu"
    block_tokens = _CPU_BLOCK_TOKENS * torch.get_num_threads()
    rows_per_block = min(batch, max(1, block_tokens // length) if on_cpu else batch)
    index = torch.empty((rows_per_block, length), dtype=torch.long, device=device)
    block_sums = []
    for start in range(0, batch, rows_per_block):
        stop = min(batch, start + rows_per_block)
        block_index, block_out = index[: stop - start], out[start:stop]
        torch.add(token_turn_index[start:stop], 1, out=block_index)
        if not on_cpu:  # an out-of-range gather is a device-side assert there; CPU gather raises
            low, high = torch.aminmax(block_index)
            if int(low) < 0 or int(high) > num_turns:
                raise ValueError(_index_range_message(token_turn_index, num_turns))
        try:
            torch.gather(table[start:stop], 1, block_index, out=block_out)
        except RuntimeError:
            if _out_of_range(token_turn_index, num_turns).any():
                raise ValueError(_index_range_message(token_turn_index, num_turns)) from None
            raise
        block_out.mul_(loss_mask[start:stop])
        block_sums.append(block_out.sum())
    sums = torch.stack(block_sums)
    if sentinel_checks and not bool((sums.abs() < _PADDING_SENTINEL / 2).all()):  # NaN compares False
        _check_token_layout(turn_mask, token_turn_index, loss_mask)
        raise AssertionError("a block sum flagged a malformed batch the explicit check did not find")
    return out


def _check_token_layout(
    turn_mask: torch.Tensor, token_turn_index: torch.Tensor, loss_mask: torch.Tensor
) -> None:
    """The explicit (slow) token checks, for error messages; raises ValueError on the first problem."""
    num_turns = turn_mask.shape[1]
    turn = token_turn_index.long()
    if bool(_out_of_range(turn, num_turns).any()):
        raise ValueError(_index_range_message(token_turn_index, num_turns))
    in_missing_turn = (turn >= 0) & ~turn_mask.gather(1, turn.clamp(min=0))
    if bool(in_missing_turn.any()):
        row, column = (int(i) for i in in_missing_turn.nonzero()[0])
        raise ValueError(
            f"token {column} of trajectory {row} is in turn {int(turn[row, column])} (token_turn_index), "
            f"but trajectory {row} has only {int(turn_mask[row].sum())} turn(s) (turn_mask)"
        )
    generated_padding = (turn < 0) & as_bool_mask(loss_mask)
    if bool(generated_padding.any()):
        row, column = (int(i) for i in generated_padding.nonzero()[0])
        raise ValueError(
            f"loss_mask marks token {column} of trajectory {row} as generated, but its token_turn_index is "
            "-1 (padding); every generated token must belong to a turn"
        )


def _out_of_range(token_turn_index: torch.Tensor, num_turns: int) -> torch.Tensor:
    return (token_turn_index < -1) | (token_turn_index >= num_turns)


def _index_range_message(token_turn_index: torch.Tensor, num_turns: int) -> str:
    row, column = (int(i) for i in _out_of_range(token_turn_index, num_turns).nonzero()[0])
    return (
        f"token_turn_index must be in [-1, {num_turns}) for T = {num_turns} turns (-1 marks padding), "
        f"but token {column} of trajectory {row} has turn index {int(token_turn_index[row, column])}"
    )


def _output_dtype(inputs: AdvantageInputs) -> torch.dtype:
    return torch.float64 if inputs.turn_rewards.dtype == torch.float64 else torch.float32


def _finish(
    inputs: AdvantageInputs, turn_advantages: torch.Tensor, turn_level: torch.Tensor | None = None
) -> AdvantageOutput:
    """Mask missing turns, cast, and broadcast (B, T) float64 turn advantages to tokens."""
    turn_advantages = torch.where(inputs.turn_mask, turn_advantages, 0.0).to(_output_dtype(inputs))
    tokens = broadcast_turn_advantages(
        turn_advantages, inputs.turn_mask, inputs.token_turn_index, inputs.loss_mask
    )
    return AdvantageOutput(token_advantages=tokens, turn_advantages=turn_advantages, turn_level=turn_level)


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def _normalized(
    values: torch.Tensor, groups: GroupIds, stats: GroupStatistics, norm_by_std: bool, eps: float
) -> torch.Tensor:
    """(B,) ``(x_i - mean_g) / (std_g + eps)`` (or ``x_i - mean_g``); 0 in zero-spread groups of >= 2."""
    group_of = groups.of_trajectory
    centred = values - stats.mean[group_of]
    advantages = centred / (stats.std[group_of] + eps) if norm_by_std else centred
    # verl would give (R - mean) / eps here, which is rounding noise amplified by 1e6; a group whose
    # members all scored the same carries no signal. A group of one keeps verl's mean 0 / std 1.
    return torch.where(_no_signal(stats, groups), 0.0, advantages)


def _trajectory_level(inputs: AdvantageInputs, per_trajectory: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, T): the same advantage on every turn."""
    return per_trajectory[:, None].expand(-1, inputs.turn_mask.shape[1])


# ------------------------------------------------------------------------------------------ estimators


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(
    inputs: AdvantageInputs, *, norm_by_std: bool = True, eps: float = DEFAULT_EPS
) -> AdvantageOutput:
    """GRPO (Shao et al. 2024, DeepSeekMath eq. 3 with outcome supervision) on the trajectory total R.

    ``A_i = (R_i - mean_g R) / (std_g R + eps)`` on every turn; ``norm_by_std=False`` gives Dr.GRPO's
    ``A_i = R_i - mean_g R`` (Liu et al. 2025, arXiv 2503.20783). Matches verl's
    ``compute_grpo_outcome_advantage`` (unbiased std, eps 1e-6, a group of one has mean 0 and std 1),
    except that a group of two or more whose R are all equal gets exactly 0 instead of rounding noise.
    When the trainer runs plain GRPO it sets FOLR alpha = 0, so R = o.
    """
    inputs.validate()
    _check_eps(eps)
    groups = dense_group_ids(inputs.group_index)
    reward = inputs.trajectory_reward()
    stats = group_statistics(reward, groups, inputs.turn_rewards.dtype)
    advantages = _normalized(reward, groups, stats, norm_by_std, eps)
    return _finish(inputs, _trajectory_level(inputs, advantages))


@ADVANTAGE_ESTIMATORS.register("drgrpo")
def drgrpo_advantages(inputs: AdvantageInputs) -> AdvantageOutput:
    """Dr.GRPO (Liu et al. 2025): GRPO without the std normalisation, ``A_i = R_i - mean_g R``."""
    return grpo_advantages(inputs, norm_by_std=False)


@ADVANTAGE_ESTIMATORS.register("dspo")
def dspo_advantages(
    inputs: AdvantageInputs, *, norm_by_std: bool = True, eps: float = DEFAULT_EPS
) -> AdvantageOutput:
    """DSPO's advantage: GRPO on the raw outcome o (never the shaped reward), on every turn.

    DSPO's other two parts live elsewhere: the sequence-level clipped ratio is the ``seq_clip`` policy
    loss, and dynamic filtering is the ``outcome`` group filter.
    """
    inputs.validate()
    _check_eps(eps)
    groups = dense_group_ids(inputs.group_index)
    outcome = inputs.outcome.to(torch.float64)
    advantages = _normalized(outcome, groups, group_statistics(outcome, groups), norm_by_std, eps)
    return _finish(inputs, _trajectory_level(inputs, advantages))


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(inputs: AdvantageInputs) -> AdvantageOutput:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740): leave-one-out baseline on R.

    ``A_i = R_i - mean_{j != i in g} R_j = n / (n - 1) * (R_i - mean_g R)``; a group of one gets 0 (it has
    no other member to compare with), and so does a group whose R are all equal.
    """
    inputs.validate()
    groups = dense_group_ids(inputs.group_index)
    reward = inputs.trajectory_reward()
    stats = group_statistics(reward, groups, inputs.turn_rewards.dtype)
    group_of = groups.of_trajectory
    size = groups.size.to(torch.float64)[group_of]
    others_mean = (stats.total[group_of] - reward) / (size - 1).clamp(min=1)
    no_signal = (stats.zero_spread() | (groups.size == 1))[group_of]
    advantages = torch.where(no_signal, 0.0, reward - others_mean)
    return _finish(inputs, _trajectory_level(inputs, advantages))


def stage_masks(inputs: AdvantageInputs, first_hit_turn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TSPO's two stages of each trajectory, as (B, T) bool masks over existing turns.

    The retrieval stage is every turn up to and including the first hit ``k*`` (without a hit: every turn
    but the last); the answer stage is every later turn (without a hit: the last turn). A trajectory whose
    first hit is on its last turn (cut off after a search) has no answer stage.

    Args:
        first_hit_turn: (B,) integer, ``k*_i`` or -1 for none.

    Returns:
        (retrieval, answer), each (B, T) bool, disjoint, together equal to ``inputs.turn_mask``.
    """
    turn = torch.arange(inputs.turn_mask.shape[1], device=inputs.turn_mask.device)[None, :]
    hit = first_hit_turn.long()[:, None]
    last = inputs.turn_mask.sum(dim=1, keepdim=True) - 1
    retrieval = torch.where(hit >= 0, turn <= hit, turn < last) & inputs.turn_mask
    return retrieval, inputs.turn_mask & ~retrieval


def _no_signal(stats: GroupStatistics, groups: GroupIds) -> torch.Tensor:
    """(B,) bool: trajectories of a group of two or more whose values are all equal (see ``_normalized``)."""
    return (stats.zero_spread() & (groups.size > 1))[groups.of_trajectory]


def _stage_advantages(
    inputs: AdvantageInputs, groups: GroupIds, reward_stats: GroupStatistics, reclaim: float, eps: float
) -> torch.Tensor:
    """(B, T) float64 v2 stage advantages (DESIGN section 5) for every trajectory of the batch."""
    assert inputs.first_hit_turn is not None and inputs.folr is not None  # checked by tspo_advantages
    group_of = groups.of_trajectory
    folr = inputs.folr.to(torch.float64)
    other = inputs.trajectory_reward() - folr  # O_i: the outcome plus any shaping
    scale = reward_stats.std[group_of] + eps  # one scale per group: s = std_g R + eps
    # A part with no spread in a group carries no signal: exactly 0, not the rounding noise of R - F.
    source = inputs.turn_rewards.dtype
    other_stats, folr_stats = group_statistics(other, groups, source), group_statistics(folr, groups, source)
    outcome_part = torch.where(
        _no_signal(other_stats, groups), 0.0, (other - other_stats.mean[group_of]) / scale
    )
    folr_part = torch.where(_no_signal(folr_stats, groups), 0.0, (folr - folr_stats.mean[group_of]) / scale)
    hit = (inputs.first_hit_turn >= 0).to(torch.float64)
    wrong = 1.0 - inputs.outcome.to(torch.float64)
    retrieval_stage = outcome_part + folr_part  # = GRPO on R
    answer_stage = outcome_part - reclaim * wrong * hit * folr_part
    retrieval, _ = stage_masks(inputs, inputs.first_hit_turn)
    return torch.where(retrieval, retrieval_stage[:, None], answer_stage[:, None])


@ADVANTAGE_ESTIMATORS.register("tspo")
def tspo_advantages(
    inputs: AdvantageInputs,
    *,
    mode: str = "adaptive",
    reclaim: float = DEFAULT_RECLAIM,
    gamma: float = 1.0,
    eps: float = DEFAULT_EPS,
) -> AdvantageOutput:
    """TSPO's stage-aware advantage, v2 (a reconstruction of Ma et al. 2026, arXiv 2601.22776, whose
    method section and code are not public: the stage split, ``reclaim`` and the switch are our choices).

    Per trajectory: ``F_i = alpha * h_i`` (``inputs.folr``), ``O_i = R_i - F_i``, ``s = std_g R + eps``,
    ``A^o_i = (O_i - mean_g O) / s`` and ``A^f_i = (F_i - mean_g F) / s``. Stage advantages:

    - retrieval stage (turns ``k <= k*_i``; without a hit every turn but the last): ``A^o_i + A^f_i``,
      which is GRPO on R;
    - answer stage (turns ``k > k*_i``; without a hit the last turn):
      ``A^o_i - reclaim * (1 - o_i) * h_i * A^f_i`` -- a wrong answer gives back the search credit it
      failed to use, a correct one keeps it and is never pushed down for lacking a hit.

    Modes: ``adaptive`` (default) stage advantages in outcome-homogeneous groups (all o_i equal) and the
    trajectory-level ``(R_i - mean_g R) / s`` on every turn otherwise; ``turn`` stage advantages in every
    group; ``traj`` trajectory-level always (GRPO + FOLR); ``legacy`` the v1 rule
    ``(G_{i,k} - mean_g R) / s`` with the return-to-go ``G`` (``gamma``) in outcome-homogeneous groups,
    kept for ablation (it pushes correct answers down in all-correct groups that contain hits).
    A group of two or more whose R are all equal gets exactly 0; with alpha = 0 every mode is GRPO.

    Args:
        mode: one of ``TSPO_MODES``.
        reclaim: ``beta`` >= 0, how much of its search credit a wrong answer gives back (default 1).
        gamma: turn discount in (0, 1] of the ``legacy`` mode's return-to-go (other modes need 1).
        eps: added to the std.
    """
    if mode not in TSPO_MODES:
        raise ValueError(f"unknown tspo mode {mode!r}; valid modes: {', '.join(TSPO_MODES)}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    if gamma != 1.0 and mode != "legacy":
        raise ValueError(f"gamma applies only to tspo mode 'legacy' (the return-to-go); got gamma {gamma}")
    if not reclaim >= 0.0:
        raise ValueError(f"reclaim must be >= 0, got {reclaim}")
    _check_eps(eps)
    inputs.validate()
    if mode in ("adaptive", "turn") and (inputs.first_hit_turn is None or inputs.folr is None):
        raise ValueError(
            f"tspo mode {mode!r} (stage advantages) needs AdvantageInputs.first_hit_turn and .folr (the "
            "first-hit turn and the FOLR part of R); tspo.scoring.advantage_inputs fills them"
        )
    groups = dense_group_ids(inputs.group_index)
    group_of = groups.of_trajectory
    reward = inputs.trajectory_reward()
    stats = group_statistics(reward, groups, inputs.turn_rewards.dtype)
    scale = (stats.std[group_of] + eps)[:, None]
    trajectory_level_advantages = (reward - stats.mean[group_of])[:, None] / scale
    if mode == "turn":
        turn_level = torch.ones_like(group_of, dtype=torch.bool)
    elif mode == "traj":
        turn_level = torch.zeros_like(group_of, dtype=torch.bool)
    else:
        turn_level = group_statistics(inputs.outcome, groups).zero_spread()[group_of]
    if mode == "traj" or not bool(turn_level.any()):
        advantages = trajectory_level_advantages.expand(-1, inputs.turn_mask.shape[1])
    elif mode == "legacy":
        returns = discounted_turn_returns(inputs.turn_rewards, inputs.turn_mask, gamma)
        turn_level_advantages = (returns - stats.mean[group_of][:, None]) / scale
        advantages = torch.where(turn_level[:, None], turn_level_advantages, trajectory_level_advantages)
    else:
        stage = _stage_advantages(inputs, groups, stats, reclaim, eps)
        advantages = torch.where(turn_level[:, None], stage, trajectory_level_advantages)
    advantages = torch.where(_no_signal(stats, groups)[:, None], 0.0, advantages)
    return _finish(inputs, advantages, turn_level=turn_level)


__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "DEFAULT_EPS",
    "DEFAULT_RECLAIM",
    "TSPO_MODES",
    "AdvantageInputs",
    "AdvantageOutput",
    "broadcast_turn_advantages",
    "check_estimator_options",
    "compute_advantages",
    "discounted_turn_returns",
    "drgrpo_advantages",
    "dspo_advantages",
    "grpo_advantages",
    "rloo_advantages",
    "stage_masks",
    "tspo_advantages",
]
