"""What ``tspo eval`` evaluates: model, question files, run settings, selection (no model is loaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tspo.data.qa import QAExample, write_qa_jsonl
from tspo.evaluation.selection import group_by_dataset, select_examples, subsample
from tspo.evaluation.sources import (
    EvalSourceError,
    canonical_datasets,
    data_dir_files,
    describe_retriever,
    load_questions,
    resolve_model,
    run_heldout_files,
    run_retriever_spec,
    run_rollout_config,
    run_scoring,
)
from tspo.retrieval import RetrieverSpec


def _examples(dataset: str, n: int, split: str = "test") -> list[QAExample]:
    return [
        QAExample(f"{split}_{i}", f"question {i} of {dataset}?", (f"a{i}",), dataset, split) for i in range(n)
    ]


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    """A `tspo data prepare` layout: per-dataset files (FlashRAG split names) and the combined test.jsonl."""
    root = tmp_path / "search_r1"
    write_qa_jsonl(_examples("nq", 5), root / "nq" / "test.jsonl")
    write_qa_jsonl(_examples("hotpotqa", 4, "dev"), root / "hotpotqa" / "dev.jsonl")
    write_qa_jsonl(_examples("nq", 5) + _examples("hotpotqa", 4, "dev"), root / "test.jsonl")
    return root


def test_data_dir_files_prefers_the_combined_file_and_finds_each_dataset(prepared):
    assert data_dir_files(prepared) == [prepared / "test.jsonl"]
    assert data_dir_files(prepared, ["hotpotqa"]) == [prepared / "hotpotqa" / "dev.jsonl"]
    assert data_dir_files(prepared, ["nq", "hotpotqa"]) == [
        prepared / "nq" / "test.jsonl",
        prepared / "hotpotqa" / "dev.jsonl",
    ]
    # A dataset with no file of its own is looked up in the combined file (then filtered).
    assert data_dir_files(prepared, ["musique"]) == [prepared / "test.jsonl"]
    (prepared / "test.jsonl").unlink()
    assert sorted(data_dir_files(prepared)) == sorted(
        [prepared / "nq" / "test.jsonl", prepared / "hotpotqa" / "dev.jsonl"]
    )
    with pytest.raises(EvalSourceError, match=r"no evaluation file found \(looked for musique/dev.jsonl\)"):
        data_dir_files(prepared, ["musique"])
    with pytest.raises(EvalSourceError, match="data directory not found"):
        data_dir_files(prepared / "nowhere")


def test_load_questions_filters_datasets_and_names_unlabelled_files(prepared, tmp_path):
    questions = load_questions([prepared / "test.jsonl"], canonical_datasets("hotpot_qa"))
    assert {q.dataset for q in questions} == {"hotpotqa"} and len(questions) == 4
    plain = tmp_path / "my_questions.jsonl"
    plain.write_text('{"id": 1, "question": "q?", "golden_answers": ["a"]}\n')
    assert load_questions([plain])[0].dataset == "my_questions"
    with pytest.raises(EvalSourceError, match="no question of dataset"):
        load_questions([prepared / "test.jsonl"], ["bamboogle"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "question": "q?", "golden_answers": ["a"]}\n{"id": 2}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'question'"):
        load_questions([bad])
    assert canonical_datasets("nq, 2wiki,,mine") == ["nq", "2wikimultihopqa", "mine"]
    assert canonical_datasets("") is None


def test_model_specs_that_are_not_runs(tmp_path):
    hub = resolve_model("Qwen/Qwen2.5-3B-Instruct")
    assert (hub.spec, hub.run_dir) == ("Qwen/Qwen2.5-3B-Instruct", None)
    assert hub.default_out_dir == Path("eval") / "Qwen_Qwen2.5-3B-Instruct"
    model_dir = tmp_path / "my model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    local = resolve_model(str(model_dir))
    assert local.spec == str(model_dir.resolve()) and local.default_out_dir == Path("eval") / "my_model"
    assert resolve_model("smollm2").default_out_dir == Path("eval") / "smollm2"
    gguf = tmp_path / "SmolLM2.Q8.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)).default_out_dir == Path("eval") / "SmolLM2.Q8"
    # A path that does not exist is a missing path, not a hub id to look up.
    for missing in ("/x/SmolLM2.Q8.gguf", "runs/nope", "./nope"):
        with pytest.raises(EvalSourceError, match="model path not found"):
            resolve_model(missing)


def test_run_settings_from_a_run_config(tmp_path):
    world_run = {
        "data": {"source": "world"},
        "retriever": {"kind": "bm25", "index": None, "cache_size": 10},
        "rollout": {"max_turns": 2, "topk": 5, "protocol": {"use_chat_template": False}},
        "reward": {"metric": "f1", "hit_mode": "substring"},
    }
    assert run_heldout_files(world_run, tmp_path) == [tmp_path / "world" / "test.jsonl"]
    spec = run_retriever_spec(world_run, tmp_path)
    assert (spec.kind, spec.corpus, spec.cache_size) == ("bm25", str(tmp_path / "world" / "corpus.jsonl"), 10)
    rollout = run_rollout_config(world_run)
    assert (rollout.max_turns, rollout.topk, rollout.protocol.use_chat_template) == (2, 5, False)
    assert rollout.max_new_tokens == 500  # unset keys keep their defaults
    assert run_scoring(world_run) == ("f1", "substring")

    files_run = {
        "data": {"source": "files", "test_file": "data/search_r1/test.jsonl"},
        "retriever": {"kind": "http", "url": "http://127.0.0.1:8000"},
    }
    assert run_heldout_files(files_run, tmp_path) == [Path("data/search_r1/test.jsonl")]
    assert describe_retriever(run_retriever_spec(files_run, tmp_path)) == {
        "kind": "http",
        "url": "http://127.0.0.1:8000",
    }
    with pytest.raises(EvalSourceError, match=r"no data\.test_file"):
        run_heldout_files({"data": {"source": "files"}}, tmp_path)
    with pytest.raises(EvalSourceError, match="names no corpus or index"):
        run_retriever_spec({"data": {"source": "files"}}, tmp_path)
    assert describe_retriever(RetrieverSpec(kind="dense", index="idx"))["kind"] == "dense"


def test_group_by_dataset_keeps_the_first_of_repeated_questions(caplog):
    examples = _examples("nq", 3) + _examples("triviaqa", 2) + _examples("nq", 1)
    groups = group_by_dataset(examples)
    assert list(groups) == ["nq", "triviaqa"]  # Search-R1's table order
    assert [len(g) for g in groups.values()] == [3, 2]
    assert "1 question(s) with a repeated (dataset, id)" in caplog.text
    relabelled = select_examples({"mine": _examples("", 3)})
    assert [ex.dataset for ex in relabelled["mine"]] == ["mine"] * 3


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 60), small=st.integers(0, 60), extra=st.integers(0, 30), seed=st.integers(0, 5))
def test_subsample_is_seeded_ordered_and_grows_as_a_superset(n, small, extra, seed):
    examples = _examples("nq", n)
    first = subsample(examples, small, seed)
    assert len(first) == min(n, small)
    assert [examples.index(ex) for ex in first] == sorted(examples.index(ex) for ex in first)
    assert subsample(examples, small, seed) == first
    assert set(first) <= set(subsample(examples, small + extra, seed))
    assert subsample(examples, None, seed) == examples
