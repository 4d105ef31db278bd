#!/usr/bin/env bash
# Sets up .venv (scripts/setup_env.sh), lints with ruff and runs the whole test suite on the CPU.
# Triton kernels run under TRITON_INTERPRET=1 in their tests. Extra arguments go to pytest.
# Then the vLLM plugin's tests (tests/vllm, skipped by the run above) once per vLLM release in
# VLLM_RELEASES, each in its own .venv-vllm-<minor> against that release's own code
# (scripts/setup_vllm_env.sh), with the time each run took. Then SGLang's tests (tests/sglang) in
# .venv-sglang (scripts/setup_sglang_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

# The vLLM releases the plugin is tested on (nvfp4_fuse/vllm/versions.py says what differs between them).
VLLM_RELEASES=(0.33.0 0.34.0)

bash scripts/setup_env.sh
# the real exporters (nvidia-modelopt, llm-compressor) tests/test_real_exports.py runs
bash scripts/make_real_exports.sh --setup
. .venv/bin/activate
ruff check .
python -m pytest -q -p no:cacheprovider "$@"
deactivate
for release in "${VLLM_RELEASES[@]}"; do
  minor=$(echo "$release" | cut -d. -f1,2)
  bash scripts/setup_vllm_env.sh "$release"
  start=$SECONDS
  ".venv-vllm-$minor/bin/python" -m pytest -q -p no:cacheprovider tests/vllm
  echo "tests/vllm on vLLM $release: $((SECONDS - start)) s"
done
bash scripts/setup_sglang_env.sh
start=$SECONDS
.venv-sglang/bin/python -m pytest -q -p no:cacheprovider tests/sglang
echo "tests/sglang on SGLang 0.5.23: $((SECONDS - start)) s"
