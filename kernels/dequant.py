"""Triton NVFP4 -> bf16/fp32 dequant for stacked experts (Hopper: E2M1 decoded in software).

Math, bit for bit equal to ``nvfp4_fuse.nvfp4.dequantize``: ``out = round((e2m1 * block_scale) * scale_2)``
in fp32, then one round to the output dtype (RNE). How the kernel gets there cheaply:

- The packed bytes are read as int32 words, 8 nibbles each. A nibble's 3 magnitude bits are moved to
  fp32 bits 22..24 and its sign to bit 31 (shift left, arithmetic shift right, one mask). Read as fp32
  that is the E2M1 value times 2^-126 (a subnormal: codes 0/1 land on 0 and 0.5*2^-126 exactly).
- The E4M3 block scale (decoded from its byte in software) is pre-multiplied by 2^118 and scale_2
  by 2^8, so ``(d * (s * 2^118)) * (s2 * 2^8)``: the first product is the exact ``e2m1 * s * 2^-8``
  (a normal number, 6 significant bits), the second rounds once to ``e2m1 * s * s2``: the same real
  number and the same rounding as the reference. This needs |scale_2| < 2^120 (checked).
- fp32 -> bf16 is the GPU's RNE convert; under ``TRITON_INTERPRET=1`` (whose convert truncates) the
  kernel rounds in integer arithmetic instead, exactly as torch does.

Each program handles ``BPP`` consecutive 16-value blocks of one expert (rows ``start:stop``); packed
bytes, linear scales and the output of such a run are contiguous. Swizzled scales are read in
place with the 128x4 offset formula of ``nvfp4_fuse.swizzle``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..constants import S2_LIMIT
from .reference import as_batched

# Defaults picked on an H100 (docs/benchmarks.md, "## Kernels").
DEQUANT_BPP = 128
DEQUANT_WARPS = 4

_OUT_DTYPES = (torch.bfloat16, torch.float32)


@triton.jit
def _e4m3_to_f32(x):
    """int32 tensor of E4M3 bytes (0..255) -> fp32 values (NaN for 0x7F/0xFF, sign honoured)."""
    exp = (x >> 3) & 15
    man = x & 7
    normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    v = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal)
    nan = tl.full(x.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    v = tl.where((x & 0x7F) == 0x7F, nan, v)
    return tl.where((x & 0x80) != 0, -v, v)


@triton.jit
def _nibble(w, J: tl.constexpr):
    """Nibble J (column 8*word + J) of int32 words -> fp32 E2M1 value times 2^-126 (sign kept)."""
    if J == 7:
        x = w >> 6
    else:
        x = (w << (28 - 4 * J)) >> 6
    # keep the sign (bit 31) and the magnitude bits (22..24): 0x81C00000 as int32
    return (x & -0x7E400000).to(tl.float32, bitcast=True)


@triton.jit
def _f32_to_bf16_rne(v):
    """fp32 -> bf16 round-to-nearest-even in integer arithmetic (torch's rule; NaN -> 0x7FC0)."""
    u = v.to(tl.int32, bitcast=True)
    r = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    r = tl.where(v != v, 0x7FC0, r)
    return r.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _swizzle_off(m, k, Kp):
    """Byte offset of scale (m, k) inside one expert's 128x4-swizzled [Mp, Kp] buffer."""
    return (m >> 7) * (Kp >> 2) * 512 + (k >> 2) * 512 + (m & 31) * 16 + ((m >> 5) & 3) * 4 + (k & 3)


@triton.jit
def _block_factors(s_ptr, s2_ptr, e, lb, mask, M, K16, r0, Mp, Kp,
                   SWIZZLED: tl.constexpr, S2_PER_ROW: tl.constexpr, EVEN: tl.constexpr):
    """Per-block (scale byte as int32, s * 2^118, s2 * 2^8) for local blocks ``lb`` of expert ``e``.

    s2 is a [BPP] tensor when per row, else a scalar. ``lb`` counts blocks from row ``r0``.
    """
    r = lb // K16
    m = r0 + r
    if SWIZZLED:
        k = lb - r * K16
        soff = e * Mp * Kp + _swizzle_off(m, k, Kp)
    else:
        soff = (e * M + r0) * K16 + lb
    if EVEN:
        sbyte = tl.load(s_ptr + soff).to(tl.int32)
    else:
        sbyte = tl.load(s_ptr + soff, mask=mask, other=0).to(tl.int32)
    s = _e4m3_to_f32(sbyte) * 3.3230699894622794e35  # 2^118
    if S2_PER_ROW:
        if EVEN:
            s2 = tl.load(s2_ptr + e * M + m)
        else:
            s2 = tl.load(s2_ptr + e * M + m, mask=mask, other=0.0)
    else:
        s2 = tl.load(s2_ptr + e)
    return sbyte, s, s2 * 256.0


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, s2_ptr, out_ptr,
                    M, K16, r0, Mp, Kp, nblk,
                    BPP: tl.constexpr, SWIZZLED: tl.constexpr, S2_PER_ROW: tl.constexpr,
                    OUT_BF16: tl.constexpr, SOFT_BF16: tl.constexpr, EVEN: tl.constexpr):
    t = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    lb = t * BPP + tl.arange(0, BPP)  # block index inside this expert's row range
    mask = lb < nblk
    # scalar int64 bases, int32 in-tile offsets (keeps the address math narrow and vectorizable)
    first = (e * M + r0) * K16 + t * BPP  # global index of this tile's first block
    wofs = tl.arange(0, BPP)[:, None] * 2 + tl.arange(0, 2)[None, :]
    if EVEN:
        w = tl.load(w_ptr + first * 2 + wofs)
    else:
        w = tl.load(w_ptr + first * 2 + wofs, mask=mask[:, None], other=0)
    _, s, s2 = _block_factors(s_ptr, s2_ptr, e, lb, mask, M, K16, r0, Mp, Kp, SWIZZLED, S2_PER_ROW, EVEN)
    s = s[:, None]
    if S2_PER_ROW:
        s2 = s2[:, None]
    v0 = (_nibble(w, 0) * s) * s2
    v1 = (_nibble(w, 1) * s) * s2
    v2 = (_nibble(w, 2) * s) * s2
    v3 = (_nibble(w, 3) * s) * s2
    v4 = (_nibble(w, 4) * s) * s2
    v5 = (_nibble(w, 5) * s) * s2
    v6 = (_nibble(w, 6) * s) * s2
    v7 = (_nibble(w, 7) * s) * s2
    # [BPP, 2 words, 2, 2, 2] with the last three axes spelling nibble j = 4i + 2k + l
    v = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
    v = tl.reshape(v, [BPP, 16])
    if OUT_BF16:
        if SOFT_BF16:
            v = _f32_to_bf16_rne(v)
        else:
            v = v.to(tl.bfloat16)
    # output is [E, R, K] contiguous: local block b of expert e starts at element (e*nblk + b)*16
    optr = out_ptr + (e * nblk + t * BPP) * 16
    oofs = tl.arange(0, BPP)[:, None] * 16 + tl.arange(0, 16)[None, :]
    if EVEN:
        tl.store(optr + oofs, v)
    else:
        tl.store(optr + oofs, v, mask=mask[:, None])


