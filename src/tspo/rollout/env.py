"""The search environment: the protocol step of DESIGN section 3, written once.

Both rollout drivers use it: the local loop (:func:`tspo.rollout.run_rollouts`, batched waves) and the
verl agent loop (:mod:`tspo.integrations.verl.agent_loop`, one sample per coroutine). A driver asks
:meth:`SearchEnv.generation_limit`, generates, hands the ids to :meth:`SearchEnv.step`, runs the search
a step asks for (``Step.query``) however it likes (a batch of many episodes or one call) and gives the
results back to :meth:`SearchEnv.observe`. Everything else lives here: parsing the action, the round
limit, every truncation, the observation text and tokens, the retriever-failure policy and the reason
an episode ended (:class:`tspo.trajectory.StopReason`).

Rules (each one tested, in both drivers):
- The action of a generation is parsed from its own text (:func:`tspo.protocol.parse_action`).
- Search with rounds left: the driver retrieves, the observation is ``format_observation(docs)``.
  Invalid action with rounds left: the corrective ``invalid_observation()`` is appended. Each uses one
  round, so a policy that never acts validly still ends.
- After ``max_turns`` rounds one final generation follows. A search there is not run: the turn is
  ``INVALID`` with ``invalid_reason="search_after_limit"`` (query kept in ``content``), no observation,
  the episode ends (``search_after_limit``). An invalid final generation ends it too (``invalid_final``).
- A generation that reaches its token limit without closing an action tag is ``TRUNCATED`` and ends the
  episode: ``generation_truncated``, or ``context_limit`` when the token budget was the tighter limit.
- An observation longer than ``max_observation_tokens`` (or the budget left) is cut; an
  ``<information>`` block keeps its closing tag, and ``observation_text`` is the decoded kept tokens
  (special tokens kept), so FOLR judges exactly what the model was shown.
- The budget (``max_context_tokens`` for prompt + response, ``max_response_tokens`` for the response
  alone, verl's ``response_length``) is never exceeded; when it is spent the episode ends with
  ``context_truncated=True`` (``context_limit``).
- A retriever failure fails only its own episode: ``Trajectory.error`` and the turn's ``error`` name the
  query and the exception, the episode ends (``retrieval_error``) and every other episode goes on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tspo.doc import Doc
from tspo.protocol import (
    DEFAULT_PROTOCOL,
    ActionKind,
    InvalidReason,
    ProtocolConfig,
    format_observation,
    invalid_observation,
    parse_action,
)
from tspo.rollout.engines.base import FinishReason, eos_token_ids
from tspo.trajectory import StopReason, Trajectory, TrajectoryBuilder, Turn, TurnAction

#: What a :class:`SearchEnv` counts (``SearchEnv.counters``), summed over its episodes.
ENV_COUNTER_NAMES = (
    "searches",
    "answers",
    "invalid_actions",
    "search_after_limit",
    "generation_truncated",
    "observation_truncated",
    "context_truncated",
    "prompt_too_long",
    "retrieval_errors",
    "generated_tokens",
    "observation_tokens",
)

#: What a retriever gave for one query: its passages, or the exception it raised.
SearchResult = Sequence[Doc] | BaseException


@dataclass(frozen=True)
class EnvLimits:
    """The limits of one episode (DESIGN section 3).

    Attributes:
        max_turns: rounds (searches + invalid actions) before the final, search-less generation.
        max_new_tokens: most tokens of one generation; ``None``: only the budget bounds it.
        max_observation_tokens: observations are cut to this many tokens.
        max_context_tokens: prompt + response tokens (the local trainer's budget); ``None``: no limit.
        max_response_tokens: response tokens alone (verl's ``response_length``); ``None``: no limit.
    """

    max_turns: int = 4
    max_new_tokens: int | None = 500
    max_observation_tokens: int = 500
    max_context_tokens: int | None = None
    max_response_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_turns < 0 or self.max_observation_tokens < 1:
            raise ValueError(
                f"need max_turns >= 0 and max_observation_tokens >= 1, got max_turns={self.max_turns}, "
                f"max_observation_tokens={self.max_observation_tokens}"
            )
        for name in ("max_new_tokens", "max_context_tokens", "max_response_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if (
            self.max_new_tokens is None
            and self.max_context_tokens is None
            and self.max_response_tokens is None
        ):
            raise ValueError("a generation needs a bound: set max_new_tokens or a token budget")


@dataclass
class Episode:
    """One trajectory while it runs: the builder holding its tokens and turns, and the env's state.

    Attributes:
        builder: the trajectory so far (prompt, generations, observations).
        budget: response tokens allowed in all (``None``: unbounded).
        rounds: searches and invalid actions so far.
        pending_query: a search whose results :meth:`SearchEnv.observe` is waiting for.
        stop_reason: why the episode ended; ``None`` while it runs.
    """

    builder: TrajectoryBuilder
    budget: int | None
    rounds: int = 0
    pending_query: str | None = None
    stop_reason: StopReason | None = None

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def trajectory(self) -> Trajectory:
        return self.builder.trajectory

    @property
    def context_length(self) -> int:
        return len(self.trajectory.prompt_ids) + self.builder.response_length

    def context_ids(self) -> list[int]:
        """Prompt and response so far: the next generation's input, ids exactly as held."""
        traj = self.trajectory
        return traj.prompt_ids + traj.response_ids

    @property
    def room(self) -> int | None:
        """Response tokens left in the budget (``None``: unbounded)."""
        return None if self.budget is None else self.budget - self.builder.response_length


@dataclass(frozen=True)
class Step:
    """What one call of :meth:`SearchEnv.step` or :meth:`SearchEnv.observe` did.

    Attributes:
        turn: the per-turn record (action, query, docs, observation text and span, truncation, error);
            FOLR reads its retrieved passages (``Trajectory.retrieved_passages``).
        query: a search the driver must run and hand to :meth:`SearchEnv.observe`; else ``None``.
        observation_ids: tokens appended by this call (``[]`` when none).
        observation_text: their text, as the model sees it.
        done: the episode ended.
        reason: why it ended (``None`` while it runs).
    """

    turn: Turn
    query: str | None
    observation_ids: list[int]
    observation_text: str
    done: bool
    reason: StopReason | None

    @property
    def action(self) -> TurnAction:
        return self.turn.action


def check_result_count(results: Any, queries: Sequence[str]) -> list[Sequence[Doc]]:
    """``results`` of ``retriever.search(queries, k)`` as a list, or ``ValueError`` if it has not one
    result list per query (a malformed batch counts as a retriever failure)."""
    if not isinstance(results, Sequence) or len(results) != len(queries):
        got = len(results) if isinstance(results, Sequence) else type(results).__name__
        raise ValueError(f"retriever returned {got} result lists for {len(queries)} queries")
    return list(results)


class SearchEnv:
    """The protocol step for any number of episodes (see the module docstring for the rules).

    Args:
        tokenizer: the policy's tokenizer: observations are tokenized with it once
            (``add_special_tokens=False``), cut observations decoded with it.
        limits: turn, token and observation limits.
        protocol: tags and texts (Search-R1 by default).

    Attributes:
        counters: totals over every episode of this env (``ENV_COUNTER_NAMES``).
    """

    def __init__(
        self, tokenizer: Any, limits: EnvLimits, protocol: ProtocolConfig = DEFAULT_PROTOCOL
    ) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.protocol = protocol
        self.counters: dict[str, int] = dict.fromkeys(ENV_COUNTER_NAMES, 0)
        self._eos_ids = eos_token_ids(tokenizer)
        self._suffix_ids = self._encode([f"</{protocol.information_tag}>{protocol.observation_padding}"])[0]
        self._invalid_text = invalid_observation(protocol)
        self._invalid_ids = self._encode([self._invalid_text])[0]

    # ------------------------------------------------------------------ episodes
    def reset(self, prompt_ids: Sequence[int], **fields: Any) -> Episode:
        """A new episode of ``prompt_ids``; ``fields`` go to the trajectory (question, golds, ids).

        A prompt that leaves no room in the budget ends at once (``prompt_too_long``).
        """
        if not prompt_ids:
            raise ValueError("an episode needs a non-empty prompt")
        limits, budgets = self.limits, []
        if limits.max_context_tokens is not None:
            budgets.append(limits.max_context_tokens - len(prompt_ids))
        if limits.max_response_tokens is not None:
            budgets.append(limits.max_response_tokens)
        episode = Episode(TrajectoryBuilder(prompt_ids, **fields), min(budgets) if budgets else None)
        if episode.room is not None and episode.room <= 0:
            self.counters["prompt_too_long"] += 1
            self._stop_for_context(episode, StopReason.PROMPT_TOO_LONG)
        return episode

    def generation_limit(self, episode: Episode) -> int:
        """Most tokens the episode's next generation may produce."""
        if episode.done or episode.pending_query is not None:
            raise RuntimeError("this episode cannot generate: it ended or waits for a search result")
        limits = [x for x in (self.limits.max_new_tokens, episode.room) if x is not None]
        return min(limits)

    def finish(self, episode: Episode) -> Trajectory:
        """The episode's trajectory, checked, with ``metadata["stop_reason"]`` and ``["rounds"]``."""
        trajectory = episode.builder.build()
        trajectory.metadata["rounds"] = episode.rounds
        return trajectory

    def abort(self, episode: Episode) -> None:
        """End an episode whose generation the server aborted (nothing is recorded for it)."""
        self._end(episode, StopReason.ABORTED)

    # ------------------------------------------------------------------ the step
    def step(
        self,
        episode: Episode,
        token_ids: Sequence[int],
        logprobs: Sequence[float] | None = None,
        text: str | None = None,
        finish_reason: FinishReason | None = None,
    ) -> Step:
        """Record one generation as a turn and apply the protocol to it.

        Args:
            episode: an episode that may generate (:meth:`generation_limit` was its limit).
            token_ids: the ids generated, as generated; more than the limit are cut.
            logprobs: the sampler's log-probability of each id (``None``: not recorded, 0.0).
            text: ``token_ids`` decoded without special tokens (decoded here when ``None``).
            finish_reason: the engine's; when ``None`` it is ``"length"`` for an output that fills the
                limit without ending in EOS or a stop string (what vLLM reports as ``"length"``).
        """
        limit = self.generation_limit(episode)
        if len(token_ids) > limit:
            # The engine ran past this episode's limit (a batch runs to its longest row's limit).
            token_ids, text, finish_reason = token_ids[:limit], None, "length"
            logprobs = None if logprobs is None else logprobs[:limit]
        if text is None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if finish_reason is None:
            finish_reason = self._finish_reason(token_ids, text, limit)
        self.counters["generated_tokens"] += len(token_ids)
        parsed = parse_action(text, self.protocol)
        builder = episode.builder
        reason = parsed.reason.value if parsed.reason is not None else None

        if parsed.kind is ActionKind.INVALID and finish_reason == "length":
            turn = builder.add_generation(
                token_ids, logprobs, text, TurnAction.TRUNCATED, invalid_reason=reason, truncated=True
            )
            self.counters["generation_truncated"] += 1
            max_new = self.limits.max_new_tokens
            if max_new is None or limit < max_new:  # the budget, not the per-generation cap, cut it
                self._stop_for_context(episode)
            else:
                self._end(episode, StopReason.GENERATION_TRUNCATED)
            return self._result(episode, turn)

        if parsed.kind is ActionKind.ANSWER:
            turn = builder.add_generation(
                token_ids, logprobs, text, TurnAction.ANSWER, content=parsed.content
            )
            self.counters["answers"] += 1
            self._end(episode, StopReason.ANSWER)
            return self._result(episode, turn)

        final_round = episode.rounds >= self.limits.max_turns
        if parsed.kind is ActionKind.SEARCH:
            if final_round:
                turn = builder.add_generation(
                    token_ids,
                    logprobs,
                    text,
                    TurnAction.INVALID,
                    content=parsed.content,
                    invalid_reason=InvalidReason.SEARCH_AFTER_LIMIT.value,
                )
                self.counters["search_after_limit"] += 1
                self._end(episode, StopReason.SEARCH_AFTER_LIMIT)
                return self._result(episode, turn)
            turn = builder.add_generation(
                token_ids, logprobs, text, TurnAction.SEARCH, content=parsed.content
            )
            self.counters["searches"] += 1
            episode.rounds += 1
            if self._spent(episode):
                self._stop_for_context(episode)  # no room for the results: do not search
            else:
                episode.pending_query = parsed.content
            return self._result(episode, turn)

        turn = builder.add_generation(token_ids, logprobs, text, TurnAction.INVALID, invalid_reason=reason)
        self.counters["invalid_actions"] += 1
        if final_round:
            self._end(episode, StopReason.INVALID_FINAL)
            return self._result(episode, turn)
        episode.rounds += 1
        if self._spent(episode):
            self._stop_for_context(episode)
            return self._result(episode, turn)
        return self._append(episode, self._invalid_ids, self._invalid_text, (), information=False)

    def observe(self, results: Sequence[tuple[Episode, SearchResult]]) -> list[Step]:
        """Give each waiting episode its search result: the retrieved passages, or the exception the
        retriever raised for its query (that episode fails, the others go on). The observations of the
        whole batch are tokenized in one call. Returns one step per item, in order."""
        steps: list[Step | None] = []
        fresh: list[tuple[int, Episode, tuple[Doc, ...], str]] = []
        for episode, result in results:
            query = episode.pending_query
            if query is None:
                raise RuntimeError("observe() needs an episode waiting for a search result")
            episode.pending_query = None
            if not isinstance(result, BaseException):
                docs = tuple(result)
                bad = next((doc for doc in docs if not isinstance(doc, Doc)), None)
                if bad is None:
                    fresh.append((len(steps), episode, docs, format_observation(docs, self.protocol)))
                    steps.append(None)
                    continue
                result = TypeError(f"retriever returned a {type(bad).__name__}, expected tspo.doc.Doc")
            steps.append(self._fail_retrieval(episode, query, result))
        encoded = self._encode([text for *_, text in fresh])
        for (index, episode, docs, text), ids in zip(fresh, encoded, strict=True):
            steps[index] = self._append(episode, ids, text, docs, information=True)
        return [step for step in steps if step is not None]

    # ------------------------------------------------------------------ helpers
    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _finish_reason(self, token_ids: Sequence[int], text: str, limit: int) -> FinishReason:
        if len(token_ids) < limit or (token_ids and token_ids[-1] in self._eos_ids):
            return "stop"
        return "stop" if any(text.endswith(stop) for stop in self.protocol.stop_strings) else "length"

    @staticmethod
    def _spent(episode: Episode) -> bool:
        return episode.room is not None and episode.room <= 0

    def _end(self, episode: Episode, reason: StopReason) -> None:
        episode.stop_reason = reason
        episode.pending_query = None
        episode.trajectory.metadata["stop_reason"] = reason.value

    def _stop_for_context(self, episode: Episode, reason: StopReason = StopReason.CONTEXT_LIMIT) -> None:
        episode.trajectory.context_truncated = True
        self.counters["context_truncated"] += 1
        self._end(episode, reason)

    def _result(self, episode: Episode, turn: Turn, ids: list[int] | None = None, text: str = "") -> Step:
        return Step(turn, episode.pending_query, ids or [], text, episode.done, episode.stop_reason)

    def _fail_retrieval(self, episode: Episode, query: str, error: BaseException) -> Step:
        message = f"retrieval failed for query {query!r}: {type(error).__name__}: {error}"
        turn = episode.trajectory.turns[-1]
        turn.error = message
        episode.trajectory.error = message
        self.counters["retrieval_errors"] += 1
        self._end(episode, StopReason.RETRIEVAL_ERROR)
        return self._result(episode, turn)

    def _append(
        self, episode: Episode, ids: list[int], text: str, docs: tuple[Doc, ...], *, information: bool
    ) -> Step:
        """Append an observation (mask 0), cut to the observation limit and the budget left."""
        ids, limit = list(ids), self.limits.max_observation_tokens
        if episode.room is not None:
            limit = min(limit, episode.room)
        truncated = len(ids) > limit
        if truncated:
            suffix = self._suffix_ids
            # A cut information block keeps its closing tag, so the model still sees a closed block.
            ids = ids[: limit - len(suffix)] + suffix if information and limit > len(suffix) else ids[:limit]
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            self.counters["observation_truncated"] += 1
        episode.builder.add_observation(ids, text, docs=docs, truncated=truncated)
        self.counters["observation_tokens"] += len(ids)
        if self._spent(episode):
            self._stop_for_context(episode)
        return self._result(episode, episode.trajectory.turns[-1], ids, text)
