#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs the package with its
# test dependencies. torch is pinned to the 2.13.0 CPU build: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import torch, safetensors, triton, typer, rich, huggingface_hub, nvfp4_fuse.kernels" \
  || { echo "setup failed: a dependency is missing" >&2; exit 1; }
