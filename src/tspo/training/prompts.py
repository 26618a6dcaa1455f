"""What a run puts in front of the model: a resumable, seeded prompt order (a resumed run draws exactly
the batches the killed run would have) and the few-shot worked examples of ``rollout.protocol.examples``."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from tspo.doc import Doc
from tspo.protocol import ProtocolConfig, WorkedExample, format_observation, retrieved_text
from tspo.rewards.folr import answer_in_text
from tspo.rollout.config import RolloutConfig

T = TypeVar("T")


class PromptSampler(Generic[T]):
    """Draws items in a fresh seeded permutation per epoch; its state is two integers."""

    def __init__(self, items: Sequence[T], seed: int) -> None:
        if not items:
            raise ValueError("the training set is empty: no prompts to draw")
        self._items = list(items)
        self._seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self._items)))
        random.Random(self._seed * 1_000_003 + epoch).shuffle(order)
        return order

    def draw(self, count: int) -> list[T]:
        """The next ``count`` items, wrapping into a new epoch (new permutation) when needed."""
        drawn = []
        for _ in range(count):
            if self.position >= len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            drawn.append(self._items[self._order[self.position]])
            self.position += 1
        return drawn

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self._seed, "size": len(self._items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("size") != len(self._items) or state.get("seed") != self._seed:
            raise ValueError(
                f"data-loader state is for {state.get('size')} prompts with seed {state.get('seed')}, "
                f"this run has {len(self._items)} with seed {self._seed}; resume with the same data and seed"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._permutation(self.epoch)


def choose_worked_examples(
    examples: Sequence[Any],
    retriever: Any,
    tokenizer: Any,
    rollout: RolloutConfig,
    count: int,
    seed: int,
) -> list[WorkedExample]:
    """``count`` few-shot examples from ``examples`` (pass the training split, never the held-out one).

    Each follows a question's intended search chain (``metadata["chain"]``, written by the synthetic
    world) with what the configured retriever returns for every query, and answers the first gold alias.
    A question qualifies only if every hop's passages hold what that hop should find (the next bridge
    entity, then the answer) and no observation would be cut at ``rollout.max_observation_tokens``: an
    example must show a search that works. Candidates are drawn in a seeded order, cycling through the
    hop counts present (fewest first), so that two examples show a one-hop and a two-hop question.

    Raises:
        ValueError: fewer than ``count`` questions qualify (e.g. files without ``metadata.chain``).
    """
    if count <= 0:
        return []
    protocol = rollout.protocol
    order = [ex for ex in examples if ex.metadata.get("chain") and ex.golds]
    random.Random(seed).shuffle(order)
    by_hops: dict[int, list[Any]] = {}
    for ex in order:
        by_hops.setdefault(len(ex.metadata["chain"]), []).append(ex)
    chosen: list[WorkedExample] = []
    while len(chosen) < count and any(by_hops.values()):
        for hops in sorted(by_hops):
            if len(chosen) == count or not by_hops[hops]:
                continue
            # Take the next qualifying question of this hop count (skipping the ones that do not).
            while by_hops[hops]:
                worked = _worked_example(by_hops[hops].pop(0), retriever, tokenizer, rollout, protocol)
                if worked is not None:
                    chosen.append(worked)
                    break
    if len(chosen) < count:
        raise ValueError(
            f"rollout.protocol.examples={count}, but only {len(chosen)} training question(s) have an "
            "intended search chain (metadata.chain) whose searches retrieve the answer; lower "
            "rollout.protocol.examples or use data.source=world"
        )
    return chosen


def _worked_example(
    example: Any, retriever: Any, tokenizer: Any, rollout: RolloutConfig, protocol: ProtocolConfig
) -> WorkedExample | None:
    chain = [str(query) for query in example.metadata["chain"]]
    targets = [[str(b)] for b in example.metadata.get("bridge_entities", [])][: len(chain) - 1]
    targets.append([str(g) for g in example.golds])
    if len(targets) != len(chain):
        return None
    results = retriever.search(chain, rollout.topk)
    searches = []
    for query, docs, wanted in zip(chain, results, targets, strict=True):
        docs = tuple(docs)
        observation = format_observation(docs, protocol)
        if not answer_in_text(retrieved_text(observation, protocol), wanted):
            return None
        if (
            len(tokenizer(observation, add_special_tokens=False)["input_ids"])
            > rollout.max_observation_tokens
        ):
            return None
        searches.append((query, docs))
    return WorkedExample(
        question=str(example.question), searches=tuple(searches), answer=str(example.golds[0])
    )


def worked_examples_to_json(examples: Sequence[WorkedExample]) -> list[dict[str, Any]]:
    """The examples as plain JSON (what ``RUN_DIR/few_shot_examples.json`` holds)."""
    return [
        {
            "question": ex.question,
            "searches": [
                {
                    "query": query,
                    "docs": [{"id": d.id, "title": d.title, "text": d.text, "score": d.score} for d in docs],
                }
                for query, docs in ex.searches
            ],
            "answer": ex.answer,
        }
        for ex in examples
    ]


def worked_examples_from_json(items: Sequence[dict[str, Any]]) -> list[WorkedExample]:
    """Inverse of :func:`worked_examples_to_json` (a run's examples, for ``tspo eval --model RUN_DIR``)."""
    return [
        WorkedExample(
            question=str(item["question"]),
            searches=tuple(
                (
                    str(search["query"]),
                    tuple(
                        Doc(str(d["id"]), str(d["title"]), str(d["text"]), float(d.get("score") or 0.0))
                        for d in search["docs"]
                    ),
                )
                for search in item["searches"]
            ),
            answer=str(item["answer"]),
        )
        for item in items
    ]
