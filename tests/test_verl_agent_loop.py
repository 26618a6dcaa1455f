"""The Search-R1 agent loop in verl, end to end on CPU.

Real parts: verl's agent-loop registry and Hydra instantiation, verl's ``AgentLoopWorker._compute_score``
and ``RewardLoopWorker`` (which loads our reward function by package path), ``tspo serve`` over a BM25
index on loopback (started and stopped by the test), and a byte-level BPE tokenizer saved and loaded with
``from_pretrained``. Stand-ins: the LLM server (a manager that replays scripted token ids, as no GPU /
vLLM runs here) and the Ray actor handle of the reward worker (a local call of the same object).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import torch

pytestmark = pytest.mark.verl

pytest.importorskip("verl")

import hydra  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402
from verl.experimental.agent_loop.agent_loop import (  # noqa: E402
    AgentLoopWorker,
    DictConfigWrap,
    ToolListWrap,
    _agent_loop_registry,
)
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from tspo.doc import Doc  # noqa: E402
from tspo.integrations.verl import agent_loop as tspo_agent_loop  # noqa: E402
from tspo.integrations.verl.launch import VerlLaunchOptions, agent_loop_config  # noqa: E402
from tspo.integrations.verl.layout import read_outcome, read_turn_rewards, turn_layout  # noqa: E402
from tspo.protocol import INVALID_ACTION_MESSAGE, build_prompt_messages, format_observation  # noqa: E402
from tspo.retrieval.base import RetrievalRequestError, RetrievalUnavailableError  # noqa: E402
from tspo.retrieval.client import HTTPRetriever  # noqa: E402
from tspo.rewards import turn_rewards  # noqa: E402

CORPUS = [
    Doc("d1", "Ada Lovelace", "Ada Lovelace was born in London in 1815."),
    Doc("d2", "Charles Babbage", "Charles Babbage designed the Analytical Engine, a mechanical computer."),
    Doc(
        "d3", "Analytical Engine", "The Analytical Engine was a proposed mechanical general-purpose computer."
    ),
    Doc("d4", "Paris", "Paris is the capital and largest city of France."),
]
QUESTION = "Where was Ada Lovelace born?"
GROUND_TRUTH = {"target": ["London"]}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ALPHA = 0.3


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained here, saved, and loaded back with from_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [build_prompt_messages(QUESTION)[0]["content"], INVALID_ACTION_MESSAGE] * 3
    texts += [f"{d.title} {d.text} <search> </search> <answer> </answer> <information>" for d in CORPUS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    directory = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@contextlib.contextmanager
def tspo_serve(directory: Path, *extra: str) -> Iterator[str]:
    """`tspo serve` (the real command, in a subprocess) over a BM25 index of CORPUS, on loopback."""
    corpus = directory / "corpus.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": d.id, "title": d.title, "text": d.text}) + "\n" for d in CORPUS)
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "tspo.cli",
        "serve",
        "--corpus",
        str(corpus),
        "--port",
        str(port),
        *extra,
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"tspo serve exited: {server.stderr.read()}"
            assert time.monotonic() < deadline, "tspo serve never became ready"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def retrieval_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with tspo_serve(tmp_path_factory.mktemp("serve")) as url:
        yield url


class ReplayServerManager:
    """Stands in for verl's LLMServerClient: replays scripted generations as token ids.

    Like a real server it honours ``max_tokens``; it records every request for the assertions.
    """

    def __init__(self, token_ids: list[list[int]]) -> None:
        self.script = list(token_ids)
        self.requests: list[dict[str, Any]] = []

    async def generate(
        self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **_: Any
    ):
        self.requests.append(
            {"request_id": request_id, "prompt_ids": list(prompt_ids), "params": dict(sampling_params)}
        )
        ids = self.script.pop(0)[: sampling_params["max_tokens"]]
        return TokenOutput(
            token_ids=ids,
            log_probs=[-0.5] * len(ids) if sampling_params.get("logprobs") else None,
            stop_reason="completed",
            extra_fields={"global_steps": 7},
        )


def trainer_config(tokenizer_dir: Path, response_length: int) -> Any:
    return OmegaConf.create(
        {
            "actor_rollout_ref": {
                "rollout": {"prompt_length": 512, "response_length": response_length, "name": "vllm"},
                "model": {"path": str(tokenizer_dir), "tokenizer_path": None},
            },
            "data": {"apply_chat_template_kwargs": {}, "mm_processor_kwargs": {}},
            "reward": {
                "custom_reward_function": {
                    "path": "pkg://tspo.integrations.verl.reward",
                    "name": "compute_score",
                    "reward_kwargs": {"metric": "em"},
                },
                "reward_manager": {"source": "register", "name": "naive"},
                "reward_model": {"enable": False},
            },
        }
    )


def make_loop(config: Any, tokenizer: Any, server: ReplayServerManager, url: str, **options: Any) -> Any:
    """Instantiate the loop the way verl's AgentLoopWorker._run_agent_loop does: from the registry entry
    that the launcher's agent_loop.yaml provides, with hydra.utils.instantiate."""
    entry = agent_loop_config(VerlLaunchOptions(retriever_url=url, folr_alpha=ALPHA, **options))[0]
    _agent_loop_registry[entry["name"]] = OmegaConf.create(entry)
    return hydra.utils.instantiate(
        config=_agent_loop_registry["tspo_search_r1"],
        trainer_config=DictConfigWrap(config=config),
        server_manager=server,
        tokenizer=tokenizer,
        processor=None,
        hf_model_type=None,
        dataset_cls=RLHFDataset,
        data_config=DictConfigWrap(config.data),
        tools=ToolListWrap([]),
    )


