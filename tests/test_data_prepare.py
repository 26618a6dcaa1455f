"""``tspo data prepare`` on a FlashRAG-layout tree written by the test for every dataset name."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tspo.cli import main
from tspo.data.parquet import VERL_FIELDS
from tspo.data.prepare import DataPrepError, prepare_datasets
from tspo.data.qa import DATASETS, SEARCH_R1_EVAL_DATASETS, QAFormatError, read_qa_jsonl


def rec(id_: object, question: str, golds: list, metadata: dict | None = None) -> dict:
    row = {"id": id_, "question": question, "golden_answers": golds}
    if metadata is not None:
        row["metadata"] = metadata
    return row


# FlashRAG layout: <dataset>/<split>.jsonl with id / question / golden_answers / metadata. Contents are in
# the style of each benchmark; the traps (aliases, non-ASCII, numbers, yes/no, duplicates, empty gold
# lists) are spread over the files.
FIXTURES: dict[str, dict[str, list[dict]]] = {
    "nq": {
        "train": [
            rec("train_0", "who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen"], {}),
            rec(
                "train_1",
                "when was the last time anyone was on the moon",
                ["14 December 1972 UTC", "December 1972"],
            ),
            rec("train_2", "how many episodes in season 2 of the crown", [10]),
            rec("train_1", "duplicate id with another question", ["x"]),
            rec(
                "train_3", "Who got the first Nobel Prize in physics?", ["Röntgen"]
            ),  # same normalised question
            rec("train_4", "what is the name of the last pope", []),  # empty gold list
            rec("train_5", "who sings does he love me with reba", ["Linda Davis"]),
        ],
        "test": [
            rec(
                "test_0", "who got the first nobel prize in physics", ["Wilhelm Conrad Röntgen"]
            ),  # also in train
            rec("test_1", "who wrote the song the twelve days of christmas", ["Frederic Austin"]),
            rec(
                "test_2",
                "where is zimbabwe located in the world map",
                ["in southern Africa", "Southern Africa"],
            ),
        ],
    },
    "triviaqa": {
        "test": [
            rec(
                "tqa_0",
                "Which planet is the largest in the Solar System?",
                ["Jupiter", "Jupiter (planet)", "JUPITER"],
            ),
            rec("tqa_1", "Who composed the opera 'Rusalka'?", ["Antonín Dvořák", "Dvorak", "Antonin Dvorak"]),
            rec("tqa_2", "In which year did the Berlin Wall fall?", ["1989"]),
        ]
    },
    "popqa": {
        "test": [
            rec(
                "4222362",
                "What is George Rankin's occupation?",
                ["politician", "political leader"],
                {"prop": "occupation"},
            ),
            rec("3040585", "In what city was Björk born?", ["Reykjavík", "Reykjavik"]),
            rec("1", "the", ["the"]),  # its only alias normalises to '' -> an empty gold list
        ]
    },
    "hotpotqa": {
        "train": [
            rec(
                "5a7a0693",
                "Which magazine was started first Arthur's Magazine or First for Women?",
                ["Arthur's Magazine"],
            ),
            rec(
                "5a879ab0",
                "Are Cadmium Chloride and Zinc both metals?",
                ["no"],
                {"type": "comparison", "level": "hard"},
            ),
            rec(
                "5a8c7595",
                "The Oberoi family is part of a hotel company that has a head office in what city?",
                ["Delhi"],
            ),
        ],
        "dev": [
            rec("5a8b57f2", "Were Scott Derrickson and Ed Wood of the same nationality?", ["yes"]),
            rec(
                "5a8c7595",
                "What government position was held by the woman who portrayed Corliss Archer?",
                ["Chief of Protocol"],
            ),
        ],
    },
    "2wikimultihopqa": {
        "dev": [
            rec(
                "8813f87c0bdd11eba7f7acde48001122",
                "Who was born first, Anne of Cleves or Jean Rabel?",
                ["Anne of Cleves"],
            ),
            rec("d2a9e6", "Are both Kurram Garhi and Trojkrsti located in the same country?", ["no"]),
        ]
    },
    "musique": {
        "dev": [
            rec("2hop__460946_294723", "Who is the spouse of the Green performer?", ["Miquette Giraudy"]),
            rec(
                "3hop1__9285_5188_23307",
                "What weekly publication in the city of Le Parisien's HQ was founded in 1915?",
                ["Le Canard enchaîné"],
            ),
        ]
    },
    "bamboogle": {
        "test": [
            rec(
                "b0",
                "Who was president of the United States in the year that Citibank was founded?",
                ["james madison"],
            ),
            rec(
                "b1",
                "What is the capital of the country where the Zócalo is?",
                ["Mexico City", "Ciudad de México"],
            ),
        ]
    },
    "synthetic_world": {
        "train": [
            rec("w0", "Where was Zorblat Quenn born", ["Vellmoor"]),
            rec("w1", "Who founded Orvix Labs", ["Tamsin Reel"]),
        ],
        "test": [rec("w2", "Which city hosts the headquarters of Orvix Labs", ["Vellmoor", "Vellmoor City"])],
    },
}


def write_flashrag_tree(root: Path, fixtures: dict[str, dict[str, list[dict]]] = FIXTURES) -> Path:
    for dataset, splits in fixtures.items():
        for split, rows in splits.items():
            path = root / dataset / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_flashrag_tree(tmp_path / "FlashRAG_datasets")


def counts_by_key(report) -> dict[tuple[str, str], object]:
    return {(c.dataset, c.split): c for c in report.counts}


def test_prepare_all_search_r1_datasets(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    report = prepare_datasets(src, out)
    counts = counts_by_key(report)
    assert set(counts) == {("nq", "train"), ("hotpotqa", "train")} | {
        (name, DATASETS[name].eval_split) for name in SEARCH_R1_EVAL_DATASETS
    }
    nq_train = counts["nq", "train"]
    assert (nq_train.read, nq_train.duplicate_ids, nq_train.duplicate_questions, nq_train.empty_golds) == (
        7,
        1,
        1,
        1,
    )
    assert nq_train.written == 4
    popqa = counts["popqa", "test"]
    assert (popqa.read, popqa.empty_golds, popqa.written) == (3, 1, 2)
    assert counts["nq", "test"].in_train_mix == 1  # "who got the first nobel prize in physics"
    assert counts["hotpotqa", "dev"].in_train_mix == 0
    assert counts["hotpotqa", "dev"].written == 2  # same id as a train record: ids are per file

    # Every evaluation set sits in its reporting split; test.parquet concatenates them in order.
    test_rows = pq.read_table(out / "test.parquet").to_pylist()
    expected_sources = [
        name
        for name in SEARCH_R1_EVAL_DATASETS
        for _ in range(counts[name, DATASETS[name].eval_split].written)
    ]
    assert [r["data_source"] for r in test_rows] == expected_sources
    assert {r["extra_info"]["split"] for r in test_rows} == {"test"}
    assert report.test_rows == len(test_rows) == 16
    for name in SEARCH_R1_EVAL_DATASETS:
        split = DATASETS[name].eval_split
        assert (out / name / f"{split}.jsonl").is_file()
        assert (out / name / f"{split}.parquet").is_file()

    # Training mix: NQ train + HotpotQA train, cleaned.
    train_rows = pq.read_table(out / "train.parquet").to_pylist()
    assert Counter(r["data_source"] for r in train_rows) == {"nq": 4, "hotpotqa": 3}
    assert {r["extra_info"]["split"] for r in train_rows} == {"train"}
    saved = json.loads((out / "prepare_report.json").read_text(encoding="utf-8"))
    assert saved["train_rows"] == 7 and saved["test_rows"] == 16
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


def test_parquet_has_exactly_verls_fields_and_golds_survive(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_datasets(src, out)
    for path in [out / "train.parquet", out / "test.parquet", out / "triviaqa" / "test.parquet"]:
        table = pq.read_table(path)
        assert tuple(table.column_names) == VERL_FIELDS
        assert table.schema.field("reward_model").type.field("ground_truth").type == pa.struct(
            [("target", pa.list_(pa.string()))]
        )
    trivia = pq.read_table(out / "triviaqa" / "test.parquet").to_pylist()
    assert trivia[1]["reward_model"]["ground_truth"]["target"] == [
        "Antonín Dvořák",
        "Dvorak",
        "Antonin Dvorak",
    ]
    assert trivia[1]["prompt"][0]["content"].endswith("Question: Who composed the opera 'Rusalka'?\n")
    assert [r["extra_info"]["index"] for r in trivia] == [0, 1, 2]
    train = {
        r["reward_model"]["ground_truth"]["target"][0]: r
        for r in pq.read_table(out / "train.parquet").to_pylist()
    }
    assert train["10"]["prompt"][0]["content"].endswith(
        "how many episodes in season 2 of the crown?\n"
    )  # number -> "10"
    assert train["no"]["data_source"] == "hotpotqa"
    bamboogle = pq.read_table(out / "bamboogle" / "test.parquet").to_pylist()
    assert bamboogle[1]["reward_model"]["ground_truth"]["target"] == ["Mexico City", "Ciudad de México"]


def test_jsonl_outputs_are_readable_flashrag(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_datasets(src, out)
    nq_train = list(read_qa_jsonl(out / "nq" / "train.jsonl"))
    assert [e.id for e in nq_train] == ["train_0", "train_1", "train_2", "train_5"]
    assert nq_train[2].golds == ("10",)
    hotpot_dev = list(read_qa_jsonl(out / "hotpotqa" / "dev.jsonl"))
    assert all((e.dataset, e.split) == ("hotpotqa", "dev") for e in hotpot_dev)
    mix = list(read_qa_jsonl(out / "train.jsonl"))
    assert Counter(e.dataset for e in mix) == {"nq": 4, "hotpotqa": 3}
    assert mix[0].metadata is not None
    # The output folder is itself a FlashRAG tree: preparing it again changes nothing.
    again = prepare_datasets(out, tmp_path / "again")
    assert again.train_rows == 7 and again.test_rows == 16
    assert all(c.duplicate_ids == c.duplicate_questions == c.empty_golds == 0 for c in again.counts)


def test_training_mix_shuffle_is_seeded(src: Path, tmp_path: Path) -> None:
    def order(seed: int, name: str) -> list[str]:
        prepare_datasets(src, tmp_path / name, "", seed=seed)
        return [e.id for e in read_qa_jsonl(tmp_path / name / "train.jsonl")]

    first, again, other = order(0, "a"), order(0, "b"), order(1, "c")
    assert first == again
    assert sorted(first) == sorted(other)
    assert first != other
    unshuffled = ["train_0", "train_1", "train_2", "train_5", "5a7a0693", "5a879ab0", "5a8c7595"]
    assert sorted(first) == sorted(unshuffled) and first != unshuffled


def test_keep_all_reproduces_search_r1_row_for_row(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "keep_all"
    report = prepare_datasets(
        src, out, "nq", train_mix="nq,hotpotqa", seed=None, duplicates="keep_all", empty_golds="keep"
    )
    # Search-R1's train.parquet: every NQ train row, then every HotpotQA train row, each indexed from 0.
    mix = pq.read_table(out / "train.parquet").to_pylist()
    assert [(r["data_source"], r["extra_info"]["index"]) for r in mix] == [("nq", i) for i in range(7)] + [
        ("hotpotqa", i) for i in range(3)
    ]
    assert "in source order" in report.format_table()
    counts = counts_by_key(report)
    assert counts["nq", "train"].written == 7
    assert (counts["nq", "train"].duplicate_ids, counts["nq", "train"].empty_golds) == (1, 1)  # counted, kept
    rows = pq.read_table(out / "nq" / "train.parquet").to_pylist()
    assert [r["extra_info"]["index"] for r in rows] == list(range(7))
    assert rows[5]["reward_model"]["ground_truth"]["target"] == []


def test_duplicate_and_empty_gold_error_policies(src: Path, tmp_path: Path) -> None:
    with pytest.raises(DataPrepError, match=r"nq/train\.jsonl:4: duplicate id 'train_1' \(first on line 2\)"):
        prepare_datasets(src, tmp_path / "o1", "", train_mix="nq", duplicates="error", empty_golds="keep")
    with pytest.raises(DataPrepError, match=r"popqa/test\.jsonl:3: id '1' has no usable gold answer"):
        prepare_datasets(src, tmp_path / "o2", "popqa", train_mix="", empty_golds="error")


def test_synthetic_world_exports_like_any_dataset(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "world"
    report = prepare_datasets(src, out, "synthetic_world", train_mix="synthetic_world")
    assert (report.train_rows, report.test_rows) == (2, 1)
    rows = pq.read_table(out / "test.parquet").to_pylist()
    assert rows[0]["data_source"] == "synthetic_world"
    assert rows[0]["prompt"][0]["content"].endswith(
        "Question: Which city hosts the headquarters of Orvix Labs?\n"
    )


def test_missing_inputs_are_all_listed_and_nothing_written(tmp_path: Path) -> None:
    src = write_flashrag_tree(tmp_path / "src", {"nq": FIXTURES["nq"]})
    out = tmp_path / "out"
    with pytest.raises(DataPrepError) as caught:
        prepare_datasets(src, out, "nq,musique,bamboogle")
    message = str(caught.value)
    assert (
        "musique/dev.jsonl" in message
        and "bamboogle/test.jsonl" in message
        and "hotpotqa/train.jsonl" in message
    )
    assert "hf download RUC-NLPIR/FlashRAG_datasets" in message
    assert not out.exists()
    with pytest.raises(DataPrepError, match="unknown dataset 'nqq'"):
        prepare_datasets(src, out, "nqq")
    with pytest.raises(DataPrepError, match="has no 'train' split"):
        prepare_datasets(src, out, "", train_mix="bamboogle")


def test_interrupted_run_leaves_previous_outputs_intact(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prepare_datasets(src, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # A malformed line in the last evaluation file aborts the run after most outputs were produced.
    bad = src / "bamboogle" / "test.jsonl"
    bad.write_text(
        bad.read_text(encoding="utf-8") + '{"id": "b9", "question": "unterminated\n', encoding="utf-8"
    )
    (src / "nq" / "test.jsonl").write_text(
        json.dumps(rec("new", "a new question", ["x"])) + "\n", encoding="utf-8"
    )
    with pytest.raises(QAFormatError, match=r"bamboogle/test\.jsonl:3: malformed JSON"):
        prepare_datasets(src, out)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # no partial file, no temporary file, nothing overwritten


def test_skip_malformed_counts_and_reports_them(src: Path, tmp_path: Path) -> None:
    bad = src / "musique" / "dev.jsonl"
    bad.write_text(bad.read_text(encoding="utf-8") + "{oops\n", encoding="utf-8")
    report = prepare_datasets(src, tmp_path / "out", "musique", train_mix="", on_malformed="skip")
    (counts,) = report.counts
    assert (counts.read, counts.malformed, counts.written) == (3, 1, 2)
    assert counts.problems[0][0] == 3
    assert "musique/dev.jsonl:3: malformed JSON" in report.format_table()


# ---------------------------------------------------------------------------------------------------------- CLI


def test_cli_prepare_prints_table(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    code = main(
        ["data", "prepare", "--src", str(src), "--out", str(out), "--datasets", "nq,hotpotqa", "--seed", "3"]
    )
    printed = capsys.readouterr().out
    assert code == 0
    lines = printed.splitlines()
    assert lines[0].split() == [
        "dataset",
        "split",
        "role",
        "read",
        "malformed",
        "dup_id",
        "dup_question",
        "empty_gold",
        "written",
        "in_train_mix",
    ]
    assert lines[2].split() == ["nq", "train", "train", "7", "0", "1", "1", "1", "4", "-"]
    assert ["nq", "test", "test", "3", "0", "0", "0", "0", "3", "1"] in [line.split() for line in lines]
    assert "training mix : nq + hotpotqa, 7 rows, shuffled with seed 3" in printed
    assert (out / "train.parquet").is_file() and (out / "test.parquet").is_file()


def test_cli_errors_are_clean(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["data", "prepare", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "source directory not found" in err and "nowhere" in err and "Traceback" not in err
    code = main(["data", "prepare", "--src", str(src), "--out", str(tmp_path / "o"), "--duplicates", "error"])
    assert code == 2
    assert "duplicate id 'train_1'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "train.parquet").exists()


def test_cli_convert(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "world_test.parquet"
    code = main(
        ["data", "convert", str(src / "synthetic_world" / "test.jsonl"), "--out", str(out), "--split", "test"]
    )
    assert code == 0
    assert f"1 rows -> {out}" in capsys.readouterr().out
    row = pq.read_table(out).to_pylist()[0]
    assert (row["data_source"], row["extra_info"]) == ("synthetic_world", {"split": "test", "index": 0})
    loose = tmp_path / "questions.jsonl"
    loose.write_text(json.dumps(rec("q1", "a question", ["x"])) + "\n", encoding="utf-8")
    # A file outside a dataset folder names no dataset: the user must say which (it is the reward key).
    assert main(["data", "convert", str(loose), "--out", str(tmp_path / "x.parquet")]) == 2
    assert (
        "questions.jsonl:1: the record names no dataset; pass dataset= (--dataset)" in capsys.readouterr().err
    )
    assert not (tmp_path / "x.parquet").exists()
    assert main(["data", "convert", str(loose), "--out", str(tmp_path / "x.parquet"), "--dataset", "nq"]) == 0
    assert pq.read_table(tmp_path / "x.parquet").column("data_source").to_pylist() == ["nq"]


def test_refuses_to_overwrite_its_inputs(src: Path) -> None:
    before = (src / "nq" / "test.jsonl").read_bytes()
    with pytest.raises(DataPrepError, match="would overwrite the input"):
        prepare_datasets(src, src, "nq")
    assert (src / "nq" / "test.jsonl").read_bytes() == before


def test_real_synthetic_world_files_prepare_and_convert(tmp_path: Path) -> None:
    world = pytest.importorskip("tspo.data.world")
    world_dir = tmp_path / "runs" / "world"  # the folder name 'world' is an alias of synthetic_world
    world.write_world(world.generate_world(world.WorldConfig(size="tiny")), world_dir)
    expected_train = sum(1 for _ in read_qa_jsonl(world_dir / "train.jsonl"))
    report = prepare_datasets(
        tmp_path / "runs", tmp_path / "out", "synthetic_world", train_mix="synthetic_world"
    )
    assert report.train_rows == expected_train > 0
    assert report.test_rows == sum(1 for _ in read_qa_jsonl(world_dir / "test.jsonl")) > 0
    rows = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    assert {r["data_source"] for r in rows} == {"synthetic_world"}
    assert all(r["reward_model"]["ground_truth"]["target"] for r in rows)
    assert main(["data", "convert", str(world_dir / "test.jsonl"), "--out", str(tmp_path / "t.parquet")]) == 0
    assert pq.read_table(tmp_path / "t.parquet").num_rows == report.test_rows


def test_prepare_and_world_generate_never_replace_each_others_files(
    src: Path, tmp_path: Path, capsys
) -> None:
    from tspo.cli import main

    world = tmp_path / "world"
    assert main(["world", "generate", "--out", str(world), "--size", "tiny"]) == 0
    before = {p: p.read_bytes() for p in world.rglob("*") if p.is_file()}
    with pytest.raises(DataPrepError, match=r"already holds train\.jsonl, test\.jsonl .*did not write"):
        prepare_datasets(src, world)
    assert {p: p.read_bytes() for p in world.rglob("*") if p.is_file()} == before
    prepared = tmp_path / "prepared"
    prepare_datasets(src, prepared)
    prepare_datasets(src, prepared)  # its own output: a rerun replaces it
    before = {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["world", "generate", "--out", str(prepared), "--size", "tiny"]) == 2
    assert "already holds train.jsonl, test.jsonl that no world wrote" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in prepared.rglob("*") if p.is_file()} == before
