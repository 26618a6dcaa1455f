"""The stage-gradient benchmark (benchmarks/stage_gradients.py) on a tiny Qwen2 and fabricated batches:
stage parts of the gradient add up to the whole, zero answer-stage advantages give a zero answer-stage
gradient, and the helpers on hand-checked data (SmolLM2 itself is measured by the benchmark)."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2ForCausalLM

from conftest import tiny_qwen2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import learning_smollm2
import stage_gradients as sg
from tspo.algorithms import compute_advantages
from tspo.rewards import trajectory_category, turn_rewards
from tspo.scoring import TrajectoryScore, advantage_inputs
from tspo.training.update import UpdateSettings
from tspo.trajectory import TrajectoryBuilder, TurnAction, collate_trajectories

ALPHA = 0.3
#: (group, first-hit turn or None, outcome) of each fabricated trajectory; three turns each
#: (search, search, answer). Group 0 is all wrong with two near misses, group 1 mixed with one.
MEMBERS = [
    (0, 0, 0.0),
    (0, 1, 0.0),
    (0, None, 0.0),
    (0, None, 0.0),
    (1, 0, 1.0),
    (1, None, 0.0),
    (1, 1, 0.0),
    (1, None, 1.0),
]
NEAR_MISSES = [True, True, False, False, False, False, True, False]


def tiny_model() -> Qwen2ForCausalLM:
    return tiny_qwen2()


def fabricated_batch(alpha: float = ALPHA):
    """Eight 3-turn trajectories (2-3 generated tokens per turn, observations after the searches), their
    scores as the trainer's scoring lays them out (FOLR ``alpha``; 0 for the baselines), and the
    estimator inputs."""
    trajectories, scores = [], []
    for row, (group, hit, outcome) in enumerate(MEMBERS):
        builder = TrajectoryBuilder([1, 2, 3 + row % 4], group_id=group)
        builder.add_generation([5 + row, 6], None, "<search>q</search>", TurnAction.SEARCH, "q")
        builder.add_observation([8, 9, 10][: 1 + row % 3], "obs")
        builder.add_generation([11, 12 + row % 5, 13], None, "<search>q</search>", TurnAction.SEARCH, "q")
        builder.add_observation([14, 15], "obs")
        builder.add_generation([16 + row, 17], None, "<answer>a</answer>", TurnAction.ANSWER, "a")
        trajectories.append(builder.build())
        scores.append(
            TrajectoryScore(
                answer="a",
                outcome=outcome,
                first_hit_turn=hit,
                turn_rewards=tuple(turn_rewards(3, hit, outcome, alpha)),
                category=trajectory_category(hit is not None, outcome),
                folr=alpha if hit is not None else 0.0,
            )
        )
    batch = collate_trajectories(trajectories, pad_token_id=0)
    inputs = advantage_inputs(scores, batch, [t.group_id for t in trajectories])
    return batch, scores, inputs


def settings(policy_loss: str = "token_clip", loss_agg: str = "token-mean") -> UpdateSettings:
    # The run's KL and clipping on purpose: the benchmark must switch both off itself.
    return UpdateSettings(
        policy_loss=policy_loss,
        loss_agg=loss_agg,
        micro_batch_size=3,
        kl_coef=0.0,
        grad_clip=1.0,
        dual_clip=3.0,
    )


# ------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(
    ("policy_loss", "loss_agg"),
    [("token_clip", "token-mean"), ("seq_clip", "token-mean"), ("seq_clip", "seq-mean-token-mean")],
)
def test_stage_parts_of_the_gradient_add_up_to_the_whole_gradient(policy_loss, loss_agg):
    model = tiny_model()
    batch, scores, inputs = fabricated_batch()
    advantages = compute_advantages("tspo", inputs, mode="turn").token_advantages
    stages = sg.token_stage_masks(inputs)
    near_miss = sg.near_miss_rows(scores)
    run = settings(policy_loss, loss_agg)
    parts = sg.stage_gradients(model, batch, advantages, stages, near_miss, run, progress=lambda _: None)
    whole = sg.policy_gradient(model, batch, advantages, run)
    ret, ans = parts["all"]["retrieval"], parts["all"]["answer"]
    # Both stages carry a real, different signal, so the sum is not trivially one of them.
    assert ret.norm() > 1e-4 and ans.norm() > 1e-4
    assert abs(torch.nn.functional.cosine_similarity(ret, ans, dim=0)) < 0.99
    torch.testing.assert_close(ret + ans, whole, rtol=1e-5, atol=1e-7)
    # The near-miss parts are a strict part of each stage's gradient.
    for stage in sg.STAGES:
        assert 0 < parts["near_miss"][stage].norm() < parts["all"][stage].norm()
    stats = sg.split_statistics(ret, ans)
    assert stats["grad_all"] == pytest.approx(float(whole.norm()), rel=1e-5)


def test_a_restriction_keeps_the_full_batch_normaliser():
    """A part's denominator is the whole batch's generated tokens, not its own rows' (else the parts would
    not add up): the near-miss part equals the gradient on the near-miss rows alone, scaled by their share
    of the batch's tokens."""
    model = tiny_model()
    batch, scores, inputs = fabricated_batch()
    advantages = compute_advantages("tspo", inputs, mode="turn").token_advantages
    near_miss = sg.near_miss_rows(scores)
    part = sg.policy_gradient(model, batch, sg.restrict(advantages, batch.loss_mask, near_miss), settings())
    rows = near_miss.nonzero().flatten().tolist()
    alone = sg.policy_gradient(model, batch.select(rows), advantages[rows], settings())
    share = float(batch.loss_mask[rows].sum() / batch.loss_mask.sum())
    assert share < 0.5
    torch.testing.assert_close(part, share * alone, rtol=1e-5, atol=1e-7)
    # Linear in the advantages at the start weights (and the norm is not clipped).
    everything = sg.policy_gradient(model, batch, advantages, settings())
    doubled = sg.policy_gradient(model, batch, 2 * advantages, settings())
    torch.testing.assert_close(doubled, 2 * everything, rtol=1e-5, atol=1e-7)


