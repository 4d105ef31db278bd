"""The ``per-expert`` repair, proven against vLLM's own per-expert NVFP4 loading on the CPU, for
ModelOpt NVFP4 MoE models other than DeepSeek: Qwen3-MoE (the HF naming scheme, ``gate_proj`` /
``up_proj`` / ``down_proj``) and Mixtral (``block_sparse_moe``, ``w1`` / ``w3`` / ``w2``).

A complete tiny checkpoint of each (``hf_checkpoints``) whose gate and up ``weight_scale_2`` differ,
and its repaired form (``convert --target per-expert``), are loaded by stock vLLM: the model class
vLLM's registry gives, ``DefaultModelLoader``, the model's own ``load_weights`` and
``ModelOptNvFp4FusedMoE``'s per-expert ``weight_loader``, no plugin. The backends are vLLM's first
automatic choice for NVFP4 MoE on Blackwell (``flashinfer_trtllm``) and FlashInfer CUTLASS; both
build the same ``RoutedExperts`` parameters and keep only the gate's ``weight_scale_2`` after loading.
What is compared, and that one alpha, are in ``repair_proof``'s notes.
"""

from __future__ import annotations

import random

import checkpoints
import hf_checkpoints
import pytest
import repair_proof

DIMS = hf_checkpoints.Dims()
BACKENDS = ("flashinfer_trtllm", "flashinfer_cutlass")


@pytest.fixture(scope="module", params=sorted(hf_checkpoints.MODELS))
def pair(request, tmp_path_factory):
    """(model, source folder, repaired folder, the source's tensors) for one model."""
    from nvfp4_fuse.convert import ConvertOptions, convert

    model = request.param
    root = tmp_path_factory.mktemp(f"repair-proof-{model}")
    src = hf_checkpoints.write_source(root / "src", model, dims=DIMS, seed=random.randrange(2**31), unequal_scale_2=True)
    out = root / "repaired"
    convert(src, out, ConvertOptions(target="per-expert"))
    return model, src, out, checkpoints.read_all(src)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stock_vllm_scales_the_up_half_of_the_source_by_gate_over_up(pair, backend):
    model, src, _, tensors = pair
    loaded = repair_proof.loaded_experts(src, backend, DIMS.layers)
    worst = repair_proof.assert_up_half_off_by_gate_over_up(
        repair_proof.errors(tensors, hf_checkpoints.names(model), loaded, DIMS.experts, DIMS.inter)
    )
    print(f"\n{model} source on stock vLLM {backend}: worst up-half error {100 * worst:.2f}%")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stock_vllm_loads_the_repaired_checkpoint_within_half_an_e4m3_step(pair, backend):
    model, _, out, tensors = pair
    loaded = repair_proof.loaded_experts(out, backend, DIMS.layers)
    worst = repair_proof.assert_within_half_an_e4m3_step(
        repair_proof.errors(tensors, hf_checkpoints.names(model), loaded, DIMS.experts, DIMS.inter), loaded
    )
    print(f"\n{model} repaired on stock vLLM {backend}: worst error (normal scales) {100 * worst:.3f}% (bound 6.25%)")
