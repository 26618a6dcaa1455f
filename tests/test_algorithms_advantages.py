"""Advantage estimators: worked examples with hand-computed numbers, verl's GRPO semantics, errors."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import pytest
import torch

import tspo.algorithms.advantages as advantages_module
from tspo.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    broadcast_turn_advantages,
    compute_advantages,
    discounted_turn_returns,
)

EPS = 1e-6
GENERATED, OBSERVED = 2, 1  # tokens per turn in the layout built by make_inputs


def make_inputs(
    trajectories: Sequence[tuple[Sequence[float], float, int]],
    *,
    padding: int = 2,
    dtype: torch.dtype = torch.float64,
    bool_mask: bool = False,
) -> AdvantageInputs:
    """Build a batch from (turn rewards, outcome, group id) per trajectory. Each turn has GENERATED
    generated tokens then OBSERVED observation tokens (none after the last turn), then ``padding``."""
    max_turns = max(len(rewards) for rewards, _, _ in trajectories)
    length = max_turns * (GENERATED + OBSERVED) + padding
    batch = len(trajectories)
    turn_rewards = torch.zeros(batch, max_turns, dtype=dtype)
    turn_mask = torch.zeros(batch, max_turns, dtype=torch.bool)
    token_turn_index = torch.full((batch, length), -1, dtype=torch.long)
    loss_mask = torch.zeros(batch, length)
    for row, (rewards, _, _) in enumerate(trajectories):
        turn_rewards[row, : len(rewards)] = torch.tensor(rewards, dtype=dtype)
        turn_mask[row, : len(rewards)] = True
        position = 0
        for turn in range(len(rewards)):
            token_turn_index[row, position : position + GENERATED] = turn
            loss_mask[row, position : position + GENERATED] = 1.0
            position += GENERATED
            if turn < len(rewards) - 1:
                token_turn_index[row, position : position + OBSERVED] = turn
                position += OBSERVED
    hits = [folr_of(rewards, outcome) for rewards, outcome, _ in trajectories]
    return AdvantageInputs(
        outcome=torch.tensor([outcome for _, outcome, _ in trajectories], dtype=dtype),
        turn_rewards=turn_rewards,
        turn_mask=turn_mask,
        token_turn_index=token_turn_index,
        loss_mask=loss_mask.bool() if bool_mask else loss_mask,
        group_index=torch.tensor([group for _, _, group in trajectories]),
        first_hit_turn=torch.tensor([turn for turn, _ in hits]),
        folr=torch.tensor([value for _, value in hits], dtype=dtype),
    )


def folr_of(rewards: Sequence[float], outcome: float) -> tuple[int, float]:
    """The fixtures' convention: the first turn whose reward, less the outcome on the last turn, is not 0
    is the first hit, and that reward is F (the scoring code fills these fields; tests write rewards)."""
    for turn, reward in enumerate(rewards):
        extra = reward - (outcome if turn == len(rewards) - 1 else 0.0)
        if abs(extra) > 1e-12:
            return turn, extra
    return -1, 0.0


def assert_turns(actual: torch.Tensor, expected: Sequence[Sequence[float]], rel: float = 1e-5) -> None:
    """Row by row, the existing turns equal ``expected`` and the rest are exactly 0."""
    for row, values in enumerate(expected):
        assert actual[row, : len(values)].tolist() == pytest.approx(list(values), rel=rel, abs=1e-9)
        assert torch.all(actual[row, len(values) :] == 0)


def assert_tokens_follow_turns(
    inputs: AdvantageInputs, turn_advantages: torch.Tensor, tokens: torch.Tensor
) -> None:
    generated = inputs.loss_mask != 0
    assert torch.all(tokens[~generated] == 0)
    rows, columns = generated.nonzero(as_tuple=True)
    expected = turn_advantages[rows, inputs.token_turn_index[rows, columns]]
    assert torch.equal(tokens[rows, columns], expected)


# The contract's worked example (alpha = 0.3): all wrong, a near miss hit at turn index 1, three failures.
ALL_WRONG = [
    ([0.0, 0.3, 0.0], 0.0, 0),
    ([0.0, 0.0, 0.0], 0.0, 0),
    ([0.0, 0.0], 0.0, 0),
    ([0.0, 0.0, 0.0], 0.0, 0),
]
# Mixed group, one of each category: R = 1.3, 1.0, 0.3, 0.0.
MIXED = [([0.3, 1.0], 1.0, 0), ([1.0], 1.0, 0), ([0.0, 0.3, 0.0], 0.0, 0), ([0.0, 0.0, 0.0], 0.0, 0)]
MIXED_MEAN = 2.6 / 4
MIXED_STD = math.sqrt((0.65**2 + 0.35**2 + 0.35**2 + 0.65**2) / 3)  # unbiased


def test_contract_example_adaptive_near_miss_credited_up_to_hit_then_blamed() -> None:
    # mean R = 0.075, unbiased std R = 0.15, O = 0 for all: A^f = 1.5 for the near miss, -0.5 for the
    # failures. Retrieval stage A^o + A^f; answer stage A^o - (1 - o) * h * A^f (reclaim 1).
    inputs = make_inputs(ALL_WRONG)
    out = compute_advantages("tspo", inputs)
    assert_turns(out.turn_advantages, [[1.5, 1.5, -1.5], [-0.5, -0.5, 0.0], [-0.5, 0.0], [-0.5, -0.5, 0.0]])
    assert out.turn_level is not None and out.turn_level.all()  # all o equal -> stage advantages
    assert_tokens_follow_turns(inputs, out.turn_advantages, out.token_advantages)
    # The same numbers with the default mode spelled out; reclaim 0 keeps the near miss's credit.
    assert torch.equal(
        compute_advantages("tspo", inputs, mode="adaptive").turn_advantages, out.turn_advantages
    )
    kept = compute_advantages("tspo", inputs, reclaim=0.0)
    assert_turns(kept.turn_advantages[:1], [[1.5, 1.5, 0.0]])
    half = compute_advantages("tspo", inputs, reclaim=0.5)
    assert_turns(half.turn_advantages[:1], [[1.5, 1.5, -0.75]])


def test_legacy_mode_is_the_v1_rule_with_discount() -> None:
    # v1: (G - mean R) / s in homogeneous groups. gamma 1: near miss [1.5, 1.5, -0.5], failures -0.5.
    out = compute_advantages("tspo", make_inputs(ALL_WRONG), mode="legacy")
    assert_turns(out.turn_advantages, [[1.5, 1.5, -0.5], [-0.5] * 3, [-0.5] * 2, [-0.5] * 3])
    # gamma = 0.5: near miss G = [0 + 0.5 * 0.3, 0.3, 0] = [0.15, 0.3, 0] -> [0.5, 1.5, -0.5].
    out = compute_advantages("tspo", make_inputs(ALL_WRONG), mode="legacy", gamma=0.5)
    assert_turns(out.turn_advantages, [[0.5, 1.5, -0.5], [-0.5] * 3, [-0.5] * 2, [-0.5] * 3])
    # Mixed outcomes: trajectory level, as adaptive.
    mixed = make_inputs(MIXED)
    torch.testing.assert_close(
        compute_advantages("tspo", mixed, mode="legacy").turn_advantages,
        compute_advantages("tspo", mixed, mode="traj").turn_advantages,
    )


def test_turn_mode_gives_stage_advantages_in_a_mixed_group() -> None:
    # R = 1.3, 1.0, 0.3, 0.0; F = 0.3, 0, 0.3, 0 (mean 0.15); O = 1, 1, 0, 0 (mean 0.5); s = std R.
    out = compute_advantages("tspo", make_inputs(MIXED), mode="turn")
    s = MIXED_STD
    assert_turns(
        out.turn_advantages,
        [
            [(0.5 + 0.15) / s, 0.5 / s],  # complete success: the correct answer keeps A^o
            [0.5 / s],  # success without retrieval: its only turn is the answer
            [(-0.5 + 0.15) / s] * 2 + [(-0.5 - 0.15) / s],  # near miss: gives its search credit back
            [(-0.5 - 0.15) / s] * 2 + [-0.5 / s],  # complete failure
        ],
    )
    assert out.turn_level is not None and out.turn_level.all()


def test_gamma_is_refused_outside_legacy_mode() -> None:
    with pytest.raises(ValueError, match="gamma applies only to tspo mode 'legacy'"):
        compute_advantages("tspo", make_inputs(ALL_WRONG), mode="turn", gamma=0.5)


def test_traj_mode_is_grpo_on_folr_rewards() -> None:
    out = compute_advantages("tspo", make_inputs(ALL_WRONG), mode="traj")
    assert_turns(out.turn_advantages, [[1.5] * 3, [-0.5] * 3, [-0.5] * 2, [-0.5] * 3])
    assert out.turn_level is not None and not out.turn_level.any()
    grpo = compute_advantages("grpo", make_inputs(ALL_WRONG))
    assert torch.equal(grpo.turn_advantages, out.turn_advantages)


def test_mixed_group_gets_trajectory_level_advantages_in_adaptive_mode() -> None:
    out = compute_advantages("tspo", make_inputs(MIXED))
    # 1.078, 0.581, -0.581, -1.078
    expected = [(total - MIXED_MEAN) / MIXED_STD for total in (1.3, 1.0, 0.3, 0.0)]
    assert expected[0] == pytest.approx(1.0784, abs=1e-4) and expected[1] == pytest.approx(0.5806, abs=1e-4)
    assert_turns(
        out.turn_advantages, [[expected[0]] * 2, [expected[1]], [expected[2]] * 3, [expected[3]] * 3]
    )
    assert out.turn_level is not None and not out.turn_level.any()


def test_all_right_group_credits_retrieval_and_never_pushes_a_correct_answer_down() -> None:
    # R = 1.3 (hit, right) and 1.0 (no hit, right): mean 1.15, std 0.2121; A^f = +-0.15 / 0.2121, A^o = 0.
    group = make_inputs([([0.3, 1.0], 1.0, 0), ([1.0], 1.0, 0)])
    third = 0.15 / math.sqrt(0.045)
    assert_turns(compute_advantages("tspo", group).turn_advantages, [[third, 0.0], [0.0]])
    # The v1 rule pushed both answers down (G = o lacks alpha, mean R has it).
    assert_turns(
        compute_advantages("tspo", group, mode="legacy").turn_advantages, [[third, -third], [-third]]
    )


def test_the_issue_table_to_three_decimals() -> None:
    # Issue 12's worked groups (alpha 0.3): all wrong (S S A each) and all right (algo-demo's group 3).
    all_wrong = make_inputs([([0.0, 0.3, 0.0], 0.0, 0)] + [([0.0, 0.0, 0.0], 0.0, 0)] * 3)
    all_right = make_inputs(
        [([0.0, 0.3, 1.0], 1.0, 0), ([0.3, 1.0], 1.0, 0), ([0.0, 1.0], 1.0, 0), ([1.0], 1.0, 0)]
    )
    expected = {
        ("legacy", 0): [[1.5, 1.5, -0.5]] + [[-0.5] * 3] * 3,
        ("adaptive", 0): [[1.5, 1.5, -1.5]] + [[-0.5, -0.5, 0.0]] * 3,
        ("legacy", 1): [[0.866, 0.866, -0.866], [0.866, -0.866], [-0.866, -0.866], [-0.866]],
        ("adaptive", 1): [[0.866, 0.866, 0.0], [0.866, 0.0], [-0.866, 0.0], [0.0]],
    }
    for (mode, which), rows in expected.items():
        out = compute_advantages("tspo", (all_wrong, all_right)[which], mode=mode)
        for row, values in enumerate(rows):
            got = [round(float(v), 3) for v in out.turn_advantages[row, : len(values)]]
            assert got == values, (mode, which, row)


def test_group_of_one() -> None:
    inputs = make_inputs([([0.3, 0.4], 1.0, 5)])
    # verl: a group of one has mean 0 and std 1.
    assert_turns(compute_advantages("grpo", inputs).turn_advantages, [[0.7 / (1 + EPS)] * 2])
    assert_turns(compute_advantages("drgrpo", inputs).turn_advantages, [[0.7] * 2])
    assert_turns(compute_advantages("dspo", inputs).turn_advantages, [[1.0 / (1 + EPS)] * 2])
    # No other member to compare with: RLOO gives no signal.
    assert_turns(compute_advantages("rloo", inputs).turn_advantages, [[0.0] * 2])
    # TSPO follows GRPO's mean 0 / std 1: F = 0.3 (hit at turn 0), O = 0.4 (o = 1 with -0.6 shaping).
    scale = 1 + EPS
    assert_turns(compute_advantages("tspo", inputs, mode="traj").turn_advantages, [[0.7 / scale] * 2])
    assert_turns(
        compute_advantages("tspo", inputs, mode="legacy").turn_advantages, [[0.7 / scale, 0.4 / scale]]
    )
    for mode in ("adaptive", "turn"):
        out = compute_advantages("tspo", inputs, mode=mode)
        assert_turns(out.turn_advantages, [[0.7 / scale, 0.4 / scale]])


def test_rloo_drgrpo_and_dspo_numbers() -> None:
    inputs = make_inputs(ALL_WRONG)
    # RLOO: R_i - mean of the others: near miss 0.3 - 0, failures 0 - 0.3 / 3.
    assert_turns(
        compute_advantages("rloo", inputs).turn_advantages, [[0.3] * 3, [-0.1] * 3, [-0.1] * 2, [-0.1] * 3]
    )
    # Dr.GRPO: R_i - mean R.
    assert_turns(
        compute_advantages("drgrpo", inputs).turn_advantages,
        [[0.225] * 3, [-0.075] * 3, [-0.075] * 2, [-0.075] * 3],
    )
    assert torch.equal(
        compute_advantages("grpo", inputs, norm_by_std=False).turn_advantages,
        compute_advantages("drgrpo", inputs).turn_advantages,
    )
    # DSPO normalises the raw outcome: all o = 0 -> no signal, whatever FOLR says.
    assert torch.all(compute_advantages("dspo", inputs).turn_advantages == 0)
    mixed = compute_advantages("dspo", make_inputs(MIXED)).turn_advantages
    z = 0.5 / math.sqrt(1 / 3)  # o = [1, 1, 0, 0]: mean 0.5, unbiased std sqrt(1/3)
    assert_turns(mixed, [[z] * 2, [z], [-z] * 3, [-z] * 3])
    rloo_mixed = compute_advantages("rloo", make_inputs(MIXED)).turn_advantages
    assert_turns(rloo_mixed[:1], [[1.3 - 1.3 / 3] * 2])


def test_zero_spread_group_gets_exactly_zero_everywhere() -> None:
    same = [([0.0, 0.3], 0.0, 1), ([0.3, 0.0, 0.0], 0.0, 1), ([0.0, 0.0, 0.3], 0.0, 1)]  # all R = 0.3
    inputs = make_inputs(same)
    for name, options in [("grpo", {}), ("drgrpo", {}), ("dspo", {}), ("rloo", {})] + [
        ("tspo", {"mode": mode}) for mode in ("adaptive", "turn", "traj", "legacy")
    ]:
        out = compute_advantages(name, inputs, **options)
        assert torch.all(out.turn_advantages == 0), (name, options)
        assert torch.all(out.token_advantages == 0), (name, options)


def test_several_groups_interleaved_equal_each_group_alone() -> None:
    trajectories = [
        ([0.0, 0.3, 0.0], 0.0, 42),
        ([0.3, 1.0], 1.0, -3),
        ([0.0, 0.0], 0.0, 42),
        ([1.0], 1.0, 7),
        ([0.0, 0.0, 0.0, 0.0], 0.0, -3),
        ([0.0, 0.0, 0.3], 0.0, 42),
        ([0.0, 1.0], 1.0, 7),
        ([0.0, 0.3], 0.0, -3),
        ([0.5], 0.5, 1000),
    ]
    inputs = make_inputs(trajectories)
    for name, options in (
        [("grpo", {}), ("drgrpo", {}), ("dspo", {}), ("rloo", {})]
        + [("tspo", {"mode": mode}) for mode in ("adaptive", "turn", "traj")]
        + [("tspo", {"mode": "legacy", "gamma": 0.9})]
    ):
        together = compute_advantages(name, inputs, **options)
        for group in {group for _, _, group in trajectories}:
            rows = torch.tensor([row for row, (_, _, g) in enumerate(trajectories) if g == group])
            alone_inputs = AdvantageInputs(
                **{field: getattr(inputs, field)[rows] for field in AdvantageInputs.__dataclass_fields__}
            )  # every field is a (B, ...) tensor here
            alone = compute_advantages(name, alone_inputs, **options)
            torch.testing.assert_close(
                together.turn_advantages[rows], alone.turn_advantages, rtol=0, atol=1e-12
            )
            torch.testing.assert_close(
                together.token_advantages[rows], alone.token_advantages, rtol=0, atol=1e-12
            )


def test_every_estimator_broadcasts_turns_to_generated_tokens_only() -> None:
    inputs = make_inputs(MIXED + [(r, o, 1) for r, o, _ in ALL_WRONG])
    for name in ADVANTAGE_ESTIMATORS.names():
        out = compute_advantages(name, inputs)
        assert out.token_advantages.shape == inputs.token_turn_index.shape
        assert out.turn_advantages.shape == inputs.turn_rewards.shape
        assert torch.all(out.turn_advantages[~inputs.turn_mask] == 0)
        assert_tokens_follow_turns(inputs, out.turn_advantages, out.token_advantages)


def test_bool_and_float_loss_masks_agree_and_dtype_follows_rewards() -> None:
    float_out = compute_advantages("tspo", make_inputs(ALL_WRONG))
    bool_out = compute_advantages("tspo", make_inputs(ALL_WRONG, bool_mask=True))
    assert torch.equal(float_out.token_advantages, bool_out.token_advantages)
    assert float_out.token_advantages.dtype == torch.float64
    single = compute_advantages("tspo", make_inputs(ALL_WRONG, dtype=torch.float32))
    assert single.token_advantages.dtype == torch.float32 and single.turn_advantages.dtype == torch.float32
    torch.testing.assert_close(
        single.turn_advantages.double(), float_out.turn_advantages, rtol=1e-6, atol=1e-6
    )


def test_discounted_turn_returns() -> None:
    rewards = torch.tensor([[1.0, 2.0, 4.0], [1.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    returns = discounted_turn_returns(rewards, mask, gamma=0.5)
    # Row 0: [1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4]; row 1 has one turn, so the 2.0 beyond it is ignored.
    assert returns.tolist() == [[3.0, 4.0, 4.0], [1.0, 0.0, 0.0]]
    assert discounted_turn_returns(rewards, mask, gamma=1.0)[0].tolist() == [7.0, 6.0, 4.0]


# ------------------------------------------------------------------------ verl's GRPO, computed per group


def verl_style_grpo(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: list[int], norm_by_std: bool
) -> torch.Tensor:
    """A straightforward per-group reference following verl's compute_grpo_outcome_advantage semantics:
    score = sum of token-level rewards; per group mean and torch.std (unbiased); a group of one has mean
    0 and std 1; A = (score - mean) / (std + 1e-6), or score - mean; broadcast times the response mask."""
    scores = token_level_rewards.sum(dim=-1)
    members: dict[int, list[int]] = defaultdict(list)
    for row, group in enumerate(index):
        members[group].append(row)
    advantages = torch.zeros_like(scores)
    for rows in members.values():
        group_scores = scores[rows]
        if len(rows) == 1:
            mean, std = torch.tensor(0.0, dtype=scores.dtype), torch.tensor(1.0, dtype=scores.dtype)
        else:
            mean, std = group_scores.mean(), torch.std(group_scores)
        for row in rows:
            centred = scores[row] - mean
            advantages[row] = centred / (std + EPS) if norm_by_std else centred
    return advantages[:, None] * response_mask


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_equals_verl_per_group_reference(seed: int, norm_by_std: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    trajectories = []
    group_ids = torch.randperm(50, generator=gen)[:6].tolist()  # arbitrary, unsorted ids
    for group in group_ids:
        size = int(torch.randint(1, 7, (1,), generator=gen))
        for _ in range(size):
            num_turns = int(torch.randint(1, 5, (1,), generator=gen))
            if seed % 2 == 0:  # FOLR-like rewards (many ties and zero-spread groups)
                rewards = [0.0] * num_turns
                if bool(torch.rand(1, generator=gen) < 0.5):
                    rewards[int(torch.randint(0, num_turns, (1,), generator=gen))] += 0.3
                rewards[-1] += float(torch.randint(0, 2, (1,), generator=gen))
            else:  # arbitrary real rewards
                rewards = (torch.randn(num_turns, generator=gen) * 2).tolist()
            trajectories.append((rewards, 0.0, group))
    order = torch.randperm(len(trajectories), generator=gen).tolist()  # interleave the groups
    trajectories = [trajectories[i] for i in order]
    inputs = make_inputs(trajectories)
    # verl's layout: the trajectory's score sits on its last generated token.
    token_level_rewards = torch.zeros_like(inputs.loss_mask, dtype=torch.float64)
    for row in range(len(trajectories)):
        last = int(inputs.loss_mask[row].nonzero().max())
        token_level_rewards[row, last] = inputs.turn_rewards[row].sum()
    expected = verl_style_grpo(
        token_level_rewards, inputs.loss_mask.double(), [t[2] for t in trajectories], norm_by_std
    )
    out = compute_advantages("grpo", inputs, norm_by_std=norm_by_std)
    torch.testing.assert_close(out.token_advantages, expected, rtol=1e-9, atol=1e-6)


# --------------------------------------------------------------------------------------------- bad input


def _replace(inputs: AdvantageInputs, **changes: object) -> AdvantageInputs:
    fields = {field: getattr(inputs, field) for field in AdvantageInputs.__dataclass_fields__}
    return AdvantageInputs(**{**fields, **changes})


GOOD = make_inputs(ALL_WRONG)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"turn_mask": GOOD.turn_mask[:, :2]},
            r"turn_rewards has shape \(4, 3\) but turn_mask has shape \(4, 2\)",
        ),
        (
            {"outcome": torch.zeros(5, dtype=torch.float64)},
            r"turn_rewards has shape \(4, 3\) but outcome has 5 rows",
        ),
        ({"outcome": torch.zeros(4, 1)}, r"outcome must be \(B,\).*got shape \(4, 1\)"),
        (
            {"group_index": torch.zeros(3, dtype=torch.long)},
            r"group_index has shape \(3,\) but outcome has 4 rows",
        ),
        (
            {"loss_mask": GOOD.loss_mask[:, :-1]},
            r"loss_mask has shape \(4, 10\) but token_turn_index has shape \(4, 11\)",
        ),
        (
            {"token_turn_index": GOOD.token_turn_index[:2]},
            r"token_turn_index has shape \(2, 11\) but outcome has 4 rows",
        ),
        ({"turn_mask": GOOD.turn_mask.float()}, "turn_mask must be a bool tensor"),
        ({"group_index": torch.zeros(4)}, "group_index must hold integers"),
        ({"token_turn_index": GOOD.token_turn_index.float()}, "token_turn_index must hold integers"),
        (
            {"outcome": torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=torch.float64)},
            r"outcome must be finite, but outcome\[1\] is nan",
        ),
        (
            {
                "turn_rewards": GOOD.turn_rewards.index_put(
                    (torch.tensor([2]), torch.tensor([0])), torch.tensor(float("inf"), dtype=torch.float64)
                )
            },
            r"turn_rewards\[2, 0\] is inf",
        ),
        ({"outcome": torch.zeros(0, dtype=torch.float64)}, "empty batch"),
        ({"turn_rewards": [[0.0]]}, "turn_rewards must be a torch.Tensor, got list"),
        (
            {
                "turn_rewards": GOOD.turn_rewards.index_put(
                    (torch.tensor([2]), torch.tensor([2])), torch.tensor(0.5, dtype=torch.float64)
                )
            },
            r"turn_rewards\[2, 2\] is 0.5 but turn 2 of trajectory 2 does not exist",
        ),
        (
            {
                "turn_mask": torch.tensor([[True, False, True]] * 4),
                "turn_rewards": torch.zeros(4, 3, dtype=torch.float64),
            },
            "trajectory 0 has turn 2 without turn 1",
        ),
    ],
)
def test_bad_inputs_are_named(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_advantages("tspo", _replace(GOOD, **changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"folr": None}, "first_hit_turn and folr come together"),
        (
            {"first_hit_turn": torch.tensor([1, -1, 2, -1])},
            r"first_hit_turn\[2\] is 2 but trajectory 2 has 2",
        ),
        ({"first_hit_turn": torch.tensor([1, -2, -1, -1])}, r"first_hit_turn\[1\] is -2"),
        (
            {"folr": torch.tensor([0.3, 0.3, 0.0, 0.0], dtype=torch.float64)},
            r"folr\[1\] is 0.3 but trajectory 1 has no hit",
        ),
        ({"first_hit_turn": torch.tensor([1.0, -1.0, -1.0, -1.0])}, "first_hit_turn must hold integers"),
        ({"folr": torch.tensor([0.3, 0.0, 0.0])}, r"folr has shape \(3,\) but outcome has 4 rows"),
    ],
)
def test_bad_hit_fields_are_named(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_advantages("grpo", _replace(GOOD, **changes))


def test_stage_advantages_need_the_hit_fields() -> None:
    bare = _replace(GOOD, first_hit_turn=None, folr=None)
    with pytest.raises(ValueError, match=r"needs AdvantageInputs\.first_hit_turn and \.folr"):
        compute_advantages("tspo", bare)
    with pytest.raises(ValueError, match="tspo mode 'adaptive'"):  # even with no homogeneous group
        compute_advantages("tspo", _replace(make_inputs(MIXED), first_hit_turn=None, folr=None))
    # Modes that do not split stages, and the baselines, run without them.
    compute_advantages("tspo", bare, mode="traj")
    compute_advantages("tspo", bare, mode="legacy")
    compute_advantages("grpo", bare)


def test_token_layout_errors_are_named() -> None:
    index = GOOD.token_turn_index.clone()
    index[1, 4] = 3  # T = 3
    with pytest.raises(
        ValueError, match=r"token_turn_index must be in \[-1, 3\).*token 4 of trajectory 1 has turn index 3"
    ):
        compute_advantages("grpo", _replace(GOOD, token_turn_index=index))
    index[1, 4] = -2
    with pytest.raises(ValueError, match="has turn index -2"):
        compute_advantages("grpo", _replace(GOOD, token_turn_index=index))
    mask = GOOD.loss_mask.clone()
    mask[0, -1] = 1.0  # a padding token marked generated
    with pytest.raises(
        ValueError, match="marks token 10 of trajectory 0 as generated, but its token_turn_index is -1"
    ):
        compute_advantages("rloo", _replace(GOOD, loss_mask=mask))
    index = GOOD.token_turn_index.clone()
    index[2, 0] = 2  # trajectory 2 has two turns
    with pytest.raises(ValueError, match=r"token 0 of trajectory 2 is in turn 2 .* has only 2 turn\(s\)"):
        compute_advantages("tspo", _replace(GOOD, token_turn_index=index))


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("grpoo", {}, r"unknown advantage estimator 'grpoo'; valid names: drgrpo, dspo, grpo, rloo, tspo"),
        (
            "grpo",
            {"mode": "turn"},
            r"'grpo' does not take option\(s\) mode; its options are: norm_by_std, eps",
        ),
        ("drgrpo", {"eps": 1e-3}, r"its options are: \(none\)"),
        ("tspo", {"mode": "stage"}, "unknown tspo mode 'stage'; valid modes: adaptive, turn, traj, legacy"),
        ("tspo", {"reclaim": -0.5}, "reclaim must be >= 0"),
        ("tspo", {"gamma": 0.0}, r"gamma must be in \(0, 1\]"),
        ("tspo", {"gamma": 1.5}, r"gamma must be in \(0, 1\]"),
        ("grpo", {"eps": 0.0}, "eps must be > 0"),
    ],
)
def test_bad_names_and_options(name: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_advantages(name, GOOD, **options)


# ------------------------------------------------------------------------------------ broadcast details


def naive_broadcast(
    turn_advantages: torch.Tensor, token_turn_index: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros(token_turn_index.shape, dtype=turn_advantages.dtype)
    for row in range(token_turn_index.shape[0]):
        for column in range(token_turn_index.shape[1]):
            if loss_mask[row, column] != 0:
                out[row, column] = turn_advantages[row, token_turn_index[row, column]]
    return out


@pytest.mark.parametrize("block_tokens", [1, 7, 22, 1 << 16])
def test_broadcast_is_the_same_for_any_block_size(monkeypatch: pytest.MonkeyPatch, block_tokens: int) -> None:
    monkeypatch.setattr(advantages_module, "_CPU_BLOCK_TOKENS", block_tokens)
    inputs = make_inputs(MIXED + ALL_WRONG + [([0.5, 0.5], 1.0, 3)])
    turn_advantages = torch.randn(inputs.turn_mask.shape, dtype=torch.float64) * inputs.turn_mask
    tokens = broadcast_turn_advantages(
        turn_advantages, inputs.turn_mask, inputs.token_turn_index, inputs.loss_mask
    )
    assert torch.equal(tokens, naive_broadcast(turn_advantages, inputs.token_turn_index, inputs.loss_mask))
    # A malformed token is still found when it sits in the last of many blocks.
    mask = inputs.loss_mask.clone()
    mask[-1, -1] = 1.0
    with pytest.raises(ValueError, match="as generated, but its token_turn_index is -1"):
        broadcast_turn_advantages(turn_advantages, inputs.turn_mask, inputs.token_turn_index, mask)


def test_broadcast_with_huge_advantages_still_checks_the_layout() -> None:
    inputs = make_inputs(ALL_WRONG)
    huge = torch.full(inputs.turn_mask.shape, 1e30, dtype=torch.float64) * inputs.turn_mask
    tokens = broadcast_turn_advantages(huge, inputs.turn_mask, inputs.token_turn_index, inputs.loss_mask)
    assert torch.equal(tokens, naive_broadcast(huge, inputs.token_turn_index, inputs.loss_mask))
    mask = inputs.loss_mask.clone()
    mask[0, -1] = 1.0
    with pytest.raises(ValueError, match="token_turn_index is -1"):
        broadcast_turn_advantages(huge, inputs.turn_mask, inputs.token_turn_index, mask)
    with pytest.raises(ValueError, match="turn_advantages must be finite"):
        broadcast_turn_advantages(
            huge * float("nan"), inputs.turn_mask, inputs.token_turn_index, inputs.loss_mask
        )


def test_broadcast_of_empty_response() -> None:
    tokens = broadcast_turn_advantages(
        torch.ones(2, 1),
        torch.ones(2, 1, dtype=torch.bool),
        torch.zeros(2, 0, dtype=torch.long),
        torch.zeros(2, 0),
    )
    assert tokens.shape == (2, 0)


def test_broadcast_checks_its_arguments() -> None:
    index, mask = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4)
    turns = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"turn_mask has shape \(2, 2\) but turn_advantages has shape \(2, 3\)"
    ):
        broadcast_turn_advantages(torch.zeros(2, 3), turns[:, :2], index, mask)
    with pytest.raises(
        ValueError, match=r"token_turn_index has shape \(3, 4\) but turn_advantages has 2 rows"
    ):
        broadcast_turn_advantages(torch.zeros(2, 3), turns, torch.zeros(3, 4, dtype=torch.long), mask)
    with pytest.raises(
        ValueError, match=r"loss_mask has shape \(2, 5\) but token_turn_index has shape \(2, 4\)"
    ):
        broadcast_turn_advantages(torch.zeros(2, 3), turns, index, torch.ones(2, 5))
    with pytest.raises(ValueError, match="turn_advantages must be float32 or float64"):
        broadcast_turn_advantages(torch.zeros(2, 3, dtype=torch.float16), turns, index, mask)


def test_float32_rounding_is_not_a_signal() -> None:
    # Three ways to reach R = 1.3 in float32 differ by rounding (about 1e-8 here, 1e-7 after verl's
    # span sums); a 1e-9 tolerance would turn that into advantages of about +-0.01.
    same = make_inputs(
        [([0.3, 1.0], 1.0, 0), ([0.6, 0.7], 1.0, 0), ([1.3], 1.0, 0), ([0.1, 0.2, 1.0], 1.0, 0)],
        dtype=torch.float32,
    )
    assert float(same.trajectory_reward().max() - same.trajectory_reward().min()) > 1e-9
    for name, options in [("grpo", {}), ("rloo", {})] + [
        ("tspo", {"mode": mode}) for mode in ("adaptive", "turn", "traj", "legacy")
    ]:
        assert torch.all(compute_advantages(name, same, **options).token_advantages == 0), (name, options)
    # In float64 the same tiny difference is real and kept.
    exact = make_inputs([([1.3], 1.3, 0), ([1.3 + 1e-7], 1.3 + 1e-7, 0)])
    assert torch.all(compute_advantages("grpo", exact).turn_advantages[:, 0] != 0)
