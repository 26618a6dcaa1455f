"""Per-token log-probabilities of responses under a causal LM (policy, old policy, reference), and the
bf16 autocast they may run under (which processors run it natively, and a float32 output head)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint

from tspo.algorithms import entropy_from_logits
from tspo.trajectory import TrajectoryBatch

# CPU features with bf16 arithmetic in hardware: AVX-512 BF16 (Cooper Lake, Sapphire Rapids, AMD Zen 4+)
# and AMX BF16 tiles (Sapphire Rapids+). Without them, CPU bf16 autocast is emulated in float32 and
# slower than float32 (about 5x for SmolLM2 on an AVX2-only EPYC).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) positions that skip left padding, as ``generate`` assigns them.

    Without this a left-padded prompt would be scored at shifted positions and the training
    log-probabilities would not match the sampler's.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


@dataclass
class ResponseScores:
    """Args shapes: ``logprobs`` (B, L); ``entropy`` (B, L) or None."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


def cpu_bf16_features(
    capabilities: Mapping[str, Any] | None = None, cpuinfo: str | None = None
) -> tuple[str, ...]:
    """The hardware bf16 features (``CPU_BF16_FLAGS``) this CPU has.

    Sources, first that answers: ``torch.cpu.get_capabilities()`` (torch's cpuinfo, torch >= 2.6), then
    the ``flags`` lines of ``/proc/cpuinfo`` (Linux). Either can be injected (tests). A processor
    whose features cannot be read counts as having none (``trainer.bf16=auto`` stays off).
    """
    if capabilities is None and cpuinfo is None:
        probe = getattr(torch.cpu, "get_capabilities", None)
        if callable(probe):
            try:
                capabilities = probe()
            except Exception:  # pragma: no cover - a torch build without cpuinfo
                capabilities = None
    if capabilities is not None:
        return tuple(flag for flag in CPU_BF16_FLAGS if capabilities.get(flag))
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return ()
    flags = {
        word
        for line in cpuinfo.splitlines()
        if line.split(":", 1)[0].strip() in ("flags", "Features")
        for word in line.split(":", 1)[1].split()
    }
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


@dataclass(frozen=True)
class Bf16Decision:
    """Whether forward passes run under bf16 autocast, and why (one log line).

    Attributes:
        enabled: autocast on.
        reason: what decided it, in words.
        warn: the request could not be honoured as asked (or will be slow): log it as a warning.
    """

    enabled: bool
    reason: str
    warn: bool = False


