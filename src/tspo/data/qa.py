"""QA examples in the FlashRAG JSONL layout: the record, the dataset registry, a streaming reader/writer.

FlashRAG (Jin et al. 2024, https://huggingface.co/datasets/RUC-NLPIR/FlashRAG_datasets) ships one folder
per benchmark with ``train.jsonl`` / ``dev.jsonl`` / ``test.jsonl``; each line is
``{"id": str, "question": str, "golden_answers": [str, ...], "metadata": {...}}``. Search-R1 trains on
NQ + HotpotQA ``train`` and evaluates on the ``test`` split where a benchmark has one, else ``dev``
(``scripts/data_process/qa_search_test_merge.py``), which is what :data:`DATASETS` records.

The synthetic search world writes the same layout under the dataset name ``synthetic_world``.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal

from tspo.files import temporary_sibling
from tspo.protocol import normalize_question

#: Split names and the file stems accepted for each (FlashRAG uses ``dev``; HF exports use ``validation``).
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "dev": ("dev", "validation", "val"),
    "test": ("test",),
}
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")

MalformedPolicy = Literal["raise", "skip"]


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark as FlashRAG ships it and Search-R1 evaluates it.

    Attributes:
        name: canonical name = FlashRAG folder = Search-R1 ``data_source`` (e.g. ``"2wikimultihopqa"``).
        title: display name for tables.
        eval_split: the split results are reported on (Search-R1: ``test`` if shipped, else ``dev``).
        splits: the splits FlashRAG ships.
        aliases: other folder names accepted for this dataset (matched case-insensitively).
        multi_hop: whether the benchmark is multi-hop (tables group by it).
    """

    name: str
    title: str
    eval_split: str
    splits: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    multi_hop: bool = False

    @property
    def folder_names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("nq", "NQ", "test", ("train", "dev", "test"), ("natural_questions", "naturalquestions")),
        DatasetSpec("triviaqa", "TriviaQA", "test", ("train", "dev", "test"), ("trivia_qa", "tqa")),
        DatasetSpec("popqa", "PopQA", "test", ("test",), ("pop_qa",)),
        DatasetSpec("hotpotqa", "HotpotQA", "dev", ("train", "dev"), ("hotpot_qa",), multi_hop=True),
        DatasetSpec(
            "2wikimultihopqa",
            "2Wiki",
            "dev",
            ("train", "dev"),
            ("2wiki", "2wikimqa", "2wiki_multihop_qa"),
            True,
        ),
        DatasetSpec("musique", "MuSiQue", "dev", ("train", "dev"), (), multi_hop=True),
        DatasetSpec("bamboogle", "Bamboogle", "test", ("test",), (), multi_hop=True),
        DatasetSpec(
            "synthetic_world", "Synthetic world", "test", ("train", "test"), ("world",), multi_hop=True
        ),
    )
}

#: The seven benchmarks of Search-R1 / TSPO, in the order their tables use.
SEARCH_R1_EVAL_DATASETS: tuple[str, ...] = (
    "nq",
    "triviaqa",
    "popqa",
    "hotpotqa",
    "2wikimultihopqa",
    "musique",
    "bamboogle",
)
#: Search-R1's training mix: NQ train + HotpotQA train.
SEARCH_R1_TRAIN_MIX: tuple[str, ...] = ("nq", "hotpotqa")


_BY_ALIAS: dict[str, DatasetSpec] = {
    alias.lower(): spec for spec in DATASETS.values() for alias in spec.folder_names
}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset to :data:`DATASETS` (e.g. a private benchmark in FlashRAG layout).

    Refuses a name or alias that is already taken, and an ``eval_split`` that is not among ``splits``.
    """
    if spec.eval_split not in spec.splits:
        raise ValueError(f"dataset {spec.name!r}: eval_split {spec.eval_split!r} is not one of {spec.splits}")
    taken = [alias for alias in spec.folder_names if alias.lower() in _BY_ALIAS]
    if taken:
        raise ValueError(f"dataset {spec.name!r}: name or alias already registered: {', '.join(taken)}")
    DATASETS[spec.name] = spec
    _BY_ALIAS.update({alias.lower(): spec for alias in spec.folder_names})
    return spec


def resolve_dataset(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` for a canonical name or alias (case-insensitive); ``ValueError`` if unknown."""
    spec = _BY_ALIAS.get(name.strip().lower())
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return spec


