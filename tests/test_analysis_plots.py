"""PNG plots from metrics.jsonl: one run, overlays, smoothing, and the ``tspo plot`` command."""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from tspo.analysis.curves import ema, metric_series
from tspo.analysis.plots import plot_run, plot_runs
from tspo.commands import plot as plot_command
from tspo.errors import CLIError
from tspo.training.metrics import MetricsLogger

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_run(run_dir: Path, *, seed: int, steps: int = 30, full: bool = True) -> Path:
    """A metrics.jsonl as the trainer writes it (same keys, plausible values), via MetricsLogger."""
    rng = random.Random(seed)
    with MetricsLogger(run_dir) as sink:
        sink.log(0, {"eval/em": 0.05, "eval/n": 50})
        for step in range(1, steps + 1):
            progress = 1 - math.exp(-step / 12)
            metrics: dict[str, float | str] = {
                "reward/mean": 0.6 * progress + 0.05 * rng.random(),
                "outcome/mean": 0.55 * progress,
                "time/generate": 2.0 + rng.random(),
                "time/retrieve": 0.3,
                "time/score": 0.05,
                "time/update": 1.5,
                "note": "strings are not plotted",
            }
            if full:
                success = 0.6 * progress
                metrics |= {
                    "category/complete_failure": 0.6 - 0.5 * progress,
                    "category/near_miss": 0.35 - 0.1 * progress,
                    "category/complete_success": success,
                    "category/success_without_retrieval": 0.05 + 0.0 * success,
                    "groups/all_wrong": 0.5 * (1 - progress),
                    "groups/all_right": 0.3 * progress,
                    "groups/zero_advantage": 0.4,
                    "actor/kl": 0.002 * step,
                    "actor/entropy": 1.1 - 0.4 * progress,
                    "actor/clip_fraction": 0.02 + 0.01 * rng.random(),
                    "actor/grad_norm": 0.5 + rng.random(),
                    "rollout/searches_per_traj": 0.5 + progress,
                    "rollout/response_length": 100 + 60 * progress,
                    "perf/tokens_per_second": 900 + 40 * rng.random(),
                }
            if step % 10 == 0:
                metrics["eval/em"] = 0.05 + 0.4 * progress
            sink.log(step, metrics)
    return run_dir


def assert_real_png(path: Path, min_bytes: int = 10_000) -> np.ndarray:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))
    pixels = imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    return pixels


def test_plot_run_writes_every_figure(tmp_path):
    run = synthetic_run(tmp_path / "run", seed=0)
    written = plot_run(run)
    assert [p.name for p in written] == ["curves.png", "actor.png", "categories.png", "timing.png"]
    assert all(p.parent == run / "plots" for p in written)
    shapes = {p.name: assert_real_png(p).shape for p in written}
    # curves.png has six panels in two rows of three: wider and taller than the single-panel figure.
    assert shapes["curves.png"][1] > shapes["categories.png"][1]
    assert shapes["curves.png"][0] > shapes["categories.png"][0]
    assert not list((run / "plots").glob(".*tmp*"))


def test_missing_keys_are_skipped(tmp_path):
    run = synthetic_run(tmp_path / "run", seed=1, full=False)
    written = plot_run(run, out_dir=tmp_path / "out", smooth=0.0)
    assert [p.name for p in written] == ["curves.png", "timing.png"]
    for path in written:
        assert_real_png(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"step": 1, "note": "nothing numeric"}\n')
    assert plot_run(empty) == []


