"""Output layouts. Each target is a few declarative choices plus the per-expert transforms they imply.

A target says: how w13 rows are ordered (gate then up, up then gate, or interleaved in groups), how
block scales are laid out (linear, 128x4-swizzled, DeepGEMM MegaMoE), how gate/up ``weight_scale_2``
are combined (merged by max with a rescale of the smaller half, or both kept), and how per-expert
``input_scale`` values are combined. The converter asks a target for its output tensors' names,
dtypes and shapes, then feeds it one expert at a time; no target ever sees a whole layer of weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from typing import TYPE_CHECKING

import numpy as np

from . import host_layout
from .errors import InputError
from .naming import fused_name
from .safetensors_io import OutEntry

if TYPE_CHECKING:
    import torch

# torch is imported inside the torch methods only (verify and the tests use them): the converter
# runs on the numpy methods and never pays torch's import time.

LAYOUT_VERSION = "nvfp4-fuse/v1"

# How a loader of the mega-moe layout gets the kernel's global scales (see nvfp4_fuse/mega_moe.py).
MEGA_MOE_LOADER = {
    "l1_alphas": "w13_input_scale * w13_weight_scale_2  ([E, 2]: gate, up)",
    "l2_alphas": "w2_weight_scale_2",
    "a2_scales": "w2_input_scale",
    "activation_global_scale": "1 / w13_input_scale",
    "weight_scale_view": "w*_weight_scale.transpose(1, 2)  (MN-major [E, N, K/64] int32)",
    "weight_dtype": "w*_weight.view(torch.int8)",
}


def mega_moe_scales(scale: torch.Tensor) -> torch.Tensor:
    """One expert's E4M3 scales [N, K/16] (w13 rows already interleaved) -> on-disk int32 [K/64, N]."""
    from . import mega_moe

    return mega_moe.utccp_permute(mega_moe.pack_scales_k64(scale)).T.contiguous()