def test_zero_answer_stage_advantages_give_a_zero_answer_stage_gradient():
    model = tiny_model()
    batch, scores, inputs = fabricated_batch()
    stages = sg.token_stage_masks(inputs)
    advantages = sg.restrict(
        compute_advantages("tspo", inputs, mode="turn").token_advantages, stages["retrieval"]
    )
    report = sg.algorithm_report(
        model, batch, inputs, advantages, None, sg.near_miss_rows(scores), settings(), True, lambda _: None
    )
    for subset in sg.SUBSETS:
        assert report[subset]["grad_answer"] == 0.0
        assert report[subset]["advantage_mass"]["answer"] == 0.0
        assert report[subset]["grad_retrieval"] > 0
        assert report[subset]["grad_all"] == pytest.approx(report[subset]["grad_retrieval"], rel=1e-6)
        assert report[subset]["cos"] is None
    assert report["sum_check"]["relative_error"] < 1e-5


def test_grpo_gives_near_misses_of_an_all_wrong_group_no_gradient_and_tspo_does():
    model = tiny_model()
    batch, scores, inputs = fabricated_batch()
    near_miss = sg.near_miss_rows(scores)
    in_group_zero = torch.tensor([g == 0 for g, _, _ in MEMBERS])
    grpo = compute_advantages("grpo", fabricated_batch(alpha=0.0)[2]).token_advantages  # R = o
    tspo = compute_advantages("tspo", inputs, mode="adaptive")
    for name, advantages in (("grpo", grpo), ("tspo", tspo.token_advantages)):
        report = sg.algorithm_report(
            model,
            batch,
            inputs,
            advantages,
            None,
            near_miss & in_group_zero,
            settings(),
            False,
            lambda _: None,
        )
        moved = report["near_miss"]["grad_answer"] > 0 and report["near_miss"]["grad_retrieval"] > 0
        assert moved == (name == "tspo"), name
    # TSPO's two stages pull its near misses in opposite directions: + search turns, - answer turn.
    report = sg.algorithm_report(
        model,
        batch,
        inputs,
        tspo.token_advantages,
        tspo.turn_level,
        near_miss & in_group_zero,
        settings(),
        False,
        lambda _: None,
    )
    assert report["stage_level"] == pytest.approx(0.5)
    assert report["near_miss"]["rows_with_signal"] == {"retrieval": 2, "answer": 2}


