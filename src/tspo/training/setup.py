"""Build what a run needs from its config: data, retriever, policy model, tokenizer and engine."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tspo.data.qa import QAExample, QAFormatError, read_qa_jsonl
from tspo.rollout.models import resolve_device
from tspo.runs import RunDir, looks_like_path
from tspo.training.config import TrainConfig

logger = logging.getLogger(__name__)


class ResourceError(RuntimeError):
    """A file, package or server a run needs is missing; the message says how to fix it."""


@dataclass
class RunResources:
    model: torch.nn.Module
    tokenizer: Any
    engine: Any
    retriever: Any
    train_examples: list[QAExample]
    rl_examples: list[QAExample]
    eval_examples: list[QAExample]
    pad_token_id: int
    device: torch.device
    bf16: bool
    corpus_path: Path | None


def use_bf16_autocast(setting: str, device: torch.device) -> bool:
    """Whether forward passes run under bf16 autocast (``trainer.bf16``); logs the decision and why.

    ``auto`` turns it on on a GPU with bf16 and on a CPU with hardware bf16 (AVX-512 BF16 or AMX), where
    it is several times faster than float32; see :func:`tspo.training.policy.decide_bf16_autocast`.
    """
    from tspo.training.policy import cpu_bf16_features, decide_bf16_autocast

    decision = decide_bf16_autocast(
        setting,
        device.type,
        cuda_bf16=device.type == "cuda" and torch.cuda.is_bf16_supported(),
        cpu_features=cpu_bf16_features() if device.type == "cpu" else (),
    )
    (logger.warning if decision.warn else logger.info)(
        "bf16 autocast %s: %s", "on" if decision.enabled else "off", decision.reason
    )
    return decision.enabled


def prepare_data(config: TrainConfig, run_dir: Path) -> tuple[list[QAExample], list[QAExample], Path | None]:
    """(train examples, held-out examples, corpus path) from the synthetic world or from files."""
    data = config.data
    if data.source == "world":
        from tspo.data.world import generate_world, write_world

        world_dir = RunDir(run_dir).world
        if not (world_dir / "corpus.jsonl").is_file():
            write_world(generate_world(data.world), world_dir)
        train_file, test_file, corpus = (
            world_dir / "train.jsonl",
            world_dir / "test.jsonl",
            world_dir / "corpus.jsonl",
        )
    else:
        if not data.train_file:
            raise ResourceError("data.source=files needs data.train_file=PATH (a QA JSONL file)")
        train_file = Path(data.train_file)
        test_file = Path(data.test_file) if data.test_file else None
        corpus = Path(data.corpus) if data.corpus else None
    for path in (train_file, test_file, corpus):
        if path is not None and not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "file not found"
            raise ResourceError(f"{what}: {path}")
    try:
        train = list(read_qa_jsonl(train_file))
        held_out = list(read_qa_jsonl(test_file)) if test_file is not None else []
    except QAFormatError as err:  # names file:line, as tspo eval does
        raise ResourceError(str(err)) from None
    if not train:
        raise ResourceError(f"{train_file} holds no training questions")
    if len(held_out) > data.eval_size:
        held_out = random.Random(config.trainer.seed).sample(held_out, data.eval_size)
    return train, held_out, corpus


def check_run_inputs(config: TrainConfig) -> None:
    """What can be checked in milliseconds, checked before any long step: the files and directories the
    config names exist, a model path is a path, and the optional packages it asks for are installed."""
    import importlib.util

    data, rc, trainer = config.data, config.retriever, config.trainer
    if data.source == "files":
        if not data.train_file:
            raise ResourceError("data.source=files needs data.train_file=PATH (a QA JSONL file)")
        for key, value in (
            ("train_file", data.train_file),
            ("test_file", data.test_file),
            ("corpus", data.corpus),
        ):
            if value and not Path(value).is_file():
                raise ResourceError(f"data.{key}: file not found: {value}")
    if rc.index and not Path(rc.index).exists():
        raise ResourceError(f"retriever index not found: {rc.index} (build one with `tspo index build`)")
    if rc.kind == "http" and not rc.url:
        raise ResourceError("retriever.kind=http needs retriever.url=http://HOST:PORT")
    policy = config.model.policy
    if policy != "tiny" and looks_like_path(policy) and not Path(policy).expanduser().exists():
        raise ResourceError(f"model.policy: model path not found: {policy} (a hub id looks like org/name)")
    wanted = [
        ("wandb", trainer.wandb_project is not None, "trainer.wandb_project is set", "wandb"),
        ("tensorboard", trainer.tensorboard, "trainer.tensorboard=true", "tensorboard"),
        ("peft", config.model.lora.enabled, "model.lora.enabled=true", "'tspo[lora]'"),
    ]
    for module, asked, why, package in wanted:
        if asked and importlib.util.find_spec(module) is None:
            raise ResourceError(f"{why} but {module} is not installed: pip install {package}")


def build_retriever(config: TrainConfig, corpus: Path | None) -> Any:
    """The run's retriever through the one factory (:func:`tspo.retrieval.load_retriever`); the checks
    here only word its errors in the config's keys."""
    from tspo.retrieval import RetrieverSpec, load_retriever

    rc = config.retriever
    if rc.kind == "http" and not rc.url:
        raise ResourceError("retriever.kind=http needs retriever.url=http://HOST:PORT")
    if rc.index and not Path(rc.index).exists():
        raise ResourceError(f"retriever index not found: {rc.index} (build one with `tspo index build`)")
    if rc.kind == "dense" and not rc.index:
        raise ResourceError("retriever.kind=dense needs a prebuilt retriever.index (see `tspo index build`)")
    if rc.kind == "bm25" and not rc.index and corpus is None:
        raise ResourceError(
            "an in-process BM25 index needs a corpus: set data.corpus=PATH or retriever.index"
        )
    spec = RetrieverSpec(
        kind=rc.kind,
        index=str(rc.index) if rc.index else None,
        corpus=str(corpus) if corpus is not None and not rc.index else None,
        url=rc.url if rc.kind == "http" else None,
        cache_size=rc.cache_size,
    )
    from tspo.retrieval.base import RetrievalUnavailableError

    try:
        return load_retriever(spec)
    except (ValueError, FileNotFoundError) as err:  # a corpus line's file:line error included
        raise ResourceError(str(err)) from None
    except RetrievalUnavailableError as err:
        raise ResourceError(f"retriever.url: {err}") from None


