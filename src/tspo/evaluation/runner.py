"""Evaluation of a policy on QA examples: the same rollout and reward code as training, imported.

- :func:`evaluate_policy`: one rollout per question in memory (the trainer's held-out evaluation).
- :func:`run_evaluation`: the resumable, batched evaluation behind ``tspo eval``. Records are appended to
  ``OUT/trajectories.jsonl`` batch by batch (:class:`~tspo.evaluation.store.TrajectoryStore`); a rerun
  skips every question already there, and the final tables are computed from the file, so an interrupted
  and resumed evaluation counts every question exactly once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tspo.evaluation.records import record_key, trajectory_to_record
from tspo.evaluation.selection import example_key
from tspo.evaluation.store import TRAJECTORIES_FILE, TrajectoryStore
from tspo.evaluation.summary import per_dataset_summary, summarize_records
from tspo.evaluation.tables import format_table, markdown_table
from tspo.files import atomic_path
from tspo.rollout import RolloutConfig, RolloutTask, run_rollouts
from tspo.scoring import TrajectoryScore, score_trajectories
from tspo.trajectory import Trajectory

logger = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SETTINGS_FILE = "eval_settings.json"


class EvalSettingsMismatch(ValueError):
    """An output directory holds records made with other settings; mixing them would be wrong."""


@dataclass
class EvalResult:
    """Aggregate metrics plus the per-question trajectories and scores behind them."""

    metrics: dict[str, float]
    trajectories: list[Trajectory]
    scores: list[TrajectoryScore]
    records: list[dict[str, Any]] = field(default_factory=list)


def summarize(trajectories: Sequence[Trajectory], scores: Sequence[TrajectoryScore]) -> dict[str, float]:
    """EM / sub-EM / F1, searches per question, categories, invalid-action and truncation rates
    (:func:`~tspo.evaluation.summary.summarize_records` over the trajectories' records)."""
    return summarize_records([trajectory_to_record(t, s) for t, s in zip(trajectories, scores, strict=True)])


def evaluate_policy(
    engine: Any,
    tokenizer: Any,
    retriever: Any,
    examples: Sequence[Any],
    rollout_config: RolloutConfig,
    *,
    metric: str = "em",
    hit_mode: str = "whole_word",
    seed: int = 0,
    greedy: bool = True,
    include_tokens: bool = False,
) -> EvalResult:
    """Roll out one trajectory per example (greedy unless told otherwise) and score it.

    ``examples`` need ``id``, ``question`` and ``golds`` attributes (e.g. ``tspo.data.QAExample``);
    ``dataset`` is used when present. ``greedy=False`` samples at ``rollout_config.temperature``.
    FOLR is off (``folr_alpha=0``): evaluation reports the raw outcome; the first-hit turn and the
    category are still computed.
    """
    config = dataclasses.replace(rollout_config, temperature=0.0) if greedy else rollout_config
    tasks = [
        RolloutTask(question=ex.question, golds=tuple(ex.golds), group_id=i, sample_id=str(ex.id))
        for i, ex in enumerate(examples)
    ]
    if not tasks:
        return EvalResult(metrics={"n": 0}, trajectories=[], scores=[])
    result = run_rollouts(engine, tokenizer, retriever, tasks, config, seed=seed)
    scores = score_trajectories(
        result.trajectories, metric=metric, folr_alpha=0.0, hit_mode=hit_mode, protocol=config.protocol
    )
    records = [
        trajectory_to_record(
            traj,
            score,
            dataset=str(getattr(ex, "dataset", "") or ""),
            example_id=str(ex.id),
            include_tokens=include_tokens,
        )
        for traj, score, ex in zip(result.trajectories, scores, examples, strict=True)
    ]
    return EvalResult(
        metrics=summarize_records(records),
        trajectories=result.trajectories,
        scores=scores,
        records=records,
    )


@dataclass
class EvalReport:
    """What :func:`run_evaluation` did and found.

    Attributes:
        table: ``{dataset: metrics}``, then ``all`` and (several datasets) ``average``.
        records: the records of the selected questions, from the file, in file order.
        evaluated: questions rolled out by this call.
        resumed: selected questions already finished in the file before this call.
        ignored: records in the file that are not in this selection (kept, not counted).
        files: paths written (``trajectories``, ``results_json``, ``results_md``).
    """

    out_dir: Path
    table: dict[str, dict[str, float]]
    records: list[dict[str, Any]]
    evaluated: int
    resumed: int
    ignored: int
    seconds: float
    files: dict[str, Path]

    def format_table(self) -> str:
        return format_table(self.table)


def check_settings(out_dir: Path, settings: Mapping[str, Any]) -> None:
    """Refuse to continue an evaluation in ``out_dir`` that was made with other ``settings``.

    Compares with ``eval_settings.json`` when it exists (nothing is written here); raises
    :class:`EvalSettingsMismatch` listing every setting that differs.
    """
    path = Path(out_dir) / SETTINGS_FILE
    if not path.is_file():
        return
    current = json.loads(json.dumps(settings))  # normalise tuples and the like
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EvalSettingsMismatch(f"{path}: not valid JSON ({err})") from None
    differ = sorted(key for key in set(stored) | set(current) if stored.get(key) != current.get(key))
    if differ:
        details = "; ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in differ)
        # Results without a weights identity (older tspo) cannot be told apart from new weights either.
        what = "other weights" if "weights" in differ else "other settings"
        raise EvalSettingsMismatch(
            f"{out_dir} holds results made with {what} ({details}). Rerun with the same "
            "settings to resume, or pick another --out (or --overwrite to start over)."
        )


def _record_settings(out_dir: Path, settings: Mapping[str, Any]) -> None:
    """:func:`check_settings`, then write ``eval_settings.json`` if this is the first run."""
    check_settings(out_dir, settings)
    path = out_dir / SETTINGS_FILE
    if not path.is_file():
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _markdown_report(table: Mapping[str, Mapping[str, float]], description: Mapping[str, Any]) -> str:
    lines = ["# Evaluation results", ""]
    for key, value in description.items():
        if value is not None and value != "":
            lines.append(f"- **{key}**: `{value}`" if not isinstance(value, dict) else f"- **{key}**:")
            if isinstance(value, dict):
                lines.extend(f"  - {k}: `{v}`" for k, v in value.items())
    lines += [
        "",
        markdown_table(table),
        "",
        "EM / sub-EM / F1: SQuAD-normalised exact match, containment and token F1 against the best gold "
        "alias. Categories (TSPO): *success* = gold answer retrieved and given; *near miss* = retrieved but "
        "not given; *failure* = neither; *no-retr. success* = given without being retrieved. *invalid*: "
        "questions with an invalid action; *truncated*: questions cut by a token or context limit. "
        "`all` pools every question; `average` is the unweighted mean over datasets.",
        "",
    ]
    return "\n".join(lines)


def write_results(
    out_dir: Path, table: Mapping[str, Mapping[str, float]], description: Mapping[str, Any]
) -> dict[str, Path]:
    """Write ``results.json`` and ``results.md`` atomically; returns their paths."""
    json_path, md_path = out_dir / RESULTS_JSON, out_dir / RESULTS_MD
    document = {"description": dict(description), "datasets": dict(table)}
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(document, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    with atomic_path(md_path) as tmp:
        tmp.write_text(_markdown_report(table, description), encoding="utf-8")
    return {"results_json": json_path, "results_md": md_path}


def run_evaluation(
    engine: Any,
    tokenizer: Any,
    retriever: Any,
    examples: Sequence[Any],
    rollout_config: RolloutConfig,
    out_dir: str | Path,
    *,
    batch_size: int = 64,
    metric: str = "em",
    hit_mode: str = "whole_word",
    seed: int = 0,
    include_tokens: bool = False,
    settings: Mapping[str, Any] | None = None,
    description: Mapping[str, Any] | None = None,
    progress: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Evaluate ``examples`` into ``out_dir``, resuming whatever an earlier run of the same settings left.

    Args:
        examples: the selected questions (``QAExample``: ``id``, ``dataset``, ``question``, ``golds``).
        rollout_config: limits and sampling, used as given (``temperature=0`` is greedy).
        batch_size: questions rolled out together; their records are appended and fsynced as a batch.
        metric, hit_mode: outcome ``o`` (for the category) and the FOLR hit rule, as in training.
        seed: seed of sampling (with ``temperature > 0``; batches restart the same seed sequence).
        include_tokens: store token ids in the records (larger file; exact trajectories can be rebuilt).
        settings: what must not change between a run and its resumption (model, rollout, retriever,
            scoring). Stored in ``eval_settings.json``; a rerun with different settings raises
            :class:`EvalSettingsMismatch` before anything is touched.
        description: shown in ``results.md`` and stored in ``results.json`` (settings, data, model...).
        on_batch: called as ``on_batch(done, total)`` after each batch is saved.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if settings is not None:
        _record_settings(out, settings)
    store = TrajectoryStore(out / TRAJECTORIES_FILE)
    wanted = {example_key(ex) for ex in examples}
    todo = [ex for ex in examples if example_key(ex) not in store.finished]
    resumed = len(examples) - len(todo)
    if resumed:
        logger.info(
            "%s: %d of %d questions already evaluated; running the other %d",
            out,
            resumed,
            len(examples),
            len(todo),
        )
    config = dataclasses.replace(rollout_config, generation_batch_size=batch_size)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(examples), initial=resumed, unit="question", desc="eval")
    try:
        for begin in range(0, len(todo), batch_size):
            batch = todo[begin : begin + batch_size]
            result = evaluate_policy(
                engine,
                tokenizer,
                retriever,
                batch,
                config,
                metric=metric,
                hit_mode=hit_mode,
                seed=seed,
                greedy=False,
                include_tokens=include_tokens,
            )
            store.append(result.records)
            if bar is not None:
                bar.update(len(batch))
            if on_batch is not None:
                on_batch(resumed + begin + len(batch), len(examples))
    finally:
        if bar is not None:
            bar.close()

    # The tables come from the file, not from memory: each question once, whatever runs produced it.
    records = [r for r in store.records if record_key(r) in wanted]
    ignored = len(store.records) - len(records)
    if ignored:
        logger.info("%s: %d record(s) outside this selection are kept but not counted", out, ignored)
    table = per_dataset_summary(records)
    files = {"trajectories": store.path, **write_results(out, table, description or {})}
    return EvalReport(
        out_dir=out,
        table=table,
        records=records,
        evaluated=len(todo),
        resumed=resumed,
        ignored=ignored,
        seconds=time.perf_counter() - start,
        files=files,
    )
