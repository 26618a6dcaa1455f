"""Dense retrieval: sentence-transformers embeddings in a faiss index (Flat, HNSW or IVF; fp32 or fp16).

Inner product over L2-normalised embeddings, i.e. cosine similarity, as in Search-R1's E5 index
(Karpukhin et al. 2020 style bi-encoder retrieval). Building streams the corpus once, encodes it in
chunks that are saved as they finish (see :mod:`tspo.retrieval.embeddings`), and only then creates the
faiss index, so an interrupted build of wiki-18 resumes instead of starting over.

Index types (faiss ``index_factory`` strings, ``METRIC_INNER_PRODUCT``):

* ``flat``  -- exact search: ``Flat`` or ``SQfp16`` (half-precision storage);
* ``hnsw``  -- graph search: ``HNSW{M}`` or ``HNSW{M},SQfp16``; ``ef_search`` trades recall for speed;
* ``ivf``   -- clustered search: ``IVF{nlist},Flat`` or ``IVF{nlist},SQfp16``; ``nprobe`` likewise.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tspo.retrieval.base import Doc, check_k, check_queries
from tspo.retrieval.docstore import DocStore, DocStoreWriter
from tspo.retrieval.embeddings import EmbeddingChunks
from tspo.retrieval.encoder import E5_PASSAGE_PREFIX, E5_QUERY_PREFIX, EncoderConfig, SentenceEncoder
from tspo.retrieval.extras import import_dense_dependency
from tspo.retrieval.index_io import atomic_directory, format_bytes, read_manifest, write_manifest

__all__ = ["INDEX_TYPES", "DenseRetriever", "dense_memory_estimate"]

logger = logging.getLogger(__name__)

INDEX_TYPES = ("flat", "hnsw", "ivf")


def dense_memory_estimate(
    num_passages: int, dim: int, fp16: bool, index_type: str = "flat", hnsw_m: int = 32
) -> tuple[int, str]:
    """Bytes of a dense index in memory and the line that is printed before building or loading it.

    ``N passages x d dims x (4 | 2) bytes`` for the vectors; HNSW adds about ``N x 2M x 4 B`` of graph
    links, IVF ``N x 8 B`` of list ids.
    """
    width = 2 if fp16 else 4
    vectors = num_passages * dim * width
    extra, extra_text = 0, ""
    if index_type == "hnsw":
        extra = num_passages * 2 * hnsw_m * 4
        extra_text = f" + HNSW links {num_passages:,} x {2 * hnsw_m} x 4 B = {format_bytes(extra)}"
    elif index_type == "ivf":
        extra = num_passages * 8
        extra_text = f" + IVF ids {num_passages:,} x 8 B = {format_bytes(extra)}"
    total = vectors + extra
    line = (
        f"dense index memory: {num_passages:,} passages x {dim} dims x {width} bytes = {format_bytes(vectors)}"
        f"{extra_text} -> {format_bytes(total)} ({index_type}, {'fp16' if fp16 else 'fp32'})"
    )
    return total, line


def _factory_string(index_type: str, fp16: bool, hnsw_m: int, nlist: int) -> str:
    storage = "SQfp16" if fp16 else "Flat"
    if index_type == "flat":
        return storage
    if index_type == "hnsw":
        return f"HNSW{hnsw_m}" + (",SQfp16" if fp16 else "")
    if index_type == "ivf":
        return f"IVF{nlist},{storage}"
    raise ValueError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")


def default_nlist(num_passages: int) -> int:
    """IVF lists: about ``4 sqrt(N)``, with at least 39 training points per list (faiss's minimum)."""
    return max(1, min(int(4 * math.sqrt(num_passages)), num_passages // 39))


class DenseRetriever:
    """Dense retriever; ``search`` returns at most ``k`` passages per query sorted by ``(-score, id)``."""

    kind = "dense"

    def __init__(
        self,
        index: Any,
        store: DocStore,
        encoder: SentenceEncoder,
        params: dict[str, Any],
        index_file: Path | None = None,
    ) -> None:
        self.index = index
        self.store = store
        self.encoder = encoder
        self.params = params
        # The faiss file this index was read from, unchanged: save() links it instead of rewriting it.
        self.index_file = index_file
        self._search_params = self._make_search_params()

    def __len__(self) -> int:
        return len(self.store)

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        docs: Iterable[Doc],
        *,
        encoder: SentenceEncoder | EncoderConfig | str,
        index_type: str = "flat",
        fp16: bool = False,
        work_dir: str | os.PathLike[str] | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        nlist: int | None = None,
        nprobe: int = 64,
        chunk_size: int = 16384,
        show_progress: bool = False,
        total: int | None = None,
        corpus_fingerprint: dict[str, Any] | None = None,
    ) -> DenseRetriever:
        """Encode ``docs`` and index them.

        Args:
            docs: passages, e.g. ``read_corpus(path)``; must come in the same order when resuming.
            encoder: the encoder, its config, or a model path / name (E5 prefixes for E5 models only).
            index_type: "flat", "hnsw" or "ivf". fp16: store vectors in half precision.
            work_dir: save passage text and embedding chunks there; a rerun with the same directory
                skips chunks already encoded. ``None`` keeps everything in memory.
            hnsw_m, ef_construction, ef_search: HNSW graph degree and beam widths.
            nlist, nprobe: IVF lists (default ``4 sqrt(N)``) and lists probed per query.
            chunk_size: passages per saved embedding chunk.
            show_progress: draw a progress bar over passages; ``total`` is its length if known.
            corpus_fingerprint: identifies the corpus (e.g. path, size, mtime) so embeddings of another
                corpus are never reused.
        """
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
        import_dense_dependency("faiss")  # missing faiss is reported now, not after hours of encoding
        if not isinstance(encoder, SentenceEncoder):
            encoder = SentenceEncoder(encoder)
        started = time.perf_counter()
        if total is not None:
            logger.info("%s", dense_memory_estimate(total, encoder.dim, fp16, index_type, hnsw_m)[1])
        work = Path(work_dir) if work_dir is not None else None
        chunks = EmbeddingChunks(
            work / "embeddings" if work is not None else None,
            chunk_size,
            {"encoder": encoder.config.fingerprint(), "dim": encoder.dim, "corpus": corpus_fingerprint},
        )
        resumed = chunks.count_saved()
        if resumed:
            logger.info("resuming dense build: %d embedding chunks already saved in %s", resumed, work)
        writer = DocStoreWriter(work / "passages" if work is not None else None)
        try:
            _encode_corpus(docs, writer, chunks, encoder, show_progress, total)
        except BaseException:
            writer.abort()
            raise
        store = writer.finish()
        if len(store) == 0:
            raise ValueError("cannot build a dense index from an empty corpus")
        n = len(store)
        nlist = nlist or default_nlist(n)
        logger.info("%s", dense_memory_estimate(n, encoder.dim, fp16, index_type, hnsw_m)[1])
        index = _create_index(chunks, n, encoder.dim, index_type, fp16, hnsw_m, ef_construction, nlist)
        params = {
            "index_type": index_type,
            "fp16": fp16,
            "dim": encoder.dim,
            "hnsw_m": hnsw_m,
            "ef_construction": ef_construction,
            "ef_search": ef_search,
            "nlist": nlist if index_type == "ivf" else None,
            "nprobe": min(nprobe, nlist) if index_type == "ivf" else None,
        }
        logger.info(
            "dense index: %d passages, %s, built in %.1fs", n, index_type, time.perf_counter() - started
        )
        return cls(index, store, encoder, params)

    @classmethod
    def from_faiss(
        cls,
        docs: Iterable[Doc],
        faiss_index: str | os.PathLike[str],
        *,
        encoder: SentenceEncoder | EncoderConfig | str,
        work_dir: str | os.PathLike[str] | None = None,
        ef_search: int = 128,
        nprobe: int = 64,
        show_progress: bool = False,
        total: int | None = None,
    ) -> DenseRetriever:
        """Adopt an existing inner-product faiss index whose row ``i`` embeds passage ``i`` of ``docs``
        (e.g. Search-R1's ``e5_Flat.index`` over ``wiki-18.jsonl``), skipping the encoding."""
        faiss = import_dense_dependency("faiss")

        path = Path(faiss_index)
        if not path.is_file():
            raise FileNotFoundError(f"faiss index not found: {path}")
        if not isinstance(encoder, SentenceEncoder):
            encoder = SentenceEncoder(encoder)
        index = _read_faiss(path, mmap=True)
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{path} does not use inner-product similarity; only IP indexes are supported")
        if index.d != encoder.dim:
            raise ValueError(
                f"{path} holds {index.d}-dim vectors but {encoder.config.model} embeds {encoder.dim}"
            )
        index_type, fp16 = _describe_faiss(index)
        hnsw_m = _hnsw_m(index)
        logger.info("%s", dense_memory_estimate(index.ntotal, index.d, fp16, index_type, hnsw_m)[1])
        writer = DocStoreWriter(Path(work_dir) / "passages" if work_dir is not None else None)
        try:
            for doc in _progress(docs, show_progress, total):
                writer.add(doc)
        except BaseException:
            writer.abort()
            raise
        store = writer.finish()
        if len(store) != index.ntotal:
            raise ValueError(
                f"{path} holds {index.ntotal:,} vectors but the corpus has {len(store):,} passages"
            )
        nlist = faiss.extract_index_ivf(index).nlist if index_type == "ivf" else None
        params = {
            "index_type": index_type,
            "fp16": fp16,
            "dim": int(index.d),
            "hnsw_m": hnsw_m,
            "ef_construction": None,
            "ef_search": ef_search,
            "nlist": nlist,
            "nprobe": min(nprobe, nlist) if nlist else None,
        }
        return cls(index, store, encoder, params, index_file=path)

    # ------------------------------------------------------------ save / load
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``index.faiss``, the passages and the manifest to ``directory`` atomically."""
        faiss = import_dense_dependency("faiss")

        directory = Path(directory)
        with atomic_directory(directory) as staging:
            if self.index_file is not None:
                _link_or_copy(self.index_file, staging / "index.faiss")
            else:
                faiss.write_index(self.index, str(staging / "index.faiss"))
            self.store.save(staging)
            write_manifest(
                staging,
                {
                    "kind": self.kind,
                    "passages": len(self.store),
                    "dense": self.params,
                    "encoder": self.encoder.config.fingerprint(),
                    "faiss_version": faiss.__version__,
                },
            )
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        mmap: bool = True,
        encoder: SentenceEncoder | EncoderConfig | str | None = None,
        device: str | None = None,
    ) -> DenseRetriever:
        """Open a saved index (memory-mapped when ``mmap``); the encoder comes from the manifest unless given."""

        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest.get("kind") != cls.kind:
            raise ValueError(f"{directory} holds a {manifest.get('kind')!r} index, not a dense index")
        params = manifest["dense"]
        _, line = dense_memory_estimate(
            manifest["passages"], params["dim"], params["fp16"], params["index_type"], params["hnsw_m"]
        )
        logger.info("loading dense index %s; %s%s", directory, line, " (memory-mapped)" if mmap else "")
        started = time.perf_counter()
        index = _read_faiss(directory / "index.faiss", mmap)
        if encoder is None:
            # Manifests written before the prefixes were recorded meant E5's (the old default).
            settings = {"query_prefix": E5_QUERY_PREFIX, "passage_prefix": E5_PASSAGE_PREFIX}
            encoder = SentenceEncoder(EncoderConfig(**{**settings, **manifest["encoder"]}, device=device))
        elif not isinstance(encoder, SentenceEncoder):
            encoder = SentenceEncoder(encoder)
        if encoder.dim != params["dim"]:
            raise ValueError(
                f"encoder {encoder.config.model} embeds {encoder.dim} dims; the index has {params['dim']}"
            )
        store = DocStore.load(directory, mmap_files=mmap)
        logger.info("dense index loaded in %.1fs (%d passages)", time.perf_counter() - started, len(store))
        return cls(index, store, encoder, params, index_file=directory / "index.faiss")

    # ----------------------------------------------------------------- search
    def _make_search_params(self) -> Any:
        faiss = import_dense_dependency("faiss")

        if self.params["index_type"] == "hnsw":
            return lambda k: faiss.SearchParametersHNSW(efSearch=max(self.params["ef_search"], k))
        if self.params["index_type"] == "ivf":
            return lambda k: faiss.SearchParametersIVF(nprobe=self.params["nprobe"])
        return lambda k: None

    def query_windows(self) -> list[Any]:
        """Where an over-long query is cut: the encoder's token window (see :mod:`tspo.retrieval.window`)."""
        return [self.encoder.query_window()]

    def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        """Top-``k`` passages of each query by cosine similarity, sorted by ``(-score, id)``."""
        queries = check_queries(queries)
        check_k(k)
        if not queries:
            return []
        vectors = self.encoder.encode_queries(queries)
        return self.search_vectors(vectors, k)

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[list[Doc]]:
        """Like ``search`` for (Q, d) float32 query embeddings."""
        n = len(self.store)
        k = min(k, n)
        results: list[list[Doc]] = [[] for _ in range(len(vectors))]
        pending = np.arange(len(vectors))
        # Ask faiss for a few extra candidates so ties at the k-th score are broken by id, not by faiss;
        # widen for the rare query whose tie run reaches past the candidates.
        width = min(n, k + 8)
        while len(pending):
            scores, ids = self.index.search(vectors[pending], width, params=self._search_params(width))
            retry = []
            for row, query in enumerate(pending):
                valid = ids[row] >= 0
                cand_ids, cand_scores = ids[row][valid], scores[row][valid]
                order = np.lexsort((self.store.id_rank[cand_ids], -cand_scores))
                cand_ids, cand_scores = cand_ids[order], cand_scores[order]
                tie_reaches_end = (
                    len(cand_ids) == width
                    and width < n
                    and len(cand_ids) > k
                    and cand_scores[k - 1] == cand_scores[-1]
                )
                if tie_reaches_end:
                    retry.append(query)
                    continue
                results[query] = self.store.get_many(cand_ids[:k], cand_scores[:k])
            pending = np.array(retry, dtype=np.int64)
            width = min(n, width * 4)
        return results


def _encode_corpus(
    docs: Iterable[Doc],
    writer: DocStoreWriter,
    chunks: EmbeddingChunks,
    encoder: SentenceEncoder,
    show_progress: bool,
    total: int | None,
) -> None:
    """Stream ``docs`` into ``writer`` and encode every chunk not saved yet."""
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="encode passages", unit=" passages", mininterval=1.0)
    try:
        for index, batch in enumerate(_batched(docs, chunks.chunk_size)):
            for doc in batch:
                writer.add(doc)
            if chunks.load(index, len(batch)) is None:
                chunks.save(index, encoder.encode_passages([doc.contents for doc in batch]))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()


def _batched(docs: Iterable[Doc], size: int) -> Iterator[list[Doc]]:
    batch: list[Doc] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _create_index(
    chunks: EmbeddingChunks,
    num_passages: int,
    dim: int,
    index_type: str,
    fp16: bool,
    hnsw_m: int,
    ef_construction: int,
    nlist: int,
) -> Any:
    faiss = import_dense_dependency("faiss")

    index = faiss.index_factory(
        dim, _factory_string(index_type, fp16, hnsw_m, nlist), faiss.METRIC_INNER_PRODUCT
    )
    if index_type == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = ef_construction
    if not index.is_trained:
        sample = chunks.sample(num_passages, max(nlist * 64, 10_000))
        logger.info("training %s on %d sampled embeddings", index_type, len(sample))
        index.train(sample)
    for vectors in chunks.iter_chunks(num_passages):
        index.add(vectors)
    return index


def _read_faiss(path: Path, mmap: bool) -> Any:
    """Read a faiss index, memory-mapped when ``mmap`` and the index type allows it."""
    faiss = import_dense_dependency("faiss")

    if mmap:
        for flag_name in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP"):
            flag = getattr(faiss, flag_name, None)
            if flag is None:
                continue
            try:
                return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError as err:  # this index type cannot be mapped: read it instead
                logger.info("faiss cannot memory-map %s (%s); reading it", path, err)
    return faiss.read_index(str(path))


def _describe_faiss(index: Any) -> tuple[str, bool]:
    """(index type, fp16 storage) of a faiss index."""
    faiss = import_dense_dependency("faiss")

    index = faiss.downcast_index(index)
    name = type(index).__name__
    if "HNSW" in name:
        storage = faiss.downcast_index(index.storage)
        return "hnsw", _is_fp16(storage)
    if "IVF" in name:
        return "ivf", _is_fp16(index)
    if "Flat" in name or "ScalarQuantizer" in name:
        return "flat", _is_fp16(index)
    raise ValueError(f"unsupported faiss index type {name}; use a Flat, HNSW or IVF index")


def _is_fp16(index: Any) -> bool:
    faiss = import_dense_dependency("faiss")

    sq = getattr(index, "sq", None)
    return sq is not None and sq.qtype == faiss.ScalarQuantizer.QT_fp16


def _hnsw_m(index: Any) -> int:
    faiss = import_dense_dependency("faiss")

    index = faiss.downcast_index(index)
    hnsw = getattr(index, "hnsw", None)
    return int(hnsw.nb_neighbors(1)) if hnsw is not None else 32


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _progress(items: Iterable[Doc], show: bool, total: int | None) -> Iterable[Doc]:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc="passages", unit=" passages", mininterval=1.0)
