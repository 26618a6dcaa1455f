"""Generation with a Hugging Face transformers causal LM, on CPU or GPU, with a KV cache across turns.

The engine runs its own decoding loop over the model's ``forward`` (prefill, then one token per step
with a transformers ``DynamicCache`` whose layers write into preallocated buffers) instead of
``model.generate``, for three reasons:

- **KV cache across turns** (:mod:`tspo.rollout.engines.kv_cache`): the rollout loop sends each live
  trajectory's whole context every turn; the engine finds the keys and values it kept for that
  context's longest cached prefix and feeds only the new tokens (the last sampled token and the
  observation). A turn costs its new tokens, not the whole context. Rows of one call may start from
  prefixes of different lengths: the batch is laid out per row as
  ``[pad][cached prefix][pad][new tokens]``, the pads masked out and position ids counted per row,
  so a row sees exactly the keys of its own sequence at the positions it would have without the cache.
- **Shared prompts are prefilled once**: rows with the same cached prefix and the same new tokens (the
  ``n`` rollouts of one question on their first turn) go through the model once and are copied.
- **A shared beginning is prefilled once**: when the rows of a call start with the same tokens and
  the cache holds none of them (the instruction and worked examples of a few-shot prompt, before each
  row's own question), those tokens go through the model once and every row continues from them as
  from a cached prefix. A few-shot prompt is then paid once per call, not once per question.
- **Finished rows leave the batch**: once a quarter of the rows have stopped, the cache is compacted
  to the rows still generating, so a call is not paid at full batch width until its longest row ends.

Sampling follows ``model.generate`` exactly: the same float32 logits, temperature then top-p
(``TopPLogitsWarper``'s rule), ``softmax`` and one ``torch.multinomial`` over the call's full batch per
step (finished rows get a dummy distribution), so with the same seed the same tokens are drawn as by
``generate``, and as with the cache turned off (up to floating-point ties).

Sampler log-probabilities: ``log_softmax(logits / temperature)`` of the sampled token (temperature 1
when greedy), before top-p: what the trainer's recomputation of old log-probabilities reproduces.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tspo.rollout.engines.base import GenerationOutput, SamplingParams, StopScanner, eos_token_ids
from tspo.rollout.engines.kv_cache import CachedPrefix, PrefixKVStore, weights_fingerprint

DEFAULT_CACHE_BUDGET_BYTES = 4 * 2**30
# A common beginning shorter than this is left to the rows' own prefill (a separate pass costs more).
MIN_SHARED_PREFIX = 16
# Stopped rows leave the batch once they are this share of it: each compaction copies the whole cache,
# each step with stopped rows in the batch computes them for nothing.
COMPACT_SHARE = 0.25


@dataclass
class EngineStats:
    """Token counts over the engine's life (what the KV cache saves is ``reused_tokens``).

    Attributes:
        calls: ``generate`` calls.
        prompt_tokens: context tokens received.
        reused_tokens: context tokens whose keys and values came from the cache.
        prefill_tokens: context tokens fed through the model (after prompt sharing).
        decode_steps: one-token forward passes.
    """

    calls: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    prefill_tokens: int = 0
    decode_steps: int = 0


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) ``scores`` with the tokens outside the top-p nucleus set to ``-inf``.

    The rule of transformers' ``TopPLogitsWarper`` (``min_tokens_to_keep=1``), so sampling matches
    ``model.generate``: sort ascending, drop tokens whose cumulative probability is ``<= 1 - top_p``.
    """
    sorted_scores, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


try:  # transformers >= 4.56 keeps a cache as a list of layer objects
    from transformers.cache_utils import DynamicLayer as _DynamicLayer
except ImportError:  # pragma: no cover - older transformers: no reuse across calls
    _DynamicLayer = None


