"""The multi-turn rollout loop (DESIGN sections 2, 3 and 7).

Each trajectory advances on its own: ``prompt, g_1, o_1, g_2, o_2, ..., g_K``. The loop runs in waves.
In a wave, every unfinished trajectory is generated in one batched engine call (or a few, by
``generation_batch_size``), whatever turn it is at; the searches issued in that wave go to the retriever
in one batched call (identical queries once); their observations are tokenized in one call and
appended. A trajectory that answered, failed or hit a limit leaves the pool, so the loop ends after at
most ``max_turns + 1`` waves.

The protocol step itself (actions, the round limit, truncations, observations, the reason a trajectory
ended) is :class:`tspo.rollout.env.SearchEnv`'s, the same object the verl agent loop drives; this module
only batches. Retrieval failures: a failing batch is retried query by query, so only the trajectories
whose own query failed end (``retrieval_error``), as the env's failure policy says; a server that stayed
unreachable through the client's retry budget fails the whole batch at once (no per-query retries).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tspo.protocol import (
    DEFAULT_PROTOCOL,
    ProtocolConfig,
    build_prompt_messages,
    build_prompt_text,
    example_segments,
)
from tspo.retrieval.base import RetrievalUnavailableError
from tspo.rollout.config import RolloutConfig
from tspo.rollout.engines.base import GenerationEngine, SamplingParams
from tspo.rollout.env import (
    ENV_COUNTER_NAMES,
    EnvLimits,
    Episode,
    SearchEnv,
    SearchResult,
    check_result_count,
)
from tspo.trajectory import Trajectory

COUNTER_NAMES = (
    "trajectories",
    "waves",
    "engine_calls",
    "retrieval_calls",
    "turns",
    *ENV_COUNTER_NAMES,
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


def env_limits(config: RolloutConfig) -> EnvLimits:
    """The :class:`~tspo.rollout.env.SearchEnv` limits of a rollout config (budget: prompt + response)."""
    return EnvLimits(
        max_turns=config.max_turns,
        max_new_tokens=config.max_new_tokens,
        max_observation_tokens=config.max_observation_tokens,
        max_context_tokens=config.max_context_tokens,
    )


@dataclass
class _RolloutRun:
    """One call of :func:`run_rollouts`: batching around one :class:`SearchEnv`."""

    engine: GenerationEngine
    tokenizer: Any
    retriever: Any
    config: RolloutConfig
    seed: int | None
    timings: dict[str, float] = field(default_factory=lambda: {"generate": 0.0, "retrieve": 0.0})
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0))

    def __post_init__(self) -> None:
        self.env = SearchEnv(self.tokenizer, env_limits(self.config), self.config.protocol)

    # ------------------------------------------------------------------ generation
    def _generate(self, ready: list[tuple[Episode, int]], wave: int) -> None:
        config = self.config
        size = config.generation_batch_size
        # Similar lengths side by side waste less padding when a wave needs several calls.
        ordered = sorted(ready, key=lambda item: item[0].context_length) if len(ready) > size else ready
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
            outputs = self.engine.generate([episode.context_ids() for episode, _ in chunk], params)
            self.timings["generate"] += time.perf_counter() - begin
            self.counters["engine_calls"] += 1
            if len(outputs) != len(chunk):
                raise RuntimeError(
                    f"engine {type(self.engine).__name__} returned {len(outputs)} outputs for {len(chunk)} prompts"
                )
            for (episode, _), output in zip(chunk, outputs, strict=True):
                self.env.step(episode, output.token_ids, output.logprobs, output.text, output.finish_reason)

    # ------------------------------------------------------------------ retrieval
    def _search_one_batch(self, queries: list[str]) -> list[SearchResult]:
        self.counters["retrieval_calls"] += 1
        return check_result_count(self.retriever.search(queries, self.config.topk), queries)

    def _search(self, queries: list[str]) -> list[SearchResult]:
        """Results per query; a failing batch is retried query by query so one bad query fails alone.

        A server that stayed unreachable through the client's whole retry budget fails every query of
        the batch at once: retrying them one by one would spend that budget again per query.
        """
        begin = time.perf_counter()
        try:
            try:
                return self._search_one_batch(queries)
            except RetrievalUnavailableError as unavailable:
                return [unavailable] * len(queries)
            except Exception as batch_error:
                if len(queries) == 1:
                    return [batch_error]
            results: list[SearchResult] = []
            for query in queries:
                try:
                    results.append(self._search_one_batch([query])[0])
                except Exception as error:
                    results.append(error)
            return results
        finally:
            self.timings["retrieve"] += time.perf_counter() - begin

    def _retrieve(self, searching: list[Episode]) -> None:
        if not searching:
            return
        unique = list(dict.fromkeys(episode.pending_query for episode in searching))
        by_query = dict(zip(unique, self._search(unique), strict=True))
        self.env.observe([(episode, by_query[episode.pending_query]) for episode in searching])

    # ------------------------------------------------------------------ the loop
    def run(self, tasks: Sequence[RolloutTask]) -> list[Trajectory]:
        protocol = self.config.protocol
        prompt_cache: dict[str, list[int]] = {}
        episodes: list[Episode] = []
        for task in tasks:
            if task.prompt_ids is not None:
                prompt_ids = [int(t) for t in task.prompt_ids]
            else:
                if task.question not in prompt_cache:
                    prompt_cache[task.question] = build_prompt_ids(task.question, self.tokenizer, protocol)
                prompt_ids = prompt_cache[task.question]
            if not prompt_ids:
                raise ValueError(
                    f"task {len(episodes)} ({task.sample_id or task.question!r}) has an empty prompt"
                )
            episode = self.env.reset(
                prompt_ids,
                question=task.question,
                golds=tuple(task.golds),
                group_id=task.group_id,
                sample_id=task.sample_id,
            )
            episodes.append(episode)
        self.counters["trajectories"] = len(episodes)

        wave = 0
        while True:
            ready = [
                (episode, self.env.generation_limit(episode)) for episode in episodes if not episode.done
            ]
            if not ready:
                break
            self.counters["waves"] += 1
            self._generate(ready, wave)
            self._retrieve([episode for episode, _ in ready if episode.pending_query is not None])
            wave += 1

        trajectories = [self.env.finish(episode) for episode in episodes]
        self.counters.update(self.env.counters)
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
