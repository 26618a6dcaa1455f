"""``tspo verl launch``: preset + overrides -> run.sh / agent_loop.yaml, checked against verl's own config.

Planning and writing need no verl (these tests run everywhere); composing the overrides with verl's
``ppo_trainer.yaml`` and running verl's ``validate_config`` runs in the verl environment.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

from tspo.cli import main
from tspo.integrations.verl.launch import (
    LaunchError,
    check_ready,
    override_key,
    plan_launch,
    preset_names,
    write_launch,
)

PRESET = "search_r1_qwen2.5_3b"
HAS_VERL = importlib.util.find_spec("verl") is not None


def overrides_by_key(plan) -> dict[str, str]:
    keys = [override_key(o) for o in plan.overrides]
    assert len(keys) == len(set(keys)), "an override key appears twice"
    return {override_key(o): o.split("=", 1)[1] for o in plan.overrides}


def test_preset_is_found_and_wired_to_the_plugin(tmp_path):
    assert PRESET in preset_names()
    plan = plan_launch(PRESET, [f"output_dir={tmp_path}/run", f"data_dir={tmp_path}/data"])
    values = overrides_by_key(plan)
    assert values["algorithm.adv_estimator"] == "tspo"
    assert values["algorithm.tspo.mode"] == "adaptive"
    assert values["algorithm.use_kl_in_reward"] == "false"
    assert values["actor_rollout_ref.actor.use_kl_loss"] == "true"
    assert values["actor_rollout_ref.rollout.agent.default_agent_loop"] == "tspo_search_r1"
    assert values["actor_rollout_ref.rollout.skip_tokenizer_init"] == "false"
    assert (
        values["actor_rollout_ref.rollout.agent.agent_loop_config_path"] == f"{tmp_path}/run/agent_loop.yaml"
    )
    assert values["reward.custom_reward_function.path"] == "pkg://tspo.integrations.verl.reward"
    assert values["reward.custom_reward_function.reward_kwargs.metric"] == "em"
    assert values["data.train_files"] == f"{tmp_path}/data/train.parquet"
    assert values["data.val_files"] == f"{tmp_path}/data/test.parquet"
    assert values["trainer.use_v1"] == "true"
    assert values["trainer.nnodes"] == "1" and values["trainer.n_gpus_per_node"] == "8"
    assert (
        values["ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES"]
        == "tspo.integrations.verl"
    )
    assert plan.env == {"VERL_USE_EXTERNAL_MODULES": "tspo.integrations.verl"}
    assert plan.argv[:3] == ["python3", "-m", "verl.trainer.main_ppo"]


def test_overrides_reach_the_right_place_and_replace_in_place(tmp_path):
    plan = plan_launch(
        PRESET,
        [
            f"output_dir={tmp_path}",
            "nnodes=4",
            "tspo.mode=turn",
            "folr_alpha=0.2",
            "retriever_url=http://10.0.0.5:8000",
            "actor_rollout_ref.actor.optim.lr=5e-7",
            "++trainer.max_actor_ckpt_to_keep=2",
        ],
    )
    values = overrides_by_key(plan)
    assert values["trainer.nnodes"] == "4"
    assert values["algorithm.tspo.mode"] == "turn"
    assert values["actor_rollout_ref.actor.optim.lr"] == "5e-7"
    assert "++trainer.max_actor_ckpt_to_keep=2" in plan.overrides
    (entry,) = plan.agent_loop
    assert (entry["folr_alpha"], entry["retriever_url"]) == (0.2, "http://10.0.0.5:8000")
    baseline = overrides_by_key(
        plan_launch(PRESET, ["adv_estimator=grpo", "folr_alpha=0", f"output_dir={tmp_path}"])
    )
    assert baseline["algorithm.adv_estimator"] == "grpo"
    assert not any(key.startswith("algorithm.tspo") for key in baseline)


@pytest.mark.parametrize(
    ("algorithm", "verl_estimator", "alpha"),
    [
        ("tspo", "tspo", 0.3),
        ("tspo_turn", "tspo", 0.3),
        ("tspo_legacy", "tspo", 0.3),
        ("grpo", "grpo", 0.0),
        ("drgrpo", "grpo", 0.0),
        ("rloo", "rloo", 0.0),
        ("dspo", "grpo", 0.0),
        ("reinforce_plus_plus", "reinforce_plus_plus", 0.0),  # outside the table: passed through
    ],
)
def test_no_baseline_is_paid_folr_on_verl(tmp_path, algorithm, verl_estimator, alpha):
    plan = plan_launch(PRESET, [f"adv_estimator={algorithm}", f"output_dir={tmp_path}"])
    values = overrides_by_key(plan)
    assert values["algorithm.adv_estimator"] == verl_estimator
    assert plan.agent_loop[0]["folr_alpha"] == alpha
    assert values["actor_rollout_ref.actor.clip_ratio_c"] == "3.0"  # the table's dual-clip default
    assert any(key.startswith("algorithm.tspo") for key in values) == (verl_estimator == "tspo")
    if algorithm == "drgrpo":
        assert values["algorithm.norm_adv_by_std_in_grpo"] == "false"
    if algorithm == "dspo":
        assert values["actor_rollout_ref.actor.policy_loss.loss_mode"] == "gspo"
        assert values["algorithm.filter_groups.enable"] == "true"
        assert values["algorithm.filter_groups.metric"] == "outcome"
    if algorithm.startswith("tspo"):
        assert values["algorithm.tspo.mode"] == {"tspo": "adaptive"}.get(algorithm, algorithm[5:])
    # An explicit request for FOLR on a baseline is honoured and reported.
    paid = plan_launch(PRESET, [f"adv_estimator={algorithm}", "pay_folr=on", f"output_dir={tmp_path}"])
    assert paid.agent_loop[0]["folr_alpha"] == 0.3
    assert ("FOLR paid" in paid.notes) == (alpha == 0.0)


def test_baseline_launched_from_the_tspo_preset_is_named_and_recorded_as_itself(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    grpo = plan_launch(PRESET, ["adv_estimator=grpo"])
    tspo = plan_launch(PRESET, [])
    assert grpo.output_dir == tmp_path / "runs/verl/search_r1_qwen2.5_3b_grpo"
    assert tspo.output_dir == tmp_path / "runs/verl/search_r1_qwen2.5_3b_tspo"
    assert overrides_by_key(grpo)["trainer.experiment_name"] == "search_r1_qwen2.5_3b_grpo"
    write_launch(grpo)
    record = json.loads((grpo.output_dir / "launch.json").read_text())
    # The preset's folr_alpha is kept as written; what verl is told to pay is the table's 0.
    assert record["options"]["folr_alpha"] == 0.3
    assert record["algorithm"]["folr_alpha"] == 0.0 and record["algorithm"]["verl_estimator"] == "grpo"
    with pytest.raises(LaunchError, match=r"may use only the placeholder \{adv_estimator\}"):
        plan_launch(PRESET, ["experiment_name=run_{seed}"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["foo=1"], "unknown key 'foo'"),
        (["topk=many"], "tspo.topk: expected an integer, got 'many'"),
        (
            ["mode=stagewise"],
            "tspo.mode: 'stagewise' is not one of 'default', 'adaptive', 'turn', 'traj', 'legacy'",
        ),
        (["adv_estimator=grpo", "mode=turn"], "tspo.mode=turn applies only to the tspo algorithms, not grpo"),
        (["gamma=0.9"], "tspo.gamma applies only to mode legacy, not adaptive"),
        (["reclaim=-1"], r"tspo.reclaim must be >= 0"),
        (["folr_alpha=1.0"], r"folr_alpha must be in \[0, 1\)"),
        (["nnodes"], "must look like KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_problem(overrides, message):
    with pytest.raises(LaunchError, match=message):
        plan_launch(PRESET, overrides)


def test_unknown_preset_lists_the_available_ones(capsys):
    assert main(["verl", "launch", "--preset", "no_such_preset"]) == 2
    assert (
        f"unknown verl preset 'no_such_preset' (no such file); available: {PRESET}" in capsys.readouterr().err
    )


def test_cli_writes_script_agent_loop_and_record(tmp_path, capsys):
    out = tmp_path / "launch"
    assert main(["verl", "launch", "--preset", PRESET, f"output_dir={out}", "max_turns=2"]) == 0
    printed = capsys.readouterr().out
    script = (out / "run.sh").read_text()
    assert printed == script
    assert "export VERL_USE_EXTERNAL_MODULES=tspo.integrations.verl" in script
    assert "exec python3 -m verl.trainer.main_ppo" in script and script.rstrip().endswith('"$@"')
    assert (out / "run.sh").stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(out / "run.sh")], check=False).returncode == 0
    entries = yaml.safe_load((out / "agent_loop.yaml").read_text())
    assert entries[0]["_target_"] == "tspo.integrations.verl.agent_loop.SearchR1AgentLoop"
    assert entries[0]["max_turns"] == 2
    record = json.loads((out / "launch.json").read_text())
    assert record["options"]["max_turns"] == 2 and record["argv"][1:3] == ["-m", "verl.trainer.main_ppo"]
    assert sorted(p.name for p in out.iterdir()) == [
        "agent_loop.yaml",
        "launch.json",
        "run.sh",
    ]  # no temp files


def test_run_checks_preconditions_and_names_what_is_missing(tmp_path, capsys):
    args = ["verl", "launch", "--preset", PRESET, f"output_dir={tmp_path}/run", f"data_dir={tmp_path}/data"]
    assert main([*args, "--python", sys.executable, "--run"]) == 2
    error = capsys.readouterr().err
    if HAS_VERL:
        assert f"data file not found: {tmp_path}/data/train.parquet" in error
    else:
        assert f"verl is not importable by {sys.executable}" in error


@pytest.mark.verl
@pytest.mark.skipif(not HAS_VERL, reason="needs verl")
def test_retriever_must_be_healthy_before_a_run(tmp_path):
    import time

    import httpx

    from tspo.doc import Doc
    from tspo.retrieval.bm25 import BM25Retriever
    from tspo.retrieval.server import ServerSettings, start_server

    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.parquet", "test.parquet"):
        (data / name).write_bytes(b"")  # existence is what the check looks at
    options = [f"data_dir={data}", f"output_dir={tmp_path}"]
    dead = plan_launch(PRESET, [*options, "retriever_url=http://127.0.0.1:9"], python=sys.executable)
    with pytest.raises(LaunchError, match=r"retriever not reachable at http://127\.0\.0\.1:9/health"):
        check_ready(dead, timeout=2)
    server = start_server(BM25Retriever.build([Doc("d", "T", "text")]), ServerSettings(port=0))
    try:
        while httpx.get(server.url + "/health", timeout=5).status_code != 200:
            time.sleep(0.05)
        check_ready(plan_launch(PRESET, [*options, f"retriever_url={server.url}"], python=sys.executable))
    finally:
        server.stop()


@pytest.mark.verl
@pytest.mark.skipif(not HAS_VERL, reason="needs verl")
@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["nnodes=4", "mode=traj"],
        ["adv_estimator=grpo", "n_gpus_per_node=4"],
        ["adv_estimator=drgrpo"],
        ["adv_estimator=dspo"],
        ["adv_estimator=tspo_legacy", "gamma=0.9"],
    ],
    ids=["preset", "multi-node", "grpo-baseline", "drgrpo", "dspo", "legacy"],
)
@pytest.mark.parametrize("preset", [PRESET, "smoke_1gpu"])
def test_overrides_compose_with_verls_own_config_and_pass_its_validation(tmp_path, preset, overrides):
    """Every key exists in verl 0.9.1's ppo_trainer.yaml (Hydra refuses unknown ones) and the result
    passes the checks verl's main_ppo runs before starting Ray."""
    from hydra import compose, initialize_config_module
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    plan = plan_launch(preset, [*overrides, f"output_dir={tmp_path}"])
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        config = compose(config_name="ppo_trainer", overrides=list(plan.overrides))
    validate_config(
        config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )
    assert config.trainer.nnodes == plan.options.nnodes
    assert config.actor_rollout_ref.rollout.agent.default_agent_loop == "tspo_search_r1"
    assert config.reward.custom_reward_function.reward_kwargs.metric == plan.options.metric
    assert not need_critic(config)  # no value model: the estimator's returns are the advantages
    assert config.actor_rollout_ref.rollout.skip_tokenizer_init is False
    assert config.algorithm.adv_estimator == plan.options.algorithm.verl_estimator
    assert config.actor_rollout_ref.actor.clip_ratio_c == 3.0
    if plan.options.algorithm.verl_estimator == "tspo":
        assert dict(config.algorithm.tspo) == dict(plan.options.algorithm.tspo_options)
