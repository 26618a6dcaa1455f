"""Every command the README shows works as written, from a fresh clone's point of view.

The README's ``tspo`` commands are extracted from its bash blocks and sorted into three kinds; a new
command must be given a kind here, or :func:`test_every_readme_command_has_a_kind` fails:

- cheap: run as written, in an empty directory, in README order (world generation, inspection, config
  listings);
- costly: run with a shortened config (fewer steps, questions and tokens) in the same directory after the
  cheap ones, so that each finds what the README's earlier commands made (``slow``);
- external: need downloads, a GPU cluster or a server the README's own steps set up (wiki-18, FlashRAG,
  Qwen, verl); their arguments are checked against the real parser.

``tspo train`` with no argument (the main job) is run shortened by tests/test_quickstart.py; its full
runtime, memory and learning margin are measured runs reported in the README, not a timed test.
Relative links and repository paths cited by the README and docs/ must exist.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tspo.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

CHEAP = (
    "tspo world generate",
    "tspo world stats",
    "tspo world show",
    "tspo train --list-keys",
    "tspo train --preset tiny --show-config",
)
COSTLY = (
    "tspo train --preset tiny",
    "tspo plot",
    "tspo eval --model runs/tiny",
    "tspo eval --model smollm2",
    "tspo analyze runs/tiny",
)
EXTERNAL_MARKERS = (
    "data/wiki18",
    "data/FlashRAG_datasets",
    "data/search_r1",
    "indexes/",
    "configs/search_r1",
    "search_r1_qwen",
    "tspo verl",
    "tspo serve",
)
# The main job: shortened in tests/test_quickstart.py.
MAIN_JOB = "tspo train"

TRAIN_SHORT = [
    "trainer.steps=2",
    "warmstart.steps=10",
    "warmstart.demos=32",
    "data.eval_size=4",
    "trainer.prompts_per_step=2",
    "trainer.group_size=2",
    "trainer.eval_sampled=false",
    "trainer.plots=true",
]


def readme_commands() -> list[str]:
    """The ``tspo`` commands of the README's bash blocks, in order (``&&`` chains split, comments and
    line continuations resolved)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            command: list[str] = []
            for word in [*words, "&&"]:
                if word in ("&&", ";", "&"):
                    if command and command[0] == "tspo":
                        commands.append(shlex.join(command))
                    command = []
                else:
                    command.append(word)
    return commands


def kind(command: str) -> str:
    if command == MAIN_JOB:
        return "main"
    if any(marker in command for marker in EXTERNAL_MARKERS) or "127.0.0.1" in command:
        return "external"
    if any(command == p or command.startswith(p + " ") for p in CHEAP):
        return "cheap"
    if any(command == p or command.startswith(p + " ") for p in COSTLY):
        return "costly"
    return "unknown"


def test_every_readme_command_has_a_kind():
    commands = readme_commands()
    assert MAIN_JOB in commands and len(commands) > 15
    unknown = [c for c in commands if kind(c) == "unknown"]
    assert not unknown, f"classify these README commands in {__file__}: {unknown}"


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command: str):
    """Flags and subcommands exist as written (the parser exits on an unknown one)."""
    build_parser().parse_args(shlex.split(command)[1:])


def _tspo() -> list[str]:
    found = shutil.which("tspo")
    return (
        [found]
        if found
        else [sys.executable, "-c", "import sys; from tspo.cli import main; sys.exit(main())"]
    )


def _run(command: str, cwd: Path, timeout: int) -> str:
    argv = shlex.split(command)
    result = subprocess.run(
        [*_tspo(), *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"`{command}` failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result.stdout


def shortened(command: str) -> str:
    """A costly README command made cheap: fewer steps, questions and tokens; otherwise as written."""
    argv = shlex.split(command)
    if argv[1] == "train":
        argv += TRAIN_SHORT
    elif argv[1] == "eval":
        if "--subsample" in argv:
            argv[argv.index("--subsample") + 1] = "2"
        else:
            argv += ["--subsample", "2"]
        argv += ["--max-new-tokens", "8", "--max-turns", "1"]
    return shlex.join(argv)


def test_cheap_readme_commands_run_as_written(tmp_path: Path):
    ran = [c for c in readme_commands() if kind(c) == "cheap"]
    assert len(ran) >= 5
    for command in ran:
        _run(command, tmp_path, timeout=120)
    assert (tmp_path / "data" / "world" / "test.jsonl").is_file()


@pytest.mark.slow
def test_costly_readme_commands_run_shortened_in_readme_order(tmp_path: Path):
    for command in readme_commands():
        if kind(command) == "cheap":
            _run(command, tmp_path, timeout=120)
        elif kind(command) == "costly":
            _run(shortened(command), tmp_path, timeout=600)
    assert (tmp_path / "runs" / "tiny" / "analysis" / "report.md").is_file()
    assert (tmp_path / "eval" / "smollm2" / "results.md").is_file()
    assert list((tmp_path / "runs" / "compare").glob("*.png"))


# ---------------------------------------------------------------------------------------------- citations
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Directories the project's own commands create (git-ignored outputs), not files it ships.
OUTPUTS = ("benchmarks/results",)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_cite_no_missing_file(doc: Path):
    text = doc.read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://", "mailto:")) and not (doc.parent / target).exists():
            missing.append(target)
    # A backticked path that is the text of a link names the link's target (another repository's file).
    for path in re.findall(r"(?<!\[)`((?:src|docs|configs|benchmarks|scripts|tests)/[\w./-]+)`", text):
        if not path.startswith(OUTPUTS) and not (ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{doc.name} cites files the repository lacks: {missing}"
