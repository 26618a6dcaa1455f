"""Hypothesis properties of the advantage estimators and policy losses over random batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tspo.algorithms import (
    AdvantageInputs,
    aggregate_loss,
    compute_advantages,
    kl_penalty,
    policy_loss,
)

ESTIMATORS = (
    [("grpo", {}), ("drgrpo", {}), ("dspo", {}), ("rloo", {})]
    + [("tspo", {"mode": mode}) for mode in ("adaptive", "turn", "traj")]
    + [("tspo", {"mode": "adaptive", "reclaim": 0.5})]
    + [("tspo", {"mode": "legacy", "gamma": gamma}) for gamma in (1.0, 0.7)]
)
PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)
KL_KINDS = ("kl", "abs", "mse", "low_var_kl")


@dataclass(frozen=True)
class Batch:
    inputs: AdvantageInputs
    group_sizes: dict[int, int]


def dyadic(low: int, high: int) -> st.SearchStrategy[float]:
    """Multiples of 1/8: sums and shifts of these are exact, so invariances hold without rounding noise."""
    return st.integers(low * 8, high * 8).map(lambda value: value / 8)


@st.composite
def batches(draw: st.DrawFn, exact: bool = False) -> Batch:
    max_turns = draw(st.integers(1, 4))
    group_ids = draw(st.lists(st.integers(-50, 50), min_size=1, max_size=4, unique=True))
    reward = dyadic(-3, 3) if exact else st.one_of(st.sampled_from([0.0, 0.3, 1.0, 1.3]), st.floats(-3, 3))
    rows = []
    for group in group_ids:
        for _ in range(draw(st.integers(1, 5))):
            num_turns = draw(st.integers(1, max_turns))
            rewards = draw(st.lists(reward, min_size=num_turns, max_size=num_turns))
            # Per turn: generated tokens then observation tokens (any count, including none).
            layout = draw(
                st.lists(
                    st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=num_turns, max_size=num_turns
                )
            )
            hit = draw(st.integers(-1, num_turns - 1))
            folr = draw(st.sampled_from([0.1, 0.3, 0.5])) if hit >= 0 else 0.0
            rows.append(
                (
                    group,
                    draw(st.sampled_from([0.0, 0.5, 1.0])),
                    rewards,
                    layout,
                    draw(st.integers(0, 3)),
                    hit,
                    folr,
                )
            )
    rows = draw(st.permutations(rows))  # groups interleaved in the batch
    length = max(1, max(sum(g + o for g, o in layout) + pad for _, _, _, layout, pad, _, _ in rows))
    batch = len(rows)
    turn_rewards = torch.zeros(batch, max_turns, dtype=torch.float64)
    turn_mask = torch.zeros(batch, max_turns, dtype=torch.bool)
    token_turn_index = torch.full((batch, length), -1, dtype=torch.long)
    loss_mask = torch.zeros(batch, length)
    for row, (_, _, rewards, layout, *_) in enumerate(rows):
        turn_rewards[row, : len(rewards)] = torch.tensor(rewards, dtype=torch.float64)
        turn_mask[row, : len(rewards)] = True
        position = 0
        for turn, (generated, observed) in enumerate(layout):
            token_turn_index[row, position : position + generated + observed] = turn
            loss_mask[row, position : position + generated] = 1.0
            position += generated + observed
    inputs = AdvantageInputs(
        outcome=torch.tensor([outcome for _, outcome, *_ in rows], dtype=torch.float64),
        turn_rewards=turn_rewards,
        turn_mask=turn_mask,
        token_turn_index=token_turn_index,
        loss_mask=loss_mask.bool() if draw(st.booleans()) else loss_mask,
        group_index=torch.tensor([group for group, *_ in rows]),
        first_hit_turn=torch.tensor([row[5] for row in rows]),
        folr=torch.tensor([row[6] for row in rows], dtype=torch.float64),
    )
    sizes = {group: sum(1 for row in rows if row[0] == group) for group in group_ids}
    return Batch(inputs, sizes)


def replace(inputs: AdvantageInputs, **changes: torch.Tensor) -> AdvantageInputs:
    fields = {field: getattr(inputs, field) for field in AdvantageInputs.__dataclass_fields__}
    return AdvantageInputs(**{**fields, **changes})


@PROPERTY_SETTINGS
@given(batches())
def test_advantages_are_zero_on_every_non_generated_token(batch: Batch) -> None:
    inputs = batch.inputs
    generated = inputs.loss_mask != 0
    for name, options in ESTIMATORS:
        out = compute_advantages(name, inputs, **options)
        assert torch.all(out.token_advantages[~generated] == 0), (name, options)
        assert torch.all(out.turn_advantages[~inputs.turn_mask] == 0), (name, options)
        rows, columns = generated.nonzero(as_tuple=True)
        turns = inputs.token_turn_index[rows, columns]
        assert torch.equal(out.token_advantages[rows, columns], out.turn_advantages[rows, turns]), (
            name,
            options,
        )
        assert torch.isfinite(out.token_advantages).all()


@PROPERTY_SETTINGS
@given(batches(), st.data())
def test_a_group_with_zero_reward_spread_gets_zero_advantage(batch: Batch, data: st.DataObject) -> None:
    inputs = batch.inputs
    group = data.draw(st.sampled_from(sorted(batch.group_sizes)))
    value = data.draw(st.sampled_from([0.0, 0.3, 1.0, 1.3, -2.5]))
    members = inputs.group_index == group
    # Every member of the group gets the same R (and the same o); where it sits among the turns varies.
    turn_rewards = inputs.turn_rewards.clone()
    turn_rewards[members] = 0.0
    last_turn = inputs.turn_mask.sum(dim=1) - 1
    rows = members.nonzero().flatten()
    turn_rewards[rows, data.draw(st.sampled_from([0, 1])) * last_turn[rows]] = value
    outcome = torch.where(members, 1.0 if value > 0.5 else 0.0, inputs.outcome).to(torch.float64)
    inputs = replace(inputs, turn_rewards=turn_rewards, outcome=outcome)
    for name, options in ESTIMATORS:
        if name != "rloo" and batch.group_sizes[group] == 1:
            continue  # verl's convention: a group of one has mean 0 and std 1, so A = R (not 0)
        out = compute_advantages(name, inputs, **options)
        assert torch.all(out.turn_advantages[members] == 0), (name, options)
        assert torch.all(out.token_advantages[members] == 0), (name, options)


@PROPERTY_SETTINGS
@given(batches(exact=True), st.data())
def test_grpo_is_invariant_to_adding_a_constant_to_all_rewards_of_a_group(
    batch: Batch, data: st.DataObject
) -> None:
    inputs = batch.inputs
    shifts = {group: data.draw(dyadic(-8, 8)) for group in batch.group_sizes}
    shift = torch.tensor([shifts[int(g)] for g in inputs.group_index], dtype=torch.float64)
    # Add the group's constant to the last turn, so every R_i of the group moves by it.
    last_turn = inputs.turn_mask.sum(dim=1) - 1
    turn_rewards = inputs.turn_rewards.clone()
    turn_rewards[torch.arange(len(shift)), last_turn] += shift
    shifted = replace(inputs, turn_rewards=turn_rewards)
    compared = torch.tensor([batch.group_sizes[int(g)] > 1 for g in inputs.group_index])  # see group of one
    invariant = [("grpo", {}), ("drgrpo", {}), ("rloo", {})] + [
        ("tspo", {"mode": mode})
        for mode in ("adaptive", "turn", "traj", "legacy")  # gamma = 1: G moves with R
    ]
    for name, options in invariant:
        before = compute_advantages(name, inputs, **options).token_advantages[compared]
        after = compute_advantages(name, shifted, **options).token_advantages[compared]
        torch.testing.assert_close(after, before, rtol=0, atol=1e-9, msg=f"{name} {options}")


@PROPERTY_SETTINGS
@given(batches(), st.randoms(use_true_random=False))
def test_advantages_follow_a_permutation_of_the_batch(batch: Batch, rng) -> None:
    inputs = batch.inputs
    order = list(range(inputs.batch_size))
    rng.shuffle(order)
    index = torch.tensor(order)
    permuted = AdvantageInputs(**{f: getattr(inputs, f)[index] for f in AdvantageInputs.__dataclass_fields__})
    for name, options in ESTIMATORS:
        original = compute_advantages(name, inputs, **options).token_advantages
        torch.testing.assert_close(
            compute_advantages(name, permuted, **options).token_advantages,
            original[index],
            rtol=1e-12,
            atol=1e-12,
        )


# ------------------------------------------------------------------------------------------------ losses

masked_values = st.one_of(st.floats(-1e4, 1e4), st.sampled_from([float("inf"), float("-inf"), float("nan")]))


@st.composite
def loss_batches(draw: st.DrawFn) -> tuple[torch.Tensor, ...]:
    batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    cells = batch * length
    values = st.floats(-3, 0.5)
    logp_new = torch.tensor(draw(st.lists(values, min_size=cells, max_size=cells))).view(batch, length)
    logp_old = torch.tensor(draw(st.lists(values, min_size=cells, max_size=cells))).view(batch, length)
    advantages = torch.tensor(draw(st.lists(st.floats(-3, 3), min_size=cells, max_size=cells))).view(
        batch, length
    )
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=cells, max_size=cells))).view(batch, length)
    junk = [
        torch.tensor(draw(st.lists(masked_values, min_size=cells, max_size=cells))).view(batch, length)
        for _ in range(3)
    ]
    return logp_new, logp_old, advantages, mask, *junk


@PROPERTY_SETTINGS
@given(
    loss_batches(), st.sampled_from(["token_clip", "seq_clip"]), st.sampled_from([None, 3.0]), st.booleans()
)
def test_the_loss_ignores_observation_tokens(
    tensors: tuple[torch.Tensor, ...], name: str, dual_clip, float_mask: bool
) -> None:
    logp_new, logp_old, advantages, mask, junk_new, junk_old, junk_advantages = tensors
    loss_mask = mask.float() if float_mask else mask
    # Observation (masked) positions get arbitrary values, NaN and inf included.
    changed = [
        torch.where(mask, clean, junk)
        for clean, junk in ((logp_new, junk_new), (logp_old, junk_old), (advantages, junk_advantages))
    ]
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        results = []
        for new, old, adv in ((logp_new, logp_old, advantages), changed):
            new = new.clone().requires_grad_(True)
            loss, metrics = policy_loss(
                name, new, old, adv, loss_mask, eps_low=0.2, eps_high=0.28, dual_clip=dual_clip, agg=agg
            )
            kl = sum(
                aggregate_loss(kl_penalty(new, old, kind, loss_mask), loss_mask, agg) for kind in KL_KINDS
            )
            (loss + kl).backward()
            results.append((loss.detach(), kl.detach(), metrics, new.grad))
        (loss_a, kl_a, metrics_a, grad_a), (loss_b, kl_b, metrics_b, grad_b) = results
        assert torch.equal(loss_a, loss_b) and torch.isfinite(loss_a)
        assert torch.equal(kl_a, kl_b)
        assert metrics_a.keys() == metrics_b.keys()
        for key in metrics_a:
            assert torch.equal(metrics_a[key], metrics_b[key]), key
        assert torch.equal(grad_a, grad_b)
        assert torch.all(grad_b[~mask] == 0)
