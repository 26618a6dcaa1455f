"""Index directories: the ``tspo_index.json`` manifest, atomic writes, and memory estimates.

Every saved index is a directory holding ``tspo_index.json`` (kind, passage count, parameters) next to
its backend's files and a :mod:`~tspo.retrieval.docstore`. Directories are written to a hidden sibling
and swapped in with ``os.replace``, so an interrupted save never leaves a half-written index where a
good one used to be.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tspo.files import atomic_directory as files_atomic_directory
from tspo.files import check_replaceable

__all__ = [
    "INDEX_MANIFEST",
    "atomic_directory",
    "check_index_target",
    "format_bytes",
    "read_manifest",
    "write_manifest",
]

INDEX_MANIFEST = "tspo_index.json"
FORMAT_VERSION = 1


def format_bytes(n: float) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as disk and RAM sizes are quoted)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    manifest = {"format": "tspo-index", "format_version": FORMAT_VERSION, **manifest}
    manifest.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (directory / INDEX_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a saved index; errors name the directory and what is wrong with it."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"index directory not found: {directory}")
    path = directory / INDEX_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"not a tspo index: {directory} has no {INDEX_MANIFEST} (build one with `tspo index build`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt index manifest {path}: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "tspo-index":
        raise ValueError(f"{path} is not a tspo index manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer tspo (format {manifest['format_version']}); upgrade tspo"
        )
    return manifest


_INDEX_KIND = "a tspo index directory"


def is_index_dir(path: Path) -> bool:
    """Whether ``path`` holds a tspo index (its manifest), so an index build may replace it."""
    return (path / INDEX_MANIFEST).exists()


def check_index_target(target: str | os.PathLike[str]) -> None:
    """Raise ``FileExistsError`` unless an index may be written at ``target`` (absent, empty, or an index)."""
    check_replaceable(target, is_index_dir, _INDEX_KIND)


@contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """:func:`tspo.files.atomic_directory` that replaces an existing ``target`` only if it is empty or a
    tspo index (never an unrelated folder)."""
    with files_atomic_directory(target, is_index_dir, _INDEX_KIND) as staging:
        yield staging
