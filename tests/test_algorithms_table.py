"""The algorithm table: one meaning per algorithm name, on every path."""

from __future__ import annotations

from typing import get_args

import pytest

from tspo.algorithms import ALGORITHMS, DEFAULT_DUAL_CLIP, resolve_algorithm
from tspo.training.config import AlgorithmConfig, AlgorithmName

BASELINES = ("grpo", "drgrpo", "rloo", "dspo")


def test_the_config_offers_exactly_the_table() -> None:
    assert sorted(get_args(AlgorithmName)) == sorted(ALGORITHMS.names())


@pytest.mark.parametrize("name", BASELINES)
def test_no_baseline_is_paid_folr(name: str) -> None:
    assert not ALGORITHMS.get(name).pays_folr
    resolved = AlgorithmConfig(name=name).resolved()
    assert not resolved.pays_folr and resolved.folr_alpha(0.3) == 0.0 and resolved.overrides == ()


@pytest.mark.parametrize(
    ("name", "mode"),
    [("tspo", "adaptive"), ("tspo_turn", "turn"), ("tspo_traj", "traj"), ("tspo_legacy", "legacy")],
)
def test_tspo_rows_pay_folr_with_their_mode(name: str, mode: str) -> None:
    resolved = AlgorithmConfig(name=name).resolved()
    assert resolved.estimator == "tspo" and dict(resolved.estimator_options) == {"mode": mode}
    assert resolved.pays_folr and resolved.folr_alpha(0.3) == 0.3
    assert resolved.spec.verl_estimator == "tspo"


def test_dspo_uses_its_own_estimator_loss_and_filter() -> None:
    resolved = AlgorithmConfig(name="dspo").resolved()
    assert (resolved.estimator, resolved.policy_loss, resolved.group_filter) == (
        "dspo",
        "seq_clip",
        "outcome",
    )
    drgrpo = AlgorithmConfig(name="drgrpo").resolved()
    assert drgrpo.estimator == "grpo" and dict(drgrpo.estimator_options) == {"norm_by_std": False}


def test_explicit_overrides_are_applied_and_reported() -> None:
    resolved = AlgorithmConfig(name="grpo", pay_folr="on", filter="reward").resolved()
    assert resolved.pays_folr and resolved.group_filter == "reward"
    assert resolved.overrides == ("FOLR paid", "group filter reward")
    tspo = AlgorithmConfig(name="tspo", tspo_mode="turn", reclaim=0.5).resolved()
    assert dict(tspo.estimator_options) == {"mode": "turn", "reclaim": 0.5}
    assert tspo.overrides == ("tspo option mode='turn'", "tspo option reclaim=0.5")
    legacy = AlgorithmConfig(name="tspo_legacy", gamma=0.9).resolved()
    assert dict(legacy.estimator_options) == {"mode": "legacy", "gamma": 0.9}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"name": "grpo", "tspo_mode": "turn"}, "applies only to the tspo algorithms, not grpo"),
        ({"name": "tspo", "gamma": 0.9}, "applies only to tspo mode legacy"),
        ({"name": "tspo", "reclaim": -1.0}, "reclaim must be >= 0"),
        ({"name": "tspo", "dual_clip": 0.5}, "dual_clip must be > 1"),
    ],
)
def test_bad_settings_fail_at_load(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AlgorithmConfig(**settings)  # type: ignore[arg-type]


def test_unknown_names_list_the_table() -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'gpro'; valid names: drgrpo, dspo, grpo"):
        resolve_algorithm("gpro")
    with pytest.raises(ValueError, match="does not take option"):
        resolve_algorithm("grpo", estimator_options={"mode": "turn"})


def test_dual_clip_default_is_verls() -> None:
    assert AlgorithmConfig().dual_clip == DEFAULT_DUAL_CLIP == 3.0
    assert AlgorithmConfig(dual_clip=None).dual_clip is None
