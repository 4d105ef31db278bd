"""What ``nvfp4-fuse convert`` writes for ``mega-moe`` is what vLLM 0.33's NVFP4 MegaMoE parameters hold.

``make_fused_checkpoint`` is the converter; ``fused_by_vllm_loader`` loads the per-expert source
through vLLM's own ``DeepGemmMegaMoEExperts.weight_loader`` (``_load_weight``, ``_pack_scale``,
``_kernel_layout_shard``) and takes the parameters' storage; ``contract`` computes the tensors from the
written contract (8-row gate/up interleave, little-endian words of four E4M3 bytes, UTCCP row
moves, MN-major storage). Equal bytes mean the converter, vLLM and the contract agree.
"""

from __future__ import annotations

import json
import random

import checkpoints
import contract
import numpy as np
import pytest
import torch

E, LAYERS = 8, 2


@pytest.mark.parametrize("recipe", ["nvidia", "canada"])
def test_fused_checkpoint_holds_the_contract(tmp_path, recipe):
    seed = random.randrange(2**31)
    src = checkpoints.write_source(tmp_path / "src", recipe, seed=seed)
    fused = checkpoints.make_fused_checkpoint(src, tmp_path / "fused")
    got = checkpoints.read_all(fused)
    content = checkpoints.source_content(checkpoints.Dims(), seed)
    dtypes = {"weight": np.int8, "weight_scale": np.int32}
    for n in range(LAYERS):
        want = contract.expected_fused(content, n, E)
        for field, w in want.items():
            t = got.pop(f"layers.{n}.ffn.experts.{field}")
            assert t.numpy().dtype == dtypes.get(field.split("_", 1)[1], np.float32), field
            assert t.shape == w.shape, (field, t.shape, w.shape)
            assert np.array_equal(t.numpy().view(np.uint8), w.view(np.uint8)), f"seed {seed}: layer {n} {field}"
    # Everything else (shared experts, router, the MXFP4 MTP experts) is copied as it is.
    source = checkpoints.read_all(src)
    assert got.keys() == {k for k in source if not k.startswith("layers.") or ".ffn.experts." not in k}
    for k, t in got.items():
        a, b = t.reshape(-1).view(torch.uint8), source[k].reshape(-1).view(torch.uint8)
        assert t.dtype == source[k].dtype and t.shape == source[k].shape and a.equal(b), k


def test_fused_configs_keep_the_source_keys(tmp_path):
    src = checkpoints.write_source(tmp_path / "src", "nvidia", seed=random.randrange(2**31))
    fused = checkpoints.make_fused_checkpoint(src, tmp_path / "fused")
    s, f = (json.loads((d / "config.json").read_text()) for d in (src, fused))
    block = f["quantization_config"].pop("fused_experts")
    assert (block["layout"], block["target"]) == ("nvfp4-fuse/v2", "mega-moe")
    assert f == s
    s, f = (json.loads((d / "hf_quant_config.json").read_text()) for d in (src, fused))
    assert f.pop("fused_experts") == block and f == s


@pytest.mark.parametrize("recipe,unequal", [("nvidia", False), ("canada", False), ("nvidia", True), ("canada", True)])
def test_converter_output_equals_what_vllms_weight_loader_makes(tmp_path, recipe, unequal):
    """The acceptance test of the mega-moe target: every fused tensor equals, byte for byte, what
    vLLM's own weight_loader puts in its parameters from the per-expert source (with unequal w1/w3
    weight_scale_2, which vLLM refuses, rescaled to their max first)."""
    seed = random.randrange(2**31)
    src = checkpoints.write_source(tmp_path / "src", recipe, seed=seed, unequal_scale_2=unequal)
    ours = checkpoints.read_all(checkpoints.make_fused_checkpoint(src, tmp_path / "fused"))
    theirs = checkpoints.fused_by_vllm_loader(src, rescale=unequal)
    fused = [k for k in theirs if ".ffn.experts.w13_" in k or ".ffn.experts.w2_" in k]
    assert len(fused) == LAYERS * 8 and ours.keys() == theirs.keys()
    for k in fused:
        assert ours[k].shape == theirs[k].shape, (k, ours[k].shape, theirs[k].shape)
        if not k.endswith("w13_input_scale"):  # not a vLLM parameter
            assert ours[k].dtype == theirs[k].dtype, (k, ours[k].dtype, theirs[k].dtype)
        a = ours[k].contiguous().reshape(-1).view(torch.uint8)
        b = theirs[k].contiguous().reshape(-1).view(torch.uint8)
        assert a.equal(b), f"seed {seed}: {k}"
    if unequal:  # the rescale was exercised
        s2 = theirs["layers.0.ffn.experts.w13_weight_scale_2"]
        assert bool((s2 > 0).all())