def dataset_row() -> dict[str, Any]:
    return {
        "raw_prompt": build_prompt_messages(QUESTION),
        "data_source": "nq",
        "reward_model": {"style": "rule", "ground_truth": GROUND_TRUTH},
        "extra_info": {"split": "train", "index": 0},
        "index": 0,
    }


async def score_through_verl(config: Any, output: Any, row: dict[str, Any]) -> None:
    """verl's AgentLoopWorker._compute_score with a real RewardLoopWorker behind a local handle."""
    reward_worker = RewardLoopWorker(config)
    worker = object.__new__(AgentLoopWorker)
    worker.processor = None
    worker.mm_processor_kwargs = {}
    worker.reward_loop_worker_handles = [
        SimpleNamespace(compute_score=SimpleNamespace(remote=reward_worker.compute_score))
    ]
    await worker._compute_score([output], kwargs=row)


def run_rollout(
    config: Any,
    tokenizer: Any,
    server: ReplayServerManager,
    url: str,
    *,
    logprobs: bool = True,
    score: bool = True,
    search_client: Any = None,
    **options: Any,
) -> Any:
    """Build the loop inside a running event loop (as verl does: AgentLoopBase keeps a handle on it),
    run one rollout, and score it through verl's reward path."""
    row = dataset_row()

    async def run() -> Any:
        loop = make_loop(config, tokenizer, server, url, **options)
        assert isinstance(loop, tspo_agent_loop.SearchR1AgentLoop)
        if search_client is not None:
            loop._search_client = search_client
        output = await loop.run({"temperature": 1.0, "logprobs": logprobs}, **row)
        if score:
            await score_through_verl(config, output, row)
        return output

    return asyncio.run(run())


def search(url: str, query: str) -> list[Doc]:
    client = HTTPRetriever(url)
    try:
        return client.search([query], 3)[0]
    finally:
        client.close()


