"""One environment: the local rollout loop and the verl agent loop give identical trajectories.

Both drive :class:`tspo.rollout.env.SearchEnv`; this test checks that nothing around it differs. For
every case of the loop tests the same scripted policy (a ``ScriptedEngine``, which applies the engine
contract: stop strings, EOS, token limits) is replayed through ``run_rollouts`` and through
``SearchR1AgentLoop.run`` behind a stand-in for verl's LLM server (which, like vLLM, reports
``"completed"`` whether a generation stopped or ran out of tokens). The same BM25 index answers both
(synchronously for the local loop, through an async wrapper for verl). Compared: token ids, loss masks,
turn indices, sampler log-probabilities, each turn's action, texts, query, invalid reason, retrieved
docs, observation text and truncation flags, errors, stop reasons and the FOLR first-hit turn.

Limits map one to one: ``max_new_tokens`` = ``max_tokens_per_turn``, and the local context budget is
the prompt plus verl's ``response_length``. ``prompt_too_long`` has no verl counterpart (verl budgets
the response alone) and is covered by the loop tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.verl

pytest.importorskip("verl", reason="verl is not installed: run in the verl venv (scripts/verl_venv.sh)")

from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402
from verl.experimental.agent_loop.agent_loop import DictConfigWrap  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from tspo.doc import Doc  # noqa: E402
from tspo.integrations.verl.agent_loop import SearchR1AgentLoop  # noqa: E402
from tspo.protocol import INVALID_ACTION_MESSAGE, build_prompt_messages  # noqa: E402
from tspo.retrieval.bm25 import BM25Retriever  # noqa: E402
from tspo.rollout import (  # noqa: E402
    RolloutConfig,
    RolloutTask,
    SamplingParams,
    ScriptedEngine,
    build_prompt_ids,
    run_rollouts,
)
from tspo.scoring import score_trajectories  # noqa: E402
from tspo.trajectory import Trajectory  # noqa: E402

CORPUS = [
    Doc("d1", "Acme Corporation", "Acme Corporation was founded by Jane Doe in the city of Lorvik."),
    Doc("d2", "Lorvik", "Lorvik is a harbour city on the northern coast; its mayor is Tomas Brandt."),
    Doc("d3", "Jane Doe", "Jane Doe is an engineer who studied at Kessel University."),
    Doc("d4", "Kessel University", "Kessel University stands in the valley town of Amberfield."),
    Doc("d5", "Blue River", "The Blue River flows through Amberfield and ends in the Grey Sea."),
    Doc("d6", "Tomas Brandt", "Tomas Brandt was born in Amberfield and later moved to Lorvik."),
]
QUESTION = "Who founded Acme Corporation?"
GOLDS = ("Jane Doe",)
ALPHA = 0.3
RESPONSE_LENGTH = 1024
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (``</information>`` is several tokens), saved and loaded back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [build_prompt_messages(QUESTION)[0]["content"], INVALID_ACTION_MESSAGE] * 3
    texts += [f"{d.title} {d.text} <search> </search> <answer> </answer> <information>" for d in CORPUS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    directory = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def bm25() -> BM25Retriever:
    return BM25Retriever.build(CORPUS, threads=1)


# ---------------------------------------------------------------------- retrievers
class Flaky:
    """Fails every batch holding a query about the river (a shard that is down)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        if any("river" in q for q in queries):
            raise ConnectionError("index shard 3 is down")
        return self.inner.search(queries, k)


class Miscounting:
    def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        return []


class WrongType:
    def search(self, queries: list[str], k: int) -> list[list[Any]]:
        return [[{"id": "d1"}] for _ in queries]


