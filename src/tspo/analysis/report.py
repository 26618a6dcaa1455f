"""``tspo analyze``: what a run did, as PNG figures and a Markdown report.

Inputs: a run directory's ``metrics.jsonl`` (training curves: categories, group homogeneity, reward,
train and held-out EM, per-dataset validation) and, when there is one, an evaluation directory of
``tspo eval`` (``trajectories.jsonl``: per-dataset tables and example trajectories of each category, near
misses first). Either input alone is enough.

Outputs in ``OUT`` (default ``RUN_DIR/analysis``, or ``EVAL_DIR/analysis`` without a run):
``report.md``, ``rewards.png``, ``categories.png``, ``homogeneity.png``, ``eval_datasets.png`` (each figure
only when its data exists).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tspo.analysis.categories import CATEGORY_ORDER, CATEGORY_TITLES, category_counts, pick_examples
from tspo.analysis.curves import (
    CATEGORY_KEYS,
    HOMOGENEITY_KEYS,
    Series,
    curve_summaries,
    metric_series,
    sample_steps,
    validation_datasets,
    value_at,
)
from tspo.analysis.plots import plot_categories, plot_eval_datasets, plot_homogeneity, plot_rewards
from tspo.evaluation.store import TRAJECTORIES_FILE, read_records
from tspo.evaluation.summary import dataset_title, per_dataset_summary
from tspo.evaluation.tables import markdown_table
from tspo.files import atomic_path
from tspo.runs import ANALYSIS_DIR, EVAL_DIR, METRICS_FILE, MetricsFileError, RunDir, read_metrics

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
_SHORT = {
    "category/near_miss": "near miss",
    "category/complete_failure": "failure",
    "category/success_without_retrieval": "no-retr. success",
    "category/complete_success": "success",
    "groups/all_wrong": "all wrong",
    "groups/all_right": "all right",
    "groups/outcome_homogeneous": "homogeneous",
    "groups/zero_advantage": "zero adv.",
}


class AnalysisError(ValueError):
    """Nothing to analyse, or an input that cannot be read; the message names the path."""


@dataclass
class AnalysisResult:
    out_dir: Path
    report: Path
    plots: list[Path] = field(default_factory=list)
    eval_dir: Path | None = None


# --------------------------------------------------------------------------------------------- inputs
def find_eval_dir(run_dir: str | Path) -> Path | None:
    """The newest evaluation under ``RUN_DIR/eval/*/`` (highest checkpoint name, then newest file)."""
    root = Path(run_dir) / EVAL_DIR
    if not root.is_dir():
        return None
    found = [p.parent for p in root.glob(f"*/{TRAJECTORIES_FILE}") if p.is_file()]
    if not found:
        return None
    return max(found, key=lambda d: (d.name, (d / TRAJECTORIES_FILE).stat().st_mtime))


def _run_facts(run_dir: Path) -> dict[str, str]:
    """A few settings of the run (from config.yaml) worth printing at the top of the report."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return {}
    from tspo.configuration import ConfigError, read_yaml

    try:
        config = read_yaml(path)
    except ConfigError as err:
        logger.warning("cannot read %s: %s", path, err)
        return {}

    def get(section: str, key: str) -> Any:
        return (config.get(section) or {}).get(key)

    algorithm = get("algorithm", "name")
    mode = get("algorithm", "tspo_mode")
    if str(algorithm).startswith("tspo") and mode and mode != "default":
        algorithm = f"{algorithm} (tspo_mode {mode})"
    facts = {
        "algorithm": algorithm,
        "model": get("model", "policy"),
        "data": get("data", "source"),
        "group size": get("trainer", "group_size"),
        "learning rate": get("trainer", "learning_rate"),
        "FOLR alpha": get("reward", "folr_alpha"),
    }
    return {key: str(value) for key, value in facts.items() if value is not None}


# --------------------------------------------------------------------------------------------- markdown
def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _fence(text: str) -> str:
    """``text`` in a fenced block whose fence is longer than any backtick run inside it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text.rstrip()}\n{fence}"


def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[:limit].rstrip() + f" … [{len(text) - limit} more characters]"