def mega_moe_scales_inverse(stored: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`mega_moe_scales`: int32 [K/64, N] -> float8_e4m3fn [N, K/16]."""
    import torch

    from . import mega_moe

    return mega_moe.unpack_scales_k64(mega_moe.utccp_unpermute(stored.view(torch.int32).T.contiguous()))


@dataclass(frozen=True)
class LayerDims:
    experts: int
    hidden: int  # H: input width of gate/up, output rows of down
    inter: int  # I: output rows of gate/up, input width of down


@dataclass(frozen=True)
class Target:
    name: str
    w13_rows: str  # "gate-up" | "up-gate" | "interleave8"
    scale_layout: str  # "linear" | "swizzle128x4" | "mega-moe"
    scale_2: str  # "merge-max" ([E], smaller half rescaled) | "keep-both" ([E, 2], gate then up)
    w13_input_scale: str  # "expert-max" ([E], max of gate/up) | "layer-max" ([], max over all)
    description: str

    # -- shapes ---------------------------------------------------------------------------------
    def check_dims(self, prefix: str, d: LayerDims) -> None:
        if self.scale_layout == "mega-moe":
            host_layout.check_mega_moe_shape(2 * d.inter, d.hidden, f"{prefix} w13 (gate+up)")
            host_layout.check_mega_moe_shape(d.hidden, d.inter, f"{prefix} w2 (down)")

    def _scale_entry(self, name: str, e: int, rows: int, cols: int) -> OutEntry:
        k16 = cols // 16
        if self.scale_layout == "linear":
            return OutEntry(name, "F8_E4M3", (e, rows, k16))
        if self.scale_layout == "swizzle128x4":
            return OutEntry(name, "F8_E4M3", (e, *host_layout.padded_shape(rows, k16)))
        if self.scale_layout == "mega-moe":
            return OutEntry(name, "I32", (e, cols // 64, rows))
        raise AssertionError(self.scale_layout)

    def out_entries(self, prefix: str, d: LayerDims) -> list[OutEntry]:
        e, h, i = d.experts, d.hidden, d.inter
        w13_s2 = (e,) if self.scale_2 == "merge-max" else (e, 2)
        w13_in = (e,) if self.w13_input_scale == "expert-max" else ()
        return [
            OutEntry(fused_name(prefix, "w13_weight"), "U8", (e, 2 * i, h // 2)),
            self._scale_entry(fused_name(prefix, "w13_weight_scale"), e, 2 * i, h),
            OutEntry(fused_name(prefix, "w13_weight_scale_2"), "F32", w13_s2),
            OutEntry(fused_name(prefix, "w13_input_scale"), "F32", w13_in),
            OutEntry(fused_name(prefix, "w2_weight"), "U8", (e, h, i // 2)),
            self._scale_entry(fused_name(prefix, "w2_weight_scale"), e, h, i),
            OutEntry(fused_name(prefix, "w2_weight_scale_2"), "F32", (e,)),
            OutEntry(fused_name(prefix, "w2_input_scale"), "F32", (e,)),
        ]

    # -- per-expert transforms ------------------------------------------------------------------
    def join_rows(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Stack one expert's gate and up rows (weights or linear scales) in this target's order."""
        import torch

        from . import mega_moe

        if self.w13_rows == "gate-up":
            return torch.cat((gate, up), dim=0)
        if self.w13_rows == "up-gate":
            return torch.cat((up, gate), dim=0)
        if self.w13_rows == "interleave8":
            return mega_moe.interleave_gate_up(gate, up)
        raise AssertionError(self.w13_rows)

    def w13_row_runs(self, rows: int) -> list[tuple[str, int, int]]:
        """Where one expert's w13 rows come from, in output order: runs of (role, first source row, count).

        The same order as :meth:`join_rows`, as a recipe the converter can read straight into the
        output buffer with one vectored read per source tensor (no intermediate copies).
        """
        if self.w13_rows == "gate-up":
            return [("gate", 0, rows), ("up", 0, rows)]
        if self.w13_rows == "up-gate":
            return [("up", 0, rows), ("gate", 0, rows)]
        if self.w13_rows == "interleave8":
            g = host_layout.GATE_UP_GROUP
            if rows % g:
                raise InputError(f"gate/up rows ({rows}) must be a multiple of the interleave group ({g})")
            return [(role, r, g) for r in range(0, rows, g) for role in ("gate", "up")]
        raise AssertionError(self.w13_rows)

    def split_rows(self, w13: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`join_rows`: (gate, up)."""
        from . import mega_moe

        half = w13.shape[0] // 2
        if self.w13_rows == "gate-up":
            return w13[:half], w13[half:]
        if self.w13_rows == "up-gate":
            return w13[half:], w13[:half]
        if self.w13_rows == "interleave8":
            return mega_moe.deinterleave_gate_up(w13)
        raise AssertionError(self.w13_rows)

    def lay_out_scales(self, scale: torch.Tensor) -> torch.Tensor:
        """One expert's linear [rows, K/16] E4M3 scales (rows already joined) -> on-disk layout (torch)."""
        from .swizzle import swizzle_128x4

        if self.scale_layout == "linear":
            return scale.contiguous()
        if self.scale_layout == "swizzle128x4":
            return swizzle_128x4(scale)
        if self.scale_layout == "mega-moe":
            return mega_moe_scales(scale)
        raise AssertionError(self.scale_layout)

    def natural_scales(self, stored: torch.Tensor, rows: int, k16: int) -> torch.Tensor:
        """Inverse of :meth:`lay_out_scales` for one expert: -> float8_e4m3fn [rows, k16]."""
        import torch

        from .swizzle import unswizzle_128x4

        if self.scale_layout == "linear":
            return stored.view(torch.float8_e4m3fn)
        if self.scale_layout == "swizzle128x4":
            return unswizzle_128x4(stored.view(torch.uint8), rows, k16).view(torch.float8_e4m3fn)
        if self.scale_layout == "mega-moe":
            return mega_moe_scales_inverse(stored)
        raise AssertionError(self.scale_layout)

    # -- global scales --------------------------------------------------------------------------
    def join_scale_rows_np(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        """numpy :meth:`join_rows` for one expert's uint8 scales (the converter's path), following the
        same :meth:`w13_row_runs` that place the weight rows, so weights and scales cannot disagree."""
        src = {"gate": gate, "up": up}
        return np.concatenate([src[role][r0 : r0 + n] for role, r0, n in self.w13_row_runs(gate.shape[0])])

    def lay_out_scales_np(self, raw: np.ndarray) -> np.ndarray:
        """numpy :meth:`lay_out_scales` on uint8 [rows, K/16] (the converter's path)."""
        return host_layout.lay_out_scales(raw, self.scale_layout)

    # -- global scales --------------------------------------------------------------------------
    def rescale_ratios(self, s2_gate: np.ndarray, s2_up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-expert factors for the gate and up block scales ([E] float32; 1.0 means a pure copy)."""
        one = np.ones_like(s2_gate)
        if self.scale_2 == "keep-both":
            return one, one.copy()
        c = np.maximum(s2_gate, s2_up)
        rg = np.where(s2_gate == c, one, s2_gate / c).astype(np.float32)
        ru = np.where(s2_up == c, one, s2_up / c).astype(np.float32)
        return rg, ru

    def global_tensors(self, prefix: str, sc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The small per-layer tensors (float32), from the per-expert scalars (float32 [E] each)."""
        if self.scale_2 == "merge-max":
            w13_s2 = np.maximum(sc["gate.weight_scale_2"], sc["up.weight_scale_2"])
        else:
            w13_s2 = np.stack((sc["gate.weight_scale_2"], sc["up.weight_scale_2"]), axis=1)
        in13 = np.maximum(sc["gate.input_scale"], sc["up.input_scale"])
        if self.w13_input_scale == "layer-max":
            in13 = np.asarray(in13.max(), dtype=np.float32)
        f32 = lambda x: np.array(x, dtype="<f4", order="C")  # noqa: E731  (keeps 0-d arrays 0-d)
        return {
            fused_name(prefix, "w13_weight_scale_2"): f32(w13_s2),
            fused_name(prefix, "w13_input_scale"): f32(in13),
            fused_name(prefix, "w2_weight_scale_2"): f32(sc["down.weight_scale_2"]),
            fused_name(prefix, "w2_input_scale"): f32(sc["down.input_scale"]),
        }

    def describe(self, w13_order: str) -> dict[str, Any]:
        """The ``fused_experts`` block written into config.json / hf_quant_config.json."""
        d = {
            "layout": LAYOUT_VERSION,
            "target": self.name,
            "w13_rows": self.w13_rows,
            "scale_layout": self.scale_layout,
            "w13_weight_scale_2": self.scale_2,
            "w13_input_scale": self.w13_input_scale,
            "w2_input_scale": "per-expert",
        }
        if self.scale_layout == "mega-moe":
            d["loader"] = dict(MEGA_MOE_LOADER)
        return d


_TARGETS = {
    "mega-moe": Target(
        "mega-moe",
        w13_rows="interleave8",
        scale_layout="mega-moe",
        scale_2="keep-both",
        w13_input_scale="layer-max",
        description="DeepGEMM NVFP4 MegaMoE (vLLM --moe-backend deep_gemm_mega_moe): gate/up rows "
        "interleaved by 8, int32-packed UTCCP-permuted MN-major scales, gate and up scale_2 kept",
    ),
    "vllm-fused": Target(
        "vllm-fused",
        w13_rows="gate-up",
        scale_layout="swizzle128x4",
        scale_2="merge-max",
        w13_input_scale="expert-max",
        description="CUTLASS/FlashInfer-style fused MoE: [gate; up] rows, 128x4-swizzled scales, merged scale_2",
    ),
    "linear": Target(
        "linear",
        w13_rows="gate-up",
        scale_layout="linear",
        scale_2="merge-max",
        w13_input_scale="expert-max",
        description="Like vllm-fused with plain [E, rows, K/16] block scales",
    ),
}
TARGET_NAMES = tuple(_TARGETS)
DEFAULT_TARGET = "mega-moe"


def get_target(name: str, *, w13_order: str = "gate-up") -> Target:
    if name not in _TARGETS:
        raise InputError(f"unknown target {name!r}; choose one of {', '.join(_TARGETS)}")
    t = _TARGETS[name]
    if w13_order not in ("gate-up", "up-gate"):
        raise InputError(f"--w13-order must be gate-up or up-gate, not {w13_order!r}")
    if w13_order != "gate-up":
        if t.w13_rows == "interleave8":
            raise InputError(f"target {name} fixes the w13 row order (gate/up interleaved by 8); drop --w13-order")
        from dataclasses import replace

        t = replace(t, w13_rows=w13_order)
    return t
