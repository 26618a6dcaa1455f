"""Build a retriever from a config: a saved index, a corpus to index in-process, or a server URL."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tspo.retrieval.base import Retriever
from tspo.retrieval.index_io import read_manifest

__all__ = ["RetrieverSpec", "load_index", "load_retriever"]

_KINDS = ("bm25", "dense", "http", "auto")


@dataclass
class RetrieverSpec:
    """Where results come from.

    Attributes:
        kind: "bm25", "dense", "http", or "auto" (an index's own kind; "http" when only ``url`` is set).
        index: saved index directory (``tspo index build``).
        corpus: corpus JSONL to index in-process with BM25 when no ``index`` is given.
        url: retrieval server for kind "http".
        token: bearer token for the server.
        timeout, retries: HTTP client settings.
        cache_size: LRU entries of ``(query, k)`` results; 0 disables.
        mmap: memory-map saved indexes.
        threads: BM25 scoring threads (``None``: the backend's default).
        device: the dense encoder's device (``None``: the backend's default).
    """

    kind: str = "auto"
    index: str | None = None
    corpus: str | None = None
    url: str | None = None
    token: str | None = None
    timeout: float = 30.0
    retries: int = 5
    cache_size: int = 0
    mmap: bool = True
    threads: int | None = None
    device: str | None = None

    @classmethod
    def from_any(cls, spec: RetrieverSpec | Mapping[str, Any] | Any) -> RetrieverSpec:
        """From a ``RetrieverSpec``, a mapping, or any object with matching attributes (extra keys ignored)."""
        if isinstance(spec, RetrieverSpec):
            return spec
        names = [f.name for f in fields(cls)]
        if isinstance(spec, Mapping):
            unknown = sorted(set(spec) - set(names) - {"k", "topk", "path"})
            if unknown:
                raise ValueError(
                    f"unknown retriever setting(s): {', '.join(unknown)}; known: {', '.join(names)}"
                )
            values = {n: spec[n] for n in names if n in spec}
            if "path" in spec and "index" not in values:
                values["index"] = spec["path"]
        else:
            values = {n: getattr(spec, n) for n in names if getattr(spec, n, None) is not None}
        return cls(**values)


def load_index(
    directory: str | os.PathLike[str],
    mmap: bool = True,
    threads: int | None = None,
    device: str | None = None,
    **kwargs: Any,
) -> Retriever:
    """Open a saved index of any kind (read from its ``tspo_index.json``); ``threads`` goes to a BM25
    index, ``device`` to a dense one, other keyword arguments to the backend's ``load``."""
    kind = read_manifest(directory).get("kind")
    if kind == "bm25":
        from tspo.retrieval.bm25 import BM25Retriever

        return BM25Retriever.load(directory, mmap=mmap, threads=threads, **kwargs)
    if kind == "dense":
        from tspo.retrieval.dense import DenseRetriever

        return DenseRetriever.load(directory, mmap=mmap, device=device, **kwargs)
    raise ValueError(f"{directory}: unknown index kind {kind!r}")


def load_retriever(spec: RetrieverSpec | Mapping[str, Any] | Any) -> Retriever:
    """The retriever a config describes, wrapped in a ``CachedRetriever`` when ``cache_size > 0``."""
    spec = RetrieverSpec.from_any(spec)
    if spec.kind not in _KINDS:
        raise ValueError(f"unknown retriever kind {spec.kind!r}; choose one of {', '.join(_KINDS)}")
    retriever: Retriever
    if spec.kind == "http" or (spec.kind == "auto" and spec.url and not spec.index):
        if not spec.url:
            raise ValueError("retriever kind 'http' needs url=http://HOST:PORT")
        from tspo.retrieval.client import HTTPRetriever

        client = HTTPRetriever(spec.url, timeout=spec.timeout, retries=spec.retries, token=spec.token)
        client.check_reachable()  # a dead URL now, not after the first search's retry budget
        retriever = client  # typed as the protocol, which has no check_reachable
    elif spec.index:
        manifest_kind = read_manifest(spec.index).get("kind")
        if spec.kind not in ("auto", manifest_kind):
            raise ValueError(
                f"{spec.index} holds a {manifest_kind} index, but kind={spec.kind!r} was asked for"
            )
        retriever = load_index(spec.index, mmap=spec.mmap, threads=spec.threads, device=spec.device)
    elif spec.corpus:
        if spec.kind == "dense":
            raise ValueError("a dense retriever needs a prebuilt index (tspo index build --kind dense)")
        if not Path(spec.corpus).is_file():
            raise FileNotFoundError(f"corpus file not found: {spec.corpus}")
        from tspo.retrieval.bm25 import BM25Retriever
        from tspo.retrieval.corpus import read_corpus

        retriever = BM25Retriever.build(read_corpus(spec.corpus), threads=spec.threads)
    else:
        raise ValueError("a retriever needs index=DIR, corpus=FILE.jsonl or url=http://HOST:PORT")
    if spec.cache_size > 0:
        from tspo.retrieval.cache import CachedRetriever

        return CachedRetriever(retriever, spec.cache_size)
    return retriever
