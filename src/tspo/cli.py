"""The ``tspo`` command.

Each subcommand lives in its own module under ``tspo.commands`` and exposes
``register(subparsers) -> None``; this file only discovers and dispatches them, so adding a command
never touches a shared file. Command modules import heavy dependencies inside their handlers, which
keeps ``tspo --help`` fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys
from collections.abc import Sequence

from tspo import __version__
from tspo.errors import CLIError

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    import tspo.commands

    parser = argparse.ArgumentParser(
        prog="tspo",
        description="Train LLM search agents with reinforcement learning (TSPO, GRPO, DSPO, ...).",
    )
    parser.add_argument("--version", action="version", version=f"tspo {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(tspo.commands.__path__), key=lambda m: m.name):
        if module_info.name.startswith("_"):
            continue
        module = importlib.import_module(f"tspo.commands.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `tspo train a=1 --show-config b=2`: argparse gives a positional list only one run of arguments,
    # so KEY=VALUE overrides after an option come back unparsed; they belong to the same list.
    overrides = getattr(args, "overrides", None)
    if extra and isinstance(overrides, list) and all("=" in e and not e.startswith("-") for e in extra):
        overrides.extend(extra)
    elif extra:
        parser.parse_args(argv)  # the usual "unrecognized arguments" error and exit
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(handler(args) or 0)
    except CLIError as err:
        print(f"tspo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
        # A path given by the user that is the wrong kind (a file where a directory is needed, or the
        # reverse) or not writable: name it instead of showing a traceback.
        path = err.filename if err.filename is not None else ""
        hint = {
            FileExistsError: " (a file is where a directory is needed)",
            NotADirectoryError: " (a file is where a directory is needed)",
            IsADirectoryError: " (a directory is where a file is needed)",
        }.get(type(err), "")
        print(f"tspo {args.command}: error: {err.strerror or err}: {path}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`tspo ... | head`): stop quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
