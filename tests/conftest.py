"""Shared pytest configuration: markers that skip when their requirement is missing."""

from __future__ import annotations

import importlib.util

import pytest

# A very small tiny-preset run (a few questions, short generations, a brief warm start) shared by the
# trainer tests: seconds per step on 2 CPU cores.
TINY_RUN_OVERRIDES = [
    "data.world.size=tiny",
    "data.eval_size=4",
    "rollout.max_turns=2",
    "rollout.max_new_tokens=10",
    "trainer.prompts_per_step=2",
    "trainer.group_size=3",
    "trainer.micro_batch_size=6",
    "trainer.progress=false",
    "trainer.plots=false",
    "warmstart.steps=4",
    "warmstart.demos=32",
    "warmstart.batch_size=8",
]


def tiny_qwen2(
    *,
    seed: int = 0,
    vocab_size: int = 50,
    kv_heads: int = 4,
    max_positions: int = 64,
    tied_embeddings: bool = True,
):
    """A randomly initialised 2-layer Qwen2 (hidden 32, 4 heads) for trainer and update tests: real
    transformers code, milliseconds per forward pass. The same ``seed`` gives the same weights."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tied_embeddings,
    )
    return Qwen2ForCausalLM(config)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {
        "gpu": None if _has_cuda() else "needs a CUDA GPU; none is present",
        "vllm": None if _has_module("vllm") else "needs vLLM (pip install 'tspo[vllm]'); not installed",
        "verl": None if _has_module("verl") else "needs verl (pip install 'tspo[verl]'); not installed",
        "slow": None if config.getoption("--run-slow") else "slow test; run with --run-slow",
    }
    for item in items:
        for marker, reason in reasons.items():
            if reason is not None and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))
