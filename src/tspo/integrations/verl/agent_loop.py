"""A Search-R1-format agent loop for verl that records turns and places the FOLR partial reward.

Registered in verl's agent-loop registry as ``tspo_search_r1``
(``verl.experimental.agent_loop.agent_loop.register``). Select it with
``actor_rollout_ref.rollout.agent.default_agent_loop=tspo_search_r1`` and give its options in an
``agent_loop_config_path`` YAML (``tspo verl launch`` writes one)::

    - name: tspo_search_r1
      _target_: tspo.integrations.verl.agent_loop.SearchR1AgentLoop
      retriever_url: http://127.0.0.1:8000
      topk: 3
      max_turns: 4
      folr_alpha: 0.3

The protocol step is :class:`tspo.rollout.env.SearchEnv`, the object the local rollout loop drives:
same actions, round limit, truncations, observation text and tokens, reasons
(``extra_fields["tspo_stop_reason"]``) and retriever-failure policy (a failed search ends that
trajectory with ``retrieval_error``, naming the query and exception in ``extra_fields["tspo_error"]``;
the rest of the batch goes on). This class only adapts it to verl's token-in/token-out server: one
``generate`` per turn with stop strings and ``max_tokens`` = the env's limit, one search call per
search turn. Generated ids are kept as the server returned them, observations are tokenized once and
appended with ``response_mask`` 0. The first-hit turn comes from :func:`tspo.rewards.first_hit_turn`
and the partial reward from :func:`tspo.rewards.turn_rewards`.

Reward placement (:mod:`tspo.integrations.verl.layout`): verl's reward path scores the outcome ``o``
(:mod:`tspo.integrations.verl.reward`) into ``reward_score``; this loop's output then lays ``o`` on the last
generated token and the FOLR partial reward on the first-hit turn's end token (the last token of its
``<information>`` block). This needs verl's V1 trainer (``trainer.use_v1=True``, the default of verl 0.9),
whose agent-loop worker turns each output into a batch row with :meth:`AgentLoopOutput.as_dict`.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from typing import Any, Protocol
from uuid import uuid4

import torch
from pydantic import Field
from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopOutput, register

from tspo.doc import Doc
from tspo.integrations.verl.layout import place_rewards
from tspo.integrations.verl.reward import (
    FIRST_HIT_KEY,
    GENERATED_TEXTS_KEY,
    NUM_TURNS_KEY,
    golds_from_ground_truth,
)
from tspo.protocol import DEFAULT_PROTOCOL
from tspo.rewards import HitMode, first_hit_turn, turn_rewards
from tspo.rollout.env import EnvLimits, SearchEnv, SearchResult, check_result_count
from tspo.trajectory import Trajectory

logger = logging.getLogger(__name__)

AGENT_NAME = "tspo_search_r1"
#: Environment variable holding the retrieval server's bearer token (the one `tspo serve` reads).
TOKEN_ENV = "TSPO_RETRIEVAL_TOKEN"
#: Stop reasons of verl's server that mean the request was aborted.
ABORTED = ("aborted", "abort")


class SearchClient(Protocol):
    """What the loop needs from a retriever: the top-``k`` passages of each query, asynchronously
    (:class:`tspo.retrieval.HTTPRetriever` is one)."""

    async def asearch(self, queries: list[str], k: int) -> list[list[Doc]]: ...


@functools.lru_cache(maxsize=8)
def shared_search_client(url: str, timeout: float, retries: int, token: str | None) -> SearchClient:
    """One HTTP client per server and process: verl builds a new agent loop for every sample, and the
    client's connection pool should outlive them."""
    from tspo.retrieval.client import HTTPRetriever

    return HTTPRetriever(url, timeout=timeout, retries=retries, token=token)


class SearchR1AgentLoopOutput(AgentLoopOutput):
    """:class:`AgentLoopOutput` that lays out the rewards per turn when verl turns it into a batch row.

    ``turn_ends`` / ``turn_terms`` stay out of ``model_dump`` so that they never reach verl's batch.
    """

    turn_ends: list[int] = Field(default_factory=list, exclude=True)
    turn_terms: list[float] = Field(default_factory=list, exclude=True)
    # The full turn record (docs, observation texts, reasons) for callers and tests; never in the batch.
    trajectory: Trajectory | None = Field(default=None, exclude=True)

    def as_dict(self) -> dict[str, Any]:
        output = super().as_dict()
        if self.reward_score is not None:
            # verl put the whole score on the last response token; replace it with tspo's placement.
            rewards = place_rewards(
                self.response_mask, self.turn_ends, self.turn_terms, float(self.reward_score)
            )
            output["rm_scores"] = torch.tensor(rewards, dtype=torch.float32)
        return output


