"""Fused dequant-and-compare of two NVFP4 encodings of the same logical [E, M, K] weights.

Reads A and B (packed nibbles, block scales linear or 128x4-swizzled, scale_2 per expert or per
row), dequantizes both in registers with exactly the math of ``dequant.py`` (so the values equal
``nvfp4_fuse.nvfp4.dequantize`` bit for bit) and writes only statistics: ~1.125 B/element of traffic
instead of materialising bf16 copies.

Per program (a "tile": ``BPP * NSUB`` consecutive 16-value blocks of one expert, row-major, walked as
NSUB sub-tiles of BPP blocks) it writes:

- ``max_abs``: max |A-B| in fp32, NaN-propagating (NaN/inf when A or B holds NaN/inf there);
- ``max_rel``: max |A-B| / |A| over elements with A != 0;
- ``n_diff``: count of elements whose fp32 difference A - B is not zero: A != B as values (-0 == +0),
  where any NaN counts as a difference, and so does an inf equal on both sides (inf - inf is NaN);
- ``nonfinite``: 1 when some |A-B| in the tile is NaN or inf (i.e. A or B is NaN/inf), else 0.

Sub-tiles whose packed words, scale bytes and scale_2 values are all identical (and whose values are
provably finite: no NaN scale byte, |scale_2| < 2^100) skip the arithmetic: their statistics are
zero by construction. That is the common case when a conversion only re-lays out the data.

On the GPU, ``max_rel`` uses the fast fp32 division (``div.approx.ftz.f32``, within 2 ulp of the rounded
quotient for |A| in [2^-126, 2^126]) unless ``exact_rel=True`` (``div.rn``, ~3x slower full path); ``max_abs``, ``n_diff`` and ``nonfinite`` are exact. Under the
interpreter every statistic is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# The launch's defaults (picked on an H100, docs/benchmarks.md "## Kernels") live in constants.py: the
# driver launch of a cached binary (nvfp4_fuse/driver_lane.py) reads them without importing this.
from ..constants import COMPARE_BPP, COMPARE_NSUB, COMPARE_WARPS
from ..kernel_cache import compare_ints
from .dequant import _e4m3_to_f32, _nibble, _swizzle_off, is_interpreted, prepare
from .reference import as_batched, dequantize_nvfp4_ref


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _load_raw(wa_ptr, sa_ptr, s2a_ptr, wb_ptr, sb_ptr, s2b_ptr, e, lb, M, K16, Mp, Kp, nblk,
              A_SWZ: tl.constexpr, A_ROW: tl.constexpr, B_SWZ: tl.constexpr, B_ROW: tl.constexpr,
              EVEN: tl.constexpr):
    """Raw loads for local blocks ``lb`` of expert ``e``: words [BPP, 2] and scale bytes [BPP] of
    both sides, and their scale_2 ([BPP, 1] per row, else scalars). Nothing here waits on a load."""
    mask = lb < nblk
    wofs = (e * M * K16 + lb)[:, None] * 2 + tl.arange(0, 2)[None, :]
    if EVEN:
        wa = tl.load(wa_ptr + wofs)
        wb = tl.load(wb_ptr + wofs)
    else:
        wa = tl.load(wa_ptr + wofs, mask=mask[:, None], other=0)
        wb = tl.load(wb_ptr + wofs, mask=mask[:, None], other=0)
    ba, s2a = _scale_loads(sa_ptr, s2a_ptr, e, lb, mask, M, K16, Mp, Kp, A_SWZ, A_ROW, EVEN)
    bb, s2b = _scale_loads(sb_ptr, s2b_ptr, e, lb, mask, M, K16, Mp, Kp, B_SWZ, B_ROW, EVEN)
    return wa, wb, ba, bb, s2a, s2b


@triton.jit
def _scale_loads(s_ptr, s2_ptr, e, lb, mask, M, K16, Mp, Kp,
                 SWIZZLED: tl.constexpr, S2_PER_ROW: tl.constexpr, EVEN: tl.constexpr):
    r = lb // K16
    if SWIZZLED:
        soff = e * Mp * Kp + _swizzle_off(r, lb - r * K16, Kp)
    else:
        soff = e * M * K16 + lb
    if EVEN:
        sbyte = tl.load(s_ptr + soff)
    else:
        sbyte = tl.load(s_ptr + soff, mask=mask, other=0)
    if S2_PER_ROW:
        if EVEN:
            s2 = tl.load(s2_ptr + e * M + r)[:, None]
        else:
            s2 = tl.load(s2_ptr + e * M + r, mask=mask, other=0.0)[:, None]
    else:
        s2 = tl.load(s2_ptr + e)
    return sbyte, s2


@triton.jit
def _compare_full(wa, wb, ba, bb, s2a, s2b, BPP: tl.constexpr, REL_RN: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """(max |a-b|, max |a-b|/|a| over a != 0, count of a-b != 0) over one sub-tile."""
    sa = (_e4m3_to_f32(ba.to(tl.int32)) * 3.3230699894622794e35)[:, None]  # * 2^118, see dequant.py
    sb = (_e4m3_to_f32(bb.to(tl.int32)) * 3.3230699894622794e35)[:, None]
    s2a = s2a * 256.0
    s2b = s2b * 256.0
    acc_abs = tl.zeros([BPP, 2], tl.float32)
    acc_rel = tl.zeros([BPP, 2], tl.float32)
    acc_cnt = tl.zeros([BPP, 2], tl.int32)
    for j in tl.static_range(8):
        a = (_nibble(wa, j) * sa) * s2a
        b = (_nibble(wb, j) * sb) * s2b
        ad = tl.abs(a - b)
        acc_abs = _max_nan(acc_abs, ad)
        if REL_RN:
            q = tl.math.div_rn(ad, tl.abs(a))
        elif INTERPRET:
            q = ad / tl.abs(a)  # the interpreter has no libdevice; numpy divides exactly
        else:
            q = tl.abs(libdevice.fast_dividef(ad, a))  # div.approx: 2 instructions; div.full costs ~7
        acc_rel = _max_nan(acc_rel, tl.where(a != 0, q, 0.0))
        # |a-b| as int bits is 0 for equal values (-0 == +0) and > 0 otherwise, NaN included
        acc_cnt += tl.minimum(ad.to(tl.int32, bitcast=True), 1)
    t_abs = tl.reduce(tl.reshape(acc_abs, [2 * BPP]), 0, _max_nan)
    t_rel = tl.reduce(tl.reshape(acc_rel, [2 * BPP]), 0, _max_nan)
    return t_abs, t_rel, tl.sum(acc_cnt)


@triton.jit
def _compare_kernel(wa_ptr, sa_ptr, s2a_ptr, wb_ptr, sb_ptr, s2b_ptr,
                    abs_ptr, rel_ptr, cnt_ptr, flag_ptr,
                    M, K16, Mp, Kp, nblk, T,
                    BPP: tl.constexpr, NSUB: tl.constexpr, A_SWZ: tl.constexpr, A_ROW: tl.constexpr,
                    B_SWZ: tl.constexpr, B_ROW: tl.constexpr, EVEN: tl.constexpr,
                    FAST_PATH: tl.constexpr, REL_RN: tl.constexpr, INTERPRET: tl.constexpr):
    """One program = one tile = NSUB sub-tiles of BPP blocks, walked in order with the next
    sub-tile's loads issued before the current one is processed."""
    t = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    lb0 = t * (BPP * NSUB) + tl.arange(0, BPP)
    wa, wb, ba, bb, s2a, s2b = _load_raw(wa_ptr, sa_ptr, s2a_ptr, wb_ptr, sb_ptr, s2b_ptr, e, lb0,
                                         M, K16, Mp, Kp, nblk, A_SWZ, A_ROW, B_SWZ, B_ROW, EVEN)
    t_abs = tl.zeros([], tl.float32)
    t_rel = tl.zeros([], tl.float32)
    t_cnt = tl.zeros([], tl.int32)
    for i in range(NSUB):
        # prefetch (the last iteration re-reads its own sub-tile: an L2 hit, and no branch)
        nxt = lb0 + tl.minimum(i + 1, NSUB - 1) * BPP
        wa2, wb2, ba2, bb2, s2a2, s2b2 = _load_raw(wa_ptr, sa_ptr, s2a_ptr, wb_ptr, sb_ptr, s2b_ptr, e, nxt,
                                                   M, K16, Mp, Kp, nblk, A_SWZ, A_ROW, B_SWZ, B_ROW, EVEN)
        if FAST_PATH:
            # identical words, scale bytes and scale_2, no NaN scale byte, |scale_2| < 2^100: every
            # value is equal and finite, so the sub-tile adds nothing. (int32 products, not `&`: the
            # interpreter cannot broadcast a scalar bool.)
            same_blk = ((ba == bb) & ((ba & 0x7F) != 0x7F)).to(tl.int32)[:, None] * (wa == wb).to(tl.int32)
            s2_ok = (s2a == s2b).to(tl.int32) * (tl.abs(s2a) < 1.2676506002282294e30).to(tl.int32)
            if tl.sum(same_blk * s2_ok) != 2 * BPP:
                s_abs, s_rel, s_cnt = _compare_full(wa, wb, ba, bb, s2a, s2b, BPP, REL_RN, INTERPRET)
                t_abs = _max_nan(t_abs, s_abs)
                t_rel = _max_nan(t_rel, s_rel)
                t_cnt += s_cnt
        else:
            s_abs, s_rel, s_cnt = _compare_full(wa, wb, ba, bb, s2a, s2b, BPP, REL_RN, INTERPRET)
            t_abs = _max_nan(t_abs, s_abs)
            t_rel = _max_nan(t_rel, s_rel)
            t_cnt += s_cnt
        wa, wb, ba, bb, s2a, s2b = wa2, wb2, ba2, bb2, s2a2, s2b2
    tile = e * T + t
    tl.store(abs_ptr + tile, t_abs)
    tl.store(rel_ptr + tile, t_rel)
    tl.store(cnt_ptr + tile, t_cnt)
    tl.store(flag_ptr + tile, (t_abs <= 3.4028234663852886e38) == 0)  # NaN or inf


