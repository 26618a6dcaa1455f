"""The ``tspo`` estimator inside verl: registration, verl's own dispatch, and equality with tspo.algorithms.

Runs in the verl environment (``scripts/verl_venv.sh``); skipped where verl is not installed.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.verl

verl = pytest.importorskip("verl")

from omegaconf import OmegaConf  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402

from tspo.algorithms import AdvantageInputs, compute_advantages  # noqa: E402
from tspo.integrations.verl.agent_loop import SearchR1AgentLoopOutput  # noqa: E402
from tspo.integrations.verl.estimator import compute_tspo_advantage, tspo_options  # noqa: E402
from tspo.rewards import kimi_length_penalty, turn_rewards  # noqa: E402


@dataclass
class Rollout:
    """One trajectory described turn by turn (the ground truth the batch is built from)."""

    uid: str
    generated: list[int]  # generated tokens per turn
    observed: list[int]  # observation tokens per turn
    hit: int | None
    outcome: float
    alpha: float = 0.3

    @property
    def num_turns(self) -> int:
        return len(self.generated)

    def mask(self) -> list[int]:
        return [
            flag
            for gen, obs in zip(self.generated, self.observed, strict=True)
            for flag in [1] * gen + [0] * obs
        ]

    def turn_index(self) -> list[int]:
        return [
            k if flag else -1
            for k, (gen, obs) in enumerate(zip(self.generated, self.observed, strict=True))
            for flag in [1] * gen + [0] * obs
        ]

    def verl_row(self) -> dict[str, torch.Tensor]:
        """The batch row verl's V1 agent-loop worker builds: ``AgentLoopOutput.as_dict()``."""
        mask = self.mask()
        ends = np.cumsum([g + o for g, o in zip(self.generated, self.observed, strict=True)]) - 1
        output = SearchR1AgentLoopOutput(
            prompt_ids=[1, 2, 3],
            response_ids=list(range(10, 10 + len(mask))),
            response_mask=mask,
            metrics={},
            turn_ends=[int(e) for e in ends],
            turn_terms=turn_rewards(self.num_turns, self.hit, 0.0, self.alpha),
        )
        output.reward_score = self.outcome  # what verl's reward path writes back
        return output.as_dict()


def random_rollouts(seed: int, groups: int = 6, n: int = 5) -> list[Rollout]:
    """Groups with mixed outcomes, all-wrong groups with near misses, and truncated last turns."""
    rng = random.Random(seed)
    rollouts = []
    for group in range(groups):
        all_wrong = group % 2 == 0
        for _ in range(n):
            turns = rng.randint(1, 4)
            generated = [rng.randint(1, 6) for _ in range(turns)]
            cut_off = rng.random() < 0.2
            observed = [rng.randint(2, 8) for _ in range(turns - 1)] + [rng.randint(1, 5) if cut_off else 0]
            candidates = [k for k in range(turns) if observed[k] > 0]
            hit = rng.choice(candidates) if candidates and rng.random() < 0.5 else None
            outcome = 0.0 if all_wrong or cut_off else float(rng.random() < 0.5)
            rollouts.append(Rollout(f"prompt-{group}", generated, observed, hit, outcome))
    return rollouts


def verl_batch(rollouts: list[Rollout]) -> DataProto:
    rows = [r.verl_row() for r in rollouts]
    width = max(len(row["response_mask"]) for row in rows) + 2
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[0]))  # noqa: E731
    return DataProto.from_dict(
        tensors={
            "response_mask": torch.stack([pad(row["response_mask"]) for row in rows]),
            "token_level_rewards": torch.stack([pad(row["rm_scores"]) for row in rows]),
        },
        non_tensors={"uid": np.array([r.uid for r in rollouts], dtype=object)},
    )


