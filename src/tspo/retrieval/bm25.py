"""BM25 retrieval on bm25s's eager score index.

Building streams the corpus once: each passage is written to the passage store and reduced to
``(term id, term frequency)`` pairs in compact arrays, so no passage is kept as a Python string. The
BM25 term scores are then computed with bm25s's scoring functions (Lucene variant by default, Kamphuis
et al. 2020) into bm25s's CSC matrix and saved with ``bm25s.BM25.save``, which also lets
``bm25s.BM25.load(dir, mmap=True)`` open the index. Search runs the exact, tie-stable kernel of
:mod:`tspo.retrieval.topk` across threads.
"""

from __future__ import annotations

import logging
import os
import time
from array import array
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from tspo.retrieval.analyzer import Analyzer, AnalyzerConfig
from tspo.retrieval.base import Doc, check_k, check_queries
from tspo.retrieval.docstore import DocStore, DocStoreWriter
from tspo.retrieval.index_io import atomic_directory, format_bytes, read_manifest, write_manifest
from tspo.retrieval.topk import ScoreMatrix, TopKSearcher, csc_scatter

__all__ = ["BM25Retriever", "bm25_memory_estimate", "default_threads"]

logger = logging.getLogger(__name__)

_METHODS = ("lucene", "robertson", "atire")
_SCORE_CHUNK = 1 << 24


def default_threads() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def bm25_memory_estimate(num_docs: int, nnz: int, vocab: int, threads: int) -> tuple[int, str]:
    """Resident bytes of a loaded BM25 index without mmap, and the one-line breakdown that is logged.

    Score matrix ``nnz x (4 B score + 4 B passage)``, plus per search thread a scratch of
    ``N x 12 B`` (score, stamp, touched list). The passage text is memory-mapped and not counted.
    """
    matrix = nnz * 8 + (vocab + 1) * 8
    scratch = threads * num_docs * 12
    total = matrix + scratch
    line = (
        f"BM25 memory: {nnz:,} postings x 8 B = {format_bytes(matrix)} score matrix"
        f" + {threads} threads x {num_docs:,} passages x 12 B = {format_bytes(scratch)} scratch"
        f" -> {format_bytes(total)} (passage text is memory-mapped)"
    )
    return total, line


