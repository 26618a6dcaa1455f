"""What ``tspo eval`` evaluates: the model (run directory, checkpoint, HF id, path, GGUF), the questions and
the retriever, with a run directory's own settings as defaults.

A run directory (``tspo train``, :class:`tspo.runs.RunDir`) holds ``config.yaml`` and
``checkpoints/step-XXXXXXXX/``. Evaluating it
takes the newest complete checkpoint and, unless told otherwise, the run's rollout settings (protocol,
limits), its scoring rule (``reward.metric``, ``reward.hit_mode``), its retriever and its held-out file
(``world/test.jsonl`` for the synthetic world, ``data.test_file`` otherwise). The run's config is read as
plain YAML (no dependency on the trainer).
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tspo.configuration import from_dict, read_yaml
from tspo.data.qa import DATASETS, QAExample, find_split_file, read_qa_jsonl, resolve_dataset
from tspo.retrieval import RetrieverSpec
from tspo.rollout import RolloutConfig
from tspo.runs import RunDir, RunDirError, looks_like_path, read_manifest, weights_identity

logger = logging.getLogger(__name__)


class EvalSourceError(ValueError):
    """A model, data file or retriever that ``tspo eval`` cannot use; the message says which and why."""


@dataclass
class ModelSource:
    """A resolved ``--model``.

    Attributes:
        spec: what :func:`tspo.rollout.load_policy` loads (a directory, a HF id, a .gguf file, ``smollm2``).
        label: where the weights are (absolute path or hub id), shown with the results.
        weights: what the weights are (:func:`tspo.runs.weights_identity`): results are keyed by it, so
            new weights saved at an old path are never reported with the old results.
        run_dir: the training run it comes from, if any.
        checkpoint: the checkpoint directory, if any.
        run_config: the run's ``config.yaml`` as a mapping (empty when not from a run).
        adapter_base: for a LoRA checkpoint, the base model the adapter is applied to.
    """

    spec: str
    label: str
    weights: str = ""
    run_dir: Path | None = None
    checkpoint: Path | None = None
    run_config: dict[str, Any] | None = None
    adapter_base: str | None = None

    @property
    def default_out_dir(self) -> Path:
        """``RUN_DIR/eval/<checkpoint>`` for a run, else ``eval/<model name>``."""
        if self.run_dir is not None and self.checkpoint is not None:
            return RunDir(self.run_dir).eval_dir(self.checkpoint)
        is_path = Path(self.spec).exists() or self.spec.startswith(("/", ".", "~"))
        is_path = is_path or self.spec.lower().endswith(".gguf")
        name = Path(self.spec).name if is_path else self.spec  # a hub id keeps its organisation
        name = re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE)
        return Path("eval") / re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def _adapter_base(checkpoint: Path, run_dir: Path | None, run_config: dict[str, Any]) -> str | None:
    if not (checkpoint / "adapter_config.json").is_file():
        return None
    policy = run_config.get("model", {}).get("policy")
    if policy == "tiny" and run_dir is not None:
        return str(RunDir(run_dir).tiny_model)
    if policy:
        return str(policy)
    base = read_manifest(checkpoint).get("base_model")
    if not base:
        raise EvalSourceError(f"{checkpoint} is a LoRA adapter but its base model is not recorded")
    return str(base)


def resolve_model(spec: str, checkpoint: str | None = None) -> ModelSource:
    """Resolve ``--model`` (and ``--checkpoint``): a run directory, one of its checkpoints, or any model
    :func:`tspo.rollout.load_policy` takes."""
    path = Path(spec).expanduser()
    run = RunDir(path)
    if run.is_run():
        try:
            ckpt = run.pick_checkpoint(checkpoint)
        except RunDirError as err:
            raise EvalSourceError(str(err)) from None
    elif path.is_dir() and (owner := RunDir.of_checkpoint(path)) is not None:
        run, ckpt = owner, path
    else:
        if checkpoint is not None:
            raise EvalSourceError(f"--checkpoint needs --model to be a run directory; {spec} is not one")
        if path.is_dir() and not (path / "config.json").is_file():
            raise EvalSourceError(
                f"{path} is neither a model directory (no config.json) nor a run directory "
                f"(no {run.config.name})"
            )
        if not path.exists() and looks_like_path(spec):
            raise EvalSourceError(f"model path not found: {path} (a hub id looks like org/name)")
        label = str(path.resolve()) if path.exists() else spec
        return ModelSource(spec=label, label=label, weights=weights_identity(label))
    run_config = read_yaml(run.config)
    return ModelSource(
        spec=str(ckpt),
        label=str(ckpt.resolve()),
        weights=weights_identity(ckpt),
        run_dir=run.root,
        checkpoint=ckpt,
        run_config=run_config,
        adapter_base=_adapter_base(ckpt, run.root, run_config),
    )


def load_model(source: ModelSource, *, dtype: str = "auto", device: str = "auto") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for ``source``; a LoRA checkpoint is merged into its base model."""
    from tspo.rollout import load_policy

    if source.adapter_base is None:
        return load_policy(source.spec, dtype=dtype, device=device)
    try:
        from peft import PeftModel
    except ImportError:
        raise EvalSourceError(
            f"{source.spec} is a LoRA adapter; loading it needs peft (pip install peft)"
        ) from None
    from tspo.rollout.models import load_tokenizer

    model, tokenizer = load_policy(source.adapter_base, dtype=dtype, device=device)
    model = PeftModel.from_pretrained(model, source.spec).merge_and_unload()
    if (Path(source.spec) / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(source.spec)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


# --------------------------------------------------------------------------------------------- run settings
def run_rollout_config(run_config: dict[str, Any]) -> RolloutConfig:
    """The run's ``rollout`` section as a :class:`RolloutConfig` (defaults where it is silent)."""
    return from_dict(RolloutConfig, run_config.get("rollout") or {}, prefix="rollout.")


def run_scoring(run_config: dict[str, Any]) -> tuple[str, str]:
    """``(metric, hit_mode)`` of the run's ``reward`` section."""
    reward = run_config.get("reward") or {}
    return str(reward.get("metric", "em")), str(reward.get("hit_mode", "whole_word"))


def _world_dir(run_config: dict[str, Any], run_dir: Path) -> Path | None:
    return RunDir(run_dir).world if (run_config.get("data") or {}).get("source", "world") == "world" else None


def run_heldout_files(run_config: dict[str, Any], run_dir: Path) -> list[Path]:
    """The run's held-out QA file: ``RUN_DIR/world/test.jsonl`` or ``data.test_file``."""
    world = _world_dir(run_config, run_dir)
    if world is not None:
        return [world / "test.jsonl"]
    test_file = (run_config.get("data") or {}).get("test_file")
    if not test_file:
        raise EvalSourceError(f"run {run_dir} has no data.test_file; pass --data FILE or --data-dir DIR")
    return [Path(test_file)]


def run_retriever_spec(run_config: dict[str, Any], run_dir: Path) -> RetrieverSpec:
    """The retriever the run trained with (server URL, saved index, or in-process BM25 on its corpus)."""
    section = run_config.get("retriever") or {}
    kind = section.get("kind", "bm25")
    cache_size = int(section.get("cache_size", 0) or 0)
    if kind == "http":
        return RetrieverSpec(kind="http", url=section.get("url"), cache_size=cache_size)
    if section.get("index"):
        return RetrieverSpec(kind=kind, index=str(section["index"]), cache_size=cache_size)
    world = _world_dir(run_config, run_dir)
    corpus = world / "corpus.jsonl" if world is not None else (run_config.get("data") or {}).get("corpus")
    if not corpus:
        raise EvalSourceError(f"run {run_dir} names no corpus or index; pass --corpus, --index or --url")
    return RetrieverSpec(kind="bm25", corpus=str(corpus), cache_size=cache_size)


def describe_retriever(spec: RetrieverSpec) -> dict[str, Any]:
    """What identifies a retriever's results (stored with the results; checked on resume)."""
    if spec.url and spec.kind in ("http", "auto") and not spec.index:
        return {"kind": "http", "url": spec.url}
    if spec.index:
        kind = spec.kind
        if kind == "auto":
            from tspo.retrieval.index_io import read_manifest

            # A broken index is reported when the retriever is opened.
            with contextlib.suppress(OSError, ValueError):
                kind = str(read_manifest(spec.index).get("kind", "auto"))
        return {"kind": kind, "index": str(Path(spec.index).resolve())}
    return {"kind": "bm25", "corpus": str(Path(spec.corpus).resolve()) if spec.corpus else None}


# --------------------------------------------------------------------------------------------- questions
def data_dir_files(directory: str | Path, datasets: list[str] | None = None) -> list[Path]:
    """QA files of a prepared directory (``tspo data prepare --out``) or a world directory.

    Without ``datasets``: ``DIR/test.jsonl`` (every evaluation set) when present, else each registered
    dataset's evaluation split found as ``DIR/<dataset>/<split>.jsonl``. With ``datasets``: their files,
    falling back to ``DIR/test.jsonl`` (filtered later) when one is missing.
    """
    root = Path(directory)
    if not root.is_dir():
        raise EvalSourceError(f"data directory not found: {root}")
    combined = root / "test.jsonl"
    if datasets is None and combined.is_file():
        return [combined]
    found, missing = [], []
    for name in datasets or list(DATASETS):
        split = DATASETS[name].eval_split if name in DATASETS else "test"
        path = find_split_file(root, name, split)
        if path is not None:
            found.append(path)
        elif datasets is not None:
            missing.append(f"{name}/{split}.jsonl")
    if missing and combined.is_file():
        return [combined]
    if missing or not found:
        wanted = ", ".join(missing) if missing else "test.jsonl or <dataset>/<split>.jsonl"
        raise EvalSourceError(f"{root}: no evaluation file found (looked for {wanted})")
    return found


def canonical_datasets(text: str | None) -> list[str] | None:
    """``"nq,2wiki"`` -> ``["nq", "2wikimultihopqa"]`` (registry aliases resolved; unknown names kept)."""
    if not text:
        return None
    names = []
    for part in text.split(","):
        name = part.strip()
        if not name:
            continue
        try:
            names.append(resolve_dataset(name).name)
        except ValueError:
            names.append(name)
    return names or None


def load_questions(files: list[Path], datasets: list[str] | None = None) -> list[QAExample]:
    """Every question of ``files`` (a record without a ``dataset`` gets its file's stem), optionally only
    those of ``datasets``. Missing files and malformed lines raise errors naming the file (and line)."""
    from dataclasses import replace

    examples: list[QAExample] = []
    for path in files:
        if not Path(path).is_file():
            raise EvalSourceError(f"QA file not found: {path}")
        stem = Path(path).name.split(".")[0]
        for example in read_qa_jsonl(path):
            examples.append(example if example.dataset else replace(example, dataset=stem))
    if datasets is not None:
        wanted = set(datasets)
        examples = [ex for ex in examples if ex.dataset in wanted]
        present = {ex.dataset for ex in examples}
        absent = [name for name in datasets if name not in present]
        if absent:
            raise EvalSourceError(
                f"no question of dataset(s) {', '.join(absent)} in {', '.join(map(str, files))}"
            )
    if not examples:
        raise EvalSourceError(f"no question found in {', '.join(map(str, files))}")
    return examples