@dataclass
class CompareResult:
    """Per-expert statistics (tensors of length E, on the inputs' device) and the per-tile raw ones."""

    max_abs: torch.Tensor    # fp32
    max_rel: torch.Tensor    # fp32
    n_diff: torch.Tensor     # int64
    nonfinite: torch.Tensor  # bool
    elements_per_expert: int
    tiles: dict[str, torch.Tensor]  # "max_abs"/"max_rel"/"n_diff"/"nonfinite": [E, T]

    @property
    def equal(self) -> torch.Tensor:
        """bool [E]: the expert's A and B are equal in value everywhere and finite."""
        return (self.n_diff == 0) & ~self.nonfinite

    def first_bad_expert(self) -> int | None:
        bad = (~self.equal).nonzero()
        return int(bad[0, 0]) if bad.numel() else None


def compare_tiles(a_packed, a_scales, a_scale_2, b_packed, b_scales, b_scale_2, *,
                  a_swizzled: bool = False, b_swizzled: bool = False, exact_rel: bool = False,
                  fast_path: bool = True, check: bool = True, bpp: int | None = None,
                  nsub: int | None = None, num_warps: int | None = None,
                  kernel_out: list | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Launch the compare kernel only: returns ({stat: [E, T] per-tile tensor}, elements per expert).
    ``kernel_out`` (a list) gets Triton's compiled kernel appended (None under the interpreter, or
    when there was nothing to launch): what :mod:`nvfp4_fuse.kernel_cache` keeps."""
    A = prepare(a_packed, a_scales, a_scale_2, a_swizzled, check)
    B = prepare(b_packed, b_scales, b_scale_2, b_swizzled, check)
    wa, sa, s2a, e, m, k16, _, _, a_row, _ = A
    wb, sb, s2b, eb, mb, k16b, _, _, b_row, _ = B
    if (e, m, k16) != (eb, mb, k16b):
        raise ValueError(f"A is [E, M, K] = {[e, m, k16 * 16]} but B is {[eb, mb, k16b * 16]}")
    if wa.device != wb.device:
        raise ValueError("A and B must be on one device")
    bpp = bpp or COMPARE_BPP
    nsub = nsub or COMPARE_NSUB
    # the kernel's integer arguments, as a launch of its cached binary passes them (kernel_cache.py)
    ints = compare_ints(m, k16 * 16, bpp, nsub)
    mp, kp, nblk, T = ints["Mp"], ints["Kp"], ints["nblk"], ints["T"]
    dev = wa.device
    tiles = {  # every program writes its tile's four entries
        "max_abs": torch.empty((e, T), dtype=torch.float32, device=dev),
        "max_rel": torch.empty((e, T), dtype=torch.float32, device=dev),
        "n_diff": torch.empty((e, T), dtype=torch.int32, device=dev),
        "nonfinite": torch.empty((e, T), dtype=torch.int8, device=dev),
    }
    compiled = None
    if T and e:
        compiled = _compare_kernel[(T, e)](
            wa, sa, s2a, wb, sb, s2b, tiles["max_abs"], tiles["max_rel"], tiles["n_diff"], tiles["nonfinite"],
            m, k16, mp, kp, nblk, T,
            BPP=bpp, NSUB=nsub, A_SWZ=a_swizzled, A_ROW=a_row, B_SWZ=b_swizzled, B_ROW=b_row,
            EVEN=nblk % (bpp * nsub) == 0, FAST_PATH=fast_path, REL_RN=exact_rel, INTERPRET=is_interpreted(_compare_kernel),
            num_warps=num_warps or COMPARE_WARPS, enable_fp_fusion=False)
    if kernel_out is not None:
        kernel_out.append(compiled)
    return tiles, m * k16 * 16


def compare_nvfp4(a_packed, a_scales, a_scale_2, b_packed, b_scales, b_scale_2, *,
                  a_swizzled: bool = False, b_swizzled: bool = False, exact_rel: bool = False,
                  fast_path: bool = True, check: bool = True, bpp: int | None = None,
                  nsub: int | None = None, num_warps: int | None = None) -> CompareResult:
    """Compare two NVFP4 encodings of the same [E, M, K] weights without materialising them.

    Each side: packed uint8 [E, M, K/2]; scales float8_e4m3fn/uint8, linear [E, M, K/16] or
    (``*_swizzled``) 128x4-swizzled [E, Mp, Kp]; scale_2 fp32 [E] or [E, M]. 2-D inputs are one
    expert. ``exact_rel`` makes max_rel use the correctly rounded division on the GPU too;
    ``fast_path`` lets identical tiles skip the arithmetic; ``check`` as in ``dequantize_nvfp4``.
    """
    tiles, per_expert = compare_tiles(
        a_packed, a_scales, a_scale_2, b_packed, b_scales, b_scale_2, a_swizzled=a_swizzled,
        b_swizzled=b_swizzled, exact_rel=exact_rel, fast_path=fast_path, check=check, bpp=bpp,
        nsub=nsub, num_warps=num_warps)
    t_abs, t_rel, t_cnt, t_flag = tiles["max_abs"], tiles["max_rel"], tiles["n_diff"], tiles["nonfinite"]
    e, T = t_abs.shape
    dev = t_abs.device
    if T == 0:
        zero = torch.zeros(e, dtype=torch.float32, device=dev)
        return CompareResult(zero, zero.clone(), torch.zeros(e, dtype=torch.int64, device=dev),
                             torch.zeros(e, dtype=torch.bool, device=dev), per_expert, tiles)
    return CompareResult(
        max_abs=t_abs.amax(dim=1),
        max_rel=t_rel.amax(dim=1),
        n_diff=t_cnt.sum(dim=1, dtype=torch.int64),
        nonfinite=(t_flag != 0).any(dim=1),
        elements_per_expert=per_expert,
        tiles=tiles,
    )


@dataclass
class Difference:
    expert: int
    row: int
    col: int
    a: float
    b: float


def first_difference(expert: int, a_packed, a_scales, a_scale_2, b_packed, b_scales, b_scale_2, *,
                     a_swizzled: bool = False, b_swizzled: bool = False) -> Difference | None:
    """First (row, col), row-major, of ``expert`` where A != B or either is NaN/inf; None if none.

    Runs the torch reference on that one expert only (fp32 values), on the inputs' device.
    """
    def one(packed, scales, scale_2):
        p, s, s2, _ = as_batched(packed, scales, scale_2)
        return p[expert:expert + 1], s[expert:expert + 1], s2[expert:expert + 1]

    a = dequantize_nvfp4_ref(*one(a_packed, a_scales, a_scale_2), swizzled=a_swizzled, out_dtype=torch.float32)[0]
    b = dequantize_nvfp4_ref(*one(b_packed, b_scales, b_scale_2), swizzled=b_swizzled, out_dtype=torch.float32)[0]
    bad = (a != b) | ~torch.isfinite(a) | ~torch.isfinite(b)
    idx = bad.flatten().nonzero()
    if not idx.numel():
        return None
    i = int(idx[0, 0])
    row, col = divmod(i, a.shape[1])
    return Difference(expert=expert, row=row, col=col, a=float(a[row, col]), b=float(b[row, col]))
