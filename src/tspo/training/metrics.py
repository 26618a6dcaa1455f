"""Per-step metric sinks (DESIGN section 8): JSONL always, TensorBoard and Weights & Biases when asked.

``RUN_DIR/metrics.jsonl`` holds one JSON object per :meth:`MetricsLogger.log` call::

    {"step": 12, "time": 1767225600.5, "reward/mean": 0.41, "outcome/mean": 0.38, ...}

``time`` is the Unix time of the call. Several lines may share a step (e.g. the training metrics and the
final evaluation). Non-finite floats are written as ``null`` so every line is strict JSON. Each line is
flushed and fsynced as it is written, so a killed run loses at most the line being written; that
truncated line is dropped (with a warning) when the file is read or a run resumes. The key names the
trainer logs are listed in docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from tspo.files import atomic_write_text

# Reading lives with the run directory (evaluation and analysis read runs without the trainer);
# MetricsFileError and read_metrics stay importable from here, their old home.
from tspo.runs import (  # noqa: F401
    METRICS_FILE,
    TENSORBOARD_DIR,
    WANDB_ID_FILE,
    MetricsFileError,
    parse_metrics_lines,
    read_metrics,
)

logger = logging.getLogger(__name__)

_RESERVED = ("step", "time")

MetricValue = float | int | str | bool | None


# --------------------------------------------------------------------------------------------- writing
def _plain(key: str, value: Any) -> MetricValue:
    """A JSON-ready scalar: numpy / torch 0-d values become Python numbers, NaN and inf become None."""
    if hasattr(value, "item") and callable(value.item):  # numpy scalar, 0-d array or tensor
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            raise TypeError(
                f"metric {key!r} is not a scalar (shape {getattr(value, 'shape', '?')})"
            ) from None
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    raise TypeError(f"metric {key!r} has type {type(value).__name__}; expected a number or a string")


class MetricsLogger:
    """Write per-step metrics to ``RUN_DIR/metrics.jsonl`` and, when asked, TensorBoard and W&B.

    Args:
        run_dir: the run directory (created if missing).
        tensorboard: also write TensorBoard event files under ``RUN_DIR/tensorboard``.
        wandb_project: also log to this Weights & Biases project (needs ``pip install wandb``). The W&B
            run id is kept in ``RUN_DIR/wandb_run_id.txt`` so a resumed run continues the same W&B run.
        run_name: display name for W&B (default: the run directory's name).
        config: the run's configuration, recorded by W&B and as TensorBoard text.
        resume_from_step: the step of the checkpoint a resumed run starts from. Records with a larger
            step (logged after that checkpoint, before the crash) are dropped, so the resumed run has
            no duplicated or missing steps. ``None`` starts a fresh log: an existing ``metrics.jsonl``
            is kept under ``metrics.jsonl.old-<time>`` rather than mixed with the new run.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        resume_from_step: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.resume_from_step = resume_from_step
        self._closed = False
        self._wandb_run: Any = None
        self._tb_writer: Any = None
        if wandb_project is not None:
            self._wandb_run = self._start_wandb(wandb_project, run_name or self.run_dir.name, config)
        self._prepare_file()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            self._tb_writer = self._start_tensorboard(config)

    # ------------------------------------------------------------------ setup
    def _prepare_file(self) -> None:
        """Repair or rotate an existing metrics file before appending to it."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        if self.resume_from_step is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            rotated = self.path.with_name(f"{METRICS_FILE}.old-{stamp}")
            counter = 1
            while rotated.exists():
                counter += 1
                rotated = self.path.with_name(f"{METRICS_FILE}.old-{stamp}-{counter}")
            os.replace(self.path, rotated)
            logger.warning(
                "%s already existed and this run is not resuming; moved it to %s", self.path, rotated
            )
            return
        text = self.path.read_text(encoding="utf-8", errors="replace")
        records, raw, truncated = parse_metrics_lines(self.path, text)
        kept = [
            line for line, record in zip(raw, records, strict=True) if record["step"] <= self.resume_from_step
        ]
        if truncated:
            logger.warning(
                "%s: dropped a truncated last line (the run was killed while writing it)", self.path
            )
        dropped = len(raw) - len(kept)
        if dropped:
            logger.info(
                "%s: dropped %d record(s) logged after step %d (resuming from that checkpoint)",
                self.path,
                dropped,
                self.resume_from_step,
            )
        new_text = "".join(line + "\n" for line in kept)
        if new_text != text:
            atomic_write_text(self.path, new_text, durable=True)

    def _start_tensorboard(self, config: Mapping[str, Any] | None) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a crashed run wrote after the checkpoint it resumes from.
        purge_step = self.resume_from_step + 1 if self.resume_from_step is not None else None
        writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge_step)
        if config is not None and purge_step is None:
            writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)
        return writer

    def _start_wandb(self, project: str, name: str, config: Mapping[str, Any] | None) -> Any:
        try:
            import wandb
        except ImportError:
            raise ImportError(
                f"Weights & Biases logging was asked for (project {project!r}) but wandb is not installed: "
                "pip install wandb"
            ) from None
        id_file = self.run_dir / WANDB_ID_FILE
        if self.resume_from_step is not None and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = wandb.util.generate_id()
            atomic_write_text(id_file, run_id + "\n", durable=True)
        return wandb.init(
            project=project,
            name=name,
            id=run_id,
            resume="allow",
            config=dict(config) if config is not None else None,
            dir=str(self.run_dir),
        )

    # ------------------------------------------------------------------ logging
    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append one record; numbers (Python, numpy or 0-d torch) and strings are accepted."""
        if self._closed:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} is closed")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        for reserved in _RESERVED:
            if reserved in metrics:
                raise ValueError(f"metric name {reserved!r} is reserved (it is added to every record)")
        values = {str(key): _plain(str(key), value) for key, value in metrics.items()}
        record = {"step": int(step), "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb_writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):  # strings and nulls have no scalar curve
                    self._tb_writer.add_scalar(key, float(value), int(step))
            self._tb_writer.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(
                {key: value for key, value in values.items() if value is not None}, step=int(step)
            )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._file.close()
        if self._tb_writer is not None:
            self._tb_writer.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
