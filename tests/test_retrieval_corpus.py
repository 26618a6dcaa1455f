"""Corpus readers, the memory-mapped passage store, and the (query, k) LRU cache."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tspo.doc import Doc
from tspo.retrieval import CorpusFormatError, LRUCache, read_corpus
from tspo.retrieval.corpus import count_lines
from tspo.retrieval.docstore import DocStore, DocStoreWriter, rank_ids
from tspo.retrieval.passage import JsonIntId, json_id


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_both_layouts_give_the_same_docs(tmp_path):
    contents = write_lines(
        tmp_path / "contents.jsonl",
        [
            json.dumps({"id": "1", "contents": "Paris\nParis is the capital of France."}),
            json.dumps({"id": 2, "contents": "Berlin\nBerlin is in Germany.\nSecond line."}),
        ],
    )
    split = write_lines(
        tmp_path / "split.jsonl",
        [
            json.dumps({"id": "1", "title": "Paris", "text": "Paris is the capital of France."}),
            json.dumps({"id": 2, "title": "Berlin", "text": "Berlin is in Germany.\nSecond line."}),
        ],
    )
    from_contents = list(read_corpus(contents))
    from_split = list(read_corpus(split))
    assert from_contents == from_split
    assert from_contents[0] == Doc(id="1", title="Paris", text="Paris is the capital of France.")
    assert from_contents[1].id == "2"  # integer ids become strings
    assert from_contents[1].contents == "Berlin\nBerlin is in Germany.\nSecond line."


def test_wiki18_contents_come_back_byte_for_byte(tmp_path):
    """wiki-18 quotes its titles; they are kept, so the served "contents" equal Search-R1's."""
    original = '"Aaron"\nAaron is a prophet, high priest, and the brother of Moses.'
    path = write_lines(tmp_path / "wiki.jsonl", [json.dumps({"id": "0", "contents": original})])
    (doc,) = read_corpus(path)
    assert doc.contents == original


def test_blank_lines_are_skipped_and_gzip_is_read(tmp_path):
    lines = [json.dumps({"id": f"d{i}", "title": "", "text": f"text {i}"}) for i in range(3)]
    plain = tmp_path / "c.jsonl"
    plain.write_text(lines[0] + "\n\n" + lines[1] + "\n   \n" + lines[2], encoding="utf-8")
    packed = tmp_path / "c.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    assert [d.id for d in read_corpus(plain)] == ["d0", "d1", "d2"]
    assert list(read_corpus(packed)) == list(read_corpus(plain))
    assert count_lines(packed) == 3


def test_title_newlines_do_not_break_contents(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "x", "title": "A\nB", "text": "body"})])
    (doc,) = read_corpus(path)
    assert doc.title == "A B"
    assert Doc.from_contents(doc.id, doc.contents) == doc


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"id": "1", "contents": "ok"', "invalid JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"contents": "no id"}', 'missing "id"'),
        ('{"id": [1], "contents": "x"}', '"id" must be a string or an integer'),
        ('{"id": "1", "contents": 5}', '"contents" must be a string'),
        ('{"id": "1", "title": "t", "text": null}', '"title" and "text" must be strings'),
        ('{"id": "1", "body": "x"}', 'expected "contents" or "title" + "text"'),
    ],
)
def test_malformed_line_names_file_and_line_number(tmp_path, line, problem):
    good = json.dumps({"id": "0", "contents": "fine"})
    path = write_lines(tmp_path / "bad.jsonl", [good, "", line, good])
    reader = read_corpus(path)
    assert next(reader).id == "0"
    with pytest.raises(CorpusFormatError) as err:
        list(reader)
    assert f"{path}:3:" in str(err.value)
    assert problem in str(err.value)


def test_missing_corpus_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        list(read_corpus(missing))


def test_count_lines(tmp_path):
    assert count_lines(write_lines(tmp_path / "a.jsonl", ["a", "b", "c"])) == 3
    (tmp_path / "b.jsonl").write_text("a\nb")  # no final newline
    assert count_lines(tmp_path / "b.jsonl") == 2
    (tmp_path / "empty.jsonl").write_text("")
    assert count_lines(tmp_path / "empty.jsonl") == 0


DOCS = [
    Doc(id="b", title="Title B", text="text with\nnewline"),
    Doc(id="a", title="", text="untitled"),
    Doc(id="10", title="Zürich", text="naïve café ☕"),
    Doc(id="9", title="T", text=""),
]


@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("mmap_files", [False, True])
def test_docstore_round_trip(tmp_path, on_disk, mmap_files):
    writer = DocStoreWriter(tmp_path / "work" if on_disk else None)
    assert [writer.add(d) for d in DOCS] == [0, 1, 2, 3]
    store = writer.finish()
    assert [store.get(i) for i in range(len(DOCS))] == DOCS
    store.save(tmp_path / "saved")
    loaded = DocStore.load(tmp_path / "saved", mmap_files=mmap_files)
    assert len(loaded) == len(DOCS)
    assert loaded.get_many([2, 0], [1.5, 0.25]) == [
        Doc(id="10", title="Zürich", text="naïve café ☕", score=1.5),
        Doc(id="b", title="Title B", text="text with\nnewline", score=0.25),
    ]
    # Rank = position in plain string order: "10" < "9" < "a" < "b".
    assert loaded.id_rank.tolist() == [3, 2, 0, 1]


