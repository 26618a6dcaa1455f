"""The multi-turn rollout loop (DESIGN sections 2, 3 and 7).

Each trajectory advances on its own: ``prompt, g_1, o_1, g_2, o_2, ..., g_K``. The loop runs in waves.
In a wave, every unfinished trajectory is generated in one batched engine call (or a few, by
``generation_batch_size``), whatever turn it is at; the searches issued in that wave go to the retriever
in one batched call (identical queries once); observations are tokenized once and appended. A
trajectory that answered, failed or hit a limit leaves the pool, so the loop ends after at most
``max_turns + 1`` waves.

Rules (each one tested):
- A generation is cut just after the first ``</search>`` / ``</answer>`` by the engine; its action is
  parsed from its own text (:func:`tspo.protocol.parse_action`).
- Search: executed while the trajectory has used fewer than ``max_turns`` rounds; the observation is
  ``format_observation(docs)``. Invalid action: the corrective ``invalid_observation()`` is appended
  and the loop continues. Both use one round, so a model that never produces a valid action still
  ends.
- After ``max_turns`` rounds one final generation follows. If it searches anyway, the search is not
  executed: the turn is recorded as ``INVALID`` with ``invalid_reason="search_after_limit"`` (its query
  kept in ``content``), it gets no observation and the trajectory ends (Search-R1 likewise appends
  nothing and stops). An invalid final generation also ends the trajectory without an observation.
- A generation that reaches its token limit without closing an action tag is ``TRUNCATED`` with
  ``generation_truncated=True`` and ends the trajectory.
- Observations longer than ``max_observation_tokens`` are cut (an ``<information>`` block keeps its
  closing tag) with ``observation_truncated=True`` and ``observation_text`` = the decoded kept tokens.
- Total context (prompt + response) never exceeds ``max_context_tokens``: generations are limited to
  the room left, observations cut to it, and the trajectory stops with ``context_truncated=True``.
- A retriever error fails only the trajectories whose query failed (``Trajectory.error`` and the turn's
  ``error`` say why); a failing batch is retried query by query to find them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tspo.doc import Doc
from tspo.protocol import (
    DEFAULT_PROTOCOL,
    ActionKind,
    ProtocolConfig,
    build_prompt_messages,
    build_prompt_text,
    example_segments,
    format_observation,
    invalid_observation,
    parse_action,
)
from tspo.rollout.config import RolloutConfig
from tspo.rollout.engines.base import GenerationEngine, GenerationOutput, SamplingParams
from tspo.trajectory import Trajectory, TrajectoryBuilder, Turn, TurnAction

COUNTER_NAMES = (
    "trajectories",
    "waves",
    "engine_calls",
    "retrieval_calls",
    "turns",
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


@dataclass(frozen=True)
class RolloutTask:
    """One rollout to run.

    Attributes:
        question: the question put in the instruction.
        golds: gold answer aliases (kept on the trajectory for scoring).
        group_id: rollouts of the same prompt share it.
        sample_id: free-form id (e.g. ``"<example id>#<sample>"``).
        prompt_ids: a ready prompt; when given, ``question`` is not templated again.
    """

    question: str
    golds: tuple[str, ...] = ()
    group_id: int = 0
    sample_id: str = ""
    prompt_ids: Sequence[int] | None = None


@dataclass
class RolloutResult:
    """Trajectories in task order, the time split and what was counted.

    Attributes:
        trajectories: one per task, same order.
        timings: seconds spent in ``generate`` (engine calls), ``retrieve`` (retriever calls) and
            ``other`` (templating, tokenization, parsing, bookkeeping).
        counters: totals over the run (see ``COUNTER_NAMES``): truncations of each kind, searches,
            invalid actions, retrieval errors, generated and observation tokens, engine calls.
    """

    trajectories: list[Trajectory]
    timings: dict[str, float]
    counters: dict[str, int]

    @property
    def seconds(self) -> float:
        return sum(self.timings.values())

    @property
    def generated_tokens(self) -> int:
        return self.counters.get("generated_tokens", 0)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of wall time of the whole loop."""
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def build_prompt_ids(question: str, tokenizer: Any, protocol: ProtocolConfig = DEFAULT_PROTOCOL) -> list[int]:
    """Prompt ids of ``question``: the instruction as a chat user turn when the tokenizer has a template
    (and ``protocol.use_chat_template``), with the assistant generation prompt; else the raw text.

    The protocol's worked examples, if any, come first (:func:`tspo.protocol.build_prompt_messages` /
    :func:`~tspo.protocol.build_prompt_text`). Their generated actions and observations are tokenized
    one segment at a time, as the loop tokenizes a real rollout. Tokenizing the whole text at once
    splits characters differently at segment borders (SmolLM2: an observation's closing ``\\n\\n`` is
    one token on its own, two before ``<answer>``), and the model would be shown tokens it never sees
    in its own rollouts.
    """
    chat = bool(protocol.use_chat_template and getattr(tokenizer, "chat_template", None))
    if chat:
        # The template text already holds BOS-like markers; do not add them twice.
        text = tokenizer.apply_chat_template(
            build_prompt_messages(question, protocol), add_generation_prompt=True, tokenize=False
        )
    else:
        text = build_prompt_text(question, protocol)
    pieces: list[str] = []
    position = 0
    for example in protocol.worked_examples:
        for segment in example_segments(example, protocol):
            found = text.index(segment, position)
            pieces += [text[position:found], segment]
            position = found + len(segment)
    pieces.append(text[position:])
    ids: list[int] = []
    for index, piece in enumerate(pieces):
        if piece:
            special = index == 0 and not chat
            ids += tokenizer(piece, add_special_tokens=special)["input_ids"]
    return [int(token) for token in ids]


