"""TSPO v2 stage advantages: the properties DESIGN section 5 promises, over random realistic groups.

Groups are built the way scoring builds them: FOLR alpha on the first-hit turn (anywhere, or none), the
outcome (EM or F1) on the last turn, optional Kimi length shaping added to the last turn, mixed lengths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tspo.algorithms import AdvantageInputs, compute_advantages, stage_masks
from tspo.rewards import kimi_length_penalty, turn_rewards

SETTINGS = settings(max_examples=150, deadline=None)
STAGE_MODES = ("adaptive", "turn")
ALL_MODES = ("adaptive", "turn", "traj", "legacy")


@dataclass(frozen=True)
class Member:
    num_turns: int
    first_hit: int | None
    outcome: float
    length: int


def build(groups: list[list[Member]], alpha: float, shaping: float = 0.0) -> AdvantageInputs:
    """AdvantageInputs for ``groups``, two generated and one observation token per turn."""
    members = [(g, m) for g, group in enumerate(groups) for m in group]
    max_turns = max(m.num_turns for _, m in members)
    batch = len(members)
    rewards = torch.zeros(batch, max_turns, dtype=torch.float64)
    mask = torch.zeros(batch, max_turns, dtype=torch.bool)
    length = 3 * max_turns
    token_turn = torch.full((batch, length), -1, dtype=torch.long)
    loss_mask = torch.zeros(batch, length)
    shaped = []
    for group in groups:
        if shaping:
            shaped += kimi_length_penalty(
                [m.length for m in group], [m.outcome >= 1.0 for m in group], shaping
            )
        else:
            shaped += [0.0] * len(group)
    for row, (_, member) in enumerate(members):
        terms = turn_rewards(member.num_turns, member.first_hit, member.outcome, alpha)
        terms[-1] += shaped[row]
        rewards[row, : member.num_turns] = torch.tensor(terms, dtype=torch.float64)
        mask[row, : member.num_turns] = True
        for turn in range(member.num_turns):
            token_turn[row, 3 * turn : 3 * turn + 3] = turn
            loss_mask[row, 3 * turn : 3 * turn + 2] = 1.0
    return AdvantageInputs(
        outcome=torch.tensor([m.outcome for _, m in members], dtype=torch.float64),
        turn_rewards=rewards,
        turn_mask=mask,
        token_turn_index=token_turn,
        loss_mask=loss_mask,
        group_index=torch.tensor([g for g, _ in members]),
        first_hit_turn=torch.tensor([-1 if m.first_hit is None else m.first_hit for _, m in members]),
        folr=torch.tensor(
            [alpha if m.first_hit is not None else 0.0 for _, m in members], dtype=torch.float64
        ),
    )


@st.composite
def members(draw: st.DrawFn, outcome: st.SearchStrategy[float]) -> Member:
    num_turns = draw(st.integers(1, 4))
    first_hit = draw(st.one_of(st.none(), st.integers(0, num_turns - 1)))
    return Member(num_turns, first_hit, draw(outcome), draw(st.integers(5, 60)))


ANY_OUTCOME = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.0, 1.0))  # EM or F1
ALPHAS = st.floats(0.05, 0.95)


def group_of(outcome: st.SearchStrategy[float]) -> st.SearchStrategy[list[Member]]:
    return st.lists(members(outcome), min_size=2, max_size=8)


@SETTINGS
@given(st.lists(group_of(st.just(1.0)), min_size=1, max_size=3), ALPHAS, st.sampled_from(STAGE_MODES))
def test_all_correct_group_never_pushes_an_answer_down(
    groups: list[list[Member]], alpha: float, mode: str
) -> None:
    inputs = build(groups, alpha)
    out = compute_advantages("tspo", inputs, mode=mode)
    _, answer = stage_masks(inputs, inputs.first_hit_turn)
    assert bool((out.turn_advantages[answer] >= 0).all())
    assert bool((out.turn_advantages[answer] == 0).all())  # all O equal: the answer keeps A^o = 0


@SETTINGS
@given(st.lists(group_of(st.just(0.0)), min_size=1, max_size=3), ALPHAS, st.sampled_from(STAGE_MODES))
def test_all_wrong_group_credits_a_near_miss_search_and_blames_its_answer(
    groups: list[list[Member]], alpha: float, mode: str
) -> None:
    inputs = build(groups, alpha)
    out = compute_advantages("tspo", inputs, mode=mode)
    retrieval, answer = stage_masks(inputs, inputs.first_hit_turn)
    hit = inputs.first_hit_turn >= 0
    group = inputs.group_index
    for row in range(inputs.batch_size):
        mates = group == group[row]
        advantages = out.turn_advantages[row]
        if hit[row] and not bool(hit[mates].all()):  # a near miss in a group that is not all hits
            assert bool((advantages[retrieval[row]] > 0).all())
            assert bool((advantages[answer[row]] < 0).all())
        if not hit[row]:  # a complete failure's answer turn is exactly 0
            assert bool((advantages[answer[row]] == 0).all())
            assert int(answer[row].sum()) == 1


@SETTINGS
@given(
    st.lists(group_of(ANY_OUTCOME), min_size=1, max_size=3),
    ALPHAS,
    st.sampled_from([0.0, 0.5]),
    st.sampled_from(ALL_MODES),
)
def test_zero_spread_of_r_gives_exactly_zero(
    groups: list[list[Member]], alpha: float, shaping: float, mode: str
) -> None:
    # Make the first group's R all equal: the same outcome, every member a hit or none a hit.
    first = groups[0]
    hit = first[0].first_hit is not None
    groups[0] = [
        Member(m.num_turns, (m.num_turns - 1 if hit else None), first[0].outcome, first[0].length)
        for m in first
    ]
    inputs = build(groups, alpha, shaping)
    out = compute_advantages("tspo", inputs, mode=mode)
    members_of_first = inputs.group_index == 0
    assert bool((out.turn_advantages[members_of_first] == 0).all())
    assert bool((out.token_advantages[members_of_first] == 0).all())


@SETTINGS
@given(
    st.lists(group_of(ANY_OUTCOME), min_size=1, max_size=3),
    st.sampled_from([0.0, 0.5]),
    st.sampled_from(ALL_MODES),
    st.sampled_from([0.0, 1.0, 2.0]),
)
def test_alpha_zero_is_grpo_on_every_token(
    groups: list[list[Member]], shaping: float, mode: str, reclaim: float
) -> None:
    inputs = build(groups, 0.0, shaping)
    options = {"mode": mode} if mode == "legacy" else {"mode": mode, "reclaim": reclaim}
    tspo = compute_advantages("tspo", inputs, **options)
    grpo = compute_advantages("grpo", inputs)
    assert torch.equal(tspo.token_advantages, grpo.token_advantages)


@SETTINGS
@given(st.lists(group_of(ANY_OUTCOME), min_size=1, max_size=3), ALPHAS, st.sampled_from([0.0, 0.5]))
def test_retrieval_stage_is_grpo_on_r_and_traj_mode_is_grpo_on_r(
    groups: list[list[Member]], alpha: float, shaping: float
) -> None:
    inputs = build(groups, alpha, shaping)
    grpo = compute_advantages("grpo", inputs).turn_advantages
    turn = compute_advantages("tspo", inputs, mode="turn").turn_advantages
    retrieval, _ = stage_masks(inputs, inputs.first_hit_turn)
    torch.testing.assert_close(turn[retrieval], grpo[retrieval], rtol=0, atol=1e-9)
    torch.testing.assert_close(compute_advantages("tspo", inputs, mode="traj").turn_advantages, grpo)


def test_stage_masks_split_each_trajectory() -> None:
    groups = [[Member(3, 1, 0.0, 9), Member(3, None, 0.0, 9), Member(1, None, 1.0, 9), Member(2, 1, 0.0, 9)]]
    inputs = build(groups, 0.3)
    retrieval, answer = stage_masks(inputs, inputs.first_hit_turn)
    assert retrieval.tolist() == [[True, True, False], [True, True, False], [False] * 3, [True, True, False]]
    assert answer.tolist() == [[False, False, True], [False, False, True], [True, False, False], [False] * 3]
    assert torch.equal(retrieval | answer, inputs.turn_mask) and not bool((retrieval & answer).any())
