"""DeepSeek-V4.1 (``DeepseekV41ForCausalLM``, vLLM's vision-language wrapper of the V4.1 text model)
on ``deep_gemm_mega_moe``: stock vLLM has V4's failure, and the plugin serves per-expert and fused
NVFP4 V4.1 checkpoints as it serves V4's."""

from __future__ import annotations

import checkpoints
import contract
import harness
import pytest
from test_vllm_expert_format import assert_mxfp4, assert_nvfp4
from test_vllm_loading import LAYERS, E, assert_holds_logical_experts, assert_same_state


@pytest.fixture(scope="module")
def seed_m():
    import random

    return random.randrange(2**31)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, seed_m):
    root = tmp_path_factory.mktemp("v41")
    src = {"nvidia": checkpoints.write_source(root / "nvidia", "nvidia", dims=checkpoints.V41_DIMS, seed=seed_m, v41=True)}
    src["fused"] = checkpoints.make_fused_checkpoint(src["nvidia"], root / "fused")
    content = checkpoints.source_content(checkpoints.V41_DIMS, seed_m)
    expected = {n: contract.expected_fused(content, n, E) for n in range(LAYERS)}
    return src, expected


def loaded(folder, *, ep_size=1, ep_rank=0, redundant=0):
    cfg = harness.engine_config(folder, redundant=redundant)
    model = harness.build(cfg, ep_size=ep_size, ep_rank=ep_rank)
    harness.load(model, cfg)
    return model


def test_the_registry_gives_the_plugins_v41_class(plugin, sources):
    from nvfp4_fuse.vllm.deepseek_v41 import DeepseekV41ForCausalLM

    src, _ = sources
    cfg = harness.engine_config(src["nvidia"])
    assert harness.model_class(cfg) is DeepseekV41ForCausalLM
    assert issubclass(DeepseekV41ForCausalLM, harness.STOCK_V41)


@pytest.mark.parametrize("ckpt", ["nvidia", "fused"])
def test_stock_v41_builds_mxfp4_and_fails_and_the_plugin_loads(plugin, sources, ckpt, seed_m):
    src, expected = sources
    cfg = harness.engine_config(src[ckpt])
    stock = harness.build(cfg, harness.STOCK_V41)
    for layer in harness.backbone(stock).layers:
        assert_mxfp4(layer.ffn.experts)
    if ckpt == "nvidia":
        with pytest.raises(KeyError, match=r"layers\.0\.ffn\.experts\.w13_input_scale"):
            harness.load(stock, cfg)
    elif harness.STOCK_V41_FUSED_ERROR[harness.VLLM_MINOR] is not None:
        with pytest.raises(harness.STOCK_V41_FUSED_ERROR[harness.VLLM_MINOR]):
            harness.load(stock, cfg)
    else:
        # The loader skips every fused tensor without a word: the load "succeeds" and the routed
        # experts hold none of the checkpoint's bytes.
        harness.load(stock, cfg)
        got = harness.backbone(stock).layers[0].ffn.experts.w13_weight.data.numpy()
        assert got.shape == expected[0]["w13_weight"].shape and not (got == expected[0]["w13_weight"]).all()
    model = loaded(src[ckpt])
    for layer in harness.backbone(model).layers:
        assert_nvfp4(layer.ffn.experts)
    assert_holds_logical_experts(model, expected, seed_m)


@pytest.mark.parametrize(("ep_size", "redundant"), [(2, 0), (4, 4), (3, 1)])
def test_v41_fused_and_per_expert_load_the_same_bytes_on_every_rank(plugin, sources, ep_size, redundant, seed_m):
    src, expected = sources
    for rank in range(ep_size):
        per_expert = loaded(src["nvidia"], ep_size=ep_size, ep_rank=rank, redundant=redundant)
        fused = loaded(src["fused"], ep_size=ep_size, ep_rank=rank, redundant=redundant)
        assert_same_state(
            harness.experts_state(per_expert), harness.experts_state(fused), f"V4.1 EP {ep_size} rank {rank} +{redundant}"
        )
        assert_holds_logical_experts(fused, expected, seed_m)


@pytest.mark.parametrize("ckpt", ["nvidia", "fused"])
def test_v41_post_load_hooks_run_once_as_this_vllm_release_runs_them(plugin, sources, ckpt):
    """V4.1's text model finalizes (``finalize_mhc_broadcast_weights``) once: on 0.33 inside its
    ``load_weights`` (the wrapper's own hook then sees ``_weights_finalized`` and does nothing), on
    0.34 from ``finalize_model_weights`` after the load; the plugin's wrapper changes neither."""
    from unittest import mock

    import torch
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    from nvfp4_fuse.vllm import vllm_version
    from nvfp4_fuse.vllm.versions import release_for

    src, _ = sources
    cfg = harness.engine_config(src[ckpt])
    model = harness.build(cfg)
    layer = harness.backbone(model).layers[0]
    layer.hc_attn_fn.data.normal_()
    events: list[str] = []
    mhc = harness.dsv41.DeepseekV4Model.finalize_mhc_broadcast_weights
    with mock.patch.object(harness.dsv41.DeepseekV4Model, "finalize_mhc_broadcast_weights",
                           lambda self: events.append("mhc") or mhc(self)):
        harness.load(model, cfg)
        events.append("loaded")
        with set_current_vllm_config(cfg):
            process_weights_after_loading(model, cfg.model_config, torch.device("cpu"))
    assert events == (["mhc", "loaded"] if release_for(vllm_version()).finalizes_during_load else ["loaded", "mhc"])
    want = layer.hc_attn_fn.detach().view(-1, layer.hc_mult, layer.hidden_size).sum(dim=1)
    assert torch.equal(layer.hc_attn_fn_broadcast, want)
