"""``tspo world``: generate the synthetic search world, measure it, show some of its questions."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import typing
from pathlib import Path


def _config_options(parser: argparse.ArgumentParser) -> None:
    """One ``--option`` per ``WorldConfig`` field, with the field's help (so the two never drift apart)."""
    from tspo.data.world.config import WorldConfig

    hints = typing.get_type_hints(WorldConfig)
    for field in dataclasses.fields(WorldConfig):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        args = typing.get_args(hint)
        help_text = field.metadata.get("help", "")
        if field.default is not None:
            help_text += f" (default: {field.default})"
        kwargs: dict[str, typing.Any] = {"default": None, "help": help_text}
        if typing.get_origin(hint) is typing.Literal:
            kwargs["choices"] = list(args)
        elif hint is float:
            kwargs["type"] = float
        elif hint is int or int in args:
            kwargs["type"] = int
        parser.add_argument(flag, dest=field.name, **kwargs)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "world",
        help="synthetic search world: generate, stats, show",
        description="The deterministic synthetic search world (invented people, places and organisations).",
    )
    commands = parser.add_subparsers(dest="world_command", metavar="ACTION")

    generate = commands.add_parser(
        "generate",
        help="write corpus.jsonl, train.jsonl, test.jsonl and world.json",
        description="Generate a world; the same options and seed always give the same bytes.",
    )
    generate.add_argument("--out", required=True, help="output directory")
    generate.add_argument("--overwrite", action="store_true", help="replace a world already in --out")
    _config_options(generate)
    generate.set_defaults(handler=run_generate)

    stats = commands.add_parser(
        "stats",
        help="counts, BM25 recall@k of every hop of the intended chains, leak checks",
        description="Build BM25 over the world's corpus and issue every question's intended searches.",
    )
    stats.add_argument("directory", help="a directory written by `tspo world generate`")
    stats.add_argument("--k", type=int, default=3, help="passages retrieved per query (default: 3)")
    stats.add_argument("--json", dest="json_path", help="also write the numbers to this JSON file")
    stats.set_defaults(handler=run_stats)

    show = commands.add_parser("show", help="print some questions with their chain and passages")
    show.add_argument("directory", help="a directory written by `tspo world generate`")
    show.add_argument("-n", type=int, default=5, help="questions to show (default: 5)")
    show.add_argument("--split", choices=["train", "test"], default="train")
    show.add_argument("--hops", type=int, choices=[1, 2, 3], help="only questions with this many hops")
    show.set_defaults(handler=run_show)

    parser.set_defaults(handler=lambda args: parser.print_help() or 0)


def run_generate(args: argparse.Namespace) -> int:
    from tspo.data.world import WorldConfig, generate_world, write_world
    from tspo.errors import CLIError

    overrides = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(WorldConfig)
        if getattr(args, field.name) is not None
    }
    try:
        config = WorldConfig(**overrides)
    except ValueError as err:
        raise CLIError(str(err)) from None
    out = Path(args.out)
    if (out / "world.json").exists() and not args.overwrite:
        raise CLIError(f"{out} already holds a world; pass --overwrite to replace it")
    foreign = [
        name
        for name in ("corpus.jsonl", "train.jsonl", "test.jsonl")
        if (out / name).exists() and not (out / "world.json").exists()
    ]
    if foreign and not args.overwrite:  # e.g. `tspo data prepare` output: never replaced silently
        raise CLIError(
            f"{out} already holds {', '.join(foreign)} that no world wrote; pass --overwrite to replace "
            "them, or pick another directory"
        )
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a directory")
    started = time.perf_counter()
    world = generate_world(config)
    generated = time.perf_counter() - started
    write_world(world, out)
    summary = world.summary
    print(f"world written to {out} (seed {config.seed}, size {config.size}) in {generated:.2f}s")
    entities = summary["entities"]
    print(
        f"  entities  : {entities['person']} people, {entities['city']} cities, "
        f"{entities['country']} countries, {entities['org']} organisations"
    )
    print(f"  passages  : {summary['passages']}")
    for split in ("train", "test"):
        drawn, requested = summary["questions"][split], summary["requested"][split]
        cells = ", ".join(f"{hops}-hop {n}" for hops, n in drawn.items())
        print(f"  {split:9s} : {sum(drawn.values())} questions ({cells})")
        short = {h: requested[h] - drawn[h] for h in requested if drawn[h] < requested[h]}
        if short:
            missing = ", ".join(f"{n} {h}-hop" for h, n in short.items())
            print(f"  warning   : the world has too few {split} questions: {missing} short of the request")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from tspo.data.world import WorldFormatError, format_stats, load_world, world_stats
    from tspo.errors import CLIError
    from tspo.files import atomic_path

    if args.k < 1:
        raise CLIError(f"--k must be >= 1, got {args.k}")
    try:
        world = load_world(args.directory)
    except WorldFormatError as err:
        raise CLIError(str(err)) from None
    started = time.perf_counter()
    stats = world_stats(world, k=args.k)
    elapsed = time.perf_counter() - started
    print(f"directory: {args.directory}")
    print(format_stats(stats))
    print(f"(BM25 built and {sum(len(q.chain) + 1 for q in world.questions)} queries run in {elapsed:.1f}s)")
    if args.json_path:
        with atomic_path(args.json_path) as temporary:
            temporary.write_text(json.dumps(stats, indent=2) + "\n")
        print(f"numbers written to {args.json_path}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from tspo.data.world import WorldFormatError, load_world
    from tspo.errors import CLIError

    try:
        world = load_world(args.directory, verify=False)
    except WorldFormatError as err:
        raise CLIError(str(err)) from None
    passages = {p.id: p for p in world.passages}
    questions = world.train if args.split == "train" else world.test
    if args.hops is not None:
        questions = [q for q in questions if q.hops == args.hops]
    for question in questions[: max(0, args.n)]:
        print(f"{question.id}  ({question.hops}-hop: {' -> '.join(question.pattern)})")
        print(f"  Q: {question.question}")
        print(f"  A: {' | '.join(question.golden_answers)}")
        for hop, (query, pid) in enumerate(
            zip(question.chain, question.answer_passage_ids, strict=True), start=1
        ):
            passage = passages.get(pid)
            text = passage.text if passage is not None else "(passage missing)"
            print(f"  search {hop}: {query!r} -> [{pid}] {text}")
        print()
    return 0