class AsyncSearch:
    """verl's search client interface over the same retriever the local loop uses."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def asearch(self, queries: list[str], k: int) -> list[list[Doc]]:
        return self.inner.search(queries, k)


RETRIEVERS: dict[str, Callable[[BM25Retriever], Any]] = {
    "bm25": lambda bm25: bm25,
    "flaky": Flaky,
    "miscounting": lambda bm25: Miscounting(),
    "wrong_type": lambda bm25: WrongType(),
}


# ---------------------------------------------------------------------- the two drivers
def _logprob(token_id: int, position: int) -> float:
    return -0.001 * token_id - 0.01 * position


class ScriptedServer:
    """Stands in for verl's LLM server: a ``ScriptedEngine`` behind ``generate``, reporting
    ``stop_reason="completed"`` whatever ended the generation, as verl's vLLM server does."""

    def __init__(self, engine: ScriptedEngine) -> None:
        self.engine = engine

    async def generate(
        self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **_: Any
    ) -> TokenOutput:
        params = SamplingParams(
            temperature=float(sampling_params.get("temperature", 1.0)),
            max_new_tokens=int(sampling_params["max_tokens"]),
            stop=tuple(sampling_params["stop"]),
        )
        (output,) = self.engine.generate([list(prompt_ids)], params)
        logprobs = output.logprobs if sampling_params.get("logprobs") else None
        return TokenOutput(token_ids=output.token_ids, log_probs=logprobs, stop_reason="completed")


@dataclass(frozen=True)
class Case:
    script: Any  # a list of turns (text or ids) or a function of the call, as ScriptedEngine takes
    max_turns: int = 4
    max_new_tokens: int = 500
    max_observation_tokens: int = 500
    response_length: int = RESPONSE_LENGTH
    retriever: str = "bm25"
    expect: dict[str, Any] = field(default_factory=dict)  # what the local loop tests assert, in short


def run_local(case: Case, tokenizer: Any, retriever: Any, prompt: list[int]) -> Trajectory:
    config = RolloutConfig(
        max_turns=case.max_turns,
        max_new_tokens=case.max_new_tokens,
        max_observation_tokens=case.max_observation_tokens,
        max_context_tokens=len(prompt) + case.response_length,
    )
    engine = ScriptedEngine(tokenizer, case.script, logprob=_logprob)
    task = RolloutTask(question=QUESTION, golds=GOLDS)
    (trajectory,) = run_rollouts(engine, tokenizer, retriever, [task], config, seed=0).trajectories
    return trajectory


def run_verl(case: Case, tokenizer: Any, tokenizer_dir: Path, retriever: Any) -> Any:
    config = OmegaConf.create(
        {
            "actor_rollout_ref": {
                "rollout": {"prompt_length": 512, "response_length": case.response_length, "name": "vllm"},
                "model": {"path": str(tokenizer_dir), "tokenizer_path": None},
            },
            "data": {"apply_chat_template_kwargs": {}, "mm_processor_kwargs": {}},
        }
    )
    row = {
        "raw_prompt": build_prompt_messages(QUESTION),
        "reward_model": {"style": "rule", "ground_truth": {"target": list(GOLDS)}},
    }

    async def run() -> Any:
        # Built inside a running event loop, as verl does (AgentLoopBase keeps a handle on it).
        loop = SearchR1AgentLoop(
            trainer_config=DictConfigWrap(config),
            server_manager=ScriptedServer(ScriptedEngine(tokenizer, case.script, logprob=_logprob)),
            tokenizer=tokenizer,
            processor=None,
            dataset_cls=RLHFDataset,
            data_config=DictConfigWrap(config.data),
            topk=3,
            max_turns=case.max_turns,
            folr_alpha=ALPHA,
            max_tokens_per_turn=case.max_new_tokens,
            max_observation_tokens=case.max_observation_tokens,
            search_client=AsyncSearch(retriever),
        )
        return await loop.run({"temperature": 1.0, "logprobs": True}, **row)

    return asyncio.run(run())


