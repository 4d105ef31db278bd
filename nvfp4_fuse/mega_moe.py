"""Pure-torch reference of the weight layout DeepGEMM's NVFP4 MegaMoE kernel consumes.

Target ``mega-moe``: the bytes a loader has to hand to ``deep_gemm.fp4_fp4_mega_moe`` for the routed
experts, written so that no transform is left to do at load time. Everything here runs on CPU
tensors and is exactly invertible (a byte permutation plus a lossless 4-bytes-into-int32 packing).

What the upstream code does (read, not copied; see docs/mega-moe-layout.md for the full record)
-----------------------------------------------------------------------------------------------
Sources, by repository / path / commit (stored file id in brackets):

* deepseek-ai/DeepGEMM ``deep_gemm/mega/__init__.py`` @ 3a04a69435187162c223fb0ec918b65a4f596dd0
  [69122991728] (identical transform at 794783af91d1d81dd26d64ccceef23c7978a9885 [69092657269]):
  ``transform_weights_for_mega_moe``, ``_interleave_weights``, ``_transpose_sf_for_utccp``,
  ``_validate_nvfp4_weights`` and the ``fp4_fp4_mega_moe`` docstring.
* deepseek-ai/DeepGEMM ``csrc/apis/nvfp4_mega_moe.hpp`` @ 794783af91d1d81dd26d64ccceef23c7978a9885
  [68839827271]: host asserts of the NVFP4 kernel.
* deepseek-ai/DeepGEMM ``csrc/utils/layout.hpp`` @ 057ca5964aae0879ff2e0eb71ee05a3cb0ba3df7
  [71581758782]: ``check_sf_layout``.
* deepseek-ai/DeepGEMM ``docs/scaling-factor-format.md`` @ a23e1f08eec4a5bb3ff90c4431bf299f3f48adf7
  [69304419768], sections 6.3 and 6.6; ``tests/test_nvfp4_mega_moe.py`` @ 3a04a694... [69163240657].
* vllm-project/vllm ``vllm/model_executor/layers/quantization/modelopt.py`` @
  61c303093b13fad792b6495e4a64ffcb9f5d0065 [59343740174], class ``ModelOptNvFp4MegaMoE``, and
  ``vllm/model_executor/layers/fused_moe/prepare_megamoe.py`` @ the same commit [59397598827].

Per expert, with ``H`` = hidden and ``I`` = intermediate size:

1. L1 values: ModelOpt's fused ``w13`` is ``[gate | up]`` rows ([2I, H/2] packed E2M1, low nibble =
   even column). The kernel wants the rows interleaved in groups of 8, gate first:
   gate 0..7, up 0..7, gate 8..15, up 8..15, ... L2 values ([H, I/2]) are unchanged.
2. Block scales: one E4M3 per 16 values along K. Four consecutive K-groups are packed into one int32
   (the upstream code does ``.view(torch.uint8).view(torch.int32)`` on little-endian hosts, and
   vLLM's activation stager builds the word as ``sum(byte_j << 8*j)``): byte j of word p holds group
   4p+j. That gives a logical ``[N, K/64]`` int32 matrix per expert, which the kernel takes
   MN-major: for E experts, strides ``(N*K/64, 1, N)`` -- i.e. physically ``[K/64, N]`` contiguous.
3. L1 scales get the same gate/up 8-row interleave as the values (applied after packing, on the
   int32 rows; a row permutation commutes with per-row packing).
4. L1 and L2 scales then get the "UTCCP" transpose inside every block of 128 rows: viewing the block
   as [4, 32] and transposing to [32, 4], so new row ``b*4 + a`` holds old row ``a*32 + b``
   (a < 4, b < 32). It requires N % 128 == 0.
5. Shape rules. The transform itself needs N % 128 == 0 (UTCCP), K % 64 == 0 (whole int32 words; no
   padding anywhere, and with N % 128 == 0 the TMA alignment ``align(N, 4)`` adds none either). The
   NVFP4 kernel additionally asserts ``hidden % 512 == 0 and intermediate_hidden % 512 == 0``
   (nvfp4_mega_moe.hpp). vLLM's adapter checks only multiples of 256, which is weaker than the
   kernel: the kernel's rule wins and :func:`check_mega_moe_shape` enforces it by default.

The kernel takes the values as torch.int8; the bytes are the uint8 ones stored here (``.view``).

Global scales are not part of this transform. vLLM 0.33's ``DeepGemmMegaMoEExperts`` with the
``MEGA_MOE_NVFP4`` format takes one ``w13_weight_scale_2`` per expert (it refuses unequal gate/up
values; the converter merges them by max and rescales the smaller half's block scales), one
``w2_weight_scale_2`` per expert, and quantizes L2 inputs with the max of ``w2_input_scale`` over all
experts; L1 inputs are quantized per token. Its parameters are registered in this layout and every
checkpoint shard is written straight into them (``_kernel_layout_shard``), which is what lets a
``mega-moe`` checkpoint load with no transform at all.
"""