def render_trajectory(record: Mapping[str, Any], max_observation_chars: int = 700) -> str:
    """One evaluated trajectory as Markdown: question, golds, answer and scores, then every turn."""
    scores = record["scores"]
    hit = record.get("first_hit_turn")
    answer = record.get("answer")
    lines = [
        f"#### {dataset_title(str(record.get('dataset', '')))} · `{record['id']}`",
        "",
        f"- **question**: {record['question']}",
        f"- **gold**: {' | '.join(record['golds']) or '(none)'}",
        f"- **answer**: {answer if answer is not None else '(no answer)'} "
        f"(EM {scores['em']:.0f}, F1 {scores['f1']:.2f})",
        f"- **first hit**: {'turn ' + str(hit + 1) if hit is not None else 'never'}; "
        f"{record.get('num_searches', 0)} search(es); stop: {record.get('stop_reason') or '-'}",
    ]
    if record.get("error"):
        lines.append(f"- **error**: {record['error']}")
    for turn in record["turns"]:
        index = int(turn.get("index", 0))
        header = f"**turn {index + 1}** · {turn['action']}"
        if turn.get("query"):
            header += f" · query: `{turn['query']}`"
        if turn.get("invalid_reason"):
            header += f" · {turn['invalid_reason']}"
        if turn.get("generation_truncated"):
            header += " · generation truncated"
        if hit is not None and index == hit:
            header += " · **first hit: the answer is in these passages**"
        lines += ["", header, "", _fence(turn["text"])]
        docs = turn.get("docs") or []
        if docs:
            lines += ["", "passages: " + "; ".join(f"`{d['id']}` {d.get('title', '')}".strip() for d in docs)]
        observation = turn.get("observation")
        if observation and observation.strip():
            lines += ["", _fence(_clip(observation, max_observation_chars))]
    return "\n".join(lines)


def _curves_section(series: Mapping[str, Series]) -> list[str]:
    summaries = curve_summaries(series)
    if not summaries:
        return []
    lines = [
        "## Training curves",
        "",
        "| metric | first | last | change | min | max | points |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        lines.append(
            f"| `{s.key}` | {s.first:.3f} (step {s.first_step}) | {s.last:.3f} (step {s.last_step}) | "
            f"{s.change:+.3f} | {s.minimum:.3f} | {s.maximum:.3f} | {s.points} |"
        )
    return [*lines, ""]


def _over_training_section(series: Mapping[str, Series]) -> list[str]:
    keys = [k for k in (*CATEGORY_KEYS, *HOMOGENEITY_KEYS) if k in series]
    if not keys:
        return []
    steps = sample_steps(series, keys)
    lines = [
        "## Categories and group homogeneity over training",
        "",
        "Fractions of the step's rollouts (categories) and of its groups (homogeneity). A group whose rollouts "
        "are all wrong (or all right) gives outcome-only GRPO no signal; TSPO's turn-level rewards still "
        "separate its near misses from its complete failures.",
        "",
        "| step | " + " | ".join(_SHORT[k] for k in keys) + " |",
        "|---:|" + "---:|" * len(keys),
    ]
    for step in steps:
        lines.append(f"| {step} | " + " | ".join(_fmt(value_at(series[k], step)) for k in keys) + " |")
    return [*lines, ""]