def record(trajectory: Trajectory) -> dict[str, Any]:
    """Everything a loss, a reward or a dump reads from a trajectory."""
    return {
        "prompt_ids": trajectory.prompt_ids,
        "response_ids": trajectory.response_ids,
        "loss_mask": trajectory.loss_mask,
        "turn_index": trajectory.turn_index,
        "sample_logprobs": trajectory.sample_logprobs,
        "context_truncated": trajectory.context_truncated,
        "error": trajectory.error,
        "metadata": trajectory.metadata,
        "turns": [
            {
                "action": turn.action.value,
                "generated_text": turn.generated_text,
                "generated_span": turn.generated_span,
                "content": turn.content,
                "invalid_reason": turn.invalid_reason,
                "observation_text": turn.observation_text,
                "observation_span": turn.observation_span,
                "docs": [doc.id for doc in turn.docs],
                "generation_truncated": turn.generation_truncated,
                "observation_truncated": turn.observation_truncated,
                "error": turn.error,
            }
            for turn in trajectory.turns
        ],
        "retrieved_passages": trajectory.retrieved_passages(),
    }


# ---------------------------------------------------------------------- the cases of the loop tests
def _unclosed_then_eos(tokenizer: Any) -> list[Any]:
    ids = tokenizer.encode("<search> who founded acme", add_special_tokens=False)
    return [[*ids, tokenizer.eos_token_id], "<answer> jane doe </answer>"]