def test_multi_turn_rollout_records_turns_masks_and_places_rewards(tokenizer_dir, tokenizer, retrieval_url):
    generations = [
        "<think>Babbage worked with her.</think><search> Charles Babbage engine </search>",
        "<search> Ada Lovelace born </search>",
        "I am not sure what to do.",
        "<think>London.</think><answer> London </answer>",
    ]
    script = [tokenizer.encode(text, add_special_tokens=False) for text in generations]
    server = ReplayServerManager(script)
    config = trainer_config(tokenizer_dir, response_length=1024)
    row = dataset_row()
    output = run_rollout(config, tokenizer, server, retrieval_url)

    # The observations are exactly what the server returns, formatted Search-R1 style, tokenized once.
    observations = [
        format_observation(search(retrieval_url, "Charles Babbage engine")),
        format_observation(search(retrieval_url, "Ada Lovelace born")),
        INVALID_ACTION_MESSAGE,
    ]
    assert "London" not in observations[0] and "London" in observations[1]
    observation_ids = [tokenizer.encode(text, add_special_tokens=False) for text in observations]
    expected_ids, expected_mask, ends = [], [], []
    for generated, observed in zip(script, [*observation_ids, []], strict=True):
        expected_ids += generated + observed
        expected_mask += [1] * len(generated) + [0] * len(observed)
        ends.append(len(expected_ids) - 1)
    assert output.response_ids == expected_ids
    assert output.response_mask == expected_mask
    assert output.response_logprobs == [-0.5 if flag else 0.0 for flag in expected_mask]
    prompt_text = tokenizer.apply_chat_template(row["raw_prompt"], add_generation_prompt=True, tokenize=False)
    assert prompt_text.endswith("<|im_start|>assistant\n") and QUESTION in prompt_text
    assert output.prompt_ids == tokenizer.encode(prompt_text, add_special_tokens=False)

    # Token-in/token-out: every call continues the exact ids so far; stop strings are set.
    for call, request in enumerate(server.requests):
        so_far = sum(len(g) + len(o) for g, o in zip(script[:call], observation_ids[:call], strict=True))
        assert request["prompt_ids"] == output.prompt_ids + expected_ids[:so_far]
        assert request["params"]["stop"] == ["</search>", "</answer>"]
        assert request["params"]["max_tokens"] == min(500, 1024 - so_far)

    # Turn records.
    fields = output.extra_fields
    assert fields["tspo_turn_actions"] == ["search", "search", "invalid", "answer"]
    assert fields["tspo_queries"] == ["Charles Babbage engine", "Ada Lovelace born", "", ""]
    assert fields["tspo_first_hit_turn"] == 1 and fields["tspo_num_turns"] == 4
    assert fields["tspo_stop_reason"] == "answer" and fields["tspo_error"] is None
    assert fields["tspo_generated_texts"] == generations
    assert fields["min_global_steps"] == fields["max_global_steps"] == 7

    # verl's reward path scored the outcome from the model's answer.
    assert output.reward_score == 1.0
    info = fields["reward_extra_info"]
    assert (info["outcome"], info["folr_hit"], info["first_hit_turn"], info["near_miss"]) == (
        1.0,
        1.0,
        1.0,
        0.0,
    )

    # The batch row verl builds: alpha on the end of the hitting turn (its last observation token), o on
    # the last generated token, nothing else.
    row_dict = output.as_dict()
    rm_scores = row_dict["rm_scores"]
    expected_scores = torch.zeros(len(expected_ids))
    expected_scores[ends[1]] = ALPHA
    expected_scores[ends[-1]] = 1.0
    torch.testing.assert_close(rm_scores, expected_scores)
    assert row_dict["response_mask"][ends[1]] == 0 and row_dict["response_mask"][ends[-1]] == 1
    assert "turn_ends" not in row_dict and "turn_terms" not in row_dict
    layout = turn_layout(row_dict["response_mask"].unsqueeze(0))
    recovered = read_turn_rewards(rm_scores.unsqueeze(0), layout)[0].tolist()
    assert recovered == pytest.approx(turn_rewards(4, 1, 1.0, ALPHA))
    assert read_outcome(rm_scores.unsqueeze(0), layout).tolist() == [1.0]


def test_rollout_cut_off_after_a_hitting_search_keeps_hit_and_outcome_apart(
    tokenizer_dir, tokenizer, retrieval_url
):
    first = tokenizer.encode("<search> Ada Lovelace born </search>", add_special_tokens=False)
    observation = tokenizer.encode(
        format_observation(search(retrieval_url, "Ada Lovelace born")), add_special_tokens=False
    )
    budget = len(first) + len(observation) - 1  # the observation loses its last token
    server = ReplayServerManager(
        [first, tokenizer.encode("<answer> London </answer>", add_special_tokens=False)]
    )
    config = trainer_config(tokenizer_dir, response_length=budget)
    output = run_rollout(config, tokenizer, server, retrieval_url, logprobs=False)
    assert len(server.requests) == 1  # no budget left for a second generation
    # The cut block keeps its closing tag (the env's rule, as in the local loop).
    suffix = tokenizer.encode("</information>\n\n", add_special_tokens=False)
    kept = observation[: budget - len(first) - len(suffix)] + suffix
    assert output.response_ids == first + kept
    assert output.response_mask == [1] * len(first) + [0] * (budget - len(first))
    assert output.response_logprobs is None
    assert output.extra_fields["tspo_first_hit_turn"] == 0 and output.extra_fields["tspo_truncated"]
    assert output.extra_fields["tspo_stop_reason"] == "context_limit"
    assert output.trajectory.turns[0].observation_text == tokenizer.decode(kept)
    assert "London" in tokenizer.decode(kept)  # the cut spared the answer: the turn still hits
    assert output.reward_score == 0.0  # no answer
    rm_scores = output.as_dict()["rm_scores"]
    assert rm_scores[-1].item() == pytest.approx(ALPHA)  # the cut observation's last token
    assert rm_scores[len(first) - 1].item() == 0.0  # o = 0 on the last generated token
    assert rm_scores.sum().item() == pytest.approx(ALPHA)


