"""``tspo algo-demo``: the printed tables hold the estimators' real numbers."""

from __future__ import annotations

import re

import pytest

from tspo.cli import main

SERIES = (
    "reward r_k",
    "grpo (R = o)",
    "rloo (R = o)",
    "tspo traj",
    "tspo legacy",
    "tspo turn",
    "tspo adaptive",
)


def parse(text: str) -> tuple[dict[tuple[int, int, str], list[float]], dict[int, str]]:
    """{(group, trajectory, series): per-turn values} and {group: adaptive mode line}."""
    values: dict[tuple[int, int, str], list[float]] = {}
    modes: dict[int, str] = {}
    group = member = 0
    for line in text.splitlines():
        if match := re.match(r"Group (\d+):", line):
            group = int(match.group(1))
        elif line.startswith("adaptive TSPO uses"):
            modes[group] = line
        if match := re.match(r"(\d+)\. ", line):
            member = int(match.group(1))
        for series in SERIES:
            if f" {series} " in f" {line} ":
                numbers = line.split(series, 1)[1].split()
                values[(group, member, series)] = [float(number) for number in numbers]
    return values, modes


def run_demo(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(["algo-demo", *args]) == 0
    return capsys.readouterr().out


def test_demo_shows_the_issue_table_for_v2_and_legacy(capsys: pytest.CaptureFixture[str]) -> None:
    text = run_demo(capsys)
    values, modes = parse(text)
    assert "stage" in modes[1] and "trajectory-level" in modes[2] and "stage" in modes[3]
    # Group 1 (all wrong): trajectory 1 is the near miss hit at turn 2 (r = [0, 0.3, 0]), then 3 failures.
    assert values[(1, 1, "reward r_k")] == [0.0, 0.3, 0.0]
    assert values[(1, 1, "grpo (R = o)")] == [0.0, 0.0, 0.0]  # all outcomes equal: no signal
    assert values[(1, 1, "rloo (R = o)")] == [0.0, 0.0, 0.0]
    assert values[(1, 1, "tspo traj")] == [1.5, 1.5, 1.5]
    assert values[(1, 1, "tspo legacy")] == [1.5, 1.5, -0.5]
    assert values[(1, 1, "tspo adaptive")] == [1.5, 1.5, -1.5]
    for failure in (2, 3, 4):
        assert values[(1, failure, "tspo legacy")] == [-0.5, -0.5, -0.5]
        assert values[(1, failure, "tspo adaptive")] == [-0.5, -0.5, 0.0]
    # Group 3 (all right): success hit at turn 1 (S A), correct without a hit (S A), direct answer (A).
    assert values[(3, 2, "tspo legacy")] == [0.87, -0.87] and values[(3, 2, "tspo adaptive")] == [0.87, 0.0]
    assert values[(3, 3, "tspo legacy")] == [-0.87, -0.87] and values[(3, 3, "tspo adaptive")] == [-0.87, 0.0]
    assert values[(3, 4, "tspo legacy")] == [-0.87] and values[(3, 4, "tspo adaptive")] == [0.0]
    # Mixed group: trajectory-level, ranked success > success without retrieval > near miss > failure.
    firsts = [values[(2, member, "tspo adaptive")][0] for member in (1, 2, 3, 4)]
    assert firsts == sorted(firsts, reverse=True) and firsts[0] == pytest.approx(1.08)
    assert "near miss" in text and "success without retrieval" in text and "complete success" in text
    assert "What to look at" in text and "reconstruction" in text


def test_demo_options_change_the_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    values, _ = parse(run_demo(capsys, "--gamma", "0.5"))
    assert values[(1, 1, "tspo legacy")] == [0.5, 1.5, -0.5]  # G = [0.15, 0.3, 0]
    values, _ = parse(run_demo(capsys, "--reclaim", "0"))
    assert values[(1, 1, "tspo adaptive")] == [1.5, 1.5, 0.0]  # the near miss keeps its search credit
    values, _ = parse(run_demo(capsys, "--alpha", "0"))
    # Without FOLR the all-wrong group has no signal for anyone.
    assert values[(1, 1, "tspo adaptive")] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--alpha", "1.2"], "--alpha must be in [0, 1)"),
        (["--gamma", "0"], "--gamma must be in (0, 1]"),
        (["--reclaim", "-1"], "--reclaim must be >= 0"),
    ],
)
def test_demo_rejects_bad_options(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert main(["algo-demo", *args]) == 2
    assert message in capsys.readouterr().err
