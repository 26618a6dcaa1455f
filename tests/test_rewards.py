"""Tests of tspo.rewards (DESIGN section 4): answer matching, FOLR, categories, Kimi length penalty."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tspo.doc import Doc
from tspo.protocol import format_observation, invalid_observation
from tspo.rewards import (
    OUTCOME_METRICS,
    HitMode,
    TrajectoryCategory,
    answer_in_text,
    exact_match,
    f1_score,
    first_hit_turn,
    kimi_length_penalty,
    normalize_answer,
    outcome_score,
    sub_exact_match,
    trajectory_category,
    trajectory_total,
    turn_rewards,
)
from tspo.scoring import score_trajectories
from tspo.trajectory import TrajectoryBuilder, TurnAction

# ------------------------------------------------------------------------------------ normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paris", "paris"),
        ("The Eiffel Tower!", "eiffel tower"),
        ("  A  man,\ta plan\n ", "man plan"),
        ("an apple", "apple"),
        ("The the THE", ""),
        # articles only as whole words
        ("Anne theatre another", "anne theatre another"),
        # punctuation goes before articles (SQuAD order): "a." is an article, "a.b" is a word
        ("a. b", "b"),
        ("a.b", "ab"),
        ("the-end", "theend"),
        ("U.S.A.", "usa"),
        ("O'Neill's", "oneills"),
        # numbers: only ASCII punctuation inside them is dropped
        ("1,000", "1000"),
        ("3.5%", "35"),
        ("No. 9", "no 9"),
        ("1 000", "1 000"),
        ("", ""),
        ("   ", ""),
    ],
)
def test_normalize_answer_squad_rule(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Ünïcödé CAFÉ", "ünïcödé café"),
        # string.punctuation is ASCII only, as in the SQuAD script: typographic marks stay
        ("“Paris” — «France»", "“paris” — «france»"),
        ("São Paulo, Brazil", "são paulo brazil"),
        # "thé" is one word, not the article "the"
        ("thé the", "thé"),
        # non-breaking and other Unicode spaces collapse
        ("New\u00a0York\u2003City", "new york city"),
        ("東京 タワー", "東京 タワー"),
    ],
)
def test_normalize_answer_non_ascii(text, expected):
    assert normalize_answer(text) == expected


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_normalize_answer_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once
    assert once == once.strip()
    assert "  " not in once


# ----------------------------------------------------------------------------------- EM / sub-EM / F1


def test_exact_match_max_over_aliases():
    assert exact_match("paris", ["Lyon", "Paris"]) == 1.0
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("Paris France", ["Paris"]) == 0.0
    assert exact_match("paris", ("lyon", "nice")) == 0.0
    assert exact_match("paris", (g for g in ["x", "PARIS"])) == 1.0


def test_sub_exact_match_is_containment():
    assert sub_exact_match("It is Paris, France", ["Lyon", "paris"]) == 1.0
    assert sub_exact_match("Paris", ["Paris France"]) == 0.0
    # character containment, as Search-R1's subem_check and FlashRAG: "art" is inside "party"
    assert sub_exact_match("party", "art") == 1.0
    assert f1_score("party", "art") == 0.0


def test_f1_token_overlap_max_over_aliases():
    assert f1_score("Paris France", "Paris") == pytest.approx(2 / 3)
    assert f1_score("new york city", ["york", "New York City"]) == 1.0
    assert f1_score("new york city", ["york"]) == pytest.approx(0.5)
    # repeated tokens count once per occurrence in both (Counter intersection)
    assert f1_score("paris paris", "paris") == pytest.approx(2 / 3)
    assert f1_score("lyon", ["paris", "nice"]) == 0.0


@pytest.mark.parametrize("score", [exact_match, sub_exact_match, f1_score])
@pytest.mark.parametrize("prediction", [None, "", "   ", "the", "a an the ."])
def test_empty_or_missing_answer_scores_zero(score, prediction):
    # even when the gold also normalizes to "" ("a"), an empty answer is never right
    assert score(prediction, ["Paris", "a", ""]) == 0.0


@pytest.mark.parametrize("score", [exact_match, sub_exact_match, f1_score])
def test_empty_gold_aliases_are_ignored(score):
    assert score("anything at all", ["", "  ", "the"]) == 0.0
    assert score("anything at all", []) == 0.0
    assert score("Paris", ["", "paris"]) == 1.0


def test_outcome_score_dispatches_by_metric():
    assert set(OUTCOME_METRICS) == {"em", "sub_em", "f1"}
    assert outcome_score("Paris France", ["paris"]) == 0.0  # em is the default
    assert outcome_score("Paris France", ["paris"], "sub_em") == 1.0
    assert outcome_score("Paris France", ["paris"], "f1") == pytest.approx(2 / 3)
    assert outcome_score(None, ["paris"], "f1") == 0.0


def test_outcome_score_unknown_metric_is_named():
    with pytest.raises(ValueError, match=r"'bleu'.*em"):
        outcome_score("x", ["x"], "bleu")


_WORDS = ["the", "a", "an", "Paris", "paris", "new", "York", "art", "party", "1,000", "U.S.", "café", "Île"]
_phrase = st.lists(st.sampled_from(_WORDS), min_size=1, max_size=4).map(" ".join)


@st.composite
def _prediction_and_golds(draw):
    prediction = draw(_phrase)
    golds = draw(st.lists(_phrase, max_size=3))
    if draw(st.booleans()):  # often include a surface variant of the prediction itself
        variant = draw(st.sampled_from([str.upper, str.lower, lambda s: f" The {s}!", lambda s: s + "."]))
        golds.insert(draw(st.integers(0, len(golds))), variant(prediction))
    return prediction, golds


@settings(max_examples=100, deadline=None)
@given(_prediction_and_golds())
def test_em_implies_sub_em_and_full_f1(case):
    prediction, golds = case
    em, sub, f1 = (
        exact_match(prediction, golds),
        sub_exact_match(prediction, golds),
        f1_score(prediction, golds),
    )
    assert {em, sub} <= {0.0, 1.0}
    assert 0.0 <= f1 <= 1.0
    assert em <= sub
    if em:
        assert f1 == 1.0
    if not normalize_answer(prediction):
        assert em == sub == f1 == 0.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(_WORDS), min_size=1, max_size=6), st.data())
def test_sub_em_on_whole_tokens_implies_positive_f1(words, data):
    """sub-EM alone does not imply F1 > 0 ("art" in "party"); a gold made of whole tokens of the answer does."""
    prediction = " ".join(words)
    start = data.draw(st.integers(0, len(words) - 1))
    stop = data.draw(st.integers(start + 1, len(words)))
    gold = " ".join(words[start:stop])
    assume(normalize_answer(gold))
    assert sub_exact_match(prediction, [gold]) == 1.0
    assert f1_score(prediction, [gold]) > 0.0


# ----------------------------------------------------------------------------------- FOLR: hit / k*


def test_whole_word_default_vs_substring():
    assert answer_in_text("The party was fun", "art") is False
    assert answer_in_text("The party was fun", "art", HitMode.SUBSTRING) is True
    assert answer_in_text("The party was fun", "art", "substring") is True
    assert answer_in_text("Modern art gallery", "art") is True


@pytest.mark.parametrize(
    ("text", "golds"),
    [
        ("It was in the New York Times.", "new york"),
        ("the U.S. army", ["Canada", "US"]),
        ("capital is Paris</information>", "Paris"),
        ("Doc 2(Title: Paris) city", "paris"),
        ("AC/DC played", "AC/DC"),
        ("São Paulo", "são paulo"),
    ],
)
def test_whole_word_hits(text, golds):
    assert answer_in_text(text, golds) is True


@pytest.mark.parametrize(
    ("text", "golds"),
    [
        ("Parisian cafes", "Paris"),
        ("New Yorker magazine", "new york"),
        ("nothing here", ["", "the", "  "]),  # empty aliases never hit
        ("", "Paris"),
        ("the the the", "the"),
    ],
)
def test_whole_word_misses(text, golds):
    assert answer_in_text(text, golds) is False


def test_empty_aliases_never_hit_in_substring_mode():
    assert answer_in_text("anything", ["", "a"], HitMode.SUBSTRING) is False


def test_unknown_hit_mode_is_rejected():
    with pytest.raises(ValueError, match="fuzzy"):
        answer_in_text("x", "x", "fuzzy")


def test_first_hit_turn_is_the_first_observation_with_the_answer():
    observations = ["", "no luck", "Paris is the capital", "Paris again"]
    assert first_hit_turn(observations, ["Paris"]) == 2
    assert first_hit_turn(observations, "paris") == 2
    assert first_hit_turn(observations, ["Lyon"]) is None
    assert first_hit_turn([], ["Paris"]) is None
    assert first_hit_turn(["a party"], ["art"]) is None
    assert first_hit_turn(["a party"], ["art"], "substring") == 0


# ---------------------------------------------------------------------------------- FOLR: rewards


@pytest.mark.parametrize(
    ("num_turns", "k_star", "outcome", "expected"),
    [
        (3, 1, 1.0, [0.0, 0.3, 1.0]),  # complete success
        (3, 0, 0.0, [0.3, 0.0, 0.0]),  # near miss
        (3, None, 1.0, [0.0, 0.0, 1.0]),  # success without retrieval
        (2, None, 0.0, [0.0, 0.0]),  # complete failure
        (2, 1, 1.0, [0.0, 1.3]),  # hit on the last turn
        (1, None, 0.5, [0.5]),  # F1 outcome
        (0, None, 0.0, []),
    ],
)
def test_turn_rewards(num_turns, k_star, outcome, expected):
    assert turn_rewards(num_turns, k_star, outcome, alpha=0.3) == pytest.approx(expected)


def test_trajectory_total():
    assert trajectory_total(None, 1.0) == 1.0
    assert trajectory_total(0, 0.0) == pytest.approx(0.3)
    assert trajectory_total(4, 1.0, alpha=0.5) == pytest.approx(1.5)
    assert trajectory_total(2, 0.0, alpha=0.0) == 0.0


def test_near_miss_ranks_below_any_success():
    near_miss = trajectory_total(0, 0.0, alpha=0.99)
    assert near_miss < trajectory_total(None, 1.0, alpha=0.99)
    assert trajectory_total(None, 0.0) < near_miss


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_alpha_is_validated(alpha):
    with pytest.raises(ValueError, match="alpha"):
        turn_rewards(2, 0, 1.0, alpha)
    with pytest.raises(ValueError, match="alpha"):
        trajectory_total(0, 1.0, alpha)


def test_alpha_zero_is_plain_outcome():
    assert turn_rewards(3, 0, 1.0, alpha=0.0) == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(("num_turns", "k_star"), [(2, 2), (2, -1), (0, 0)])
def test_first_hit_turn_outside_the_turns_is_rejected(num_turns, k_star):
    with pytest.raises(ValueError, match="outside"):
        turn_rewards(num_turns, k_star, 1.0)


def test_negative_turn_count_is_rejected():
    with pytest.raises(ValueError, match="num_turns"):
        turn_rewards(-1, None, 1.0)


# ------------------------------------------------- FOLR properties on real trajectories (hypothesis)

# Gold answers use letters that never occur in the distractor passages nor in the protocol's own
# scaffolding ("<information>", "Doc 1(Title: ...)"), so a hit can only come from an inserted gold.
_GOLD_WORD = st.text(alphabet="qxzjkvw", min_size=2, max_size=6)
_PLAIN_WORD = st.text(alphabet="abcdefghilmnoprstu", min_size=1, max_size=8)


@st.composite
def _folr_case(draw):
    golds = draw(st.lists(st.lists(_GOLD_WORD, min_size=1, max_size=2).map(" ".join), min_size=1, max_size=3))
    num_turns = draw(st.integers(1, 5))
    # per turn: None (no observation), or a list of docs and whether a gold alias is planted in one
    # the last turn answers; an earlier one may also end without an observation (a truncated generation)
    plan = [draw(st.sampled_from([None, False, False, True, True])) for _ in range(num_turns - 1)]
    plan.append(None)
    return (
        golds,
        plan,
        draw(st.floats(0.0, 1.0)),
        draw(st.sampled_from([0.0, 0.1, 0.3, 0.9])),
        draw(st.data()),
    )


def _build_folr_trajectory(golds, plan, data, *, gold_in_own_text):
    """Question and every generated segment mention a gold; observations hold it only where planned."""
    builder = TrajectoryBuilder([1, 2, 3], question=f"Is it {golds[0]}?", golds=tuple(golds))
    next_id = 10
    for planted in plan:
        think = f"<think>maybe {golds[0]}</think>" if gold_in_own_text else "<think>hmm</think>"
        if planted is None:
            text, action = (
                f"{think}<answer> {golds[-1] if gold_in_own_text else 'none'} </answer>",
                TurnAction.ANSWER,
            )
        else:
            text, action = (
                f"{think}<search> {golds[0] if gold_in_own_text else 'who'} </search>",
                TurnAction.SEARCH,
            )
        n_gen = data.draw(st.integers(0, 4))
        builder.add_generation(list(range(next_id, next_id + n_gen)), [-0.5] * n_gen, text, action)
        next_id += n_gen
        if planted is None:
            continue
        words = data.draw(st.lists(_PLAIN_WORD, min_size=1, max_size=12))
        docs = [Doc(str(i), f"title {i}", " ".join(words[i::3])) for i in range(min(3, len(words)))]
        if planted:
            gold = data.draw(st.sampled_from(golds))
            slot = data.draw(st.integers(0, len(docs) - 1))
            docs[slot] = Doc(docs[slot].id, docs[slot].title, f"{docs[slot].text} {gold}, indeed")
        n_obs = data.draw(st.integers(0, 4))
        builder.add_observation([5] * n_obs, format_observation(docs), docs)
    return builder.build()


@settings(max_examples=60, deadline=None)
@given(_folr_case(), st.sampled_from(list(HitMode)))
def test_folr_pays_at_most_once_on_the_first_hit(case, mode):
    golds, plan, outcome, alpha, data = case
    traj = _build_folr_trajectory(golds, plan, data, gold_in_own_text=True)
    planted_turns = [k for k, planted in enumerate(plan) if planted]
    expected_k_star = planted_turns[0] if planted_turns else None

    k_star = first_hit_turn(traj.observation_texts, golds, mode)
    assert k_star == expected_k_star

    rewards = turn_rewards(traj.num_turns, k_star, outcome, alpha)
    total = trajectory_total(k_star, outcome, alpha)
    assert len(rewards) == traj.num_turns
    assert sum(rewards) == pytest.approx(total)
    assert total == pytest.approx(outcome + (alpha if planted_turns else 0.0))
    # remove the outcome from the last turn: what is left is alpha on k* and nothing elsewhere
    shaping = [*rewards[:-1], rewards[-1] - outcome]
    paid = [k for k, r in enumerate(shaping) if r != pytest.approx(0.0)]
    assert paid == ([expected_k_star] if planted_turns and alpha > 0 else [])
    if paid:
        assert shaping[paid[0]] == pytest.approx(alpha)


@settings(max_examples=40, deadline=None)
@given(_folr_case(), st.sampled_from(list(HitMode)))
def test_folr_never_pays_for_the_models_own_text_or_the_question(case, mode):
    golds, plan, _outcome, alpha, data = case
    plan = [None if planted is None else False for planted in plan]  # no gold in any observation
    traj = _build_folr_trajectory(golds, plan, data, gold_in_own_text=True)
    # the gold really is in the question and in the generated text ...
    assert answer_in_text(traj.question, golds, mode)
    assert all(answer_in_text(text, golds, mode) for text in traj.generated_texts)
    # ... and still no turn is a hit, so no turn is paid alpha
    assert first_hit_turn(traj.observation_texts, golds, mode) is None
    assert score_trajectories([traj], folr_alpha=alpha, hit_mode=mode.value)[0].first_hit_turn is None


# ------------------------------------------- FOLR must read retrieved passages, not protocol text


def _scored_first_hit(observations, golds, mode="whole_word"):
    """k* as the scorer computes it for a trajectory whose turns append ``observations``."""
    builder = TrajectoryBuilder([1], question="q?", golds=tuple(golds))
    for observation, is_search in observations:
        builder.add_generation([7], [-0.1], "<search>q</search>" if is_search else "hmm", TurnAction.SEARCH)
        builder.add_observation([8, 8], observation)
    builder.add_generation([7], [-0.1], "<answer>x</answer>", TurnAction.ANSWER)
    return score_trajectories([builder.build()], hit_mode=mode)[0].first_hit_turn


_THREE_DOCS = [Doc("1", "Paris", "capital of France"), Doc("2", "Lyon", "a city"), Doc("3", "Nice", "coast")]


@pytest.mark.parametrize("gold", ["1", "2", "3", "Doc", "Title", "information"])
def test_whole_word_hit_ignores_observation_scaffolding(gold):
    assert _scored_first_hit([(format_observation(_THREE_DOCS), True)], [gold]) is None


def test_whole_word_hit_on_passage_title_and_text_still_counts():
    assert _scored_first_hit([(format_observation(_THREE_DOCS), True)], ["Lyon"]) == 0
    assert _scored_first_hit([(format_observation(_THREE_DOCS), True)], ["coast"]) == 0


@pytest.mark.parametrize("mode", ["whole_word", "substring"])
def test_an_alias_never_straddles_two_passages(mode):
    straddling = [Doc("1", "Moves", "He moved to New"), Doc("2", "Cities", "York is a city")]
    assert _scored_first_hit([(format_observation(straddling), True)], ["New York"], mode) is None
    inside = [*straddling, Doc("3", "NYC", "New York is large")]
    assert _scored_first_hit([(format_observation(inside), True)], ["New York"], mode) == 0
    # A title and its own text are one passage.
    assert _scored_first_hit([(format_observation([Doc("4", "New", "York")]), True)], ["New York"], mode) == 0
    assert first_hit_turn([["He moved to New", "York is a city"]], ["New York"], mode) is None
    assert first_hit_turn([[], ["x"], ["New York"]], ["New York"], mode) == 2


def test_substring_mode_reads_only_inside_information_blocks():
    assert _scored_first_hit([(format_observation(_THREE_DOCS), True)], ["information"], "substring") is None


@pytest.mark.parametrize("mode", ["whole_word", "substring"])
@pytest.mark.parametrize("gold", ["search", "final answer", "try again", "query"])
def test_invalid_action_message_is_never_a_hit(mode, gold):
    assert _scored_first_hit([(invalid_observation(), False)], [gold], mode) is None


# ---------------------------------------------------------------------------------------- categories


@pytest.mark.parametrize(
    ("hit", "outcome", "category"),
    [
        (False, 0.0, TrajectoryCategory.COMPLETE_FAILURE),
        (True, 0.0, TrajectoryCategory.NEAR_MISS),
        (True, 1.0, TrajectoryCategory.COMPLETE_SUCCESS),
        (False, 1.0, TrajectoryCategory.SUCCESS_WITHOUT_RETRIEVAL),
        (True, 0.99, TrajectoryCategory.NEAR_MISS),  # an F1 of 0.99 is not a success by default
    ],
)
def test_trajectory_category(hit, outcome, category):
    assert trajectory_category(hit, outcome) == category.value


def test_trajectory_category_threshold_for_f1():
    assert trajectory_category(False, 0.5, success_threshold=0.5) == "success_without_retrieval"
    assert trajectory_category(True, 0.49, success_threshold=0.5) == "near_miss"


# ---------------------------------------------------------------------------------- length penalty


def test_kimi_length_penalty_correct_and_wrong():
    lengths = [10, 20, 30, 10, 20, 30]
    correct = [True, True, True, False, False, False]
    assert kimi_length_penalty(lengths, correct) == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0, -0.5])


def test_kimi_length_penalty_weight_and_interpolation():
    # lam = 0.5 - (L - 10) / 40 -> 0.5, 0.25, -0.5
    assert kimi_length_penalty([10, 20, 50], [True, True, False], weight=0.2) == pytest.approx(
        [0.1, 0.05, -0.1]
    )


def test_kimi_length_penalty_equal_lengths_is_zero():
    assert kimi_length_penalty([7, 7, 7], [True, False, True], weight=3.0) == [0.0, 0.0, 0.0]
    assert kimi_length_penalty([5], [True]) == [0.0]
    assert kimi_length_penalty([], []) == []


def test_kimi_length_penalty_length_mismatch_is_named():
    with pytest.raises(ValueError, match="2 lengths but 3"):
        kimi_length_penalty([1, 2], [True, False, True])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.booleans()), min_size=1, max_size=16),
    st.floats(0.0, 5.0),
)
def test_kimi_length_penalty_bounds(rollouts, weight):
    lengths, correct = [r[0] for r in rollouts], [r[1] for r in rollouts]
    penalties = kimi_length_penalty(lengths, correct, weight)
    assert len(penalties) == len(rollouts)
    tol = 1e-12
    for length, is_correct, penalty in zip(lengths, correct, penalties, strict=True):
        if is_correct:
            assert -0.5 * weight - tol <= penalty <= 0.5 * weight + tol
        else:
            assert -0.5 * weight - tol <= penalty <= tol
        if length == min(lengths) and len(set(lengths)) > 1 and is_correct:
            assert penalty == pytest.approx(0.5 * weight)
        if length == max(lengths):
            assert penalty == pytest.approx(-0.5 * weight if len(set(lengths)) > 1 else 0.0)
    # at equal correctness, a shorter rollout never gets a smaller term than a longer one
    for la, ca, pa in zip(lengths, correct, penalties, strict=True):
        for lb, cb, pb in zip(lengths, correct, penalties, strict=True):
            if ca == cb and la < lb:
                assert pa >= pb - tol