def test_search_after_the_turn_limit_is_not_run(tokenizer_dir, tokenizer, retrieval_url):
    script = [
        tokenizer.encode("<search> Charles Babbage engine </search>", add_special_tokens=False),
        tokenizer.encode("<search> Ada Lovelace born </search>", add_special_tokens=False),
    ]
    server = ReplayServerManager(script)
    config = trainer_config(tokenizer_dir, response_length=1024)
    output = run_rollout(config, tokenizer, server, retrieval_url, score=False, max_turns=1)
    assert output.extra_fields["tspo_turn_actions"] == ["search", "invalid"]
    assert output.extra_fields["tspo_stop_reason"] == "search_after_limit"
    assert output.trajectory.turns[1].invalid_reason == "search_after_limit"
    assert output.extra_fields["tspo_first_hit_turn"] == -1  # the second search never ran
    assert output.response_mask[-len(script[1]) :] == [1] * len(script[1])
    assert output.turn_terms == [0.0, 0.0]


def test_unreachable_retriever_fails_the_trajectory_naming_the_url(tokenizer_dir, tokenizer):
    """As in the local loop: the trajectory ends with the error recorded, the rollout returns."""
    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    first = tokenizer.encode("<search> x </search>", add_special_tokens=False)
    server = ReplayServerManager([first])
    config = trainer_config(tokenizer_dir, response_length=256)
    client = HTTPRetriever(dead_url, timeout=2, retries=0, retry_budget_s=0)
    output = run_rollout(config, tokenizer, server, dead_url, score=False, search_client=client)
    fields = output.extra_fields
    assert fields["tspo_stop_reason"] == "retrieval_error" and fields["tspo_turn_actions"] == ["search"]
    assert RetrievalUnavailableError.__name__ in fields["tspo_error"] and dead_url in fields["tspo_error"]
    assert "'x'" in fields["tspo_error"] and output.trajectory.turns[0].error == fields["tspo_error"]
    assert output.response_ids == first and output.response_mask == [1] * len(first)


def test_an_aborted_generation_ends_the_trajectory(tokenizer_dir, tokenizer):
    """verl's server aborts a request (weights being swapped, partial rollout off) with no tokens."""

    class Aborting(ReplayServerManager):
        async def generate(self, request_id: str, **kwargs: Any):
            output = await super().generate(request_id, **kwargs)
            if not output.token_ids:
                output.stop_reason = "aborted"
            return output

    first = tokenizer.encode("not sure", add_special_tokens=False)
    server = Aborting([first, []])
    config = trainer_config(tokenizer_dir, response_length=256)
    output = run_rollout(config, tokenizer, server, "http://127.0.0.1:1", score=False)
    assert len(server.requests) == 2
    assert output.extra_fields["tspo_stop_reason"] == "aborted"
    assert output.extra_fields["tspo_turn_actions"] == ["invalid"]  # the aborted call left no turn
    assert output.response_ids == first + tokenizer.encode(INVALID_ACTION_MESSAGE, add_special_tokens=False)


def test_retriever_token_comes_from_the_environment(tmp_path, tokenizer_dir, tokenizer, monkeypatch):
    """A server started with --token answers only a client holding $TSPO_RETRIEVAL_TOKEN."""
    tspo_agent_loop.shared_search_client.cache_clear()
    script = [
        tokenizer.encode(text, add_special_tokens=False)
        for text in ("<search> Ada Lovelace born </search>", "<answer> London </answer>")
    ]
    config = trainer_config(tokenizer_dir, response_length=256)
    with tspo_serve(tmp_path, "--token", "s3cret") as url:
        monkeypatch.delenv("TSPO_RETRIEVAL_TOKEN", raising=False)
        refused = run_rollout(config, tokenizer, ReplayServerManager(list(script)), url, score=False)
        assert RetrievalRequestError.__name__ in refused.extra_fields["tspo_error"]
        assert "401" in refused.extra_fields["tspo_error"]
        monkeypatch.setenv("TSPO_RETRIEVAL_TOKEN", "s3cret")
        output = run_rollout(config, tokenizer, ReplayServerManager(list(script)), url, score=False)
    assert output.extra_fields["tspo_first_hit_turn"] == 0 and output.extra_fields["tspo_error"] is None


def test_bad_options_are_refused(tokenizer_dir, tokenizer):
    config = trainer_config(tokenizer_dir, response_length=64)
    common = {
        "trainer_config": DictConfigWrap(config),
        "server_manager": ReplayServerManager([]),
        "tokenizer": tokenizer,
        "processor": None,
        "dataset_cls": RLHFDataset,
        "data_config": DictConfigWrap(config.data),
    }
    with pytest.raises(ValueError, match="FOLR alpha must be in"):
        tspo_agent_loop.SearchR1AgentLoop(**common, folr_alpha=1.5)
    with pytest.raises(ValueError, match="need topk >= 1"):
        tspo_agent_loop.SearchR1AgentLoop(**common, topk=0)
    with pytest.raises(ValueError, match="'bold'"):
        tspo_agent_loop.SearchR1AgentLoop(**common, hit_mode="bold")
