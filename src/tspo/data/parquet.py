"""verl-ready parquet in Search-R1's layout (``scripts/data_process/qa_search_{train,test}_merge.py``).

One row per question, exactly these columns (what verl's ``RLHFDataset`` and Search-R1's reward read)::

    data_source   string                                   "nq", "hotpotqa", ... (reward routing key)
    prompt        list<struct<role: string, content: string>>  [{"role": "user", "content": <instruction>}]
    ability       string                                   "fact-reasoning"
    reward_model  struct<style: string, ground_truth: struct<target: list<string>>>
                                                           {"style": "rule", "ground_truth": {"target": golds}}
    extra_info    struct<split: string, index: int64>      {"split": "train" | "test", "index": row in source}

The instruction is :func:`tspo.protocol.build_instruction` applied to the question with ``?`` appended when
missing (Search-R1's rule), so the default prompt is byte-identical to Search-R1's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tspo.data.qa import QAExample, canonical_dataset_name, search_r1_question
from tspo.files import temporary_sibling
from tspo.protocol import DEFAULT_PROTOCOL, ProtocolConfig, build_prompt_messages

if TYPE_CHECKING:
    import pyarrow as pa

#: The columns of a verl / Search-R1 parquet file, in order.
VERL_FIELDS: tuple[str, ...] = ("data_source", "prompt", "ability", "reward_model", "extra_info")
#: Search-R1's ``ability`` value for QA.
SEARCH_R1_ABILITY = "fact-reasoning"


@lru_cache(maxsize=1)
def verl_schema() -> pa.Schema:
    """The arrow schema of :data:`VERL_FIELDS` (explicit, so an empty file still has the right types)."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    reward_model = pa.struct(
        [("style", pa.string()), ("ground_truth", pa.struct([("target", pa.list_(pa.string()))]))]
    )
    extra_info = pa.struct([("split", pa.string()), ("index", pa.int64())])
    return pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(message)),
            ("ability", pa.string()),
            ("reward_model", reward_model),
            ("extra_info", extra_info),
        ]
    )


def verl_row(
    example: QAExample,
    *,
    index: int,
    split: str | None = None,
    protocol: ProtocolConfig = DEFAULT_PROTOCOL,
    ability: str = SEARCH_R1_ABILITY,
    data_source_prefix: str = "",
) -> dict[str, Any]:
    """One parquet row for ``example`` (see the module docstring for the layout).

    Args:
        index: ``extra_info.index`` (Search-R1: the row's position in its source dataset).
        split: ``extra_info.split``; default the example's own split. Search-R1 writes ``"train"`` for the
            training mix and ``"test"`` for every evaluation set (even those drawn from ``dev``).
        data_source_prefix: prepended to the dataset name, e.g. ``"searchR1_"`` for verl's built-in
            ``search_r1_like_qa_em`` scorer (Search-R1's own repository uses no prefix).
    """
    if not example.dataset:
        raise ValueError(f"example {example.id!r} has no dataset name; it becomes the parquet data_source")
    return {
        "data_source": f"{data_source_prefix}{example.dataset}",
        "prompt": build_prompt_messages(search_r1_question(example.question), protocol),
        "ability": ability,
        "reward_model": {"style": "rule", "ground_truth": {"target": list(example.golds)}},
        "extra_info": {"split": split if split is not None else example.split, "index": index},
    }


class VerlParquetWriter:
    """Streams examples into a verl parquet file in row groups; the file appears atomically at close.

    ``extra_info.index`` is the example's ``index`` (its row in the source file) when set, else its
    position in this file. With ``staged_path`` the caller publishes the file (see ``StagedOutputs``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        protocol: ProtocolConfig = DEFAULT_PROTOCOL,
        split: str | None = None,
        ability: str = SEARCH_R1_ABILITY,
        data_source_prefix: str = "",
        row_group_size: int = 8192,
        staged_path: Path | None = None,
    ) -> None:
        import pyarrow.parquet as pq

        if row_group_size < 1:
            raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
        self.path = Path(path)
        self._owns_temporary = staged_path is None
        self._target = temporary_sibling(self.path) if staged_path is None else staged_path
        self._row_options = {
            "protocol": protocol,
            "split": split,
            "ability": ability,
            "data_source_prefix": data_source_prefix,
        }
        self._row_group_size = row_group_size
        self._buffer: list[dict[str, Any]] = []
        self._writer = pq.ParquetWriter(self._target, verl_schema(), compression="zstd")
        self._closed = False
        self.count = 0

    def write(self, example: QAExample) -> None:
        index = example.index if example.index is not None else self.count
        self._buffer.append(verl_row(example, index=index, **self._row_options))
        self.count += 1
        if len(self._buffer) >= self._row_group_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._buffer:
            self._writer.write_table(pa.Table.from_pylist(self._buffer, schema=verl_schema()))
            self._buffer.clear()

    def close(self, *, discard: bool = False) -> None:
        """Finish the file; ``discard=True`` throws it away instead (an existing file stays as it was)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not discard:
                self._flush()
        finally:
            self._writer.close()
        if not self._owns_temporary:
            return
        if discard:
            self._target.unlink(missing_ok=True)
        else:
            os.replace(self._target, self.path)

    def __enter__(self) -> VerlParquetWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(discard=exc_type is not None)


