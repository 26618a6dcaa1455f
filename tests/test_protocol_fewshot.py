"""Few-shot prompts (``rollout.protocol.examples``): worked examples rendered by the code that renders real
rollouts, drawn from the training split with real retrieval, placed before the question; the Search-R1
recipes keep the zero-shot prompt byte for byte.

Real pieces: the synthetic world, a BM25 index over its corpus, a byte-level BPE tokenizer (the kind real
models use), the real rollout loop; only the policy is scripted.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tspo.data.qa import read_qa_jsonl
from tspo.data.world import WorldConfig, generate_world, write_world
from tspo.doc import Doc
from tspo.protocol import (
    SEARCH_R1_INSTRUCTION,
    ProtocolConfig,
    WorkedExample,
    build_instruction,
    build_prompt_messages,
    build_prompt_text,
    example_response,
)
from tspo.retrieval import BM25Retriever, read_corpus
from tspo.rollout import RolloutConfig, RolloutTask, ScriptedEngine, run_rollouts
from tspo.rollout.loop import build_prompt_ids
from tspo.training.config import load_train_config
from tspo.training.prompts import choose_worked_examples

ROOT = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fewshot")
    write_world(generate_world(WorldConfig(seed=0, size="tiny", hops="1:0.5,2:0.5")), root)
    corpus = list(read_corpus(root / "corpus.jsonl"))
    texts = [doc.contents for doc in corpus]
    return {
        "train": list(read_qa_jsonl(root / "train.jsonl")),
        "test": list(read_qa_jsonl(root / "test.jsonl")),
        "retriever": BM25Retriever.build(corpus, threads=1),
        "tokenizer": _bpe_tokenizer(texts, root / "bpe"),
    }


def _bpe_tokenizer(texts: list[str], directory: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800, special_tokens=["<|eos|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    # Observations end in "\n\n": like real BPE vocabularies, this one gets a "\n\n" token, which a
    # byte-level pre-tokenizer keeps only where no "<" follows (the few-shot pitfall).
    raw.train_from_iterator(
        [*texts, "search answer information Doc Title", *["</information>\n\n"] * 50], trainer
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|eos|>", pad_token="<|eos|>")
    tokenizer.save_pretrained(directory)
    return PreTrainedTokenizerFast.from_pretrained(directory)


def _rollout(**protocol_fields) -> RolloutConfig:
    protocol = ProtocolConfig(use_chat_template=False, **protocol_fields)
    return RolloutConfig(max_turns=3, max_new_tokens=24, max_observation_tokens=200, protocol=protocol)


def test_examples_come_from_the_given_split_with_real_retrieval(world):
    config = _rollout(examples=2)
    chosen = choose_worked_examples(
        world["train"], world["retriever"], world["tokenizer"], config, count=2, seed=0
    )
    train_questions = {ex.question for ex in world["train"]}
    assert [len(ex.searches) for ex in chosen] == [1, 2]  # one hop count each, fewest first
    for example in chosen:
        assert example.question in train_questions
        source = next(ex for ex in world["train"] if ex.question == example.question)
        assert [query for query, _ in example.searches] == source.metadata["chain"]
        for query, docs in example.searches:
            assert docs == tuple(world["retriever"].search([query], config.topk)[0])
        assert example.answer in " ".join(doc.text for doc in example.searches[-1][1])
    # Seeded: the same seed gives the same examples, another seed others.
    assert (
        choose_worked_examples(world["train"], world["retriever"], world["tokenizer"], config, 2, 0) == chosen
    )
    assert (
        choose_worked_examples(world["train"], world["retriever"], world["tokenizer"], config, 2, 1) != chosen
    )


def test_too_few_usable_questions_is_an_error_that_says_what_to_change(world):
    no_chain = [dataclasses.replace(ex, metadata={}) for ex in world["train"][:20]]
    with pytest.raises(ValueError, match=r"rollout\.protocol\.examples"):
        choose_worked_examples(no_chain, world["retriever"], world["tokenizer"], _rollout(), 1, 0)


def test_example_is_byte_identical_to_a_real_rollout_of_the_same_actions(world):
    """The pitfall of a hand-written example: its observation layout must be the environment's."""
    config = _rollout(examples=1)
    tokenizer = world["tokenizer"]
    (example,) = choose_worked_examples(
        [ex for ex in world["train"] if len(ex.metadata["chain"]) == 2],
        world["retriever"],
        tokenizer,
        config,
        1,
        0,
    )
    actions = [f"<search> {query} </search>" for query, _ in example.searches]
    actions.append(f"<answer> {example.answer} </answer>")
    result = run_rollouts(
        ScriptedEngine(tokenizer, actions),
        tokenizer,
        world["retriever"],
        [RolloutTask(question=example.question)],
        config,
    )
    (traj,) = result.trajectories
    real = tokenizer.decode(traj.prompt_ids + traj.response_ids)
    assert real == build_instruction(example.question, config.protocol) + example_response(
        example, config.protocol
    )
    # Token for token: a few-shot prompt starts with exactly the ids of that rollout (each segment is
    # tokenized on its own, as the loop does), then the separator and the real question.
    with_example = dataclasses.replace(config.protocol, examples=1).with_worked_examples([example])
    prompt = build_prompt_ids("Where was Bo born", tokenizer, with_example)
    rollout_ids = traj.prompt_ids + traj.response_ids
    assert prompt[: len(rollout_ids)] == rollout_ids
    assert tokenizer.decode(prompt[len(rollout_ids) :]) == "\n\n" + build_instruction(
        "Where was Bo born", config.protocol
    )
    # Tokenizing the text in one piece would not give those ids (the borders merge differently).
    whole = tokenizer(tokenizer.decode(rollout_ids), add_special_tokens=False)["input_ids"]
    assert whole != rollout_ids