def canonical_dataset_name(name: str) -> str:
    """The registry name for a known dataset or alias; an unknown name is returned unchanged."""
    try:
        return resolve_dataset(name).name
    except ValueError:
        return name


def canonical_split(name: str) -> str | None:
    """``train`` / ``dev`` / ``test`` for a split name or file stem (``validation`` -> ``dev``), else None."""
    key = name.strip().lower()
    for split, aliases in SPLIT_ALIASES.items():
        if key in aliases:
            return split
    return None


def search_r1_question(question: str) -> str:
    """The question as Search-R1 puts it in the prompt (see :func:`tspo.protocol.normalize_question`)."""
    return normalize_question(question)


@dataclass(frozen=True)
class QAExample:
    """One question with its gold answer aliases.

    Attributes:
        id: the source record's id (unique within its dataset and split).
        question: the question text, whitespace-stripped.
        golds: gold answer aliases; EM / F1 take the best match over them.
        dataset: registry name (``"nq"``, ``"hotpotqa"``, ``"synthetic_world"``, ...) or a user's own name.
        split: source split (``train`` / ``dev`` / ``test``).
        metadata: the source record's ``metadata`` object, passed through untouched.
        index: 0-based position of the record in its source file (blank lines not counted), or None when
            built in memory; becomes ``extra_info.index`` in verl parquet, as in Search-R1.
    """

    id: str
    question: str
    golds: tuple[str, ...]
    dataset: str = ""
    split: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)
    index: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.golds, tuple):
            object.__setattr__(self, "golds", tuple(self.golds))

    def to_record(self) -> dict[str, Any]:
        """The FlashRAG JSONL record, plus ``dataset`` and ``split`` so a mixed file stays self-describing."""
        record: dict[str, Any] = {
            "id": self.id,
            "question": self.question,
            "golden_answers": list(self.golds),
            "metadata": dict(self.metadata),
        }
        if self.dataset:
            record["dataset"] = self.dataset
        if self.split:
            record["split"] = self.split
        return record


class QAFormatError(ValueError):
    """A QA JSONL line that cannot be read; the message names the file and line number."""

    def __init__(self, path: str | os.PathLike[str], line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = Path(path)
        self.line = line
        self.reason = reason


@dataclass
class ReadStats:
    """Counts from one :func:`read_qa_jsonl` pass (filled in as the iterator is consumed).

    Attributes:
        lines: physical lines read (blank ones included).
        records: records returned.
        malformed: lines skipped as malformed (``on_malformed="skip"`` only).
        problems: ``(line, reason)`` for the first :attr:`max_problems` malformed lines.
    """

    lines: int = 0
    records: int = 0
    malformed: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)
    max_problems: int = 20

    def note_problem(self, line: int, reason: str) -> None:
        self.malformed += 1
        if len(self.problems) < self.max_problems:
            self.problems.append((line, reason))


def _gold_alias(value: Any) -> str:
    # Numbers appear in some exports (e.g. a year as 1969); bool would be an ambiguous yes/no, so refuse it.
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        raise ValueError(f"gold answer {value!r} is not a string or number")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else repr(value)
    raise ValueError(f"gold answer {value!r} is not a string or number")