def _validation_section(series: Mapping[str, Series]) -> list[str]:
    lines: list[str] = []
    for prefix, title in (
        ("val", "Validation during training"),
        ("eval", "Held-out evaluation during training"),
    ):
        names = validation_datasets(series, prefix)
        pooled = [n for n in ("all", "average") if f"{prefix}/{n}/em" in series]
        if not names:
            continue
        lines += [
            f"## {title} (`{prefix}/<dataset>/*`)",
            "",
            "| dataset | first EM | last EM | best EM | last F1 |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in [*names, *pooled]:
            steps, values = series[f"{prefix}/{name}/em"]
            f1 = series.get(f"{prefix}/{name}/f1")
            lines.append(
                f"| {dataset_title(name)} | {values[0]:.3f} (step {int(steps[0])}) | "
                f"{values[-1]:.3f} (step {int(steps[-1])}) | {values.max():.3f} | "
                f"{_fmt(float(f1[1][-1]) if f1 is not None else None)} |"
            )
        lines.append("")
    return lines


def _examples_section(records: Sequence[Mapping[str, Any]], per_category: int) -> list[str]:
    if per_category == 0 or not records:
        return []
    counts = category_counts(records)
    picked = pick_examples(records, per_category)
    lines = ["## Example trajectories", "", "Near misses first: the answer was retrieved but not given.", ""]
    for category in CATEGORY_ORDER:
        lines += [f"### {CATEGORY_TITLES[category]}: {len(picked[category])} of {counts[category]}", ""]
        if not picked[category]:
            lines += ["(none)", ""]
        for record in picked[category]:
            lines += [render_trajectory(record), ""]
    return lines


# --------------------------------------------------------------------------------------------- entry point
def analyze(
    run_dir: str | Path | None = None,
    *,
    eval_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    examples_per_category: int = 2,
    smooth: float = 0.6,
) -> AnalysisResult:
    """Write the figures and ``report.md`` of a run and/or an evaluation; see the module docstring.

    Args:
        run_dir: a ``tspo train`` directory (``metrics.jsonl``); its newest ``eval/*/`` evaluation is used
            when ``eval_dir`` is not given.
        eval_dir: a ``tspo eval --out`` directory (``trajectories.jsonl``).
        out_dir: where to write (default ``RUN_DIR/analysis`` or ``EVAL_DIR/analysis``).
        examples_per_category: example trajectories shown per category (0: none).
        smooth: EMA weight of the training curves (0: raw values).
    """
    run = Path(run_dir) if run_dir is not None else None
    if run is not None and not run.is_dir():
        raise AnalysisError(f"run directory not found: {run}")
    evaluation = Path(eval_dir) if eval_dir is not None else (find_eval_dir(run) if run is not None else None)
    if eval_dir is not None and not (evaluation / TRAJECTORIES_FILE).is_file():
        raise AnalysisError(f"{evaluation} holds no {TRAJECTORIES_FILE} (is it a tspo eval --out directory?)")
    has_metrics = run is not None and (run / METRICS_FILE).is_file()
    if not has_metrics and evaluation is None:
        where = f"{run} has no {METRICS_FILE} and no eval/*/{TRAJECTORIES_FILE}" if run else "no input"
        raise AnalysisError(f"nothing to analyse: {where}")
    out = Path(out_dir) if out_dir is not None else (run or evaluation) / ANALYSIS_DIR  # type: ignore[operator]

    series: dict[str, Series] = {}
    if has_metrics:
        try:
            series = metric_series(read_metrics(run))  # type: ignore[arg-type]
        except MetricsFileError as err:
            raise AnalysisError(str(err)) from None
    records: list[dict[str, Any]] = []
    if evaluation is not None:
        records = read_records(evaluation / TRAJECTORIES_FILE)
    table = per_dataset_summary(records) if records else {}

    plots = [
        path
        for path in (
            plot_rewards(series, out / "rewards.png", smooth),
            plot_categories(series, out / "categories.png", smooth),
            plot_homogeneity(series, out / "homogeneity.png", smooth),
            plot_eval_datasets(table, out / "eval_datasets.png") if table else None,
        )
        if path is not None
    ]

    title = (run or evaluation).resolve().name  # type: ignore[union-attr]
    lines = [f"# Analysis: {title}", ""]
    if run is not None:
        lines.append(f"- **run**: `{run}`")
        lines += [f"- **{key}**: {value}" for key, value in _run_facts(run).items()]
        if series:
            steps = sorted({int(s) for steps, _ in series.values() for s in steps})
            lines.append(f"- **steps logged**: {steps[0]} to {steps[-1]} ({len(steps)} distinct)")
    if evaluation is not None:
        lines.append(f"- **evaluation**: `{evaluation}` ({len(records)} questions)")
    lines.append("")
    if plots:
        lines += ["## Figures", ""]
        lines += [f"![{path.stem}]({path.name})" for path in plots]
        lines.append("")
    lines += _curves_section(series)
    lines += _over_training_section(series)
    lines += _validation_section(series)
    if table:
        lines += ["## Evaluation per dataset", "", markdown_table(table), ""]
    lines += _examples_section(records, examples_per_category)

    out.mkdir(parents=True, exist_ok=True)
    report = out / REPORT_FILE
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return AnalysisResult(out_dir=out, report=report, plots=plots, eval_dir=evaluation)
