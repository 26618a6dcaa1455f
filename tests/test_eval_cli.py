"""``tspo eval`` end to end: the synthetic world, a tiny Qwen2 model loaded with from_pretrained, an
in-process BM25 index, the real CLI; interrupted and resumed evaluations count every question once."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from tspo.cli import main
from tspo.configuration import to_dict
from tspo.data.qa import read_qa_jsonl
from tspo.data.world import WorldConfig, generate_world, write_world
from tspo.evaluation import TrajectoryStore, read_records
from tspo.protocol import ProtocolConfig, format_observation
from tspo.retrieval import BM25Retriever, read_corpus
from tspo.retrieval.server import ServerSettings, start_server
from tspo.rollout import build_prompt_ids, build_tiny_model, load_policy


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("eval_cli")
    world_dir = write_world(generate_world(WorldConfig(seed=0, size="tiny")), root / "world")
    texts = [doc.contents for doc in read_corpus(world_dir / "corpus.jsonl")]
    for name in ("train.jsonl", "test.jsonl"):
        for example in read_qa_jsonl(world_dir / name):
            texts += [example.question, *example.golds]
    model_dir = build_tiny_model(texts, root / "tiny-model", hidden_size=32, num_layers=1, num_heads=2)
    return {"root": root, "world": world_dir, "model": model_dir}


@pytest.fixture(scope="module")
def searcher(setup) -> Path:
    """The tiny model taught one demonstration (search the first question's answer, then answer it), so
    that it issues real searches: retrieval is exercised through the CLI."""
    model, tokenizer = load_policy(setup["model"], device="cpu")
    example = next(iter(read_qa_jsonl(setup["world"] / "test.jsonl")))
    gold = example.golds[0]
    retriever = BM25Retriever.build(read_corpus(setup["world"] / "corpus.jsonl"), threads=1)
    protocol = ProtocolConfig(use_chat_template=False)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = build_prompt_ids(example.question, tokenizer, protocol)
    search = encode(f"<search> {gold} </search>")
    observation = encode(format_observation(retriever.search([gold], 3)[0], protocol))
    answer = [*encode(f"<answer> {gold} </answer>"), tokenizer.eos_token_id]
    ids = torch.tensor([prompt + search + observation + answer])
    labels = torch.tensor([[-100] * len(prompt) + search + [-100] * len(observation) + answer])
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(150):
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.01:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = setup["root"] / "searcher"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _args(setup, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "--model",
        str(setup["model"]),
        "--data",
        str(setup["world"] / "test.jsonl"),
        "--retriever",
        "bm25",
        "--corpus",
        str(setup["world"] / "corpus.jsonl"),
        "--subsample",
        "12",
        "--max-new-tokens",
        "6",
        "--max-turns",
        "2",
        "--batch-size",
        "4",
        "--chat-template",
        "off",
        "--no-progress",
        "--out",
        str(out),
        *extra,
    ]


def _ids(out: Path) -> list[str]:
    return [json.loads(line)["id"] for line in (out / "trajectories.jsonl").read_text().splitlines()]


def test_eval_end_to_end_with_resume_after_interrupt(setup, tmp_path, capsys, monkeypatch):
    clean = tmp_path / "clean"
    assert main(_args(setup, clean)) == 0
    printed = capsys.readouterr().out
    assert (
        re.search(r"^Synthetic world +12 ", printed, re.MULTILINE)
        and "12 evaluated now, 0 resumed" in printed
    )
    clean_ids = _ids(clean)
    assert len(clean_ids) == 12 and len(set(clean_ids)) == 12
    test_ids = {ex.id for ex in read_qa_jsonl(setup["world"] / "test.jsonl")}
    assert set(clean_ids) <= test_ids
    results = json.loads((clean / "results.json").read_text())
    assert results["datasets"]["synthetic_world"]["n"] == 12
    assert results["description"]["decoding"] == "greedy"
    assert "| Synthetic world | 12 |" in (clean / "results.md").read_text()
    records = read_records(clean / "trajectories.jsonl")
    assert all(r["prompt_tokens"] > 0 and r["turns"] for r in records)
    assert all(r["generated_tokens"] <= 6 * r["num_turns"] for r in records)

    # Interrupt after the first batch has been written: the process dies like a Ctrl-C would.
    original_append = TrajectoryStore.append
    writes = []

    def append_then_interrupt(self, batch):
        written = original_append(self, batch)
        writes.append(written)
        raise KeyboardInterrupt

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(TrajectoryStore, "append", append_then_interrupt)
    assert main(_args(setup, interrupted)) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert writes == [4] and len(_ids(interrupted)) == 4
    monkeypatch.setattr(TrajectoryStore, "append", original_append)

    assert main(_args(setup, interrupted)) == 0
    assert "8 evaluated now, 4 resumed" in capsys.readouterr().out
    ids = _ids(interrupted)
    assert sorted(ids) == sorted(clean_ids)  # every question exactly once, none lost
    assert json.loads((interrupted / "results.json").read_text())["datasets"] == results["datasets"]
    by_id = {r["id"]: r for r in records}
    assert all(r == by_id[r["id"]] for r in read_records(interrupted / "trajectories.jsonl"))

    # Killed in the middle of writing a line: the partial line is dropped and its question rerun.
    cut = tmp_path / "cut"
    shutil.copytree(clean, cut)
    data = (cut / "trajectories.jsonl").read_bytes()
    (cut / "trajectories.jsonl").write_bytes(data[: len(data) - 40])
    assert main(_args(setup, cut)) == 0
    assert "1 evaluated now, 11 resumed" in capsys.readouterr().out
    assert sorted(_ids(cut)) == sorted(clean_ids)
    assert json.loads((cut / "results.json").read_text())["datasets"] == results["datasets"]

    # Other settings in the same directory are refused before anything is touched.
    before = (clean / "trajectories.jsonl").read_bytes()
    assert main([*_args(setup, clean), "--topk", "2"]) == 2
    assert "other settings" in capsys.readouterr().err
    assert (clean / "trajectories.jsonl").read_bytes() == before
    assert main([*_args(setup, clean), "--topk", "2", "--overwrite"]) == 0
    capsys.readouterr()
    assert json.loads((clean / "eval_settings.json").read_text())["rollout"]["topk"] == 2


def test_eval_of_a_run_directory_uses_its_checkpoint_and_settings(setup, tmp_path, capsys):
    from tspo.training.checkpoint import save_checkpoint
    from tspo.training.config import load_train_config

    run = tmp_path / "run"
    config = load_train_config("tiny", None, ["rollout.max_new_tokens=5", "rollout.max_turns=1"])
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    shutil.copytree(setup["world"], run / "world")
    model, tokenizer = load_policy(setup["model"], device="cpu")
    save_checkpoint(run, 3, model, tokenizer, None, None, {})

    assert main(["eval", "--model", str(run), "--subsample", "5", "--no-progress"]) == 0
    assert re.search(r"^Synthetic world +5 ", capsys.readouterr().out, re.MULTILINE)
    out = run / "eval" / "step-00000003"
    settings = json.loads((out / "eval_settings.json").read_text())
    assert settings["model"] == str((run / "checkpoints" / "step-00000003").resolve())
    assert settings["rollout"]["max_new_tokens"] == 5 and settings["rollout"]["max_turns"] == 1
    assert settings["rollout"]["protocol"]["use_chat_template"] is False  # the tiny preset's protocol
    assert settings["rollout"]["temperature"] == 0.0  # greedy, although the run trained at 1.0
    assert settings["retriever"] == {
        "kind": "bm25",
        "corpus": str((run / "world" / "corpus.jsonl").resolve()),
    }
    assert len(read_records(out / "trajectories.jsonl")) == 5

    # The checkpoint directory itself resolves to the same run; --checkpoint picks one by step.
    checkpoint = run / "checkpoints" / "step-00000003"
    assert main(["eval", "--model", str(checkpoint), "--subsample", "5", "--no-progress"]) == 0
    assert "0 evaluated now, 5 resumed" in capsys.readouterr().out
    assert main(["eval", "--model", str(run), "--checkpoint", "7"]) == 2
    assert "checkpoint '7' not found" in capsys.readouterr().err

    assert main(["analyze", str(run)]) == 0
    report = (run / "analysis" / "report.md").read_text()
    assert "## Evaluation per dataset" in report and "| Synthetic world | 5 |" in report
    assert (run / "analysis" / "eval_datasets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_new_weights_at_an_old_checkpoint_path_are_never_reported_with_old_results(setup, tmp_path, capsys):
    """The stale-evaluation reproduction: a run is trained again into its directory, its new weights land
    at the same checkpoint path, and the evaluation keyed by that path alone "resumed" the old results."""
    from tspo.runs import RunDir
    from tspo.training.checkpoint import save_checkpoint
    from tspo.training.config import load_train_config

    run = RunDir(tmp_path / "run")
    config = load_train_config("tiny", None, ["rollout.max_new_tokens=5", "rollout.max_turns=1"])
    first = run.start("fresh")
    run.config.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    shutil.copytree(setup["world"], run.world)
    model, tokenizer = load_policy(setup["model"], device="cpu")
    save_checkpoint(run.root, 3, model, tokenizer, None, None, {}, run_id=first)
    out = tmp_path / "eval"  # outside the run, so clearing the run does not hide the question
    args = ["eval", "--model", str(run.root), "--subsample", "4", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert "4 evaluated now" in capsys.readouterr().out
    assert json.loads((out / "eval_settings.json").read_text())["weights"] == f"{first}/step-00000003"

    second = run.start("overwrite")
    run.config.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    shutil.copytree(setup["world"], run.world)
    save_checkpoint(run.root, 3, model, tokenizer, None, None, {}, run_id=second)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds results made with other weights" in err and second in err
    assert main([*args, "--overwrite"]) == 0
    assert "4 evaluated now, 0 resumed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--data", "missing.jsonl", "--corpus", "c.jsonl"], "QA file not found: missing.jsonl"),
        (["--data", "{test}"], "no retriever: pass --corpus FILE"),
        (["--data", "{test}", "--corpus", "{corpus}", "--url", "http://x"], "give one retriever source"),
        (["--data", "{test}", "--corpus", "{corpus}", "--checkpoint", "3"], "needs --model to be a run"),
        (["--data", "{test}", "--corpus", "{corpus}", "--datasets", "nq"], "no question of dataset(s) nq"),
        (["--corpus", "{corpus}"], "no questions: pass --data"),
        (
            ["--data", "{test}", "--retriever", "dense", "--corpus", "{corpus}"],
            "--retriever dense cannot use --corpus",
        ),
        (
            ["--data", "{test}", "--index", "{test}.idx"],
            "cannot open the retriever: index directory not found",
        ),
        (["--data", "{test}", "--corpus", "{corpus}", "--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_eval_user_errors(setup, tmp_path, capsys, extra, message):
    values = {"test": str(setup["world"] / "test.jsonl"), "corpus": str(setup["world"] / "corpus.jsonl")}
    args = [a.format(**values) for a in extra]
    assert main(["eval", "--model", str(setup["model"]), "--out", str(tmp_path / "o"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "eval_settings.json").exists()  # a failed start leaves no settings behind


def test_eval_refuses_a_run_without_checkpoint_and_a_bad_model_dir(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {policy: tiny}\n")
    assert main(["eval", "--model", str(run)]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--model", str(tmp_path / "empty")]) == 2
    assert "neither a model directory" in capsys.readouterr().err


def test_eval_gives_the_same_results_in_process_from_a_saved_index_and_over_http(setup, searcher, tmp_path):
    retriever = BM25Retriever.build(read_corpus(setup["world"] / "corpus.jsonl"), threads=1)
    index = retriever.save(tmp_path / "bm25")
    common = [
        "eval", "--model", str(searcher), "--data", str(setup["world"] / "test.jsonl"), "--subsample", "12",
        "--max-turns", "2", "--max-new-tokens", "12", "--max-observation-tokens", "200",
        "--chat-template", "off", "--no-progress",
    ]  # fmt: skip
    assert (
        main([*common, "--corpus", str(setup["world"] / "corpus.jsonl"), "--out", str(tmp_path / "a")]) == 0
    )
    assert main([*common, "--index", str(index), "--out", str(tmp_path / "b")]) == 0
    with start_server(retriever, ServerSettings(port=0)) as server:
        for _ in range(100):
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                break
        assert main([*common, "--url", server.url, "--out", str(tmp_path / "c")]) == 0
        requests = server.service.stats()["requests"]

    runs = [read_records(tmp_path / name / "trajectories.jsonl") for name in ("a", "b", "c")]
    assert sum(r["num_searches"] for r in runs[0]) > 0  # the model really searched
    assert any(t["docs"] for r in runs[0] for t in r["turns"])
    assert runs[0] == runs[1] == runs[2]
    assert requests > 0  # the third run really went over HTTP
    kinds = [
        json.loads((tmp_path / n / "eval_settings.json").read_text())["retriever"]["kind"] for n in "abc"
    ]
    assert kinds == ["bm25", "bm25", "http"]


def test_eval_of_a_lora_run_merges_the_adapter_into_its_base(setup, searcher, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    from tspo.training.checkpoint import save_checkpoint

    model, tokenizer = load_policy(searcher, device="cpu")
    targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B is zero at initialisation
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1.0)
    run = tmp_path / "lora_run"
    run.mkdir()
    (run / "config.yaml").write_text(
        yaml.safe_dump({"model": {"policy": str(searcher), "lora": {"enabled": True}}})
    )
    checkpoint = save_checkpoint(run, 1, peft_model, tokenizer, None, None, {})
    assert (checkpoint / "adapter_config.json").is_file()
    merged = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)

    common = [
        "--data", str(setup["world"] / "test.jsonl"), "--corpus", str(setup["world"] / "corpus.jsonl"),
        "--subsample", "6", "--max-new-tokens", "12", "--max-turns", "1", "--chat-template", "off", "--no-progress",
    ]  # fmt: skip
    assert main(["eval", "--model", str(run), *common, "--out", str(tmp_path / "a")]) == 0
    assert main(["eval", "--model", str(merged), *common, "--out", str(tmp_path / "b")]) == 0
    base = tmp_path / "base"
    assert main(["eval", "--model", str(searcher), *common, "--out", str(base)]) == 0
    capsys.readouterr()
    lora_records = read_records(tmp_path / "a" / "trajectories.jsonl")
    assert lora_records == read_records(tmp_path / "b" / "trajectories.jsonl")
    assert [r["turns"] for r in lora_records] != [
        r["turns"] for r in read_records(base / "trajectories.jsonl")
    ]


def test_run_directory_evaluation_reuses_the_runs_few_shot_examples(tmp_path):
    from tspo.commands.eval import _with_run_examples
    from tspo.doc import Doc
    from tspo.errors import CLIError
    from tspo.protocol import ProtocolConfig, WorkedExample, build_prompt_text
    from tspo.rollout import RolloutConfig
    from tspo.runs import FEW_SHOT_FILE
    from tspo.training.prompts import worked_examples_to_json

    shot = WorkedExample(
        "Where does Ana work?", (("Ana works", (Doc("1", "Ana", "Ana works at Zed."),)),), "Zed"
    )
    config = RolloutConfig(protocol=ProtocolConfig(use_chat_template=False, examples=1))
    with pytest.raises(CLIError, match=FEW_SHOT_FILE):
        _with_run_examples(config, tmp_path)
    (tmp_path / FEW_SHOT_FILE).write_text(json.dumps({"examples": worked_examples_to_json([shot])}))
    attached = _with_run_examples(config, tmp_path)
    assert attached.protocol.worked_examples == (shot,)
    assert build_prompt_text("q", attached.protocol).startswith("Answer the given question")
    assert "<answer> Zed </answer>" in build_prompt_text("q", attached.protocol)
    # A zero-shot run needs no file.
    assert _with_run_examples(RolloutConfig(), tmp_path / "nowhere").protocol.worked_examples == ()
