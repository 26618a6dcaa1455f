"""``tspo eval``: evaluate a checkpoint on QA sets (greedy, batched, resumable); see docs/evaluation.md."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

OUTPUT_FILES = ("trajectories.jsonl", "eval_settings.json", "results.json", "results.md")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model or run on QA datasets (EM / sub-EM / F1 per dataset)",
        description=(
            "Roll out one trajectory per question (greedy by default) with the training rollout and reward "
            "code and report per-dataset EM, sub-EM, F1, searches, trajectory categories, invalid-action and "
            "truncation rates. Writes OUT/trajectories.jsonl (one record per question, appended batch by "
            "batch), OUT/results.md and OUT/results.json. Rerunning the same command resumes: finished "
            "questions are skipped. With --model RUN_DIR the run's latest checkpoint, rollout settings, "
            "retriever and held-out file are the defaults."
        ),
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        required=True,
        help="run directory (latest checkpoint), checkpoint directory, HF id, local model directory, "
        ".gguf file or 'smollm2'",
    )
    model.add_argument("--checkpoint", help="with a run directory: a step number or step-XXXXXXXX name")
    model.add_argument(
        "--engine", choices=("hf", "vllm"), default="hf", help="generation engine (default hf)"
    )
    model.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1' (hf engine)")
    model.add_argument(
        "--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"), help="weights dtype"
    )

    data = parser.add_argument_group("questions")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--data", nargs="+", metavar="FILE", help="QA JSONL file(s) (FlashRAG layout)")
    source.add_argument("--data-dir", metavar="DIR", help="a `tspo data prepare --out` or world directory")
    data.add_argument("--datasets", help="only these datasets, comma-separated (e.g. nq,hotpotqa)")
    data.add_argument("--subsample", type=int, metavar="N", help="N questions per dataset (seeded)")
    data.add_argument("--seed", type=int, default=0, help="subsample (and sampling) seed (default 0)")

    retrieval = parser.add_argument_group("retriever (default: the run's own)")
    retrieval.add_argument("--retriever", choices=("bm25", "dense", "http"), help="backend kind")
    retrieval.add_argument("--corpus", metavar="FILE", help="corpus JSONL indexed in-process with BM25")
    retrieval.add_argument("--index", metavar="DIR", help="saved index directory (`tspo index build`)")
    retrieval.add_argument("--url", help="retrieval server, e.g. http://127.0.0.1:8000")
    retrieval.add_argument("--token", help="bearer token of the retrieval server")
    retrieval.add_argument("--cache-size", type=int, help="LRU entries of (query, k) results (0: none)")

    rollout = parser.add_argument_group("rollout (default: the run's, else Search-R1's)")
    rollout.add_argument("--max-turns", type=int, help="searches before the final answer-only turn")
    rollout.add_argument("--topk", type=int, help="passages per search")
    rollout.add_argument("--max-new-tokens", type=int, help="tokens per generation")
    rollout.add_argument("--max-observation-tokens", type=int, help="tokens per observation")
    rollout.add_argument("--max-context-tokens", type=int, help="prompt + response tokens")
    rollout.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    rollout.add_argument("--top-p", type=float, help="nucleus mass when sampling")
    rollout.add_argument(
        "--chat-template",
        choices=("on", "off"),
        help="wrap the instruction in the tokenizer's chat template (default: the run's, else on)",
    )

    scoring = parser.add_argument_group("scoring (default: the run's, else em / whole_word)")
    scoring.add_argument("--metric", choices=("em", "sub_em", "f1"), help="outcome o used for categories")
    scoring.add_argument("--hit-mode", choices=("whole_word", "substring"), help="FOLR hit rule")

    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", help="output directory (default RUN_DIR/eval/<checkpoint>)")
    output.add_argument("--batch-size", type=int, default=32, help="questions per batch (default 32)")
    output.add_argument("--overwrite", action="store_true", help="discard earlier results in --out")
    output.add_argument("--save-tokens", action="store_true", help="also store token ids in the records")
    output.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Refuse a second ``tspo eval`` writing into the same directory at the same time."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    from tspo.errors import CLIError

    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".eval.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CLIError(
                f"another tspo eval is writing to {out_dir}; wait for it or pick another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rollout_config(args: argparse.Namespace, base: Any) -> Any:
    import dataclasses

    changes: dict[str, Any] = {"temperature": args.temperature}
    for name in (
        "max_turns",
        "topk",
        "max_new_tokens",
        "max_observation_tokens",
        "max_context_tokens",
        "top_p",
    ):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value
    if args.chat_template is not None:
        changes["protocol"] = dataclasses.replace(base.protocol, use_chat_template=args.chat_template == "on")
    return dataclasses.replace(base, **changes)


def _with_run_examples(config: Any, run_dir: Path) -> Any:
    """The run's few-shot examples (``rollout.protocol.examples``) in every prompt, as in training."""
    from tspo.errors import CLIError
    from tspo.runs import RunDir
    from tspo.training.prompts import worked_examples_from_json

    if config.protocol.examples <= 0:
        return config
    path = RunDir(run_dir).few_shot
    if not path.is_file():
        raise CLIError(
            f"the run uses rollout.protocol.examples={config.protocol.examples} but {path} is missing; "
            "evaluating it zero-shot would not measure what it learned"
        )
    shots = worked_examples_from_json(json.loads(path.read_text(encoding="utf-8"))["examples"])
    config.protocol = config.protocol.with_worked_examples(shots)
    return config