def _call_seed(seed: int | None, wave: int, chunk: int) -> int | None:
    """A distinct, reproducible seed for every engine call of a run."""
    if seed is None:
        return None
    return (seed * 1_000_003 + wave * 7_919 + chunk * 104_729) % (2**31 - 1)


@dataclass
class _Rollout:
    """Mutable state of one trajectory while the loop runs."""

    builder: TrajectoryBuilder
    rounds: int = 0
    done: bool = False
    pending_query: str | None = None

    @property
    def trajectory(self) -> Trajectory:
        return self.builder.trajectory

    @property
    def context_length(self) -> int:
        traj = self.trajectory
        return len(traj.prompt_ids) + len(traj.response_ids)

    def context_ids(self) -> list[int]:
        traj = self.trajectory
        return traj.prompt_ids + traj.response_ids

    @property
    def last_turn(self) -> Turn:
        return self.trajectory.turns[-1]

    def finish(self, reason: str) -> None:
        self.done = True
        self.pending_query = None
        self.trajectory.metadata["stop_reason"] = reason


@dataclass
class _Observation:
    rollout: _Rollout
    text: str
    docs: tuple[Doc, ...] = ()
    is_information: bool = False


@dataclass
class _RolloutRun:
    """One call of :func:`run_rollouts`: the loop and its bookkeeping."""

    engine: GenerationEngine
    tokenizer: Any
    retriever: Any
    config: RolloutConfig
    seed: int | None
    timings: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "retrieve": 0.0})
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))

    def __post_init__(self) -> None:
        protocol = self.config.protocol
        self._suffix_ids = self._encode([f"</{protocol.information_tag}>\n\n"])[0]
        self._invalid_text = invalid_observation(protocol)
        self._invalid_ids = self._encode([self._invalid_text])[0]

    # ------------------------------------------------------------------ helpers
    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def _room(self, rollout: _Rollout) -> int:
        return self.config.max_context_tokens - rollout.context_length

    def _stop_for_context(self, rollout: _Rollout) -> None:
        rollout.trajectory.context_truncated = True
        self.counters["context_truncated"] += 1
        rollout.finish("context_limit")

    # ------------------------------------------------------------------ generation
    def _generate(self, ready: list[tuple[_Rollout, int]], wave: int) -> list[_Observation]:
        config = self.config
        size = config.generation_batch_size
        # Similar lengths side by side waste less padding when a wave needs several calls.
        ordered = sorted(ready, key=lambda item: item[0].context_length) if len(ready) > size else ready
        observations: list[_Observation] = []
        for chunk_index, start in enumerate(range(0, len(ordered), size)):
            chunk = ordered[start : start + size]
            params = SamplingParams(
                temperature=config.temperature,
                top_p=config.top_p,
                max_new_tokens=max(limit for _, limit in chunk),
                stop=config.protocol.stop_strings,
                seed=_call_seed(self.seed, wave, chunk_index),
            )
            begin = time.perf_counter()
            outputs = self.engine.generate([rollout.context_ids() for rollout, _ in chunk], params)
            self.timings["generate"] += time.perf_counter() - begin
            self.counters["engine_calls"] += 1
            if len(outputs) != len(chunk):
                raise RuntimeError(
                    f"engine {type(self.engine).__name__} returned {len(outputs)} outputs for {len(chunk)} prompts"
                )
            for (rollout, limit), output in zip(chunk, outputs, strict=True):
                observation = self._apply_generation(rollout, output, limit)
                if observation is not None:
                    observations.append(observation)
        return observations

    def _apply_generation(
        self, rollout: _Rollout, output: GenerationOutput, limit: int
    ) -> _Observation | None:
        """Record one generation as a turn; return the invalid-action observation it needs, if any."""
        config, protocol = self.config, self.config.protocol
        token_ids, logprobs, text, finish = (
            output.token_ids,
            output.logprobs,
            output.text,
            output.finish_reason,
        )
        if len(token_ids) > limit:
            # The batch ran to the longest row limit; this row's own limit (context room) is smaller.
            token_ids, logprobs = token_ids[:limit], logprobs[:limit]
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            finish = "length"
        self.counters["generated_tokens"] += len(token_ids)
        parsed = parse_action(text, protocol)
        builder = rollout.builder
        reason = parsed.reason.value if parsed.reason is not None else None

        if parsed.kind is ActionKind.INVALID and finish == "length":
            builder.add_generation(
                token_ids, logprobs, text, TurnAction.TRUNCATED, invalid_reason=reason, truncated=True
            )
            self.counters["generation_truncated"] += 1
            if limit < config.max_new_tokens:
                self._stop_for_context(rollout)
            else:
                rollout.finish("generation_truncated")
            return None

        if parsed.kind is ActionKind.ANSWER:
            builder.add_generation(token_ids, logprobs, text, TurnAction.ANSWER, content=parsed.content)
            self.counters["answers"] += 1
            rollout.finish("answer")
            return None

        final_round = rollout.rounds >= config.max_turns
        if parsed.kind is ActionKind.SEARCH:
            if final_round:
                builder.add_generation(
                    token_ids,
                    logprobs,
                    text,
                    TurnAction.INVALID,
                    content=parsed.content,
                    invalid_reason="search_after_limit",
                )
                self.counters["search_after_limit"] += 1
                rollout.finish("search_after_limit")
                return None
            builder.add_generation(token_ids, logprobs, text, TurnAction.SEARCH, content=parsed.content)
            self.counters["searches"] += 1
            rollout.rounds += 1
            if self._room(rollout) <= 0:
                self._stop_for_context(rollout)
            else:
                rollout.pending_query = parsed.content
            return None

        builder.add_generation(token_ids, logprobs, text, TurnAction.INVALID, invalid_reason=reason)
        self.counters["invalid_actions"] += 1
        if final_round:
            rollout.finish("invalid_final")
            return None
        rollout.rounds += 1
        if self._room(rollout) <= 0:
            self._stop_for_context(rollout)
            return None
        return _Observation(rollout, self._invalid_text)

    # ------------------------------------------------------------------ retrieval
    def _search_one_batch(self, queries: list[str]) -> list[list[Doc]]:
        self.counters["retrieval_calls"] += 1
        results = self.retriever.search(queries, self.config.topk)
        if not isinstance(results, Sequence) or len(results) != len(queries):
            got = len(results) if isinstance(results, Sequence) else type(results).__name__
            raise ValueError(f"retriever returned {got} result lists for {len(queries)} queries")
        checked = []
        for docs in results:
            docs = list(docs)
            for doc in docs:
                if not isinstance(doc, Doc):
                    raise TypeError(f"retriever returned a {type(doc).__name__}, expected tspo.doc.Doc")
            checked.append(docs)
        return checked

    def _search(self, queries: list[str]) -> list[list[Doc] | Exception]:
        """Results per query; a failing batch is retried query by query so one bad query fails alone."""
        begin = time.perf_counter()
        try:
            try:
                return list(self._search_one_batch(queries))
            except Exception as batch_error:
                if len(queries) == 1:
                    return [batch_error]
            results: list[list[Doc] | Exception] = []
            for query in queries:
                try:
                    results.append(self._search_one_batch([query])[0])
                except Exception as error:
                    results.append(error)
            return results
        finally:
            self.timings["retrieve"] += time.perf_counter() - begin

    def _retrieve(self, searching: list[_Rollout]) -> list[_Observation]:
        if not searching:
            return []
        unique = list(dict.fromkeys(rollout.pending_query for rollout in searching if rollout.pending_query))
        by_query = dict(zip(unique, self._search(unique), strict=True))
        observations = []
        for rollout in searching:
            query = rollout.pending_query
            rollout.pending_query = None
            result = by_query[query]
            if isinstance(result, Exception):
                message = f"retrieval failed for query {query!r}: {type(result).__name__}: {result}"
                rollout.last_turn.error = message
                rollout.trajectory.error = message
                self.counters["retrieval_errors"] += 1
                rollout.finish("retrieval_error")
                continue
            docs = tuple(result)
            text = format_observation(docs, self.config.protocol)
            observations.append(_Observation(rollout, text, docs, is_information=True))
        return observations

    # ------------------------------------------------------------------ observations
    def _append(self, observations: list[_Observation]) -> None:
        """Tokenize every observation of the wave in one call, cut what is too long, append."""
        fresh = [obs for obs in observations if obs.is_information]
        encoded = iter(self._encode([obs.text for obs in fresh]))
        for obs in observations:
            ids = next(encoded) if obs.is_information else self._invalid_ids
            limit = min(self.config.max_observation_tokens, self._room(obs.rollout))
            text, truncated = obs.text, False
            if len(ids) > limit:
                suffix = self._suffix_ids
                if obs.is_information and limit > len(suffix):
                    ids = ids[: limit - len(suffix)] + suffix
                else:
                    ids = ids[:limit]
                text = self.tokenizer.decode(ids, skip_special_tokens=False)
                truncated = True
                self.counters["observation_truncated"] += 1
            obs.rollout.builder.add_observation(ids, text, docs=obs.docs, truncated=truncated)
            self.counters["observation_tokens"] += len(ids)

    # ------------------------------------------------------------------ the loop
    def run(self, tasks: Sequence[RolloutTask]) -> list[Trajectory]:
        protocol = self.config.protocol
        prompt_cache: dict[str, list[int]] = {}
        rollouts: list[_Rollout] = []
        for task in tasks:
            if task.prompt_ids is not None:
                prompt_ids = [int(t) for t in task.prompt_ids]
            else:
                if task.question not in prompt_cache:
                    prompt_cache[task.question] = build_prompt_ids(task.question, self.tokenizer, protocol)
                prompt_ids = prompt_cache[task.question]
            builder = TrajectoryBuilder(
                prompt_ids,
                question=task.question,
                golds=tuple(task.golds),
                group_id=task.group_id,
                sample_id=task.sample_id,
            )
            if not prompt_ids:
                raise ValueError(
                    f"task {len(rollouts)} ({task.sample_id or task.question!r}) has an empty prompt"
                )
            rollout = _Rollout(builder)
            if len(prompt_ids) >= self.config.max_context_tokens:
                self.counters["prompt_too_long"] += 1
                self._stop_for_context(rollout)
                rollout.finish("prompt_too_long")
            rollouts.append(rollout)
        self.counters["trajectories"] = len(rollouts)

        wave = 0
        while True:
            ready: list[tuple[_Rollout, int]] = []
            for rollout in rollouts:
                if rollout.done:
                    continue
                room = self._room(rollout)
                if room <= 0:
                    self._stop_for_context(rollout)
                    continue
                ready.append((rollout, min(self.config.max_new_tokens, room)))
            if not ready:
                break
            self.counters["waves"] += 1
            observations = self._generate(ready, wave)
            observations += self._retrieve(
                [rollout for rollout, _ in ready if rollout.pending_query is not None]
            )
            self._append(observations)
            wave += 1

        trajectories = [rollout.builder.build() for rollout in rollouts]
        for traj, rollout in zip(trajectories, rollouts, strict=True):
            traj.metadata["rounds"] = rollout.rounds
        self.counters["turns"] = sum(t.num_turns for t in trajectories)
        return trajectories


