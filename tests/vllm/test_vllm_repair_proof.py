"""The ``per-expert`` repair, proven against vLLM's own per-expert NVFP4 loading on the CPU, for
DeepSeek-V4.

A per-expert NVFP4 DeepSeek-V4 checkpoint whose gate (w1) and up (w3) ``weight_scale_2`` differ, and
its repaired form (``convert --target per-expert``), are each loaded by stock vLLM
(``ModelOptNvFp4FusedMoE``'s weight loading) on ``flashinfer_cutedsl`` (vLLM's recommended backend for
NVFP4 DeepSeek-V4) and on the MoE-EP megakernel ``flashinfer_moe_ep_cutedsl``; both build the same
``RoutedExperts`` parameters through the same ``weight_loader``. The model class is vLLM's NVIDIA
DeepSeek-V4 as the plugin registers it (the ``plugin`` fixture; on the CPU platform vLLM's registry
would give a class that needs CUDA to build); for a per-expert checkpoint on these backends the plugin
changes nothing, every expert tensor goes through vLLM's own ``weight_loader``. What is compared, and
the epilogue's one alpha, are in ``repair_proof``'s notes.
"""

from __future__ import annotations

import checkpoints
import harness
import pytest
import repair_proof

DIMS = checkpoints.Dims()
W = {"gate": "w1", "up": "w3", "down": "w2"}


def names(recipe: str) -> repair_proof.ExpertNames:
    """Where a DeepSeek-V4 checkpoint of ``recipe`` keeps its routed experts (canada-quant's block
    scales are under ``.scale``)."""
    return repair_proof.ExpertNames(
        linear=lambda n, x, role: f"layers.{n}.ffn.experts.{x}.{W[role]}",
        block_scale="weight_scale" if recipe == "nvidia" else "scale",
    )


@pytest.fixture(scope="module")
def seed_m():
    import random

    return random.randrange(2**31)


@pytest.fixture(scope="module", params=["nvidia", "canada"])
def pair(request, tmp_path_factory, seed_m):
    """(recipe, source folder, repaired folder, the source's tensors) for one recipe."""
    from nvfp4_fuse.convert import ConvertOptions, convert

    recipe = request.param
    root = tmp_path_factory.mktemp(f"repair-proof-{recipe}")
    src = checkpoints.write_source(root / "src", recipe, dims=DIMS, seed=seed_m, unequal_scale_2=True)
    out = root / "repaired"
    convert(src, out, ConvertOptions(target="per-expert"))
    return recipe, src, out, checkpoints.read_all(src)


@pytest.mark.parametrize("backend", harness.PER_EXPERT_BACKENDS)
def test_stock_vllm_scales_the_up_half_of_the_source_by_gate_over_up(plugin, pair, backend):
    recipe, src, _, tensors = pair
    loaded = repair_proof.loaded_experts(src, backend, DIMS.layers)
    worst = repair_proof.assert_up_half_off_by_gate_over_up(
        repair_proof.errors(tensors, names(recipe), loaded, DIMS.experts, DIMS.inter)
    )
    print(f"\n{recipe} source on stock vLLM {backend}: worst up-half error {100 * worst:.2f}%")


@pytest.mark.parametrize("backend", harness.PER_EXPERT_BACKENDS)
def test_stock_vllm_loads_the_repaired_checkpoint_within_half_an_e4m3_step(plugin, pair, backend):
    recipe, _, out, tensors = pair
    loaded = repair_proof.loaded_experts(out, backend, DIMS.layers)
    worst = repair_proof.assert_within_half_an_e4m3_step(
        repair_proof.errors(tensors, names(recipe), loaded, DIMS.experts, DIMS.inter), loaded
    )
    print(f"\n{recipe} repaired on stock vLLM {backend}: worst error (normal scales) {100 * worst:.3f}% (bound 6.25%)")