class BM25Retriever:
    """BM25 over a passage store; ``search`` returns at most ``k`` passages per query sorted by ``(-score, id)``.

    Passages sharing no term with the query are not returned (as in Lucene / pyserini), so a query of
    only stopwords or unknown words gets an empty list.
    """

    kind = "bm25"

    def __init__(
        self,
        matrix: ScoreMatrix,
        vocab: dict[str, int],
        store: DocStore,
        analyzer: Analyzer,
        params: dict[str, Any],
        threads: int | None = None,
    ) -> None:
        self.matrix = matrix
        self.vocab = vocab
        self.store = store
        self.analyzer = analyzer
        self.params = params
        self.threads = threads or default_threads()
        self._searcher = TopKSearcher(matrix, threads=self.threads)

    def __len__(self) -> int:
        return len(self.store)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        docs: Iterable[Doc],
        *,
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        analyzer: AnalyzerConfig | None = None,
        work_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        show_progress: bool = False,
        total: int | None = None,
    ) -> BM25Retriever:
        """Index ``docs`` (streamed once).

        Args:
            docs: passages, e.g. ``read_corpus(path)``.
            k1, b, method: BM25 parameters and variant ("lucene", "robertson" or "atire").
            analyzer: text analysis (default: lower-case, English stopwords, English stemmer).
            work_dir: write the passage text there instead of memory (use for large corpora; ``save``
                then hard-links it into the index directory).
            threads: search threads (default: all cores available).
            show_progress: draw a tqdm bar; ``total`` is its length if known.
        """
        if method not in _METHODS:
            raise ValueError(f"unknown BM25 method {method!r}; choose one of {', '.join(_METHODS)}")
        started = time.perf_counter()
        text_analyzer = Analyzer(analyzer)
        writer = DocStoreWriter(Path(work_dir) / "passages" if work_dir is not None else None)
        vocab: dict[str, int] = {}
        word_ids: dict[str, int] = {}  # word -> term id, -1 for a stopword (memo of analysis + vocab)
        postings = _PostingsBuilder()

        def word_id(word: str) -> int:
            term = text_analyzer.term(word)
            term_id = -1 if term is None else vocab.setdefault(term, len(vocab))
            word_ids[word] = term_id
            return term_id

        lookup = word_ids.__getitem__
        progress = _progress(docs, show_progress, total, "BM25 index")
        try:
            for doc in progress:
                writer.add(doc)
                words = text_analyzer.words(doc.title + "\n" + doc.text if doc.title else doc.text)
                try:
                    postings.add(list(map(lookup, words)))
                except KeyError:
                    postings.add([word_ids[w] if w in word_ids else word_id(w) for w in words])
        except BaseException:
            writer.abort()
            raise
        store = writer.finish()
        if len(store) == 0:
            raise ValueError("cannot build a BM25 index from an empty corpus")
        params = {"k1": float(k1), "b": float(b), "method": method}
        matrix = _score_matrix(
            *postings.finish(),
            len(vocab),
            store.id_rank,
            **params,
        )
        retriever = cls(matrix, vocab, store, text_analyzer, params, threads)
        logger.info(
            "BM25 index: %d passages, %d terms, %d postings in %.1fs",
            len(store),
            len(vocab),
            len(matrix.data),
            time.perf_counter() - started,
        )
        return retriever

    # ------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write the index to ``directory`` atomically (an existing index there is replaced)."""
        import bm25s

        directory = Path(directory)
        model = bm25s.BM25(k1=self.params["k1"], b=self.params["b"], method=self.params["method"])
        model.scores = {
            "data": np.asarray(self.matrix.data),
            "indices": np.asarray(self.matrix.indices),
            "indptr": np.asarray(self.matrix.indptr),
            "num_docs": self.matrix.num_docs,
        }
        model.vocab_dict = self.vocab
        model.nonoccurrence_array = None
        with atomic_directory(directory) as staging:
            model.save(staging, show_progress=False)
            self.store.save(staging)
            write_manifest(
                staging,
                {
                    "kind": self.kind,
                    "passages": len(self.store),
                    "terms": len(self.vocab),
                    "postings": len(self.matrix.data),
                    "bm25": self.params,
                    "analyzer": self.analyzer.config.to_dict(),
                    "bm25s_version": bm25s.__version__,
                },
            )
        return directory

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], mmap: bool = True, threads: int | None = None
    ) -> BM25Retriever:
        """Open a saved index; with ``mmap`` the score matrix and passages are memory-mapped (bm25s ``mmap=True``)."""
        import bm25s

        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest.get("kind") != cls.kind:
            raise ValueError(f"{directory} holds a {manifest.get('kind')!r} index, not a BM25 index")
        threads = threads or default_threads()
        _, line = bm25_memory_estimate(manifest["passages"], manifest["postings"], manifest["terms"], threads)
        logger.info("loading BM25 index %s (%s passages); %s", directory, f"{manifest['passages']:,}", line)
        started = time.perf_counter()
        model = bm25s.BM25.load(directory, mmap=mmap, show_progress=False)
        store = DocStore.load(directory, mmap_files=mmap)
        matrix = ScoreMatrix(
            data=model.scores["data"],
            indices=model.scores["indices"],
            indptr=model.scores["indptr"],
            num_docs=int(model.scores["num_docs"]),
            id_rank=store.id_rank,
        )
        analyzer = Analyzer(AnalyzerConfig.from_dict(manifest["analyzer"]))
        retriever = cls(matrix, dict(model.vocab_dict), store, analyzer, dict(manifest["bm25"]), threads)
        retriever._searcher.warmup()
        logger.info("BM25 index loaded in %.1fs", time.perf_counter() - started)
        return retriever

    # ----------------------------------------------------------------- search
    def query_terms(self, query: str) -> np.ndarray:
        """Term ids of ``query`` that occur in the index."""
        vocab = self.vocab
        return np.array([vocab[t] for t in self.analyzer.terms(query) if t in vocab], dtype=np.int64)

    def query_windows(self) -> list[Any]:
        """Where an over-long query is cut: the first 1,024 analyzer words (see :mod:`tspo.retrieval.window`)."""
        from tspo.retrieval.window import TermWindow

        return [TermWindow(self.analyzer.config.pattern)]

    def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        """Top-``k`` passages of each query, sorted by ``(-score, id)``."""
        queries = check_queries(queries)
        check_k(k)
        k = min(k, len(self.store))
        docs, scores, counts = self._searcher.search([self.query_terms(q) for q in queries], k)
        return [
            self.store.get_many(docs[i, : counts[i]], scores[i, : counts[i]]) for i in range(len(queries))
        ]

    def close(self) -> None:
        self._searcher.close()