@register(AGENT_NAME)
class SearchR1AgentLoop(AgentLoopBase):
    """Search-R1 rollout with turn records and FOLR reward placement.

    Args (besides verl's own, all settable in the agent-loop YAML):
        retriever_url: base URL of a ``tspo serve`` server.
        retriever_token: its bearer token; default ``$TSPO_RETRIEVAL_TOKEN`` (unset: none). Keep it out
            of the YAML: pass the variable to the Ray workers instead (docs/verl.md).
        topk: passages per search.
        max_turns: searches allowed before the last, search-less generation.
        folr_alpha: FOLR partial reward of the first-hit turn (0 disables it: plain outcome reward).
        hit_mode: ``whole_word`` (default) or ``substring`` (Search-R1's ``is_retrieval_correct``).
        max_tokens_per_turn: cap of one generation (default: the remaining response budget).
        max_observation_tokens: observations are cut to this many tokens (Search-R1's ``max_obs_length``).
        search_timeout / search_retries: per-request timeout (s) and retries of the search client.
        search_client: an object with ``async asearch(queries, k)``; default: a
            :class:`tspo.retrieval.HTTPRetriever` of ``retriever_url`` (timeouts, retries with backoff).
            When it still fails (a server that stays down raises ``RetrievalUnavailableError`` naming
            the URL) the trajectory ends with ``retrieval_error``, as in the local loop, and a warning
            is logged; the rest of the batch goes on.
    """

    def __init__(
        self,
        *args: Any,
        retriever_url: str = "http://127.0.0.1:8000",
        retriever_token: str | None = None,
        topk: int = 3,
        max_turns: int = 4,
        folr_alpha: float = 0.3,
        hit_mode: str = HitMode.WHOLE_WORD.value,
        max_tokens_per_turn: int | None = 500,
        max_observation_tokens: int = 500,
        search_timeout: float = 30.0,
        search_retries: int = 3,
        search_client: SearchClient | None = None,
        tools: Any = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if topk < 1 or max_turns < 0 or max_observation_tokens < 1:
            raise ValueError(
                f"need topk >= 1, max_turns >= 0, max_observation_tokens >= 1; got topk={topk}, "
                f"max_turns={max_turns}, max_observation_tokens={max_observation_tokens}"
            )
        if max_tokens_per_turn is not None and max_tokens_per_turn < 1:
            raise ValueError(f"max_tokens_per_turn must be >= 1 or null, got {max_tokens_per_turn}")
        turn_rewards(1, None, 0.0, folr_alpha)  # validates alpha with the same rule as the local trainer
        self.retriever_url = retriever_url
        self.retriever_token = retriever_token or os.environ.get(TOKEN_ENV) or None
        self.topk = int(topk)
        self.max_turns = int(max_turns)
        self.folr_alpha = float(folr_alpha)
        self.hit_mode = HitMode(hit_mode)
        self.max_tokens_per_turn = max_tokens_per_turn
        self.max_observation_tokens = int(max_observation_tokens)
        self.search_timeout = float(search_timeout)
        self.search_retries = int(search_retries)
        self._search_client = search_client
        self.prompt_length = self.rollout_config.prompt_length
        self.response_length = self.rollout_config.response_length
        limits = EnvLimits(
            max_turns=self.max_turns,
            max_new_tokens=max_tokens_per_turn,
            max_observation_tokens=self.max_observation_tokens,
            max_response_tokens=self.response_length,  # verl pads prompt and response apart
        )
        self.env = SearchEnv(self.tokenizer, limits, DEFAULT_PROTOCOL)

    @property
    def search_client(self) -> SearchClient:
        if self._search_client is None:
            self._search_client = shared_search_client(
                self.retriever_url, self.search_timeout, self.search_retries, self.retriever_token
            )
        return self._search_client

    def _stop_params(self, sampling_params: dict[str, Any], max_tokens: int) -> dict[str, Any]:
        """Sampling parameters of one turn: stop at the first ``</search>`` / ``</answer>``."""
        params = dict(sampling_params)
        params["stop"] = list(self.env.protocol.stop_strings)
        params["max_tokens"] = max_tokens
        # Keep the stop string in the returned text; ids are returned as generated either way.
        if self.rollout_config.name == "sglang":
            params["no_stop_trim"] = True
        else:
            params["include_stop_str_in_output"] = True
        return params

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        messages = list(kwargs["raw_prompt"])
        golds = golds_from_ground_truth((kwargs.get("reward_model") or {}).get("ground_truth"))
        request_id = uuid4().hex
        priority = int(kwargs.get("priority", 0))  # verl's per-sample vLLM scheduling priority
        prompt_ids = await self.ct_build_initial_tokens(messages)
        episode = self.env.reset(prompt_ids, golds=tuple(golds))
        timing = {"generate_sequences": 0.0, "tool_calls": 0.0}
        global_steps: list[int] = []
        num_preempted = -1
        got_logprobs = False

        while not episode.done:
            max_tokens = self.env.generation_limit(episode)
            started = time.perf_counter()
            output = await self.server_manager.generate(
                request_id=request_id,
                prompt_ids=episode.context_ids(),
                sampling_params=self._stop_params(sampling_params, max_tokens),
                priority=priority,
            )
            timing["generate_sequences"] += time.perf_counter() - started
            steps = (output.extra_fields or {}).get("global_steps")
            if steps is not None:
                global_steps.append(int(steps))
            if output.num_preempted is not None:
                num_preempted = max(num_preempted, 0) + int(output.num_preempted)
            token_ids = list(output.token_ids)
            if not token_ids and output.stop_reason in ABORTED:
                self.env.abort(episode)
                break
            logprobs = list(output.log_probs)[: len(token_ids)] if output.log_probs else None
            got_logprobs = got_logprobs or logprobs is not None
            step = self.env.step(episode, token_ids, logprobs)
            if step.query is not None:
                started = time.perf_counter()
                result = await self._search(step.query)
                timing["tool_calls"] += time.perf_counter() - started
                self.env.observe([(episode, result)])

        trajectory = self.env.finish(episode)
        return self._output(trajectory, golds, timing, global_steps, num_preempted, got_logprobs)

    async def _search(self, query: str) -> SearchResult:
        """The passages of ``query``, or the exception that stopped the search (the env's to handle)."""
        try:
            results = await self.search_client.asearch([query], self.topk)
            return check_result_count(results, [query])[0]
        except Exception as error:
            logger.warning(
                "search for %r failed, its trajectory ends: %s: %s", query, type(error).__name__, error
            )
            return error

    def _output(
        self,
        trajectory: Trajectory,
        golds: Sequence[str],
        timing: dict[str, float],
        global_steps: list[int],
        num_preempted: int,
        with_logprobs: bool,
    ) -> SearchR1AgentLoopOutput:
        # FOLR reads retrieved passages only (never the tags, headers or the invalid-action message).
        hit = first_hit_turn(trajectory.retrieved_passages(self.env.protocol), golds, self.hit_mode)
        # FOLR partial reward only (outcome 0 here): verl's reward path supplies o afterwards.
        terms = turn_rewards(trajectory.num_turns, hit, 0.0, self.folr_alpha)
        extra_fields: dict[str, Any] = {
            GENERATED_TEXTS_KEY: trajectory.generated_texts,
            FIRST_HIT_KEY: -1 if hit is None else hit,
            NUM_TURNS_KEY: trajectory.num_turns,
            "tspo_turn_actions": [turn.action.value for turn in trajectory.turns],
            "tspo_queries": [turn.query or "" for turn in trajectory.turns],
            "tspo_folr_alpha": self.folr_alpha,
            "tspo_truncated": trajectory.truncated,
            "tspo_stop_reason": trajectory.metadata.get("stop_reason"),
            "tspo_error": trajectory.error,
            "turn_scores": [],
            "tool_rewards": [],
        }
        if global_steps:
            extra_fields["min_global_steps"] = min(global_steps)
            extra_fields["max_global_steps"] = max(global_steps)
        observations = sum(turn.observation_span is not None for turn in trajectory.turns)
        return SearchR1AgentLoopOutput(
            prompt_ids=trajectory.prompt_ids,
            response_ids=trajectory.response_ids,
            response_mask=trajectory.loss_mask,
            response_logprobs=trajectory.sample_logprobs if with_logprobs else None,
            num_turns=1 + trajectory.num_turns + observations,
            metrics={**timing, "num_preempted": num_preempted},
            extra_fields=extra_fields,
            turn_ends=[turn.end - 1 for turn in trajectory.turns],
            turn_terms=terms,
            trajectory=trajectory,
        )
