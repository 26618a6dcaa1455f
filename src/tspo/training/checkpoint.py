"""Atomic, resumable training checkpoints (DESIGN section 8).

A checkpoint is a directory ``RUN_DIR/checkpoints/step-00000042`` holding::

    config.json, model.safetensors, ...   the policy (``save_pretrained``); for a peft model only the
                                          adapter (adapter_config.json, adapter_model.safetensors)
    tokenizer.json, ...                   the tokenizer (``save_pretrained``), when one is given
    optimizer.pt, scheduler.pt            ``state_dict()`` of each (loadable with ``weights_only=True``)
    rng.pt                                python ``random``, numpy, torch CPU (and CUDA) generator states
    trainer_state.json                    ``{"step": ..., **trainer_state}`` (data order, counters, ...)
    checkpoint.json                       manifest: format, step, model kind, base model, file sizes

Model and tokenizer sit at the top level, so ``AutoModelForCausalLM.from_pretrained(ckpt)`` (or
``PeftModel.from_pretrained(base, ckpt)``) opens a checkpoint directly.

Writes are atomic: everything goes to ``checkpoints/.tmp-step-…-<random>``, every file and directory is
fsynced, and only then is the directory renamed to ``step-…``. A run killed mid-save leaves the previous
checkpoints untouched and at worst a ``.tmp-*`` directory that :func:`list_checkpoints` never reports and
the next successful save deletes. ``checkpoint.json`` is written last and is what marks a directory as
complete. Pruned checkpoints are first renamed to ``.tmp-*`` and only then deleted, so a half-deleted
directory never looks complete either.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import random
import secrets
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tspo import runs
from tspo.runs import CHECKPOINT_MANIFEST as MANIFEST
from tspo.runs import CHECKPOINTS_DIR, RunDir, checkpoint_dir_name

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
FORMAT_VERSION = 1

_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not fit the model it is loaded into."""


# --------------------------------------------------------------------------------------------- listing
# The run directory's layout (tspo.runs) decides what a checkpoint is called and which ones are complete.
def checkpoint_step(path: str | Path) -> int:
    """The step encoded in a checkpoint directory's name (``step-00000042`` -> 42)."""
    step = runs.checkpoint_step(path)
    if step is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected a name like step-00000042)")
    return step


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest step first (temp and half-written directories excluded)."""
    return RunDir(run_dir).list_checkpoints()


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or ``None`` when the run has none."""
    return RunDir(run_dir).latest_checkpoint()


