"""Compressed block scales (CSF): exact decoders of the encodings a ModelOpt checkpoint may declare in
``weight_scale_encoding``, and an encoder for sample checkpoints and tests.

vLLM 0.34 reads NVFP4 block scales stored as several ``<name>.<stream>`` tensors, ``<name>`` being
the scale's own name (``...gate_proj.weight_scale``), and rebuilds the E4M3 bytes of ``<name>`` at
load (``nvfp4_utils.csf_weights_transform``). Two encodings, of a ``[rows, cols]`` uint8 matrix:

- ``csf``: ``nvfp4_csf_fixed`` (U8 ``[rows / 16, 16 * (1 + cols / 2)]``): per slab of 16 rows, one
  base byte per row, then the 16 rows' 4-bit codes, two a byte, low nibble first; a byte is
  ``base + code``. ``nvfp4_csf_exceptions`` (U32, sorted): the low 24 bits of a word are a flat
  ``row * cols + col`` position, the high 8 replace that byte.
- ``csf_32x2_v1``: ``csf32_bases`` (U8, a base a row) and ``csf32_codes`` (U8, 4-bit codes two a
  byte) cover blocks of 32 rows x 2 columns, taken tile by tile (128 x 4, tiles row-major; in a
  tile, column pair by pair, then the 4 row blocks; blocks past the matrix's edge left out, a last
  odd column giving 1-column blocks), 32 tiles a page. ``csf32_exceptions`` (U16): the in-block
  position ``2 * row + col`` in the low byte, the byte in the high one, sorted within a block;
  ``csf32_page_bases`` (U32, byte offset of each page's first exception) and ``csf32_offsets`` (U16,
  per page a 0, then each block's exception end relative to the page) index them.

:func:`decode` refuses every stream vLLM's decoder refuses (and nothing it accepts), raising
:class:`StreamError` naming the stream; what it returns is byte for byte what vLLM rebuilds.
Pure numpy functions: no files, no torch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

CSF = "csf"
CSF_32X2 = "csf_32x2_v1"
# encoding -> its streams, in a fixed order
ENCODINGS: dict[str, tuple[str, ...]] = {
    CSF: ("nvfp4_csf_fixed", "nvfp4_csf_exceptions"),
    CSF_32X2: ("csf32_bases", "csf32_codes", "csf32_page_bases", "csf32_offsets", "csf32_exceptions"),
}
# stream -> safetensors dtype
STREAM_DTYPES = {
    "nvfp4_csf_fixed": "U8",
    "nvfp4_csf_exceptions": "U32",
    "csf32_bases": "U8",
    "csf32_codes": "U8",
    "csf32_page_bases": "U32",
    "csf32_offsets": "U16",
    "csf32_exceptions": "U16",
}
STREAM_ENCODING = {s: enc for enc, streams in ENCODINGS.items() for s in streams}
_NUMPY = {"U8": np.dtype(np.uint8), "U16": np.dtype("<u2"), "U32": np.dtype("<u4")}
MAX_BASE = 240  # a base leaves room for code 15 in a byte
CSF_MAX_CELLS = 1 << 24  # csf exception positions are 24-bit


class StreamError(ValueError):
    """A stream that does not decode; ``stream`` names it (one of :data:`STREAM_DTYPES`)."""

    def __init__(self, stream: str, message: str):
        super().__init__(message)
        self.stream = stream


def numpy_dtype(stream: str) -> np.dtype:
    """The little-endian numpy dtype a stream's bytes are read as."""
    return _NUMPY[STREAM_DTYPES[stream]]


# ---------------------------------------------------------------------------------------------------
# shapes, from headers alone