def test_overlay_of_two_runs(tmp_path):
    a = synthetic_run(tmp_path / "tspo-run", seed=2)
    b = synthetic_run(tmp_path / "grpo-run", seed=3, steps=20, full=False)
    out = plot_runs([a, b], tmp_path / "cmp" / "compare.png")
    pixels = assert_real_png(out)
    labelled = plot_runs(
        [a, b], tmp_path / "cmp" / "two.png", keys=["reward/mean", "actor/kl"], labels=["x", "y"]
    )
    small = assert_real_png(labelled)
    assert small.shape[0] < pixels.shape[0]  # two panels vs a grid of the default keys
    with pytest.raises(ValueError, match=r"not logged by any run; available: .*reward/mean"):
        plot_runs([a, b], tmp_path / "bad.png", keys=["reward/nope"])
    with pytest.raises(ValueError, match="1 labels given for 2 runs"):
        plot_runs([a, b], tmp_path / "bad.png", labels=["only-one"])
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        plot_runs([a, tmp_path / "absent"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_ema_is_debiased_and_linear():
    values = np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(ema(values, 0.5), [1.0, 1 / 3, 1 / 7])
    np.testing.assert_allclose(ema(np.full(5, 3.0), 0.9), np.full(5, 3.0))
    np.testing.assert_array_equal(ema(values, 0.0), values)
    a, b = np.random.default_rng(0).random((2, 40))
    np.testing.assert_allclose(ema(a, 0.6) + ema(b, 0.6), ema(a + b, 0.6))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ema(values, 1.0)


def test_metric_series_keeps_the_last_value_per_step_and_skips_non_numbers():
    records = [
        {"step": 2, "time": 1.0, "a": 1.0, "s": "x", "n": None},
        {"step": 1, "time": 2.0, "a": 5, "flag": True},
        {"step": 2, "time": 3.0, "a": 7.5},
    ]
    series = metric_series(records)
    assert set(series) == {"a"}
    steps, values = series["a"]
    assert steps.tolist() == [1.0, 2.0] and values.tolist() == [5.0, 7.5]


def run_plot_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tspo")
    plot_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plot", *argv])
    return args.handler(args)


def test_plot_command_single_run_and_overlay(tmp_path, capsys):
    a = synthetic_run(tmp_path / "a", seed=4, full=False)
    b = synthetic_run(tmp_path / "b", seed=5, full=False)
    assert run_plot_command([str(a)]) == 0
    assert capsys.readouterr().out.split() == [
        str(a / "plots" / name) for name in ("curves.png", "timing.png")
    ]
    assert (
        run_plot_command([str(a), str(b), "--out", str(tmp_path / "o"), "--keys", "reward/mean,eval/em"]) == 0
    )
    assert capsys.readouterr().out.split() == [str(tmp_path / "o" / "compare.png")]
    assert_real_png(tmp_path / "o" / "compare.png")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{missing}"], "run directory not found: {missing}"),
        (["{bare}"], "{bare} has no metrics.jsonl"),
        (["{a}", "{a}"], "--out DIR is required"),
        (["{a}", "--smooth", "1.5"], r"--smooth must be in \[0, 1\)"),
        (["{a}", "--keys", "reward/nope"], "not logged by any run"),
        (["{a}", "--labels", "x,y"], "--labels has 2 entries for 1 run"),
        (["{broken}"], r"metrics\.jsonl:2: malformed JSON line"),
    ],
)
def test_plot_command_errors_name_the_problem(tmp_path, argv, message):
    a = synthetic_run(tmp_path / "a", seed=6, steps=3, full=False)
    (tmp_path / "bare").mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2,\n{"step": 3}\n')
    paths = {"a": a, "bare": tmp_path / "bare", "missing": tmp_path / "missing", "broken": broken}
    with pytest.raises(CLIError, match=message.format(**{k: str(v) for k, v in paths.items()})):
        run_plot_command([item.format(**paths) for item in argv])


def test_tspo_plot_through_the_cli_entry_point(tmp_path, capsys):
    from tspo.cli import main

    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    assert f"tspo plot: error: run directory not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    run = synthetic_run(tmp_path / "run", seed=7, steps=5)
    assert (
        main(["plot", str(run), "--out", str(tmp_path / "png"), "--keys", "outcome/mean", "--smooth", "0"])
        == 0
    )
    assert capsys.readouterr().out.split() == [str(tmp_path / "png" / "compare.png")]
    assert_real_png(tmp_path / "png" / "compare.png", min_bytes=5_000)


def test_warm_start_loss_gets_its_own_figure(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run) as sink:
        for step in range(1, 41):  # the trainer logs the warm start at RL step 0, one line per SFT step
            sink.log(0, {"warmstart/step": step, "warmstart/loss": 6.0 * math.exp(-step / 15) + 0.5})
        sink.log(0, {"eval/greedy/em": 0.1, "eval/sampled/em": 0.05})
        sink.log(1, {"reward/mean": 0.2})
        sink.log(1, {"eval/greedy/em": 0.3, "eval/sampled/em": 0.25})
    written = plot_run(run)
    assert written[0].name == "warmstart.png"
    assert_real_png(written[0], min_bytes=5_000)
