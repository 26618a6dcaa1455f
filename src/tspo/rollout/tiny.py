"""The ``tiny`` policy: a small Qwen2-architecture model with a word-level tokenizer (DESIGN section 9).

Built from a config (random weights, seeded) and a tokenizer trained on the given texts (typically the
synthetic world's corpus and questions), then written with ``save_pretrained`` so that tests and the
CPU benchmark load it with ``from_pretrained``: the same loading code a real model goes through.

The tokenizer lowercases, splits on whitespace and isolates punctuation; the protocol tags
(``<search>``, ``</search>``, ``<answer>``, ``</answer>``, ``<information>``, ``</information>``,
``<think>``, ``</think>``) are atomic added tokens, so stop strings end on a single token and
``parse_action`` reads decoded text unchanged (``"<search> who founded acme ? </search>"``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from tspo.doc import Doc
from tspo.files import publish_directory
from tspo.protocol import DEFAULT_PROTOCOL, ProtocolConfig, build_instruction, format_observation

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
UNK_TOKEN = "<unk>"
MARKER_FILE = "tspo_tiny.json"


def protocol_tag_tokens(protocol: ProtocolConfig = DEFAULT_PROTOCOL) -> tuple[str, ...]:
    """The tags that must be single tokens: search, answer, information and think, open and close."""
    names = (protocol.search_tag, protocol.answer_tag, protocol.information_tag, "think")
    return tuple(tag for name in names for tag in (f"<{name}>", f"</{name}>"))


def _protocol_texts(protocol: ProtocolConfig) -> Iterator[str]:
    """Texts the policy always sees (instruction, observation frame, invalid message): their words
    must be in the vocabulary whatever the corpus holds."""
    yield build_instruction("", protocol)
    yield protocol.invalid_action_message
    yield format_observation([Doc(id=str(i), title="title", text="text") for i in range(20)], protocol)


def build_word_tokenizer(
    texts: Iterable[str],
    protocol: ProtocolConfig = DEFAULT_PROTOCOL,
    max_vocab: int = 32_000,
    min_frequency: int = 1,
) -> Any:
    """Train a word-level tokenizer on ``texts`` (see the module docstring); returns a transformers
    fast tokenizer with ``<pad>``, ``<eos>`` and ``<unk>``."""
    from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(WordLevel(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    trainer = WordLevelTrainer(
        vocab_size=max_vocab, min_frequency=min_frequency, special_tokens=[PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
    )
    tokenizer.train_from_iterator(chain(_protocol_texts(protocol), texts), trainer)
    tokenizer.add_tokens([AddedToken(tag, normalized=False) for tag in protocol_tag_tokens(protocol)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, unk_token=UNK_TOKEN
    )


def build_tiny_model(
    texts: Iterable[str],
    out_dir: str | os.PathLike[str],
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 4096,
    max_vocab: int = 32_000,
    seed: int = 0,
    protocol: ProtocolConfig = DEFAULT_PROTOCOL,
    overwrite: bool = False,
) -> Path:
    """Build, randomly initialise (seeded) and save a tiny Qwen2 model and its word-level tokenizer.

    Args:
        texts: training texts of the tokenizer (e.g. corpus passages and questions).
        out_dir: directory to write; it must not exist unless ``overwrite``. Written atomically.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: model size
            (``num_kv_heads`` defaults to ``num_heads``, ``intermediate_size`` to ``2 * hidden_size``).
        max_position_embeddings: longest context the model accepts.
        max_vocab: vocabulary cap (most frequent words kept).
        seed: seeds the weight initialisation.
        protocol: the tags made atomic tokens.

    Returns:
        ``out_dir`` as a ``Path``; load it with :func:`tspo.rollout.load_policy` or ``from_pretrained``.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to replace it")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    kv_heads = num_kv_heads or num_heads
    if num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} is not divisible by num_kv_heads {kv_heads}")
    texts = list(texts)
    tokenizer = build_word_tokenizer(texts, protocol, max_vocab=max_vocab)
    tokenizer.model_max_length = max_position_embeddings
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        marker = {
            "kind": "tspo-tiny",
            "seed": seed,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "num_kv_heads": kv_heads,
            "vocab_size": len(tokenizer),
            "training_texts": len(texts),
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        publish_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
