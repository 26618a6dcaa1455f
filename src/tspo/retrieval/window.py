"""Query windows: cut over-long queries to what the retriever reads, instead of refusing them.

Search-R1's server hands every query to its encoder's tokenizer with ``truncation=True``, so a query
longer than the window is answered from its first ``max_length`` tokens. The server here does the same
explicitly, before the cache and the batcher, so the cut is counted (``X-Truncated-Queries`` header,
``/stats``, log) and the cache keys what was searched:

* :class:`CharWindow` -- at most ``max_chars`` characters (a cheap bound applied first, whatever the
  backend, so no request makes a tokenizer chew through megabytes);
* :class:`TermWindow` -- BM25: at most ``max_terms`` words of the analyzer;
* :class:`TokenWindow` -- dense: the encoder's ``max_seq_length`` tokens, query prefix and special
  tokens included.

A window's ``safe_chars`` is a length no query at or below can exceed, so the common short query costs
one ``len``.
"""

from __future__ import annotations

import copy
import re
import threading
from collections.abc import Sequence
from typing import Any, Protocol

__all__ = ["CharWindow", "QueryWindow", "TermWindow", "TokenWindow", "apply_windows"]

# Lucene's default BooleanQuery clause limit, which Search-R1's pyserini BM25 inherits.
DEFAULT_MAX_TERMS = 1024


class QueryWindow(Protocol):
    safe_chars: int

    def cut(self, queries: list[str]) -> list[str]:
        """``queries`` with each longer than the window cut to it (same length list)."""
        ...


class CharWindow:
    """At most ``max_chars`` characters."""

    def __init__(self, max_chars: int) -> None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {max_chars}")
        self.safe_chars = max_chars

    def cut(self, queries: list[str]) -> list[str]:
        return [q[: self.safe_chars] for q in queries]


class TermWindow:
    """At most ``max_terms`` words as the BM25 analyzer finds them (``pattern``); the cut falls right
    after the last word kept."""

    def __init__(self, pattern: str, max_terms: int = DEFAULT_MAX_TERMS) -> None:
        if max_terms < 1:
            raise ValueError(f"max_terms must be >= 1, got {max_terms}")
        self._words = re.compile(pattern)
        self.max_terms = max_terms
        # n words need at least n characters plus n - 1 separators.
        self.safe_chars = 2 * max_terms - 1

    def cut(self, queries: list[str]) -> list[str]:
        out = []
        for query in queries:
            end = None
            for count, match in enumerate(self._words.finditer(query), start=1):
                if count == self.max_terms:
                    end = match.end()
                    break
            out.append(query if end is None else query[:end])
        return out


class TokenWindow:
    """The encoder's window: ``max_tokens`` tokens including ``prefix`` and the special tokens.

    Uses its own copy of the tokenizer (a Hugging Face fast tokenizer shared between threads that call
    it with different truncation settings fails with "Already borrowed").
    """

    def __init__(self, tokenizer: Any, max_tokens: int, prefix: str = "") -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()
        specials = self._tokenizer.num_special_tokens_to_add(pair=False)
        prefix_tokens = len(self._encode([prefix])[0][0]) if prefix else 0
        self.budget = max(1, max_tokens - specials - prefix_tokens)
        # WordPiece never makes more tokens than characters; byte-level BPE up to 4 per character.
        model = getattr(getattr(self._tokenizer, "backend_tokenizer", None), "model", None)
        per_char = 1 if type(model).__name__ == "WordPiece" else 4
        self.safe_chars = max(1, self.budget // per_char)

    def _encode(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        with self._lock:
            encoded = self._tokenizer(
                texts,
                add_special_tokens=False,
                truncation=False,
                return_offsets_mapping=True,
                verbose=False,
            )
        return list(zip(encoded["input_ids"], encoded["offset_mapping"], strict=True))

    def cut(self, queries: list[str]) -> list[str]:
        out = []
        for query, (ids, offsets) in zip(queries, self._encode(queries), strict=True):
            out.append(query if len(ids) <= self.budget else query[: offsets[self.budget - 1][1]])
        return out


def apply_windows(queries: list[str], windows: Sequence[QueryWindow]) -> tuple[list[str], int]:
    """``queries`` cut by each window in turn, and how many were cut."""
    cut_any = [False] * len(queries)
    for window in windows:
        long = [i for i, q in enumerate(queries) if len(q) > window.safe_chars]
        if not long:
            continue
        shortened = window.cut([queries[i] for i in long])
        queries = list(queries)
        for i, query in zip(long, shortened, strict=True):
            if len(query) < len(queries[i]):
                queries[i] = query
                cut_any[i] = True
    return queries, sum(cut_any)


def needs_work(queries: list[str], windows: Sequence[QueryWindow]) -> bool:
    """Whether any query is longer than a window's ``safe_chars`` (the cut would cost more than a ``len``)."""
    shortest = min((w.safe_chars for w in windows), default=None)
    return shortest is not None and any(len(q) > shortest for q in queries)
