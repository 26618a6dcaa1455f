"""Entity renaming of warm-start demonstrations: consistent, whole-word, and still answerable by copying."""

from __future__ import annotations

import pytest

from tspo.data.qa import read_qa_jsonl
from tspo.data.world import WorldConfig, generate_world, load_world, write_world
from tspo.data.world.names import name_words
from tspo.retrieval import BM25Retriever, read_corpus
from tspo.rewards import answer_in_text
from tspo.rollout import RolloutConfig, build_tiny_model, load_policy
from tspo.training.renaming import EntityRenamer
from tspo.training.warmstart import build_demonstrations


def test_name_words_drop_kinds_and_city_forms():
    assert name_words(["Port Tessel", "Kelvaro Bank", "Bama Poben", "New Trulful", "Zesankon City"]) == {
        "tessel",
        "kelvaro",
        "bama",
        "poben",
        "trulful",
        "zesankon",
    }


def test_mapping_is_consistent_one_to_one_and_keeps_capitalisation():
    renamer = EntityRenamer(
        ["Bama", "Poben", "Varnel", "Varnell", "Tessel"], substitutes=list("abcdefgh"), seed=3
    )
    texts = [
        "Where was Bama Poben born?",
        "bama poben works for Varnell Bank.",
        "Varnel lives in Port Tessel.",
    ]
    mapping = renamer.draw_mapping(texts)
    assert set(mapping) == {"bama", "poben", "varnel", "varnell", "tessel"}
    assert len(set(mapping.values())) == len(mapping)
    renamed = [renamer.apply(mapping, text) for text in texts]
    assert renamed[0] == f"Where was {mapping['bama'].capitalize()} {mapping['poben'].capitalize()} born?"
    assert renamed[1].startswith(
        f"{mapping['bama']} {mapping['poben']} works for {mapping['varnell'].capitalize()}"
    )
    assert renamed[2] == f"{mapping['varnel'].capitalize()} lives in Port {mapping['tessel'].capitalize()}."


def test_only_whole_words_are_renamed_and_draws_are_seeded():
    renamer = EntityRenamer(["bama"], substitutes=["zed", "kol"], seed=0)
    mapping = renamer.draw_mapping(["Bamaville and bama"])
    assert renamer.apply(mapping, "Bamaville and bama") == f"Bamaville and {mapping['bama']}"
    again = EntityRenamer(["bama"], substitutes=["zed", "kol"], seed=0)
    assert again.draw_mapping(["bama"]) == mapping


def test_more_names_than_substitutes_is_an_error():
    renamer = EntityRenamer(["a", "b", "c"], substitutes=["x", "y"])
    with pytest.raises(ValueError, match="3 names to replace but only 2 substitutes"):
        renamer.draw_mapping(["a b c"])


@pytest.fixture(scope="module")
def world_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(generate_world(WorldConfig(seed=0, size="tiny", hops="1:0.5,2:0.5")), root / "world")
    world = load_world(root / "world")
    corpus = list(read_corpus(root / "world" / "corpus.jsonl"))
    examples = list(read_qa_jsonl(root / "world" / "train.jsonl"))[:24]
    model_dir = build_tiny_model(
        [doc.contents for doc in corpus] + [ex.question for ex in examples], root / "tiny", hidden_size=32
    )
    _, tokenizer = load_policy(model_dir)
    names = name_words(entity.name for entity in world.entities.values())
    return examples, tokenizer, BM25Retriever.build(corpus), names


def test_renamed_demonstrations_hide_the_world_facts_but_keep_the_answer_copyable(world_setup):
    examples, tokenizer, retriever, names = world_setup
    rollout = RolloutConfig(max_observation_tokens=512)
    originals = build_demonstrations(examples, tokenizer, retriever, rollout)
    renamed = build_demonstrations(
        examples, tokenizer, retriever, rollout, copies=2, renamer=EntityRenamer(names, seed=0)
    )
    assert len(renamed) == 2 * len(originals)
    first_copy, second_copy = renamed[: len(originals)], renamed[len(originals) :]
    # Substitutes are the world's own name words, so a renamed answer may by chance be another name.
    changed = sum(
        one.golds[0].lower() != original.golds[0].lower()
        for one, original in zip(first_copy, originals, strict=True)
    )
    assert changed >= 0.9 * len(originals)
    for original, one, two in zip(originals, first_copy, second_copy, strict=True):
        assert one.num_turns == original.num_turns == two.num_turns
        assert one.question != original.question and one.question != two.question
        # The answer is still in the last search's retrieved text, under its new name.
        assert answer_in_text(one.retrieved_texts()[-2], one.golds)
        assert one.turns[-1].content == one.golds[0]

    def names_in(question: str) -> set[str]:
        return {word for word in question.lower().replace("?", " ").split() if word in names}

    hidden = sum(
        names_in(original.question).isdisjoint(names_in(one.question))
        for one, original in zip(first_copy, originals, strict=True)
    )
    assert hidden >= 0.8 * len(originals)


def test_early_answer_demonstrations_stop_after_the_first_search_and_answer_the_bridge(world_setup):
    examples, tokenizer, retriever, names = world_setup
    rollout = RolloutConfig(max_observation_tokens=512)
    full = build_demonstrations(examples, tokenizer, retriever, rollout)
    early = build_demonstrations(
        examples,
        tokenizer,
        retriever,
        rollout,
        renamer=EntityRenamer(names, seed=0),
        early_answer_fraction=1.0,
    )
    multi_hop = [i for i, ex in enumerate(examples) if len(ex.metadata["chain"]) > 1]
    assert multi_hop and len(multi_hop) < len(examples)
    for i, (demo, whole) in enumerate(zip(early, full, strict=True)):
        if i not in multi_hop:
            assert demo.num_turns == whole.num_turns and demo.turns[-1].content == demo.golds[0]
            continue
        # One search, then the answer: the renamed first bridge, found in that search's passages.
        assert [turn.action.value for turn in demo.turns] == ["search", "answer"]
        answer = demo.turns[-1].content
        assert answer != demo.golds[0]
        assert answer_in_text(demo.retrieved_texts()[0], [answer])

    half = build_demonstrations(
        examples, tokenizer, retriever, rollout, copies=8, early_answer_fraction=0.5, seed=3
    )
    stopped = sum(
        demo.num_turns == 2
        for demo, ex in zip(half, examples * 8, strict=True)
        if len(ex.metadata["chain"]) > 1
    )
    assert 0.3 * 8 * len(multi_hop) <= stopped <= 0.7 * 8 * len(multi_hop)
    again = build_demonstrations(
        examples, tokenizer, retriever, rollout, copies=8, early_answer_fraction=0.5, seed=3
    )
    assert [demo.turns[-1].content for demo in again] == [demo.turns[-1].content for demo in half]


def test_early_answers_without_multi_hop_questions_warn_that_they_do_nothing(world_setup, caplog):
    examples, tokenizer, retriever, _ = world_setup
    one_hop = [ex for ex in examples if len(ex.metadata["chain"]) == 1]
    with caplog.at_level("WARNING", logger="tspo.training.warmstart"):
        demos = build_demonstrations(
            one_hop, tokenizer, retriever, RolloutConfig(), early_answer_fraction=0.5
        )
    assert len(demos) == len(one_hop)
    assert "early_answer_fraction=0.5 has no effect" in caplog.text
