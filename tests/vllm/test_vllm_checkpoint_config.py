"""Which experts a checkpoint's quantization_config says are NVFP4, for each published recipe."""

from __future__ import annotations

import pytest

from nvfp4_fuse.vllm.checkpoint import ExpertCheckpoint, FusedLayoutError, checkpoint_module

NVIDIA = {
    "quant_method": "fp8",
    "moe_quant_algo": "NVFP4",
    "quant_algo": "MIXED_PRECISION",
    "quantized_layers": {f"layers.{n}.ffn.experts": {"quant_algo": "NVFP4", "group_size": 16} for n in range(3)},
    "ignore": ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"],
}
CANADA = {"quant_method": "fp8", "moe_quant_algo": "NVFP4", "expert_format": {"name": "nvfp4"}}


@pytest.mark.parametrize(
    ("qc", "module", "nvfp4"),
    [
        (NVIDIA, "layers.1.ffn.experts", True),
        (NVIDIA, "layers.3.ffn.experts", False),  # not in the manifest: left as it was
        (NVIDIA, "mtp.0.ffn.experts", False),  # ignored
        # --include_mtp_experts: listed, no longer ignored
        ({**NVIDIA, "quantized_layers": {**NVIDIA["quantized_layers"], "mtp.0.ffn.experts": {"quant_algo": "NVFP4"}},
          "ignore": ["*.attn.*"]}, "mtp.0.ffn.experts", True),
        # older ModelOpt exports key the manifest per projection
        ({**NVIDIA, "quantized_layers": {"layers.2.ffn.experts.7.w1": {"quant_algo": "NVFP4"}}}, "layers.2.ffn.experts", True),
        ({**NVIDIA, "quantized_layers": {"layers.2.ffn.experts.7.w1": {"quant_algo": "FP8"}}}, "layers.2.ffn.experts", False),
        (CANADA, "layers.60.ffn.experts", True),
        (CANADA, "mtp.0.ffn.experts", False),  # no manifest: MTP stays MXFP4
        # `ignore` alone (no manifest): a pattern naming a layer keeps that layer's experts as they are
        ({**CANADA, "ignore": ["layers.1.*"]}, "layers.1.ffn.experts", False),
        ({**CANADA, "ignore": ["layers.1.*"]}, "layers.11.ffn.experts", True),
        ({**CANADA, "exclude_modules": ["layers.[3-5].ffn.experts"]}, "layers.4.ffn.experts", False),
        ({**CANADA, "exclude_modules": ["layers.[3-5].ffn.experts"]}, "layers.6.ffn.experts", True),
        ({**CANADA, "fused_experts": {"layout": "nvfp4-fuse/v2", "target": "mega-moe"}}, "layers.0.ffn.experts", True),
        ({"quant_method": "fp8", "fmt": "e4m3"}, "layers.0.ffn.experts", False),  # MXFP4 release
        (None, "layers.0.ffn.experts", False),
    ],
)
def test_experts_are_nvfp4(qc, module, nvfp4):
    assert ExpertCheckpoint.from_quant_config(qc).experts_are_nvfp4(module) is nvfp4


def test_a_fused_block_alone_means_nvfp4_and_is_checked():
    info = ExpertCheckpoint.from_quant_config({"quant_method": "fp8", "fused_experts": {"layout": "nvfp4-fuse/v2", "target": "mega-moe"}})
    assert info.is_fused and info.has_nvfp4_experts
    info.check_layout()
    for bad in ("nvfp4-fuse/v1", "nvfp4-fuse/v3", None):
        with pytest.raises(FusedLayoutError, match="does not read"):
            ExpertCheckpoint.from_quant_config({"fused_experts": {"layout": bad, "target": "mega-moe"}}).check_layout()
    with pytest.raises(FusedLayoutError, match="target 'tensorrt'"):
        ExpertCheckpoint.from_quant_config({"fused_experts": {"layout": "nvfp4-fuse/v2", "target": "tensorrt"}}).check_layout()


@pytest.mark.parametrize(("target", "rows"), [("mega-moe", None), ("vllm-fused", "gate-up"), ("vllm-fused", "up-gate"),
                                              ("linear", "gate-up"), ("linear", "up-gate")])
def test_every_target_the_converter_writes_is_read(target, rows):
    """The fused_experts block convert writes names the target whose inverses the plugin runs."""
    from nvfp4_fuse.targets import get_target

    block = get_target(target, rows or "gate-up").describe()
    got = ExpertCheckpoint.from_quant_config({"fused_experts": block}).fused_target()
    assert got.describe() == block and got.rows.name == block["w13_rows"]


def test_checkpoint_module():
    assert checkpoint_module(5, 61) == "layers.5.ffn.experts"
    assert checkpoint_module(61, 61) == "mtp.0.ffn.experts"
