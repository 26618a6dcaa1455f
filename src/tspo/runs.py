"""The run directory (``tspo train``'s ``trainer.output_dir``) as one object: its layout, its checkpoints
and its identity.

Layout::

    RUN_DIR/run.json                      the run's identity: {"run_id": ..., "created": ...}
    RUN_DIR/config.yaml                   the resolved config
    RUN_DIR/metrics.jsonl                 one JSON object per logged step
    RUN_DIR/checkpoints/step-XXXXXXXX/    complete checkpoints (``checkpoint.json`` marks one complete)
    RUN_DIR/reference/                    the warm-started initial policy (the KL reference)
    RUN_DIR/plots/                        PNG curves
    RUN_DIR/world/                        the synthetic world (data.source=world)
    RUN_DIR/tiny_model/                   the tiny policy (model.policy=tiny)
    RUN_DIR/few_shot_examples.json        the run's worked examples (``tspo eval`` reuses them)
    RUN_DIR/eval/<checkpoint>/            ``tspo eval --model RUN_DIR`` outputs
    RUN_DIR/analysis/                     ``tspo analyze`` outputs
    RUN_DIR/tensorboard/, wandb_run_id.txt optional metric sinks

The identity is created when a run starts and stored in ``run.json``; every checkpoint's manifest
carries it, so ``tspo eval`` can tell new weights at an old path from the ones it already evaluated.
Nothing else in tspo spells these names. No torch here: evaluation and analysis read runs (and their
``metrics.jsonl``, :func:`read_metrics`) without the trainer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

IDENTITY_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_MANIFEST = "checkpoint.json"
REFERENCE_DIR = "reference"
PLOTS_DIR = "plots"
WORLD_DIR = "world"
TINY_MODEL_DIR = "tiny_model"
FEW_SHOT_FILE = "few_shot_examples.json"
EVAL_DIR = "eval"
HELDOUT_DIR = "heldout"
ANALYSIS_DIR = "analysis"
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"
PREVIOUS_RUN_DIR = ".previous-run"

#: Every entry a run writes at its top level; ``--overwrite`` removes these and nothing else, so a run
#: pointed at a directory that also holds other files never deletes them.
RUN_ENTRIES = (
    IDENTITY_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    CHECKPOINTS_DIR,
    REFERENCE_DIR,
    PLOTS_DIR,
    WORLD_DIR,
    TINY_MODEL_DIR,
    FEW_SHOT_FILE,
    EVAL_DIR,
    HELDOUT_DIR,
    ANALYSIS_DIR,
    TENSORBOARD_DIR,
    WANDB_ID_FILE,
)
#: What marks a directory as holding a run (a lone ``world/`` or ``eval/`` does not).
_RUN_MARKERS = (IDENTITY_FILE, CONFIG_FILE, METRICS_FILE, CHECKPOINTS_DIR)
_ROTATED_METRICS = re.compile(rf"^{re.escape(METRICS_FILE)}\.old-.+$")
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (another run in it, nothing to resume, ...)."""


def checkpoint_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path: str | Path) -> int | None:
    """The step encoded in a checkpoint directory's name (``step-00000042`` -> 42), else ``None``."""
    match = _STEP_DIR.match(Path(path).name)
    return int(match.group(1)) if match else None


