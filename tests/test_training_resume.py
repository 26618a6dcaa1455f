"""A training run killed with SIGKILL resumes from its last checkpoint with no lost or doubled metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY_RUN_OVERRIDES

STEPS = 60
ARGS = [
    "--preset",
    "tiny",
    *TINY_RUN_OVERRIDES,
    # Enough steps that the run is still going when the test sees the step-4 checkpoint: a tiny step
    # takes about 0.05 s, so a 6-step run could finish between two polls.
    f"trainer.steps={STEPS}",
    "trainer.save_every=2",
    "trainer.keep_last=2",
]


def train_command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tspo.cli", "train", *ARGS, f"trainer.output_dir={run_dir}", *extra]


def metric_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "reward/mean" in json.loads(line)]


def test_sigkill_then_resume_continues_from_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        train_command(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    target = run_dir / "checkpoints" / "step-00000004"
    deadline = time.monotonic() + 600
    try:
        while not target.is_dir():
            assert proc.poll() is None, "training ended before the step-4 checkpoint appeared"
            assert time.monotonic() < deadline, "no step-4 checkpoint within 600 s"
            time.sleep(0.02)
        assert proc.poll() is None, "training finished before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = max(metric_steps(run_dir))
    assert 4 <= killed_at < STEPS

    done = subprocess.run(
        train_command(run_dir, "--resume"), capture_output=True, text=True, env=env, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"trained {STEPS} steps of tspo on tiny" in done.stdout
    # Every step logged exactly once: lines past the checkpoint were dropped and redone.
    assert metric_steps(run_dir) == list(range(1, STEPS + 1))
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"step-{STEPS - 2:08d}", f"step-{STEPS:08d}"]