class _PostingsBuilder:
    """Collects each passage's term ids and reduces them, a block of passages at a time, to
    ``(term, tf)`` pairs with NumPy (no per-passage Counter)."""

    _BLOCK = 4096

    def __init__(self) -> None:
        self._ids: array[int] = array("i")
        self._lengths: array[int] = array("i")
        self._terms: list[np.ndarray] = []
        self._tfs: list[np.ndarray] = []
        self._doc_lengths: list[np.ndarray] = []
        self._distinct: list[np.ndarray] = []

    def add(self, term_ids: list[int]) -> None:
        """One passage's term ids in order, ``-1`` for stopwords."""
        self._ids.extend(term_ids)
        self._lengths.append(len(term_ids))
        if len(self._lengths) >= self._BLOCK:
            self._flush()

    def _flush(self) -> None:
        if not self._lengths:
            return
        ids = np.frombuffer(self._ids, dtype=np.int32).astype(np.int64)
        lengths = np.frombuffer(self._lengths, dtype=np.int32)
        passages = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        keep = ids >= 0
        ids, passages = ids[keep], passages[keep]
        # Sorted unique (passage, term) keys: postings passage-major, terms ascending within a passage.
        keys, tfs = np.unique((passages << 32) | ids, return_counts=True)
        key_passages = keys >> 32
        self._terms.append((keys & 0xFFFFFFFF).astype(np.int32))
        self._tfs.append(tfs.astype(np.float32))
        self._doc_lengths.append(np.bincount(passages, minlength=len(lengths)).astype(np.int32))
        self._distinct.append(np.bincount(key_passages, minlength=len(lengths)).astype(np.int32))
        self._ids, self._lengths = array("i"), array("i")

    def finish(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(terms, tfs) per posting, and (lengths, distinct terms) per passage; see ``_score_matrix``."""
        self._flush()
        parts = (self._terms, self._tfs, self._doc_lengths, self._distinct)
        dtypes = (np.int32, np.float32, np.int32, np.int32)
        return tuple(np.concatenate(p) if p else np.zeros(0, d) for p, d in zip(parts, dtypes, strict=True))  # type: ignore[return-value]


def _score_matrix(
    posting_terms: np.ndarray,
    posting_tf: np.ndarray,
    doc_lengths: np.ndarray,
    distinct_per_doc: np.ndarray,
    vocab_size: int,
    id_rank: np.ndarray,
    *,
    k1: float,
    b: float,
    method: str,
) -> ScoreMatrix:
    """BM25 term scores ``idf(t) * tfc(tf, |d|)`` in CSC (term-major) order.

    Args:
        posting_terms: (P,) int32 term of each (passage, distinct term) pair, passages in order.
        posting_tf: (P,) float32 term frequency of each pair.
        doc_lengths: (N,) int32 passage lengths in terms. distinct_per_doc: (N,) int32 pairs per passage.
    """
    from bm25s.scoring import _select_idf_scorer, _select_tfc_scorer

    num_docs = len(doc_lengths)
    avg_len = float(doc_lengths.mean(dtype=np.float64)) if num_docs else 0.0
    doc_freq = np.bincount(posting_terms, minlength=vocab_size)
    # idf depends on the document frequency only: evaluate bm25s's scalar formula once per distinct df.
    distinct_df, df_slot = np.unique(doc_freq, return_inverse=True)
    idf_fn = _select_idf_scorer(method)
    idf = np.array([idf_fn(int(df), N=num_docs) if df else 0.0 for df in distinct_df], dtype=np.float32)[
        df_slot
    ]
    posting_docs = np.repeat(np.arange(num_docs, dtype=np.int32), distinct_per_doc)
    # Chunks bound the temporaries; the arithmetic mirrors bm25s (float32 tf, float64 lengths and
    # average, float32 idf, product rounded to float32), so scores equal bm25s's bit for bit.
    tfc_fn = _select_tfc_scorer(method)
    values = np.empty(len(posting_terms), dtype=np.float32)
    for start in range(0, len(values), _SCORE_CHUNK):
        stop = start + _SCORE_CHUNK
        tfc = tfc_fn(
            tf_array=posting_tf[start:stop],
            l_d=doc_lengths[posting_docs[start:stop]].astype(np.float64),
            l_avg=np.float64(avg_len),
            k1=k1,
            b=b,
            delta=0.5,
        )
        values[start:stop] = idf[posting_terms[start:stop]] * tfc
    indptr = np.zeros(vocab_size + 1, dtype=np.int64)
    np.cumsum(doc_freq, out=indptr[1:])
    data, indices = csc_scatter(posting_terms, posting_docs, values, indptr)
    return ScoreMatrix(
        data=data,
        indices=indices,
        indptr=indptr,
        num_docs=num_docs,
        id_rank=id_rank,
    )


def _progress(items: Iterable[Any], show: bool, total: int | None, desc: str) -> Iterable[Any]:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, unit=" passages", mininterval=1.0)
