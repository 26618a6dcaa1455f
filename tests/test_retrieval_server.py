"""The HTTP retrieval server on a real loopback port: wire format, health, limits, errors, batching, cache."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from tspo.retrieval import BM25Retriever
from tspo.retrieval.server import ServerSettings, start_server
from tspo.retrieval.synthetic import passage_query, synthetic_passages

N_PASSAGES = 300


def wait_until_ready(url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(url + "/health", timeout=5)
        if response.status_code == 200:
            return response.json()
        time.sleep(0.05)
    raise AssertionError(f"{url} did not become ready within {timeout}s")


@pytest.fixture(scope="module")
def corpus():
    return list(synthetic_passages(N_PASSAGES, seed=5, vocab_size=8000))


@pytest.fixture(scope="module")
def queries(corpus):
    """Each passage's first distinct words: common enough that every query matches many passages."""
    return [passage_query(doc, None, words=6) for doc in corpus[:40]]


@pytest.fixture(scope="module")
def retriever(corpus):
    return BM25Retriever.build(corpus)


@pytest.fixture(scope="module")
def server(retriever):
    settings = ServerSettings(port=0, max_topk=20, max_queries=16, max_body_bytes=4096, max_wait_ms=20)
    with start_server(retriever, settings) as running:
        wait_until_ready(running.url)
        yield running


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=10) as http:
        yield http


def retrieve(client, payload, **kwargs):
    return client.post("/retrieve", content=json.dumps(payload), **kwargs)


def test_binds_to_loopback_by_default(server):
    assert ServerSettings().host == "127.0.0.1"
    assert server.host == "127.0.0.1"


def test_health_is_ready_only_after_the_index_loads(retriever):
    release = threading.Event()

    def slow_loader():
        assert release.wait(20)
        return retriever

    with start_server(slow_loader, ServerSettings(port=0)) as running:
        loading = httpx.get(running.url + "/health", timeout=5)
        assert loading.status_code == 503
        assert loading.json()["status"] == "loading"
        early = httpx.post(running.url + "/retrieve", json={"queries": ["x"]}, timeout=5)
        assert early.status_code == 503 and early.json() == {"error": "index is still loading"}
        release.set()
        ready = wait_until_ready(running.url)
        assert ready["status"] == "ready" and ready["passages"] == N_PASSAGES and ready["kind"] == "bm25"
        assert httpx.post(running.url + "/retrieve", json={"queries": ["x"]}, timeout=5).status_code == 200


def test_health_reports_a_failed_load():
    def broken_loader():
        raise FileNotFoundError("index directory not found: /nowhere")

    with start_server(broken_loader, ServerSettings(port=0)) as running:
        deadline = time.monotonic() + 20
        while (health := httpx.get(running.url + "/health", timeout=5).json())["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health == {
            "status": "failed",
            "error": "FileNotFoundError: index directory not found: /nowhere",
        }
        answer = httpx.post(running.url + "/retrieve", json={"queries": ["x"]}, timeout=5)
        assert answer.status_code == 503 and "/nowhere" in answer.json()["error"]


def test_wire_format_field_by_field(client, retriever, queries):
    response = retrieve(client, {"queries": queries[:3], "topk": 4, "return_scores": True})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["result"]
    expected = retriever.search(queries[:3], 4)
    assert len(body["result"]) == 3
    for items, docs in zip(body["result"], expected, strict=True):
        assert len(items) == len(docs) == 4
        for item, doc in zip(items, docs, strict=True):
            assert set(item) == {"document", "score"}
            assert set(item["document"]) == {"id", "title", "text", "contents"}
            assert item["document"]["id"] == doc.id
            assert item["document"]["title"] == doc.title
            assert item["document"]["text"] == doc.text
            assert item["document"]["contents"] == f"{doc.title}\n{doc.text}"
            assert isinstance(item["score"], float) and item["score"] == pytest.approx(doc.score, rel=1e-6)
        scores = [item["score"] for item in items]
        assert scores == sorted(scores, reverse=True)


def test_search_r1_client_code_reads_the_response(client, retriever, queries):
    """The exact access pattern of Search-R1's generation.py (_batch_search + _passages2string)."""
    results = retrieve(client, {"queries": queries[:2], "topk": 3, "return_scores": True}).json()["result"]
    for retrieval_result in results:
        reference = ""
        for idx, doc_item in enumerate(retrieval_result):
            content = doc_item["document"]["contents"]
            title = content.split("\n")[0]
            text = "\n".join(content.split("\n")[1:])
            reference += f"Doc {idx + 1}(Title: {title}) {text}\n"
        assert reference.startswith("Doc 1(Title: ")
    first = results[0][0]["document"]["contents"].split("\n")[0]
    assert first == retriever.search(queries[:1], 1)[0][0].title


def test_without_scores_documents_come_unwrapped(client, retriever, queries):
    plain = retrieve(client, {"queries": queries[:2], "topk": 2, "return_scores": False}).json()["result"]
    default = retrieve(client, {"queries": queries[:2], "topk": 2}).json()["result"]
    assert plain == default  # return_scores defaults to false, as in Search-R1's server
    expected = retriever.search(queries[:2], 2)
    assert [[d["id"] for d in docs] for docs in plain] == [[d.id for d in docs] for docs in expected]
    assert set(plain[0][0]) == {"id", "title", "text", "contents"}