def _world_texts(train: list[QAExample], corpus: Path | None) -> list[str]:
    """Texts the tiny model's word-level tokenizer is trained on: the corpus and the questions."""
    from tspo.retrieval import read_corpus

    texts = [doc.contents for doc in read_corpus(corpus)] if corpus is not None else []
    texts.extend(ex.question for ex in train)
    texts.extend(gold for ex in train for gold in ex.golds)
    return texts


def build_policy(
    config: TrainConfig, run_dir: Path, train: list[QAExample], corpus: Path | None, device: torch.device
) -> tuple[Any, Any]:
    """Load (or, for ``tiny``, build once and load) the policy model and tokenizer."""
    from tspo.rollout import ModelLoadError, build_tiny_model, load_policy

    spec = config.model.policy
    if spec == "tiny":
        tiny_dir = RunDir(run_dir).tiny_model
        if not (tiny_dir / "config.json").is_file():
            tc = config.model.tiny
            build_tiny_model(
                _world_texts(train, corpus),
                tiny_dir,
                hidden_size=tc.hidden_size,
                num_layers=tc.num_layers,
                num_heads=tc.num_heads,
                intermediate_size=tc.intermediate_size,
                max_position_embeddings=config.rollout.max_context_tokens,
                seed=config.trainer.seed,
                protocol=config.rollout.protocol,
                overwrite=True,
            )
        spec = str(tiny_dir)
    try:
        model, tokenizer = load_policy(spec, dtype=config.model.dtype, device=device)
    except ModelLoadError as err:
        raise ResourceError(str(err)) from None
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if config.model.lora.enabled:
        try:
            from peft import LoraConfig as PeftLoraConfig
            from peft import get_peft_model
        except ImportError:
            raise ResourceError("model.lora.enabled=true needs peft: pip install 'tspo[lora]'") from None
        lc = config.model.lora
        model = get_peft_model(
            model,
            PeftLoraConfig(
                r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules)
            ),
        )
    return model, tokenizer


