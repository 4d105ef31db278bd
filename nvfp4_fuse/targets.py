"""Output targets: each one a composition of the parts in ``layout.py``, plus what a reader needs to know.

The converter, ``verify`` and the dry run ask a target for its output tensors' names, dtypes and
shapes and feed it one expert at a time; they never look at which target it is. Adding a target is
adding an entry to ``TARGETS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np

from .errors import InputError
from .layout import (
    ExpertMax,
    GateThenUp,
    InputScalePolicy,
    InterleavedByGroup,
    LinearScales,
    MegaMoEScales,
    MergeByMax,
    PackedValues,
    RowOrder,
    Scale2Policy,
    ScaleLayout,
    Swizzled128x4,
    W13Order,
    as_f32,
)
from .naming import fused_name
from .safetensors_header import OutEntry

LAYOUT_VERSION = "nvfp4-fuse/v2"
# What the last version bump changed, written into every fused_experts block.
LAYOUT_CHANGES = (
    "v2: mega-moe holds exactly vLLM 0.33's DeepGemmMegaMoEExperts NVFP4 parameters: I8 values, one "
    "w13_weight_scale_2 per expert [E] (gate/up merged by max, the smaller half's block scales rescaled, RNE) "
    "instead of [E, 2], w13_input_scale per expert [E] (max of gate/up) instead of one value; vllm-fused "
    "and linear unchanged since v1"
)

# How vLLM's DeepGemmMegaMoEExperts (format MEGA_MOE_NVFP4) reads the mega-moe layout; the
# nvfp4_fuse.vllm plugin does this with each EP rank's slice [start, end) of the expert dimension.
MEGA_MOE_LOADER = {
    "reader": "vLLM DeepGemmMegaMoEExperts, weight_format MEGA_MOE_NVFP4 (nvfp4_fuse.vllm plugin)",
    "w13_weight": "int8 [E, 2I, H/2], the parameter itself",
    "w2_weight": "int8 [E, H, I/2], the parameter itself",
    "w13_weight_scale": "int32 [E, H/64, 2I], the storage of the MN-major parameter (its .transpose(-1, -2))",
    "w2_weight_scale": "int32 [E, I/64, H], likewise",
    "w13_weight_scale_2": "[E], the kernel's one L1 scale per expert",
    "w2_weight_scale_2": "[E]",
    "w2_input_scale": "[E]; the kernel quantizes every L2 input with the max over all experts",
    "w13_input_scale": "[E]; not read by vLLM's NVFP4 MegaMoE (L1 activations are quantized per token)",
}


@dataclass(frozen=True)
class LayerDims:
    experts: int
    hidden: int  # H: input width of gate/up, output rows of down
    inter: int  # I: output rows of gate/up, input width of down


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    rows: RowOrder
    scales: ScaleLayout
    scale_2: Scale2Policy
    input_scale: InputScalePolicy
    values: PackedValues
    serve_hint: str  # shell lines for serving a pushed checkpoint; {repo_id} is filled in
    user_row_order: bool = False  # whether --w13-order may replace ``rows``
    loader: dict[str, str] = field(default_factory=dict)  # recipe for the kernel's scalars, if any
    # One Linear per expert, nothing stacked (per_expert.py names the tensors); ``rows`` and ``scales``
    # then only describe each expert's own [rows, K/16] block scales, and the stacked scalars of
    # :meth:`global_tensors` are what each expert's gate and up are written with.
    per_expert: bool = False

    def with_order(self, order: W13Order) -> Target:
        """This target with the user's w13 row order; ``InputError`` where the target fixes it."""
        if order is W13Order.GATE_UP:
            return self
        if not self.user_row_order:
            raise InputError(f"target {self.name} fixes the w13 row order ({self.rows.name}); drop --w13-order")
        return replace(self, rows=order.row_order())

    # -- shapes -----------------------------------------------------------------------------------
    def problems(self, d: LayerDims) -> list[str]:
        """Why a layer of these dims cannot be written in this layout (empty: it can)."""
        kernel = self.scales.kernel_dim_multiple
        if kernel and (d.hidden % kernel or d.inter % kernel):
            # Say it in the sizes a person knows (hidden, intermediate), once, not per GEMM operand.
            return [
                f"target {self.name} needs hidden and intermediate sizes that are multiples of {kernel} "
                f"(DeepGEMM's fp4_fp4_mega_moe); this layer has hidden {d.hidden}, intermediate {d.inter}"
            ]
        out = [f"w13 (gate+up): {p}" for p in self.rows.problems(d.inter)]
        for what, rows, cols in (("w13 (gate+up)", 2 * d.inter, d.hidden), ("w2 (down)", d.hidden, d.inter)):
            if self.scales.problems(rows, cols):
                out.append(f"{self.name} layout does not fit {what} [{rows}, {cols}]: " + "; ".join(self.scales.problems(rows, cols)))
        return out

    def out_entries(self, prefix: str, d: LayerDims) -> list[OutEntry]:
        e, h, i = d.experts, d.hidden, d.inter
        v, s = self.values.value, self.scales
        return [
            OutEntry(fused_name(prefix, "w13_weight"), v, (e, 2 * i, h // 2)),
            OutEntry(fused_name(prefix, "w13_weight_scale"), s.dtype, (e, *s.expert_shape(2 * i, h))),
            OutEntry(fused_name(prefix, "w13_weight_scale_2"), "F32", self.scale_2.w13_shape(e)),
            OutEntry(fused_name(prefix, "w13_input_scale"), "F32", self.input_scale.w13_shape(e)),
            OutEntry(fused_name(prefix, "w2_weight"), v, (e, h, i // 2)),
            OutEntry(fused_name(prefix, "w2_weight_scale"), s.dtype, (e, *s.expert_shape(h, i))),
            OutEntry(fused_name(prefix, "w2_weight_scale_2"), "F32", (e,)),
            OutEntry(fused_name(prefix, "w2_input_scale"), "F32", (e,)),
        ]

    # -- per-layer scalars -------------------------------------------------------------------------
    def global_tensors(self, prefix: str, sc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The small per-layer tensors (float32), from the per-expert scalars (float32 [E] each)."""
        return {
            fused_name(prefix, "w13_weight_scale_2"): self.scale_2.w13_tensor(sc["gate.weight_scale_2"], sc["up.weight_scale_2"]),
            fused_name(prefix, "w13_input_scale"): self.input_scale.w13_tensor(sc["gate.input_scale"], sc["up.input_scale"]),
            fused_name(prefix, "w2_weight_scale_2"): as_f32(sc["down.weight_scale_2"]),
            fused_name(prefix, "w2_input_scale"): as_f32(sc["down.input_scale"]),
        }

    def describe(self) -> dict[str, Any]:
        """The ``fused_experts`` block written into config.json / hf_quant_config.json."""
        d: dict[str, Any] = {
            "layout": LAYOUT_VERSION,
            "target": self.name,
            "w13_rows": self.rows.name,
            "scale_layout": self.scales.name,
            "w13_weight_scale_2": self.scale_2.name,
            "w13_input_scale": self.input_scale.name,
            "w2_input_scale": "per-expert",
            "values": str(self.values),
            "changes": LAYOUT_CHANGES,
        }
        if self.loader:
            d["loader"] = dict(self.loader)
        return d


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "mega-moe",
            "vLLM's DeepGEMM NVFP4 MegaMoE parameters (--moe-backend deep_gemm_mega_moe): I8 values, gate/up "
            "rows interleaved by 8, int32-packed UTCCP-permuted MN-major scales, one scale_2 per expert",
            rows=InterleavedByGroup(),
            scales=MegaMoEScales(),
            scale_2=MergeByMax(),
            input_scale=ExpertMax(),
            values=PackedValues.I8,
            serve_hint="pip install 'nvfp4-fuse[vllm]'   # the plugin that loads this layout into vLLM 0.33\n"
            "vllm serve {repo_id} --moe-backend deep_gemm_mega_moe --enable-expert-parallel\n"
            "# DeepSeek-V4 on another NVFP4 MoE backend (e.g. --moe-backend flashinfer_cutedsl): the plugin\n"
            "# recovers each expert's tensors for vLLM's per-expert loader",
            loader=MEGA_MOE_LOADER,
        ),
        Target(
            "vllm-fused",
            "CUTLASS/FlashInfer-style fused MoE: [gate; up] rows, 128x4-swizzled scales, merged scale_2",
            rows=GateThenUp(),
            scales=Swizzled128x4(),
            scale_2=MergeByMax(),
            input_scale=ExpertMax(),
            values=PackedValues.U8,
            serve_hint="# target vllm-fused: no kernel reads it as it is; for DeepSeek-V4 the nvfp4-fuse vLLM plugin\n"
            "# recovers each expert's tensors for vLLM's per-expert loader, on any NVFP4 MoE backend\n"
            "pip install 'nvfp4-fuse[vllm]'\nvllm serve {repo_id} --moe-backend flashinfer_cutedsl",
            user_row_order=True,
        ),
        Target(
            "linear",
            "Like vllm-fused with plain [E, rows, K/16] block scales",
            rows=GateThenUp(),
            scales=LinearScales(),
            scale_2=MergeByMax(),
            input_scale=ExpertMax(),
            values=PackedValues.U8,
            serve_hint="# target linear: no kernel reads it as it is; for DeepSeek-V4 the nvfp4-fuse vLLM plugin\n"
            "# recovers each expert's tensors for vLLM's per-expert loader, on any NVFP4 MoE backend\n"
            "pip install 'nvfp4-fuse[vllm]'\nvllm serve {repo_id} --moe-backend flashinfer_cutedsl",
            user_row_order=True,
        ),
        Target(
            "per-expert",
            "One Linear per expert in the source's naming scheme (ModelOpt spelling, nothing stacked) for stock "
            "engines: gate/up weight_scale_2 and input_scale made equal, missing or zero input scales repaired",
            rows=GateThenUp(),
            scales=LinearScales(),
            scale_2=MergeByMax(),
            input_scale=ExpertMax(),
            values=PackedValues.U8,
            serve_hint="vllm serve {repo_id}",
            per_expert=True,
        ),
    )
}
TARGET_NAMES = tuple(TARGETS)
TargetName = StrEnum("TargetName", {n: n for n in TARGET_NAMES})  # the --target choices
DEFAULT_TARGET = TargetName("mega-moe")


def get_target(name: str, w13_order: W13Order | str = W13Order.GATE_UP) -> Target:
    """The target called ``name`` with the given w13 row order; ``InputError`` for unknown choices."""
    if name not in TARGETS:
        raise InputError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    try:
        order = W13Order(w13_order)
    except ValueError:
        raise InputError(f"--w13-order must be gate-up or up-gate, not {w13_order!r}") from None
    return TARGETS[name].with_order(order)
