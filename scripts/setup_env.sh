#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs the package with its
# test dependencies. torch is pinned to the 2.13.0 CPU build: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
. scripts/venv_lib.sh
venv_with_cpu_torch
pipi -e ".[test]"
"$VENV/bin/python" -c "import torch, safetensors, triton, typer, rich, huggingface_hub, nvfp4_fuse.kernels" \
  || { echo "setup failed: a dependency is missing" >&2; exit 1; }