def decoded_shape(encoding: str, dtypes: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int]:
    """``(rows, cols)`` of the matrix a stream set decodes to, from the streams' safetensors dtypes and
    shapes; :class:`StreamError` for every check that needs no stream content."""
    for s in ENCODINGS[encoding]:
        if dtypes[s] != STREAM_DTYPES[s]:
            raise StreamError(s, f"{encoding} stream {s} must be {STREAM_DTYPES[s]}, not {dtypes[s]}")
    if encoding == CSF:
        return _csf_shape(tuple(shapes["nvfp4_csf_fixed"]))
    rows = math.prod(shapes["csf32_bases"])
    geo = _csf32_counts(rows, math.prod(shapes["csf32_codes"]))
    for s, want in (("csf32_page_bases", geo.pages), ("csf32_offsets", geo.blocks + geo.pages)):
        if math.prod(shapes[s]) != want:
            raise StreamError(s, f"{s} has {math.prod(shapes[s])} entries, {want} for a [{rows}, {geo.cols}] scale")
    return rows, geo.cols


def _csf_shape(fixed_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(fixed_shape) != 2 or fixed_shape[1] % 16 or fixed_shape[1] < 16:
        raise StreamError(
            "nvfp4_csf_fixed", f"csf fixed stream must be [rows / 16, 16 * (1 + cols / 2)], not {list(fixed_shape)}"
        )
    rows, cols = 16 * fixed_shape[0], 2 * (fixed_shape[1] // 16 - 1)
    if rows * cols > CSF_MAX_CELLS:
        raise StreamError("nvfp4_csf_fixed", f"a csf scale of [{rows}, {cols}] has more cells than 24-bit positions reach")
    return rows, cols


@dataclass(frozen=True)
class _Counts:
    cols: int
    blocks: int
    pages: int


def _csf32_counts(rows: int, code_bytes: int) -> _Counts:
    cols = 2 * code_bytes // max(rows, 1)
    if rows % 32 or cols == 0 or rows * cols != 2 * code_bytes:
        raise StreamError(
            "csf32_codes", f"csf_32x2_v1 needs rows a multiple of 32 and 2 codes a byte: {rows} rows, {code_bytes} code bytes"
        )
    tiles = -(-rows // 128) * -(-cols // 4)
    return _Counts(cols, (rows // 32) * -(-cols // 2), -(-tiles // 32))


@dataclass(frozen=True)
class _Geometry:
    """The 32x2 blocks of a ``[rows, cols]`` matrix in storage order (a few entries a block)."""

    r0: np.ndarray  # first row of each block
    c0: np.ndarray  # first column
    width: np.ndarray  # 2, or 1 for the last odd column
    page: np.ndarray  # page of each block
    first: np.ndarray  # first block of each page


@functools.lru_cache(maxsize=16)
def _geometry(rows: int, cols: int) -> _Geometry:
    tiles_r, tiles_c = -(-rows // 128), -(-cols // 4)
    tr, tc, pair, blk = (a.ravel() for a in np.meshgrid(np.arange(tiles_r), np.arange(tiles_c), np.arange(2), np.arange(4), indexing="ij"))
    r0, c0 = 128 * tr + 32 * blk, 4 * tc + 2 * pair
    page = (tr * tiles_c + tc) // 32
    keep = (r0 < rows) & (c0 < cols)
    r0, c0, page = r0[keep], c0[keep], page[keep]
    width = np.minimum(cols - c0, 2)
    first = np.flatnonzero(np.diff(page, prepend=-1))
    for a in (r0, c0, width, page, first):
        a.flags.writeable = False
    return _Geometry(r0, c0, width, page, first)


def _tile_groups(rows: int, cols: int) -> tuple[list[tuple[int, int]], int, tuple[int, ...]]:
    """The storage order as reshapes: (tile rows, row blocks in each) for the full 128-row tile rows
    and a last partial one; the number of full 4-column tiles a tile row; the widths of the column
    pairs of its last, partial tile (none, [1], [2] or [2, 1])."""
    groups = [(n, nb) for n, nb in ((rows // 128, 4), (int(rows % 128 > 0), (rows % 128) // 32)) if n]
    return groups, cols // 4, {0: (), 1: (1,), 2: (2,), 3: (2, 1)}[cols % 4]


def _tiles_to_matrix(packed: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Codes packed two a byte in 32x2-block storage order -> the ``[rows, cols]`` matrix (reshapes and
    transposes; the blocks cover every cell once). In a 2-column block a byte holds one row's two
    codes, so full tiles move as 2-byte words, each a byte unpacked to (low, high) nibble."""
    pairs = np.empty(packed.size, dtype="<u2")  # byte b -> bytes (b & 0xF, b >> 4), little-endian
    np.bitwise_or(packed & 0xF, (packed.astype(np.uint16) & 0xF0) << 4, out=pairs)
    code = pairs.view(np.uint8)  # the codes in storage order
    out = np.empty((rows, cols), dtype=np.uint8)
    groups, full, widths = _tile_groups(rows, cols)
    pos = r = 0
    for n, nb in groups:
        nr, per = n * 32 * nb, 32 * nb * cols
        k = full * 128 * nb
        words = pairs[pos // 2 : (pos + n * per) // 2].reshape(n, per // 2)[:, : k // 2]
        block = words.reshape(n, full, 2, nb, 32).transpose(0, 3, 4, 1, 2).reshape(nr, 2 * full)
        out[r : r + nr, : 4 * full] = np.ascontiguousarray(block).view(np.uint8)
        seg = code[pos : pos + n * per].reshape(n, per)
        c = 4 * full
        for w in widths:
            out[r : r + nr, c : c + w] = seg[:, k : k + 32 * nb * w].reshape(nr, w)
            c, k = c + w, k + 32 * nb * w
        pos, r = pos + n * per, r + nr
    return out


def _matrix_to_tiles(m: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_tiles_to_matrix`: a ``[rows, cols]`` matrix's cells in storage order."""
    rows, cols = m.shape
    out = np.empty(rows * cols, dtype=m.dtype)
    groups, full, widths = _tile_groups(rows, cols)
    pos = r = 0
    for n, nb in groups:
        nr, per = n * 32 * nb, 32 * nb * cols
        seg = out[pos : pos + n * per].reshape(n, per)
        k = full * 128 * nb
        seg[:, :k] = m[r : r + nr, : 4 * full].reshape(n, nb, 32, full, 2, 2).transpose(0, 3, 4, 1, 2, 5).reshape(n, k)
        c = 4 * full
        for w in widths:
            seg[:, k : k + 32 * nb * w] = m[r : r + nr, c : c + w].reshape(n, 32 * nb * w)
            c, k = c + w, k + 32 * nb * w
        pos, r = pos + n * per, r + nr
    return out


# ---------------------------------------------------------------------------------------------------
# decoding


def decode(encoding: str, streams: Mapping[str, np.ndarray]) -> np.ndarray:
    """The uint8 ``[rows, cols]`` matrix (the E4M3 bytes) a stream set encodes; each stream an array of
    its dtype (:func:`numpy_dtype`) and header shape. :class:`StreamError` for a set that does not
    decode."""
    for s in ENCODINGS[encoding]:
        if streams[s].dtype != numpy_dtype(s):
            raise StreamError(s, f"{encoding} stream {s} must be {STREAM_DTYPES[s]}, not {streams[s].dtype}")
    if encoding == CSF:
        return _decode_csf(streams["nvfp4_csf_fixed"], streams["nvfp4_csf_exceptions"])
    return _decode_csf32(*(streams[s] for s in ENCODINGS[CSF_32X2]))


def _check_bases(stream: str, bases: np.ndarray) -> None:
    if bases.size and int(bases.max()) > MAX_BASE:
        r = int(np.argmax(bases > MAX_BASE))
        raise StreamError(stream, f"row base at row {r} is {int(bases[r])}, above {MAX_BASE}")


def _decode_csf(fixed: np.ndarray, exceptions: np.ndarray) -> np.ndarray:
    rows, cols = _csf_shape(fixed.shape)
    slabs = fixed  # [rows / 16, 16 * (1 + cols / 2)], checked
    bases = slabs[:, :16].reshape(rows)
    _check_bases("nvfp4_csf_fixed", bases)
    packed = slabs[:, 16:].reshape(rows, cols // 2)
    out = np.empty((rows, cols), dtype=np.uint8)
    out[:, 0::2] = packed & 0xF
    out[:, 1::2] = packed >> 4
    out += bases[:, None]
    words = exceptions.reshape(-1)
    pos = words & 0xFFFFFF
    if pos.size:
        bad = np.flatnonzero(pos[1:] <= pos[:-1])
        if bad.size or pos[-1] >= rows * cols:
            k = int(bad[0]) + 1 if bad.size else pos.size - 1
            raise StreamError(
                "nvfp4_csf_exceptions",
                f"exception {k} is at position {int(pos[k])}: positions must increase and stay below {rows * cols}",
            )
    out.reshape(-1)[pos] = (words >> 24).astype(np.uint8)
    return out


def _decode_csf32(
    bases: np.ndarray, codes: np.ndarray, page_bases: np.ndarray, offsets: np.ndarray, exceptions: np.ndarray
) -> np.ndarray:
    rows = bases.size
    geo_n = _csf32_counts(rows, codes.size)
    cols = geo_n.cols
    for s, a, want in (("csf32_page_bases", page_bases, geo_n.pages), ("csf32_offsets", offsets, geo_n.blocks + geo_n.pages)):
        if a.size != want:
            raise StreamError(s, f"{s} has {a.size} entries, {want} for a [{rows}, {cols}] scale")
    base = bases.reshape(-1)
    _check_bases("csf32_bases", base)
    geo = _geometry(rows, cols)
    packed = codes.reshape(-1)
    out = _tiles_to_matrix(packed, rows, cols)
    out += base[:, None]
    out = out.reshape(-1)

    origins, index, words = page_bases.reshape(-1), offsets.reshape(-1), exceptions.reshape(-1)
    n_blocks = geo.r0.size
    leading = index[geo.first + np.arange(geo.first.size)]
    if (leading != 0).any():
        p = int(np.flatnonzero(leading)[0])
        raise StreamError("csf32_offsets", f"page {p}'s offsets do not start with 0")
    ends = origins[geo.page].astype(np.int64) // 2 + index[np.arange(n_blocks) + geo.page + 1]
    starts = np.concatenate(([0], ends[:-1]))
    bad_origin = np.flatnonzero(origins.astype(np.int64) != 2 * starts[geo.first])
    if bad_origin.size:
        p = int(bad_origin[0])
        raise StreamError("csf32_page_bases", f"page {p} starts at byte {int(origins[p])}, not where page {p - 1} ends")
    bad = np.flatnonzero((ends < starts) | (ends - starts > 32 * geo.width))
    if bad.size:
        b = int(bad[0])
        raise StreamError("csf32_offsets", f"block {b} has {int(ends[b] - starts[b])} exceptions (0 to {32 * int(geo.width[b])})")
    if ends[-1] != words.size:
        raise StreamError("csf32_exceptions", f"has {words.size} exceptions, the offsets index {int(ends[-1])}")
    block = np.repeat(np.arange(n_blocks), ends - starts)
    pos = (words & 0xFF).astype(np.int64)
    wrong = (pos >= 64) | (pos % 2 >= geo.width[block])
    wrong[1:] |= (pos[1:] <= pos[:-1]) & (block[1:] == block[:-1])
    bad = np.flatnonzero(wrong)
    if bad.size:
        k = int(bad[0])
        raise StreamError(
            "csf32_exceptions", f"exception {k} (block {int(block[k])}) is at in-block position {int(pos[k])}: out of range or out of order"
        )
    b = geo
    out[(b.r0[block] + pos // 2) * cols + b.c0[block] + pos % 2] = (words >> 8).astype(np.uint8)
    return out.reshape(rows, cols)


# ---------------------------------------------------------------------------------------------------
# encoding


def _bases(scales: np.ndarray) -> np.ndarray:
    """Each row's base: the start of the 16-byte window holding most of its bytes (the lowest such)."""
    rows = scales.shape[0]
    hist = np.zeros((rows, 256), dtype=np.int64)
    np.add.at(hist, (np.repeat(np.arange(rows), scales.shape[1]), scales.reshape(-1)), 1)
    cum = np.concatenate((np.zeros((rows, 1), np.int64), np.cumsum(hist, axis=1)), axis=1)
    return np.argmax(cum[:, 16 : MAX_BASE + 17] - cum[:, : MAX_BASE + 1], axis=1).astype(np.uint8)


def encode(encoding: str, scales: np.ndarray) -> dict[str, np.ndarray]:
    """The streams of ``encoding`` for a uint8 (or E4M3-as-bytes) ``[rows, cols]`` matrix; bytes outside
    their row's 16-value window are exceptions. ``ValueError`` for a shape the encoding cannot hold."""
    scales = np.ascontiguousarray(scales).view(np.uint8)
    if scales.ndim != 2:
        raise ValueError(f"block scales must be 2-D, not {list(scales.shape)}")
    rows, cols = scales.shape
    base = _bases(scales)
    delta = scales.astype(np.int16) - base[:, None]
    inside = (delta >= 0) & (delta < 16)
    code = np.where(inside, delta, 0).astype(np.uint8)
    if encoding == CSF:
        if rows % 16 or cols % 2 or rows * cols > CSF_MAX_CELLS:
            raise ValueError(f"csf holds [rows, cols] with rows a multiple of 16, cols even, at most 2^24 cells, not {[rows, cols]}")
        packed = code[:, 0::2] | (code[:, 1::2] << 4)
        fixed = np.concatenate((base.reshape(-1, 16), packed.reshape(rows // 16, -1)), axis=1)
        pos = np.flatnonzero(~inside.reshape(-1)).astype(np.uint32)
        words = (scales.reshape(-1)[pos].astype(np.uint32) << 24) | pos
        return {"nvfp4_csf_fixed": fixed, "nvfp4_csf_exceptions": words.astype("<u4")}
    if encoding != CSF_32X2:
        raise ValueError(f"unknown encoding {encoding!r}")
    if rows % 32 or cols == 0:
        raise ValueError(f"csf_32x2_v1 holds [rows, cols] with rows a multiple of 32, not {[rows, cols]}")
    geo = _geometry(rows, cols)
    stored = _matrix_to_tiles(code)
    packed = stored[0::2] | (stored[1::2] << 4)
    n_blocks = geo.r0.size
    block_of = np.repeat(np.arange(n_blocks), 32 * geo.width)
    block_start = np.concatenate(([0], np.cumsum(32 * geo.width)[:-1]))
    local = np.arange(stored.size) - block_start[block_of]
    pos = local * (2 // geo.width[block_of])  # 2 * row + col in the block
    exc = ~_matrix_to_tiles(inside)
    words = (_matrix_to_tiles(scales)[exc].astype(np.uint16) << 8) | pos[exc].astype(np.uint16)
    ends = np.cumsum(np.bincount(block_of[exc], minlength=n_blocks))
    starts = np.concatenate(([0], ends[:-1]))
    page_start = starts[geo.first]
    offsets = np.zeros(n_blocks + geo.first.size, dtype="<u2")
    offsets[np.arange(n_blocks) + geo.page + 1] = ends - page_start[geo.page]
    return {
        "csf32_bases": base,
        "csf32_codes": packed,
        "csf32_page_bases": (2 * page_start).astype("<u4"),
        "csf32_offsets": offsets,
        "csf32_exceptions": words.astype("<u2"),
    }
