#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh), lints with ruff and runs the whole test suite on the CPU.
# Triton kernels run under TRITON_INTERPRET=1 in their tests. Extra arguments go to pytest.
# Then the vLLM plugin's tests (tests/vllm, skipped by the run above) in .venv-vllm-0.33, against
# vLLM 0.33.0's own code (scripts/setup_vllm_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
ruff check .
python -m pytest -q -p no:cacheprovider "$@"
deactivate
bash scripts/setup_vllm_env.sh 0.33.0
exec .venv-vllm-0.33/bin/python -m pytest -q -p no:cacheprovider tests/vllm
