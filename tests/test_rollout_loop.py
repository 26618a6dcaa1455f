"""The rollout loop, checked exactly with a scripted policy, a real tokenizer and a real BM25 index.

The policy is the only thing replaced: ``ScriptedEngine`` replays given turns under the engine contract
(stop strings, EOS, token limits). The tokenizer is a word-level tokenizer written with
``save_pretrained`` and loaded back; retrieval is ``BM25Retriever`` over a small corpus (an in-test
retriever only where a retriever must fail on purpose).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tspo.doc import Doc
from tspo.protocol import ProtocolConfig, format_observation, invalid_observation
from tspo.retrieval.base import RetrievalUnavailableError
from tspo.retrieval.bm25 import BM25Retriever
from tspo.rewards import first_hit_turn
from tspo.rollout import (
    GenerationOutput,
    RolloutConfig,
    RolloutTask,
    SamplingParams,
    ScriptedEngine,
    build_prompt_ids,
    build_tiny_model,
    load_tokenizer,
    run_rollouts,
)
from tspo.trajectory import Trajectory, TurnAction, collate_trajectories

CORPUS = [
    Doc("d1", "Acme Corporation", "Acme Corporation was founded by Jane Doe in the city of Lorvik."),
    Doc("d2", "Lorvik", "Lorvik is a harbour city on the northern coast; its mayor is Tomas Brandt."),
    Doc("d3", "Jane Doe", "Jane Doe is an engineer who studied at Kessel University."),
    Doc("d4", "Kessel University", "Kessel University stands in the valley town of Amberfield."),
    Doc("d5", "Blue River", "The Blue River flows through Amberfield and ends in the Grey Sea."),
    Doc("d6", "Tomas Brandt", "Tomas Brandt was born in Amberfield and later moved to Lorvik."),
]
QUESTION = "Who founded Acme Corporation?"
GOLDS = ("Jane Doe",)
OTHER_QUESTIONS = ["where is kessel university", "who is the mayor of lorvik"]


def _logprob(token_id: int, position: int) -> float:
    """Distinct, checkable sampler logprobs for the scripted policy."""
    return -0.001 * token_id - 0.01 * position


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    texts = [doc.contents for doc in CORPUS] + [
        QUESTION,
        *OTHER_QUESTIONS,
        "i need to search . not sure , let me think more",
    ]
    directory = build_tiny_model(
        texts, tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_heads=2
    )
    return load_tokenizer(directory)


@pytest.fixture(scope="module")
def retriever() -> BM25Retriever:
    return BM25Retriever.build(CORPUS, threads=1)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def assert_well_formed(traj: Trajectory) -> None:
    """Per-token fields aligned, spans contiguous and covering the response, masks by segment kind."""
    traj.validate()
    position = 0
    for turn in traj.turns:
        start, end = turn.generated_span
        assert start == position and end >= start
        assert traj.loss_mask[start:end] == [1] * (end - start)
        assert traj.turn_index[start:end] == [turn.index] * (end - start)
        position = end
        if turn.observation_span is not None:
            o_start, o_end = turn.observation_span
            assert o_start == position
            assert traj.loss_mask[o_start:o_end] == [0] * (o_end - o_start)
            assert traj.sample_logprobs[o_start:o_end] == [0.0] * (o_end - o_start)
            assert traj.turn_index[o_start:o_end] == [turn.index] * (o_end - o_start)
            position = o_end
    assert position == len(traj.response_ids)
    assert "stop_reason" in traj.metadata


def run(tokenizer, retriever, script, config: RolloutConfig | None = None, tasks: Sequence[RolloutTask] = ()):
    engine = ScriptedEngine(tokenizer, script, logprob=_logprob)
    tasks = list(tasks) or [RolloutTask(question=QUESTION, golds=GOLDS, group_id=0, sample_id="q#0")]
    result = run_rollouts(engine, tokenizer, retriever, tasks, config or RolloutConfig(), seed=0)
    for traj in result.trajectories:
        assert_well_formed(traj)
    return engine, result


# ---------------------------------------------------------------------- the main paths
def test_search_then_answer_token_in_token_out(tokenizer, retriever):
    turns = [
        "<think> i need to search </think> <search> who founded acme corporation </search>",
        "<answer> jane doe </answer>",
    ]
    engine, result = run(tokenizer, retriever, turns)
    (traj,) = result.trajectories
    prompt = build_prompt_ids(QUESTION, tokenizer)
    docs = tuple(retriever.search(["who founded acme corporation"], 3)[0])
    observation = format_observation(docs)
    g1, o1, g2 = encode(tokenizer, turns[0]), encode(tokenizer, observation), encode(tokenizer, turns[1])

    assert traj.prompt_ids == prompt
    assert traj.response_ids == g1 + o1 + g2
    assert traj.loss_mask == [1] * len(g1) + [0] * len(o1) + [1] * len(g2)
    assert traj.turn_index == [0] * (len(g1) + len(o1)) + [1] * len(g2)
    expected_logprobs = [_logprob(t, i) for i, t in enumerate(g1)] + [0.0] * len(o1)
    expected_logprobs += [_logprob(t, i) for i, t in enumerate(g2)]
    assert traj.sample_logprobs == pytest.approx(expected_logprobs)

    search, answer = traj.turns
    assert search.action is TurnAction.SEARCH and search.query == "who founded acme corporation"
    assert search.generated_span == (0, len(g1))
    assert search.observation_span == (len(g1), len(g1) + len(o1))
    assert search.docs == docs and docs[0].id == "d1"
    assert search.observation_text == observation
    assert answer.action is TurnAction.ANSWER and answer.content == "jane doe"
    assert answer.observation_span is None
    assert traj.final_answer() == "jane doe"
    assert first_hit_turn(traj.observation_texts, traj.golds) == 0
    assert traj.metadata["stop_reason"] == "answer" and not traj.truncated

    # The second call continued the exact ids of the first (no decode / re-encode anywhere).
    assert [prompts for prompts, _ in engine.calls] == [[prompt], [prompt + g1 + o1]]
    c = result.counters
    assert (c["waves"], c["engine_calls"], c["retrieval_calls"], c["searches"], c["answers"]) == (
        2,
        2,
        1,
        1,
        1,
    )
    assert c["generated_tokens"] == len(g1) + len(g2) and c["observation_tokens"] == len(o1)
    assert set(result.timings) == {"generate", "retrieve", "other"}


def test_answer_at_once(tokenizer, retriever):
    _, result = run(tokenizer, retriever, ["<think> easy </think> <answer> jane doe </answer>"])
    (traj,) = result.trajectories
    assert [t.action for t in traj.turns] == [TurnAction.ANSWER]
    assert traj.loss_mask == [1] * len(traj.response_ids)
    assert traj.observation_texts == [""]
    assert first_hit_turn(traj.observation_texts, traj.golds) is None
    assert result.counters["retrieval_calls"] == 0


def test_invalid_action_then_recovery(tokenizer, retriever):
    turns = [
        "not sure , let me think more",
        "<search> acme corporation founder </search>",
        "<answer> jane doe </answer>",
    ]
    _, result = run(tokenizer, retriever, turns)
    (traj,) = result.trajectories
    assert [t.action for t in traj.turns] == [TurnAction.INVALID, TurnAction.SEARCH, TurnAction.ANSWER]
    invalid = traj.turns[0]
    assert invalid.invalid_reason == "no_tag"
    assert invalid.observation_text == invalid_observation()
    start, end = invalid.observation_span
    assert traj.response_ids[start:end] == encode(tokenizer, invalid_observation())
    assert traj.final_answer() == "jane doe"
    assert traj.metadata["rounds"] == 2 and result.counters["invalid_actions"] == 1


def test_search_limit_then_final_generation_is_not_searched(tokenizer, retriever):
    turns = [
        "<search> lorvik </search>",
        "<search> amberfield </search>",
        "<search> blue river </search>",  # the final generation: not executed
    ]
    engine, result = run(tokenizer, retriever, turns, RolloutConfig(max_turns=2))
    (traj,) = result.trajectories
    assert [t.action for t in traj.turns] == [TurnAction.SEARCH, TurnAction.SEARCH, TurnAction.INVALID]
    final = traj.turns[-1]
    assert final.invalid_reason == "search_after_limit" and final.content == "blue river"
    assert final.observation_span is None and final.docs == ()
    assert traj.num_searches == 2 and len(engine.calls) == 3
    assert result.counters["retrieval_calls"] == 2 and result.counters["search_after_limit"] == 1
    assert traj.metadata["stop_reason"] == "search_after_limit"


def test_search_limit_then_answer(tokenizer, retriever):
    turns = ["<search> lorvik </search>", "<answer> tomas brandt </answer>"]
    _, result = run(tokenizer, retriever, turns, RolloutConfig(max_turns=1))
    assert [t.action for t in result.trajectories[0].turns] == [TurnAction.SEARCH, TurnAction.ANSWER]


def test_a_policy_that_is_always_invalid_still_ends(tokenizer, retriever):
    engine, result = run(tokenizer, retriever, lambda call: "not sure", RolloutConfig(max_turns=3))
    (traj,) = result.trajectories
    assert [t.action for t in traj.turns] == [TurnAction.INVALID] * 4
    assert [t.observation_span is not None for t in traj.turns] == [True, True, True, False]
    assert traj.metadata["stop_reason"] == "invalid_final" and len(engine.calls) == 4


def test_max_turns_zero_allows_no_search(tokenizer, retriever):
    _, result = run(tokenizer, retriever, ["<search> lorvik </search>"], RolloutConfig(max_turns=0))
    (traj,) = result.trajectories
    assert traj.turns[0].invalid_reason == "search_after_limit" and result.counters["retrieval_calls"] == 0


def test_first_hit_turn_from_recorded_docs(tokenizer, retriever):
    turns = [
        "<search> blue river </search>",
        "<search> acme corporation founded </search>",
        "<answer> jane doe </answer>",
    ]
    _, result = run(tokenizer, retriever, turns)
    (traj,) = result.trajectories
    first, second, _ = traj.turns
    assert "jane doe" not in first.observation_text.lower()
    assert any(doc.id == "d1" for doc in second.docs)
    assert first_hit_turn(traj.observation_texts, traj.golds) == 1


# ---------------------------------------------------------------------- truncation at each limit
def test_generation_limit_truncates_and_ends(tokenizer, retriever):
    _, result = run(tokenizer, retriever, ["<think> " + "lorvik " * 40], RolloutConfig(max_new_tokens=6))
    (traj,) = result.trajectories
    (turn,) = traj.turns
    assert turn.action is TurnAction.TRUNCATED and turn.generation_truncated
    assert len(traj.response_ids) == 6 and not traj.context_truncated
    assert (
        result.counters["generation_truncated"] == 1
        and traj.metadata["stop_reason"] == "generation_truncated"
    )


def test_observation_limit_keeps_the_closing_tag(tokenizer, retriever):
    turns = ["<search> lorvik amberfield </search>", "<answer> lorvik </answer>"]
    _, result = run(tokenizer, retriever, turns, RolloutConfig(max_observation_tokens=10))
    (traj,) = result.trajectories
    search = traj.turns[0]
    start, end = search.observation_span
    kept = traj.response_ids[start:end]
    assert end - start == 10 and search.observation_truncated
    assert kept[-1] == tokenizer.convert_tokens_to_ids("</information>")
    full = encode(tokenizer, format_observation(search.docs))
    assert kept[:-1] == full[:9]
    assert search.observation_text == tokenizer.decode(kept)
    assert result.counters["observation_truncated"] == 1 and traj.turns[1].action is TurnAction.ANSWER


def test_context_limit_during_generation(tokenizer, retriever):
    prompt = build_prompt_ids(QUESTION, tokenizer)
    config = RolloutConfig(max_context_tokens=len(prompt) + 5, max_new_tokens=50)
    engine, result = run(tokenizer, retriever, ["lorvik " * 40], config)
    (traj,) = result.trajectories
    assert engine.calls[0][1].max_new_tokens == 5
    assert len(traj.prompt_ids) + len(traj.response_ids) == config.max_context_tokens
    assert traj.context_truncated and traj.turns[0].generation_truncated
    assert traj.metadata["stop_reason"] == "context_limit" and result.counters["context_truncated"] == 1


def test_context_limit_during_observation(tokenizer, retriever):
    prompt = build_prompt_ids(QUESTION, tokenizer)
    g1 = encode(tokenizer, "<search> lorvik </search>")
    config = RolloutConfig(max_context_tokens=len(prompt) + len(g1) + 4)
    engine, result = run(
        tokenizer, retriever, ["<search> lorvik </search>", "<answer> lorvik </answer>"], config
    )
    (traj,) = result.trajectories
    assert len(traj.prompt_ids) + len(traj.response_ids) == config.max_context_tokens
    assert traj.turns[0].observation_truncated and traj.context_truncated
    assert len(traj.turns) == 1 and len(engine.calls) == 1
    assert traj.metadata["stop_reason"] == "context_limit"


def test_prompt_longer_than_context(tokenizer, retriever):
    engine, result = run(
        tokenizer, retriever, ["<answer> lorvik </answer>"], RolloutConfig(max_context_tokens=10)
    )
    (traj,) = result.trajectories
    assert traj.turns == [] and traj.context_truncated and engine.calls == []
    assert result.counters["prompt_too_long"] == 1


# ---------------------------------------------------------------------- batching and masks
def test_waves_batch_generation_and_retrieval(tokenizer, retriever):
    class CountingRetriever:
        def __init__(self) -> None:
            self.batches: list[list[str]] = []

        def search(self, queries: list[str], k: int) -> list[list[Doc]]:
            self.batches.append(list(queries))
            return retriever.search(queries, k)

    questions = {
        "who founded acme corporation": [
            "<search> acme corporation </search>",
            "<answer> jane doe </answer>",
        ],
        "where is kessel university": ["<answer> amberfield </answer>"],
        "who is the mayor of lorvik": [
            "<search> lorvik mayor </search>",
            "<search> tomas brandt </search>",
            "<answer> tomas brandt </answer>",
        ],
    }
    tasks = [
        RolloutTask(question=q, golds=("x",), group_id=g, sample_id=f"{g}#{s}")
        for g, q in enumerate(questions)
        for s in range(2)
    ]
    counting = CountingRetriever()
    engine = ScriptedEngine(tokenizer, questions)
    result = run_rollouts(engine, tokenizer, counting, tasks, RolloutConfig(generation_batch_size=4), seed=0)
    for traj in result.trajectories:
        assert_well_formed(traj)
    assert [len(t.turns) for t in result.trajectories] == [2, 2, 1, 1, 3, 3]
    assert [t.sample_id for t in result.trajectories] == [t.sample_id for t in tasks]
    # Wave 1: 6 ready -> two calls of <= 4; wave 2: 4 ready -> one call; wave 3: 2 ready -> one call.
    assert [len(prompts) for prompts, _ in engine.calls] == [4, 2, 4, 2]
    # One retrieval call per wave, identical queries of a group sent once.
    assert counting.batches == [["acme corporation", "lorvik mayor"], ["tomas brandt"]]
    batch = collate_trajectories(result.trajectories, pad_token_id=tokenizer.pad_token_id)
    for row, traj in enumerate(result.trajectories):
        for turn in traj.turns:
            if turn.observation_span:
                start, end = turn.observation_span
                assert batch.loss_mask[row, start:end].sum() == 0
                assert batch.response_mask[row, start:end].sum() == end - start
    assert int(batch.loss_mask.sum()) == sum(t.num_generated_tokens for t in result.trajectories)


def test_chat_template_is_used_when_present(tokenizer):
    template = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}<|assistant|>"
    tokenizer.chat_template = template
    try:
        with_template = build_prompt_ids(QUESTION, tokenizer)
        raw = build_prompt_ids(QUESTION, tokenizer, ProtocolConfig(use_chat_template=False))
    finally:
        tokenizer.chat_template = None
    instruction = ProtocolConfig().instruction.replace("{question}", QUESTION)
    assert raw == encode(tokenizer, instruction)
    rendered = f"<|user|> {instruction} <|assistant|>"
    assert with_template == encode(tokenizer, rendered) != raw


# ---------------------------------------------------------------------- bad input
def test_unclosed_tag_then_eos_is_invalid(tokenizer, retriever):
    turns = ["<search> who founded acme <eos>", "<answer> jane doe </answer>"]
    _, result = run(tokenizer, retriever, turns)
    (traj,) = result.trajectories
    first = traj.turns[0]
    assert first.action is TurnAction.INVALID and first.invalid_reason == "unclosed_tag"
    assert traj.response_ids[first.generated_span[1] - 1] == tokenizer.eos_token_id
    assert traj.turns[1].action is TurnAction.ANSWER


def test_ten_thousand_tokens_without_a_tag(tokenizer, retriever):
    _, result = run(
        tokenizer, retriever, ["<search> " + "lorvik " * 10_000], RolloutConfig(max_new_tokens=500)
    )
    (traj,) = result.trajectories
    assert len(traj.response_ids) == 500 and traj.turns[0].action is TurnAction.TRUNCATED
    assert traj.turns[0].invalid_reason == "unclosed_tag"


def test_engine_that_ignores_the_token_limit_is_cut(tokenizer, retriever):
    class Runaway:
        def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
            ids = encode(tokenizer, "lorvik " * 10_000)
            return [GenerationOutput(ids, [0.0] * len(ids), "lorvik " * 10_000, "length") for _ in prompts]

    tasks = [RolloutTask(question=QUESTION, golds=GOLDS)]
    result = run_rollouts(Runaway(), tokenizer, retriever, tasks, RolloutConfig(max_new_tokens=32), seed=0)
    (traj,) = result.trajectories
    assert_well_formed(traj)
    assert len(traj.response_ids) == 32 and traj.turns[0].generation_truncated


def test_empty_generation_is_an_invalid_action(tokenizer, retriever):
    _, result = run(tokenizer, retriever, [[], "<answer> jane doe </answer>"])
    (traj,) = result.trajectories
    assert traj.turns[0].action is TurnAction.INVALID and traj.turns[0].generated_span == (0, 0)
    assert traj.final_answer() == "jane doe"


def test_retriever_error_fails_only_that_trajectory(tokenizer, retriever):
    class Flaky:
        def search(self, queries: list[str], k: int) -> list[list[Doc]]:
            if any("river" in q for q in queries):
                raise ConnectionError("index shard 3 is down")
            return retriever.search(queries, k)

    script = {
        "who founded acme corporation": [
            "<search> acme corporation </search>",
            "<answer> jane doe </answer>",
        ],
        "where is kessel university": ["<search> blue river </search>", "<answer> lorvik </answer>"],
    }
    tasks = [RolloutTask(question=q, golds=("x",), group_id=i) for i, q in enumerate(script)]
    engine = ScriptedEngine(tokenizer, script)
    result = run_rollouts(engine, tokenizer, Flaky(), tasks, RolloutConfig(), seed=0)
    ok, failed = result.trajectories
    for traj in result.trajectories:
        assert_well_formed(traj)
    assert ok.error is None and ok.final_answer() == "jane doe"
    assert "index shard 3 is down" in failed.error and "'blue river'" in failed.error
    assert failed.turns[-1].error == failed.error and failed.turns[-1].observation_span is None
    assert failed.metadata["stop_reason"] == "retrieval_error"
    assert result.counters["retrieval_errors"] == 1


def test_retriever_that_always_fails_or_miscounts(tokenizer):
    class Broken:
        def search(self, queries: list[str], k: int) -> list[list[Doc]]:
            return []  # wrong number of result lists

    tasks = [RolloutTask(question=QUESTION, golds=GOLDS, sample_id=str(i)) for i in range(3)]
    engine = ScriptedEngine(tokenizer, ["<search> acme </search>"])
    result = run_rollouts(engine, tokenizer, Broken(), tasks, RolloutConfig(), seed=0)
    for traj in result.trajectories:
        assert_well_formed(traj)
        assert "0 result lists for 1 queries" in traj.error
    assert result.counters["retrieval_errors"] == 3


def test_config_validation():
    with pytest.raises(ValueError, match="max_new_tokens"):
        RolloutConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        RolloutConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        RolloutConfig(temperature=-1.0)


def test_unreachable_server_fails_the_batch_once_not_query_by_query(tokenizer):
    """A server gone past the client's retry budget: every searching trajectory ends with the error after
    one batch call; retrying each query would spend the budget again per query."""
    calls: list[list[str]] = []

    class Gone:
        def search(self, queries: list[str], k: int) -> list[list[Doc]]:
            calls.append(list(queries))
            raise RetrievalUnavailableError(
                "retrieval server http://127.0.0.1:9/retrieve failed after 6 attempt(s)"
            )

    script = {
        "who founded acme corporation": ["<search> acme corporation </search>"],
        "where is kessel university": ["<search> blue river </search>"],
    }
    tasks = [RolloutTask(question=q, golds=("x",), group_id=i) for i, q in enumerate(script)]
    result = run_rollouts(
        ScriptedEngine(tokenizer, script), tokenizer, Gone(), tasks, RolloutConfig(), seed=0
    )
    assert calls == [["acme corporation", "blue river"]]
    for traj in result.trajectories:
        assert_well_formed(traj)
        assert traj.metadata["stop_reason"] == "retrieval_error" and "127.0.0.1:9" in traj.error
    assert result.counters["retrieval_errors"] == 2
