"""``tspo data prepare``: FlashRAG JSONL in, cleaned JSONL + verl parquet out, with a count of every drop.

Input: ``<src>/<dataset>/<split>.jsonl`` as FlashRAG ships it. Output, under ``<out>``:

- ``<dataset>/<split>.jsonl`` and ``.parquet`` for each evaluation set (the split the benchmark reports on)
  and for each training-mix dataset's ``train`` split;
- ``train.jsonl`` / ``train.parquet``: the training mix (Search-R1: NQ + HotpotQA train), shuffled with a
  seed; ``test.jsonl`` / ``test.parquet``: every evaluation set, concatenated in the order asked;
- ``prepare_report.json``: the counts :class:`PrepareReport` prints.

Nothing is dropped silently: per file it counts malformed lines, duplicate ids, duplicate questions (same
text after :func:`tspo.rewards.normalize_answer`), empty gold lists (no alias that normalises to a
non-empty string; EM can never match them) and evaluation questions that also occur in the training mix.
All outputs are staged as temporary files and published together at the end, so an interrupted run leaves
no partial file and earlier outputs untouched.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from tspo.data.parquet import SEARCH_R1_ABILITY, VerlParquetWriter
from tspo.data.qa import (
    DATASETS,
    SEARCH_R1_EVAL_DATASETS,
    SEARCH_R1_TRAIN_MIX,
    SPLIT_ALIASES,
    MalformedPolicy,
    QAExample,
    QAJsonlWriter,
    ReadStats,
    find_split_file,
    iter_qa_lines,
    resolve_dataset,
)
from tspo.files import StagedOutputs, atomic_path
from tspo.protocol import DEFAULT_PROTOCOL, ProtocolConfig
from tspo.rewards import normalize_answer

DuplicatePolicy = Literal["keep_first", "keep_all", "error"]
EmptyGoldPolicy = Literal["drop", "keep", "error"]

#: Download hint printed when an input file is missing (users run it themselves; nothing is fetched here).
DOWNLOAD_HINT = (
    "download FlashRAG's files first, e.g.: hf download RUC-NLPIR/FlashRAG_datasets nq/train.jsonl "
    "nq/test.jsonl hotpotqa/train.jsonl hotpotqa/dev.jsonl ... --repo-type dataset --local-dir <src> "
    "(docs/reproduce.md lists all)"
)


class DataPrepError(ValueError):
    """Bad input to ``prepare_datasets`` (missing files, a duplicate under ``duplicates='error'``, ...)."""


@dataclass
class SplitCounts:
    """What happened to one input file.

    Attributes:
        dataset, split: the input (source split, e.g. ``dev`` for HotpotQA).
        role: ``"train"`` (training mix) or ``"test"`` (evaluation set); becomes ``extra_info.split``.
        source: the input path.
        read: non-blank lines read.
        malformed: lines skipped as malformed (only with ``on_malformed="skip"``).
        duplicate_ids: records whose id was already seen in this file.
        duplicate_questions: records with a new id but an already-seen normalised question.
        empty_golds: records without a usable gold alias.
        written: records written.
        in_train_mix: written evaluation questions whose normalised text is also in the training mix.
        problems: ``(line, reason)`` of the first malformed lines skipped.
    """

    dataset: str
    split: str
    role: str
    source: str
    read: int = 0
    malformed: int = 0
    duplicate_ids: int = 0
    duplicate_questions: int = 0
    empty_golds: int = 0
    written: int = 0
    in_train_mix: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class PrepareReport:
    """Counts per input file plus the files written (``to_dict`` is what ``prepare_report.json`` holds)."""

    out_dir: str
    counts: list[SplitCounts]
    outputs: list[str]
    train_mix: tuple[str, ...]
    seed: int | None
    train_rows: int
    test_rows: int
    policies: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format_table(self) -> str:
        """A fixed-width table of the counts (what the CLI prints)."""
        header = (
            "dataset",
            "split",
            "role",
            "read",
            "malformed",
            "dup_id",
            "dup_question",
            "empty_gold",
            "written",
            "in_train_mix",
        )
        rows = [header]
        for c in self.counts:
            in_mix = str(c.in_train_mix) if c.role == "test" else "-"
            rows.append(
                (
                    c.dataset,
                    c.split,
                    c.role,
                    str(c.read),
                    str(c.malformed),
                    str(c.duplicate_ids),
                    str(c.duplicate_questions),
                    str(c.empty_golds),
                    str(c.written),
                    in_mix,
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = []
        for number, row in enumerate(rows):
            cells = [
                cell.ljust(w) if i < 3 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(cells).rstrip())
            if number == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
        mix = " + ".join(self.train_mix) if self.train_mix else "(none)"
        order = "in source order" if self.seed is None else f"shuffled with seed {self.seed}"
        lines.append(f"training mix : {mix}, {self.train_rows} rows, {order}")
        lines.append(f"evaluation   : {self.test_rows} rows")
        for c in self.counts:
            for line, reason in c.problems:
                lines.append(f"malformed    : {c.source}:{line}: {reason}")
            if c.malformed > len(c.problems):
                lines.append(f"malformed    : {c.source}: ... and {c.malformed - len(c.problems)} more")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    dataset: str
    split: str
    role: str
    source: Path


class _Filter:
    """Applies the duplicate / empty-gold policies to one file's records and counts what it sees."""

    def __init__(
        self, counts: SplitCounts, duplicates: DuplicatePolicy, empty_golds: EmptyGoldPolicy
    ) -> None:
        self.counts = counts
        self.duplicates = duplicates
        self.empty_golds = empty_golds
        self._id_lines: dict[str, int] = {}
        self._question_lines: dict[str, int] = {}

    def keep(self, line: int, example: QAExample) -> bool:
        source = self.counts.source
        if not any(normalize_answer(gold) for gold in example.golds):
            self.counts.empty_golds += 1
            if self.empty_golds == "error":
                raise DataPrepError(
                    f"{source}:{line}: id {example.id!r} has no usable gold answer {list(example.golds)!r} "
                    "(use --empty-golds drop or keep)"
                )
            if self.empty_golds == "drop":
                return False
        first_line = self._id_lines.get(example.id)
        if first_line is not None:
            self.counts.duplicate_ids += 1
            if self.duplicates == "error":
                raise DataPrepError(
                    f"{source}:{line}: duplicate id {example.id!r} (first on line {first_line}); "
                    "use --duplicates keep-first or keep-all"
                )
            return self.duplicates == "keep_all"
        self._id_lines[example.id] = line
        question_key = normalize_answer(example.question)
        first_line = self._question_lines.get(question_key)
        if first_line is not None:
            self.counts.duplicate_questions += 1
            if self.duplicates == "error":
                raise DataPrepError(
                    f"{source}:{line}: question {example.question!r} duplicates line {first_line}; "
                    "use --duplicates keep-first or keep-all"
                )
            return self.duplicates == "keep_all"
        self._question_lines[question_key] = line
        return True


