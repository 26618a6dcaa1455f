"""Passage storage shared by every local index: the text and id of passage ``i``, memory-mapped.

A store is five files in an index directory:

* ``docs.bin`` -- UTF-8 ``title + "\\n" + text`` of every passage, concatenated;
* ``docs.offsets.npy`` -- int64 ``(N + 1,)`` byte offsets into ``docs.bin``;
* ``ids.bin`` / ``ids.offsets.npy`` -- the passage ids, likewise;
* ``ids.rank.npy`` -- int32/int64 ``(N,)`` rank of each id in plain string order, so the search kernels
  break score ties by id with one integer comparison;
* ``store.json`` -- the layout version and which ids were JSON integers (``"none"``, ``"all"`` or
  ``"some"``, then ``ids.int.npy`` holds the bit-packed mask).

Layout 2 (with ``store.json``) stores each passage's ``contents`` exactly as the corpus had it, so an
empty first line (empty title) survives; layout 1 (stores written before ``store.json`` existed) stored
``title + "\\n" + text`` and is read as before.

Loading maps the files (nothing is copied into Python strings), so a 21M-passage wiki-18 store costs
page cache, not resident memory. Passages are written one at a time while the corpus streams in.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from tspo.doc import Doc
from tspo.retrieval.passage import JsonIntId, doc_from_contents

__all__ = ["DocStore", "DocStoreWriter", "rank_ids"]

ByteSource = bytes | bytearray | mmap.mmap

_FILES = ("docs.bin", "docs.offsets.npy", "ids.bin", "ids.offsets.npy", "ids.rank.npy")
# Written by layout 2; absent from (and not needed by) stores of layout 1.
_OPTIONAL_FILES = ("store.json", "ids.int.npy")
_LAYOUT = 2
# Ids up to this many bytes are ranked with a vectorised fixed-width sort; longer ones fall back to Python.
_MAX_FIXED_ID_BYTES = 64
_RANK_CHUNK = 1 << 20


def rank_ids(blob: ByteSource, offsets: np.ndarray) -> np.ndarray:
    """Rank of each id in plain string order (UTF-8 byte order equals code-point order).

    Args:
        blob: the UTF-8 ids concatenated.
        offsets: int64 ``(N + 1,)`` boundaries of each id in ``blob``.

    Returns:
        ``(N,)`` int32 (int64 past 2**31 passages); equal ids keep insertion order.
    """
    n = len(offsets) - 1
    rank_dtype = np.int32 if n < 2**31 - 1 else np.int64
    if n <= 0:
        return np.zeros(0, dtype=rank_dtype)
    lengths = np.diff(offsets)
    width = int(lengths.max())
    data = np.frombuffer(blob, dtype=np.uint8, count=int(offsets[-1]))
    if width <= _MAX_FIXED_ID_BYTES:
        padded = np.zeros((n, max(width, 1)), dtype=np.uint8)
        for start in range(0, n, _RANK_CHUNK):
            stop = min(n, start + _RANK_CHUNK)
            chunk_lengths = lengths[start:stop]
            rows = np.repeat(np.arange(start, stop), chunk_lengths)
            cols = np.arange(offsets[stop] - offsets[start]) - np.repeat(
                offsets[start:stop] - offsets[start], chunk_lengths
            )
            padded[rows, cols] = data[offsets[start] : offsets[stop]]
        # NUL padding sorts before every byte, which is exactly "shorter prefix first".
        order = np.argsort(padded.view(f"S{padded.shape[1]}").ravel(), kind="stable")
    else:
        raw = bytes(data)
        order = np.array(sorted(range(n), key=lambda i: raw[offsets[i] : offsets[i + 1]]), dtype=np.int64)
    rank = np.empty(n, dtype=rank_dtype)
    rank[order] = np.arange(n, dtype=rank_dtype)
    return rank


class DocStore:
    """Read-only passages by position; see the module docstring for the layout."""

    def __init__(
        self,
        docs: ByteSource,
        doc_offsets: np.ndarray,
        ids: ByteSource,
        id_offsets: np.ndarray,
        id_rank: np.ndarray,
        source_dir: Path | None = None,
        layout: int = _LAYOUT,
        int_ids: str = "none",
        int_mask: np.ndarray | None = None,
    ) -> None:
        self._docs = docs
        self._doc_offsets = doc_offsets
        self._ids = ids
        self._id_offsets = id_offsets
        self.id_rank = id_rank
        self._source_dir = source_dir
        self.layout = layout
        self._int_ids = int_ids  # "none" | "all" | "some" (then int_mask is the packed bit mask)
        self._int_mask = int_mask

    def __len__(self) -> int:
        return len(self._doc_offsets) - 1

    @property
    def nbytes(self) -> int:
        """Bytes the store occupies on disk (or in memory when it was built in memory)."""
        return (
            int(self._doc_offsets[-1] + self._id_offsets[-1]) + 8 * 2 * (len(self) + 1) + self.id_rank.nbytes
        )

    def doc_id(self, index: int) -> str:
        start, stop = int(self._id_offsets[index]), int(self._id_offsets[index + 1])
        text = bytes(self._ids[start:stop]).decode("utf-8")
        if self._int_ids == "none":
            return text
        if self._int_ids == "all" or (int(self._int_mask[index >> 3]) >> (7 - (index & 7))) & 1:  # type: ignore[index]
            return JsonIntId(text)
        return text

    def get(self, index: int, score: float = 0.0) -> Doc:
        """The passage at position ``index`` with ``score`` attached."""
        start, stop = int(self._doc_offsets[index]), int(self._doc_offsets[index + 1])
        body = bytes(self._docs[start:stop]).decode("utf-8")
        if self.layout >= 2:
            return doc_from_contents(self.doc_id(index), body, float(score))
        title, _, text = body.partition("\n")
        return Doc(id=self.doc_id(index), title=title, text=text, score=float(score))

    def get_many(
        self, indices: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
    ) -> list[Doc]:
        return [self.get(int(i), float(s)) for i, s in zip(indices, scores, strict=True)]

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the store's files into ``directory`` (hard-linked when the store already lives on disk)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._source_dir is not None:
            for name in _FILES + _OPTIONAL_FILES:
                source, target = self._source_dir / name, directory / name
                if not source.exists() or source.resolve() == target.resolve():
                    continue
                target.unlink(missing_ok=True)
                try:
                    os.link(source, target)
                except OSError:
                    shutil.copyfile(source, target)
            return
        (directory / "docs.bin").write_bytes(bytes(self._docs))
        (directory / "ids.bin").write_bytes(bytes(self._ids))
        np.save(directory / "docs.offsets.npy", np.asarray(self._doc_offsets))
        np.save(directory / "ids.offsets.npy", np.asarray(self._id_offsets))
        np.save(directory / "ids.rank.npy", np.asarray(self.id_rank))
        _write_layout(directory, self.layout, self._int_ids, self._int_mask)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], mmap_files: bool = True) -> DocStore:
        """Open a saved store; with ``mmap_files`` the files are mapped instead of read."""
        directory = Path(directory)
        missing = [name for name in _FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"passage store incomplete in {directory}: missing {', '.join(missing)}")
        mode = "r" if mmap_files else None
        layout, int_ids, int_mask = 1, "none", None
        if (directory / "store.json").is_file():
            meta = json.loads((directory / "store.json").read_text())
            layout, int_ids = int(meta["layout"]), str(meta.get("int_ids", "none"))
            if layout > _LAYOUT:
                raise ValueError(
                    f"passage store {directory} has layout {layout}; this tspo reads <= {_LAYOUT}"
                )
            if int_ids == "some":
                int_mask = np.load(directory / "ids.int.npy")
        return cls(
            docs=_map_or_read(directory / "docs.bin", mmap_files),
            doc_offsets=np.load(directory / "docs.offsets.npy", mmap_mode=mode),
            ids=_map_or_read(directory / "ids.bin", mmap_files),
            id_offsets=np.load(directory / "ids.offsets.npy", mmap_mode=mode),
            id_rank=np.load(directory / "ids.rank.npy", mmap_mode=mode),
            source_dir=directory,
            layout=layout,
            int_ids=int_ids,
            int_mask=int_mask,
        )


def _write_layout(directory: Path, layout: int, int_ids: str, int_mask: np.ndarray | None) -> None:
    if int_ids == "some":
        assert int_mask is not None
        np.save(directory / "ids.int.npy", np.asarray(int_mask))
    (directory / "store.json").write_text(json.dumps({"layout": layout, "int_ids": int_ids}) + "\n")


def _int_id_summary(positions: array, n: int) -> tuple[str, np.ndarray | None]:
    """(``"none" | "all" | "some"``, packed mask for "some") of the positions whose id was an integer."""
    if not positions:
        return "none", None
    if len(positions) == n:
        return "all", None
    mask = np.zeros(n, dtype=bool)
    mask[np.frombuffer(positions, dtype=np.int64)] = True
    return "some", np.packbits(mask)


def _map_or_read(path: Path, use_mmap: bool) -> ByteSource:
    if not use_mmap or path.stat().st_size == 0:  # an empty file cannot be mapped
        return path.read_bytes()
    with open(path, "rb") as handle:
        return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)


class DocStoreWriter:
    """Appends passages one at a time, to files in ``directory`` or to memory when it is ``None``."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._doc_offsets = array("q", [0])
        self._id_offsets = array("q", [0])
        self._docs_file: BinaryIO | None = None
        self._ids_file: BinaryIO | None = None
        self._docs_mem = bytearray()
        self._ids_mem = bytearray()
        self._int_positions = array("q")
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Kept open across add() calls and closed by finish() / abort().
            self._docs_file = open(self.directory / "docs.bin", "wb", buffering=1 << 20)  # noqa: SIM115
            self._ids_file = open(self.directory / "ids.bin", "wb", buffering=1 << 20)  # noqa: SIM115

    def __len__(self) -> int:
        return len(self._doc_offsets) - 1

    def add(self, doc: Doc) -> int:
        """Append ``doc``; return its position."""
        body = doc.contents.encode()
        key = doc.id.encode()
        if type(doc.id) is JsonIntId:
            self._int_positions.append(len(self._doc_offsets) - 1)
        if self._docs_file is not None and self._ids_file is not None:
            self._docs_file.write(body)
            self._ids_file.write(key)
        else:
            self._docs_mem += body
            self._ids_mem += key
        self._doc_offsets.append(self._doc_offsets[-1] + len(body))
        self._id_offsets.append(self._id_offsets[-1] + len(key))
        return len(self._doc_offsets) - 2

    def finish(self) -> DocStore:
        """Close the files, rank the ids and return the finished store."""
        doc_offsets = np.frombuffer(self._doc_offsets, dtype=np.int64).copy()
        id_offsets = np.frombuffer(self._id_offsets, dtype=np.int64).copy()
        int_ids, int_mask = _int_id_summary(self._int_positions, len(self))
        if self.directory is None:
            docs, ids = bytes(self._docs_mem), bytes(self._ids_mem)
            self._docs_mem, self._ids_mem = bytearray(), bytearray()
            rank = rank_ids(ids, id_offsets)
            return DocStore(docs, doc_offsets, ids, id_offsets, rank, int_ids=int_ids, int_mask=int_mask)
        assert self._docs_file is not None and self._ids_file is not None
        self._docs_file.close()
        self._ids_file.close()
        np.save(self.directory / "docs.offsets.npy", doc_offsets)
        np.save(self.directory / "ids.offsets.npy", id_offsets)
        ids_blob = _map_or_read(self.directory / "ids.bin", True)
        np.save(self.directory / "ids.rank.npy", rank_ids(ids_blob, id_offsets))
        _write_layout(self.directory, _LAYOUT, int_ids, int_mask)
        return DocStore.load(self.directory)

    def abort(self) -> None:
        """Close any open files (used when a build fails half-way)."""
        for handle in (self._docs_file, self._ids_file):
            if handle is not None and not handle.closed:
                handle.close()