def test_topk_defaults_to_three_and_empty_query_lists_are_fine(client, queries):
    assert [len(r) for r in retrieve(client, {"queries": queries[:2]}).json()["result"]] == [3, 3]
    assert [len(r) for r in retrieve(client, {"queries": queries[:1], "topk": None}).json()["result"]] == [3]
    response = retrieve(client, {"queries": [], "topk": 3})
    assert response.status_code == 200 and response.json() == {"result": []}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ("{not json", 400, "not valid JSON"),
        ('["queries"]', 422, "must be a JSON object"),
        ('{"topk": 3}', 422, 'missing field "queries"'),
        ('{"queries": "a single string"}', 422, '"queries" must be a list of strings, got string'),
        ('{"queries": ["ok", 5]}', 422, '"queries[1]" must be a string, got integer'),
        ('{"queries": [null]}', 422, '"queries[0]" must be a string, got null'),
        ('{"queries": ["q"], "topk": 1000000000000}', 422, '"topk" must be at most 20'),
        ('{"queries": ["q"], "topk": "three"}', 422, "\"topk\" must be an integer, got string 'three'"),
        ('{"queries": ["q"], "topk": 2.5}', 422, '"topk" must be an integer, got number'),
        ('{"queries": ["q"], "topk": true}', 422, '"topk" must be an integer, got boolean'),
        ('{"queries": ["q"], "return_scores": "maybe"}', 422, '"return_scores" must be true or false'),
        ('{"queries": ["q"], "return_scores": 2}', 422, '"return_scores" must be true or false'),
        (json.dumps({"queries": ["q"] * 17}), 422, "17 queries; at most 16"),
        ('{"queries": ' + "[" * 40 + "]" * 40 + "}", 400, "nests 41 levels deep"),
    ],
)
def test_bad_requests_get_a_json_4xx_naming_the_problem(client, body, status, message):
    response = client.post("/retrieve", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert message in response.json()["error"]


def test_oversized_bodies_are_refused(client, server):
    big = json.dumps({"queries": ["y" * 150] * 30})  # > 4096 bytes
    response = client.post("/retrieve", content=big)
    assert response.status_code == 413 and "exceeds the 4096-byte limit" in response.json()["error"]

    def chunks():  # no Content-Length: the server must count while reading
        yield b'{"queries": ["'
        for _ in range(10):
            yield b"z" * 1000
        yield b'"]}'

    streamed = client.post("/retrieve", content=chunks())
    assert streamed.status_code == 413 and "exceeds the 4096-byte limit" in streamed.json()["error"]
    # The server is fine afterwards.
    assert client.post("/retrieve", json={"queries": ["ok"]}).status_code == 200


def test_unknown_routes_and_methods_get_json_errors(client):
    missing = client.get("/search")
    assert missing.status_code == 404 and missing.json() == {"error": "not found: GET /search"}
    wrong_method = client.get("/retrieve")
    assert wrong_method.status_code == 405 and "GET /retrieve" in wrong_method.json()["error"]


def test_bearer_token(retriever, queries):
    with start_server(retriever, ServerSettings(port=0, token="s3cret")) as running:
        assert wait_until_ready(running.url)["status"] == "ready"  # health needs no token
        url = running.url + "/retrieve"
        payload = {"queries": queries[:1], "topk": 1}
        missing = httpx.post(url, json=payload, timeout=5)
        assert missing.status_code == 401 and missing.json() == {"error": "missing or wrong bearer token"}
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.post(url, json=payload, headers={"Authorization": "Bearer guess"}, timeout=5)
        assert wrong.status_code == 401
        assert httpx.get(running.url + "/stats", timeout=5).status_code == 401
        right = httpx.post(url, json=payload, headers={"Authorization": "Bearer s3cret"}, timeout=5)
        assert right.status_code == 200 and len(right.json()["result"][0]) == 1


def test_concurrent_requests_are_micro_batched(server, retriever, queries):
    before = server.service.batcher.stats.as_dict()
    fresh = [q + " extra" for q in queries]  # not in the cache yet

    async def fire():
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            return await asyncio.gather(
                *(
                    http.post("/retrieve", json={"queries": [q], "topk": 2, "return_scores": True})
                    for q in fresh
                )
            )

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    expected = retriever.search(fresh, 2)
    got = [[d["document"]["id"] for d in r.json()["result"][0]] for r in responses]
    assert got == [[d.id for d in docs] for docs in expected]
    after = server.service.batcher.stats.as_dict()
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == len(fresh)
    assert batches < len(fresh) // 2  # coalesced: several requests per batched search
    assert after["largest_batch"] > 1


def test_repeated_queries_come_from_the_cache(client, server, queries):
    query = queries[5] + " cached"
    first = retrieve(client, {"queries": [query], "topk": 3, "return_scores": True}).json()
    hits = server.service.cache.hits
    searched = server.service.batcher.stats.queries
    second = retrieve(client, {"queries": [query], "topk": 3, "return_scores": True}).json()
    assert second == first
    assert server.service.cache.hits == hits + 1
    assert server.service.batcher.stats.queries == searched  # no new search
    stats = client.get("/stats").json()
    assert stats["cache"]["hits"] >= 1 and stats["status"] == "ready"


def test_a_busy_port_is_reported(server, retriever):
    with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{server.port}"):
        start_server(retriever, ServerSettings(port=server.port))
