"""The learning benchmark's statistics and SmolLM2 table on fabricated runs (no model is trained here;
the benchmark itself runs for an hour and more)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import learning_smollm2
from learning_stats import paired_difference, plot_curves_with_band, pooled_difference


def outcomes(wins: int, total: int = 40, offset: int = 0) -> dict[str, float]:
    """Question ids q0..q{total-1}; ``wins`` of them (from ``offset``) scored 1."""
    return {f"q{i}": float(offset <= i < offset + wins) for i in range(total)}


def test_paired_difference_is_the_mean_difference_with_an_interval_around_it():
    ours, baseline = outcomes(20), outcomes(10)
    result = paired_difference(ours, baseline, seed=0)
    assert result["diff"] == pytest.approx(0.25)
    assert result["low"] < 0.25 < result["high"] and result["questions"] == 40
    same = paired_difference(baseline, baseline, seed=0)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "questions": 40}
    with pytest.raises(ValueError, match="no held-out question"):
        paired_difference({"a": 1.0}, {"b": 1.0}, seed=0)


def test_pooled_difference_averages_seeds_and_narrows_with_more_of_them():
    one = pooled_difference([(outcomes(20), outcomes(10))], seed=0)
    three = pooled_difference([(outcomes(20), outcomes(10))] * 3, seed=0)
    assert one["diff"] == three["diff"] == pytest.approx(0.25)
    assert three["high"] - three["low"] < one["high"] - one["low"]
    mixed = pooled_difference([(outcomes(20), outcomes(10)), (outcomes(10), outcomes(20))], seed=0)
    assert mixed["diff"] == pytest.approx(0.0) and mixed["low"] < 0 < mixed["high"]


def fake_eval(wins: int) -> dict:
    questions = outcomes(wins)
    em = sum(questions.values()) / len(questions)
    return {
        "summary": {"em": em, "near_miss": 0.2, "complete_failure": 0.5, "searches": 1.5},
        "em_by_hops": {"1": em + 0.1, "2": em, "3": em - 0.1},
        "questions": questions,
    }


def fake_run(name: str, seed: int, wins: int, mid_wins: int) -> dict:
    return {
        "algorithm": name,
        "seed": seed,
        "steps": 8,
        "train": [
            {
                "outcome/mean": 0.2,
                "groups/all_wrong": 0.5,
                "category/near_miss": 0.25,
                "data/prompts_drawn": 4,
            }
        ]
        * 8,
        "curve": [
            {"step": 4, "greedy": mid_wins / 40, "sampled": mid_wins / 40},
            {"step": 8, "greedy": wins / 40, "sampled": wins / 40},
        ],
        "final": {"greedy": fake_eval(wins), "sampled": fake_eval(wins)},
        "rl_seconds": 100.0,
        "eval_seconds": 50.0,
    }


def test_smollm2_table_pairs_every_algorithm_with_grpo_of_its_seed(tmp_path: Path):
    starts = {s: {"greedy": fake_eval(4), "sampled": fake_eval(4), "eval_seconds": 30.0} for s in (0, 1)}
    runs = [fake_run("grpo", s, wins=12, mid_wins=8) for s in (0, 1)]
    runs += [fake_run("tspo", s, wins=16, mid_wins=12) for s in (0, 1)]
    summary = learning_smollm2.summarize(starts, runs, ["tspo", "grpo"])
    rows = {row["algorithm"]: row for row in summary["rows"]}
    assert rows["tspo"]["greedy_em"] == pytest.approx(0.4)
    assert rows["tspo"]["greedy_vs_grpo"]["diff"] == pytest.approx(0.1)
    assert rows["grpo"]["greedy_vs_grpo"] is None
    # tspo's greedy EM reaches grpo's final (12/40) at step 4; grpo itself only at its last step.
    assert rows["tspo"]["steps_to_grpo_final"] == [4, 4] and rows["grpo"]["steps_to_grpo_final"] == [8, 8]
    assert rows["tspo"]["train/groups/all_wrong"] == pytest.approx(0.5)
    assert summary["compute_seconds"] == pytest.approx(2 * 30 + 4 * 150)
    assert summary["first_step_near_miss_train"] == pytest.approx(0.25)
    args = SimpleNamespace(seeds=[0, 1], steps=8, override=[])
    text = learning_smollm2.markdown(summary, 700.0, args)
    assert "| tspo | 0.400 ± 0.000 |" in text and "+0.100 [" in text
    assert "| 1 | tspo | 0.100 -> 0.400 |" in text
    tspo_row = next(line for line in text.splitlines() if line.startswith("| tspo | 0.400"))
    assert tspo_row.endswith("| 4.000 |")  # prompts drawn per step: the rollout budget
    curves = {"grpo": [[(0, 0.1), (8, 0.3)], [(0, 0.1), (8, 0.2)]]}
    assert plot_curves_with_band(curves, tmp_path / "em.png", "EM", "test").stat().st_size > 0


def test_smollm2_units_start_each_seed_with_its_start_and_grpo_then_dspo():
    units = learning_smollm2.unit_order([0, 1], ["tspo", "grpo", "dspo", "tspo_legacy"])
    assert units[:5] == [(0, None), (0, "grpo"), (0, "dspo"), (0, "tspo"), (0, "tspo_legacy")]
    assert units[5:] == [(1, None), (1, "grpo"), (1, "dspo"), (1, "tspo"), (1, "tspo_legacy")]


@pytest.mark.parametrize("workers", [1, 2])
def test_smollm2_units_in_worker_processes_come_back_in_unit_order(tmp_path: Path, workers: int):
    """Finished units on disk are read back (no model is loaded), through the real process pool."""
    import json

    expected = {}
    for seed in (0, 1):
        (tmp_path / f"seed{seed}").mkdir()
        start = {"greedy": fake_eval(4 + seed), "sampled": fake_eval(3), "eval_seconds": 30.0}
        (tmp_path / f"seed{seed}" / "start.json").write_text(json.dumps(start))
        expected[(seed, None)] = start
        for wins, name in enumerate(("grpo", "tspo"), start=10 + seed):
            (tmp_path / f"seed{seed}" / name).mkdir()
            run = fake_run(name, seed, wins, wins)
            (tmp_path / f"seed{seed}" / name / "result.json").write_text(json.dumps(run))
            expected[(seed, name)] = run
    units = learning_smollm2.unit_order([0, 1], ["grpo", "tspo"])
    args = SimpleNamespace(workers=workers, threads=None, override=[], steps=8)
    results = learning_smollm2.run_units(units, tmp_path, args)
    assert results == [expected[unit] for unit in units]


BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "learning.py"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "smollm2", "--workers", "0"], "--workers and --threads must be >= 1"),
        (["--model", "smollm2", "--threads", "0"], "--workers and --threads must be >= 1"),
        (["--workers", "2"], "--workers applies to --model smollm2"),
    ],
)
def test_learning_benchmark_refuses_bad_worker_settings(arguments: list[str], message: str):
    import subprocess

    done = subprocess.run(
        [sys.executable, str(BENCHMARK), *arguments], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")
def test_smollm2_workers_exit_when_the_table_process_is_killed(tmp_path: Path):
    """A parent killed with SIGKILL (no cleanup runs) takes its pool worker with it."""
    import os
    import subprocess
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        f"sys.path.insert(0, {str(BENCHMARK.parent)!r})\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "import learning_smollm2\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "        initializer=learning_smollm2._init_worker, initargs=(None, os.getpid()))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 60)\n"
        "    time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        assert running(worker)  # alive while its parent is
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and running(worker):
            time.sleep(0.1)
        if not running(worker):
            return
        os.kill(worker, 9)
        pytest.fail(f"worker {worker} outlived its killed parent")
    finally:
        parent.kill()


def running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (an exited orphan waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