def run_rollouts(
    engine: GenerationEngine,
    tokenizer: Any,
    retriever: Any,
    tasks: Sequence[RolloutTask],
    config: RolloutConfig | None = None,
    seed: int | None = 0,
) -> RolloutResult:
    """Roll out every task to a finished :class:`~tspo.trajectory.Trajectory` (see the module docstring).

    Args:
        engine: a :class:`~tspo.rollout.engines.GenerationEngine` (hf, vllm, scripted).
        tokenizer: the policy's tokenizer (templating, observation tokens, decoding).
        retriever: anything with ``search(queries: list[str], k: int) -> list[list[Doc]]``.
        tasks: the rollouts to run, e.g. ``group_size`` tasks per question sharing a ``group_id``.
        config: limits and sampling; default :class:`RolloutConfig()`.
        seed: makes sampling reproducible (every engine call gets a seed derived from it and its
            position in the run); ``None`` leaves the random state alone.
    """
    config = config or RolloutConfig()
    start = time.perf_counter()
    run = _RolloutRun(engine, tokenizer, retriever, config, seed)
    try:
        trajectories = run.run(tasks)
    finally:
        # Engines that keep per-trajectory KV caches across turns (hf) free them: no later call
        # continues these trajectories, and the weights may change before the next run.
        release = getattr(engine, "release_cache", None)
        if callable(release):
            release()
    total = time.perf_counter() - start
    timings = {
        "generate": run.timings["generate"],
        "retrieve": run.timings["retrieve"],
        "other": max(0.0, total - run.timings["generate"] - run.timings["retrieve"]),
    }
    return RolloutResult(trajectories=trajectories, timings=timings, counters=dict(run.counters))