if _DynamicLayer is not None:

    class _BufferLayer(_DynamicLayer):  # type: ignore[misc, valid-type]
        """A full-attention cache layer over a preallocated (B, H, capacity, D) buffer.

        ``DynamicLayer`` concatenates the whole cache at every step (a quarter of a small model's decoding
        time on CPU); this one writes the new keys and values in place and exposes a view of the filled
        part. Every exposed column holds finite numbers (padding is zeros or a pad token's keys): a
        masked column still multiplies its value by 0, and garbage could be NaN.
        """

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.length = 0
            self._key_buffer: torch.Tensor | None = None
            self._value_buffer: torch.Tensor | None = None

        def allocate(
            self, like: torch.Tensor, batch: int, heads: int, head_dim: int, zeroed: int = 0
        ) -> None:
            """Buffers of (batch, heads, capacity, head_dim) with ``like``'s dtype and device; the first
            ``zeroed`` columns are zeros (the padding of a cached-prefix region). Later columns are
            written for every row before they are exposed, so they need no clearing."""
            shape = (batch, heads, self.capacity, head_dim)
            self._key_buffer = like.new_empty(shape)
            self._value_buffer = like.new_empty(shape)
            self._key_buffer[:, :, :zeroed] = 0
            self._value_buffer[:, :, :zeroed] = 0
            self.device = like.device
            self.is_initialized = True
            self._expose()

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            batch, heads, _, head_dim = key_states.shape
            self.allocate(key_states, batch, heads, head_dim)

        def _expose(self) -> None:
            assert self._key_buffer is not None and self._value_buffer is not None
            self.keys = self._key_buffer[:, :, : self.length]
            self.values = self._value_buffer[:, :, : self.length]

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            assert self._key_buffer is not None and self._value_buffer is not None
            end = self.length + key_states.shape[-2]
            if end > self._key_buffer.shape[-2]:
                raise RuntimeError(
                    f"KV buffer of {self._key_buffer.shape[-2]} columns is too small for {end}"
                )
            self._key_buffer[:, :, self.length : end] = key_states
            self._value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self._expose()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            assert self._key_buffer is not None and self._value_buffer is not None
            # Copy only the filled columns: the rest is written before it is ever read.
            self._key_buffer = self._select(self._key_buffer, indices)
            self._value_buffer = self._select(self._value_buffer, indices)
            self._expose()

        def _select(self, buffer: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
            """(len(indices), H, capacity, D): rows ``indices`` of ``buffer``, filled columns copied."""
            selected = buffer.new_empty((len(indices), *buffer.shape[1:]))
            torch.index_select(buffer[:, :, : self.length], 0, indices, out=selected[:, :, : self.length])
            return selected

        def columns(self, slot: int, spans: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
            """(H, L, D) keys and values of batch row ``slot`` over the column ``spans``, copied."""
            assert self._key_buffer is not None and self._value_buffer is not None
            keys = torch.cat([self._key_buffer[slot, :, a:b] for a, b in spans], dim=1)
            values = torch.cat([self._value_buffer[slot, :, a:b] for a, b in spans], dim=1)
            return keys, values


@dataclass
class _Batch:
    """The rows still in the model batch during one call, and where each row's tokens sit.

    Column layout of every call row: ``[pad][cached prefix][pad][new tokens][generated tokens]``; the
    cached prefix ends at column ``width_cached``, the new tokens at ``width_cached + width_new``, and
    decoding step s writes column ``width_cached + width_new + s``.

    Attributes:
        rows: (R,) call-row index of each batch row.
        mask: (R, capacity) 1 on the real tokens of each row (cached, new and generated tokens fed).
        cache: the transformers cache holding (R, H, T, D) keys and values per layer.
        cached: per call row, tokens taken from the cross-call cache.
        new: per call row, tokens fed at prefill.
        width_cached, width_new: the widths of the two prefill regions.
        length: columns filled so far.
    """

    rows: torch.Tensor
    mask: torch.Tensor
    cache: Any
    cached: list[int]
    new: list[int]
    width_cached: int
    width_new: int
    length: int

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows ``keep`` (indices into the current rows)."""
        self.cache.batch_select_indices(keep)
        self.rows, self.mask = self.rows[keep], self.mask[keep]

    def spans(self, row: int, generated_fed: int) -> list[tuple[int, int]]:
        """Column spans holding call row ``row``'s tokens in order, with ``generated_fed`` decoded ones."""
        end_new = self.width_cached + self.width_new
        return [
            (self.width_cached - self.cached[row], self.width_cached),
            (end_new - self.new[row], end_new + generated_fed),
        ]


class HFEngine:
    """Batched generation with a transformers causal LM (see the module docstring).

    Args:
        model: a ``PreTrainedModel`` (it may be the policy being trained: the engine switches it to
            eval mode for the call and restores the mode afterwards).
        tokenizer: its tokenizer (decodes outputs, finds stop strings).
        pad_token_id: padding id; default the tokenizer's pad, else its EOS.
        kv_cache: keep keys and values across calls and reuse them for contexts that extend an earlier
            call's sequence. Dropped when the weights change and on :meth:`release_cache`.
        cache_budget_bytes: most bytes the cross-call cache holds (least recently used dropped first).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pad_token_id: int | None = None,
        *,
        kv_cache: bool = True,
        cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        generation_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = eos_token_ids(tokenizer, generation_eos)
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id
        if pad_token_id is None:
            if not self.eos_ids:
                raise ValueError("the tokenizer has neither a pad nor an EOS token; pass pad_token_id")
            pad_token_id = min(self.eos_ids)
        self.pad_token_id = int(pad_token_id)
        self.kv_cache = kv_cache
        self.stats = EngineStats()
        self._store = PrefixKVStore(cache_budget_bytes)
        self._fingerprint: tuple[tuple[int, int, int], ...] | None = None
        self._scanners: dict[tuple[str, ...], tuple[StopScanner, torch.Tensor]] = {}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the model
        parameters = inspect.signature(base.forward).parameters
        # transformers 5 names the cache argument ``cache``; 4.x called it ``past_key_values``.
        self._cache_kwarg = "cache" if "cache" in parameters else "past_key_values"
        # Whether the model's cache layers allow cutting rows out and stitching them back (decided on
        # the first call: plain full-attention layers only).
        self._reusable: bool | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def cached_tokens(self) -> int:
        """Tokens whose keys and values the cross-call cache holds now."""
        return self._store.tokens

    @property
    def cached_bytes(self) -> int:
        return self._store.nbytes

    def release_cache(self) -> None:
        """Drop every kept key/value cache (the rollout loop calls this when a run ends)."""
        self._store.clear()

    # ------------------------------------------------------------------ setup
    def _scanner(self, stop: tuple[str, ...]) -> tuple[StopScanner, torch.Tensor]:
        """The stop scanner and a per-token class table (0: cannot complete a stop string, 1: may
        complete one -- decode a window, 2: completes one on its own), so a step costs one lookup."""
        if stop not in self._scanners:
            scanner = StopScanner(self.tokenizer, stop, self.eos_ids)
            vocab = max(len(self.tokenizer), int(self.model.get_output_embeddings().weight.shape[0]))
            token_class = torch.zeros(vocab, dtype=torch.int8)
            if stop:
                token_class[list(scanner.candidate_ids)] = 1
                token_class[list(scanner.complete_ids)] = 2
            self._scanners[stop] = (scanner, token_class)
        return self._scanners[stop]

    def _new_cache(self, capacity: int) -> Any:
        """An empty cache; with :class:`_BufferLayer` layers (``capacity`` columns) when the model's
        layers are plain full attention, the only kind whose rows can be cut out and stitched back."""
        from transformers import DynamicCache

        try:
            cache = DynamicCache(config=self.model.config)
        except TypeError:  # pragma: no cover - transformers 4.x: no config argument
            self._reusable = False
            return DynamicCache()
        if self._reusable is None:
            layers = getattr(cache, "layers", None)
            self._reusable = bool(
                _DynamicLayer is not None and layers and all(type(layer) is _DynamicLayer for layer in layers)
            )
        if self._reusable:
            cache.layers = [_BufferLayer(capacity) for _ in cache.layers]
        return cache

    def _check_weights(self) -> None:
        fingerprint = weights_fingerprint(self.model)
        if fingerprint != self._fingerprint:
            self._store.clear()
            self._fingerprint = fingerprint

    # ------------------------------------------------------------------ model calls
    def _forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """(R, V) float32 next-token logits at the last column of (R, S) ``input_ids``."""
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kwarg: cache},
        )
        return output.logits[:, -1].to(dtype=torch.float32)

    def _prefill(
        self,
        prompts: Sequence[Sequence[int]],
        prefixes: Sequence[CachedPrefix | None],
        reuse: Sequence[int],
        max_new_tokens: int,
    ) -> tuple[_Batch, torch.Tensor]:
        """Feed every row's uncached tokens; return the batch of all call rows and (B, V) logits.

        Rows with the same prefix entry, reuse length and new tokens are computed once and copied.
        """
        device = self.device
        keys: dict[tuple[int, int, tuple[int, ...]], int] = {}
        unique: list[int] = []
        inverse: list[int] = []
        for row, prompt in enumerate(prompts):
            key = (id(prefixes[row]) if reuse[row] else 0, reuse[row], tuple(prompt[reuse[row] :]))
            if key not in keys:
                keys[key] = len(unique)
                unique.append(row)
            inverse.append(keys[key])
        new = [len(prompt) - cached for prompt, cached in zip(prompts, reuse, strict=True)]
        width_cached = max(reuse)
        width_new = max(new)
        count = len(unique)
        capacity = width_cached + width_new + max_new_tokens
        cache = self._new_cache(capacity)
        if width_cached:
            # Only reached with _BufferLayer layers (reuse needs them): write each prefix in place.
            sample = next(prefix for prefix, r in zip(prefixes, reuse, strict=True) if r)
            for index, layer in enumerate(cache.layers):
                like = sample.layers[index][0]
                layer.allocate(like, count, like.shape[0], like.shape[2], zeroed=width_cached)
                for slot, row in enumerate(unique):
                    length = reuse[row]
                    if length:
                        prefix_keys, prefix_values = prefixes[row].layers[index]  # type: ignore[union-attr]
                        layer._key_buffer[slot, :, width_cached - length : width_cached] = prefix_keys[
                            :, :length
                        ]
                        layer._value_buffer[slot, :, width_cached - length : width_cached] = prefix_values[
                            :, :length
                        ]
                layer.length = width_cached
                layer._expose()
        input_ids = torch.full((count, width_new), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((count, capacity), dtype=torch.long)
        position_ids = torch.zeros((count, width_new), dtype=torch.long)
        for slot, row in enumerate(unique):
            cached = reuse[row]
            input_ids[slot, width_new - new[row] :] = torch.tensor(prompts[row][cached:], dtype=torch.long)
            mask[slot, width_cached - cached : width_cached] = 1
            mask[slot, width_cached + width_new - new[row] : width_cached + width_new] = 1
            position_ids[slot, width_new - new[row] :] = torch.arange(cached, cached + new[row])
            self.stats.prefill_tokens += new[row]
        mask = mask.to(device)
        length = width_cached + width_new
        logits = self._forward(input_ids.to(device), mask[:, :length], position_ids.to(device), cache)
        if count < len(prompts):
            index = torch.tensor(inverse, device=device)
            cache.batch_select_indices(index)
            mask, logits = mask[index], logits[index]
        batch = _Batch(
            rows=torch.arange(len(prompts), device=device),
            mask=mask,
            cache=cache,
            cached=list(reuse),
            new=new,
            width_cached=width_cached,
            width_new=width_new,
            length=length,
        )
        return batch, logits

    def _sample(
        self, logits: torch.Tensor, rows: torch.Tensor, batch_size: int, params: SamplingParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(R,) sampled ids and their (R,) sampler log-probabilities from (R, V) ``logits`` of the call
        rows ``rows``. The multinomial draw covers all ``batch_size`` call rows, as ``generate``'s does,
        so the random stream (and every row's sample) does not depend on which rows already stopped."""
        scaled = logits if params.greedy else logits / params.temperature
        if params.greedy:
            tokens = torch.argmax(scaled, dim=-1)
        else:
            scores = scaled
            if rows.numel() < batch_size:
                scores = scaled.new_zeros((batch_size, scaled.shape[1]))  # uniform rows for stopped rows
                scores[rows] = scaled
            if params.top_p < 1.0:
                scores = top_p_filter(scores, params.top_p)
            drawn = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            tokens = drawn[rows] if rows.numel() < batch_size else drawn
        logprobs = scaled.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(scaled, dim=-1)
        return tokens, logprobs

    def _harvest(
        self,
        batch: _Batch,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        generated: list[list[int]],
    ) -> None:
        """Keep the keys and values of the stopped batch rows ``slots``: their prompt plus every
        generated token but the last (which was sampled, never fed)."""
        for slot in slots:
            row = int(batch.rows[slot])
            fed = len(generated[row]) - 1
            spans = batch.spans(row, fed)
            layers = [layer.columns(slot, spans) for layer in batch.cache.layers]
            self._store.add(
                CachedPrefix(ids=tuple(prompts[row]) + tuple(generated[row][:fed]), layers=layers)
            )

    def _share_common_prefix(
        self, prompts: Sequence[Sequence[int]], prefixes: list[CachedPrefix | None], reuse: list[int]
    ) -> None:
        """Prefill the call's common first tokens once and let every row that has less of them cached
        continue from that entry (``prefixes`` and ``reuse`` are updated in place). Not stored: the
        rows' own continuations are, at the end of the call."""
        length = _common_prefix_length(prompts)
        gaining = [row for row, cached in enumerate(reuse) if cached < length]
        if length < MIN_SHARED_PREFIX or len(gaining) < 2:
            return
        ids = list(prompts[0][:length])
        batch, _ = self._prefill([ids], [None], [0], max_new_tokens=0)
        if not self._reusable:  # the model's cache layers cannot be copied between rows
            return
        span = [(batch.width_new - length, batch.width_new)]
        entry = CachedPrefix(ids=tuple(ids), layers=[layer.columns(0, span) for layer in batch.cache.layers])
        for row in gaining:
            prefixes[row] = entry
            reuse[row] = length

    # ------------------------------------------------------------------ generation
    def _decode(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        scanner: StopScanner,
        token_class: torch.Tensor,
    ) -> tuple[list[list[int]], list[list[float]]]:
        """(generated ids, log-probabilities) per prompt, each cut at its stop string / EOS / limit."""
        size = len(prompts)
        prefixes: list[CachedPrefix | None] = [None] * size
        if self.kv_cache and self._reusable is not False:
            prefixes = [self._store.lookup(prompt) for prompt in prompts]
            # The continuations replace them (and are stored at the end of this call).
            self._store.discard([p for p in prefixes if p is not None])
        reuse = [
            min(len(p.ids), len(q) - 1) if p is not None else 0
            for p, q in zip(prefixes, prompts, strict=True)
        ]
        if self.kv_cache and self._reusable is not False:
            self._share_common_prefix(prompts, prefixes, reuse)
        self.stats.calls += 1
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self.stats.reused_tokens += sum(reuse)
        batch, logits = self._prefill(prompts, prefixes, reuse, params.max_new_tokens)
        keep_cache = self.kv_cache and bool(self._reusable)
        device = logits.device
        next_position = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        generated: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        active = [True] * size
        remaining = size
        while True:
            tokens, token_logprobs = self._sample(logits, batch.rows, size, params)
            token_list, logprob_list = tokens.tolist(), token_logprobs.tolist()
            classes = token_class[tokens.cpu()].tolist() if params.stop else None
            rows = batch.rows.tolist()
            for slot, row in enumerate(rows):
                if not active[row]:
                    continue
                token = token_list[slot]
                generated[row].append(token)
                logprobs[row].append(logprob_list[slot])
                length = len(generated[row])
                done = token in self.eos_ids or length >= params.max_new_tokens
                if not done and classes is not None and classes[slot]:
                    done = classes[slot] == 2 or scanner.completes_stop(generated[row], length)
                if done:
                    active[row] = False
                    remaining -= 1
            if remaining == 0:
                break
            slot_active = [active[row] for row in rows]
            stopped = [slot for slot, alive in enumerate(slot_active) if not alive]
            if stopped and len(stopped) >= COMPACT_SHARE * len(slot_active):
                # Enough rows have stopped: keep what they computed, continue without them.
                if keep_cache:
                    self._harvest(batch, stopped, prompts, generated)
                keep = torch.tensor([slot for slot, alive in enumerate(slot_active) if alive], device=device)
                batch.select(keep)
                tokens = tokens[keep]
                slot_active = [True] * len(keep)
            # Stopped rows still in the batch are fed their last token masked out: it never enters a cache.
            batch.mask[:, batch.length] = torch.tensor(slot_active, dtype=torch.long, device=device)
            batch.length += 1
            positions = next_position[batch.rows][:, None]
            next_position[batch.rows] += 1
            logits = self._forward(tokens[:, None], batch.mask[:, : batch.length], positions, batch.cache)
            self.stats.decode_steps += 1
        if keep_cache:
            self._harvest(batch, range(len(batch.rows)), prompts, generated)
        return generated, logprobs

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        prompts = [p if isinstance(p, list) else list(p) for p in prompts]
        scanner, token_class = self._scanner(params.stop)
        self._check_weights()
        was_training = self.model.training
        self.model.eval()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices, enabled=params.seed is not None):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                generated, logprobs = self._decode(prompts, params, scanner, token_class)
        finally:
            self.model.train(was_training)
        outputs = []
        for tokens, row_logprobs in zip(generated, logprobs, strict=True):
            keep, finish = scanner.cut(tokens, params.max_new_tokens)
            token_ids = tokens[:keep]
            outputs.append(
                GenerationOutput(
                    token_ids=token_ids,
                    logprobs=row_logprobs[:keep],
                    text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                    finish_reason=finish,
                )
            )
        return outputs


def _common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, kept one short of the shortest prompt (a row must feed at
    least its last token to get next-token logits)."""
    shortest = min(len(p) for p in prompts) - 1
    first = prompts[0]
    length = 0
    while length < shortest and all(p[length] == first[length] for p in prompts):
        length += 1
    return length
