"""The 128x4 block-scale swizzle read by CUTLASS/cuBLAS/FlashInfer-style NVFP4 GEMMs.

For one expert's scale matrix S[M, K16]: pad to Mp = roundup(M, 128), Kp = roundup(K16, 4) with
zero bytes, then scale (m, k) lands at byte
    (m//128)*(Kp//4)*512 + (k//4)*512 + (m%32)*16 + ((m%128)//32)*4 + (k%4)
Each expert is padded and swizzled on its own; experts are concatenated.
"""

from __future__ import annotations

import torch

from .host_layout import padded_shape  # shared with the converter's numpy path


def swizzle_offset(m: int, k: int, kp: int) -> int:
    """Byte offset of scale (m, k) in a padded swizzled block with Kp columns (the formula itself)."""
    return (m // 128) * (kp // 4) * 512 + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4)


def swizzle_128x4(scale: torch.Tensor) -> torch.Tensor:
    """[M, K16] (any 1-byte dtype) -> [Mp, Kp] of the same dtype, swizzled, padding zero."""
    if scale.dim() != 2:
        raise ValueError("swizzle_128x4 takes one expert's 2-D scale matrix")
    raw = scale.view(torch.uint8) if scale.dtype != torch.uint8 else scale
    m, k = raw.shape
    mp, kp = padded_shape(m, k)
    pad = torch.zeros((mp, kp), dtype=torch.uint8)
    pad[:m, :k] = raw
    out = pad.reshape(mp // 128, 4, 32, kp // 4, 4).permute(0, 3, 2, 1, 4).reshape(mp, kp).contiguous()
    return out.view(scale.dtype)


def unswizzle_128x4(buf: torch.Tensor, rows: int, k16: int) -> torch.Tensor:
    """Inverse of :func:`swizzle_128x4`: [Mp, Kp] -> [rows, k16]."""
    raw = buf.view(torch.uint8) if buf.dtype != torch.uint8 else buf
    mp, kp = padded_shape(rows, k16)
    if tuple(raw.shape) != (mp, kp):
        raise ValueError(f"swizzled buffer is {tuple(raw.shape)}, expected {(mp, kp)} for [{rows}, {k16}]")
    nat = raw.reshape(mp // 128, kp // 4, 32, 4, 4).permute(0, 3, 2, 1, 4).reshape(mp, kp)
    return nat[:rows, :k16].contiguous().view(buf.dtype)
