"""The KL reference is the initial policy, also after ``--resume``: a run with KL on that stops halfway and
resumes ends with the same parameters and the same metrics as the run that never stopped."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN_OVERRIDES
from tspo.training.config import TrainConfig, load_train_config
from tspo.training.metrics import read_metrics
from tspo.training.setup import build_policy, prepare_data
from tspo.training.trainer import Trainer

STEPS = 2
# A KL term large enough, and steps long enough, that a reference anchored to the resumed policy
# (KL 0 on the first resumed step) moves the parameters by much more than the 1e-6 tolerance. The
# briefly warm-started model earns no reward yet (every advantage is 0): the entropy bonus is what moves
# the policy away from the reference, so that the KL term has a gradient at all.
KL_RUN = [
    *TINY_RUN_OVERRIDES,
    "algorithm.kl_coef=0.5",
    "algorithm.entropy_coef=0.05",
    "trainer.learning_rate=3e-3",
    "trainer.save_every=1",
    "trainer.eval_before=false",
    "trainer.eval_sampled=false",
    "data.eval_size=1",
]


def config(run_dir: Path, steps: int, *extra: str) -> TrainConfig:
    return load_train_config(
        "tiny", None, [*KL_RUN, f"trainer.steps={steps}", f"trainer.output_dir={run_dir}", *extra]
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the world and the tiny model every run of this module uses (a seeded build:
    each run would build the same one, seconds slower)."""
    root = tmp_path_factory.mktemp("built")
    cfg = config(root, 0)
    train, _, corpus = prepare_data(cfg, root)
    build_policy(cfg, root, train, corpus, torch.device("cpu"))
    return root


def run(built: Path, run_dir: Path, steps: int, *extra: str, resume: bool = False) -> Trainer:
    if not (run_dir / "world").exists():
        for name in ("world", "tiny_model"):
            shutil.copytree(built / name, run_dir / name)
    trainer = Trainer(config(run_dir, steps, *extra), resume=resume)
    trainer.train()
    return trainer


def step_metrics(run_dir: Path) -> dict[int, dict[str, float]]:
    """Training-step metrics by step, without timings (the only values two equal runs may differ in)."""
    return {
        line["step"]: {
            key: value
            for key, value in line.items()
            if key != "step" and not key.startswith(("time/", "perf/"))
        }
        for line in read_metrics(run_dir)
        if "reward/mean" in line
    }


def max_difference(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max(
        float((p.detach() - q.detach()).abs().max())
        for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


@pytest.mark.parametrize(
    "warm_start",
    [
        # The tiny preset's way: the initial policy is the warm-started model, saved with the run.
        "warmstart.steps=1",
        # A pretrained policy: the initial policy is the model as loaded, before the checkpoint.
        "warmstart.steps=0",
    ],
)
def test_resume_with_kl_equals_the_uninterrupted_run(built: Path, tmp_path: Path, warm_start: str) -> None:
    straight = run(built, tmp_path / "straight", STEPS, warm_start)
    run(built, tmp_path / "halves", STEPS // 2, warm_start)
    resumed = run(built, tmp_path / "halves", STEPS, warm_start, resume=True)
    assert resumed.step == STEPS and resumed.resources is not None

    assert straight.ref_model is not None and resumed.ref_model is not None
    assert max_difference(straight.ref_model, resumed.ref_model) == 0.0, (
        "the reference is not the initial policy"
    )
    assert max_difference(straight.model, straight.ref_model) > 1e-3, (
        "the policy did not move from the reference"
    )
    assert max_difference(straight.model, resumed.model) <= 1e-6

    expected, got = step_metrics(tmp_path / "straight"), step_metrics(tmp_path / "halves")
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    assert expected[STEPS]["actor/kl"] > 0
    for step, metrics in expected.items():
        assert got[step].keys() == metrics.keys()
        for key, value in metrics.items():
            assert math.isclose(got[step][key], value, rel_tol=1e-5, abs_tol=1e-7), (step, key)