def _retriever_spec(args: argparse.Namespace, source: Any) -> Any:
    from tspo.errors import CLIError
    from tspo.evaluation.sources import run_retriever_spec
    from tspo.retrieval import RetrieverSpec

    given = [name for name in ("corpus", "index", "url") if getattr(args, name)]
    if len(given) > 1:
        raise CLIError(f"give one retriever source, not {' and '.join('--' + g for g in given)}")
    if given:
        allowed = {"corpus": ("bm25",), "index": ("bm25", "dense"), "url": ("http",)}[given[0]]
        if args.retriever and args.retriever not in allowed:
            raise CLIError(
                f"--retriever {args.retriever} cannot use --{given[0]} (it takes {', '.join(allowed)})"
            )
        kind = args.retriever or {"corpus": "bm25", "index": "auto", "url": "http"}[given[0]]
        spec = RetrieverSpec(
            kind=kind, corpus=args.corpus, index=args.index, url=args.url, token=args.token, cache_size=0
        )
    elif args.retriever == "http":
        raise CLIError("--retriever http needs --url http://HOST:PORT")
    elif source.run_dir is not None:
        spec = run_retriever_spec(source.run_config, source.run_dir)
        if args.retriever and args.retriever != spec.kind:
            raise CLIError(f"--retriever {args.retriever} needs --corpus, --index or --url")
    else:
        raise CLIError("no retriever: pass --corpus FILE (in-process BM25), --index DIR or --url URL")
    if args.cache_size is not None:
        spec.cache_size = args.cache_size
    return spec


def _questions(args: argparse.Namespace, source: Any) -> tuple[list[Path], Any]:
    from tspo.errors import CLIError
    from tspo.evaluation.sources import canonical_datasets, data_dir_files, run_heldout_files

    datasets = canonical_datasets(args.datasets)
    if args.data:
        files = [Path(f) for f in args.data]
    elif args.data_dir:
        files = data_dir_files(args.data_dir, datasets)
    elif source.run_dir is not None:
        files = run_heldout_files(source.run_config, source.run_dir)
    else:
        raise CLIError("no questions: pass --data FILE.jsonl or --data-dir DIR")
    return files, datasets


