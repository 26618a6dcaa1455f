from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from tspo.configuration import (
    ConfigError,
    apply_overrides,
    deep_merge,
    describe,
    from_dict,
    parse_override,
    read_yaml,
    to_dict,
)


@dataclass
class Inner:
    rate: float = field(default=1e-3, metadata={"help": "learning rate"})
    mode: Literal["a", "b"] = "a"
    names: tuple[str, ...] = ("x",)


@dataclass
class Outer:
    steps: int = 10
    flag: bool = False
    path: str | None = None
    inner: Inner = field(default_factory=Inner)


def test_from_dict_builds_nested_and_coerces_yaml_forms():
    cfg = from_dict(Outer, {"steps": 3, "inner": {"rate": 1, "names": ["p", "q"]}})
    assert cfg.steps == 3
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.names == ("p", "q")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(
        ConfigError, match=r"unknown config key inner\.rat; valid keys under inner: mode, names, rate"
    ):
        from_dict(Outer, {"inner": {"rat": 1.0}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": "ten"}, "steps: expected an integer"),
        ({"steps": True}, "steps: expected an integer"),
        ({"flag": "yes"}, "flag: expected true or false"),
        ({"inner": {"mode": "c"}}, "inner.mode: 'c' is not one of 'a', 'b'"),
        ({"inner": 3}, "inner: expected a mapping"),
        ({"inner": {"names": "x"}}, r"inner\.names: expected a list"),
    ],
)
def test_wrong_types_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_optional_accepts_null():
    assert from_dict(Outer, {"path": None}).path is None
    assert from_dict(Outer, {"path": "a/b"}).path == "a/b"


def test_overrides_parse_values_as_yaml():
    assert parse_override("inner.rate=1e-6") == (["inner", "rate"], 1e-6)
    assert parse_override("flag=true") == (["flag"], True)
    assert parse_override('path="1e3"') == (["path"], "1e3")
    data = apply_overrides({"inner": {"mode": "a"}}, ["inner.mode=b", "steps=7"])
    assert from_dict(Outer, data) == Outer(steps=7, inner=Inner(mode="b"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        parse_override("steps")
    with pytest.raises(ConfigError, match="steps is a value, not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_deep_merge_and_round_trip(tmp_path):
    merged = deep_merge({"inner": {"rate": 1.0, "mode": "a"}}, {"inner": {"mode": "b"}})
    assert merged == {"inner": {"rate": 1.0, "mode": "b"}}
    cfg = from_dict(Outer, merged)
    assert from_dict(Outer, to_dict(cfg)) == cfg


def test_read_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        read_yaml(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        read_yaml(scalar)


def test_describe_lists_leaves_with_help():
    rows = {row[0]: row for row in describe(Outer)}
    assert rows["inner.rate"][3] == "learning rate"
    assert rows["inner.names"][2] == ["x"]
    assert "inner" not in rows


def test_override_text_with_colons_stays_a_string():
    assert parse_override("a.instruction=Answer it. Question: {question}") == (
        ["a", "instruction"],
        "Answer it. Question: {question}",
    )
    assert parse_override("a.b={x: 1}") == (["a", "b"], {"x": 1})


@dataclass
class Switches:
    precision: Literal["auto", "on", "off"] = "auto"
    choice: Literal["a", "b"] = "a"


def test_yaml_booleans_mean_the_word_of_a_word_literal():
    # YAML 1.1 parses `off` / `on` / `yes` as booleans; an option spelled in words takes the word.
    for text, word in (("off", "off"), ("on", "on"), ("no", "off"), ("yes", "on")):
        data = apply_overrides({}, [f"precision={text}"])
        assert from_dict(Switches, data).precision == word
    with pytest.raises(ConfigError, match="choice: True is not one of 'a', 'b'"):
        from_dict(Switches, apply_overrides({}, ["choice=yes"]))
