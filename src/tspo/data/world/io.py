"""Write a world as real-data files and read it back.

``DIR/corpus.jsonl``  one passage per line, ``{"id", "contents": "Title\\ntext"}`` (FlashRAG / Search-R1 wiki-18)
``DIR/train.jsonl``   FlashRAG QA records ``{"id", "question", "golden_answers", "metadata"}`` (+ dataset, split)
``DIR/test.jsonl``    the same for the held-out split
``DIR/world.json``    generator config, summary, entities, the facts of every passage and file checksums

All four files are staged next to their destination and published together (``os.replace``), with
``world.json`` last, so a directory holding ``world.json`` is complete and a failed write leaves the
previous files as they were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tspo.data.world.config import WorldConfig
from tspo.data.world.model import Entity, Passage, Question, World
from tspo.doc import Doc
from tspo.files import StagedOutputs

FORMAT = "tspo-synthetic-world"
FORMAT_VERSION = 1
CORPUS_FILE, TRAIN_FILE, TEST_FILE, META_FILE = "corpus.jsonl", "train.jsonl", "test.jsonl", "world.json"


class WorldFormatError(ValueError):
    """A world directory that cannot be read; the message names the file (and line)."""


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def world_files(world: World) -> dict[str, bytes]:
    """The exact bytes of every file of ``world`` (what :func:`write_world` writes)."""
    corpus = _jsonl([{"id": p.id, "contents": p.contents} for p in world.passages])
    train = _jsonl([q.to_record() for q in world.train])
    test = _jsonl([q.to_record() for q in world.test])
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": dataclasses.asdict(world.config),
        "summary": world.summary,
        "files": {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "lines": data.count(b"\n")}
            for name, data in ((CORPUS_FILE, corpus), (TRAIN_FILE, train), (TEST_FILE, test))
        },
        "entities": [
            {"id": e.id, "kind": e.kind, "name": e.name, "aliases": list(e.aliases)}
            for e in world.entities.values()
        ],
        "passages": [
            {"id": p.id, "facts": [list(f) for f in p.facts], "mentions": list(p.mentions)}
            for p in world.passages
        ],
    }
    meta_bytes = (json.dumps(meta, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    return {CORPUS_FILE: corpus, TRAIN_FILE: train, TEST_FILE: test, META_FILE: meta_bytes}


def write_world(world: World, out_dir: str | os.PathLike[str]) -> Path:
    """Write the four files of ``world`` into ``out_dir`` (created if needed); returns the directory."""
    directory = Path(out_dir)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"world output {directory} exists and is not a directory")
    directory.mkdir(parents=True, exist_ok=True)
    files = world_files(world)
    with StagedOutputs() as staged:
        for name, data in files.items():  # world.json is last: it marks a complete directory
            staged.stage(directory / name).write_bytes(data)
        staged.commit()
    return directory


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise WorldFormatError(f"world file not found: {path} (generate one with `tspo world generate`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WorldFormatError(f"{path}: not valid JSON: {err}") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise WorldFormatError(f"world file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise WorldFormatError(f"{path}:{number}: malformed JSON: {err}") from None
            if not isinstance(record, dict):
                raise WorldFormatError(f"{path}:{number}: expected a JSON object")
            records.append((number, record))
    return records


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_world(directory: str | os.PathLike[str], *, verify: bool = True) -> World:
    """Read a directory written by :func:`write_world` back into a :class:`World`.

    With ``verify`` (default) the files must match the checksums in ``world.json``: a world edited by
    hand is refused rather than silently reported on. Errors name the file and line.
    """
    root = Path(directory)
    if not root.is_dir():
        raise WorldFormatError(f"world directory not found: {root}")
    meta_path = root / META_FILE
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise WorldFormatError(f"{meta_path}: not a tspo synthetic world description (format != {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise WorldFormatError(
            f"{meta_path}: format_version {meta.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    try:
        config = WorldConfig(**meta["config"])
    except (TypeError, ValueError, KeyError) as err:
        raise WorldFormatError(f"{meta_path}: bad generator config: {err}") from None
    if verify:
        for name, info in meta.get("files", {}).items():
            path = root / name
            if not path.is_file():
                raise WorldFormatError(f"world file not found: {path}")
            if _sha256(path) != info.get("sha256"):
                raise WorldFormatError(
                    f"{path} differs from the file this world was generated with (sha256 mismatch); "
                    "regenerate it or load with verify=False"
                )
    try:
        entities = {
            e["id"]: Entity(id=e["id"], kind=e["kind"], name=e["name"], aliases=tuple(e["aliases"]))
            for e in meta["entities"]
        }
        passage_meta = {p["id"]: p for p in meta["passages"]}
    except (KeyError, TypeError) as err:
        raise WorldFormatError(f"{meta_path}: malformed entities or passages: {err!r}") from None

    passages = []
    corpus_path = root / CORPUS_FILE
    for number, record in _read_jsonl(corpus_path):
        if "id" not in record or "contents" not in record:
            raise WorldFormatError(f"{corpus_path}:{number}: a passage needs 'id' and 'contents'")
        doc = Doc.from_contents(str(record["id"]), str(record["contents"]))
        extra = passage_meta.get(doc.id, {})
        try:
            facts = tuple((str(r), str(s), str(o)) for r, s, o in extra.get("facts", ()))
        except (TypeError, ValueError):
            raise WorldFormatError(f"{meta_path}: malformed facts of passage {doc.id!r}") from None
        passages.append(
            Passage(
                id=doc.id,
                title=doc.title,
                text=doc.text,
                facts=facts,
                mentions=tuple(extra.get("mentions", ())),
            )
        )
    splits: dict[str, list[Question]] = {}
    for name in (TRAIN_FILE, TEST_FILE):
        path = root / name
        questions = []
        for number, record in _read_jsonl(path):
            try:
                questions.append(Question.from_record(record))
            except (KeyError, TypeError) as err:
                raise WorldFormatError(
                    f"{path}:{number}: not a synthetic-world question record: missing {err}"
                ) from None
        splits[name] = questions
    return World(
        config=config,
        entities=entities,
        passages=passages,
        train=splits[TRAIN_FILE],
        test=splits[TEST_FILE],
        summary=dict(meta.get("summary", {})),
    )