def test_parts_without_signal_are_not_run_and_equal_parts_are_run_once():
    model = tiny_model()
    batch, scores, inputs = fabricated_batch()
    stages = sg.token_stage_masks(inputs)
    near_miss = sg.near_miss_rows(scores)
    # Only near misses carry an advantage, and only on the retrieval stage.
    advantages = sg.restrict(
        compute_advantages("tspo", inputs, mode="turn").token_advantages, stages["retrieval"]
    )
    advantages = sg.restrict(advantages, batch.loss_mask, near_miss)
    runs: list[str] = []
    parts = sg.stage_gradients(model, batch, advantages, stages, near_miss, settings(), progress=runs.append)
    assert runs == ["retrieval stage, all trajectories (3 rows)"]
    assert parts["near_miss"]["retrieval"] is parts["all"]["retrieval"]
    assert parts["all"]["answer"] is None and parts["near_miss"]["answer"] is None
    torch.testing.assert_close(
        parts["all"]["retrieval"], sg.policy_gradient(model, batch, advantages, settings())
    )


def test_same_gradients_needs_equal_advantages_and_loss_settings():
    advantages = torch.tensor([[1.0, 0.0], [-1.0, 0.5]])
    stats = {"all": {"grad_all": 1.0}}
    measured = [(advantages.clone(), sg.gradient_settings(settings()), "tspo", stats)]
    assert sg.same_gradients(measured, advantages, settings()) == ("tspo", stats)
    # Settings the gradient does not read (KL, clipping of the norm) do not matter; the loss does.
    assert sg.same_gradients(measured, advantages, dataclasses.replace(settings(), grad_clip=5.0))
    assert sg.same_gradients(measured, advantages, settings("seq_clip")) is None
    assert sg.same_gradients(measured, advantages * 2, settings()) is None
    assert sg.same_gradients([], advantages, settings()) is None


def test_policy_gradient_leaves_the_weights_alone_and_is_not_clipped():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    batch, _, inputs = fabricated_batch()
    advantages = 100 * compute_advantages("tspo", inputs, mode="turn").token_advantages
    gradient = sg.policy_gradient(model, batch, advantages, settings())
    assert gradient.shape == (sum(p.numel() for p in model.parameters()),)
    assert gradient.norm() > 1.0  # the run's grad_clip of 1 did not apply
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert sg.policy_gradient(model, batch, torch.zeros_like(advantages), settings()).abs().sum() == 0


def test_gradient_settings_drop_kl_entropy_clipping_and_extra_epochs_only():
    run = UpdateSettings(kl_coef=0.01, entropy_coef=0.1, epochs=2, grad_clip=1.0, policy_loss="seq_clip")
    measured = sg.gradient_settings(run)
    assert (measured.kl_coef, measured.entropy_coef, measured.epochs) == (0.0, 0.0, 1)
    assert math.isinf(measured.grad_clip)
    assert (measured.policy_loss, measured.loss_agg, measured.eps_low) == (
        "seq_clip",
        run.loss_agg,
        run.eps_low,
    )


# -------------------------------------------------------------------------------------------- helpers


def test_token_stage_masks_follow_the_first_hit_and_cover_the_loss_mask():
    batch, _, inputs = fabricated_batch()
    stages = sg.token_stage_masks(inputs)
    torch.testing.assert_close(stages["retrieval"] + stages["answer"], batch.loss_mask)
    assert not bool((stages["retrieval"].bool() & stages["answer"].bool()).any())
    turn = batch.token_turn_index
    generated = batch.loss_mask.bool()
    for row, (_, hit, _) in enumerate(MEMBERS):
        last_retrieval_turn = 1 if hit is None else hit  # without a hit: every turn but the last
        expected = generated[row] & (turn[row] <= last_retrieval_turn)
        assert torch.equal(stages["retrieval"][row].bool(), expected), row