def decide_bf16_autocast(
    setting: str, device_type: str, *, cuda_bf16: bool = False, cpu_features: tuple[str, ...] = ()
) -> Bf16Decision:
    """``trainer.bf16`` (auto / on / off) on ``device_type`` with the given hardware support.

    - ``off``: never.
    - CUDA: on where the GPU supports bf16; ``on`` on a GPU without it is refused (autocast would fail).
    - CPU: ``auto`` turns it on only with hardware bf16 (``cpu_features``, see :func:`cpu_bf16_features`);
      ``on`` is honoured on any CPU (autocast works everywhere), with a warning where it is emulated.
    - other devices: ``on`` only.
    """
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"trainer.bf16 must be auto, on or off, got {setting!r}")
    if setting == "off":
        return Bf16Decision(False, "trainer.bf16=off")
    if device_type == "cuda":
        if cuda_bf16:
            return Bf16Decision(True, f"trainer.bf16={setting}: this GPU supports bf16")
        return Bf16Decision(
            False, f"trainer.bf16={setting} but this GPU has no bf16: full precision", warn=setting == "on"
        )
    if device_type == "cpu":
        if cpu_features:
            return Bf16Decision(True, f"trainer.bf16={setting}: this CPU has {' and '.join(cpu_features)}")
        if setting == "on":
            return Bf16Decision(
                True,
                f"trainer.bf16=on on a CPU without {' / '.join(CPU_BF16_FLAGS)}: bf16 is emulated and "
                "usually slower than float32",
                warn=True,
            )
        return Bf16Decision(
            False, f"trainer.bf16=auto: this CPU has no {' / '.join(CPU_BF16_FLAGS)}, so float32 is faster"
        )
    if setting == "on":
        return Bf16Decision(True, f"trainer.bf16=on on {device_type}")
    return Bf16Decision(False, f"trainer.bf16=auto: no bf16 detection for {device_type}; full precision")


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def float32_output_head(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run ``model``'s output projection (the LM head) in float32 even inside bf16 autocast.

    Autocast computes ``Linear`` in bf16, which rounds logits of magnitude 10-30 by up to 0.06: that
    error goes straight into log-probabilities. With a float32 head only the hidden state is bf16:
    on SmolLM2 the mean |log p - log p_float32| drops from 0.030 to 0.017 (max 0.16 -> 0.11). Only
    applies to a float32-stored head; gradients flow as usual.
    """
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if enabled and callable(getter) else None
    weight = getattr(head, "weight", None)
    if head is None or weight is None or weight.dtype != torch.float32:
        yield
        return
    # The instance attribute shadows the class's forward; anything already set there is put back.
    had_own = "forward" in head.__dict__
    own = head.__dict__.get("forward")
    original = head.forward

    def forward(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return original(hidden.float(), *args, **kwargs)

    head.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had_own:
            head.forward = own  # type: ignore[method-assign]
        else:
            del head.forward


#: Elements of one chunk of float32 logits (positions x vocabulary): 2**25 = 128 MiB, 220 positions of
#: Qwen2.5's 151,936-token vocabulary. A log-probability pass holds a few chunks, never (B, L, V).
LOGIT_CHUNK_ELEMENTS = 1 << 25

# Architectures whose causal-LM forward is exactly ``lm_head(decoder(...).last_hidden_state)``, so the
# hidden states can be cut to the scored positions before the head. Any other (logit soft-capping,
# logit scales, ...) runs its own forward, with ``logits_to_keep`` where it takes it.
_PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder body, LM head) of a plain-head causal LM (peft adapters stay active inside the body)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(base, "config", None), "model_type", None) not in _PLAIN_HEAD_MODEL_TYPES:
        return None
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if decoder is None or decoder is base or head is None:
        return None
    return decoder, head


def _head_logits(hidden: torch.Tensor, head: torch.nn.Module, bf16: bool) -> torch.Tensor:
    """(N, V) float32 logits of (N, H) hidden states: a float32-stored head computes in float32 even
    under bf16 autocast (as :func:`float32_output_head`); any other head under the run's autocast."""
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dtype == torch.float32:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return head(hidden.float())
    with autocast_context(hidden.device, bf16):
        return head(hidden).float()


def _chunk_scores(
    features: torch.Tensor,
    targets: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    temperature: float,
    with_entropy: bool,
    entropy_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability (N,) of ``targets`` (N,) and, if asked, the entropy (N,), from ``features`` (N, H)
    that ``project`` maps to (N, V) float32 logits.

    ``log p = z_target - logsumexp(z)``: the chosen token's entry, not a (N, V) log-softmax.
    """
    logits = project(features)
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    entropy = None
    if with_entropy:
        # Entropy as a metric only (no bonus) needs no graph.
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits if entropy_grad else logits.detach())
    return logprobs, entropy


# A common prompt beginning shorter than this is scored per row (a separate pass would cost more).
MIN_SHARED_PREFIX = 32


def common_prompt_prefix(batch: TrajectoryBatch) -> int:
    """How many first real prompt tokens every row of ``batch`` shares (the instruction and worked
    examples of a few-shot prompt), kept one short of the shortest prompt: each row keeps at least one
    prompt token of its own, whose hidden state predicts its first response token."""
    lengths = batch.prompt_mask.sum(dim=1)
    shortest = int(lengths.min()) - 1
    if batch.batch_size < 2 or shortest < 1:
        return 0
    width = batch.prompt_ids.shape[1]
    # Left padding: row b's real tokens start at column width - lengths[b].
    columns = (width - lengths)[:, None] + torch.arange(shortest)[None, :]
    starts = batch.prompt_ids.gather(1, columns)
    agree = (starts == starts[:1]).all(dim=0)
    return shortest if bool(agree.all()) else int((~agree).nonzero()[0, 0])


def _shared_prefix_hidden(
    decoder: torch.nn.Module, batch: TrajectoryBatch, shared: int, device: torch.device, bf16: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states with the ``shared`` common prompt tokens computed once for the whole batch.

    The prefix goes through the decoder as a (1, S) sequence; its keys and values are expanded to every
    row (a view: the backward pass sums the rows' gradients into the one prefix computation, so the
    gradient equals the per-row one). Each row's suffix (its own prompt tokens, then its response) is
    laid out right-padded after the prefix, at the positions it has in its full sequence.

    Returns:
        hidden: (B, W, H) hidden states of the suffix layout.
        offset: (B,) suffix index of the token just before response token 0 (response token t is
            predicted at ``offset + t``).
    """
    lengths = batch.prompt_mask.sum(dim=1)
    own = lengths - shared  # prompt tokens after the prefix, >= 1 per row
    size, width = batch.prompt_ids.shape
    response_len = batch.response_ids.shape[1]
    suffix_width = int(own.max()) + response_len
    suffix = torch.zeros(size, suffix_width, dtype=torch.long)
    suffix_mask = torch.zeros(size, suffix_width, dtype=torch.long)
    for row in range(size):
        count = int(own[row])
        suffix[row, :count] = batch.prompt_ids[row, width - count :]
        suffix[row, count : count + response_len] = batch.response_ids[row]
        suffix_mask[row, :count] = 1
        suffix_mask[row, count : count + response_len] = batch.response_mask[row]
    prefix = batch.prompt_ids[:1, width - int(lengths[0]) : width - int(lengths[0]) + shared].to(device)
    cache_kwarg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    with autocast_context(device, bf16):
        prefix_out = decoder(
            input_ids=prefix, position_ids=torch.arange(shared, device=device)[None], use_cache=True
        )
        from transformers import DynamicCache

        prefix_cache = getattr(prefix_out, "cache", None)
        if prefix_cache is None:  # transformers < 5 names it past_key_values
            prefix_cache = prefix_out.past_key_values
        expanded = DynamicCache()
        for index, (keys, values) in enumerate(_cache_tensors(prefix_cache)):
            expanded.update(keys.expand(size, *keys.shape[1:]), values.expand(size, *values.shape[1:]), index)
        suffix_mask = suffix_mask.to(device)
        mask = torch.cat([torch.ones(size, shared, dtype=torch.long, device=device), suffix_mask], dim=1)
        hidden = decoder(
            input_ids=suffix.to(device),
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask)[:, shared:],
            use_cache=True,
            **{cache_kwarg: expanded},
        ).last_hidden_state
    return hidden, (own - 1).to(device)


def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of a transformers cache: ``layers`` since 4.56, lists before."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def response_scores(
    model: torch.nn.Module,
    batch: TrajectoryBatch,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = True,
    bf16: bool = False,
    positions: torch.Tensor | None = None,
    chunk_elements: int = LOGIT_CHUNK_ELEMENTS,
    share_prefix: bool = True,
) -> ResponseScores:
    """Log-probability (and optionally entropy) of the response tokens of ``batch``.

    Returns tensors of shape (B, L) aligned with ``batch.response_ids``: position t holds
    ``log p(response[t] | prompt, response[:t])`` where ``positions`` (B, L) is true (default: the
    response mask, every real response token) and 0 elsewhere. Gradients flow when called with grad
    enabled. The logits are divided by the sampling ``temperature`` so the numbers match the sampler's.
    Under ``bf16`` the model runs in bf16 autocast but the LM head and the log-softmax in float32.

    Memory: the hidden states are cut to the scored positions before the LM head, and the head, the
    ``logsumexp`` and the entropy run over ``chunk_elements / V`` positions at a time; with gradients each
    chunk is recomputed in the backward pass (activation checkpointing) instead of keeping its logits.
    For the architectures of ``_PLAIN_HEAD_MODEL_TYPES`` no (B, L, V) tensor exists, only (N, H) hidden
    states and one (chunk, V) block; any other model's own forward still returns (B, L + 1, V) logits.

    Compute: with ``share_prefix``, prompts that all begin with the same ``MIN_SHARED_PREFIX`` or more
    tokens (a few-shot prompt) run those tokens through a plain-head model once for the whole batch
    (:func:`_shared_prefix_hidden`); the numbers, gradients included, are the same up to float rounding.
    """
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)
    attention_mask = batch.attention_mask.to(device)
    prompt_len = batch.prompt_ids.shape[1]
    size, response_len = batch.response_ids.shape
    where = (batch.response_mask if positions is None else positions).to(device).bool()
    if where.shape != (size, response_len):
        raise ValueError(f"positions must have shape {(size, response_len)}, got {tuple(where.shape)}")
    rows, cols = where.nonzero(as_tuple=True)
    targets = batch.response_ids.to(device)[rows, cols]
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids_from_mask(attention_mask),
        "use_cache": False,
    }
    # Logits at position p predict token p + 1: response token t is predicted at P - 1 + t.
    parts = _decoder_and_head(model)
    shared = common_prompt_prefix(batch) if share_prefix and parts is not None else 0
    if parts is not None and shared >= MIN_SHARED_PREFIX:
        decoder, head = parts
        hidden, offset = _shared_prefix_hidden(decoder, batch, shared, device, bf16)
        features = hidden[rows, offset[rows] + cols]
        vocab = int(getattr(head, "out_features", 0) or head.weight.shape[0])
        project: Callable[[torch.Tensor], torch.Tensor] = partial(_head_logits, head=head, bf16=bf16)
    elif parts is not None:
        decoder, head = parts
        with autocast_context(device, bf16):
            hidden = decoder(**inputs).last_hidden_state
        features = hidden[rows, cols + prompt_len - 1]
        vocab = int(getattr(head, "out_features", 0) or head.weight.shape[0])
        project = partial(_head_logits, head=head, bf16=bf16)
    else:
        # Some other head: the model's own forward, logits for the response slice only where it can.
        extra = {"logits_to_keep": response_len + 1} if _accepts_logits_to_keep(model) else {}
        with autocast_context(device, bf16), float32_output_head(model, enabled=bf16):
            logits = model(**inputs, **extra).logits
        features = logits[:, -(response_len + 1) : -1][rows, cols]
        vocab = logits.shape[-1]
        project = _as_float32
    chunk = max(1, chunk_elements // max(1, vocab))
    checkpointed = torch.is_grad_enabled() and features.requires_grad
    logprob_parts: list[torch.Tensor] = []
    entropy_parts: list[torch.Tensor] = []
    for start in range(0, features.shape[0], chunk):
        args = (features[start : start + chunk], targets[start : start + chunk])
        kwargs = {
            "project": project,
            "temperature": temperature,
            "with_entropy": with_entropy,
            "entropy_grad": entropy_grad,
        }
        if checkpointed:
            # The chunk's (chunk, V) logits are recomputed in backward rather than kept for it.
            logprobs, entropy = torch.utils.checkpoint.checkpoint(
                _chunk_scores, *args, use_reentrant=False, preserve_rng_state=False, **kwargs
            )
        else:
            logprobs, entropy = _chunk_scores(*args, **kwargs)
        logprob_parts.append(logprobs)
        if entropy is not None:
            entropy_parts.append(entropy)
    full = torch.zeros(size, response_len, dtype=torch.float32, device=device)
    logprobs = full.index_put((rows, cols), _cat(logprob_parts, features))
    entropy = full.index_put((rows, cols), _cat(entropy_parts, features)) if with_entropy else None
    return ResponseScores(logprobs=logprobs, entropy=entropy)


def _as_float32(logits: torch.Tensor) -> torch.Tensor:
    return logits.float()


def _cat(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The chunks end to end; an empty (0,) float32 tensor when nothing was scored."""
    return torch.cat(parts) if parts else like.new_zeros(0, dtype=torch.float32)


def trim_padding(batch: TrajectoryBatch) -> TrajectoryBatch:
    """``batch`` as wide as its own longest rows: without the prompt columns that are left padding in
    every row and the response columns that are right padding in every row (at least one is kept).

    A micro-batch cut from a step's batch keeps the step's padding (:meth:`TrajectoryBatch.select`);
    trimmed, it costs what its own rows need. The kept response columns are the first ones, so (b, L')
    results line up with the first L' columns of the untrimmed tensors.
    """
    prompt_used = batch.prompt_mask.bool().any(dim=0)
    start = int(prompt_used.long().argmax()) if bool(prompt_used.any()) else prompt_used.shape[0]
    response_used = batch.response_mask.bool().any(dim=0).nonzero()
    end = max(1, int(response_used[-1]) + 1 if response_used.numel() else 1)
    return TrajectoryBatch(
        prompt_ids=batch.prompt_ids[:, start:],
        prompt_mask=batch.prompt_mask[:, start:],
        response_ids=batch.response_ids[:, :end],
        response_mask=batch.response_mask[:, :end],
        loss_mask=batch.loss_mask[:, :end],
        token_turn_index=batch.token_turn_index[:, :end],
        sample_logprobs=batch.sample_logprobs[:, :end],
        turn_mask=batch.turn_mask,
    )


@torch.no_grad()
def batched_logprobs(
    model: torch.nn.Module,
    batch: TrajectoryBatch,
    micro_batch_size: int,
    temperature: float = 1.0,
    bf16: bool = False,
) -> torch.Tensor:
    """(B, L) log-probabilities of the generated tokens (0 elsewhere) without gradient, computed in
    micro-batches, each trimmed to its own longest row (:func:`trim_padding`)."""
    was_training = model.training
    model.eval()
    result = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
    for start in range(0, batch.batch_size, micro_batch_size):
        rows = list(range(start, min(start + micro_batch_size, batch.batch_size)))
        micro = trim_padding(batch.select(rows))
        scores = response_scores(
            model, micro, temperature=temperature, bf16=bf16, positions=micro.loss_mask.bool()
        )
        result[rows, : micro.response_ids.shape[1]] = scores.logprobs.cpu()
    model.train(was_training)
    return result
