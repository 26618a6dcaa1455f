"""Atomic output, the one implementation tspo uses: write to a temporary sibling, then ``os.replace`` it
over the target.

A reader never sees a half-written file or directory, and an interrupted writer leaves the previous
version (if any) untouched. :class:`StagedOutputs` extends this to a group of files that should appear
together; :func:`atomic_directory` to a directory (an index, a model). Checkpoints add fsync and an
atomic exchange on top (``tspo.training.checkpoint``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A fresh, empty temporary file next to ``path`` (same filesystem, so ``os.replace`` is atomic).

    Created with mode 0o666 minus the umask, like a plain ``open(path, "w")`` (``mkstemp`` would make the
    published file private to its owner).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"could not create a temporary file next to {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is removed.

    ``durable``: fsync the file before the rename and the directory after it, so the new content
    survives a power loss (logs a resumed run depends on), not only a crash of this process.
    """
    target = Path(path)
    if target.is_dir():  # os.replace would fail only after the whole file was written
        raise IsADirectoryError(21, "Is a directory", str(target))
    temporary = temporary_sibling(target)
    try:
        yield temporary
        if durable:
            fsync_path(temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(target.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, durable: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path, durable=durable) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or directory (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StagedOutputs:
    """Several output files that are published together at :meth:`commit`.

    Each :meth:`stage` call returns a temporary path next to its final destination. Nothing is visible
    under the final names until :meth:`commit`; :meth:`abort` (or leaving the ``with`` block with an
    exception) deletes every temporary file and leaves existing outputs as they were.
    """

    def __init__(self) -> None:
        self._pending: dict[Path, Path] = {}

    def stage(self, final: str | os.PathLike[str]) -> Path:
        final_path = Path(final)
        if final_path in self._pending:
            raise ValueError(f"output {final_path} is staged twice")
        temporary = temporary_sibling(final_path)
        self._pending[final_path] = temporary
        return temporary

    @property
    def finals(self) -> list[Path]:
        return list(self._pending)

    def commit(self) -> list[Path]:
        published = []
        for final, temporary in self._pending.items():
            os.replace(temporary, final)
            published.append(final)
        self._pending.clear()
        return published

    def abort(self) -> None:
        for temporary in self._pending.values():
            temporary.unlink(missing_ok=True)
        self._pending.clear()

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # Anything not committed by now (error, interrupt, or a forgotten commit) is discarded.
        self.abort()


# --------------------------------------------------------------------------------------------- directories
def publish_directory(staging: Path, target: Path) -> None:
    """Move the finished ``staging`` directory into place as ``target``, replacing an old one.

    A reader sees either the old directory or the complete new one, never half of it. ``mkdtemp`` makes
    private (0700) directories, so the published one first gets the usual mode (0777 minus the umask).
    """
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, trash / target.name)
        os.replace(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, target)


def check_replaceable(
    target: str | os.PathLike[str],
    is_ours: Callable[[Path], bool] | None = None,
    kind: str = "an empty directory",
) -> None:
    """Raise ``FileExistsError`` unless ``target`` is absent, an empty directory, or a directory
    ``is_ours`` accepts (never an unrelated folder or a file); ``kind`` names what may be replaced in the
    message. Cheap: call it before long work."""
    target = Path(target)
    if not target.exists():
        return
    if not target.is_dir() or (any(target.iterdir()) and not (is_ours is not None and is_ours(target))):
        raise FileExistsError(f"refusing to overwrite {target}: it exists and is not {kind}")


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike[str],
    is_ours: Callable[[Path], bool] | None = None,
    kind: str = "an empty directory",
) -> Iterator[Path]:
    """Yield a fresh staging directory that replaces ``target`` when the block succeeds.

    An existing ``target`` is replaced only if :func:`check_replaceable` allows it. On failure the staging
    directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    check_replaceable(target, is_ours, kind)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        publish_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