def write_verl_parquet(
    examples: Iterable[QAExample],
    path: str | os.PathLike[str],
    protocol: ProtocolConfig = DEFAULT_PROTOCOL,
    *,
    split: str | None = None,
    ability: str = SEARCH_R1_ABILITY,
    data_source_prefix: str = "",
    row_group_size: int = 8192,
) -> int:
    """Write examples as a verl / Search-R1 parquet file, streaming and atomically; returns the row count.

    See :func:`verl_row` for ``split`` / ``data_source_prefix`` and the module docstring for the layout.
    """
    with VerlParquetWriter(
        path,
        protocol=protocol,
        split=split,
        ability=ability,
        data_source_prefix=data_source_prefix,
        row_group_size=row_group_size,
    ) as writer:
        for example in examples:
            writer.write(example)
    return writer.count


def question_from_prompt(content: str, protocol: ProtocolConfig = DEFAULT_PROTOCOL) -> str | None:
    """Recover the question from a user message built with ``protocol``'s instruction, or None."""
    prefix, _, suffix = protocol.instruction.partition("{question}")
    if (
        len(content) < len(prefix) + len(suffix)
        or not content.startswith(prefix)
        or not content.endswith(suffix)
    ):
        return None
    question = content[len(prefix) : len(content) - len(suffix)].strip()
    return question or None


def _golds_from_ground_truth(ground_truth: Any) -> tuple[str, ...]:
    if isinstance(ground_truth, dict):
        ground_truth = ground_truth.get("target")
    if isinstance(ground_truth, str):
        return (ground_truth,)
    if isinstance(ground_truth, (list, tuple)) and all(isinstance(g, str) for g in ground_truth):
        return tuple(ground_truth)
    raise ValueError(f"reward_model.ground_truth.target must be a list of strings, got {ground_truth!r}")


def read_verl_parquet(
    path: str | os.PathLike[str],
    protocol: ProtocolConfig = DEFAULT_PROTOCOL,
    *,
    data_source_prefix: str = "",
    batch_size: int = 4096,
) -> Iterator[QAExample]:
    """Stream :class:`QAExample` back from a verl / Search-R1 parquet file (ours or Search-R1's).

    The question comes from a ``question`` column when there is one (Search-R1's files keep the source
    columns), else it is cut out of the prompt with ``protocol``'s instruction template. ``id`` comes from
    an ``id`` column, else ``"<data_source>_<split>_<index>"``. ``data_source_prefix`` is stripped from
    ``data_source`` to get the dataset name. Errors name the file and the row.
    """
    import pyarrow.parquet as pq

    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"parquet file not found: {source}")
    parquet = pq.ParquetFile(source)
    columns = set(parquet.schema_arrow.names)
    missing = [name for name in ("data_source", "prompt", "reward_model") if name not in columns]
    if missing:
        raise ValueError(f"{source}: not a verl QA parquet file, missing column(s) {', '.join(missing)}")
    row_number = 0
    for batch in parquet.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            try:
                yield _example_from_row(row, row_number, protocol, data_source_prefix)
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"{source}: row {row_number}: {err}") from None
            row_number += 1


def _example_from_row(
    row: dict[str, Any], row_number: int, protocol: ProtocolConfig, data_source_prefix: str
) -> QAExample:
    data_source = str(row["data_source"])
    dataset = (
        data_source[len(data_source_prefix) :] if data_source.startswith(data_source_prefix) else data_source
    )
    extra_info = row.get("extra_info") or {}
    split = str(extra_info.get("split") or "")
    index = extra_info.get("index")
    index = int(index) if index is not None else row_number
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        messages = row["prompt"]
        user_turns = [m["content"] for m in messages or [] if m.get("role") == "user"]
        question = question_from_prompt(user_turns[-1], protocol) if user_turns else None
        if question is None:
            raise ValueError("no 'question' column and the prompt does not match the protocol's instruction")
    golds = _golds_from_ground_truth((row["reward_model"] or {}).get("ground_truth"))
    raw_id = row.get("id")
    example_id = str(raw_id) if raw_id is not None else f"{data_source}_{split}_{index}"
    return QAExample(
        id=example_id,
        question=question.strip(),
        golds=golds,
        dataset=canonical_dataset_name(dataset),
        split=split,
        metadata=row.get("metadata") if isinstance(row.get("metadata"), dict) else {},
        index=index,
    )