def reference_inputs(rollouts: list[Rollout], width: int, length_penalty: float = 0.0) -> AdvantageInputs:
    """AdvantageInputs built straight from the turn records, without the verl batch or its reader."""
    max_turns = max(r.num_turns for r in rollouts)
    rewards = torch.zeros(len(rollouts), max_turns, dtype=torch.float32)
    shaping = [0.0] * len(rollouts)
    if length_penalty:
        for uid in {r.uid for r in rollouts}:
            rows = [i for i, r in enumerate(rollouts) if r.uid == uid]
            lengths = [sum(rollouts[i].generated) for i in rows]
            correct = [rollouts[i].outcome >= 1.0 for i in rows]
            for i, term in zip(rows, kimi_length_penalty(lengths, correct, length_penalty), strict=True):
                shaping[i] = term
    for i, r in enumerate(rollouts):
        per_turn = turn_rewards(r.num_turns, r.hit, r.outcome, r.alpha)
        per_turn[-1] += shaping[i]
        rewards[i, : r.num_turns] = torch.tensor(per_turn)
    turn_index = torch.full((len(rollouts), width), -1, dtype=torch.long)
    loss_mask = torch.zeros(len(rollouts), width)
    for i, r in enumerate(rollouts):
        turn_index[i, : len(r.mask())] = torch.tensor(r.turn_index())
        loss_mask[i, : len(r.mask())] = torch.tensor(r.mask(), dtype=torch.float32)
    uids = sorted({r.uid for r in rollouts})
    return AdvantageInputs(
        outcome=torch.tensor([r.outcome for r in rollouts]),
        turn_rewards=rewards,
        turn_mask=torch.arange(max_turns) < torch.tensor([r.num_turns for r in rollouts]).unsqueeze(1),
        token_turn_index=turn_index,
        loss_mask=loss_mask,
        group_index=torch.tensor([uids.index(r.uid) for r in rollouts]),
        first_hit_turn=torch.tensor([-1 if r.hit is None else r.hit for r in rollouts]),
        folr=torch.tensor([r.alpha if r.hit is not None else 0.0 for r in rollouts]),
    )


def algorithm_config(**tspo: object) -> object:
    return OmegaConf.create({"adv_estimator": "tspo", "use_kl_in_reward": False, "tspo": tspo})