def test_docstore_load_reports_missing_files(tmp_path):
    writer = DocStoreWriter(tmp_path / "s")
    writer.add(DOCS[0])
    writer.finish()
    (tmp_path / "s" / "ids.rank.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing ids\.rank\.npy"):
        DocStore.load(tmp_path / "s")


def _rank_by_python(ids):
    order = sorted(range(len(ids)), key=lambda i: (ids[i], i))
    rank = [0] * len(ids)
    for position, index in enumerate(order):
        rank[index] = position
    return rank


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
        ),
        max_size=40,
    )
)
def test_rank_ids_matches_python_string_order(ids):
    blob = "".join(ids).encode()
    offsets = np.cumsum([0] + [len(i.encode()) for i in ids]).astype(np.int64)
    assert rank_ids(blob, offsets).tolist() == _rank_by_python(ids)


def test_rank_ids_handles_long_ids():
    ids = ["x" * 100 + "b", "x" * 100 + "a", "short"]
    blob = "".join(ids).encode()
    offsets = np.cumsum([0] + [len(i) for i in ids]).astype(np.int64)
    assert rank_ids(blob, offsets).tolist() == _rank_by_python(ids)


def test_lru_cache_evicts_least_recently_used():
    cache = LRUCache(2)
    one, two, three = [Doc("1", "", "a")], [Doc("2", "", "b")], [Doc("3", "", "c")]
    cache.put(("q1", 3), one)
    cache.put(("q2", 3), two)
    assert cache.get(("q1", 3)) == one  # q1 is now the most recent
    cache.put(("q3", 3), three)
    assert cache.get(("q2", 3)) is None
    assert cache.get(("q1", 3)) == one and cache.get(("q3", 3)) == three
    assert cache.get(("q1", 5)) is None  # k is part of the key
    assert cache.stats() == {"entries": 2, "hits": 3, "misses": 2}
    disabled = LRUCache(0)
    disabled.put(("q", 1), one)
    assert disabled.get(("q", 1)) is None and len(disabled) == 0
    with pytest.raises(ValueError):
        LRUCache(-1)


def test_empty_titles_and_integer_ids_survive_the_corpus_and_the_store(tmp_path):
    corpus = write_lines(
        tmp_path / "c.jsonl",
        [
            json.dumps({"id": 7, "contents": "\nbody after an empty title"}),
            json.dumps({"id": "8", "contents": "one line only"}),
            json.dumps({"id": 9, "contents": "Title\nbody"}),
        ],
    )
    docs = list(read_corpus(corpus))
    assert [d.contents for d in docs] == ["\nbody after an empty title", "one line only", "Title\nbody"]
    assert [type(d.id) for d in docs] == [JsonIntId, str, JsonIntId]
    assert docs[0].title == "" and docs[0].text == "body after an empty title"  # as Search-R1 reads it
    for on_disk in (False, True):
        writer = DocStoreWriter(tmp_path / f"store{on_disk}" if on_disk else None)
        for doc in docs:
            writer.add(doc)
        writer.finish().save(tmp_path / f"saved{on_disk}")
        loaded = DocStore.load(tmp_path / f"saved{on_disk}")
        again = [loaded.get(i) for i in range(3)]
        assert again == docs and [d.contents for d in again] == [d.contents for d in docs]
        assert [json_id(d.id) for d in again] == [7, "8", 9]
    # All ids integers: no per-passage mask is written.
    writer = DocStoreWriter(tmp_path / "ints")
    writer.add(docs[0])
    writer.add(docs[2])
    assert [type(writer.finish().get(i).id) for i in range(2)] == [JsonIntId, JsonIntId]
    assert not (tmp_path / "ints" / "ids.int.npy").exists()


def test_a_store_written_before_layout_2_reads_as_before(tmp_path):
    """Stores without store.json held "title\\ntext" for every passage: read them that way."""
    writer = DocStoreWriter(tmp_path / "old")
    writer.add(Doc(id="a", title="T", text="x"))
    writer.add(Doc(id="b", title="", text="untitled"))
    writer.finish()
    old = tmp_path / "old"
    (old / "store.json").unlink()
    body = b"T\nx" + b"\nuntitled"  # layout 1 wrote the empty title's newline
    (old / "docs.bin").write_bytes(body)
    np.save(old / "docs.offsets.npy", np.array([0, 3, len(body)], dtype=np.int64))
    loaded = DocStore.load(old)
    assert loaded.layout == 1
    assert [loaded.get(0), loaded.get(1)] == [
        Doc(id="a", title="T", text="x"),
        Doc(id="b", title="", text="untitled"),
    ]
