#!/usr/bin/env bash
# Usage: scripts/setup_sglang_env.sh      (SGLang 0.5.23, the release inspect's SGLang rules were read in)
#
# Creates (or reuses) .venv-sglang: SGLang importable on this CPU-only machine far enough to run its
# own checkpoint-config detection (sglang.srt.configs.model_config) and DeepSeek-V4 weight-name
# mapping (sglang.srt.models.deepseek_v4), with this package installed editable, for tests/sglang.
#
# SGLang's wheel pins a CUDA torch and GPU-only packages (sglang-kernel, flashinfer, deep-gemm,
# tilelang, ...). Installing it with --no-deps after the CPU build of torch, then only the pure-Python
# packages its import path needs, is what the tests need; what cannot run here is stood in for in
# tests/sglang/conftest.py (which says what and why): torchvision (PyPI's Linux wheels are CUDA
# builds that do not load against the CPU torch) and the Blackwell check of the NVFP4 MoE method.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-sglang
SGLANG_VERSION=0.5.23

check() {
  "$VENV/bin/python" - <<'PY' 2>/dev/null
import warnings
warnings.simplefilter("ignore")
import sys
from importlib.metadata import version
assert version("sglang") == "0.5.23", version("sglang")
import pytest, safetensors, torch  # noqa: F401
import nvfp4_fuse  # noqa: F401
sys.path.insert(0, "tests/sglang")
import standins
standins.install()
import sglang.srt.configs.model_config  # noqa: F401
import sglang.srt.models.deepseek_v4  # noqa: F401
PY
}

if [ -x "$VENV/bin/python" ] && check; then
  exit 0
fi

. scripts/venv_lib.sh
venv_with_cpu_torch
pipi --no-deps "sglang==$SGLANG_VERSION" "compressed-tensors==0.18.0"
# What SGLang's import path to model_config and models/deepseek_v4 needs on the CPU.
pipi "transformers==5.19.0" "triton>=3.0" orjson psutil pybase64 requests aiohttp pydantic fastapi uvloop \
  msgspec pyzmq setproctitle numpy packaging tqdm einops xxhash zstandard pillow prometheus-client IPython \
  dill "apache-tvm-ffi==0.1.11" sentencepiece loguru gguf openai partial_json_parser uvicorn
pipi --no-deps -e .
pipi "safetensors>=0.8" "typer>=0.12" "rich>=13" "huggingface_hub>=1" "pytest>=8"

check || {
  echo "setup_sglang_env: $VENV does not import sglang $SGLANG_VERSION and nvfp4_fuse" >&2
  exit 1
}