def read_manifest(checkpoint: str | Path) -> dict[str, Any]:
    """A checkpoint's ``checkpoint.json`` (empty when missing or unreadable)."""
    try:
        manifest = json.loads((Path(checkpoint) / CHECKPOINT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


@dataclass(frozen=True)
class RunDir:
    """One run directory; the properties are its paths (nothing is created by reading them)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root).expanduser())

    # ------------------------------------------------------------------ layout
    @property
    def identity_file(self) -> Path:
        return self.root / IDENTITY_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    @property
    def reference(self) -> Path:
        return self.root / REFERENCE_DIR

    @property
    def plots(self) -> Path:
        return self.root / PLOTS_DIR

    @property
    def world(self) -> Path:
        return self.root / WORLD_DIR

    @property
    def tiny_model(self) -> Path:
        return self.root / TINY_MODEL_DIR

    @property
    def few_shot(self) -> Path:
        return self.root / FEW_SHOT_FILE

    @property
    def heldout(self) -> Path:
        """The trainer's held-out answers: one JSONL record per question and decoding, per evaluation."""
        return self.root / HELDOUT_DIR

    def heldout_file(self, tag: str, decoding: str) -> Path:
        """``heldout/<tag>-<decoding>.jsonl`` (``tag``: ``before``, ``after``, ``step-00000010``)."""
        return self.heldout / f"{tag}-{decoding}.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / TENSORBOARD_DIR

    @property
    def wandb_id_file(self) -> Path:
        return self.root / WANDB_ID_FILE

    def eval_dir(self, checkpoint: str | Path) -> Path:
        """Where ``tspo eval`` writes the results of one of this run's checkpoints."""
        return self.root / EVAL_DIR / Path(checkpoint).name

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_dir_name(step)

    # ------------------------------------------------------------------ what is there
    def is_run(self) -> bool:
        """Whether a run was started here (``tspo eval --model`` takes it as a run directory)."""
        return self.config.is_file() or self.identity_file.is_file()

    def holds_run(self) -> bool:
        """Whether anything a run writes that a fresh run would mix with is present."""
        return self.root.is_dir() and any((self.root / name).exists() for name in _RUN_MARKERS)

    def list_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest step first (temp and half-written directories excluded)."""
        if not self.checkpoints.is_dir():
            return []
        found = [
            entry
            for entry in self.checkpoints.iterdir()
            if checkpoint_step(entry) is not None
            and entry.is_dir()
            and (entry / CHECKPOINT_MANIFEST).is_file()
        ]
        return sorted(found, key=lambda path: checkpoint_step(path) or 0)

    def latest_checkpoint(self) -> Path | None:
        """The complete checkpoint with the highest step, or ``None``."""
        found = self.list_checkpoints()
        return found[-1] if found else None

    def pick_checkpoint(self, which: str | None = None) -> Path:
        """The checkpoint ``which`` names: ``None`` (the latest), a step number, a ``step-…`` name or a
        path; raises :class:`RunDirError` listing the complete ones when it is not among them."""
        available = self.list_checkpoints()
        if which is None:
            if not available:
                raise RunDirError(
                    f"run directory {self.root} has no complete checkpoint under {self.checkpoints}"
                )
            return available[-1]
        if which.isdigit():
            wanted = self.checkpoint(int(which))
        elif Path(which).is_dir():
            wanted = Path(which)
        else:
            wanted = self.checkpoints / which
        if wanted.resolve() not in {c.resolve() for c in available}:
            names = ", ".join(c.name for c in available) or "none"
            raise RunDirError(
                f"checkpoint {which!r} not found in {self.root} (complete checkpoints: {names})"
            )
        return wanted

    @classmethod
    def of_checkpoint(cls, path: str | Path) -> RunDir | None:
        """The run a checkpoint directory belongs to, or ``None`` when it is not inside one."""
        path = Path(path)
        if path.parent.name != CHECKPOINTS_DIR:
            return None
        run = cls(path.parent.parent)
        return run if run.is_run() else None

    # ------------------------------------------------------------------ identity
    def run_id(self) -> str | None:
        """The identity stored in ``run.json`` (``None`` for a run made before identities existed)."""
        try:
            data = json.loads(self.identity_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        value = data.get("run_id") if isinstance(data, dict) else None
        return str(value) if value else None

    def _create_identity(self) -> str:
        from tspo.files import atomic_write_text

        run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(self.identity_file, json.dumps({"run_id": run_id, "created": created}) + "\n")
        return run_id

    def start(self, mode: Literal["fresh", "overwrite", "resume"] = "fresh") -> str:
        """Claim the directory for a run and return its identity; call before any long work.

        ``fresh`` refuses a directory that holds another run; ``overwrite`` first removes what a run
        writes (:data:`RUN_ENTRIES`, nothing else); ``resume`` needs a complete checkpoint and keeps the
        stored identity (creating one for a run made before identities existed).
        """
        if mode == "resume":
            if self.latest_checkpoint() is None:
                where = self.checkpoints if self.root.is_dir() else self.root
                raise RunDirError(
                    f"--resume: no complete checkpoint to continue from in {where}; "
                    "check the directory, or start a fresh run without --resume"
                )
            return self.run_id() or self._create_identity()
        if mode == "overwrite":
            self.stash_previous()
        elif self.holds_run():
            what = f"run {self.run_id()}" if self.run_id() else "another run"
            raise RunDirError(
                f"{self.root} holds {what} ({self._describe()}); pass --resume to continue it, "
                "--overwrite to delete it and start again, or pick another output directory"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        return self._create_identity()

    def _describe(self) -> str:
        checkpoints = self.list_checkpoints()
        if checkpoints:
            return f"checkpoints up to step {checkpoint_step(checkpoints[-1])}"
        present = [name for name in _RUN_MARKERS if (self.root / name).exists()]
        return ", ".join(present) or "run files"

    def _run_entries(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [
            entry
            for entry in self.root.iterdir()
            if entry.name in RUN_ENTRIES or _ROTATED_METRICS.match(entry.name)
        ]

    def clear(self) -> None:
        """Remove every entry a run writes (rotated metrics logs included); other files stay."""
        for entry in self._run_entries():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    @property
    def stash(self) -> Path:
        """Where ``--overwrite`` keeps the previous run until the new one has set up."""
        return self.root / PREVIOUS_RUN_DIR

    def stash_previous(self) -> None:
        """Move the previous run's entries aside (:attr:`stash`); :meth:`drop_previous` deletes them once
        the new run is set up, :meth:`abandon` puts them back if it fails first."""
        entries = self._run_entries()
        if not entries:
            return
        if self.stash.exists():  # left by a process killed during setup: that run is still the previous one
            self.clear()
            self._restore_stash()
            entries = self._run_entries()
        self.stash.mkdir()
        for entry in entries:
            entry.rename(self.stash / entry.name)

    def drop_previous(self) -> None:
        """Delete the stashed previous run (the new run is set up and replaces it)."""
        if self.stash.exists():
            shutil.rmtree(self.stash)

    def abandon(self) -> None:
        """Undo a run whose setup failed: remove what it wrote and put back the run it was replacing, so
        the directory is as before (and a corrected rerun needs neither --resume nor --overwrite)."""
        self.clear()
        self._restore_stash()

    def _restore_stash(self) -> None:
        if not self.stash.exists():
            return
        for entry in self.stash.iterdir():
            entry.rename(self.root / entry.name)
        self.stash.rmdir()


def weights_identity(model: str | Path) -> str:
    """What identifies the weights ``model`` names, for keying evaluation results.

    A checkpoint of a run with an identity: ``<run_id>/step-XXXXXXXX``. Any other local path: a hash of
    its weight files' names, sizes and modification times (cheap for multi-GB models, and it changes
    whenever a file is rewritten). A hub id or alias: the name itself.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        run_id = read_manifest(path).get("run_id")
        if run_id:
            return f"{run_id}/{path.name}"
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    elif path.is_file():
        files = [path]
    else:
        return str(model)
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(
            f"{file.relative_to(path) if path.is_dir() else file.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode()
        )
    return f"files:{digest.hexdigest()[:16]}"


def looks_like_path(spec: str) -> bool:
    """Whether a model argument means a local path rather than a hub id (``org/name``).

    A path starts with ``/``, ``.``, ``~`` or ``runs/``, has more than one ``/``, uses a backslash, or
    begins with a local directory's name; a hub id has at most one ``/`` and no such start.
    """
    if spec.startswith(("/", ".", "~", "runs/")) or "\\" in spec or spec.count("/") > 1:
        return True
    head = spec.split("/", 1)[0]
    return "/" in spec and Path(head).is_dir()


# --------------------------------------------------------------------------------------------- metrics.jsonl
class MetricsFileError(ValueError):
    """A metrics.jsonl line that is not a JSON object with an integer ``step`` (names the line)."""


# --------------------------------------------------------------------------------------------- reading
def _metrics_path(path_or_run_dir: str | Path) -> Path:
    path = Path(path_or_run_dir)
    return path / METRICS_FILE if path.is_dir() else path


def parse_metrics_lines(path: Path, text: str) -> tuple[list[dict[str, Any]], list[str], bool]:
    """Parse a metrics file. Returns (records, their raw lines, whether a truncated last line was dropped).

    A last line that is not newline-terminated and does not parse is what a run killed mid-write leaves
    behind: it is dropped. Any other bad line is an error naming its line number.
    """
    lines = text.split("\n")
    last_terminated = lines[-1] == ""
    if last_terminated:
        lines.pop()
    records: list[dict[str, Any]] = []
    raw: list[str] = []
    truncated = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        is_unterminated_tail = number == len(lines) and not last_terminated
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if is_unterminated_tail:
                truncated = True
                break
            raise MetricsFileError(f"{path}:{number}: malformed JSON line ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise MetricsFileError(f"{path}:{number}: expected a JSON object with an integer 'step'")
        records.append(record)
        raw.append(line)
    return records, raw, truncated


def read_metrics(path_or_run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` (given the file or its run directory), in file order.

    Raises ``FileNotFoundError`` naming the path, or :class:`MetricsFileError` with the line number of a
    malformed line. A truncated final line (the run was killed while writing it) is skipped with a warning.
    """
    path = _metrics_path(path_or_run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file: {path}")
    records, _, truncated = parse_metrics_lines(path, path.read_text(encoding="utf-8", errors="replace"))
    if truncated:
        logger.warning("%s: skipped a truncated last line (the run was interrupted while writing it)", path)
    return records
