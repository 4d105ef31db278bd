"""NVFP4 element math: E2M1 nibbles, E4M3 block scales, quantize and the dequant reference.

Everything here is pure torch on CPU tensors, so tests and the verification path can call it
directly. The dequant multiply order is fixed to ``(e2m1 * block_scale) * scale_2`` in fp32: the
first product is exact (2 and 4 significant bits), so the result rounds once and the Triton kernels
can reproduce it bit for bit.
"""

from __future__ import annotations

import torch

from .constants import E2M1_MAX, E4M3_MAX, E4M3_MIN_SUBNORMAL
from .constants import NVFP4_BLOCK as BLOCK

# code -> value; codes 8..15 are the negatives (8 is -0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_E2M1_LUT = torch.tensor(list(E2M1_VALUES) + [-v for v in E2M1_VALUES], dtype=torch.float32)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> codes uint8 [..., K]; column 2i is the low nibble of byte i."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed E2M1 must be uint8, got {packed.dtype}")
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., K] (K even, values < 16) -> packed uint8 [..., K/2]."""
    if codes.shape[-1] % 2:
        raise ValueError("E2M1 code rows must have an even length")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    lut = _E2M1_LUT if codes.device.type == "cpu" else _E2M1_LUT.to(codes.device)
    return lut[codes.long()]


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """fp32 values (already divided by their scale) -> E2M1 codes, round to nearest even, saturate at 6."""
    mag = x.abs()
    # Bounds between neighbours; ties go to the even code (0, 1, 2, 4 and 6 have even codes).
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float32)
    idx = torch.bucketize(mag, bounds, right=False)  # mag == bound -> lower index
    # A tie rounds to the even code: bounds 0.75, 1.75, 3.5 sit between odd (lower) and even (upper).
    tie_up = (mag == 0.75) | (mag == 1.75) | (mag == 3.5)
    idx = torch.where(tie_up, idx + 1, idx)
    sign = (x < 0) & (idx > 0)
    return (idx | (sign.to(torch.int64) << 3)).to(torch.uint8)


def dequantize(packed: torch.Tensor, block_scale: torch.Tensor, scale_2: float | torch.Tensor) -> torch.Tensor:
    """Reference NVFP4 dequant: packed uint8 [M, K/2], E4M3 [M, K/16], fp32 scalar -> fp32 [M, K].

    ``block_scale`` may be float8_e4m3fn or its raw uint8 bytes.
    """
    if block_scale.dtype == torch.uint8:
        block_scale = block_scale.view(torch.float8_e4m3fn)
    vals = e2m1_decode(unpack_nibbles(packed))
    m, k = vals.shape[-2], vals.shape[-1]
    if block_scale.shape[-1] * BLOCK != k or block_scale.shape[-2] != m:
        raise ValueError(f"scale shape {tuple(block_scale.shape)} does not fit values [{m}, {k}]")
    s = block_scale.to(torch.float32).repeat_interleave(BLOCK, dim=-1)
    s2 = torch.as_tensor(scale_2, dtype=torch.float32)
    return (vals * s) * s2


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> float8_e4m3fn, round to nearest even; clamps to [2^-9, 448] but keeps exact zeros."""
    y = x.clamp(max=E4M3_MAX)
    y = torch.where(y > 0, y.clamp(min=E4M3_MIN_SUBNORMAL), torch.zeros_like(y))
    return y.to(torch.float8_e4m3fn)


def rescale_block_scales(block_scale: torch.Tensor, ratio: float) -> torch.Tensor:
    """Multiply E4M3 block scales by ``ratio`` (<= 1) and round back to E4M3 (RNE, clamped)."""
    if block_scale.dtype == torch.uint8:
        block_scale = block_scale.view(torch.float8_e4m3fn)
    r = torch.tensor(ratio, dtype=torch.float32)
    return to_e4m3(block_scale.to(torch.float32) * r)


def merge_scale_2(s2_gate: float, s2_up: float) -> tuple[float, float, float]:
    """Common w13 scale_2 and the ratio to apply to the gate and up block scales.

    Equal values (compared exactly, as fp32) are copied with ratio 1. Otherwise the common value is
    the max and the smaller half's block scales are multiplied by ``s2/max`` (a lossy rounding of at
    most half an E4M3 step).
    """
    g = float(torch.tensor(s2_gate, dtype=torch.float32))
    u = float(torch.tensor(s2_up, dtype=torch.float32))
    c = max(g, u)
    rg = 1.0 if g == c else float(torch.tensor(g, dtype=torch.float32) / torch.tensor(c, dtype=torch.float32))
    ru = 1.0 if u == c else float(torch.tensor(u, dtype=torch.float32) / torch.tensor(c, dtype=torch.float32))
    return c, rg, ru


def quantize(w: torch.Tensor, scale_2: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ModelOpt's NVFP4 recipe: w fp32/bf16 [M, K] -> (packed uint8 [M, K/2], E4M3 [M, K/16], scale_2).

    scale_2 = amax / (6 * 448) unless given; block scale = block_amax / (6 * scale_2) in E4M3
    (zero blocks get 1.0); values are divided by the *rounded* block scale times scale_2.
    """
    w = w.to(torch.float32)
    m, k = w.shape
    if k % BLOCK:
        raise ValueError(f"columns ({k}) must be a multiple of {BLOCK}")
    if scale_2 is None:
        amax = float(w.abs().max())
        scale_2 = (amax if amax > 0 else 1.0) / (E2M1_MAX * E4M3_MAX)
    s2 = torch.tensor(scale_2, dtype=torch.float32)
    blocks = w.reshape(m, k // BLOCK, BLOCK)
    bamax = blocks.abs().amax(dim=-1)
    s = bamax / (E2M1_MAX * s2)
    s = torch.where(s == 0, torch.ones_like(s), s)
    s8 = to_e4m3(s)
    denom = (s8.to(torch.float32) * s2).unsqueeze(-1)
    codes = e2m1_encode((blocks / denom).reshape(m, k))
    return pack_nibbles(codes), s8, float(s2)