def is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def prepare(packed: torch.Tensor, scales: torch.Tensor, scale_2, swizzled: bool, check: bool = True):
    """Validate one encoding and return (words int32, scale bytes, s2 fp32, E, M, K16, Mp, Kp, per_row, was_2d).

    ``check`` also verifies |scale_2| < 2^120, which reads scale_2 back (a device sync).
    """
    packed, scales, s2, was_2d = as_batched(packed, scales, scale_2)
    e, m, k2 = packed.shape
    if k2 % 8:
        raise ValueError(f"packed rows hold {k2} bytes; K must be a multiple of 16")
    k16 = k2 // 8
    sbytes = scales.view(torch.uint8) if scales.dtype != torch.uint8 else scales
    if swizzled:
        mp, kp = (m + 127) // 128 * 128, (k16 + 3) // 4 * 4
        want = (e, mp, kp)
    else:
        mp, kp = m, k16
        want = (e, m, k16)
    if tuple(sbytes.shape) != want:
        kind = "swizzled" if swizzled else "linear"
        raise ValueError(f"{kind} scales are {tuple(sbytes.shape)}, expected {list(want)} for packed {tuple(packed.shape)}")
    if packed.device != sbytes.device or s2.device != packed.device:
        raise ValueError("packed, scales and scale_2 must be on one device")
    if packed.device.type == "cpu" and not is_interpreted(_dequant_kernel):
        raise RuntimeError("CPU tensors need TRITON_INTERPRET=1 before import; or use nvfp4_fuse.kernels.reference")
    if check and bool((torch.isfinite(s2) & (s2.abs() >= S2_LIMIT)).any()):
        raise ValueError("scale_2 values of 2^120 or more are not supported by the kernels")
    words = packed.contiguous().view(torch.int32)
    return (words, sbytes.contiguous(), s2.contiguous(), e, m, k16, mp, kp, s2.dim() == 2, was_2d)


def dequantize_nvfp4(packed: torch.Tensor, scales: torch.Tensor, scale_2, *, swizzled: bool = False,
                     rows=None, out_dtype: torch.dtype = torch.bfloat16, check: bool = True,
                     bpp: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """NVFP4 -> ``out_dtype`` [E, R, K] (or [R, K] for a 2-D ``packed``), bit-exact vs the reference.

    packed: uint8 [E, M, K/2]; scales: float8_e4m3fn or uint8, linear [E, M, K/16] or (``swizzled``)
    128x4-swizzled per expert [E, Mp, Kp]; scale_2: fp32 [E] or [E, M] (per row); rows: None or
    (start, stop) to dequantize only those rows of every expert; out_dtype: bfloat16 or float32.
    The kernel is exact for |scale_2| < 2^120; ``check`` enforces that (one device sync; pass False
    in hot loops once the scales are validated).
    """
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    words, sbytes, s2, e, m, k16, mp, kp, per_row, was_2d = prepare(packed, scales, scale_2, swizzled, check)
    r0, r1 = (0, m) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= r0 <= r1 <= m:
        raise ValueError(f"rows {rows} out of range for M={m}")
    out = torch.empty((e, r1 - r0, k16 * 16), dtype=out_dtype, device=words.device)
    nblk = (r1 - r0) * k16
    if out.numel():
        bpp = bpp or DEQUANT_BPP
        grid = (triton.cdiv(nblk, bpp), e)
        _dequant_kernel[grid](
            words, sbytes, s2, out, m, k16, r0, mp, kp, nblk,
            BPP=bpp, SWIZZLED=swizzled, S2_PER_ROW=per_row, OUT_BF16=out_dtype == torch.bfloat16,
            SOFT_BF16=is_interpreted(_dequant_kernel), EVEN=nblk % bpp == 0,
            num_warps=num_warps or DEQUANT_WARPS)
    return out[0] if was_2d else out
