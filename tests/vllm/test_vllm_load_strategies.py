"""``--safetensors-load-strategy``: what vLLM's ``DefaultModelLoader`` does with each strategy on
DeepSeek-V4 checkpoints, stock and with the plugin."""

from __future__ import annotations

import random

import checkpoints
import harness
import pytest
import torch
from test_vllm_loading import assert_same_state


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("strategies")
    src = {"nvidia": checkpoints.write_source(root / "nvidia", "nvidia", seed=random.randrange(2**31))}
    src["fused"] = checkpoints.make_fused_checkpoint(src["nvidia"], root / "fused")
    return src


def config(folder, strategy, **kw):
    cfg = harness.engine_config(folder, **kw)
    cfg.load_config.safetensors_load_strategy = strategy
    return cfg


def loaded(folder, strategy, *, ep_size=1, ep_rank=0):
    cfg = config(folder, strategy)
    model = harness.build(cfg, ep_size=ep_size, ep_rank=ep_rank)
    harness.load(model, cfg)
    return harness.experts_state(model)


def test_eager_fails_in_stock_vllm_on_e8m0_and_the_plugin_refuses_it_in_one_line(plugin, sources):
    """Every DeepSeek-V4 checkpoint has F8_E8M0 block scales (the FP8 linears'); safetensors 0.8's
    Python load(), which eager calls on each whole file, has no such type."""
    from nvfp4_fuse.vllm.deepseek_v4 import eager_load_reads_e8m0

    assert not eager_load_reads_e8m0()
    for ckpt in ("nvidia", "fused"):
        cfg = config(sources[ckpt], "eager")
        stock = harness.build(cfg, harness.STOCK)
        with pytest.raises(KeyError, match="F8_E8M0"):
            harness.load(stock, cfg)
        with pytest.raises(ValueError) as exc:
            harness.build(cfg)
        msg = str(exc.value)
        assert msg.startswith("nvfp4-fuse: --safetensors-load-strategy eager") and "\n" not in msg
        assert "F8_E8M0" in msg and "lazy" in msg and "prefetch" in msg


def test_eager_is_not_refused_once_safetensors_reads_e8m0(plugin, sources, monkeypatch):
    """The refusal follows safetensors, not a version number: a load() that knows F8_E8M0 is let
    through (and then loads as lazy does)."""
    import safetensors.torch as st

    from nvfp4_fuse.vllm import deepseek_v4

    monkeypatch.setitem(st._TYPES, "F8_E8M0", torch.float8_e8m0fnu)
    deepseek_v4.eager_load_reads_e8m0.cache_clear()
    try:
        assert deepseek_v4.eager_load_reads_e8m0()
        assert_same_state(loaded(sources["fused"], "eager"), loaded(sources["fused"], "lazy"), "eager vs lazy")
    finally:
        monkeypatch.undo()
        deepseek_v4.eager_load_reads_e8m0.cache_clear()


@pytest.mark.parametrize("strategy", ["lazy", "prefetch"])
@pytest.mark.parametrize(("ep_size", "rank"), [(1, 0), (2, 1)])
def test_lazy_and_prefetch_load_per_expert_and_fused_to_the_default_bytes(plugin, sources, strategy, ep_size, rank):
    default = loaded(sources["nvidia"], None, ep_size=ep_size, ep_rank=rank)
    for ckpt in ("nvidia", "fused"):
        got = loaded(sources[ckpt], strategy, ep_size=ep_size, ep_rank=rank)
        assert_same_state(default, got, f"{ckpt} {strategy} EP {ep_size} rank {rank}")
