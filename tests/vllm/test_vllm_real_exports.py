"""The ``per-expert`` repair of a real older-style ModelOpt export, proven on stock vLLM's loading.

``scripts/make_real_exports.py`` (run in ``.venv-exporters``) exports a tiny Qwen3-MoE with NVIDIA
ModelOpt as exports before 0.43 did: gate and up each with their own ``weight_scale_2``, from
calibration. That export and its ``--target per-expert`` repair are loaded by stock vLLM
(``Qwen3MoeForCausalLM``, ``ModelOptNvFp4FusedMoE``) and compared as in ``repair_proof``; the
current-style export (gate/up already equal) is loaded too, and comes out exact. Skipped when
``.venv-exporters`` does not exist (``bash scripts/make_real_exports.sh OUT`` creates it).
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import checkpoints
import hf_checkpoints
import pytest
import repair_proof

ROOT = Path(__file__).resolve().parents[2]
EXPORTERS = ROOT / ".venv-exporters" / "bin" / "python"
LAYERS, EXPERTS, INTER = 2, 8, 512
BACKEND = "flashinfer_cutlass"
NAMES = hf_checkpoints.names("qwen3_moe")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    if not EXPORTERS.exists():
        pytest.skip("no .venv-exporters: run `bash scripts/make_real_exports.sh OUT` once to create it")
    from nvfp4_fuse.convert import ConvertOptions, convert

    out = tmp_path_factory.mktemp("real-exports")
    seed = str(random.randrange(2**31))
    for kind in ("modelopt", "modelopt-unsynced"):
        subprocess.run(
            [str(EXPORTERS), str(ROOT / "scripts" / "make_real_exports.py"), str(out), "--only", kind, "--seed", seed],
            check=True, capture_output=True, cwd=ROOT,
        )
    convert(out / "modelopt-unsynced", out / "repaired", ConvertOptions(target="per-expert"))
    return out


def _tensors(folder: Path):
    from safetensors.torch import load_file

    if (folder / "model.safetensors.index.json").exists():
        return checkpoints.read_all(folder)
    return load_file(folder / "model.safetensors")


def test_stock_vllm_scales_the_up_half_of_the_older_style_export_by_gate_over_up(exports):
    src = exports / "modelopt-unsynced"
    loaded = repair_proof.loaded_experts(src, BACKEND, LAYERS)
    errs = repair_proof.errors(_tensors(src), NAMES, loaded, EXPERTS, INTER)
    worst = repair_proof.assert_up_half_off_by_gate_over_up(errs, least=0.0)
    print(f"\nModelOpt older-style export on stock vLLM {BACKEND}: worst up-half error {100 * worst:.2f}%")


def test_stock_vllm_loads_its_repair_within_half_an_e4m3_step(exports):
    loaded = repair_proof.loaded_experts(exports / "repaired", BACKEND, LAYERS)
    errs = repair_proof.errors(_tensors(exports / "modelopt-unsynced"), NAMES, loaded, EXPERTS, INTER)
    worst = repair_proof.assert_within_half_an_e4m3_step(errs, loaded)
    print(f"\nits repair on stock vLLM {BACKEND}: worst error (normal scales) {100 * worst:.3f}% (bound 6.25%)")


def test_stock_vllm_loads_the_current_export_exactly(exports):
    src = exports / "modelopt"
    loaded = repair_proof.loaded_experts(src, BACKEND, LAYERS)
    for key, e in repair_proof.errors(_tensors(src), NAMES, loaded, EXPERTS, INTER).items():
        assert e.scale_2["gate"] == e.scale_2["up"], key
        assert float(e.gate.max()) == 0.0 and float(e.up.max()) == 0.0 and e.w2_exact, key