def _parse_names(names: Sequence[str] | str | None, default: Sequence[str]) -> list[str]:
    if names is None:
        return list(default)
    if isinstance(names, str):
        names = names.split(",")
    resolved = []
    for name in names:
        if not name.strip():
            continue
        canonical = resolve_dataset(name).name
        if canonical not in resolved:
            resolved.append(canonical)
    return resolved


def _plan_inputs(
    src_dir: str | os.PathLike[str], eval_names: Sequence[str], mix_names: Sequence[str]
) -> list[_Job]:
    """Locate every input file; one ``DataPrepError`` lists all that are missing."""
    src = Path(src_dir)
    if not src.is_dir():
        raise DataPrepError(f"source directory not found: {src} ({DOWNLOAD_HINT})")
    jobs: list[_Job] = []
    missing: list[str] = []
    wanted = [(name, "train", "train") for name in mix_names]
    wanted += [(name, DATASETS[name].eval_split, "test") for name in eval_names]
    for name, split, role in wanted:
        spec = DATASETS[name]
        if split not in spec.splits:
            raise DataPrepError(
                f"dataset {name!r} has no {split!r} split (FlashRAG ships {', '.join(spec.splits)})"
            )
        path = find_split_file(src, name, split)
        if path is None:
            stems = "|".join(SPLIT_ALIASES[split])
            missing.append(
                f"{src / name / split}.jsonl (looked for <{'|'.join(spec.folder_names)}>/<{stems}>.jsonl[.gz])"
            )
        else:
            jobs.append(_Job(name, split, role, path))
    if missing:
        listing = "\n  ".join(missing)
        raise DataPrepError(f"missing input file(s):\n  {listing}\n{DOWNLOAD_HINT}")
    return jobs


