"""The converter's per-expert byte transforms, in numpy: no torch import on the conversion path.

Importing torch costs 2.5 s on the 2-vCPU bench machine and 5 s on the GPU host (CUDA build), which is
most of the gap between converting a few-GB checkpoint and copying it. Everything `convert` does to
bytes is a permutation, a zero pad or (for a gate/up scale_2 merge) an E4M3 rounding, so it is done
here on uint8 arrays. The torch functions in ``swizzle.py``, ``mega_moe.py`` and ``nvfp4.py`` stay the
references: the tests pin every function here to them, byte for byte.

All arrays are one expert's: uint8 block scales [rows, K/16] in ModelOpt's natural layout.
"""

from __future__ import annotations

import numpy as np

from .constants import (
    E4M3_MAX,
    E4M3_MIN_SUBNORMAL,
    K_PER_WORD,
    KERNEL_DIM_MULTIPLE,
    SCALES_PER_WORD,
    SWIZZLE_COLS,
    SWIZZLE_ROWS,
    UTCCP_BLOCK,
)

# ---------------------------------------------------------------------------------------------------
# E4M3 (float8_e4m3fn): bytes <-> values


def _e4m3_table() -> np.ndarray:
    vals = np.empty(256, dtype=np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e, m = (b >> 3) & 0xF, b & 0x7
        if e == 0xF and m == 0x7:
            vals[b] = np.nan
        elif e == 0:
            vals[b] = sign * m * 2.0**-9
        else:
            vals[b] = sign * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return vals


E4M3_VALUES = _e4m3_table()  # byte -> float32 value (NaN for 0x7F and 0xFF)
_POSITIVE = E4M3_VALUES[: 0x7F].astype(np.float64)  # 0x00..0x7E: increasing with the byte value


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> E4M3 bytes, round to nearest even, for 0 and values in [2^-9, 448] (see rescale)."""
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    hi = np.searchsorted(_POSITIVE, x, side="left").clip(0, 0x7E)
    lo = (hi - 1).clip(0, 0x7E)
    d_lo = x - _POSITIVE[lo]  # exact: both are float32 values, the difference fits a float64
    d_hi = _POSITIVE[hi] - x
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))  # a tie goes to the even mantissa
    out = np.where(pick_hi, hi, lo)
    return np.where(d_hi == 0, hi, out).astype(np.uint8)


def check_block_scale_bytes(raw: np.ndarray) -> int | None:
    """Flat index of the first E4M3 byte that is NaN (0x7F, 0xFF) or negative (sign bit), else None."""
    b = raw.reshape(-1)
    if b.size == 0 or int(b.max()) < 0x7F:
        return None
    return int(np.flatnonzero(b >= 0x7F)[0])


def _rescale_elementwise(raw: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per element: the rescaled byte, whether the exact product is nonzero, and its relative change."""
    exact = E4M3_VALUES[raw] * np.float32(ratio)  # float32 * float32, rounded once, as torch does
    y = np.minimum(exact, np.float32(E4M3_MAX))
    y = np.where(y > 0, np.maximum(y, np.float32(E4M3_MIN_SUBNORMAL)), np.float32(0))
    new = e4m3_encode(y)
    nz = exact != 0
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = np.abs(E4M3_VALUES[new] - exact) / exact
    return new, nz, rel


_ALL_BYTES = np.arange(256, dtype=np.uint8)
_NONE = 255  # rank of a byte whose exact product is 0 (there are at least two: +0 and -0)


def rescale_block_scales(raw: np.ndarray, ratio: float) -> tuple[np.ndarray, float]:
    """Multiply E4M3 block scales by ``ratio`` and round back to E4M3 (RNE; clamped to [2^-9, 448],
    exact zeros kept), as :func:`nvfp4.rescale_block_scales` does in torch.

    Returns the new bytes and the largest relative change of a scale against the exact product.

    A new byte depends only on the old byte and the ratio, so the rounding runs once on the 256
    byte values and each scale is a table lookup (``bytes.translate``, a C loop; numpy's fancy indexing
    widens every index to 8 bytes first). The largest change is that of the present byte whose change
    ranks first (NaN, then largest), found with a second lookup and a min. Element by element, the
    float64 search of the rounding took most of a conversion's CPU time when every expert had a half to
    rescale.
    """
    if ratio == 1.0:
        return raw, 0.0
    table, nz, rel = _rescale_elementwise(_ALL_BYTES, ratio)
    data = np.ascontiguousarray(raw, dtype=np.uint8).tobytes()
    new = np.frombuffer(bytearray(data).translate(table.tobytes()), dtype=np.uint8).reshape(raw.shape)
    if not data:
        return new, 0.0
    counted = np.flatnonzero(nz)
    order = counted[np.lexsort((-np.nan_to_num(rel[counted], nan=0.0), ~np.isnan(rel[counted])))]
    rank = np.full(256, _NONE, dtype=np.uint8)
    rank[order] = np.arange(order.size, dtype=np.uint8)
    first = int(np.frombuffer(data.translate(rank.tobytes()), dtype=np.uint8).min())
    return new, (0.0 if first == _NONE else float(rel[order[first]]))


# ---------------------------------------------------------------------------------------------------
# the 128x4 swizzle (the gate/up row order is layout.RowOrder's, for weights and scales alike)


def roundup(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def padded_shape(rows: int, k16: int) -> tuple[int, int]:
    """One expert's [rows, K/16] scales padded for the 128x4 swizzle: [roundup(rows,128), roundup(K/16,4)]."""
    return roundup(rows, SWIZZLE_ROWS), roundup(k16, SWIZZLE_COLS)


def swizzle_128x4(raw: np.ndarray) -> np.ndarray:
    """uint8 [M, K16] -> [roundup(M,128), roundup(K16,4)], swizzled (see ``swizzle.py``), padding 0."""
    m, k = raw.shape
    mp, kp = padded_shape(m, k)
    if (mp, kp) != (m, k):
        pad = np.zeros((mp, kp), dtype=np.uint8)
        pad[:m, :k] = raw
        raw = pad
    return np.ascontiguousarray(raw.reshape(mp // 128, 4, 32, kp // 4, 4).transpose(0, 3, 2, 1, 4)).reshape(mp, kp)


def unswizzle_128x4(stored: np.ndarray, m: int, k16: int) -> np.ndarray:
    """Inverse of :func:`swizzle_128x4`: one expert's stored bytes -> uint8 [m, k16] (a copy)."""
    mp, kp = padded_shape(m, k16)
    tiles = np.ascontiguousarray(stored).reshape(-1).view(np.uint8).reshape(mp // 128, kp // 4, 32, 4, 4)
    return np.ascontiguousarray(tiles.transpose(0, 3, 2, 1, 4).reshape(mp, kp)[:m, :k16])


# ---------------------------------------------------------------------------------------------------
# DeepGEMM NVFP4 MegaMoE scales


def mega_moe_shape_problems(rows: int, cols: int, *, kernel_rules: bool = True) -> list[str]:
    """Why a GEMM operand of logical shape [rows=N, cols=K] does not fit the layout (empty: it fits).

    Always: N > 0 and N % 128 == 0 (UTCCP works on 128-row blocks; it also makes the 8-row gate/up
    interleave and the TMA alignment exact, so nothing is padded), K > 0 and K % 64 == 0 (four
    16-value E4M3 scales per int32 word). With ``kernel_rules`` (the default) also N % 512 == 0 and
    K % 512 == 0: DeepGEMM's NVFP4 kernel asserts hidden % 512 == 0 and intermediate % 512 == 0,
    and N, K are hidden / 2*intermediate (w13) or hidden / intermediate (w2).
    """
    problems = []
    if rows <= 0 or rows % UTCCP_BLOCK:
        problems.append(f"rows N={rows} must be a positive multiple of {UTCCP_BLOCK} (UTCCP 128-row blocks)")
    if cols <= 0 or cols % K_PER_WORD:
        problems.append(
            f"columns K={cols} must be a positive multiple of {K_PER_WORD} "
            f"({SCALES_PER_WORD} E4M3 scales of 16 values per int32)"
        )
    if kernel_rules:
        if rows > 0 and rows % KERNEL_DIM_MULTIPLE:
            problems.append(
                f"rows N={rows} must be a multiple of {KERNEL_DIM_MULTIPLE} "
                "(fp4_fp4_mega_moe needs hidden and intermediate sizes that are multiples of 512)"
            )
        if cols > 0 and cols % KERNEL_DIM_MULTIPLE:
            problems.append(
                f"columns K={cols} must be a multiple of {KERNEL_DIM_MULTIPLE} "
                "(fp4_fp4_mega_moe needs hidden and intermediate sizes that are multiples of 512)"
            )
    return problems


def check_mega_moe_shape(rows: int, cols: int, what: str, *, kernel_rules: bool = True) -> None:
    """``ValueError`` naming ``what`` unless [rows, cols] fits (see :func:`mega_moe_shape_problems`)."""
    problems = mega_moe_shape_problems(rows, cols, kernel_rules=kernel_rules)
    if problems:
        raise ValueError(f"mega-moe layout does not fit {what} [{rows}, {cols}]: " + "; ".join(problems))


def mega_moe_scales(raw: np.ndarray) -> np.ndarray:
    """uint8 [N, K/16] (w13 rows already interleaved) -> the on-disk little-endian int32 [K/64, N].

    Packing four consecutive K-group scales into a little-endian int32 (byte j = group 4p+j) is a
    reinterpretation of the row's bytes; then the UTCCP row permutation inside every 128-row block
    (new row b*4+a = old row a*32+b) and the transpose to MN-major storage.
    """
    n, k16 = raw.shape
    if n % UTCCP_BLOCK or k16 % SCALES_PER_WORD:
        raise ValueError(f"mega-moe scales need rows % {UTCCP_BLOCK} == 0 and K/16 % {SCALES_PER_WORD} == 0, got [{n}, {k16}]")
    words = np.ascontiguousarray(raw).view("<i4")  # [N, K/64]
    c = words.shape[1]
    permuted = words.reshape(n // UTCCP_BLOCK, 4, 32, c).transpose(0, 2, 1, 3).reshape(n, c)
    return np.ascontiguousarray(permuted.T)


def mega_moe_natural(stored: np.ndarray, n: int, k16: int) -> np.ndarray:
    """Inverse of :func:`mega_moe_scales`: one expert's stored words (or their bytes) -> uint8 [N, K/16],
    in one strided copy of 4-byte words: word [p, row b*4+a of block g] is row g*128+a*32+b's group p."""
    c = k16 // SCALES_PER_WORD
    words = np.ascontiguousarray(stored).reshape(-1).view("<i4").reshape(c, n // UTCCP_BLOCK, 32, 4)
    return np.ascontiguousarray(words.transpose(1, 3, 2, 0)).reshape(n, c).view(np.uint8).reshape(n, k16)

