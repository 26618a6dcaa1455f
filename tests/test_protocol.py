"""Tests of tspo.doc and tspo.protocol: the Search-R1 prompt, action parsing, observations (DESIGN 3).

Reference strings marked "Search-R1" were checked byte for byte against PeterGriffinJin/Search-R1
(commit a14dc3a): ``make_prefix`` in scripts/data_process/{nq_search,qa_search_train_merge,
qa_search_test_merge}.py, and ``execute_predictions`` / ``_passages2string`` in
search_r1/llm_agent/generation.py.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tspo.doc import Doc
from tspo.protocol import (
    DEFAULT_PROTOCOL,
    ActionKind,
    InvalidReason,
    ProtocolConfig,
    build_instruction,
    build_prompt_messages,
    extract_answer,
    format_documents,
    format_observation,
    invalid_observation,
    parse_action,
    truncate_segment,
)

# The prompt Search-R1's make_prefix(template_type="base") builds for this question (its data scripts
# strip the question and append "?" first; tspo does that in tspo.data.qa.search_r1_question).
SEARCH_R1_PROMPT_NOBEL = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time "
    "you get new information. After reasoning, if you find you lack some knowledge, you can call a search "
    "engine by <search> query </search> and it will return the top searched results between <information> "
    "and </information>. You can search as many times as your want. If you find no further external "
    "knowledge needed, you can directly provide the answer inside <answer> and </answer>, without "
    "detailed illustrations. For example, <answer> Beijing </answer>. "
    "Question: who got the first nobel prize in physics?\n"
)

# Search-R1's observation after an invalid action (generation.py, execute_predictions).
SEARCH_R1_INVALID = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
    "</search>. If I want to give the final answer, I should put the answer between <answer> and "
    "</answer>. Let me try again.\n"
)


# ----------------------------------------------------------------------------------------------- Doc


def test_doc_contents_is_title_newline_text():
    assert (
        Doc("7", "Paris", "Paris is the capital of France.").contents
        == "Paris\nParis is the capital of France."
    )


def test_doc_contents_without_title_is_the_text():
    assert Doc("7", "", "untitled passage").contents == "untitled passage"


def test_doc_from_contents_splits_at_the_first_newline_only():
    doc = Doc.from_contents("3", "Title\nline one\nline two", score=1.5)
    assert doc == Doc(id="3", title="Title", text="line one\nline two", score=1.5)


def test_doc_from_contents_without_newline_has_no_title():
    doc = Doc.from_contents("3", "just a passage")
    assert (doc.title, doc.text, doc.score) == ("", "just a passage", 0.0)


def test_doc_from_contents_coerces_id_to_str():
    assert Doc.from_contents(42, "T\nx").id == "42"  # type: ignore[arg-type]


def test_doc_is_frozen():
    doc = Doc("1", "T", "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        doc.title = "other"  # type: ignore[misc]


_TITLE_CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters='\n\r"')


@settings(max_examples=60, deadline=None)
@given(
    title=st.text(_TITLE_CHARS, min_size=1, max_size=12).filter(lambda t: t == t.strip()),
    text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=30),
    score=st.floats(allow_nan=False, allow_infinity=False),
)
def test_doc_contents_round_trip(title, text, score):
    doc = Doc("id", title, text, score)
    assert Doc.from_contents(doc.id, doc.contents, doc.score) == doc


def test_wiki18_contents_round_trip_and_render_like_search_r1():
    # Search-R1 README: contents = '"' + title + '"\n' + text; example/case.txt shows the quotes kept.
    contents = '"Paul Walker"\nPaul William Walker IV was an American actor.'
    doc = Doc.from_contents("0", contents)
    assert doc.contents == contents
    assert format_observation([doc]) == (
        '\n\n<information>Doc 1(Title: "Paul Walker") Paul William Walker IV was an American actor.'
        "</information>\n\n"
    )


# ------------------------------------------------------------------------------------- ProtocolConfig


def test_default_config_stop_strings():
    assert DEFAULT_PROTOCOL.stop_strings == ("</search>", "</answer>")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"instruction": "Answer: no placeholder here"},
        {"instruction": "Question: {questions}"},
        {"search_tag": ""},
        {"search_tag": "web search"},
        {"answer_tag": "<answer>"},
        {"answer_tag": "1answer"},
        {"information_tag": "info\n"},
        {"information_tag": None},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError, match="protocol"):
        ProtocolConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"search_tag": "answer"},
        {"answer_tag": "search"},
        {"information_tag": "search"},
        {"information_tag": "answer"},
    ],
)
def test_config_rejects_duplicate_tag_names(kwargs):
    with pytest.raises(ValueError, match="tag"):
        ProtocolConfig(**kwargs)


def test_config_accepts_custom_tags_with_dashes_and_underscores():
    config = ProtocolConfig(search_tag="tool-call", answer_tag="final_answer", information_tag="docs")
    assert config.stop_strings == ("</tool-call>", "</final_answer>")


# -------------------------------------------------------------------------------------- parse_action


def test_parse_search_after_thinking():
    text = "<think>I need the capital.</think>\n<search> capital of France </search>"
    action = parse_action(text)
    assert action.kind is ActionKind.SEARCH
    assert action.content == "capital of France"
    assert action.reason is None
    assert action.end == len(text)


def test_parse_answer_and_text_after_closing_tag_is_ignored():
    text = "<think>ok</think><answer> Paris </answer> and then more <search>x</search>"
    action = parse_action(text)
    assert (action.kind, action.content) == (ActionKind.ANSWER, "Paris")
    assert text[: action.end].endswith("</answer>")
    assert text[action.end :] == " and then more <search>x</search>"


@pytest.mark.parametrize(
    ("text", "kind", "content"),
    [
        ("<search>a</search><answer>b</answer>", ActionKind.SEARCH, "a"),
        ("<answer>b</answer><search>a</search>", ActionKind.ANSWER, "b"),
        ("<search>first</search> <search>second</search>", ActionKind.SEARCH, "first"),
        ("<answer>one</answer><answer>two</answer>", ActionKind.ANSWER, "one"),
    ],
)
def test_first_complete_tag_wins(text, kind, content):
    action = parse_action(text)
    assert (action.kind, action.content) == (kind, content)


@pytest.mark.parametrize(
    ("text", "kind", "content"),
    [
        ("<search>a <search>b</search>", ActionKind.SEARCH, "b"),
        ("<answer>maybe <search>q</search>", ActionKind.SEARCH, "q"),
        ("<search>a <answer>b</answer> c</search>", ActionKind.ANSWER, "b"),
        ("<search> x </answer> <answer>y</answer>", ActionKind.ANSWER, "y"),
    ],
)
def test_nested_tags_resolve_to_innermost_complete_pair(text, kind, content):
    action = parse_action(text)
    assert (action.kind, action.content) == (kind, content)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("I think the answer is Paris.", InvalidReason.NO_TAG),
        ("", InvalidReason.NO_TAG),
        ("<think>only thinking</think>", InvalidReason.NO_TAG),
        ("<SEARCH>case matters</SEARCH>", InvalidReason.NO_TAG),
        ("a stray close </search>", InvalidReason.NO_TAG),
        ("<search> capital of Fr", InvalidReason.UNCLOSED_TAG),
        ("<answer>Paris", InvalidReason.UNCLOSED_TAG),
        ("<search>mismatched</answer>", InvalidReason.UNCLOSED_TAG),
    ],
)
def test_invalid_actions_without_a_complete_pair(text, reason):
    action = parse_action(text)
    assert action.kind is ActionKind.INVALID
    assert action.reason is reason
    assert action.content == ""
    assert action.end == len(text)


@pytest.mark.parametrize("text", ["<search></search>", "<answer>  \n </answer> rest"])
def test_empty_content_is_invalid(text):
    action = parse_action(text)
    assert (action.kind, action.reason, action.content) == (
        ActionKind.INVALID,
        InvalidReason.EMPTY_CONTENT,
        "",
    )
    assert text[: action.end].endswith(("</search>", "</answer>"))


def test_multiline_content_is_kept_and_stripped():
    action = parse_action("<answer>\n  New\nYork \n</answer>")
    assert (action.kind, action.content) == (ActionKind.ANSWER, "New\nYork")


def test_custom_tags_via_config():
    config = ProtocolConfig(search_tag="query", answer_tag="final")
    assert parse_action("<query> who </query>", config).content == "who"
    assert parse_action("<final>42</final>", config).kind is ActionKind.ANSWER
    # The default tags mean nothing under a custom protocol.
    assert parse_action("<search>who</search>", config).reason is InvalidReason.NO_TAG
    assert parse_action("<query>unclosed", config).reason is InvalidReason.UNCLOSED_TAG


def test_tag_names_are_not_regex():
    config = ProtocolConfig(search_tag="s-q", answer_tag="a_1")
    assert parse_action("<s-q>x</s-q>", config).kind is ActionKind.SEARCH
    assert parse_action("<sxq>x</sxq>", config).kind is ActionKind.INVALID


# ------------------------------------------------------------------------------------ extract_answer


def test_extract_answer_takes_the_last_complete_answer():
    assert (
        extract_answer(["<answer>Lyon</answer>", "<search>q</search>", "<answer> Paris </answer>"]) == "Paris"
    )
    assert extract_answer(["<answer>a</answer> <answer>b</answer>"]) == "b"
    assert extract_answer(["<answer>a</answer>", "<answer>unclosed"]) == "a"


def test_extract_answer_none_without_an_answer():
    assert extract_answer([]) is None
    assert extract_answer(["<search>q</search>", "<answer>unclosed", "no tags"]) is None


def test_extract_answer_empty_answer_is_empty_string():
    assert extract_answer(["<answer>   </answer>"]) == ""


def test_extract_answer_only_reads_what_it_is_given():
    # The Search-R1 prompt itself holds "<answer> Beijing </answer>"; it must be passed nowhere near here.
    assert extract_answer([build_instruction("q?")]) == "Beijing"  # the reason it must never see the prompt
    assert extract_answer(["<search>q</search>"]) is None


def test_extract_answer_custom_tag():
    config = ProtocolConfig(answer_tag="final")
    assert extract_answer(["<answer>no</answer><final> yes </final>"], config) == "yes"


# ------------------------------------------------------------------------------ instruction / messages


def test_build_instruction_is_search_r1_make_prefix_byte_for_byte():
    assert build_instruction("who got the first nobel prize in physics?") == SEARCH_R1_PROMPT_NOBEL
    # Search-R1 strips the question before make_prefix.
    assert build_instruction("  who got the first nobel prize in physics?\n") == SEARCH_R1_PROMPT_NOBEL


def test_build_instruction_custom_template_keeps_other_braces():
    config = ProtocolConfig(instruction="Q: {question} {not_a_field}")
    assert build_instruction("why {x}?", config) == "Q: why {x}? {not_a_field}"


def test_build_prompt_messages_is_one_user_turn():
    assert build_prompt_messages("who got the first nobel prize in physics?") == [
        {"role": "user", "content": SEARCH_R1_PROMPT_NOBEL}
    ]


def test_invalid_observation_is_search_r1s_message():
    assert invalid_observation() == SEARCH_R1_INVALID
    assert invalid_observation(ProtocolConfig(invalid_action_message="bad\n")) == "bad\n"


# ---------------------------------------------------------------------------------------- observations


def test_format_observation_exact_search_r1_string():
    docs = [Doc("1", "t", "text"), Doc("2", "Second Title", "more text\nwith a line break")]
    assert format_observation(docs) == (
        "\n\n<information>Doc 1(Title: t) text\nDoc 2(Title: Second Title) more text\nwith a line break"
        "</information>\n\n"
    )


def test_format_observation_strips_like_search_r1():
    # Search-R1 ends every doc with "\n" and strips the whole block.
    docs = [Doc("1", "A", "alpha"), Doc("2", "B", "beta  \n")]
    assert (
        format_observation(docs)
        == "\n\n<information>Doc 1(Title: A) alpha\nDoc 2(Title: B) beta</information>\n\n"
    )


def test_format_observation_no_docs_and_custom_tag():
    assert format_observation([]) == "\n\n<information></information>\n\n"
    config = ProtocolConfig(information_tag="docs")
    assert format_observation([Doc("1", "T", "x")], config) == "\n\n<docs>Doc 1(Title: T) x</docs>\n\n"


def test_format_documents_ranks_from_one():
    assert format_documents([Doc("9", "A", "a"), Doc("8", "B", "b"), Doc("7", "C", "c")]) == (
        "Doc 1(Title: A) a\nDoc 2(Title: B) b\nDoc 3(Title: C) c"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>x</think><search> q </search> junk after", "<think>x</think><search> q </search>"),
        ("<answer>A</answer><search>q</search>", "<answer>A</answer>"),
        ("<search>q</search><answer>A</answer>", "<search>q</search>"),
        ("no stop string at all", "no stop string at all"),
        ("", ""),
        ("<search>unclosed", "<search>unclosed"),
    ],
)
def test_truncate_segment_cuts_after_first_stop_string(text, expected):
    assert truncate_segment(text) == expected


def test_truncate_segment_custom_tags():
    config = ProtocolConfig(search_tag="query", answer_tag="final")
    assert (
        truncate_segment("<search>x</search><query>y</query>tail", config)
        == "<search>x</search><query>y</query>"
    )


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([*"ab <>/", "<search>", "</search>", "<answer>", "</answer>"])).map("".join))
def test_truncate_then_parse_agrees_with_parse(text):
    """The segment a stop-string sampler returns parses to the same action as the untruncated text."""
    cut = truncate_segment(text)
    assert text.startswith(cut)
    assert cut.count("</search>") + cut.count("</answer>") <= 1
    truncated = parse_action(cut)
    if truncated.kind is not ActionKind.INVALID or truncated.reason is InvalidReason.EMPTY_CONTENT:
        assert truncated.end == len(cut)
        assert parse_action(text) == truncated


def test_observation_padding_sets_the_whitespace_around_information():
    config = ProtocolConfig(observation_padding="\n")
    assert (
        format_observation([Doc("1", "T", "x")], config) == "\n<information>Doc 1(Title: T) x</information>\n"
    )
    with pytest.raises(ValueError, match="observation_padding must be spaces and newlines"):
        ProtocolConfig(observation_padding="\n--\n")