def test_restrict_mass_and_rows_with_signal_on_hand_made_numbers():
    advantages = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.0]])
    stages = {"retrieval": torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])}
    stages["answer"] = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    rows = torch.tensor([False, True])
    assert torch.equal(
        sg.restrict(advantages, stages["answer"], rows), torch.tensor([[0.0, 0, 0], [0, 5, 0]])
    )
    assert sg.advantage_mass(advantages, stages) == {"retrieval": 7.0, "answer": 8.0}
    assert sg.advantage_mass(advantages, stages, rows) == {"retrieval": 4.0, "answer": 5.0}
    assert sg.rows_with_signal(advantages, stages) == {"retrieval": 2, "answer": 2}
    assert sg.rows_with_signal(torch.tensor([[1.0, 0, 0], [0, 0, 0]]), stages) == {
        "retrieval": 1,
        "answer": 0,
    }


def test_split_statistics_and_float64_reductions(monkeypatch):
    monkeypatch.setattr(sg, "_CHUNK", 3)  # several chunks, the last one partial
    a = torch.tensor([3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    b = torch.tensor([0.0, 4.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    stats = sg.split_statistics(a, b)
    assert stats == {"grad_retrieval": 3.0, "grad_answer": 4.0, "grad_all": 5.0, "cos": 0.0}
    assert sg.split_statistics(a, -a)["cos"] == pytest.approx(-1.0)
    assert sg.split_statistics(a, -a)["grad_all"] == 0.0
    assert sg.split_statistics(a, torch.zeros(7))["cos"] is None
    c = torch.arange(7.0)
    assert sg.dot(c, c) == float((c * c).sum())
    assert sg.distance_to_sum(c, [c - 1]) == pytest.approx(math.sqrt(7))
    assert sg.distance_to_sum(c, [0.5 * c, 0.5 * c]) == 0.0
    assert sg.distance_to_sum(a, []) == 3.0


def test_near_miss_rows_and_batch_description():
    _, scores, _ = fabricated_batch()
    assert sg.near_miss_rows(scores).tolist() == NEAR_MISSES
    description = sg.describe_batch(scores, [g for g, _, _ in MEMBERS])
    assert description["trajectories"] == 8 and description["groups"] == 2
    assert description["groups_all_wrong"] == 1 and description["groups_all_right"] == 0
    assert description["near_misses_per_group"] == [2, 1]
    assert description["categories"]["near_miss"] == 3
    assert description["outcome_mean"] == pytest.approx(0.25)


def test_table_and_mean_over_seeds_on_fabricated_reports():
    def report(scale: float, cos: float | None) -> dict:
        subset = {
            "advantage_mass": {"retrieval": scale, "answer": 2 * scale},
            "grad_retrieval": scale,
            "grad_answer": 0.5 * scale,
            "grad_all": 1.2 * scale,
            "cos": cos,
        }
        return {"stage_level": None, "all": subset, "near_miss": subset}

    seeds = {0: {"algorithms": {"grpo": report(1.0, None)}}, 1: {"algorithms": {"grpo": report(3.0, -0.5)}}}
    means = sg.mean_over_seeds(seeds, ["grpo"])["grpo"]
    assert means["‖g_ret‖"] == 2.0 and means["|A| ans"] == 4.0
    assert means["cos"] == -0.5  # the seed without a cosine is left out, not counted as 0
    assert means["stage-lvl"] is None
    text = sg.table(seeds, ["grpo"])
    assert text.count("\n") == 4  # header, rule, two seeds, the mean
    assert "| mean | grpo | - | 2.0000 | 4.0000 |" in text


def test_as_algorithm_swaps_the_row_and_restores_it(tmp_path):
    base = learning_smollm2._config(0, "grpo", tmp_path, 1, [])
    trainer = SimpleNamespace(config=base, algorithm=base.algorithm.resolved())
    dspo = learning_smollm2._config(0, "dspo", tmp_path, 1, []).algorithm
    with sg.as_algorithm(trainer, dspo):
        assert trainer.algorithm.name == "dspo" and trainer.algorithm.policy_loss == "seq_clip"
        assert trainer.config.algorithm.name == "dspo"
        assert trainer.config.rollout is base.rollout and trainer.config.trainer is base.trainer
    assert trainer.config is base and trainer.algorithm.name == "grpo"
