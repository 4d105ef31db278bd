"""The fused ``nvfp4-fuse/v2`` contract is what vLLM 0.33's NVFP4 MegaMoE parameters hold.

``make_fused_checkpoint`` takes its tensors from vLLM's own ``weight_loader``; ``contract`` computes
them from the written contract (8-row gate/up interleave, little-endian words of four E4M3 bytes,
UTCCP row moves, MN-major storage). Equal bytes here mean the contract describes vLLM, and that
the function the loading tests get their fused checkpoints from writes exactly the contract.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import checkpoints
import contract

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
    block = {"layout": "nvfp4-fuse/v2", "target": "mega-moe"}
    s, f = (json.loads((d / "config.json").read_text()) for d in (src, fused))
    assert f["quantization_config"].pop("fused_experts") == block
    assert f == s
    s, f = (json.loads((d / "hf_quant_config.json").read_text()) for d in (src, fused))
    assert f.pop("fused_experts") == block and f == s
