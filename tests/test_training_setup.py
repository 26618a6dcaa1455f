"""Which questions the warm start demonstrates and which ones RL draws from."""

from __future__ import annotations

import pytest

from conftest import TINY_RUN_OVERRIDES
from tspo.data.qa import QAExample
from tspo.training.config import load_train_config
from tspo.training.setup import ResourceError, split_demonstrations
from tspo.training.trainer import Trainer


def questions(n: int) -> list[QAExample]:
    return [QAExample(id=f"q{i}", question=f"question {i}?", golds=[f"a{i}"]) for i in range(n)]


def config(*overrides: str):
    return load_train_config("tiny", None, ["warmstart.rename_entities=false", *overrides])


def test_rest_is_the_complement_of_the_demonstrations_and_depends_only_on_the_seed():
    train = questions(50)
    demos, rest = split_demonstrations(config("warmstart.demos=20", "warmstart.steps=5"), train)
    assert len(demos) == 20 and len(rest) == 30
    assert {ex.id for ex in demos}.isdisjoint(ex.id for ex in rest)
    assert {ex.id for ex in demos} | {ex.id for ex in rest} == {ex.id for ex in train}
    again, _ = split_demonstrations(config("warmstart.demos=20", "warmstart.steps=5"), train)
    other, _ = split_demonstrations(
        config("warmstart.demos=20", "warmstart.steps=5", "trainer.seed=1"), train
    )
    assert [ex.id for ex in again] == [ex.id for ex in demos]
    assert [ex.id for ex in other] != [ex.id for ex in demos]


@pytest.mark.parametrize(
    ("overrides", "rl_size"),
    [
        (["warmstart.steps=5"], 30),  # auto with a warm start: the rest
        (["warmstart.steps=0"], 50),  # auto without one: everything
        (["warmstart.steps=0", "warmstart.rl_prompts=rest"], 30),  # a shared warm start made elsewhere
        (["warmstart.steps=5", "warmstart.rl_prompts=all"], 50),
        (["warmstart.steps=5", "warmstart.rename_entities=true"], 50),  # renamed copies memorise nothing
    ],
)
def test_rl_prompts_setting(overrides, rl_size):
    _, rl = split_demonstrations(config("warmstart.demos=20", *overrides), questions(50))
    assert len(rl) == rl_size


def test_demonstrating_every_question_leaves_nothing_for_rl_and_says_how_to_fix_it():
    with pytest.raises(ResourceError, match=r"warmstart.demos=80 uses all 50 .*warmstart.rl_prompts=all"):
        split_demonstrations(config("warmstart.demos=80", "warmstart.steps=5"), questions(50))


def test_trainer_draws_rl_prompts_only_from_questions_it_did_not_demonstrate(tmp_path):
    cfg = load_train_config(
        "tiny",
        None,
        [
            *TINY_RUN_OVERRIDES,
            "warmstart.demos=150",
            "warmstart.rename_entities=false",
            f"trainer.output_dir={tmp_path / 'run'}",
        ],
    )
    trainer = Trainer(cfg)
    trainer.setup()
    demos, _ = split_demonstrations(cfg, trainer.resources.train_examples)
    drawn = trainer.sampler.draw(3 * len(trainer.resources.rl_examples))
    assert len(trainer.resources.rl_examples) == len(trainer.resources.train_examples) - 150
    assert {ex.id for ex in drawn} == {ex.id for ex in trainer.resources.rl_examples}
    assert {ex.id for ex in drawn}.isdisjoint(ex.id for ex in demos)


def test_renaming_needs_the_synthetic_world():
    from tspo.training.setup import world_renamer

    cfg = load_train_config("tiny", None, ["data.source=files", "data.train_file=qa.jsonl"])
    with pytest.raises(ResourceError, match=r"rename_entities=true needs data\.source=world"):
        world_renamer(cfg, None)


def test_zero_demonstration_copies_is_a_config_error():
    from tspo.configuration import ConfigError

    with pytest.raises(ConfigError, match=r"warmstart.copies must be >= 1, got 0"):
        load_train_config("tiny", None, ["warmstart.copies=0"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "warmstart.early_answer_fraction=1.5",
            r"warmstart.early_answer_fraction must be in \[0, 1\], got 1.5",
        ),
        ("warmstart.warmup_steps=-1", r"warmstart.warmup_steps must be >= 0, got -1"),
    ],
)
def test_out_of_range_warm_start_settings_are_config_errors(override, message):
    from tspo.configuration import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_train_config("tiny", None, [override])
