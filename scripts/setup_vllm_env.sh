#!/usr/bin/env bash
# Usage: scripts/setup_vllm_env.sh VERSION     (a vLLM release the plugin is tested on: 0.33.0, 0.34.0)
#
# Creates (or reuses) .venv-vllm-<major.minor>: vLLM VERSION importable on this CPU-only machine, with
# this package installed editable, for the tests in tests/vllm. One venv a version, kept apart from
# .venv so the main suite never depends on vLLM. scripts/test.sh builds one for every tested version.
#
# vLLM's wheel pins a CUDA torch and GPU-only packages (flashinfer, tilelang, cutlass-dsl, ...).
# Installing it with --no-deps, after the CPU build of torch, and then only the packages its import
# path needs, gives an interpreter in which vLLM's own Python code (DeepGemmMegaMoEExperts, the
# DeepSeek-V4 models and loaders, the plugin loader) imports and runs; the CUDA kernels do not.
# Reruns reuse a venv that already imports everything; pip's cache makes a rebuild quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VLLM_VERSION=${1:?usage: scripts/setup_vllm_env.sh VERSION (e.g. 0.34.0)}
MINOR=$(echo "$VLLM_VERSION" | cut -d. -f1,2)
VENV=.venv-vllm-$MINOR

# What each release's import path needs beyond the common list: its transformers range.
case "$MINOR" in
  0.33) TRANSFORMERS="transformers<5.21" ;;
  0.34) TRANSFORMERS="transformers>=5.16.1,<5.23" ;;
  *) echo "setup_vllm_env: no package list for vLLM $VLLM_VERSION (tested: 0.33.0, 0.34.0)" >&2; exit 2 ;;
esac

check() {
  VLLM_VERSION="$VLLM_VERSION" "$VENV/bin/python" - <<'PY' 2>/dev/null
import os
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
import warnings
warnings.simplefilter("ignore")
from importlib.metadata import version, entry_points
assert version("vllm") == os.environ["VLLM_VERSION"], version("vllm")
import pytest, safetensors, torch  # noqa: F401
import vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe  # noqa: F401
import vllm.models.deepseek_v4.nvidia.model  # noqa: F401
import compressed_tensors  # noqa: F401
import nvfp4_fuse.vllm  # noqa: F401
assert any(ep.name == "nvfp4_fuse" for ep in entry_points(group="vllm.general_plugins"))
PY
}

if [ -x "$VENV/bin/python" ] && check; then
  exit 0
fi

. scripts/venv_lib.sh
venv_with_cpu_torch
pipi --no-deps "vllm==$VLLM_VERSION"
# What vLLM's import path needs on the CPU: the research note's tested list, plus the
# compressed-tensors vLLM pins, which ModelConfig's quantization check imports.
pipi aiohttp blake3 cachetools cbor2 cloudpickle einops fastapi ijson llguidance msgspec openai \
  oss-harmony partial-json-parser pillow prometheus_client protobuf psutil py-cpuinfo pybase64 \
  pydantic python-json-logger pyyaml pyzmq regex sentencepiece setproctitle tiktoken \
  "$TRANSFORMERS" uvloop watchfiles xgrammar jsonschema "compressed-tensors==0.17.0"
# This package, editable and without resolving vLLM's pins, then its own dependencies and pytest.
pipi --no-deps -e .
pipi "safetensors>=0.8" "typer>=0.12" "rich>=13" "huggingface_hub>=2,<3" "numpy>=1.26" "pytest>=8"

check || {
  echo "setup_vllm_env: $VENV does not import vLLM $VLLM_VERSION and nvfp4_fuse.vllm; the check's output:" >&2
  "$VENV/bin/python" -c "import os; os.environ['VLLM_TARGET_DEVICE']='cpu'; import vllm.models.deepseek_v4.nvidia.model, nvfp4_fuse.vllm" >&2 || true
  exit 1
}