def split_demonstrations(
    config: TrainConfig, train: list[QAExample]
) -> tuple[list[QAExample], list[QAExample]]:
    """(demonstration questions, RL questions): a seeded sample of ``warmstart.demos`` training
    questions, and the rest when RL excludes them (``warmstart.rl_prompts``), else all of them.

    The split depends only on the seed and the data, so a resumed run, or RL runs that share one
    warm-started model, draw from the same questions.
    """
    ws = config.warmstart
    picked = random.Random(config.trainer.seed).sample(range(len(train)), min(ws.demos, len(train)))
    demos = [train[i] for i in picked]
    if not ws.excludes_demos:
        return demos, train
    chosen = set(picked)
    rest = [ex for i, ex in enumerate(train) if i not in chosen]
    if not rest:
        raise ResourceError(
            f"warmstart.demos={ws.demos} uses all {len(train)} training questions and RL excludes them: "
            "lower warmstart.demos or set warmstart.rl_prompts=all"
        )
    return demos, rest


def world_renamer(config: TrainConfig, world_dir: Path | None) -> Any:
    """The entity renamer of ``warmstart.rename_entities``: every name word of the world's entities."""
    from tspo.data.world import load_world
    from tspo.data.world.names import name_words
    from tspo.training.renaming import EntityRenamer

    if config.data.source != "world" or world_dir is None:
        raise ResourceError(
            "warmstart.rename_entities=true needs data.source=world: the entity names come from world.json"
        )
    world = load_world(world_dir, verify=False)
    return EntityRenamer(
        name_words(entity.name for entity in world.entities.values()), seed=config.trainer.seed
    )


def run_warm_start(
    config: TrainConfig,
    model: Any,
    tokenizer: Any,
    retriever: Any,
    pool: list[QAExample],
    world_dir: Path | None = None,
) -> None:
    """The configured supervised warm start on demonstrations of the ``pool`` questions; ``world_dir``
    (the synthetic world's directory) is needed only to rename entities."""
    from tspo.training.warmstart import build_demonstrations, warm_start

    ws = config.warmstart
    renamer = world_renamer(config, world_dir) if ws.rename_entities else None
    demos = build_demonstrations(
        pool,
        tokenizer,
        retriever,
        config.rollout,
        copies=ws.copies,
        renamer=renamer,
        early_answer_fraction=ws.early_answer_fraction,
        seed=config.trainer.seed,
    )
    if not demos:
        raise ResourceError("warmstart.steps > 0 but no training example has a metadata.chain to demonstrate")
    warm_start(
        model,
        tokenizer,
        demos,
        steps=ws.steps,
        learning_rate=ws.learning_rate,
        warmup_steps=ws.warmup_steps,
        batch_size=ws.batch_size,
        seed=config.trainer.seed,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )


def build_resources(config: TrainConfig, run_dir: Path, checkpoint: Path | None = None) -> RunResources:
    """Everything a run needs; the warm start runs only on a fresh start (a checkpoint already has it)."""
    from tspo.rollout import make_engine

    device = resolve_device(config.model.device)
    train, held_out, corpus = prepare_data(config, run_dir)
    retriever = build_retriever(config, corpus)
    model, tokenizer = build_policy(config, run_dir, train, corpus, device)
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    demo_pool, rl_examples = split_demonstrations(config, train)
    if checkpoint is None and config.warmstart.steps > 0:
        run_warm_start(config, model, tokenizer, retriever, demo_pool, corpus.parent if corpus else None)
    engine = make_engine("hf", model=model, tokenizer=tokenizer)
    return RunResources(
        model=model,
        tokenizer=tokenizer,
        engine=engine,
        retriever=retriever,
        train_examples=train,
        rl_examples=rl_examples,
        eval_examples=held_out,
        pad_token_id=pad_token_id,
        device=device,
        bf16=use_bf16_autocast(config.trainer.bf16, device),
        corpus_path=corpus,
    )
