"""The ``per-expert`` repair, proven against SGLang 0.5.23's own per-expert NVFP4 loading on the CPU,
for DeepSeek-V4.

The tiny DeepSeek-V4 checkpoints of ``tests/vllm/checkpoints.py`` (NVIDIA's and canada-quant's
recipes, w3's ``weight_scale_2`` 0.5-1.5x w1's) and their ``--target per-expert`` repairs go through
SGLang's own detection, quant method, name mapping and ``FusedMoE.weight_loader``
(``sglang_code.load_experts``); the loaded experts are dequantized with the alpha SGLang's
single-alpha NVFP4 backends take (``_compute_gemm1_alphas``: the gate's) and compared with the
source's true values (``tests/repair_check.py``). NVIDIA's source, which SGLang takes as NVFP4,
loads with its up half off by gate/up; both repairs load within half an E4M3 step. (canada-quant's
source is not taken as NVFP4 at all: ``test_sglang_dsv4_detection.py``.)
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import repair_check
import sglang_code

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vllm"))  # the tiny DeepSeek-V4 writer
import checkpoints  # noqa: E402

DIMS = checkpoints.Dims()
W = {"gate": "w1", "up": "w3", "down": "w2"}


def names(recipe: str) -> repair_check.ExpertNames:
    return repair_check.ExpertNames(
        linear=lambda n, x, role: f"layers.{n}.ffn.experts.{x}.{W[role]}",
        block_scale="weight_scale" if recipe == "nvidia" else "scale",
    )


@pytest.fixture(scope="module", params=["nvidia", "canada"])
def pair(request, tmp_path_factory):
    from nvfp4_fuse.convert import ConvertOptions, convert

    recipe = request.param
    root = tmp_path_factory.mktemp(f"sglang-proof-{recipe}")
    src = checkpoints.write_source(root / "src", recipe, dims=DIMS, seed=random.randrange(2**31), unequal_scale_2=True)
    sglang_code.with_sglang_fields(src)
    out = root / "repaired"
    convert(src, out, ConvertOptions(target="per-expert"))
    return recipe, src, out, checkpoints.read_all(src)


def test_sglang_scales_the_up_half_of_nvidias_source_by_gate_over_up(pair):
    recipe, src, _, tensors = pair
    if recipe != "nvidia":
        pytest.skip("canada-quant's source is not taken as NVFP4 (test_sglang_dsv4_detection.py)")
    loaded = sglang_code.load_experts(src, tensors)
    errs = repair_check.errors(tensors, names(recipe), loaded, DIMS.experts, DIMS.inter, alpha=sglang_code.gemm1_alpha)
    worst = repair_check.assert_up_half_off_by_gate_over_up(errs)
    print(f"\n{recipe} source on SGLang 0.5.23: worst up-half error {100 * worst:.2f}%")


def test_sglang_loads_the_repaired_checkpoint_within_half_an_e4m3_step(pair):
    recipe, _, out, tensors = pair
    loaded = sglang_code.load_experts(out, checkpoints.read_all(out))
    errs = repair_check.errors(tensors, names(recipe), loaded, DIMS.experts, DIMS.inter, alpha=sglang_code.gemm1_alpha)
    worst = repair_check.assert_within_half_an_e4m3_step(errs, loaded)
    print(f"\n{recipe} repaired on SGLang 0.5.23: worst error (normal scales) {100 * worst:.3f}% (bound 6.25%)")
