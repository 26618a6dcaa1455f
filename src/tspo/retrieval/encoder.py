"""Sentence-transformers text encoder, with E5's prefixes where the model is an E5 model.

E5 models (Wang et al. 2022, "Text Embeddings by Weakly-Supervised Contrastive Pre-training") expect
``"query: "`` before queries and ``"passage: "`` before passages; Search-R1's wiki-18 index uses
``intfloat/e5-base-v2`` that way. Other encoders (all-MiniLM-L6-v2, ...) were trained without prefixes,
so by default the prefixes are E5's for E5-family models and empty otherwise; either can be set
explicitly. The resolved prefixes are saved with the index. Embeddings are L2-normalised, so inner
product = cosine similarity.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tspo.retrieval.extras import import_dense_dependency
from tspo.retrieval.window import TokenWindow

__all__ = ["E5_PASSAGE_PREFIX", "E5_QUERY_PREFIX", "EncoderConfig", "SentenceEncoder", "is_e5_model"]

logger = logging.getLogger(__name__)

QUERY_BATCH = 512
E5_QUERY_PREFIX = "query: "
E5_PASSAGE_PREFIX = "passage: "
_E5_NAME = re.compile(r"(^|[^a-z0-9])e5([^a-z0-9]|$)")


def is_e5_model(model: str) -> bool:
    """Whether ``model`` (hub name or local directory) is an E5-family encoder: ``e5`` is a word of its
    name, or of the ``_name_or_path`` recorded in a local directory's ``config.json``."""
    names = [model.lower()]
    config = Path(model) / "config.json"
    if config.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            names.append(str(json.loads(config.read_text()).get("_name_or_path", "")).lower())
    return any(_E5_NAME.search(name) for name in names)


@dataclass(frozen=True)
class EncoderConfig:
    """How passages and queries are embedded.

    Attributes:
        model: local directory or hub name of a sentence-transformers model.
        query_prefix: prepended to every query; ``None`` (default): ``"query: "`` for E5-family models
            (:func:`is_e5_model`), else none.
        passage_prefix: prepended to every passage; ``None``: ``"passage: "`` for E5, else none.
        normalize: L2-normalise embeddings (inner product becomes cosine).
        max_length: truncate inputs to this many tokens (``None``: the model's own limit).
        batch_size: texts per forward pass.
        device: ``"cpu"``, ``"cuda"``, ... (``None``: CUDA when available, else CPU).
        half: run the model in float16 (CUDA only).
    """

    model: str
    query_prefix: str | None = None
    passage_prefix: str | None = None
    normalize: bool = True
    max_length: int | None = 256
    batch_size: int = 64
    device: str | None = field(default=None, compare=False)
    half: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.query_prefix is None or self.passage_prefix is None:
            e5 = is_e5_model(self.model)
            if self.query_prefix is None:
                object.__setattr__(self, "query_prefix", E5_QUERY_PREFIX if e5 else "")
            if self.passage_prefix is None:
                object.__setattr__(self, "passage_prefix", E5_PASSAGE_PREFIX if e5 else "")

    def fingerprint(self) -> dict[str, Any]:
        """Settings that change the embeddings (device and precision of the run excluded)."""
        data = asdict(self)
        for key in ("device", "half", "batch_size"):
            data.pop(key)
        return data


class SentenceEncoder:
    """Embeds queries and passages with a ``SentenceTransformer``; outputs (n, d) float32."""

    def __init__(self, config: EncoderConfig | str, **overrides: Any) -> None:
        if isinstance(config, str):
            config = EncoderConfig(model=config, **overrides)
        elif overrides:
            config = EncoderConfig(**{**asdict(config), **overrides})
        if Path(config.model).exists():
            config = EncoderConfig(**{**asdict(config), "model": str(Path(config.model).resolve())})
        self.config = config
        import torch

        SentenceTransformer = import_dense_dependency("sentence_transformers").SentenceTransformer

        device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if not Path(config.model).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise FileNotFoundError(
                f"encoder model not found: {config.model} (offline, and not a local directory)"
            )
        logger.info("loading encoder %s on %s", config.model, device)
        self.model = SentenceTransformer(config.model, device=device)
        if config.max_length is not None:
            self.model.max_seq_length = config.max_length
        if config.half and device.startswith("cuda"):
            self.model.half()
        self.device = device
        get_dim = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        dim = get_dim()
        if dim is None:
            dim = int(self.model.encode(["probe"], convert_to_numpy=True).shape[1])
        self.dim = int(dim)

    def _encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            batch_size=batch_size or self.config.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=self.config.normalize,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def encode_queries(self, queries: list[str]) -> np.ndarray:
        """(len(queries), d) float32. Queries are short: one forward pass for up to ``QUERY_BATCH`` of
        them costs about half as much per query on CPU as passes of the passage ``batch_size``."""
        batch = max(self.config.batch_size, min(len(queries), QUERY_BATCH))
        return self._encode([f"{self.config.query_prefix}{q}" for q in queries], batch)

    def encode_passages(self, passages: list[str]) -> np.ndarray:
        """(len(passages), d) float32 of ``contents`` strings (``"title\\ntext"``)."""
        return self._encode([f"{self.config.passage_prefix}{p}" for p in passages])

    def query_window(self) -> TokenWindow:
        """The window a query is read through: ``max_seq_length`` tokens, prefix included."""
        return TokenWindow(
            self.model.tokenizer, int(self.model.max_seq_length), self.config.query_prefix or ""
        )
