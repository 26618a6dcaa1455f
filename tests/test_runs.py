"""The run directory as one object (tspo.runs) and the semantics `tspo train` builds on it: a fresh run
never mixes with another, --overwrite clears only what a run writes, --resume needs a checkpoint, and
every check that can fail fails before the long steps."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import TINY_RUN_OVERRIDES
from tspo.cli import main
from tspo.runs import RunDir, RunDirError, looks_like_path, weights_identity


def fake_checkpoint(run: RunDir, step: int, run_id: str | None = None) -> Path:
    """A checkpoint directory as the trainer leaves it, as far as the run directory can tell."""
    path = run.checkpoint(step)
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    manifest = {"format": 1, "step": step, **({"run_id": run_id} if run_id else {})}
    (path / "checkpoint.json").write_text(json.dumps(manifest))
    return path


def old_run(root: Path) -> RunDir:
    """A directory holding a finished older run (config, metrics up to step 20, checkpoint 20)."""
    run = RunDir(root)
    root.mkdir(parents=True)
    run.config.write_text("trainer:\n  steps: 20\n")
    run.metrics.write_text("".join(json.dumps({"step": s, "reward/mean": 0.5}) + "\n" for s in range(21)))
    fake_checkpoint(run, 20)
    return run


# --------------------------------------------------------------------------------------------- RunDir
def test_a_fresh_start_refuses_a_directory_holding_another_run(tmp_path):
    run = old_run(tmp_path / "run")
    with pytest.raises(RunDirError, match=r"holds another run \(checkpoints up to step 20\).*--overwrite"):
        run.start("fresh")
    assert run.latest_checkpoint() == run.checkpoint(20)  # nothing was touched


def test_a_fresh_start_takes_an_empty_or_unrelated_directory_and_records_an_identity(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    run = RunDir(tmp_path)
    run_id = run.start("fresh")
    assert run.run_id() == run_id and json.loads(run.identity_file.read_text())["run_id"] == run_id
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert RunDir(tmp_path / "new").start("fresh") != run_id


def test_overwrite_clears_what_a_run_writes_and_nothing_else(tmp_path):
    run = old_run(tmp_path / "run")
    for name in ("world", "eval/step-00000020", "plots", "reference"):
        (run.root / name).mkdir(parents=True)
    (run.root / "metrics.jsonl.old-20261203").write_text("{}\n")
    (run.root / "notes.txt").write_text("mine")
    run_id = run.start("overwrite")
    # The previous run waits aside until the new one is set up.
    assert sorted(p.name for p in run.root.iterdir()) == [".previous-run", "notes.txt", "run.json"]
    assert run.run_id() == run_id and run.list_checkpoints() == []
    run.drop_previous()
    assert sorted(p.name for p in run.root.iterdir()) == ["notes.txt", "run.json"]


def test_an_abandoned_overwrite_puts_the_previous_run_back(tmp_path):
    run = old_run(tmp_path / "run")
    (run.root / "notes.txt").write_text("mine")
    before = {p.relative_to(run.root): p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    run.start("overwrite")
    (run.root / "config.yaml").write_text("new: run\n")
    run.world.mkdir()
    run.abandon()
    assert {p.relative_to(run.root): p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == before
    # A process killed during setup left the stash: the next overwrite still keeps the previous run.
    run.start("overwrite")
    (run.root / "config.yaml").write_text("killed: during setup\n")
    run.start("overwrite")
    run.abandon()
    assert {p.relative_to(run.root): p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == before


def test_resume_needs_a_checkpoint_and_keeps_the_identity(tmp_path):
    missing = RunDir(tmp_path / "typo")
    with pytest.raises(RunDirError, match="--resume: no complete checkpoint"):
        missing.start("resume")
    assert not missing.root.exists()
    run = RunDir(tmp_path / "run")
    first = run.start("fresh")
    with pytest.raises(RunDirError, match="no complete checkpoint"):
        run.start("resume")
    fake_checkpoint(run, 5, first)
    assert run.start("resume") == first
    legacy = old_run(tmp_path / "legacy")  # made before run.json existed: resuming gives it an identity
    assert legacy.start("resume") == legacy.run_id() is not None


def test_checkpoints_are_listed_picked_and_half_written_ones_ignored(tmp_path):
    run = RunDir(tmp_path)
    for step in (3, 12, 7):
        fake_checkpoint(run, step)
    (run.checkpoints / ".tmp-step-00000013-ab").mkdir()
    (run.checkpoints / "step-00000014").mkdir()  # no manifest: not complete
    assert [p.name for p in run.list_checkpoints()] == ["step-00000003", "step-00000007", "step-00000012"]
    assert run.pick_checkpoint() == run.checkpoint(12)
    assert run.pick_checkpoint("7") == run.pick_checkpoint("step-00000007") == run.checkpoint(7)
    with pytest.raises(RunDirError, match=r"checkpoint '14' not found .*step-00000003, step-00000007"):
        run.pick_checkpoint("14")
    assert RunDir.of_checkpoint(run.checkpoint(7)) is None  # no config.yaml / run.json: not a run
    run.start("overwrite")
    fake_checkpoint(run, 1)
    assert RunDir.of_checkpoint(run.checkpoint(1)) == run


def test_weights_identity_tells_two_runs_apart_at_one_path(tmp_path):
    run = RunDir(tmp_path)
    path = fake_checkpoint(run, 3, "run-a")
    assert weights_identity(path) == "run-a/step-00000003"
    (path / "checkpoint.json").write_text(json.dumps({"step": 3, "run_id": "run-b"}))
    assert weights_identity(path) == "run-b/step-00000003"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"one")
    first = weights_identity(model_dir)
    (model_dir / "model.safetensors").write_bytes(b"other")
    assert first.startswith("files:") and weights_identity(model_dir) != first
    assert weights_identity("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    ("spec", "is_path"),
    [
        ("runs/nope", True),
        ("./model", True),
        ("/abs/model", True),
        ("~/model", True),
        ("a/b/c", True),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", False),
        ("gpt2", False),
        ("smollm2", False),
    ],
)
def test_a_model_argument_that_looks_like_a_path(spec, is_path):
    assert looks_like_path(spec) is is_path


# --------------------------------------------------------------------------------------------- tspo train
def train(tmp_path: Path, run_dir: Path, *extra: str) -> int:
    flags = [arg for arg in extra if arg.startswith("--")]
    overrides = [arg for arg in extra if not arg.startswith("--")]
    return main(
        [
            "train",
            "--preset",
            "tiny",
            *flags,
            *TINY_RUN_OVERRIDES,
            "trainer.steps=1",
            "trainer.eval_before=false",
            f"trainer.output_dir={run_dir}",
            *overrides,
        ]
    )


def test_train_refuses_a_directory_holding_another_run(tmp_path, capsys):
    run = old_run(tmp_path / "mix")
    before = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    assert train(tmp_path, run.root) == 2
    err = capsys.readouterr().err
    assert "holds another run (checkpoints up to step 20)" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == before
    assert not run.world.exists()  # refused before the world was generated


def test_train_resume_without_a_checkpoint_fails_before_any_work(tmp_path, capsys):
    typo = tmp_path / "runs" / "typo"
    assert train(tmp_path, typo, "--resume") == 2
    assert "--resume: no complete checkpoint to continue from" in capsys.readouterr().err
    assert not typo.exists()


def test_train_overwrite_replaces_the_old_run_and_stamps_its_identity(tmp_path, capsys):
    run = old_run(tmp_path / "mix")
    (run.root / "notes.txt").write_text("mine")
    assert train(tmp_path, run.root, "--overwrite") == 0
    capsys.readouterr()
    assert [p.name for p in run.list_checkpoints()] == ["step-00000001"]  # the old step 20 is gone
    steps = [json.loads(line)["step"] for line in run.metrics.read_text().splitlines()]
    assert max(steps) == 1
    run_id = run.run_id()
    manifest = json.loads((run.checkpoint(1) / "checkpoint.json").read_text())
    assert run_id and manifest["run_id"] == run_id
    assert weights_identity(run.checkpoint(1)) == f"{run_id}/step-00000001"
    assert (run.root / "notes.txt").read_text() == "mine"
    # Resuming it continues the same identity.
    assert train(tmp_path, run.root, "--resume", "trainer.steps=2") == 0
    assert json.loads((run.checkpoint(2) / "checkpoint.json").read_text())["run_id"] == run_id


def test_train_reports_a_truncated_qa_line_as_file_and_line(tmp_path, capsys):
    good = {"id": "q1", "question": "who?", "golden_answers": ["x"]}
    train_file = tmp_path / "train.jsonl"
    train_file.write_text(json.dumps(good) + "\n" + json.dumps(good)[:20] + "\n")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "d1", "contents": "t\nx"}) + "\n")
    code = train(
        tmp_path,
        tmp_path / "run",
        "data.source=files",
        f"data.train_file={train_file}",
        f"data.corpus={corpus}",
    )
    err = capsys.readouterr().err
    assert code == 2
    assert f"{train_file}:2" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_train_checks_optional_packages_and_model_paths_before_any_work(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    assert train(tmp_path, tmp_path / "a", "trainer.wandb_project=demo") == 2
    assert "wandb is not installed: pip install wandb" in capsys.readouterr().err
    assert train(tmp_path, tmp_path / "b", "model.policy=runs/nope") == 2
    assert "model path not found: runs/nope" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------------------------- other commands
def test_eval_reports_a_missing_local_model_path_not_a_hub_lookup(tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": "q1", "question": "who?", "golden_answers": ["x"]}) + "\n")
    assert main(["eval", "--model", "runs/nope", "--data", str(data), "--corpus", str(data)]) == 2
    err = capsys.readouterr().err
    assert "model path not found" in err and "huggingface" not in err.lower()


def test_index_build_refuses_a_bad_out_before_building(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "d1", "contents": "t\nx"}) + "\n")
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"\xff")
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(out), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "refusing to overwrite" in captured.err and "indexing" not in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["holiday.jpg"]


def test_train_overwrite_that_fails_to_set_up_keeps_the_old_run(tmp_path, capsys):
    run = old_run(tmp_path / "mix")
    before = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    not_an_index = tmp_path / "notindex"
    not_an_index.mkdir()
    assert train(tmp_path, run.root, "--overwrite", f"retriever.index={not_an_index}") == 2
    assert "not a tspo index" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == before
    assert not (run.root / ".previous-run").exists()


def test_a_fresh_run_that_fails_to_set_up_leaves_no_run_behind(tmp_path, capsys):
    run_dir = tmp_path / "run"
    not_an_index = tmp_path / "notindex"
    not_an_index.mkdir()
    assert train(tmp_path, run_dir, f"retriever.index={not_an_index}") == 2
    capsys.readouterr()
    assert not RunDir(run_dir).holds_run()  # a corrected rerun needs neither --resume nor --overwrite
