"""``SearchEnv`` on its own: what neither loop test reaches directly.

The protocol rules themselves are checked through both drivers (tests/test_rollout_loop.py and
tests/test_verl_parity.py); here: the finish reason a driver may leave to the env (verl's server does
not say whether a generation ran out of tokens), the response-only budget verl uses, a batch of search
results where one failed, and misuse.
"""

from __future__ import annotations

import pytest

from tspo.doc import Doc
from tspo.protocol import format_observation, invalid_observation
from tspo.rollout import build_word_tokenizer
from tspo.rollout.env import EnvLimits, SearchEnv, check_result_count
from tspo.trajectory import StopReason, TurnAction

DOCS = (
    Doc("d1", "Acme Corporation", "Acme Corporation was founded by Jane Doe in the city of Lorvik."),
    Doc("d2", "Lorvik", "Lorvik is a harbour city on the northern coast."),
)
PROMPT_TEXT = "who founded acme corporation ?"


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer([doc.contents for doc in DOCS] + [PROMPT_TEXT, "not sure lorvik"])


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_env(tokenizer, **limits) -> SearchEnv:
    return SearchEnv(tokenizer, EnvLimits(**limits))


def test_search_waits_for_its_result_then_appends_the_observation(tokenizer):
    env = make_env(tokenizer, max_context_tokens=4096)
    episode = env.reset(encode(tokenizer, PROMPT_TEXT))
    generated = encode(tokenizer, "<search> acme corporation </search>")
    step = env.step(episode, generated)
    assert step.action is TurnAction.SEARCH and step.query == "acme corporation" and not step.done
    assert step.observation_ids == [] and episode.pending_query == "acme corporation"
    with pytest.raises(RuntimeError, match="waits for a search result"):
        env.generation_limit(episode)
    (observed,) = env.observe([(episode, DOCS)])
    text = format_observation(DOCS)
    assert observed.observation_text == text and observed.observation_ids == encode(tokenizer, text)
    assert observed.turn.docs == DOCS and not observed.done and episode.rounds == 1
    assert episode.trajectory.response_ids == generated + observed.observation_ids
    with pytest.raises(RuntimeError, match="waiting for a search result"):
        env.observe([(episode, DOCS)])


def test_invalid_action_gets_the_corrective_message_at_once(tokenizer):
    env = make_env(tokenizer, max_context_tokens=4096)
    episode = env.reset(encode(tokenizer, PROMPT_TEXT))
    step = env.step(episode, encode(tokenizer, "not sure"))
    assert step.action is TurnAction.INVALID and step.query is None and not step.done
    assert step.observation_text == invalid_observation()
    assert step.observation_ids == encode(tokenizer, invalid_observation())


@pytest.mark.parametrize(
    ("text", "action", "reason"),
    [
        # Fills the limit without a stop: what vLLM reports as "length" (verl says only "completed").
        ("not sure lorvik lorvik", TurnAction.TRUNCATED, StopReason.GENERATION_TRUNCATED),
        # Fills the limit but ends in EOS or a stop string: the policy stopped, an ordinary invalid action.
        ("not sure lorvik <eos>", TurnAction.INVALID, None),
        ("not sure <search> </search>", TurnAction.INVALID, None),
    ],
)
def test_finish_reason_is_inferred_when_the_driver_gives_none(tokenizer, text, action, reason):
    env = make_env(tokenizer, max_new_tokens=4, max_context_tokens=4096)
    episode = env.reset(encode(tokenizer, PROMPT_TEXT))
    ids = encode(tokenizer, text)
    assert len(ids) == 4
    step = env.step(episode, ids)
    assert step.action is action and step.reason is reason
    assert step.done == (reason is not None)


def test_output_longer_than_the_limit_is_cut_and_truncated(tokenizer):
    env = make_env(tokenizer, max_new_tokens=3, max_context_tokens=4096)
    episode = env.reset(encode(tokenizer, PROMPT_TEXT))
    ids = encode(tokenizer, "<answer> lorvik lorvik </answer>")
    step = env.step(episode, ids, [-0.1] * len(ids), text="ignored: the env decodes the kept ids")
    assert step.action is TurnAction.TRUNCATED and step.reason is StopReason.GENERATION_TRUNCATED
    assert episode.trajectory.response_ids == ids[:3]
    assert episode.trajectory.sample_logprobs == [-0.1] * 3
    assert step.turn.generated_text == tokenizer.decode(ids[:3], skip_special_tokens=True)