def test_external_module_mechanism_registers_estimator_and_agent_loop():
    """VERL_USE_EXTERNAL_MODULES=tspo.integrations.verl: a plain `import verl` registers both parts."""
    probe = (
        "import verl\n"
        "from verl.trainer.ppo.core_algos import get_adv_estimator_fn\n"
        "from verl.experimental.agent_loop.agent_loop import _agent_loop_registry\n"
        "fn = get_adv_estimator_fn('tspo')\n"
        "print(fn.__module__, fn.__name__)\n"
        "print(_agent_loop_registry['tspo_search_r1']['_target_'])\n"
    )
    env = {**os.environ, "VERL_USE_EXTERNAL_MODULES": "tspo.integrations.verl", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()[-2:]
    assert lines == [
        "tspo.integrations.verl.estimator compute_tspo_advantage",
        "tspo.integrations.verl.agent_loop.SearchR1AgentLoop",
    ]


def test_registry_holds_our_function():
    assert core_algos.get_adv_estimator_fn("tspo") is compute_tspo_advantage


@pytest.mark.parametrize(
    ("mode", "extra"),
    [
        ("adaptive", {}),
        ("adaptive", {"reclaim": 0.0}),
        ("adaptive", {"reclaim": 1.0}),
        ("turn", {}),
        ("turn", {"reclaim": 0.0}),
        ("traj", {}),
        ("legacy", {}),
        ("legacy", {"gamma": 0.8}),
    ],
)
def test_verl_dispatch_equals_tspo_algorithms(mode, extra):
    rollouts = random_rollouts(seed=11)
    data = verl_batch(rollouts)
    width = data.batch["response_mask"].shape[1]
    result = compute_advantage(data, adv_estimator="tspo", config=algorithm_config(mode=mode, **extra))
    expected = compute_advantages("tspo", reference_inputs(rollouts, width), mode=mode, **extra)
    if mode == "adaptive":  # the batch exercises both branches of the adaptive rule
        assert set(expected.turn_level.tolist()) == {True, False}
    torch.testing.assert_close(result.batch["advantages"], expected.token_advantages, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.batch["returns"], expected.token_advantages, rtol=0, atol=1e-6)
    observation = data.batch["response_mask"] == 0
    assert (result.batch["advantages"][observation] == 0).all()


def test_v1_trainer_dispatch_equals_tspo_algorithms():
    """The V1 trainer's compute_advantage_for_multi_trajectories reaches the estimator the same way."""
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    rollouts = random_rollouts(seed=5)
    data = verl_batch(rollouts)
    keys = [f"{r.uid}_{i % 5}_0" for i, r in enumerate(rollouts)]
    result = compute_advantage_for_multi_trajectories(
        data, batch_keys=keys, adv_estimator="tspo", config=algorithm_config()
    )
    expected = compute_advantages("tspo", reference_inputs(rollouts, data.batch["response_mask"].shape[1]))
    torch.testing.assert_close(result.batch["advantages"], expected.token_advantages, rtol=0, atol=1e-6)


def test_worked_example_through_verl():
    """DESIGN's all-wrong group: near miss [1.5, 1.5, -1.5] on its turns; failures (one turn: the answer) 0."""
    rollouts = [Rollout("q", [2, 2, 2], [3, 3, 0], hit=1, outcome=0.0)] + [
        Rollout("q", [3], [0], hit=None, outcome=0.0) for _ in range(3)
    ]
    data = verl_batch(rollouts)
    advantages = compute_advantage(data, adv_estimator="tspo", config=algorithm_config()).batch["advantages"]
    near_miss = advantages[0][data.batch["response_mask"][0].bool()]
    assert near_miss.tolist() == pytest.approx([1.5, 1.5, 1.5, 1.5, -1.5, -1.5], abs=1e-4)
    for row in (1, 2, 3):
        assert advantages[row][:3].tolist() == [0.0] * 3
    legacy = compute_advantage(data, adv_estimator="tspo", config=algorithm_config(mode="legacy"))
    near_miss = legacy.batch["advantages"][0][data.batch["response_mask"][0].bool()]
    assert near_miss.tolist() == pytest.approx([1.5, 1.5, 1.5, 1.5, -0.5, -0.5], abs=1e-4)


def test_the_first_hit_comes_from_the_agent_loops_record():
    """The estimator reads k* and F from the FOLR token the agent loop placed, for every row."""
    from tspo.integrations.verl.estimator import build_advantage_inputs

    rollouts = random_rollouts(seed=4)
    data = verl_batch(rollouts)
    inputs, _ = build_advantage_inputs(
        data.batch["token_level_rewards"], data.batch["response_mask"], data.non_tensor_batch["uid"]
    )
    assert inputs.first_hit_turn.tolist() == [-1 if r.hit is None else r.hit for r in rollouts]
    assert inputs.folr.tolist() == pytest.approx([0.3 if r.hit is not None else 0.0 for r in rollouts])


@pytest.mark.parametrize("mode", ["adaptive", "turn", "traj", "legacy"])
def test_every_mode_without_folr_equals_verls_own_grpo(mode):
    """Cross-check with verl's reference: R = o (alpha = 0) makes every tspo mode GRPO."""
    rollouts = random_rollouts(seed=3)
    for r in rollouts:
        r.alpha = 0.0
    ours = compute_advantage(verl_batch(rollouts), adv_estimator="tspo", config=algorithm_config(mode=mode))
    theirs = compute_advantage(verl_batch(rollouts), adv_estimator="grpo", config=algorithm_config())
    torch.testing.assert_close(ours.batch["advantages"], theirs.batch["advantages"], rtol=0, atol=1e-5)


def test_length_penalty_option_shapes_the_last_turn():
    rollouts = random_rollouts(seed=8)
    data = verl_batch(rollouts)
    width = data.batch["response_mask"].shape[1]
    result = compute_advantage(data, adv_estimator="tspo", config=algorithm_config(length_penalty=0.2))
    expected = compute_advantages("tspo", reference_inputs(rollouts, width, length_penalty=0.2))
    torch.testing.assert_close(result.batch["advantages"], expected.token_advantages, rtol=0, atol=1e-6)


def test_bad_configuration_is_refused_with_the_reason():
    data = verl_batch(random_rollouts(seed=1, groups=1))
    with pytest.raises(ValueError, match="use_kl_in_reward"):
        compute_advantage(
            data, adv_estimator="tspo", config=OmegaConf.create({"use_kl_in_reward": True, "tspo": {}})
        )
    with pytest.raises(ValueError, match=r"unknown algorithm.tspo option\(s\) \['alpha'\]"):
        tspo_options({"tspo": {"alpha": 0.3}})
    with pytest.raises(ValueError, match=r"algorithm\.tspo\.mode must be one of"):
        tspo_options({"tspo": {"mode": "stagewise"}})
    with pytest.raises(ValueError, match=r"algorithm\.tspo\.gamma applies only to mode legacy"):
        tspo_options({"tspo": {"mode": "turn", "gamma": 0.5}})
    assert tspo_options(None)["mode"] == "adaptive"
