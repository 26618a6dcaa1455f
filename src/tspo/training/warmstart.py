"""Supervised warm start on demonstrations (the tiny preset's model starts from random weights).

A demonstration follows a question's intended chain of searches (``metadata["chain"]``, written by
the synthetic world): one ``<search> query </search>`` turn per hop with the real retriever's
observation appended, then ``<answer> gold </answer>``. It is built token-in/token-out with the same
:class:`~tspo.trajectory.TrajectoryBuilder` rollouts use, so the loss mask is the same: the model is
trained on its own turns only, never on retrieved text. Renamed copies (``warmstart.rename_entities``)
replace every entity name consistently, so that only copying from the retrieved text answers them.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from tspo.doc import Doc
from tspo.protocol import ActionKind, format_observation, parse_action
from tspo.rollout import RolloutConfig
from tspo.rollout.loop import build_prompt_ids
from tspo.training.policy import response_scores
from tspo.training.renaming import EntityRenamer
from tspo.training.schedules import warmup_then_linear_decay
from tspo.trajectory import Trajectory, TrajectoryBuilder, TurnAction, collate_trajectories

logger = logging.getLogger(__name__)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_demonstrations(
    examples: Sequence[Any],
    tokenizer: Any,
    retriever: Any,
    rollout: RolloutConfig,
    *,
    copies: int = 1,
    renamer: EntityRenamer | None = None,
    early_answer_fraction: float = 0.0,
    seed: int = 0,
) -> list[Trajectory]:
    """``copies`` demonstrations per example that has an intended search chain; others are skipped.

    The searches run once per example with the original queries. With a ``renamer`` every copy gets
    its own consistent substitution of the entity names in the question, the queries, the retrieved
    passages and the answer (see :mod:`tspo.training.renaming`). With ``early_answer_fraction`` that
    share of multi-hop demonstrations (a seeded draw per copy) stops after the first search and answers
    with the entity it found, the first bridge of the chain: a weaker teacher's habit for RL to correct.
    """
    draws = random.Random(seed)
    usable = [ex for ex in examples if ex.metadata.get("chain") and ex.golds]
    chains = [[str(query) for query in ex.metadata["chain"]] for ex in usable]
    retrieved: list[list[list[Doc]]] = [[] for _ in usable]
    for hop in range(max((len(chain) for chain in chains), default=0)):
        rows = [i for i, chain in enumerate(chains) if hop < len(chain)]
        results = retriever.search([chains[i][hop] for i in rows], rollout.topk)
        for row, docs in zip(rows, results, strict=True):
            retrieved[row].append(list(docs))
    # The first bridge entity of each multi-hop question: what an early-answering teacher answers.
    first_bridges = [
        str(ex.metadata["bridge_entities"][0])
        if len(chain) > 1 and ex.metadata.get("bridge_entities")
        else None
        for ex, chain in zip(usable, chains, strict=True)
    ]
    if early_answer_fraction > 0 and not any(first_bridges):
        logger.warning(
            "early_answer_fraction=%s has no effect: no demonstrated question has a multi-hop chain "
            "with metadata.bridge_entities",
            early_answer_fraction,
        )
    demos = []
    stopped_early = 0
    for _ in range(copies):
        for ex, chain, hops, bridge in zip(usable, chains, retrieved, first_bridges, strict=True):
            mapping: dict[str, str] = {}
            if renamer is not None:
                passages = [f"{doc.title} {doc.text}" for docs in hops for doc in docs]
                mapping = renamer.draw_mapping([ex.question, *ex.golds, *chain, *passages])

            def rename(text: str, mapping: dict[str, str] = mapping) -> str:
                return renamer.apply(mapping, text) if renamer is not None else text

            renamed_hops = [
                [replace(doc, title=rename(doc.title), text=rename(doc.text)) for doc in docs]
                for docs in hops
            ]
            queries = [rename(query) for query in chain]
            answer = rename(ex.golds[0])
            if bridge is not None and draws.random() < early_answer_fraction:
                queries, renamed_hops, answer = queries[:1], renamed_hops[:1], rename(bridge)
                stopped_early += 1
            demos.append(
                _demonstration(
                    rename(ex.question),
                    [rename(gold) for gold in ex.golds],
                    queries,
                    renamed_hops,
                    answer,
                    str(ex.id),
                    tokenizer,
                    rollout,
                )
            )
    if early_answer_fraction > 0:
        logger.info("demonstrations: %d, of which %d stop after the first search", len(demos), stopped_early)
    return demos


def _demonstration(
    question: str,
    golds: list[str],
    queries: list[str],
    hops: list[list[Doc]],
    answer: str,
    sample_id: str,
    tokenizer: Any,
    rollout: RolloutConfig,
) -> Trajectory:
    """One search turn per query with its observation, then the turn answering ``answer``."""
    protocol = rollout.protocol
    builder = TrajectoryBuilder(
        build_prompt_ids(question, tokenizer, protocol),
        question=question,
        golds=tuple(golds),
        sample_id=sample_id,
    )
    for query, docs in zip(queries, hops, strict=True):
        text = f"<{protocol.search_tag}> {query} </{protocol.search_tag}>"
        action = parse_action(text, protocol)
        assert action.kind is ActionKind.SEARCH, text
        builder.add_generation(_encode(tokenizer, text), None, text, TurnAction.SEARCH, content=query)
        observation = format_observation(docs, protocol)
        ids = _encode(tokenizer, observation)[: rollout.max_observation_tokens]
        builder.add_observation(ids, observation, docs)
    text = f"<{protocol.answer_tag}> {answer} </{protocol.answer_tag}>"
    builder.add_generation(_encode(tokenizer, text), None, text, TurnAction.ANSWER, content=answer)
    return builder.build()


def backward_demonstration_loss(
    model: torch.nn.Module, batch: Sequence[Trajectory], pad_token_id: int
) -> float:
    """Back-propagate the mean negative log-likelihood of ``batch``'s trained tokens; returns it.

    The batch is scored in the runs of :func:`split_by_length`, each run's summed loss divided by the
    whole batch's token count, so the accumulated gradient is the one of the padded batch.
    """
    lengths = [len(demo.prompt_ids) + len(demo.response_ids) for demo in batch]
    trained_tokens = max(1, sum(sum(demo.loss_mask) for demo in batch))
    total = 0.0
    for part in split_by_length(lengths, range(len(batch))):
        scored = collate_trajectories([batch[i] for i in part], pad_token_id)
        logprobs = response_scores(model, scored).logprobs
        loss = -(logprobs * scored.loss_mask.to(logprobs.device)).sum() / trained_tokens
        loss.backward()
        total += float(loss.detach())
    return total


def split_by_length(lengths: Sequence[int], rows: Sequence[int]) -> list[list[int]]:
    """``rows`` sorted by length and cut into two runs at the cut that pads least, if that saves
    at least a tenth of the padded tokens (else one run: a second forward pass has its own cost).

    One- and two-hop demonstrations mixed in a batch pad the short ones to the long ones' length (a
    third of the compute in the tiny preset); scoring the two runs separately and summing their
    losses gives the same gradient without that padding.
    """
    ordered = sorted(rows, key=lengths.__getitem__)
    if not ordered:
        return []
    whole = len(ordered) * lengths[ordered[-1]]
    best_cut, best_cost = 0, 0.9 * whole
    for cut in range(1, len(ordered)):
        cost = cut * lengths[ordered[cut - 1]] + (len(ordered) - cut) * lengths[ordered[-1]]
        if cost <= best_cost:
            best_cut, best_cost = cut, cost
    return [part for part in (ordered[:best_cut], ordered[best_cut:]) if part]


def warm_start(
    model: torch.nn.Module,
    tokenizer: Any,
    demonstrations: Sequence[Trajectory],
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    pad_token_id: int,
    warmup_steps: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Maximise the likelihood of the demonstrations' generated tokens; returns the loss per step.

    AdamW with the learning rate rising linearly over ``warmup_steps`` and decaying linearly to 0.
    ``on_step(step, loss)`` is called after every step (1-based), e.g. to advance a progress bar and
    log the loss.
    """
    if not demonstrations or steps <= 0:
        return []
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(warmup_then_linear_decay, warmup_steps=warmup_steps, total_steps=steps)
    )
    model.train()
    losses = []
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(demonstrations)))
            rng.shuffle(fresh)
            order.extend(fresh)
        rows, order = order[:batch_size], order[batch_size:]
        optimizer.zero_grad(set_to_none=True)
        losses.append(backward_demonstration_loss(model, [demonstrations[r] for r in rows], pad_token_id))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(len(losses), losses[-1])
    logger.info("warm start: %d steps, loss %.3f -> %.3f", steps, losses[0], losses[-1])
    return losses