from __future__ import annotations

import sys
from typing import NamedTuple

import torch

from .constants import GATE_UP_GROUP, K_PER_WORD, SCALES_PER_WORD, UTCCP_BLOCK
from .constants import NVFP4_BLOCK as BLOCK
from .host_layout import check_mega_moe_shape  # the shape rules live with the converter's numpy transforms

UTCCP_SPLIT = (4, 32)  # a block is read as [4, 32] and stored as [32, 4]


# --------------------------------------------------------------------------------------------
# byte-level helpers


def _bits(t: torch.Tensor) -> torch.Tensor:
    """1-byte float tensors as uint8 (so stack/reshape work on every backend); others unchanged."""
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8)
    return t


def _restore(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return bits.view(dtype) if dtype != bits.dtype else bits


# --------------------------------------------------------------------------------------------
# gate/up interleave (rows, dim -2)


def interleave_gate_up(gate: torch.Tensor, up: torch.Tensor, group: int = GATE_UP_GROUP) -> torch.Tensor:
    """[..., R, C] gate and up -> [..., 2R, C]: ``group`` gate rows, ``group`` up rows, repeated.

    Row ``j`` of the result is gate row ``(j // (2*group))*group + j % group`` when
    ``j % (2*group) < group``, else the up row of that index. Any dtype; output contiguous.
    """
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"gate {tuple(gate.shape)}/{gate.dtype} and up {tuple(up.shape)}/{up.dtype} differ")
    if gate.dim() < 2:
        raise ValueError("gate/up interleave needs tensors with a row and a column dimension")
    rows, cols = gate.shape[-2], gate.shape[-1]
    if rows % group:
        raise ValueError(f"gate/up rows ({rows}) must be a multiple of the interleave group ({group})")
    lead = gate.shape[:-2]
    g = _bits(gate).reshape(*lead, rows // group, 1, group, cols)
    u = _bits(up).reshape(*lead, rows // group, 1, group, cols)
    out = torch.cat((g, u), dim=-3).reshape(*lead, 2 * rows, cols).contiguous()
    return _restore(out, gate.dtype)


def deinterleave_gate_up(w13: torch.Tensor, group: int = GATE_UP_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_gate_up`: [..., 2R, C] -> (gate [..., R, C], up [..., R, C])."""
    if w13.dim() < 2:
        raise ValueError("gate/up de-interleave needs a tensor with a row and a column dimension")
    rows2, cols = w13.shape[-2], w13.shape[-1]
    if rows2 % (2 * group):
        raise ValueError(f"interleaved rows ({rows2}) must be a multiple of 2*group ({2 * group})")
    lead = w13.shape[:-2]
    v = _bits(w13).reshape(*lead, rows2 // (2 * group), 2, group, cols)
    gate = v.select(-3, 0).reshape(*lead, rows2 // 2, cols).contiguous()
    up = v.select(-3, 1).reshape(*lead, rows2 // 2, cols).contiguous()
    return _restore(gate, w13.dtype), _restore(up, w13.dtype)


# --------------------------------------------------------------------------------------------
# E4M3 scales <-> int32 words


def pack_scales_k64(scale: torch.Tensor) -> torch.Tensor:
    """E4M3 scales [..., N, K/16] (float8_e4m3fn or raw uint8) -> int32 [..., N, K/64].

    Word p of a row is little-endian: byte j (bits 8j..8j+7) is the scale of K-group 4p+j. Built
    arithmetically, so the result does not depend on the host's byte order.
    """
    if scale.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise ValueError(f"block scales must be float8_e4m3fn or uint8, got {scale.dtype}")
    if scale.dim() < 2:
        raise ValueError("block scales need a row and a column dimension")
    k16 = scale.shape[-1]
    if k16 % SCALES_PER_WORD:
        raise ValueError(f"scale columns ({k16}) must be a multiple of {SCALES_PER_WORD} to pack into int32")
    if sys.byteorder == "little" and scale.device.type == "cpu":
        # Little-endian words of four consecutive bytes are the bytes themselves: a view, no arithmetic.
        return _bits(scale).contiguous().view(torch.int32)
    b = _bits(scale).to(torch.int64).reshape(*scale.shape[:-1], k16 // SCALES_PER_WORD, SCALES_PER_WORD)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    word = torch.where(word >= 2**31, word - 2**32, word)  # two's complement into int32 range
    return word.to(torch.int32).contiguous()


def unpack_scales_k64(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_scales_k64`: int32 [..., N, K/64] -> float8_e4m3fn [..., N, K/16]."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed scales must be int32, got {packed.dtype}")
    if packed.dim() < 2:
        raise ValueError("packed scales need a row and a column dimension")
    if sys.byteorder == "little" and packed.device.type == "cpu":
        # Byte j of a little-endian word is its j-th byte in memory: a view, no arithmetic.
        return packed.contiguous().view(torch.uint8).view(torch.float8_e4m3fn)
    w = packed.to(torch.int64) & 0xFFFFFFFF
    parts = [((w >> (8 * j)) & 0xFF) for j in range(SCALES_PER_WORD)]
    b = torch.stack(parts, dim=-1).to(torch.uint8)
    return b.reshape(*packed.shape[:-1], packed.shape[-1] * SCALES_PER_WORD).contiguous().view(torch.float8_e4m3fn)


# --------------------------------------------------------------------------------------------
# UTCCP row transpose (rows, dim -2, 128-row blocks)


def _check_utccp_rows(x: torch.Tensor) -> int:
    if x.dim() < 2:
        raise ValueError("UTCCP permutation needs a row and a column dimension")
    rows = x.shape[-2]
    if rows % UTCCP_BLOCK:
        raise ValueError(f"UTCCP permutation needs rows ({rows}) that are a multiple of {UTCCP_BLOCK}")
    return rows


def utccp_permute(x: torch.Tensor) -> torch.Tensor:
    """Rows of [..., N, C] (N % 128 == 0): in every 128-row block, new row b*4+a = old row a*32+b."""
    rows = _check_utccp_rows(x)
    a, b = UTCCP_SPLIT
    lead, cols = x.shape[:-2], x.shape[-1]
    v = _bits(x).reshape(*lead, rows // UTCCP_BLOCK, a, b, cols).transpose(-3, -2)
    return _restore(v.reshape(*lead, rows, cols).contiguous(), x.dtype)


def utccp_unpermute(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`utccp_permute`: in every 128-row block, row a*32+b = stored row b*4+a."""
    rows = _check_utccp_rows(x)
    a, b = UTCCP_SPLIT
    lead, cols = x.shape[:-2], x.shape[-1]
    v = _bits(x).reshape(*lead, rows // UTCCP_BLOCK, b, a, cols).transpose(-3, -2)
    return _restore(v.reshape(*lead, rows, cols).contiguous(), x.dtype)


def kernel_scale_view(on_disk: torch.Tensor) -> torch.Tensor:
    """On-disk scales [..., K/64, N] (contiguous) -> the kernel's logical [..., N, K/64] MN-major view.

    For a stacked [E, K/64, N] tensor the view has strides (N*K/64, 1, N), which is what
    ``_validate_nvfp4_weights`` demands. No copy.
    """
    return on_disk.transpose(-1, -2)


# --------------------------------------------------------------------------------------------
# whole experts


class NaturalExpert(NamedTuple):
    """One expert (or E stacked experts) in ModelOpt's natural layout."""

    gate_w: torch.Tensor  # uint8 [..., I, H/2]
    gate_s: torch.Tensor  # float8_e4m3fn [..., I, H/16]
    up_w: torch.Tensor  # uint8 [..., I, H/2]
    up_s: torch.Tensor  # float8_e4m3fn [..., I, H/16]
    down_w: torch.Tensor  # uint8 [..., H, I/2]
    down_s: torch.Tensor  # float8_e4m3fn [..., H, I/16]


def _dims(gate_w, gate_s, up_w, up_s, down_w, down_s, lead: int) -> tuple[int, int]:
    """Validate a natural expert (``lead`` leading dims) and return (H, I)."""
    named = dict(gate_w=gate_w, gate_s=gate_s, up_w=up_w, up_s=up_s, down_w=down_w, down_s=down_s)
    for n, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dim() != lead + 2:
            raise ValueError(f"{n} must be a {lead + 2}-D tensor")
    for n in ("gate_w", "up_w", "down_w"):
        if named[n].dtype != torch.uint8:
            raise ValueError(f"{n} must be packed E2M1 uint8, got {named[n].dtype}")
    for n in ("gate_s", "up_s", "down_s"):
        if named[n].dtype not in (torch.float8_e4m3fn, torch.uint8):
            raise ValueError(f"{n} must be float8_e4m3fn (or its uint8 bytes), got {named[n].dtype}")
    lead_shape = gate_w.shape[:lead]
    inter, hidden = gate_w.shape[-2], gate_w.shape[-1] * 2
    expect = dict(
        gate_w=(inter, hidden // 2),
        gate_s=(inter, hidden // BLOCK),
        up_w=(inter, hidden // 2),
        up_s=(inter, hidden // BLOCK),
        down_w=(hidden, inter // 2),
        down_s=(hidden, inter // BLOCK),
    )
    for n, t in named.items():
        want = (*lead_shape, *expect[n])
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"{n} is {tuple(t.shape)}, expected {tuple(want)} (H={hidden}, I={inter})")
    if hidden % BLOCK or inter % BLOCK:
        raise ValueError(f"H={hidden} and I={inter} must be multiples of {BLOCK}")
    return hidden, inter


def _to_mega(gate_w, gate_s, up_w, up_s, down_w, down_s, lead: int, kernel_rules: bool) -> dict[str, torch.Tensor]:
    hidden, inter = _dims(gate_w, gate_s, up_w, up_s, down_w, down_s, lead)
    check_mega_moe_shape(2 * inter, hidden, "w13", kernel_rules=kernel_rules)
    check_mega_moe_shape(hidden, inter, "w2", kernel_rules=kernel_rules)
    w13_s = utccp_permute(interleave_gate_up(pack_scales_k64(gate_s), pack_scales_k64(up_s)))
    w2_s = utccp_permute(pack_scales_k64(down_s))
    return {
        "w13_weight": interleave_gate_up(gate_w, up_w),
        "w13_weight_scale": w13_s.transpose(-1, -2).contiguous(),
        "w2_weight": down_w.contiguous(),
        "w2_weight_scale": w2_s.transpose(-1, -2).contiguous(),
    }


def _from_mega(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale, lead: int, kernel_rules: bool) -> NaturalExpert:
    named = dict(
        w13_weight=w13_weight, w13_weight_scale=w13_weight_scale, w2_weight=w2_weight, w2_weight_scale=w2_weight_scale
    )
    for n, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dim() != lead + 2:
            raise ValueError(f"{n} must be a {lead + 2}-D tensor")
    for n, dt in (("w13_weight", torch.uint8), ("w2_weight", torch.uint8)):
        if named[n].dtype != dt:
            raise ValueError(f"{n} must be {dt}, got {named[n].dtype}")
    for n in ("w13_weight_scale", "w2_weight_scale"):
        if named[n].dtype != torch.int32:
            raise ValueError(f"{n} must be int32, got {named[n].dtype}")
    lead_shape = w13_weight.shape[:lead]
    inter2, hidden = w13_weight.shape[-2], w13_weight.shape[-1] * 2
    inter = inter2 // 2
    expect = dict(
        w13_weight=(inter2, hidden // 2),
        w13_weight_scale=(hidden // K_PER_WORD, inter2),
        w2_weight=(hidden, inter // 2),
        w2_weight_scale=(inter // K_PER_WORD, hidden),
    )
    check_mega_moe_shape(inter2, hidden, "w13", kernel_rules=kernel_rules)
    check_mega_moe_shape(hidden, inter, "w2", kernel_rules=kernel_rules)
    for n, t in named.items():
        want = (*lead_shape, *expect[n])
        if tuple(t.shape) != tuple(want):
            raise ValueError(f"{n} is {tuple(t.shape)}, expected {tuple(want)} (H={hidden}, I={inter})")
    gate_w, up_w = deinterleave_gate_up(w13_weight)
    g_words, u_words = deinterleave_gate_up(utccp_unpermute(w13_weight_scale.transpose(-1, -2)))
    down_s = unpack_scales_k64(utccp_unpermute(w2_weight_scale.transpose(-1, -2)))
    return NaturalExpert(
        gate_w, unpack_scales_k64(g_words), up_w, unpack_scales_k64(u_words), w2_weight.contiguous(), down_s
    )


def to_mega_moe_expert(
    gate_w: torch.Tensor,
    gate_s: torch.Tensor,
    up_w: torch.Tensor,
    up_s: torch.Tensor,
    down_w: torch.Tensor,
    down_s: torch.Tensor,
    *,
    kernel_rules: bool = True,
) -> dict[str, torch.Tensor]:
    """One ModelOpt expert -> its on-disk mega-moe tensors (all contiguous).

    In: gate/up values uint8 [I, H/2], gate/up scales E4M3 [I, H/16], down values uint8 [H, I/2],
    down scales E4M3 [H, I/16] (scales may be float8_e4m3fn or raw uint8).

    Out: ``w13_weight`` uint8 [2I, H/2] (gate/up 8-row interleave), ``w13_weight_scale`` int32
    [H/64, 2I], ``w2_weight`` uint8 [H, I/2] (unchanged), ``w2_weight_scale`` int32 [I/64, H]. The
    scale tensors hold the kernel's MN-major scales in physical order: ``.T`` (or
    :func:`kernel_scale_view`) is the logical [N, K/64] matrix the kernel reads.
    ``kernel_rules=False`` relaxes the 512-multiple rule to the layout's own (N%128, K%64).
    """
    return _to_mega(gate_w, gate_s, up_w, up_s, down_w, down_s, 0, kernel_rules)


def from_mega_moe_expert(
    w13_weight: torch.Tensor,
    w13_weight_scale: torch.Tensor,
    w2_weight: torch.Tensor,
    w2_weight_scale: torch.Tensor,
    *,
    kernel_rules: bool = True,
) -> NaturalExpert:
    """Inverse of :func:`to_mega_moe_expert`; scales come back as float8_e4m3fn [rows, K/16]."""
    return _from_mega(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale, 0, kernel_rules)


def to_mega_moe(
    gate_w: torch.Tensor,
    gate_s: torch.Tensor,
    up_w: torch.Tensor,
    up_s: torch.Tensor,
    down_w: torch.Tensor,
    down_s: torch.Tensor,
    *,
    kernel_rules: bool = True,
) -> dict[str, torch.Tensor]:
    """Batched :func:`to_mega_moe_expert` over a leading expert dim E.

    Shapes out: [E, 2I, H/2], [E, H/64, 2I], [E, H, I/2], [E, I/64, H] -- equal to stacking the
    per-expert results. ``kernel_scale_view`` of a stacked scale tensor has strides (N*K/64, 1, N).
    """
    return _to_mega(gate_w, gate_s, up_w, up_s, down_w, down_s, 1, kernel_rules)


def from_mega_moe(
    w13_weight: torch.Tensor,
    w13_weight_scale: torch.Tensor,
    w2_weight: torch.Tensor,
    w2_weight_scale: torch.Tensor,
    *,
    kernel_rules: bool = True,
) -> NaturalExpert:
    """Batched inverse of :func:`to_mega_moe`."""
    return _from_mega(w13_weight, w13_weight_scale, w2_weight, w2_weight_scale, 1, kernel_rules)