CASES: dict[str, Case | Callable[[Any, list[int]], Case]] = {
    "search_then_answer": Case(
        [
            "<think> i need to search </think> <search> who founded acme corporation </search>",
            "<answer> jane doe </answer>",
        ],
        expect={"actions": ["search", "answer"], "stop": "answer", "hit": 0},
    ),
    "direct_answer": Case(
        ["<think> easy </think> <answer> jane doe </answer>"],
        expect={"actions": ["answer"], "stop": "answer", "hit": -1},
    ),
    "invalid_then_recovery": Case(
        [
            "not sure , let me think more",
            "<search> acme corporation founder </search>",
            "<answer> jane doe </answer>",
        ],
        expect={"actions": ["invalid", "search", "answer"], "stop": "answer", "hit": 1},
    ),
    "search_limit": Case(
        ["<search> lorvik </search>", "<search> amberfield </search>", "<search> blue river </search>"],
        max_turns=2,
        expect={"actions": ["search", "search", "invalid"], "stop": "search_after_limit"},
    ),
    "search_limit_then_answer": Case(
        ["<search> lorvik </search>", "<answer> tomas brandt </answer>"],
        max_turns=1,
        expect={"actions": ["search", "answer"], "stop": "answer"},
    ),
    "always_invalid": Case(
        lambda call: "not sure",
        max_turns=3,
        expect={"actions": ["invalid"] * 4, "stop": "invalid_final"},
    ),
    "no_search_allowed": Case(
        ["<search> lorvik </search>"],
        max_turns=0,
        expect={"actions": ["invalid"], "stop": "search_after_limit"},
    ),
    "first_hit_on_second_search": Case(
        [
            "<search> blue river </search>",
            "<search> acme corporation founded </search>",
            "<answer> jane doe </answer>",
        ],
        expect={"actions": ["search", "search", "answer"], "stop": "answer", "hit": 1},
    ),
    "generation_truncated": Case(
        ["<think> " + "lorvik " * 40],
        max_new_tokens=6,
        expect={"actions": ["truncated"], "stop": "generation_truncated"},
    ),
    # verl used to append the invalid-action message after a cut generation and go on.
    "generation_truncated_after_a_search": Case(
        ["<search> who founded acme corporation </search>", "<think> " + "lorvik " * 40],
        max_new_tokens=16,
        expect={"actions": ["search", "truncated"], "stop": "generation_truncated", "hit": 0},
    ),
    "ten_thousand_tokens_without_a_tag": Case(
        ["<search> " + "lorvik " * 10_000],
        max_new_tokens=500,
        expect={"actions": ["truncated"], "stop": "generation_truncated"},
    ),
    "observation_truncated": Case(
        ["<search> who founded acme corporation </search>", "<answer> jane doe </answer>"],
        max_observation_tokens=24,
        expect={"actions": ["search", "answer"], "stop": "answer", "observation_truncated": True},
    ),
    "context_limit_in_generation": Case(
        ["lorvik " * 40],
        max_new_tokens=50,
        response_length=5,
        expect={"actions": ["truncated"], "stop": "context_limit"},
    ),
    "context_limit_in_observation": lambda tokenizer, prompt: Case(
        ["<search> who founded acme corporation </search>", "<answer> jane doe </answer>"],
        response_length=len(
            tokenizer.encode("<search> who founded acme corporation </search>", add_special_tokens=False)
        )
        + 12,
        expect={"actions": ["search"], "stop": "context_limit", "observation_truncated": True},
    ),
    "context_limit_after_an_invalid_action": lambda tokenizer, prompt: Case(
        ["not sure", "<answer> jane doe </answer>"],
        response_length=len(tokenizer.encode("not sure", add_special_tokens=False)) + 6,
        expect={"actions": ["invalid"], "stop": "context_limit", "observation_truncated": True},
    ),
    "unclosed_tag_then_eos": lambda tokenizer, prompt: Case(
        _unclosed_then_eos(tokenizer),
        expect={"actions": ["invalid", "answer"], "stop": "answer"},
    ),
    "empty_generation": Case(
        [[], "<answer> jane doe </answer>"],
        expect={"actions": ["invalid", "answer"], "stop": "answer"},
    ),
    "retriever_error": Case(
        ["<search> blue river </search>", "<answer> lorvik </answer>"],
        retriever="flaky",
        expect={"actions": ["search"], "stop": "retrieval_error", "error": "index shard 3 is down"},
    ),
    "retriever_miscounts": Case(
        ["<search> acme </search>"],
        retriever="miscounting",
        expect={"actions": ["search"], "stop": "retrieval_error", "error": "0 result lists for 1 queries"},
    ),
    "retriever_returns_no_docs": Case(
        ["<search> acme </search>"],
        retriever="wrong_type",
        expect={"actions": ["search"], "stop": "retrieval_error", "error": "expected tspo.doc.Doc"},
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_local_and_verl_loops_agree(name, tokenizer, tokenizer_dir, bm25):
    prompt = build_prompt_ids(QUESTION, tokenizer)
    case = CASES[name]
    if callable(case):
        case = case(tokenizer, prompt)
    retriever = RETRIEVERS[case.retriever](bm25)

    local = run_local(case, tokenizer, retriever, prompt)
    output = run_verl(case, tokenizer, tokenizer_dir, retriever)
    remote = output.trajectory

    # The same prompt, then the same trajectory, field by field.
    assert output.prompt_ids == prompt
    assert record(remote) == record(local)
    # What verl's batch row carries is that trajectory.
    assert output.response_ids == local.response_ids
    assert output.response_mask == local.loss_mask
    assert output.response_logprobs == pytest.approx(local.sample_logprobs)
    # FOLR: the first-hit turn the local trainer scores equals the one verl's loop placed.
    (score,) = score_trajectories([local], folr_alpha=ALPHA)
    hit = -1 if score.first_hit_turn is None else score.first_hit_turn
    fields = output.extra_fields
    assert fields["tspo_first_hit_turn"] == hit
    assert fields["tspo_stop_reason"] == local.metadata["stop_reason"]
    assert fields["tspo_error"] == local.error

    # The case is the one its name says (so a change to the cases cannot make them vacuous).
    expect = case.expect
    assert [turn.action.value for turn in local.turns] == expect["actions"]
    assert local.metadata["stop_reason"] == expect["stop"]
    if "hit" in expect:
        assert hit == expect["hit"]
    if "observation_truncated" in expect:
        assert any(turn.observation_truncated for turn in local.turns) == expect["observation_truncated"]
    if "error" in expect:
        assert expect["error"] in local.error
    else:
        assert local.error is None
