"""The local trainer end to end on the tiny preset: steps, metrics, NaN guard, checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY_RUN_OVERRIDES
from tspo.training.config import load_train_config
from tspo.training.trainer import Trainer


def micro_config(tmp_path, *extra):
    return load_train_config(
        "tiny", None, [*TINY_RUN_OVERRIDES, f"trainer.output_dir={tmp_path / 'run'}", *extra]
    )


def read_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_metrics_checkpoint_and_resolved_config(tmp_path):
    config = micro_config(tmp_path, "trainer.steps=2", "trainer.save_every=1", "algorithm.kl_coef=0.001")
    summary = Trainer(config).train()
    run = tmp_path / "run"
    assert summary.steps == 2
    assert (run / "config.yaml").is_file()
    assert summary.checkpoint is not None and summary.checkpoint.name == "step-00000002"
    lines = read_lines(run)
    steps = [line["step"] for line in lines if "reward/mean" in line]
    assert steps == [1, 2]
    step_line = next(line for line in lines if line["step"] == 1 and "reward/mean" in line)
    for key in (
        "outcome/mean",
        "groups/all_wrong",
        "groups/zero_advantage",
        "category/near_miss",
        "actor/kl",
        "actor/entropy",
        "actor/grad_norm",
        "time/generate",
        "time/update",
        "perf/tokens_per_second",
    ):
        assert key in step_line, key
        assert math.isfinite(step_line[key])
    assert step_line["rollout/trajectories"] == 6
    assert "em" in summary.eval_before and "em" in summary.eval_after
    # Every held-out answer is kept, one scored record per question, and agrees with the logged EM.
    decodings = ["greedy", "sampled"] if "sampled/em" in summary.eval_after else ["greedy"]
    expected = [run / "heldout" / f"{tag}-{d}.jsonl" for tag in ("before", "after") for d in decodings]
    assert summary.heldout_files == expected
    for path in expected:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        evaluation = summary.eval_before if path.name.startswith("before") else summary.eval_after
        decoding = path.stem.split("-", 1)[1]
        assert len(records) == evaluation[f"{decoding}/n"]
        em = sum(record["scores"]["em"] for record in records) / len(records)
        assert em == pytest.approx(evaluation[f"{decoding}/em"])
        assert {"question", "golds", "answer", "category", "turns"} <= set(records[0])


def test_non_finite_loss_is_skipped_logged_and_rolled_back(tmp_path, monkeypatch):
    import tspo.training.update as update

    real_policy_loss = update.policy_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, metrics = real_policy_loss(*args, **kwargs)
        calls["n"] += 1
        # Updates 3, 4 and 5 (one micro-batch each) are poisoned with NaN.
        return (loss * float("nan") if calls["n"] in (3, 4, 5) else loss), metrics

    monkeypatch.setattr(update, "policy_loss", poisoned)
    # A KL term makes every row run (zero-advantage rows are left out of an update without one), so each
    # step is one policy_loss call and the poisoned calls are steps 3-5 whatever the advantages.
    config = micro_config(
        tmp_path,
        "trainer.steps=6",
        "trainer.save_every=2",
        "trainer.max_bad_updates=2",
        "algorithm.kl_coef=0.001",
    )
    trainer = Trainer(config)
    summary = trainer.train()
    lines = [line for line in read_lines(tmp_path / "run") if "actor/skipped_update" in line]
    skipped = {line["step"]: line["actor/skipped_update"] for line in lines}
    assert skipped == {1: 0, 2: 0, 3: 1, 4: 1, 5: 1, 6: 0}
    assert summary.skipped_updates == 3
    # Three failures in a row exceed max_bad_updates=2: the policy went back to the step-2 checkpoint.
    assert summary.rollbacks == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_resume_without_checkpoint_is_an_error_before_any_work(tmp_path):
    from tspo.runs import RunDirError

    config = micro_config(tmp_path, "trainer.steps=1", "trainer.eval_before=false")
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        Trainer(config, resume=True).train()
    assert not (tmp_path / "run").exists()


def test_unknown_preset_and_key_errors():
    from tspo.configuration import ConfigError

    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: quickstart, tiny"):
        load_train_config("nope")
    with pytest.raises(ConfigError, match=r"unknown config key trainer\.stepz; valid keys under trainer:"):
        load_train_config("tiny", None, ["trainer.stepz=3"])
    with pytest.raises(ConfigError, match=r"algorithm\.name: 'ppo' is not one of"):
        load_train_config("tiny", None, ["algorithm.name=ppo"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.source=files"], "data.source=files needs data.train_file=PATH"),
        (
            ["data.source=files", "data.train_file=/nonexistent/train.jsonl"],
            "file not found: /nonexistent/train.jsonl",
        ),
        (["retriever.kind=http"], "retriever.kind=http needs retriever.url"),
        (["retriever.index=/nonexistent/index"], "retriever index not found: /nonexistent/index"),
        (["retriever.kind=dense"], "retriever.kind=dense needs a prebuilt retriever.index"),
    ],
)
def test_missing_resources_name_the_problem(tmp_path, overrides, message):
    from tspo.training.setup import ResourceError, build_retriever, prepare_data

    config = micro_config(tmp_path, *overrides)
    with pytest.raises(ResourceError, match=message):
        _, _, corpus = prepare_data(config, tmp_path / "run")
        build_retriever(config, corpus)


def test_train_cli_lists_keys_shows_config_and_rejects_bad_keys(capsys):
    from tspo.cli import main

    assert main(["train", "--list-keys"]) == 0
    listed = capsys.readouterr().out
    assert "algorithm.tspo_mode" in listed and "reward.folr_alpha" in listed
    assert main(["train", "--preset", "tiny", "--show-config", "trainer.steps=7"]) == 0
    assert "steps: 7" in capsys.readouterr().out
    assert main(["train", "--preset", "tiny", "trainer.stepz=7"]) == 2
    assert "unknown config key trainer.stepz" in capsys.readouterr().err