def _read_filtered(
    job: _Job,
    counts: SplitCounts,
    *,
    duplicates: DuplicatePolicy,
    empty_golds: EmptyGoldPolicy,
    on_malformed: MalformedPolicy,
    progress: bool,
) -> Iterator[QAExample]:
    stats = ReadStats()
    rule = _Filter(counts, duplicates, empty_golds)
    try:
        for line, example in iter_qa_lines(
            job.source,
            job.dataset,
            split=job.split,
            on_malformed=on_malformed,
            stats=stats,
            progress=progress,
        ):
            if rule.keep(line, example):
                counts.written += 1
                yield example
    finally:
        counts.read = stats.records + stats.malformed
        counts.malformed = stats.malformed
        counts.problems = list(stats.problems)


@contextmanager
def _qa_writers(
    staged: StagedOutputs, base: Path | str, split: str, writer_options: dict[str, Any]
) -> Iterator[tuple[QAJsonlWriter, VerlParquetWriter]]:
    """``base.jsonl`` and ``base.parquet`` written side by side, both staged (discarded on error)."""
    with (
        QAJsonlWriter(f"{base}.jsonl", staged_path=staged.stage(f"{base}.jsonl")) as jsonl,
        VerlParquetWriter(
            f"{base}.parquet", split=split, staged_path=staged.stage(f"{base}.parquet"), **writer_options
        ) as parquet,
    ):
        yield jsonl, parquet


