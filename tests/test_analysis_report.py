"""``tspo analyze``: figures and report from a run's metrics.jsonl and an evaluation's trajectories.

The metrics file is written by the trainer's own ``MetricsLogger``; the evaluation is a real
``run_evaluation`` on the synthetic world (real BM25, real rollout loop and scoring) with a scripted
policy whose behaviour per question is known, so every category and its count are known.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tspo.analysis import (
    AnalysisError,
    analyze,
    category_counts,
    category_fractions,
    find_eval_dir,
    pick_examples,
)
from tspo.analysis.curves import curve_summaries, metric_series, sample_steps, validation_datasets
from tspo.cli import main
from tspo.data.qa import read_qa_jsonl
from tspo.data.world import WorldConfig, generate_world, write_world
from tspo.evaluation import per_dataset_summary, read_records, run_evaluation
from tspo.evaluation.tables import markdown_table
from tspo.protocol import ProtocolConfig
from tspo.retrieval import BM25Retriever, read_corpus
from tspo.rollout import RolloutConfig, ScriptedEngine, build_word_tokenizer
from tspo.training.metrics import MetricsLogger

PROTOCOL = ProtocolConfig(use_chat_template=False)
CONFIG = RolloutConfig(
    max_turns=2, max_new_tokens=12, max_observation_tokens=80, temperature=0.0, protocol=PROTOCOL
)
PNG = b"\x89PNG\r\n\x1a\n"
# Question i: 0 success, 1 near miss, 2 success without retrieval, 3 failure.
KINDS = ("success", "near_miss", "no_retrieval", "failure")


def _policy(tokenizer, examples):
    def norm(text: str) -> str:
        return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"])

    index = {norm(ex.question): (i, ex) for i, ex in enumerate(examples)}

    def script(call) -> str:
        i, example = next(v for k, v in index.items() if k in call.prompt_text)
        kind, gold = KINDS[i % 4], example.golds[0]
        if kind in ("success", "near_miss") and call.turn == 0:
            return f"<search> {gold} </search>"
        if kind in ("success", "no_retrieval"):
            return f"<answer> {gold} </answer>"
        return "<answer> nobody </answer>"

    return script


def _write_metrics(run: Path) -> None:
    """Ten steps of a run that learns: failures turn into near misses, then into successes."""
    with MetricsLogger(run) as sink:
        sink.log(0, {"eval/em": 0.05, "eval/f1": 0.10, "eval/near_miss": 0.2, "eval/complete_failure": 0.75})
        for step in range(1, 11):
            t = step / 10
            success, near = 0.6 * t, 0.3 * (1 - abs(2 * t - 1))
            sink.log(
                step,
                {
                    "reward/mean": 0.1 + 0.7 * t,
                    "outcome/mean": 0.05 + 0.6 * t,
                    "category/complete_success": success,
                    "category/near_miss": near,
                    "category/success_without_retrieval": 0.05,
                    "category/complete_failure": 0.95 - success - near,
                    "groups/all_wrong": 0.9 - 0.7 * t,
                    "groups/all_right": 0.3 * t,
                    "groups/outcome_homogeneous": 0.9 - 0.4 * t,
                    "groups/zero_advantage": 0.8 - 0.5 * t,
                    "reward/std_in_group": 0.1 + 0.2 * t,
                    "rollout/first_hit_rate": 0.3 + 0.5 * t,
                    "rollout/searches_per_traj": 1 + t,
                },
            )
            if step % 5 == 0:
                sink.log(
                    step, {"val/nq/em": 0.1 * step / 5, "val/nq/f1": 0.2, "val/hotpotqa/em": 0.05 * step / 5}
                )
                sink.log(step, {"val/all/em": 0.07 * step / 5})
        sink.log(10, {"eval/em": 0.55, "eval/f1": 0.6, "eval/near_miss": 0.1, "eval/complete_failure": 0.3})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("analysis")
    world = write_world(generate_world(WorldConfig(seed=0, size="tiny")), root / "world")
    examples = list(read_qa_jsonl(world / "test.jsonl"))[:16]
    # Two datasets so that the report has several rows and examples alternate between them.
    examples = [
        ex if i < 8 else type(ex)(**{**ex.__dict__, "dataset": "nq"}) for i, ex in enumerate(examples)
    ]
    texts = [doc.contents for doc in read_corpus(world / "corpus.jsonl")] + [ex.question for ex in examples]
    tokenizer = build_word_tokenizer([*texts, "nobody"], PROTOCOL)
    retriever = BM25Retriever.build(read_corpus(world / "corpus.jsonl"), threads=1)
    run = root / "run"
    engine = ScriptedEngine(tokenizer, script=_policy(tokenizer, examples))
    run_evaluation(
        engine, tokenizer, retriever, examples, CONFIG, run / "eval" / "step-00000010", batch_size=8
    )
    _write_metrics(run)
    (run / "config.yaml").write_text("algorithm: {name: tspo, tspo_mode: adaptive}\nmodel: {policy: tiny}\n")
    return run


def test_report_and_figures_of_a_run_with_an_evaluation(run_dir, tmp_path):
    result = analyze(run_dir, out_dir=tmp_path / "analysis", examples_per_category=2)
    assert result.eval_dir == run_dir / "eval" / "step-00000010"
    assert sorted(p.name for p in result.plots) == [
        "categories.png",
        "eval_datasets.png",
        "homogeneity.png",
        "rewards.png",
    ]
    for path in result.plots:
        data = path.read_bytes()
        assert data[:8] == PNG and len(data) > 10_000
    report = result.report.read_text()

    # Run facts and the training summary.
    assert "# Analysis: run" in report and "- **algorithm**: tspo (tspo_mode adaptive)" in report
    assert "| `reward/mean` | 0.170 (step 1) | 0.800 (step 10) | +0.630 |" in report
    assert "| `groups/all_wrong` | 0.830 (step 1) | 0.200 (step 10) | -0.630 |" in report
    assert "| `eval/em` | 0.050 (step 0) | 0.550 (step 10) | +0.500 |" in report
    # Category / homogeneity table at spread steps, first and last included.
    over = report.split("## Categories and group homogeneity over training")[1].split("##")[0]
    rows = [line for line in over.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert rows[0].startswith("| 1 | ") and rows[-1].startswith("| 10 | ") and len(rows) == 6
    # Validation per dataset: first and last EM.
    assert "| NQ | 0.100 (step 5) | 0.200 (step 10) | 0.200 | 0.200 |" in report
    assert "| HotpotQA | 0.050 (step 5) | 0.100 (step 10) | 0.100 | - |" in report

    # The evaluation table is the one tspo eval computes from the same file.
    records = read_records(result.eval_dir / "trajectories.jsonl")
    assert markdown_table(per_dataset_summary(records)) in report
    # Examples: near misses first, then failures, then the two kinds of success; counts are right.
    counts = category_counts(records)
    assert counts == {
        "near_miss": 4,
        "complete_failure": 4,
        "success_without_retrieval": 4,
        "complete_success": 4,
    }
    headers = [line for line in report.splitlines() if line.startswith("### ")]
    assert headers == [
        "### Near miss (answer retrieved, not given): 2 of 4",
        "### Complete failure (not retrieved, wrong): 2 of 4",
        "### Success without retrieval (right, never retrieved): 2 of 4",
        "### Complete success (retrieved and given): 2 of 4",
    ]
    near = report.split(headers[0])[1].split(headers[1])[0]
    assert near.count("#### ") == 2 and "#### NQ" in near and "#### Synthetic world" in near
    assert near.count("**first hit: the answer is in these passages**") == 2
    assert "- **answer**: nobody (EM 0" in near and "<information>" in near


def test_analyze_an_evaluation_alone_and_errors(run_dir, tmp_path, capsys):
    eval_dir = run_dir / "eval" / "step-00000010"
    result = analyze(eval_dir=eval_dir, out_dir=tmp_path / "only_eval", examples_per_category=0)
    assert [p.name for p in result.plots] == ["eval_datasets.png"]
    report = result.report.read_text()
    assert "## Evaluation per dataset" in report and "## Training curves" not in report
    assert "## Example trajectories" not in report

    with pytest.raises(AnalysisError, match="nothing to analyse"):
        analyze(tmp_path / "only_eval")
    with pytest.raises(AnalysisError, match="run directory not found"):
        analyze(tmp_path / "missing")
    assert main(["analyze"]) == 2
    assert "give a RUN_DIR" in capsys.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1, "reward/mean": 0.1}\nnot json\n{"step": 2}\n')
    assert main(["analyze", str(broken)]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err

    assert main(["analyze", str(run_dir), "--out", str(tmp_path / "cli"), "--examples", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"report : {tmp_path / 'cli' / 'report.md'}" in printed and "figure : " in printed
    assert (tmp_path / "cli" / "report.md").read_text().count("#### ") == 4


def test_pick_examples_alternates_datasets_and_orders_near_misses(run_dir):
    records = read_records(run_dir / "eval" / "step-00000010" / "trajectories.jsonl")
    picked = pick_examples(records, per_category=3)
    assert list(picked) == ["near_miss", "complete_failure", "success_without_retrieval", "complete_success"]
    for category, chosen in picked.items():
        assert len(chosen) == 3 and all(r["category"] == category for r in chosen)
        assert [r["dataset"] for r in chosen] == ["nq", "synthetic_world", "nq"]
    late = [
        {**records[1], "id": "late", "first_hit_turn": 1},
        {**records[1], "id": "early", "first_hit_turn": 0},
    ]
    assert [r["id"] for r in pick_examples(late, 2)["near_miss"]] == ["early", "late"]
    assert pick_examples(records, 0) == {name: [] for name in picked}
    fractions = category_fractions(records)
    assert sum(fractions.values()) == pytest.approx(1.0) and fractions["near_miss"] == 0.25


def test_curve_helpers(run_dir):
    from tspo.training.metrics import read_metrics

    series = metric_series(read_metrics(run_dir))
    assert validation_datasets(series) == ["hotpotqa", "nq"]
    assert validation_datasets(series, "eval") == []  # eval/em is pooled, not a dataset
    steps = sample_steps(series, ["category/near_miss"], count=4)
    assert steps[0] == 1 and steps[-1] == 10 and len(steps) == 4
    summary = {s.key: s for s in curve_summaries(series)}
    assert summary["val/all/em"].first == pytest.approx(0.07) and summary["val/all/em"].last == pytest.approx(
        0.14
    )
    assert summary["category/near_miss"].maximum == pytest.approx(0.3)
    assert find_eval_dir(run_dir) == run_dir / "eval" / "step-00000010"
    assert (
        json.loads((run_dir / "eval" / "step-00000010" / "results.json").read_text())["datasets"]["all"]["n"]
        == 16
    )
