from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tspo.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "usage: tspo" in out


def test_console_script_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "tspo.cli", "--version"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    assert proc.stdout.startswith("tspo ")


def test_user_error_under_python_dash_m_prints_one_line():
    # Under `python -m tspo.cli` the CLI module runs as __main__: a user error raised by a command must
    # still be caught (CLIError lives outside the CLI module) and printed without a traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "tspo.cli", "train", "trainer.bf16=maybe"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "tspo train: error: trainer.bf16: 'maybe' is not one of 'auto', 'on', 'off'"


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    files = {
        "binary.yaml": b"\xff\xfe not text",
        "fake.jsonl.gz": b"not gzip at all\n",
        "empty.jsonl": b"",
        "bad.jsonl": b'{"id": "1", "question": "q", "golden_answers": ["a"]}\n{"question": "q\x01"}\n',
        "corpus.jsonl": b'{"id": "d1", "contents": "\\"T\\"\\nx"}\n',
        "plain.txt": b"a file\n",
        "qa.jsonl": b'{"id": "1", "question": "q", "golden_answers": ["a"]}\n',
        "unknown_key.yaml": b"trainer:\n  stepz: 3\n",
    }
    for name, content in files.items():
        (tmp / name).write_bytes(content)
    (tmp / "a_dir").mkdir()
    return {name: tmp / name for name in [*files, "a_dir"]}


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve", "--index", "{a_dir}", "--port", "99999"], "port must be in 0-65535"),
        (["train", "--config", "{binary.yaml}"], "not a UTF-8 text file"),
        (["train", "--config", "{a_dir}"], "is a directory, not a config file"),
        (
            ["eval", "--model", "smollm2", "--data", "{qa.jsonl}", "--retriever", "http"],
            "--retriever http needs --url",
        ),
        (["train", "--config", "{unknown_key.yaml}"], "unknown_key.yaml: unknown config key trainer.stepz"),
        (["train", "trainer.group_size=0"], "trainer.group_size must be >= 1, got 0"),
        (["train", "trainer.steps=-1"], "trainer.steps must be >= 0, got -1"),
        (["index", "build", "--corpus", "{fake.jsonl.gz}", "--out", "{a_dir}/x"], "cannot decompress"),
        (
            ["index", "build", "--corpus", "{corpus.jsonl}", "--out", "{a_dir}/x", "--k1", "-1"],
            "--k1 must be >= 0",
        ),
        (
            ["data", "convert", "{bad.jsonl}", "--out", "{a_dir}/x.parquet", "--dataset", "nq"],
            "bad.jsonl:2: malformed JSON: Invalid control character at: line 1 column",
        ),
        (["data", "convert", "{corpus.jsonl}", "--out", "{a_dir}"], "Is a directory"),
        (
            [
                "train",
                "data.source=files",
                "data.train_file={empty.jsonl}",
                "data.corpus={corpus.jsonl}",
                "trainer.output_dir={a_dir}/run",
            ],
            "holds no training questions",
        ),
        (
            ["train", "--preset", "tiny", "--output-dir", "{plain.txt}"],
            "(a file is where a directory is needed)",
        ),
    ],
)
def test_bad_input_gets_one_line_naming_the_problem(tmp_path, capsys, argv, expected):
    paths = _bad_inputs(tmp_path)
    for name, path in paths.items():
        argv = [arg.replace("{" + name + "}", str(path)) for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_overrides_may_come_on_both_sides_of_an_option(capsys):
    assert main(["train", "trainer.steps=5", "--show-config", "trainer.seed=3"]) == 0
    shown = capsys.readouterr().out
    assert "steps: 5" in shown and "seed: 3" in shown
    with pytest.raises(SystemExit):
        main(["train", "trainer.steps=5", "--show-config", "--no-such-flag=1"])
    assert "unrecognized arguments: --no-such-flag=1" in capsys.readouterr().err


def test_trainer_ranges_keep_their_documented_zero_meanings(capsys):
    """keep_last=0 keeps every checkpoint, save_every=0 saves only at the end: both stay valid."""
    assert main(["train", "trainer.keep_last=0", "trainer.save_every=0", "--show-config"]) == 0
    shown = capsys.readouterr().out
    assert "keep_last: 0" in shown and "save_every: 0" in shown
    assert main(["train", "trainer.keep_last=-1"]) == 2
    assert "trainer.keep_last must be >= 0" in capsys.readouterr().err
