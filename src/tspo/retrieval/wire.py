"""The Search-R1 retrieval wire format, shared by the server and the client.

Request (``POST /retrieve``)::

    {"queries": ["q1", "q2"], "topk": 3, "return_scores": true}

Response with ``return_scores`` true::

    {"result": [[{"document": {"id": "1", "title": "T", "text": "...", "contents": "T\\n..."}, "score": 12.3}, ...], ...]}

and with ``return_scores`` false (Search-R1's ``retrieval_server.py``), the documents without the
wrapper: ``{"result": [[{"id": ..., "contents": ...}, ...], ...]}``. Search-R1 clients read
``result[i][j]["document"]["contents"]``; its dense server returns ``{"id", "contents"}`` documents and its
BM25 server ``{"title", "text", "contents"}``, so documents here carry all four fields.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tspo.doc import Doc
from tspo.retrieval.passage import doc_from_contents, json_id, passage_id

try:
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    loads: Any = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()

    loads = json.loads

__all__ = [
    "RetrieveRequest",
    "WireError",
    "doc_to_wire",
    "dumps",
    "json_depth",
    "load_json",
    "loads",
    "parse_request",
    "parse_response",
    "results_to_wire",
]


class WireError(ValueError):
    """A request or response that breaks the wire format; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RetrieveRequest:
    """A validated ``/retrieve`` body; ``repaired`` counts queries whose lone surrogates were replaced."""

    queries: list[str]
    topk: int
    return_scores: bool
    repaired: int = 0


# A valid request nests two deep ({"queries": [...]}); refusing deeper bodies before parsing keeps the
# answer the same (400) whichever JSON library is installed and however deep the body goes.
MAX_JSON_DEPTH = 32
_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")
# The strings pydantic (Search-R1's server) accepts for a bool, lower-cased.
_TRUE = frozenset({"true", "1", "yes", "on", "t", "y"})
_FALSE = frozenset({"false", "0", "no", "off", "f", "n"})


def json_depth(body: bytes) -> int:
    """Deepest nesting of arrays and objects in ``body`` (brackets inside strings are ignored)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub(b"", body)):
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def load_json(body: bytes) -> Any:
    """Parse a request body; ``WireError(400)`` for anything that is not JSON or nests too deep."""
    if body.count(b"[") + body.count(b"{") > 4 and (depth := json_depth(body)) > MAX_JSON_DEPTH:
        raise WireError(400, f"request body nests {depth} levels deep; at most {MAX_JSON_DEPTH}")
    try:
        return loads(body)
    except ValueError as err:
        if loads is json.loads:
            raise WireError(400, f"request body is not valid JSON: {err}") from None
        # orjson refuses lone surrogate escapes ("\\ud800"), which JSON's grammar allows.
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise WireError(400, f"request body is not valid JSON: {err}") from None
    except RecursionError:
        raise WireError(400, "request body nests too deep") from None


def parse_request(
    body: bytes, *, default_topk: int, max_topk: int, max_queries: int | None = None
) -> RetrieveRequest:
    """Validate a ``/retrieve`` body as Search-R1's server would; raise ``WireError`` (400 bad JSON, 422
    bad values) naming the field.

    Lenient where Search-R1 (pydantic) is: ``topk`` may be missing, null, 0 or negative (server default),
    a whole float or a numeric string; ``return_scores`` may be any of pydantic's bool spellings. Lone
    surrogates in queries (valid JSON, not valid Unicode text) become U+FFFD and are counted.
    """
    payload = load_json(body)
    if not isinstance(payload, dict):
        raise WireError(422, f"request body must be a JSON object, got {_json_type(payload)}")
    if "queries" not in payload:
        raise WireError(422, 'missing field "queries" (a list of strings)')
    queries = payload["queries"]
    if not isinstance(queries, list):
        raise WireError(422, f'"queries" must be a list of strings, got {_json_type(queries)}')
    if max_queries is not None and len(queries) > max_queries:
        raise WireError(422, f'"queries" holds {len(queries)} queries; at most {max_queries} per request')
    repaired = 0
    for index, query in enumerate(queries):
        if not isinstance(query, str):
            raise WireError(422, f'"queries[{index}]" must be a string, got {_json_type(query)}')
        if not query.isascii():
            try:
                query.encode("utf-8")
            except UnicodeEncodeError:
                queries[index] = _replace_surrogates(query)
                repaired += 1
    topk = _parse_topk(payload.get("topk"), default_topk, max_topk)
    return_scores = _parse_bool("return_scores", payload.get("return_scores"))
    return RetrieveRequest(queries=queries, topk=topk, return_scores=return_scores, repaired=repaired)


def _replace_surrogates(text: str) -> str:
    return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


def _parse_topk(value: Any, default: int, maximum: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool):
        raise WireError(422, f'"topk" must be an integer, got {_json_type(value)}')
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise WireError(422, f'"topk" must be an integer, got string {value[:40]!r}') from None
    if not isinstance(value, int):
        raise WireError(422, f'"topk" must be an integer, got {_json_type(value)}')
    if value <= 0:  # Search-R1: `if not request.topk: request.topk = config.retrieval_topk`
        return default
    if value > maximum:
        raise WireError(422, f'"topk" must be at most {maximum}, got {value}')
    return value


def _parse_bool(name: str, value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise WireError(422, f'"{name}" must be true or false, got {_json_type(value)}')


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def doc_to_wire(doc: Doc) -> dict[str, Any]:
    return {"id": json_id(doc.id), "title": doc.title, "text": doc.text, "contents": doc.contents}


def results_to_wire(results: list[list[Doc]], return_scores: bool) -> dict[str, Any]:
    if return_scores:
        return {
            "result": [[{"document": doc_to_wire(d), "score": d.score} for d in docs] for docs in results]
        }
    return {"result": [[doc_to_wire(d) for d in docs] for docs in results]}


def _doc_from_wire(item: Any) -> Doc:
    score = 0.0
    if isinstance(item, dict) and "document" in item:
        raw_score = item.get("score", 0.0)
        if isinstance(raw_score, bool) or not isinstance(raw_score, (int, float)):
            raise ValueError(f'"score" must be a number, got {_json_type(raw_score)}')
        score = float(raw_score)
        item = item["document"]
    if not isinstance(item, dict):
        raise ValueError(f"a document must be an object, got {_json_type(item)}")
    doc_id = passage_id(item.get("id", ""))
    contents = item.get("contents")
    if isinstance(contents, str):  # the field Search-R1 clients read: keep it byte for byte
        return doc_from_contents(doc_id, contents, score)
    if isinstance(item.get("text"), str) and "title" in item:
        return Doc(id=doc_id, title=str(item["title"]), text=item["text"], score=score)
    raise ValueError('a document needs "contents" or "title" + "text"')


def parse_response(payload: Any, num_queries: int) -> list[list[Doc]]:
    """Documents of a ``/retrieve`` response in either form; ``ValueError`` if it is malformed."""
    if not isinstance(payload, dict) or not isinstance(payload.get("result"), list):
        raise ValueError('expected an object with a "result" list')
    result = payload["result"]
    if len(result) != num_queries:
        raise ValueError(f"expected {num_queries} result lists, got {len(result)}")
    out = []
    for docs in result:
        if not isinstance(docs, list):
            raise ValueError(f"each result must be a list, got {_json_type(docs)}")
        out.append([_doc_from_wire(item) for item in docs])
    return out
