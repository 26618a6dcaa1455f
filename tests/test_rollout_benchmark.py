"""The rollout benchmark's single-turn reference with per-row lengths, on a real tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessorList

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import rollout as rollout_benchmark
from tspo.rollout import build_tiny_model, load_policy
from tspo.rollout.engines.hf import HFEngine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = ["who founded the mill", "the mill was founded by ada", "ada lives in oslo"]
    directory = build_tiny_model(
        texts, tmp_path_factory.mktemp("tiny") / "m", hidden_size=32, num_layers=1, num_heads=2
    )
    model, tokenizer = load_policy(directory, device="cpu", dtype="float32")
    model.eval()
    return model, tokenizer, HFEngine(model, tokenizer)


def prompt_ids(tokenizer, texts):
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def test_each_row_generates_exactly_its_own_length_then_eos(tiny):
    model, tokenizer, engine = tiny
    prompts = prompt_ids(tokenizer, ("who founded", "ada lives in oslo", "the mill"))
    eos = min(engine.eos_ids)
    width = max(len(p) for p in prompts)
    lengths = [1, 6, 3]
    generated, _ = rollout_benchmark.timed_generate(
        model,
        tokenizer.pad_token_id,
        prompts,
        0,
        max_new_tokens=max(lengths) + 1,
        do_sample=True,
        top_k=0,
        eos_token_id=eos,
        logits_processor=LogitsProcessorList([rollout_benchmark.RowLengths(lengths, width, eos)]),
    )
    for row, length in zip(generated, lengths, strict=True):
        assert eos not in row[:length] and row[length] == eos


def test_plain_row_lengths_counts_the_rows_tokens_over_batches(tiny):
    model, tokenizer, engine = tiny
    prompts = prompt_ids(tokenizer, ("who founded", "ada lives in oslo", "the mill"))
    seconds, tokens = rollout_benchmark.plain_row_lengths(
        model, tokenizer, engine, prompts, [2, 5, 0], batch_size=2, seed=0
    )
    # A row of 0 tokens still generates one (a generation is never empty).
    assert tokens == 2 + 5 + 1 and seconds > 0


def test_row_lengths_masks_eos_before_a_rows_end_and_everything_else_at_it():
    processor = rollout_benchmark.RowLengths([2, 4], prompt_width=3, eos_token_id=7)
    scores = processor(torch.zeros((2, 5), dtype=torch.long), torch.zeros((2, 12)))
    assert scores[0, 7] == 0 and torch.isinf(scores[0]).sum() == 11
    assert torch.isinf(scores[1, 7]) and torch.isinf(scores[1]).sum() == 1
