"""Which MegaMoE format vLLM builds DeepSeek-V4's experts with, stock and with the plugin; which
fused checkpoints the plugin refuses."""

from __future__ import annotations

import json
import random

import checkpoints
import harness
import pytest

H, I, E = 512, 512, 8


def assert_mxfp4(experts):
    assert experts.weight_format.name == "mxfp4"
    assert tuple(experts.w13_weight_scale.shape) == (E, 2 * I, H // 128)  # one E8M0 per 32, 4 per word
    assert not hasattr(experts, "w13_weight_scale_2") and not hasattr(experts, "w2_input_scale")


def assert_nvfp4(experts, local=E):
    assert experts.weight_format.name == "nvfp4"
    shapes = {n: tuple(p.shape) for n, p in experts.named_parameters() if not n.startswith("shared_")}
    assert shapes == {
        "w13_weight": (local, 2 * I, H // 2),
        "w13_weight_scale": (local, 2 * I, H // 64),  # one E4M3 per 16, 4 per word
        "w2_weight": (local, H, I // 2),
        "w2_weight_scale": (local, H, I // 64),
        "w13_weight_scale_2": (local,),
        "w2_weight_scale_2": (local,),
        "w2_input_scale": (local,),
    }
    # MN-major block scales: the parameter is a transposed view of [E, K/64, N] storage.
    assert experts.w13_weight_scale.transpose(-1, -2).is_contiguous()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmt")
    seed = random.randrange(2**31)
    src = {r: checkpoints.write_source(root / r, r, seed=seed) for r in ("nvidia", "canada")}
    src["fused"] = checkpoints.make_fused_checkpoint(src["nvidia"], root / "fused")
    return src


@pytest.mark.parametrize("recipe", ["nvidia", "canada", "fused"])
def test_stock_builds_mxfp4_and_the_plugin_nvfp4(plugin, sources, recipe):
    cfg = harness.engine_config(sources[recipe])
    stock = harness.build(cfg, harness.STOCK)
    for layer in stock.model.layers:
        assert_mxfp4(layer.ffn.experts)
    model = harness.build(cfg)  # the registry's class: the plugin's
    for layer in model.model.layers:
        assert_nvfp4(layer.ffn.experts)
        # vLLM's own choices are kept: the shared expert is fused into the launch.
        assert layer.ffn.experts.has_fused_shared_experts and layer.ffn.shared_experts is None


def test_layers_the_manifest_does_not_list_keep_vllms_format(plugin, sources, tmp_path):
    """An NVIDIA manifest that lists only layer 1's experts as NVFP4 (layer 0 left in its source
    format) gets NVFP4 on layer 1 only."""
    src = tmp_path / "partial"
    src.mkdir()
    for f in sources["nvidia"].iterdir():
        (src / f.name).symlink_to(f)
    (src / "config.json").unlink()
    cfg = json.loads((sources["nvidia"] / "config.json").read_text())
    del cfg["quantization_config"]["quantized_layers"]["layers.0.ffn.experts"]
    (src / "config.json").write_text(json.dumps(cfg))
    model = harness.build(harness.engine_config(src))
    assert_mxfp4(model.model.layers[0].ffn.experts)
    assert_nvfp4(model.model.layers[1].ffn.experts)


@pytest.mark.parametrize(("ep_size", "redundant"), [(2, 0), (4, 4)])
def test_ep_ranks_get_their_share_in_nvfp4(plugin, sources, ep_size, redundant):
    cfg = harness.engine_config(sources["canada"], redundant=redundant)
    local = (E + redundant) // ep_size
    for rank in range(ep_size):
        experts = harness.build(cfg, ep_size=ep_size, ep_rank=rank).model.layers[0].ffn.experts
        assert_nvfp4(experts, local)
        assert (experts.experts_start_idx, experts.num_experts, experts.num_logical_experts) == (rank * local, E + redundant, E)


def test_mtp_draft_keeps_mxfp4_experts_and_loads(plugin, sources):
    """The MTP layer (``mtp.0``, MXFP4 in both recipes) is vLLM's DeepSeekV4MTP, built after the
    target in the same process: its experts stay MXFP4 and load from the checkpoint."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.models.deepseek_v4.nvidia.mtp import DeepSeekV4MTP

    for recipe in ("canada", "fused"):
        cfg = harness.engine_config(sources[recipe], mtp=True)
        target = harness.build(cfg)
        assert_nvfp4(target.model.layers[0].ffn.experts)
        draft_cfg = cfg.speculative_config.draft_model_config
        with harness.cpu_stand_ins():
            draft = initialize_model(vllm_config=cfg, model_config=draft_cfg, model_class=DeepSeekV4MTP)
        experts = draft.model.layers["2"].mtp_block.ffn.experts
        assert_mxfp4(experts)
        with set_current_vllm_config(cfg):
            DefaultModelLoader(cfg.load_config).load_weights(draft, draft_cfg)
        src = checkpoints.read_all(sources[recipe])
        w1 = src["mtp.0.ffn.experts.5.w1.weight"]
        assert experts.w13_weight[5].view(-1, 2, 8, H // 2)[:, 0].reshape(I, H // 2).equal(w1)


def _with_fused_block(sources, tmp_path, block):
    src = tmp_path / "ckpt"
    src.mkdir()
    for f in sources["fused"].iterdir():
        if f.name != "config.json":
            (src / f.name).symlink_to(f)
    cfg = json.loads((sources["fused"] / "config.json").read_text())
    cfg["quantization_config"]["fused_experts"] = block
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize(
    ("block", "says"),
    [
        ({"layout": "nvfp4-fuse/v9", "target": "mega-moe"}, "layout 'nvfp4-fuse/v9'"),
        ({"layout": "nvfp4-fuse/v1", "target": "mega-moe"}, "layout 'nvfp4-fuse/v1'"),
        ({"target": "mega-moe"}, "layout None"),
        ({"layout": "nvfp4-fuse/v2", "target": "tensorrt"}, "target 'tensorrt'"),
        ({"layout": "nvfp4-fuse/v2", "target": "vllm-fused"}, "needs quantization_config.fused_experts.w13_rows"),
        ({"layout": "nvfp4-fuse/v2", "target": "vllm-fused", "w13_rows": "gate-up", "scale_layout": "mega-moe"},
         "scale_layout is 'mega-moe'"),
        ({"layout": "nvfp4-fuse/v2", "target": "mega-moe", "w13_rows": "gate-up"}, "w13_rows is 'gate-up'"),
    ],
)
def test_unknown_fused_layout_is_refused(plugin, sources, tmp_path, block, says):
    from nvfp4_fuse.vllm.checkpoint import FusedLayoutError

    cfg = harness.engine_config(_with_fused_block(sources, tmp_path, block))
    with pytest.raises(FusedLayoutError) as exc:
        harness.build(cfg)
    msg = str(exc.value)
    assert msg.startswith("nvfp4-fuse: ") and says in msg and "\n" not in msg


def test_nvfp4_mtp_experts_are_refused_clearly(plugin, sources, tmp_path):
    """NVIDIA's recipe with --include_mtp_experts lists mtp.0.ffn.experts as NVFP4; vLLM's MTP draft
    would build them MXFP4 and fail on a tensor name, so the target refuses up front."""
    src = tmp_path / "mtp-nvfp4"
    src.mkdir()
    for f in sources["nvidia"].iterdir():
        if f.name != "config.json":
            (src / f.name).symlink_to(f)
    cfg = json.loads((sources["nvidia"] / "config.json").read_text())
    qc = cfg["quantization_config"]
    qc["quantized_layers"]["mtp.0.ffn.experts"] = {"quant_algo": "NVFP4", "group_size": 16}
    qc["ignore"] = qc["exclude_modules"] = ["*.attn.*", "*.ffn.shared_experts.*", "head"]
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match=r"MTP experts \(mtp\.0\.ffn\.experts\) as NVFP4"):
        harness.build(harness.engine_config(src, mtp=True))
    # Without speculative decoding the same checkpoint serves.
    model = harness.build(harness.engine_config(src))
    assert_nvfp4(model.model.layers[0].ffn.experts)


def test_a_layer_in_ignore_alone_keeps_vllms_format(plugin, sources, tmp_path):
    """A config with no ``quantized_layers`` (canada-style) whose ``ignore`` names layer 1's experts:
    the pattern, matched against the module name, keeps that layer as vLLM builds it (MXFP4), and
    the MTP draft's experts too; layer 0 is NVFP4."""
    src = tmp_path / "ignore-alone"
    src.mkdir()
    for f in sources["canada"].iterdir():
        if f.name != "config.json":
            (src / f.name).symlink_to(f)
    cfg = json.loads((sources["canada"] / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert "quantized_layers" not in qc
    qc["ignore"] = ["layers.1.*", "mtp.*"]
    (src / "config.json").write_text(json.dumps(cfg))
    model = harness.build(harness.engine_config(src))
    assert_nvfp4(model.model.layers[0].ffn.experts)
    assert_mxfp4(model.model.layers[1].ffn.experts)