def test_response_budget_as_verl_counts_it(tokenizer):
    """verl budgets the response alone: a long prompt is no reason to stop."""
    prompt = encode(tokenizer, PROMPT_TEXT) * 50
    env = make_env(tokenizer, max_new_tokens=None, max_response_tokens=6)
    episode = env.reset(prompt)
    assert not episode.done and env.generation_limit(episode) == 6
    step = env.step(episode, encode(tokenizer, "not sure"))
    # Four tokens of room left: the corrective message is cut to them and the budget is spent.
    assert step.done and step.reason is StopReason.CONTEXT_LIMIT and len(step.observation_ids) == 4
    assert step.turn.observation_truncated and episode.trajectory.context_truncated
    assert env.finish(episode).metadata == {"stop_reason": "context_limit", "rounds": 1}


def test_prompt_that_fills_the_context_ends_at_once(tokenizer):
    env = make_env(tokenizer, max_context_tokens=3)
    episode = env.reset(encode(tokenizer, PROMPT_TEXT))
    assert episode.done and episode.stop_reason is StopReason.PROMPT_TOO_LONG
    assert env.counters["prompt_too_long"] == env.counters["context_truncated"] == 1
    with pytest.raises(RuntimeError, match="ended"):
        env.generation_limit(episode)


def test_a_failed_search_fails_only_its_episode(tokenizer):
    env = make_env(tokenizer, max_context_tokens=4096)
    prompt = encode(tokenizer, PROMPT_TEXT)
    episodes = [env.reset(prompt) for _ in range(3)]
    for episode in episodes:
        env.step(episode, encode(tokenizer, "<search> acme </search>"))
    steps = env.observe(
        [(episodes[0], DOCS), (episodes[1], ConnectionError("shard down")), (episodes[2], [{"id": "d1"}])]
    )
    assert [step.reason for step in steps] == [
        None,
        StopReason.RETRIEVAL_ERROR,
        StopReason.RETRIEVAL_ERROR,
    ]
    assert steps[0].turn.docs == DOCS and not episodes[0].done
    assert episodes[1].trajectory.error == "retrieval failed for query 'acme': ConnectionError: shard down"
    assert episodes[1].trajectory.turns[-1].error == episodes[1].trajectory.error
    assert "expected tspo.doc.Doc" in episodes[2].trajectory.error
    assert episodes[1].trajectory.turns[-1].observation_span is None
    assert env.counters["retrieval_errors"] == 2 and env.counters["searches"] == 3


def test_check_result_count():
    assert check_result_count([[], list(DOCS)], ["a", "b"]) == [[], list(DOCS)]
    with pytest.raises(ValueError, match="returned 1 result lists for 2 queries"):
        check_result_count([[]], ["a", "b"])
    with pytest.raises(ValueError, match="returned NoneType result lists"):
        check_result_count(None, ["a"])


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_turns"):
        EnvLimits(max_turns=-1)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        EnvLimits(max_new_tokens=0)
    with pytest.raises(ValueError, match="needs a bound"):
        EnvLimits(max_new_tokens=None)


def test_cut_observation_keeps_the_closing_tag_with_the_protocols_padding(tokenizer):
    from tspo.protocol import ProtocolConfig

    protocol = ProtocolConfig(observation_padding="\n")
    env = SearchEnv(tokenizer, EnvLimits(max_context_tokens=4096, max_observation_tokens=8), protocol)
    episode = env.reset(encode(tokenizer, PROMPT_TEXT))
    env.step(episode, encode(tokenizer, "<search> acme corporation </search>"))
    (observed,) = env.observe([(episode, DOCS)])
    assert observed.turn.observation_truncated and len(observed.observation_ids) == 8
    # (The word tokenizer drops whitespace; the padding's own text is checked in test_protocol.py.)
    suffix = encode(tokenizer, "</information>\n")
    assert observed.observation_ids[-len(suffix) :] == suffix
