"""Torch-only references for the Triton kernels in ``dequant.py`` and ``compare.py``.

No Triton here: the CPU path of verification and the tests use these. On CPU tensors the dequant is
``nvfp4_fuse.nvfp4.dequantize`` itself; on other devices the same ops run there (LUT decode, then
``(e2m1 * block_scale) * scale_2`` in fp32), so both give the same bits.

Argument conventions, shared with the kernels:

- ``packed``: uint8 ``[E, M, K/2]`` (or ``[M, K/2]`` for one expert), column 2i in the low nibble.
- ``scales``: float8_e4m3fn or its uint8 bytes, either linear ``[E, M, K/16]`` or, with
  ``swizzled=True``, 128x4-swizzled per expert ``[E, Mp, Kp]`` (Mp = roundup(M, 128),
  Kp = roundup(K/16, 4)).
- ``scale_2``: fp32 ``[E]`` (one per expert) or ``[E, M]`` (one per row); a 0-d tensor, a float,
  or ``[1]`` is accepted for a single expert.
- ``rows``: ``None`` for all rows, or ``(start, stop)``: only rows ``start:stop`` of every expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nvfp4_fuse import nvfp4
from nvfp4_fuse.swizzle import padded_shape, unswizzle_128x4


def as_batched(packed: torch.Tensor, scales: torch.Tensor, scale_2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Bring inputs to the batched form: (packed [E, M, K/2], scales 3-D, scale_2 fp32 [E] or [E, M], was_2d).

    A 2-D ``packed`` is one expert. ``scale_2`` may be a float, 0-d or ``[1]`` (same for every expert),
    ``[E]``, ``[E, M]``, or ``[M]`` with a 2-D ``packed`` (per row of the single expert).
    """
    was_2d = packed.dim() == 2
    if was_2d:
        packed = packed.unsqueeze(0)
        scales = scales.unsqueeze(0)
    if packed.dim() != 3 or scales.dim() != 3:
        raise ValueError(f"packed and scales must be [E, M, ...], got {tuple(packed.shape)} and {tuple(scales.shape)}")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed E2M1 must be uint8, got {packed.dtype}")
    if scales.dtype not in (torch.uint8, torch.float8_e4m3fn):
        raise TypeError(f"block scales must be float8_e4m3fn or uint8 bytes, got {scales.dtype}")
    e, m = packed.shape[0], packed.shape[1]
    s2 = torch.as_tensor(scale_2, dtype=torch.float32, device=packed.device)
    if s2.dim() == 0 or s2.shape == (1,) and e != 1:
        s2 = s2.reshape(1).expand(e)
    elif was_2d and s2.shape == (m,):
        s2 = s2.unsqueeze(0)
    if not (s2.shape == (e,) or s2.shape == (e, m)):
        raise ValueError(f"scale_2 must be [E]=[{e}] or [E, M]=[{e}, {m}], got {tuple(s2.shape)}")
    return packed, scales, s2, was_2d


def linear_scales(scales: torch.Tensor, rows: int, k16: int, swizzled: bool) -> torch.Tensor:
    """Block scales as linear float8_e4m3fn ``[E, rows, k16]`` (unswizzling each expert if needed)."""
    raw = scales.view(torch.uint8) if scales.dtype != torch.uint8 else scales
    if swizzled:
        mp, kp = padded_shape(rows, k16)
        if tuple(raw.shape[1:]) != (mp, kp):
            raise ValueError(f"swizzled scales are {tuple(raw.shape)}, expected [E, {mp}, {kp}] for [{rows}, {k16}]")
        raw = torch.stack([unswizzle_128x4(raw[e], rows, k16) for e in range(raw.shape[0])])
    elif tuple(raw.shape[1:]) != (rows, k16):
        raise ValueError(f"linear scales are {tuple(raw.shape)}, expected [E, {rows}, {k16}]")
    return raw.view(torch.float8_e4m3fn)


def _dequant_any_device(packed: torch.Tensor, block_scale: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """``nvfp4.dequantize`` with the LUT on the tensors' device (same ops, same order)."""
    if packed.device.type == "cpu":
        return nvfp4.dequantize(packed, block_scale, s2)
    lut = nvfp4._E2M1_LUT.to(packed.device)
    vals = lut[nvfp4.unpack_nibbles(packed).long()]
    s = block_scale.to(torch.float32).repeat_interleave(nvfp4.BLOCK, dim=-1)
    return (vals * s) * s2


def dequantize_nvfp4_ref(packed, scales, scale_2, *, swizzled: bool = False, rows=None,
                         out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Reference for :func:`nvfp4_fuse.kernels.dequant.dequantize_nvfp4`: [E, R, K] in ``out_dtype``."""
    packed, scales, s2, was_2d = as_batched(packed, scales, scale_2)
    e, m, k2 = packed.shape
    k16 = k2 // 8
    lin = linear_scales(scales, m, k16, swizzled)
    r0, r1 = (0, m) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= r0 <= r1 <= m:
        raise ValueError(f"rows {rows} out of range for M={m}")
    s2b = s2[:, r0:r1, None] if s2.dim() == 2 else s2[:, None, None]
    out = _dequant_any_device(packed[:, r0:r1], lin[:, r0:r1], s2b).to(out_dtype)
    return out[0] if was_2d else out


@dataclass
class CompareStats:
    """Per-expert statistics of A vs B (each a tensor of length E)."""

    max_abs: torch.Tensor   # fp32: max |A-B| (NaN-propagating; not finite when `nonfinite`)
    max_rel: torch.Tensor   # fp32: max |A-B| / |A| over A != 0
    n_diff: torch.Tensor    # int64: number of elements with A - B != 0 (-0 == +0; NaN, and inf - inf, count)
    nonfinite: torch.Tensor  # bool: some |A-B| is NaN or inf (A or B holds NaN/inf)


def compare_stats_from_values(a: torch.Tensor, b: torch.Tensor) -> CompareStats:
    """Stats of fp32 values ``a``, ``b`` of shape [E, M, K], with the kernel's semantics."""
    a = a.to(torch.float32).flatten(1)
    b = b.to(torch.float32).flatten(1)
    ad = (a - b).abs()
    rel = torch.where(a != 0, ad / a.abs(), torch.zeros_like(ad))
    max_abs = ad.amax(dim=1) if ad.shape[1] else torch.zeros(ad.shape[0], device=ad.device)
    max_rel = rel.amax(dim=1) if ad.shape[1] else torch.zeros(ad.shape[0], device=ad.device)
    return CompareStats(
        max_abs=max_abs,
        max_rel=max_rel,
        n_diff=((a - b) != 0).sum(dim=1),
        nonfinite=~torch.isfinite(max_abs),
    )


def compare_nvfp4_ref(a_packed, a_scales, a_scale_2, b_packed, b_scales, b_scale_2, *,
                      a_swizzled: bool = False, b_swizzled: bool = False) -> CompareStats:
    """Reference for :func:`nvfp4_fuse.kernels.compare.compare_nvfp4` (materialises fp32 values)."""
    a = dequantize_nvfp4_ref(a_packed, a_scales, a_scale_2, swizzled=a_swizzled, out_dtype=torch.float32)
    b = dequantize_nvfp4_ref(b_packed, b_scales, b_scale_2, swizzled=b_swizzled, out_dtype=torch.float32)
    if a.dim() == 2:
        a, b = a.unsqueeze(0), b.unsqueeze(0)
    if a.shape != b.shape:
        raise ValueError(f"A is {tuple(a.shape)} but B is {tuple(b.shape)}")
    return compare_stats_from_values(a, b)
