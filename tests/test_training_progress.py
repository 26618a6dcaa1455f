"""What a run reports while it works: progress lines off a terminal, the per-step line, the ETA format,
and the one warning a run without learning signal gives."""

from __future__ import annotations

import logging

import pytest

from tspo.training.config import load_train_config
from tspo.training.progress import NoSignalMonitor, Progress, format_duration, step_line

NO_TAGS = {
    "groups/zero_advantage": 1.0,
    "rollout/answered": 0.0,
    "rollout/searches_per_traj": 0.0,
    "outcome/mean": 0.0,
    "actor/grad_norm": 0.0,
}


def test_without_a_terminal_progress_is_log_lines_every_tenth(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="tspo.training.progress")
    with Progress(20, "warm start", "step", interactive=False) as bar:
        for step in range(1, 21):
            bar.advance(1, line=f"warm start step {step}/20: loss 1.000")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10
    assert lines[0].startswith("warm start step 2/20: loss 1.000 (ETA ")
    assert lines[-1] == "warm start step 20/20: loss 1.000"  # no ETA once done
    assert all("\r" not in line for line in lines)


def test_batched_updates_log_each_tenth_they_cross(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="tspo.training.progress")
    with Progress(128, "eval before", "question", interactive=False) as bar:
        for _ in range(8):
            bar.update(16)
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" (ETA")[0] for line in lines] == [
        f"eval before: {n}/128 questions" for n in range(16, 129, 16)
    ]


def test_disabled_progress_says_nothing(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="tspo.training.progress")
    with Progress(3, "eval", "question", interactive=False, enabled=False) as bar:
        bar.update(3)
    assert caplog.records == []


def test_step_line_and_duration():
    line = step_line(3, 12, {"reward/mean": 0.5, "outcome/mean": 0.25, "time/step": 31.2}, eta_seconds=280)
    assert line.startswith("step 3/12 | reward 0.50 | EM 0.25 |")
    assert line.endswith("31 s | ETA 4:40")
    assert "ETA" not in step_line(12, 12, {}, eta_seconds=0)
    assert format_duration(75) == "1:15" and format_duration(3725) == "1:02:05"


def test_no_signal_warns_once_after_consecutive_steps_and_names_the_setting():
    config = load_train_config("quickstart")
    monitor = NoSignalMonitor(3)
    signal = {**NO_TAGS, "groups/zero_advantage": 0.5, "actor/grad_norm": 0.1}
    seen = [monitor.observe(m, config) for m in (NO_TAGS, NO_TAGS, signal, NO_TAGS, NO_TAGS)]
    assert seen == [None] * 5  # the run of no-signal steps was broken by a step with signal
    warning = monitor.observe(NO_TAGS, config)
    assert warning is not None
    assert "no learning signal for 3 steps" in warning
    assert "rollout.protocol.examples" in warning and "warmstart.steps" in warning
    assert monitor.observe(NO_TAGS, config) is None  # once per run
    assert NoSignalMonitor(0).observe(NO_TAGS, config) is None


@pytest.mark.parametrize(
    ("metrics", "names"),
    [
        ({"rollout/answered": 0.6, "rollout/searches_per_traj": 1.0, "outcome/mean": 0.0}, "data.world.hops"),
        (
            {"rollout/answered": 1.0, "rollout/searches_per_traj": 1.0, "outcome/mean": 1.0},
            "harder questions",
        ),
        (
            {"rollout/answered": 1.0, "rollout/searches_per_traj": 1.0, "outcome/mean": 0.5},
            "rollout.temperature",
        ),
    ],
)
def test_no_signal_cause_follows_what_was_seen(metrics, names):
    monitor = NoSignalMonitor(1)
    warning = monitor.observe({"groups/zero_advantage": 1.0, **metrics}, load_train_config("quickstart"))
    assert warning is not None and names in warning