def example_from_record(
    record: Any, *, dataset: str | None = None, split: str | None = None, index: int | None = None
) -> QAExample:
    """Validate one decoded FlashRAG record; ``ValueError`` names the offending field.

    ``dataset`` / ``split`` given here win over the record's own ``dataset`` / ``split`` keys.
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("id", "question", "golden_answers"):
        if key not in record:
            raise ValueError(f"missing field {key!r} (FlashRAG records have id, question, golden_answers)")
    raw_id = record["id"]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise ValueError(f"field 'id' must be a string or integer, got {raw_id!r}")
    example_id = str(raw_id)
    if not example_id.strip():
        raise ValueError("field 'id' is empty")
    question = record["question"]
    if not isinstance(question, str):
        raise ValueError(f"field 'question' must be a string, got {type(question).__name__}")
    question = question.strip()
    if not question:
        raise ValueError("field 'question' is empty")
    answers = record["golden_answers"]
    if isinstance(answers, str):
        raise ValueError("field 'golden_answers' must be a list of strings, got a single string")
    if not isinstance(answers, list):
        raise ValueError(f"field 'golden_answers' must be a list, got {type(answers).__name__}")
    try:
        golds = tuple(_gold_alias(answer) for answer in answers)
    except ValueError as err:
        raise ValueError(f"field 'golden_answers': {err}") from None
    metadata = record.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ValueError(f"field 'metadata' must be an object, got {type(metadata).__name__}")
    record_dataset = record.get("dataset")
    record_split = record.get("split")
    return QAExample(
        id=example_id,
        question=question,
        golds=golds,
        dataset=dataset if dataset is not None else canonical_dataset_name(str(record_dataset or "")),
        split=split if split is not None else str(record_split or ""),
        metadata=metadata,
        index=index,
    )


def infer_dataset_and_split(path: str | os.PathLike[str]) -> tuple[str | None, str | None]:
    """Dataset and split from a FlashRAG path ``<dataset>/<split>.jsonl``.

    Only registry names and aliases count as a dataset, only train/dev/test stems (and aliases) as a split;
    anything else gives None.
    """
    path = Path(path)
    stem = path.name
    for suffix in sorted(JSONL_SUFFIXES, key=len, reverse=True):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    split = canonical_split(stem)
    try:
        dataset: str | None = resolve_dataset(path.parent.name).name
    except ValueError:
        dataset = None  # an arbitrary folder name is no evidence of a dataset (it becomes data_source)
    return dataset, split


def _open_binary(path: Path) -> IO[bytes]:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def iter_qa_lines(
    path: str | os.PathLike[str],
    dataset: str | None = None,
    *,
    split: str | None = None,
    on_malformed: MalformedPolicy = "raise",
    stats: ReadStats | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, QAExample]]:
    """Like :func:`read_qa_jsonl` but yields ``(line_number, example)`` (1-based physical line)."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"QA file not found: {source}")
    if on_malformed not in ("raise", "skip"):
        raise ValueError(f"on_malformed must be 'raise' or 'skip', got {on_malformed!r}")
    inferred_dataset, inferred_split = infer_dataset_and_split(source)
    stats = stats if stats is not None else ReadStats()
    dataset = canonical_dataset_name(dataset) if dataset else None
    # Explicit argument > the record's own key > the path; the path only fills what the record lacks.
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = None if source.name.endswith(".gz") else source.stat().st_size
        bar = tqdm(
            total=total, unit="B", unit_scale=True, desc=f"{source.parent.name}/{source.name}", leave=False
        )
    index = 0
    try:
        with _open_binary(source) as handle:
            for line_number, raw in enumerate(handle, start=1):
                stats.lines += 1
                if bar is not None:
                    bar.update(len(raw))
                try:
                    text = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    reason = f"not valid UTF-8 ({err.reason} at byte {err.start})"
                    if on_malformed == "raise":
                        raise QAFormatError(source, line_number, reason) from None
                    stats.note_problem(line_number, reason)
                    index += 1
                    continue
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                    example = example_from_record(record, dataset=dataset, split=split, index=index)
                except (json.JSONDecodeError, ValueError) as err:
                    reason = f"malformed JSON: {err}" if isinstance(err, json.JSONDecodeError) else str(err)
                    if on_malformed == "raise":
                        raise QAFormatError(source, line_number, reason) from None
                    stats.note_problem(line_number, reason)
                    index += 1
                    continue
                index += 1
                if (not example.dataset and inferred_dataset) or (not example.split and inferred_split):
                    example = replace(
                        example,
                        dataset=example.dataset or inferred_dataset or "",
                        split=example.split or inferred_split or "",
                    )
                stats.records += 1
                yield line_number, example
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise QAFormatError(source, stats.lines + 1, f"cannot read file: {err}") from None
    finally:
        if bar is not None:
            bar.close()


