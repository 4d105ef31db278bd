#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh), lints with ruff and runs the whole test suite on the CPU.
# Triton kernels run under TRITON_INTERPRET=1 in their tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
ruff check .
exec python -m pytest -q -p no:cacheprovider "$@"