def run(args: argparse.Namespace) -> int:
    from tspo.configuration import ConfigError, to_dict
    from tspo.data.qa import QAFormatError
    from tspo.errors import CLIError
    from tspo.evaluation.records import RecordFormatError
    from tspo.evaluation.runner import EvalSettingsMismatch, check_settings, run_evaluation
    from tspo.evaluation.selection import select_examples
    from tspo.evaluation.sources import (
        EvalSourceError,
        describe_retriever,
        load_model,
        load_questions,
        resolve_model,
        run_rollout_config,
        run_scoring,
    )
    from tspo.rollout import ModelLoadError, RolloutConfig, make_engine

    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.subsample is not None and args.subsample < 1:
        raise CLIError(f"--subsample must be >= 1, got {args.subsample}")
    try:
        source = resolve_model(args.model, args.checkpoint)
        run_config = source.run_config or {}
        base_rollout = run_rollout_config(run_config) if source.run_dir is not None else RolloutConfig()
        rollout_config = _rollout_config(args, base_rollout)
        if source.run_dir is not None:
            rollout_config = _with_run_examples(rollout_config, source.run_dir)
        metric, hit_mode = run_scoring(run_config)
        metric, hit_mode = args.metric or metric, args.hit_mode or hit_mode
        retriever_spec = _retriever_spec(args, source)
        files, datasets = _questions(args, source)
        groups = select_examples(load_questions(files, datasets), args.subsample, args.seed)
    except (EvalSourceError, ConfigError, QAFormatError, FileNotFoundError, ValueError) as err:
        raise CLIError(str(err)) from None
    examples = [ex for group in groups.values() for ex in group]
    out_dir = Path(args.out) if args.out else source.default_out_dir

    settings = {
        "model": source.label,
        "weights": source.weights,
        "engine": args.engine,
        "rollout": to_dict(rollout_config),
        "metric": metric,
        "hit_mode": hit_mode,
        "retriever": describe_retriever(retriever_spec),
        "save_tokens": args.save_tokens,
    }
    if rollout_config.temperature > 0:
        settings["seed"] = args.seed
    description = {
        "model": source.label,
        "run": str(source.run_dir) if source.run_dir else None,
        "data": ", ".join(str(f) for f in files),
        "questions": {name: len(group) for name, group in groups.items()},
        "subsample": f"{args.subsample} per dataset, seed {args.seed}" if args.subsample else "all",
        "decoding": "greedy"
        if rollout_config.temperature == 0
        else f"temperature {rollout_config.temperature}",
        "rollout": (
            f"max_turns={rollout_config.max_turns} topk={rollout_config.topk} "
            f"max_new_tokens={rollout_config.max_new_tokens} "
            f"max_observation_tokens={rollout_config.max_observation_tokens} "
            f"max_context_tokens={rollout_config.max_context_tokens}"
        ),
        "scoring": f"metric={metric} hit_mode={hit_mode}",
        "retriever": json.dumps(describe_retriever(retriever_spec)),
    }

    with _exclusive(out_dir):
        if args.overwrite:
            for name in OUTPUT_FILES:
                (out_dir / name).unlink(missing_ok=True)
        try:
            check_settings(out_dir, settings)  # before loading anything heavy
        except EvalSettingsMismatch as err:
            raise CLIError(str(err)) from None

        from tspo.retrieval import load_retriever

        try:
            retriever = load_retriever(retriever_spec)
        except (ValueError, FileNotFoundError, OSError) as err:
            raise CLIError(f"cannot open the retriever: {err}") from None
        try:
            if args.engine == "vllm":
                # The engine resolves 'smollm2' and .gguf paths to the converted checkpoint and loads
                # the tokenizer from there (load_tokenizer would not know the alias).
                engine = make_engine("vllm", model=source.spec)
                tokenizer = engine.tokenizer
            else:
                model, tokenizer = load_model(source, dtype=args.dtype, device=args.device)
                engine = make_engine("hf", model=model, tokenizer=tokenizer)
        except (ModelLoadError, EvalSourceError, ImportError) as err:
            raise CLIError(str(err)) from None

        print(
            f"evaluating {source.label} on {len(examples)} question(s) "
            f"({', '.join(f'{n}: {len(g)}' for n, g in groups.items())}) -> {out_dir}",
            file=sys.stderr,
        )
        try:
            report = run_evaluation(
                engine,
                tokenizer,
                retriever,
                examples,
                rollout_config,
                out_dir,
                batch_size=args.batch_size,
                metric=metric,
                hit_mode=hit_mode,
                seed=args.seed,
                include_tokens=args.save_tokens,
                settings=settings,
                description=description,
                progress=not args.no_progress and sys.stderr.isatty(),
            )
        except (EvalSettingsMismatch, RecordFormatError) as err:
            raise CLIError(str(err)) from None
        except KeyboardInterrupt:
            print(
                f"interrupted: finished batches are saved in {out_dir / 'trajectories.jsonl'}; "
                "rerun the same command to resume",
                file=sys.stderr,
            )
            raise

    print(report.format_table())
    print()
    print(
        f"questions : {len(report.records)} ({report.evaluated} evaluated now, {report.resumed} resumed) "
        f"in {report.seconds:.1f} s"
    )
    for name, path in report.files.items():
        print(f"{name:11s}: {path}")
    return 0