def read_qa_jsonl(
    path: str | os.PathLike[str],
    dataset: str | None = None,
    *,
    split: str | None = None,
    on_malformed: MalformedPolicy = "raise",
    stats: ReadStats | None = None,
    progress: bool = False,
) -> Iterator[QAExample]:
    """Stream :class:`QAExample` records from a FlashRAG-layout JSONL file (``.jsonl`` or ``.jsonl.gz``).

    Args:
        path: the file; ``<dataset>/<split>.jsonl`` lets dataset and split be inferred from the path.
        dataset: dataset name for every record (aliases map to the registry name); default: the record's
            ``dataset`` key, else the parent folder's name when it is a known dataset, else ``""``.
        split: split for every record; default: the record's ``split`` key, else the file stem.
        on_malformed: ``"raise"`` (default) stops at the first bad line with a :class:`QAFormatError`
            naming file and line; ``"skip"`` skips it and counts it in ``stats``.
        stats: optional :class:`ReadStats` filled in while the iterator is consumed.
        progress: show a progress bar (bytes read) on stderr.

    Blank lines are ignored. A missing file raises ``FileNotFoundError`` with its path.
    """
    for _, example in iter_qa_lines(
        path, dataset, split=split, on_malformed=on_malformed, stats=stats, progress=progress
    ):
        yield example


class QAJsonlWriter:
    """Streams examples into a QA JSONL file that appears atomically at :meth:`close` (temp + rename).

    With ``staged_path`` it writes there instead and leaves publishing to the caller (``StagedOutputs``).
    """

    def __init__(self, path: str | os.PathLike[str], *, staged_path: Path | None = None) -> None:
        self.path = Path(path)
        self._owns_temporary = staged_path is None
        self._target = temporary_sibling(self.path) if staged_path is None else staged_path
        self._handle: io.TextIOWrapper = open(self._target, "w", encoding="utf-8", newline="\n")  # noqa: SIM115
        self.count = 0

    def write(self, example: QAExample) -> None:
        self._handle.write(json.dumps(example.to_record(), ensure_ascii=False) + "\n")
        self.count += 1

    def close(self, *, discard: bool = False) -> None:
        """Finish the file; ``discard=True`` throws it away instead (an existing file stays as it was)."""
        if self._handle.closed:
            return
        self._handle.close()
        if not self._owns_temporary:
            return
        if discard:
            self._target.unlink(missing_ok=True)
        else:
            os.replace(self._target, self.path)

    def __enter__(self) -> QAJsonlWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(discard=exc_type is not None)


def write_qa_jsonl(examples: Iterable[QAExample], path: str | os.PathLike[str]) -> int:
    """Write examples as FlashRAG-layout JSONL (UTF-8, one record per line), atomically; returns the count.

    Each line is ``{"id", "question", "golden_answers", "metadata", "dataset", "split"}``; FlashRAG
    readers ignore the last two, :func:`read_qa_jsonl` uses them.
    """
    with QAJsonlWriter(path) as writer:
        for example in examples:
            writer.write(example)
    return writer.count


def find_split_file(src_dir: str | os.PathLike[str], dataset: str, split: str) -> Path | None:
    """The file for ``dataset``/``split`` under ``src_dir`` in FlashRAG's layout, or None.

    Looks for ``<src_dir>/<folder>/<split-stem><suffix>`` over the dataset's folder names (case-insensitive),
    the split's stems (``dev``, ``validation``, ``val``) and suffixes (``.jsonl``, ``.jsonl.gz``).
    """
    root = Path(src_dir)
    if not root.is_dir():
        return None
    folders = DATASETS[dataset].folder_names if dataset in DATASETS else (dataset,)
    wanted = [name.lower() for name in folders]
    entries = {entry.name.lower(): entry for entry in root.iterdir() if entry.is_dir()}
    stems = SPLIT_ALIASES.get(split, (split,))
    for folder_name in wanted:
        folder = entries.get(folder_name)
        if folder is None:
            continue
        for stem in stems:
            for suffix in JSONL_SUFFIXES:
                candidate = folder / f"{stem}{suffix}"
                if candidate.is_file():
                    return candidate
    return None