# --------------------------------------------------------------------------------------------- saving
def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    trainer_state: Mapping[str, Any],
    keep_last: int = 3,
    run_id: str | None = None,
) -> Path:
    """Write ``RUN_DIR/checkpoints/step-{step:08d}`` atomically and prune old checkpoints.

    Args:
        model: a ``transformers`` ``PreTrainedModel`` or a ``peft`` ``PeftModel`` (only the adapter is
            saved; the manifest notes the base model it needs).
        tokenizer: saved with ``save_pretrained``; ``None`` to skip.
        optimizer, scheduler: their ``state_dict()`` is saved; ``None`` to skip.
        trainer_state: JSON-serialisable state (data-loader position, counters, ...); ``step`` is added.
        keep_last: complete checkpoints kept after the save (the one just written always survives);
            ``0`` keeps all.
        run_id: the run's identity (:meth:`tspo.runs.RunDir.start`), stored in the manifest so that
            results keyed by it (``tspo eval``) never mix two runs' weights saved at one path.

    An existing checkpoint for the same step is replaced atomically. Returns the checkpoint path.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    if "step" in trainer_state and trainer_state["step"] != step:
        raise ValueError(f"trainer_state['step']={trainer_state['step']!r} disagrees with step={step}")
    state_text = _trainer_state_json({**trainer_state, "step": step})

    root = RunDir(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    final = RunDir(run_dir).checkpoint(step)
    tmp = root / f"{_TMP_PREFIX}{checkpoint_dir_name(step)}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        unwrapped = _unwrap(model)
        with _quiet_transformers():
            unwrapped.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        torch.save(_capture_rng(), tmp / RNG_FILE)
        (tmp / TRAINER_STATE).write_text(state_text, encoding="utf-8")
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            **({"run_id": run_id} if run_id else {}),
            **_model_note(unwrapped),
            "files": _file_sizes(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    _prune(root, keep_last=keep_last, keep=final)
    logger.info("saved checkpoint %s", final)
    return final


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-shard progress bar, which would break the trainer's own bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _trainer_state_json(state: Mapping[str, Any]) -> str:
    try:
        return json.dumps(state, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        bad = [key for key, value in state.items() if not _json_ok(value)]
        raise ValueError(f"trainer_state is not JSON-serialisable ({err}); offending keys: {bad}") from None


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _unwrap(model: Any) -> Any:
    """The model under ``torch.compile`` / DDP wrappers (they do not have ``save_pretrained``)."""
    while not hasattr(model, "save_pretrained"):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(
                f"{type(model).__name__} has no save_pretrained (need a transformers or peft model)"
            )
        model = inner
    return model


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _model_note(model: Any) -> dict[str, Any]:
    if _is_peft(model):
        config = model.peft_config[model.active_adapter]
        base = (
            config.base_model_name_or_path
            or getattr(model.get_base_model().config, "_name_or_path", "")
            or None
        )
        return {"model_kind": "peft", "adapters": sorted(model.peft_config), "base_model": base}
    config = getattr(model, "config", None)
    return {
        "model_kind": "full",
        "model_class": type(model).__name__,
        "base_model": getattr(config, "_name_or_path", None) or None,
    }


def _file_sizes(root: Path) -> dict[str, int]:
    return {
        path.relative_to(root).as_posix(): path.stat().st_size
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != MANIFEST
    }


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if sys.platform == "win32":  # directories cannot be opened for fsync there
        return
    _fsync_file(path)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            _fsync_file(path)
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_dir(path)
    _fsync_dir(root)


def _install(tmp: Path, final: Path) -> None:
    """Move the finished temp directory to its final name; atomically swap out an existing one."""
    if not final.exists():
        os.rename(tmp, final)
        return
    if _exchange(tmp, final):  # final now holds the new checkpoint, tmp the old one
        shutil.rmtree(tmp, ignore_errors=True)
        return
    # No atomic exchange on this platform/filesystem: move the old one aside (it becomes a .tmp-* that
    # is never listed), then install the new one. A crash between the two renames loses only that step.
    aside = final.with_name(f"{_TMP_PREFIX}replaced-{final.name}-{secrets.token_hex(4)}")
    os.rename(final, aside)
    os.rename(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: the filesystem cannot exchange
        return False
    raise OSError(errno, os.strerror(errno), str(a), None, str(b))


def _prune(root: Path, *, keep_last: int, keep: Path) -> None:
    """Delete stale temp directories and the oldest complete checkpoints beyond ``keep_last``."""
    for entry in root.iterdir():
        if entry.name.startswith(_TMP_PREFIX) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
    if keep_last == 0:
        return
    others = [path for path in list_checkpoints(root.parent) if path != keep]
    doomed = others[: max(0, len(others) - (keep_last - 1))]  # the just-written one counts as one kept
    for path in doomed:
        # Rename first: a half-deleted directory must never look like a complete checkpoint.
        trash = path.with_name(f"{_TMP_PREFIX}pruned-{path.name}-{secrets.token_hex(4)}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        logger.debug("pruned checkpoint %s", path)
    if doomed:
        _fsync_dir(root)


# --------------------------------------------------------------------------------------------- RNG
def _capture_rng() -> dict[str, Any]:
    """Generator states as tensors / plain containers, so ``torch.load(weights_only=True)`` reads them."""
    version, internal, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: Mapping[str, Any], path: Path) -> None:
    try:
        py = state["python"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
        np_state = state["numpy"]
        np.random.set_state(
            (
                np_state["kind"],
                np_state["keys"].numpy().astype(np.uint32),
                np_state["pos"],
                np_state["has_gauss"],
                np_state["cached_gaussian"],
            )
        )
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: RNG state is malformed ({err})") from None
    cuda_states = state.get("cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "%s holds CUDA RNG states for %d devices but %d are visible; CUDA RNG not restored",
                path,
                len(cuda_states),
                torch.cuda.device_count(),
            )


# --------------------------------------------------------------------------------------------- loading
def load_checkpoint(
    path: str | Path,
    model: Any,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into existing objects and return its trainer state (``{"step": ..., ...}``).

    Weights are copied into ``model`` in place: the full state dict for a plain model, the adapter
    weights for a peft model. Optimizer and scheduler states are loaded when those are given; RNG states
    when ``restore_rng``. Raises :class:`CheckpointError` naming the path when a file is missing, has the
    wrong size, cannot be parsed, or does not fit the model.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    unwrapped = _unwrap(model)
    kind = manifest.get("model_kind")
    if kind == "peft" and not _is_peft(unwrapped):
        raise CheckpointError(
            f"{path} holds a peft adapter but the model is not a PeftModel (wrap the base first)"
        )
    if kind == "full" and _is_peft(unwrapped):
        raise CheckpointError(f"{path} holds a full model but the model given is a PeftModel")
    if kind == "peft":
        _load_adapter(path, unwrapped, manifest)
    else:
        _load_full_weights(path, unwrapped)
    if optimizer is not None:
        _load_into(path / OPTIMIZER_FILE, optimizer, "optimizer")
    if scheduler is not None:
        _load_into(path / SCHEDULER_FILE, scheduler, "scheduler")
    if restore_rng:
        _restore_rng(_torch_load(path / RNG_FILE), path / RNG_FILE)
    state_path = path / TRAINER_STATE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {state_path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{state_path} is not valid JSON ({err})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{state_path} must be a JSON object with a 'step' key")
    return state


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if (path / CHECKPOINTS_DIR).is_dir():
            raise CheckpointError(
                f"{path} is a run directory, not a checkpoint; use latest_checkpoint({str(path)!r})"
            )
        raise CheckpointError(f"{path} is not a complete checkpoint: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path} is corrupt ({err})") from None
    for name, size in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file missing: {file}")
        actual = file.stat().st_size
        if actual != size:
            raise CheckpointError(
                f"checkpoint file {file} is {actual} bytes, the manifest says {size}: corrupt"
            )
    return manifest


def _torch_load(file: Path) -> Any:
    if not file.is_file():
        raise CheckpointError(f"checkpoint file missing: {file}")
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read {file}: {err}") from None


def _load_into(file: Path, target: Any, what: str) -> None:
    state = _torch_load(file)
    try:
        target.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"{file} does not fit this {what}: {err}") from None


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as err:
        raise CheckpointError(f"cannot read {file}: {err}") from None


def _model_weight_files(path: Path) -> list[Path]:
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index_path = path / "model.safetensors.index.json"
    if not index_path.is_file():
        raise CheckpointError(f"checkpoint file missing: {single} (nor a sharded {index_path.name})")
    try:
        shards = sorted(set(json.loads(index_path.read_text(encoding="utf-8"))["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{index_path} is corrupt ({err})") from None
    return [path / shard for shard in shards]


@contextlib.contextmanager
def _open_safetensors(file: Path) -> Iterator[Any]:
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:
        raise CheckpointError(f"cannot read {file}: {err}") from None
    with handle as opened:
        yield opened


def _load_full_weights(path: Path, model: Any) -> None:
    """Copy saved weights into ``model`` tensor by tensor (peak extra memory: one tensor)."""
    files = _model_weight_files(path)
    saved_shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with _open_safetensors(file) as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                saved_shapes[key] = tuple(handle.get_slice(key).get_shape())
    current = model.state_dict()
    unexpected = sorted(set(saved_shapes) - set(current))
    # save_pretrained stores a tied parameter once; the other name shares its storage.
    loaded_storage = {current[key].data_ptr() for key in saved_shapes if key in current}
    missing = sorted(
        k for k in set(current) - set(saved_shapes) if current[k].data_ptr() not in loaded_storage
    )
    if unexpected or missing:
        # Some architectures are stored in a different on-disk layout (transformers weight conversions);
        # let transformers read it, then copy the result in place.
        logger.info("%s: on-disk keys differ from the model's; loading through from_pretrained", path)
        try:
            fresh = type(model).from_pretrained(str(path), dtype=next(model.parameters()).dtype)
            model.load_state_dict(fresh.state_dict(), strict=True)
        except Exception as err:
            raise CheckpointError(
                f"{path} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]} ({err})"
            ) from None
        return
    for key, shape in saved_shapes.items():
        if tuple(current[key].shape) != shape:
            raise CheckpointError(
                f"{path}: weight {key} has shape {shape}, the model expects {tuple(current[key].shape)}"
            )
    with torch.no_grad():
        for file in files:
            with _open_safetensors(file) as handle:
                for key in handle.keys():  # noqa: SIM118
                    try:
                        tensor = handle.get_tensor(key)
                    except Exception as err:
                        raise CheckpointError(f"cannot read {key} from {file}: {err}") from None
                    current[key].copy_(tensor)


def _load_adapter(path: Path, model: Any, manifest: Mapping[str, Any]) -> None:
    from peft.utils import set_peft_model_state_dict

    adapters = manifest.get("adapters") or [model.active_adapter]
    for name in adapters:
        if name not in model.peft_config:
            raise CheckpointError(f"{path} holds adapter {name!r}; the model has {sorted(model.peft_config)}")
        # peft's layout: the default adapter at the top level, any other in a subdirectory of its name.
        folder = path if name == "default" else path / name
        weights = _read_safetensors(folder / "adapter_model.safetensors")
        result = set_peft_model_state_dict(model, weights, adapter_name=name)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        adapter_missing = [key for key in getattr(result, "missing_keys", []) or [] if f".{name}." in key]
        if unexpected or adapter_missing:
            raise CheckpointError(
                f"{folder} does not fit this peft model: unexpected {unexpected[:5]}, missing {adapter_missing[:5]}"
            )
