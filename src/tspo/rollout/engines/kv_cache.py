"""A prefix-keyed store of per-sequence key/value caches, so a multi-turn rollout pays only for new tokens.

The rollout loop calls the engine with each live trajectory's *whole* context every turn:
``prompt, g_1, o_1, ..., g_k, o_k``. The engine keeps, for every sequence it generated, the keys and
values of the tokens it already fed through the model (``prompt, g_1, ..., o_{k-1}, g_k`` minus the
last sampled token). On the next call a context that starts with such a sequence reuses those keys and
values and only its new tokens (the last sampled token and the observation) go through the model.

Keys and values depend only on the prefix (causal attention, positions counted from the first real
token), so reusing them is exact up to floating-point summation order, whoever produced them, as long
as the weights are the same. The engine checks that with :func:`weights_fingerprint` and drops the
store when the weights change (an optimizer step bumps every parameter's version counter).

Memory: an entry holds ``2 * layers * kv_heads * head_dim * tokens`` floats. An entry is dropped when a
call continues it (the continuation becomes a new entry), when the store exceeds its byte budget (least
recently used first), when the weights change, and when the engine's ``release_cache`` is called (the
rollout loop does that when a run ends, so nothing outlives the rollouts that made it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(eq=False)
class CachedPrefix:
    """Keys and values of ``ids`` for every layer.

    Attributes:
        ids: the tokens whose keys and values are held, in order.
        layers: per layer ``(keys, values)``, each (H_kv, len(ids), D).
    """

    ids: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def weights_fingerprint(model: Any) -> tuple[tuple[int, int, int], ...]:
    """Identity, storage and in-place version counter of every parameter. It changes whenever a weight
    changes through an optimizer step, ``load_state_dict``, ``copy_`` under ``no_grad`` (each bumps the
    version counter) or a dtype / device move (new storage)."""
    return tuple((id(p), p.data_ptr(), p._version) for p in model.parameters())


class PrefixKVStore:
    """Entries keyed by their token ids; lookups find the longest entry that is a prefix of a context.

    Args:
        budget_bytes: most bytes held; the least recently used entries are dropped beyond it.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[int, CachedPrefix] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    @property
    def tokens(self) -> int:
        return sum(len(entry.ids) for entry in self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def lookup(self, context: Sequence[int]) -> CachedPrefix | None:
        """The longest entry whose ids are a prefix of ``context`` (it stays in the store)."""
        best: CachedPrefix | None = None
        size = len(context)
        for entry in self._entries.values():
            length = len(entry.ids)
            if length > size or (best is not None and length <= len(best.ids)):
                continue
            # Cheap rejections first: last and first token, then the full comparison (C speed).
            if entry.ids[-1] != context[length - 1] or entry.ids[0] != context[0]:
                continue
            if tuple(context[:length]) == entry.ids:
                best = entry
        if best is not None:
            self._entries.move_to_end(id(best))
        return best

    def add(self, entry: CachedPrefix) -> None:
        """Hold ``entry`` (an empty one is ignored), then drop the oldest entries beyond the budget."""
        if not entry.ids:
            return
        self._entries[id(entry)] = entry
        self._bytes += entry.nbytes
        while self._bytes > self.budget_bytes and self._entries:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.nbytes

    def discard(self, entries: Sequence[CachedPrefix]) -> None:
        """Drop ``entries`` (those a call continued: their continuations replace them)."""
        for entry in entries:
            if self._entries.pop(id(entry), None) is not None:
                self._bytes -= entry.nbytes
