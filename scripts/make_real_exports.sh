#!/usr/bin/env bash
# Usage: scripts/make_real_exports.sh OUT_DIR [--seed N] [--only KIND]
#        scripts/make_real_exports.sh --setup   (only create .venv-exporters; scripts/test.sh does this)
#
# Real NVFP4 exports of a tiny Qwen3-MoE, made by NVIDIA ModelOpt and by llm-compressor
# (compressed-tensors) on this CPU: see scripts/make_real_exports.py for what each is. The exporters
# live in their own venv, .venv-exporters (created here on first use: the CPU torch, then
# nvidia-modelopt and llmcompressor from PyPI with torch held at that build), kept apart from .venv so
# the package never depends on them. tests/test_real_exports.py runs this when .venv-exporters exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-exporters
MODELOPT_VERSION=0.47.0
LLMCOMPRESSOR_VERSION=0.14.0.1

if ! "$VENV/bin/python" -c "import modelopt.torch.quantization, llmcompressor, torch" 2>/dev/null; then
  . scripts/venv_lib.sh
  venv_with_cpu_torch
  pin=$(mktemp)
  echo "torch==2.13.0" > "$pin"
  pipi -c "$pin" "nvidia-modelopt==$MODELOPT_VERSION" "llmcompressor==$LLMCOMPRESSOR_VERSION"
  rm -f "$pin"
fi
[ "${1:-}" = "--setup" ] && exit 0
exec "$VENV/bin/python" scripts/make_real_exports.py "$@"
