"""The resumable evaluation runner, records, store, tables and validation on the synthetic world.

Real pieces: the synthetic world (corpus + held-out questions), a real BM25 index over its corpus, a
word-level tokenizer saved and loaded with ``from_pretrained``, the real rollout loop and scoring. Only the
policy is scripted (``ScriptedEngine``), so that every trajectory category occurs and every expected
number is known: question i of the held-out set gets behaviour ``i % 6``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tspo.data.qa import QAExample, read_qa_jsonl
from tspo.data.world import WorldConfig, generate_world, write_world
from tspo.evaluation import (
    EvalSettingsMismatch,
    RecordFormatError,
    TrajectoryStore,
    evaluate_policy,
    format_table,
    markdown_table,
    per_dataset_summary,
    read_records,
    record_to_trajectory,
    run_evaluation,
    select_examples,
    summarize,
    summarize_records,
    trajectory_to_record,
    validate,
)
from tspo.protocol import ProtocolConfig
from tspo.retrieval import BM25Retriever, read_corpus
from tspo.rollout import RolloutConfig, ScriptedEngine, build_word_tokenizer, load_tokenizer
from tspo.scoring import score_trajectories

PROTOCOL = ProtocolConfig(use_chat_template=False)
CONFIG = RolloutConfig(
    max_turns=2, max_new_tokens=12, max_observation_tokens=80, temperature=0.0, protocol=PROTOCOL
)
BEHAVIOURS = ("success", "near_miss", "no_retrieval", "failure", "invalid_then_answer", "truncated")


class WorldPolicy:
    """A scripted policy keyed by question: behaviour ``i % 6`` for held-out question ``i``."""

    def __init__(self, tokenizer, examples: list[QAExample]) -> None:
        self.tokenizer = tokenizer
        self.by_question = {self._norm(ex.question): (i, ex) for i, ex in enumerate(examples)}

    def _norm(self, text: str) -> str:
        return self.tokenizer.decode(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def behaviour(self, index: int) -> str:
        return BEHAVIOURS[index % len(BEHAVIOURS)]

    def __call__(self, call) -> str:
        index, example = next(v for k, v in self.by_question.items() if k in call.prompt_text)
        gold = example.golds[0]
        kind = self.behaviour(index)
        if kind in ("success", "near_miss"):
            # Searching the answer's own name retrieves a passage that contains it (a FOLR hit).
            if call.turn == 0:
                return f"<search> {gold} </search>"
            return f"<answer> {gold if kind == 'success' else 'nobody'} </answer>"
        if kind == "no_retrieval":
            return f"<answer> {gold} </answer>"
        if kind == "failure":
            return "<answer> nobody </answer>"
        if kind == "invalid_then_answer":
            return "i am not sure" if call.turn == 0 else "<answer> nobody </answer>"
        return "word " * 40  # no tag before the token limit: a truncated generation


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("world")
    write_world(generate_world(WorldConfig(seed=0, size="tiny")), root / "world")
    corpus = [doc.contents for doc in read_corpus(root / "world" / "corpus.jsonl")]
    examples = list(read_qa_jsonl(root / "world" / "test.jsonl"))[:24]
    texts = corpus + [ex.question for ex in examples] + ["nobody i am not sure word"]
    tokenizer = build_word_tokenizer(texts, PROTOCOL)
    tokenizer.save_pretrained(root / "tokenizer")
    tokenizer = load_tokenizer(root / "tokenizer")
    retriever = BM25Retriever.build(read_corpus(root / "world" / "corpus.jsonl"), threads=1)
    return {"root": root, "examples": examples, "tokenizer": tokenizer, "retriever": retriever}


def _engine(world) -> tuple[ScriptedEngine, WorldPolicy]:
    policy = WorldPolicy(world["tokenizer"], world["examples"])
    return ScriptedEngine(world["tokenizer"], script=policy), policy


def _run(world, examples, out: Path, **kwargs):
    engine, _ = _engine(world)
    settings = {"model": "scripted", "rollout": "test"}
    return run_evaluation(
        engine, world["tokenizer"], world["retriever"], examples, CONFIG, out, settings=settings, **kwargs
    )


def test_every_behaviour_lands_in_its_category(world):
    engine, policy = _engine(world)
    examples = world["examples"]
    result = evaluate_policy(engine, world["tokenizer"], world["retriever"], examples, CONFIG)
    expected_category = {
        "success": "complete_success",
        "near_miss": "near_miss",
        "no_retrieval": "success_without_retrieval",
        "failure": "complete_failure",
        "invalid_then_answer": "complete_failure",
        "truncated": "complete_failure",
    }
    for index, record in enumerate(result.records):
        kind = policy.behaviour(index)
        assert record["category"] == expected_category[kind], (kind, record)
        assert record["id"] == examples[index].id and record["dataset"] == "synthetic_world"
        assert record["scores"]["em"] == float(kind in ("success", "no_retrieval"))
        assert record["num_searches"] == int(kind in ("success", "near_miss"))
        assert (record["num_invalid"] > 0) == (kind == "invalid_then_answer")
        assert record["truncated"] == (kind == "truncated")
        if kind in ("success", "near_miss"):
            assert record["first_hit_turn"] == 0
            assert record["turns"][0]["query"] == examples[index].golds[0].lower()
            assert len(record["turns"][0]["docs"]) == CONFIG.topk
            assert record["turns"][0]["observation"].strip().startswith("<information>")
    # 24 questions, 6 behaviours: 4 of each.
    metrics = result.metrics
    assert metrics["n"] == 24
    assert metrics["em"] == pytest.approx(8 / 24)
    assert metrics["complete_success"] == pytest.approx(4 / 24)
    assert metrics["near_miss"] == pytest.approx(4 / 24)
    assert metrics["success_without_retrieval"] == pytest.approx(4 / 24)
    assert metrics["complete_failure"] == pytest.approx(12 / 24)
    assert metrics["searches"] == pytest.approx(8 / 24)
    assert metrics["invalid_rate"] == pytest.approx(4 / 24)
    assert metrics["truncation_rate"] == pytest.approx(4 / 24)
    assert metrics["answered"] == pytest.approx(20 / 24)
    # The trainer's summarize() reads the same numbers from trajectories and scores.
    scores = score_trajectories(result.trajectories, folr_alpha=0.0, protocol=PROTOCOL)
    assert summarize(result.trajectories, scores) == metrics


def test_records_round_trip_to_trajectories(world):
    engine, _ = _engine(world)
    result = evaluate_policy(
        engine, world["tokenizer"], world["retriever"], world["examples"][:12], CONFIG, include_tokens=True
    )
    for traj, score, record in zip(result.trajectories, result.scores, result.records, strict=True):
        record = json.loads(json.dumps(record))  # what a reader of the JSONL file gets
        rebuilt = record_to_trajectory(record)
        assert rebuilt.response_ids == traj.response_ids and rebuilt.loss_mask == traj.loss_mask
        assert rebuilt.sample_logprobs == traj.sample_logprobs and rebuilt.prompt_ids == traj.prompt_ids
        assert [t.generated_span for t in rebuilt.turns] == [t.generated_span for t in traj.turns]
        assert [(t.action, t.content, t.observation_text) for t in rebuilt.turns] == [
            (t.action, t.content, t.observation_text) for t in traj.turns
        ]
        assert [[d.id for d in t.docs] for t in rebuilt.turns] == [[d.id for d in t.docs] for t in traj.turns]
        # Without tokens: a text-only trajectory that scores exactly like the original.
        text_only = {k: v for k, v in record.items() if k != "tokens"}
        light = record_to_trajectory(text_only)
        assert light.response_ids == [] and light.num_turns == traj.num_turns
        for mode in ("whole_word", "substring"):
            for metric in ("em", "f1"):
                again = score_trajectories([light], metric=metric, hit_mode=mode, protocol=PROTOCOL)[0]
                original = score_trajectories([traj], metric=metric, hit_mode=mode, protocol=PROTOCOL)[0]
                assert again == original
        assert trajectory_to_record(light, score, dataset=record["dataset"])["turns"] == [
            {k: v for k, v in turn.items() if not k.endswith("_span")} for turn in record["turns"]
        ]


def test_interrupted_evaluation_resumes_without_loss_or_double_count(world, tmp_path):
    examples = world["examples"]
    clean = _run(world, examples, tmp_path / "clean", batch_size=5)
    assert clean.evaluated == 24 and clean.resumed == 0

    calls = []

    def stop_after_two_batches(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        _run(world, examples, out, batch_size=5, on_batch=stop_after_two_batches)
    assert calls == [5, 10]
    assert len(read_records(out / "trajectories.jsonl")) == 10

    resumed = _run(world, examples, out, batch_size=5)
    assert (resumed.evaluated, resumed.resumed) == (14, 10)
    ids = [r["id"] for r in read_records(out / "trajectories.jsonl")]
    lines = (out / "trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 24 and sorted(ids) == sorted(ex.id for ex in examples)
    assert resumed.table == clean.table
    by_id = {r["id"]: r for r in clean.records}
    assert all(record == by_id[record["id"]] for record in resumed.records)
    saved = json.loads((out / "results.json").read_text())
    assert saved["datasets"] == json.loads(json.dumps(clean.table))

    # A third run has nothing to do and changes nothing.
    again = _run(world, examples, out, batch_size=7)
    assert (again.evaluated, again.resumed) == (0, 24) and again.table == clean.table
    assert (out / "trajectories.jsonl").read_text().splitlines() == lines


def test_a_line_cut_mid_write_is_dropped_and_its_question_rerun(world, tmp_path):
    examples = world["examples"][:12]
    clean = _run(world, examples, tmp_path / "clean", batch_size=4)
    out = tmp_path / "cut"
    out.mkdir()
    data = (tmp_path / "clean" / "trajectories.jsonl").read_bytes()
    lines = data.splitlines(keepends=True)
    (out / "trajectories.jsonl").write_bytes(b"".join(lines[:7]) + lines[7][: len(lines[7]) // 2])
    (out / "eval_settings.json").write_bytes((tmp_path / "clean" / "eval_settings.json").read_bytes())

    report = _run(world, examples, out, batch_size=4)
    assert (report.evaluated, report.resumed) == (5, 7)
    text = (out / "trajectories.jsonl").read_text()
    assert text.endswith("\n") and len(text.splitlines()) == 12
    assert sorted(r["id"] for r in read_records(out / "trajectories.jsonl")) == sorted(e.id for e in examples)
    assert report.table == clean.table


def test_store_errors_name_the_line_and_repeats_count_once(tmp_path):
    path = tmp_path / "trajectories.jsonl"
    good = {
        "id": "q1",
        "dataset": "nq",
        "question": "q?",
        "golds": ["a"],
        "answer": "a",
        "scores": {"em": 1.0, "sub_em": 1.0, "f1": 1.0, "outcome": 1.0},
        "category": "success_without_retrieval",
        "first_hit_turn": None,
        "num_searches": 0,
        "num_invalid": 0,
        "truncated": False,
        "error": None,
        "turns": [{"index": 0, "action": "answer", "text": "<answer> a </answer>"}],
    }
    store = TrajectoryStore(path)
    assert store.append([good, good]) == 1  # the same question is never written twice
    other_dataset = {**good, "dataset": "triviaqa"}  # same id, other dataset: another question
    assert store.append([other_dataset]) == 1
    with open(path, "a") as handle:
        handle.write(json.dumps(good) + "\n")  # e.g. two runs appending to one file
    assert [r["dataset"] for r in read_records(path)] == ["nq", "triviaqa"]

    with open(path, "a") as handle:
        handle.write('{"id": "q2", "dataset": "nq"}\n{"broken\n')
    with pytest.raises(RecordFormatError, match=r"trajectories.jsonl:4: missing field 'question'"):
        read_records(path)
    with pytest.raises(RecordFormatError, match=r"trajectories.jsonl:4"):
        TrajectoryStore(path)
    path.write_text(path.read_text().replace('{"id": "q2", "dataset": "nq"}\n', ""))
    with pytest.raises(RecordFormatError, match=r"trajectories.jsonl:4: malformed JSON line"):
        read_records(path)
    bad = {**good, "category": "lucky"}
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(RecordFormatError, match=r":1: unknown category 'lucky'"):
        read_records(path)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.jsonl"):
        read_records(tmp_path / "nowhere.jsonl")


def test_changed_settings_are_refused_and_selection_can_grow(world, tmp_path):
    examples = world["examples"]
    groups = select_examples(examples, 6, seed=3)
    first = _run(world, groups["synthetic_world"], tmp_path / "out", batch_size=4)
    assert first.evaluated == 6
    larger = select_examples(examples, 10, seed=3)["synthetic_world"]
    assert {ex.id for ex in groups["synthetic_world"]} < {ex.id for ex in larger}
    grown = _run(world, larger, tmp_path / "out", batch_size=4)
    assert (grown.evaluated, grown.resumed) == (4, 6) and grown.table["all"]["n"] == 10
    smaller = _run(world, groups["synthetic_world"][:3], tmp_path / "out", batch_size=4)
    assert smaller.ignored == 7 and smaller.table["all"]["n"] == 3

    engine, _ = _engine(world)
    before = (tmp_path / "out" / "trajectories.jsonl").read_bytes()
    with pytest.raises(EvalSettingsMismatch, match=r"rollout: 'test' -> 'other'"):
        run_evaluation(
            engine,
            world["tokenizer"],
            world["retriever"],
            larger,
            CONFIG,
            tmp_path / "out",
            settings={"model": "scripted", "rollout": "other"},
        )
    assert (tmp_path / "out" / "trajectories.jsonl").read_bytes() == before


def test_tables_and_macro_average(world):
    engine, _ = _engine(world)
    examples = world["examples"][:12]
    records = evaluate_policy(engine, world["tokenizer"], world["retriever"], examples, CONFIG).records
    # Relabel half the questions as another dataset: per-dataset rows, pooled row and macro average.
    for record in records[6:]:
        record["dataset"] = "nq"
    table = per_dataset_summary(records)
    assert list(table) == ["nq", "synthetic_world", "all", "average"]
    assert table["all"] == summarize_records(records)
    assert table["nq"] == summarize_records(records[6:])
    assert table["average"]["em"] == pytest.approx((table["nq"]["em"] + table["synthetic_world"]["em"]) / 2)
    text = format_table(table)
    assert text.splitlines()[0].split()[:3] == ["dataset", "n", "EM"]
    assert "NQ" in text and "Synthetic world" in text and "average (macro)" in text
    markdown = markdown_table(table)
    assert markdown.count("\n") == 1 + len(table)
    assert f"| NQ | 6 | {table['nq']['em']:.3f} |" in markdown


def test_validate_reports_each_dataset_and_the_pool(world):
    engine, _ = _engine(world)
    examples = world["examples"][:12]
    by_dataset = {"synthetic_world": examples[:6], "world_b": examples[6:]}
    metrics = validate(engine, world["tokenizer"], world["retriever"], by_dataset, CONFIG)
    direct = evaluate_policy(engine, world["tokenizer"], world["retriever"], examples, CONFIG).records
    assert metrics["val/synthetic_world/em"] == summarize_records(direct[:6])["em"]
    assert metrics["val/world_b/f1"] == summarize_records(direct[6:])["f1"]
    assert metrics["val/all/em"] == summarize_records(direct)["em"]
    assert metrics["val/all/near_miss"] == summarize_records(direct)["near_miss"]
    assert metrics["val/average/em"] == pytest.approx(
        (metrics["val/synthetic_world/em"] + metrics["val/world_b/em"]) / 2
    )
    assert metrics["val/synthetic_world/n"] == 6
    assert all(isinstance(v, float) for v in metrics.values())
    # Sampling settings of training never leak into validation: it is greedy.
    sampled = RolloutConfig(**{**CONFIG.__dict__, "temperature": 1.0})
    engine.calls.clear()
    validate(engine, world["tokenizer"], world["retriever"], examples[:2], sampled, prefix="eval")
    assert all(params.temperature == 0.0 for _, params in engine.calls)
    assert validate(engine, world["tokenizer"], world["retriever"], {}, CONFIG) == {}


# ------------------------------------------------------------------------- trainer's held-out evaluation


def test_heldout_metrics_reports_greedy_and_sampled_on_the_same_questions(world):
    from tspo.evaluation.heldout import behaviour_change, heldout_metrics

    engine, _ = _engine(world)
    examples = world["examples"][:12]
    sampling = RolloutConfig(**{**CONFIG.__dict__, "temperature": 0.7})
    done: list[int] = []
    engine.calls.clear()
    metrics = heldout_metrics(
        engine, world["tokenizer"], world["retriever"], examples, sampling, batch_size=5, progress=done.append
    )
    # Questions in batches of 5, both decodings; greedy calls at temperature 0, sampled ones at 0.7.
    temperatures = [params.temperature for _, params in engine.calls]
    half = len(temperatures) // 2
    assert set(temperatures[:half]) == {0.0} and set(temperatures[half:]) == {0.7}
    first_seeds = [params.seed for _, params in engine.calls]
    direct = evaluate_policy(engine, world["tokenizer"], world["retriever"], examples, CONFIG).metrics
    for key, value in direct.items():
        assert metrics[f"greedy/{key}"] == value and metrics[key] == value
        assert f"sampled/{key}" in metrics
    assert metrics["sampled/n"] == 12
    # Questions in batches of 5, both decodings; greedy calls at temperature 0, sampled ones at 0.7.
    assert done == [5, 5, 2, 5, 5, 2]
    # The sample is fixed by the seed: the same call gives the same seeds to the engine.
    engine.calls.clear()
    heldout_metrics(engine, world["tokenizer"], world["retriever"], examples, sampling, batch_size=5)
    assert [params.seed for _, params in engine.calls] == first_seeds
    # Greedy rollouts (temperature 0) have nothing to sample: no sampled keys.
    greedy_only = heldout_metrics(engine, world["tokenizer"], world["retriever"], examples, CONFIG)
    assert "sampled/em" not in greedy_only and greedy_only["greedy/em"] == direct["em"]

    after = {**metrics, "sampled/searches": metrics["sampled/searches"] + 1.0, "sampled/near_miss": 0.0}
    lines = behaviour_change(metrics, after)
    assert lines[0] == (
        f"searches per question {metrics['sampled/searches']:.2f} -> {after['sampled/searches']:.2f} (sampled)"
    )
    assert f"near miss (answer retrieved, not given) {metrics['sampled/near_miss']:.0%} -> 0%" in lines[2]