def test_prompt_puts_the_examples_before_the_question(world):
    doc = Doc("7", "Ana Bel", "Ana Bel works at Zed Bank.")
    example = WorkedExample("Where does Ana Bel work?", (("Ana Bel works", (doc,)),), "Zed Bank")
    protocol = ProtocolConfig(examples=1).with_worked_examples([example])
    text = build_prompt_text("Where was Bo born", protocol)  # the text used without a chat template
    assert text == (
        build_instruction("Where does Ana Bel work?", protocol)
        + "<search> Ana Bel works </search>"
        + "\n\n<information>Doc 1(Title: Ana Bel) Ana Bel works at Zed Bank.</information>\n\n"
        + "<answer> Zed Bank </answer>\n\n"
        + build_instruction("Where was Bo born?", protocol)
    )
    messages = build_prompt_messages("Where was Bo born", protocol)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"] == example_response(example, protocol)
    # With a chat template the examples are earlier user / assistant turns of the same conversation.
    tokenizer = world["tokenizer"]
    tokenizer.chat_template = CHAT_TEMPLATE
    try:
        chat = tokenizer.decode(build_prompt_ids("Where was Bo born", tokenizer, protocol))
        assert chat.startswith(f"<|user|>{build_instruction('Where does Ana Bel work?', protocol)}<|end|>")
        assert f"<|assistant|>{example_response(example, protocol)}<|end|>" in chat
        assert chat.endswith(
            f"<|user|>{build_instruction('Where was Bo born?', protocol)}<|end|><|assistant|>"
        )
    finally:
        tokenizer.chat_template = None


def test_examples_are_not_a_config_key_and_default_to_zero_shot():
    from tspo.configuration import describe, to_dict
    from tspo.training.config import TrainConfig

    keys = [row[0] for row in describe(TrainConfig)]
    assert "rollout.protocol.examples" in keys
    assert not any(key.endswith("worked_examples") for key in keys)
    assert "worked_examples" not in to_dict(ProtocolConfig())
    assert (
        build_prompt_text("q") == build_instruction("q") == SEARCH_R1_INSTRUCTION.replace("{question}", "q?")
    )


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("search_r1_*.yaml")), ids=lambda p: p.stem)
def test_search_r1_recipes_keep_the_zero_shot_prompt_byte_for_byte(recipe):
    config = load_train_config(config_path=recipe)
    protocol = config.rollout.protocol
    assert protocol.examples == 0
    question = "who got the first nobel prize in physics"
    expected = SEARCH_R1_INSTRUCTION.replace("{question}", question + "?")
    assert build_prompt_text(question, protocol) == expected
    assert build_prompt_messages(question, protocol) == [{"role": "user", "content": expected}]


def test_examples_round_trip_through_json(world):
    import json

    from tspo.training.prompts import worked_examples_from_json, worked_examples_to_json

    chosen = choose_worked_examples(world["train"], world["retriever"], world["tokenizer"], _rollout(), 2, 0)
    stored = json.loads(json.dumps(worked_examples_to_json(chosen)))
    assert worked_examples_from_json(stored) == chosen
