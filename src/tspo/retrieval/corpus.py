"""Streaming readers for passage corpora in JSONL.

Two layouts are accepted, one passage per line:

* ``{"id": ..., "contents": "title\\ntext"}`` -- the FlashRAG / Search-R1 wiki-18 format;
* ``{"id": ..., "title": ..., "text": ...}``.

Lines are parsed one at a time and handed out as :class:`~tspo.doc.Doc`, so a 21M-passage file is never
held in memory; ``.gz`` files are read transparently.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from tspo.doc import Doc
from tspo.retrieval.passage import doc_from_contents, passage_id

try:  # orjson parses wiki-18 about 3x faster; the standard library is the fallback.
    import orjson

    _json_loads: Any = orjson.loads
    _JSONError: tuple[type[Exception], ...] = (orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - depends on the environment
    _json_loads = json.loads
    _JSONError = (ValueError,)

__all__ = ["CorpusFormatError", "count_lines", "doc_from_record", "read_corpus"]


class CorpusFormatError(ValueError):
    """A corpus line that is not a passage record; the message names the file and line number."""


def _open_binary(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb", buffering=1 << 20)


def doc_from_record(record: object) -> Doc:
    """Turn one parsed JSON record into a ``Doc``; raise ``ValueError`` naming what is wrong.

    ``{"title", "text"}`` is taken as given (newlines in a title become spaces, so ``contents`` stays
    ``"title\\ntext"``); ``{"contents"}`` is split at its first newline so that ``doc.contents`` is the
    line's ``contents`` byte for byte (see :mod:`tspo.retrieval.passage`). An integer id stays an
    integer on the wire (:class:`~tspo.retrieval.passage.JsonIntId`).
    """
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "id" not in record:
        raise ValueError('missing "id"')
    doc_id = record["id"]
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise ValueError(f'"id" must be a string or an integer, got {type(doc_id).__name__}')
    doc_id = passage_id(doc_id)
    if "text" in record:
        text, title = record["text"], record.get("title", "")
        if not isinstance(text, str) or not isinstance(title, str):
            raise ValueError('"title" and "text" must be strings')
        return Doc(id=doc_id, title=" ".join(title.splitlines()).strip(), text=text)
    if "contents" in record:
        contents = record["contents"]
        if not isinstance(contents, str):
            raise ValueError(f'"contents" must be a string, got {type(contents).__name__}')
        return doc_from_contents(doc_id, contents)
    raise ValueError('expected "contents" or "title" + "text"')


def read_corpus(path: str | os.PathLike[str]) -> Iterator[Doc]:
    """Yield the passages of a JSONL corpus in file order, one line at a time.

    Blank lines are skipped. Raises ``FileNotFoundError`` naming a missing file and
    ``CorpusFormatError`` naming the file and 1-based line number of a malformed line.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a corpus file" if path.is_dir() else "corpus file not found"
        raise FileNotFoundError(f"{what}: {path}")
    with _open_binary(path) as handle:
        line_number = 0
        try:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = _json_loads(line)
                except _JSONError as err:
                    raise CorpusFormatError(f"{path}:{line_number}: invalid JSON: {err}") from None
                try:
                    yield doc_from_record(record)
                except ValueError as err:
                    raise CorpusFormatError(f"{path}:{line_number}: {err}") from None
        except _COMPRESSION_ERRORS as err:
            raise CorpusFormatError(_unreadable(path, line_number + 1, err)) from None


#: What reading a corrupt or truncated ``.gz`` raises (gzip.BadGzipFile is an OSError).
_COMPRESSION_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _unreadable(path: Path, line_number: int, err: BaseException) -> str:
    return (
        f"{path}:{line_number}: cannot decompress ({type(err).__name__}: {err}); is it a complete gzip file?"
    )


def count_lines(path: str | os.PathLike[str]) -> int:
    """Number of lines in a (possibly gzipped) text file, read in 4 MiB blocks (for progress bars)."""
    count, last = 0, b"\n"
    with _open_binary(Path(path)) as handle:
        try:
            while block := handle.read(1 << 22):
                count += block.count(b"\n")
                last = block[-1:]
        except _COMPRESSION_ERRORS as err:
            raise CorpusFormatError(_unreadable(Path(path), count + 1, err)) from None
    return count + (last != b"\n")