def prepare_datasets(
    src_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    names: Sequence[str] | str | None = None,
    *,
    train_mix: Sequence[str] | str | None = None,
    seed: int | None = 0,
    duplicates: DuplicatePolicy = "keep_first",
    empty_golds: EmptyGoldPolicy = "drop",
    on_malformed: MalformedPolicy = "raise",
    protocol: ProtocolConfig = DEFAULT_PROTOCOL,
    data_source_prefix: str = "",
    ability: str = SEARCH_R1_ABILITY,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> PrepareReport:
    """Read FlashRAG JSONL for ``names`` and the training mix; write JSONL + verl parquet under ``out_dir``.

    Args:
        src_dir: FlashRAG layout, ``<src_dir>/<dataset>/<split>.jsonl`` (or ``.jsonl.gz``).
        out_dir: output directory (created). See the module docstring for the files.
        names: evaluation datasets, a list or comma-separated string (default: Search-R1's seven). Each is
            read from its reporting split (:attr:`DatasetSpec.eval_split`). Empty: no evaluation set.
        train_mix: datasets whose ``train`` split forms the training mix (default ``nq,hotpotqa``). Empty:
            no training mix.
        seed: shuffle seed of the training mix; None keeps source order (each mix dataset in turn, as
            Search-R1 concatenates them and leaves shuffling to the data loader).
        duplicates: ``keep_first`` (default) drops later records with an already-seen id or normalised
            question; ``keep_all`` keeps them (row-for-row Search-R1); ``error`` stops at the first.
        empty_golds: ``drop`` (default), ``keep`` or ``error`` for records with no usable gold alias.
        on_malformed: ``raise`` (default) stops at a bad line naming file and line; ``skip`` counts it.
        protocol: instruction template for the parquet prompts (default: Search-R1's).
        data_source_prefix: prefix for parquet ``data_source`` (``"searchR1_"`` for verl's built-in scorer).
        progress: progress bars on stderr.
        log: called with a line per finished file.

    Returns:
        The :class:`PrepareReport` (also written to ``<out_dir>/prepare_report.json``).
    """
    if duplicates not in ("keep_first", "keep_all", "error"):
        raise ValueError(f"duplicates must be keep_first, keep_all or error, got {duplicates!r}")
    if empty_golds not in ("drop", "keep", "error"):
        raise ValueError(f"empty_golds must be drop, keep or error, got {empty_golds!r}")
    try:
        eval_names = _parse_names(names, SEARCH_R1_EVAL_DATASETS)
        mix_names = _parse_names(train_mix, SEARCH_R1_TRAIN_MIX)
    except ValueError as err:
        raise DataPrepError(str(err)) from None
    if not eval_names and not mix_names:
        raise DataPrepError("nothing to do: no evaluation dataset and no training-mix dataset")
    jobs = _plan_inputs(src_dir, eval_names, mix_names)
    out = Path(out_dir)
    for job in jobs:
        if (out / job.dataset / f"{job.split}.jsonl").resolve() == job.source.resolve():
            raise DataPrepError(
                f"--out {out} would overwrite the input {job.source}; choose another directory"
            )
    foreign = [
        name
        for name in ("train.jsonl", "test.jsonl", "train.parquet", "test.parquet")
        if (out / name).exists() and not (out / "prepare_report.json").exists()
    ]
    if foreign:  # a synthetic world's files, or anything else this command did not write
        raise DataPrepError(
            f"--out {out} already holds {', '.join(foreign)} that `tspo data prepare` did not write "
            "(a world's?); choose another directory"
        )
    out.mkdir(parents=True, exist_ok=True)
    read_options: dict[str, Any] = {
        "duplicates": duplicates,
        "empty_golds": empty_golds,
        "on_malformed": on_malformed,
        "progress": progress,
    }
    writer_options: dict[str, Any] = {
        "protocol": protocol,
        "data_source_prefix": data_source_prefix,
        "ability": ability,
    }
    all_counts: list[SplitCounts] = []
    train_rows = test_rows = 0
    with StagedOutputs() as staged:
        # Training mix first: its question set is needed to count train/eval overlap.
        mix: list[QAExample] = []
        for job in (j for j in jobs if j.role == "train"):
            counts = SplitCounts(job.dataset, job.split, job.role, str(job.source))
            all_counts.append(counts)
            base = out / job.dataset / job.split
            with _qa_writers(staged, base, "train", writer_options) as (jsonl, parquet):
                for example in _read_filtered(job, counts, **read_options):
                    jsonl.write(example)
                    parquet.write(example)
                    mix.append(example)
            _log(log, counts)
        train_questions = {normalize_answer(example.question) for example in mix}
        if mix_names:
            if seed is not None:
                random.Random(seed).shuffle(mix)
            with _qa_writers(staged, out / "train", "train", writer_options) as (jsonl, parquet):
                for example in mix:
                    jsonl.write(example)
                    parquet.write(example)
            train_rows = len(mix)
            del mix
        eval_jobs = [j for j in jobs if j.role == "test"]
        if eval_jobs:
            with _qa_writers(staged, out / "test", "test", writer_options) as (all_jsonl, all_parquet):
                for job in eval_jobs:
                    counts = SplitCounts(job.dataset, job.split, job.role, str(job.source))
                    all_counts.append(counts)
                    base = out / job.dataset / job.split
                    with _qa_writers(staged, base, "test", writer_options) as (jsonl, parquet):
                        for example in _read_filtered(job, counts, **read_options):
                            if normalize_answer(example.question) in train_questions:
                                counts.in_train_mix += 1
                            for writer in (jsonl, parquet, all_jsonl, all_parquet):
                                writer.write(example)
                    _log(log, counts)
                test_rows = all_jsonl.count
        report = PrepareReport(
            out_dir=str(out),
            counts=all_counts,
            outputs=[str(p) for p in [*staged.finals, out / "prepare_report.json"]],
            train_mix=tuple(mix_names),
            seed=seed,
            train_rows=train_rows,
            test_rows=test_rows,
            policies={"duplicates": duplicates, "empty_golds": empty_golds, "on_malformed": on_malformed},
        )
        report_path = staged.stage(out / "prepare_report.json")
        report_path.write_text(
            json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        staged.commit()
    return report


def _log(log: Callable[[str], None] | None, counts: SplitCounts) -> None:
    if log is not None:
        log(
            f"{counts.dataset}/{counts.split}: {counts.written} written of {counts.read} read "
            f"({counts.duplicate_ids + counts.duplicate_questions} duplicate, {counts.empty_golds} empty gold, "
            f"{counts.malformed} malformed)"
        )


def convert_qa_file(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    split: str | None = None,
    role: str | None = None,
    protocol: ProtocolConfig = DEFAULT_PROTOCOL,
    data_source_prefix: str = "",
    on_malformed: MalformedPolicy = "raise",
    progress: bool = False,
) -> tuple[int, ReadStats]:
    """Convert one FlashRAG-layout QA JSONL (e.g. the synthetic world's) to verl parquet, atomically.

    No filtering: every record is written. ``role`` sets ``extra_info.split`` (default: the record's
    split). Returns ``(rows written, read stats)``.
    """
    stats = ReadStats()
    with (
        atomic_path(out) as temporary,
        VerlParquetWriter(
            out, protocol=protocol, split=role, data_source_prefix=data_source_prefix, staged_path=temporary
        ) as writer,
    ):
        for line, example in iter_qa_lines(
            src, dataset, split=split, on_malformed=on_malformed, stats=stats, progress=progress
        ):
            if not example.dataset:
                raise DataPrepError(f"{src}:{line}: the record names no dataset; pass dataset= (--dataset)")
            writer.write(example)
    return writer.count, stats
