"""The trainer's held-out evaluation: greedy and sampled EM on the same questions, before and after.

Greedy EM says what the policy does at its most likely; sampled EM (the rollout temperature, a fixed
seed) says what RL actually trains on, and moves first: a policy can raise the probability of good
trajectories long before they become the argmax. Reporting both keeps a run from claiming a gain (or a
loss) that only one decoding shows. Keys, as logged in ``metrics.jsonl`` (``eval/`` prefixed there)::

    greedy/em, greedy/searches, greedy/complete_success, ...   (every key of ``summarize_records``)
    sampled/em, sampled/searches, ...
    em, n, ...                                                  (the greedy values, for older readers)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from tspo.evaluation.runner import evaluate_policy
from tspo.evaluation.summary import summarize_records
from tspo.rollout import RolloutConfig

#: The two decodings, in report order.
DECODINGS = ("greedy", "sampled")


def heldout_metrics(
    engine: Any,
    tokenizer: Any,
    retriever: Any,
    examples: Sequence[Any],
    rollout_config: RolloutConfig,
    *,
    metric: str = "em",
    hit_mode: str = "whole_word",
    seed: int = 0,
    sampled: bool = True,
    batch_size: int = 32,
    progress: Any = None,
    on_records: Callable[[str, list[dict[str, Any]]], None] | None = None,
) -> dict[str, float]:
    """Greedy (and, with ``sampled``, sampled) metrics of one rollout per example.

    Args:
        rollout_config: the training rollout settings; greedy sets the temperature to 0, sampled uses
            the configured temperature with rollout seed ``seed`` (the same sample at every call).
        batch_size: questions rolled out together; the progress callback advances per batch.
        progress: ``progress(done: int)`` called with questions finished so far (both decodings count;
            the total is ``len(examples) * len(decodings)``), e.g. a tqdm bar's ``update``.
        on_records: ``on_records(decoding, records)`` with each decoding's scored records
            (:func:`~tspo.evaluation.records.trajectory_to_record`), e.g. to write them to disk.

    Returns:
        ``{"greedy/<key>": ..., "sampled/<key>": ..., <key>: greedy value}`` for every key of
        :func:`~tspo.evaluation.summary.summarize_records`; sampled keys are absent when the
        temperature is 0 (sampling would repeat greedy) or ``sampled`` is false.
    """
    decodings = [("greedy", True)]
    if sampled and rollout_config.temperature > 0:
        decodings.append(("sampled", False))
    metrics: dict[str, float] = {}
    for name, greedy in decodings:
        records = heldout_records(
            engine,
            tokenizer,
            retriever,
            examples,
            rollout_config,
            greedy=greedy,
            metric=metric,
            hit_mode=hit_mode,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
        if on_records is not None:
            on_records(name, records)
        metrics.update({f"{name}/{key}": value for key, value in summarize_records(records).items()})
    metrics.update(
        {key.split("/", 1)[1]: value for key, value in metrics.items() if key.startswith("greedy/")}
    )
    return metrics


def heldout_records(
    engine: Any,
    tokenizer: Any,
    retriever: Any,
    examples: Sequence[Any],
    rollout_config: RolloutConfig,
    *,
    greedy: bool,
    metric: str = "em",
    hit_mode: str = "whole_word",
    seed: int = 0,
    batch_size: int = 32,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """One scored record per example for one decoding, rolled out ``batch_size`` questions at a time.

    Sampling uses a distinct, fixed seed per batch, so the same questions get the same samples at every
    call (before and after training, and in every run that evaluates them).
    """
    config = dataclasses.replace(rollout_config, generation_batch_size=max(1, batch_size))
    records: list[dict[str, Any]] = []
    for start in range(0, len(examples), max(1, batch_size)):
        batch = examples[start : start + batch_size]
        result = evaluate_policy(
            engine,
            tokenizer,
            retriever,
            batch,
            config,
            metric=metric,
            hit_mode=hit_mode,
            seed=seed * 1_000_003 + start,
            greedy=greedy,
        )
        records.extend(result.records)
        if progress is not None:
            progress(len(batch))
    return records


def behaviour_change(
    before: dict[str, float], after: dict[str, float], decoding: str = "sampled"
) -> list[str]:
    """Plain-words lines on what changed between two :func:`heldout_metrics` results (``decoding``'s
    values, greedy when absent): searches per question, answered share and the trajectory categories."""
    prefix = f"{decoding}/" if f"{decoding}/em" in before and f"{decoding}/em" in after else "greedy/"

    def pair(key: str) -> tuple[float, float]:
        return before.get(prefix + key, 0.0), after.get(prefix + key, 0.0)

    label = prefix.rstrip("/")
    lines = []
    searches = pair("searches")
    lines.append(f"searches per question {searches[0]:.2f} -> {searches[1]:.2f} ({label})")
    answered = pair("answered")
    lines.append(f"questions answered {answered[0]:.0%} -> {answered[1]:.0%}")
    parts = []
    for key, title in (
        ("complete_success", "success"),
        ("near_miss", "near miss (answer retrieved, not given)"),
        ("complete_failure", "failure"),
        ("success_without_retrieval", "right without retrieving it"),
    ):
        a, b = pair(key)
        parts.append(f"{title} {a:.0%} -> {b:.0%}")
    lines.append("; ".join(parts))
    return lines
