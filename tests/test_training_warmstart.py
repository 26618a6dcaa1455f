"""Warm-start steps: a mixed batch scored in two length runs has the padded batch's loss and gradient."""

from __future__ import annotations

import torch

from tspo.data.qa import read_qa_jsonl
from tspo.data.world import WorldConfig, generate_world, write_world
from tspo.retrieval import BM25Retriever, read_corpus
from tspo.rollout import RolloutConfig, build_tiny_model, load_policy
from tspo.training.policy import response_scores
from tspo.training.warmstart import backward_demonstration_loss, build_demonstrations, split_by_length
from tspo.trajectory import collate_trajectories


def test_split_by_length_cuts_where_padding_is_least():
    lengths = [70, 140, 72, 138, 69, 141, 75]
    parts = split_by_length(lengths, range(len(lengths)))
    assert [sorted(lengths[i] for i in part) for part in parts] == [[69, 70, 72, 75], [138, 140, 141]]
    # Similar lengths stay together; nothing is lost or repeated.
    assert split_by_length([50, 51, 52], [2, 0, 1]) == [[0, 1, 2]]
    assert split_by_length([10, 90], [1]) == [[1]]
    assert split_by_length([10, 90], []) == []


def test_split_scoring_gives_the_padded_batch_gradient(tmp_path):
    write_world(generate_world(WorldConfig(seed=0, size="tiny", hops="1:0.5,2:0.5")), tmp_path / "world")
    corpus = list(read_corpus(tmp_path / "world" / "corpus.jsonl"))
    examples = list(read_qa_jsonl(tmp_path / "world" / "train.jsonl"))[:12]
    model_dir = build_tiny_model([doc.contents for doc in corpus], tmp_path / "tiny", hidden_size=32)
    model, tokenizer = load_policy(model_dir)
    demos = build_demonstrations(examples, tokenizer, BM25Retriever.build(corpus), RolloutConfig())
    lengths = [len(d.prompt_ids) + len(d.response_ids) for d in demos]
    assert len(split_by_length(lengths, range(len(demos)))) == 2
    pad = tokenizer.pad_token_id

    model.zero_grad()
    split_loss = backward_demonstration_loss(model, demos, pad)
    split_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    batch = collate_trajectories(demos, pad)
    logprobs = response_scores(model, batch).logprobs
    padded_loss = -(logprobs * batch.loss_mask).sum() / batch.loss_mask.sum()
    padded_loss.backward()
    padded_loss = padded_loss.detach()

    assert abs(split_loss - padded_loss.item()) < 1e-5
    for split_grad, param in zip(split_grads, model.parameters(), strict=True):
        torch.testing.assert_close(split_grad, param.grad, rtol=1e-4, atol=1e-6)
