"""Multi-turn rollouts of a search agent (DESIGN section 7): the loop, generation engines, policy loading.

Cheap to import: the transformers-backed pieces (``HFEngine``, ``load_policy``, ``build_tiny_model``)
load transformers only when first used.
"""

from __future__ import annotations

from typing import Any

from tspo.rollout.config import RolloutConfig
from tspo.rollout.engines import (
    ENGINE_KINDS,
    GenerationEngine,
    GenerationOutput,
    SamplingParams,
    ScriptCall,
    ScriptedEngine,
    StopScanner,
    make_engine,
)
from tspo.rollout.env import EnvLimits, Episode, SearchEnv, Step
from tspo.rollout.loop import COUNTER_NAMES, RolloutResult, RolloutTask, build_prompt_ids, run_rollouts

__all__ = [
    "COUNTER_NAMES",
    "ENGINE_KINDS",
    "EnvLimits",
    "Episode",
    "GenerationEngine",
    "GenerationOutput",
    "HFEngine",
    "ModelLoadError",
    "RolloutConfig",
    "RolloutResult",
    "RolloutTask",
    "SamplingParams",
    "ScriptCall",
    "ScriptedEngine",
    "SearchEnv",
    "Step",
    "StopScanner",
    "VLLMEngine",
    "build_prompt_ids",
    "build_tiny_model",
    "build_word_tokenizer",
    "load_policy",
    "load_tokenizer",
    "make_engine",
    "run_rollouts",
    "smollm2_gguf_path",
]

_LAZY = {
    "HFEngine": "tspo.rollout.engines.hf",
    "VLLMEngine": "tspo.rollout.engines.vllm",
    "ModelLoadError": "tspo.rollout.models",
    "load_policy": "tspo.rollout.models",
    "load_tokenizer": "tspo.rollout.models",
    "smollm2_gguf_path": "tspo.rollout.models",
    "build_tiny_model": "tspo.rollout.tiny",
    "build_word_tokenizer": "tspo.rollout.tiny",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
