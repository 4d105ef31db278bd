"""The checks ``verify`` makes, as pure functions: the rescale bound per block, a rescaled half's block
scales, byte comparison, and the structure of a converted folder and of its shards' headers.

They hold nothing and read no shard data themselves: :mod:`~nvfp4_fuse.piece_checks` applies them to
the pieces of output shards as they are read, against the source's bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from .constants import E4M3_HALF_STEP as HALF_STEP
from .constants import E4M3_MAX, E4M3_MIN_SUBNORMAL
from .constants import E4M3_SUBNORMAL_HALF_SPACING as SUBNORMAL_HALF_SPACING
from .errors import CheckFailed
from .host_layout import E4M3_VALUES
from .safetensors_header import ShardHeader
from .source import CONFIG_FILES, INDEX_NAME, Source
from .spec import OutputSpec


def fail(msg: str) -> CheckFailed:
    """The failure a check raises: one line naming file, tensor, expert and first bad index."""
    return CheckFailed(msg)


# ---------------------------------------------------------------------------------------------------
# the rescale bound, per block


def pair_errors(a: np.ndarray, b: np.ndarray, s2_src: float, c: float) -> tuple[np.ndarray, np.ndarray]:
    """(relative error, within the bound) of source scale bytes ``a`` stored as bytes ``b``
    (elementwise, float64; see :func:`block_errors`)."""
    vals = E4M3_VALUES.astype(np.float64)
    x = vals[a] * float(np.float32(s2_src)) / float(np.float32(c))  # exact rescaled scale of each source byte
    y = vals[b]
    tol = np.where(x < SUBNORMAL_HALF_SPACING, 2 * SUBNORMAL_HALF_SPACING, np.maximum(HALF_STEP * x, SUBNORMAL_HALF_SPACING))
    diff = np.abs(y - x)
    zero = vals[a] == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = np.where(zero, y == 0, diff <= tol * (1 + 1e-9))
        rel = np.where(zero, np.where(y == 0, 0.0, np.inf), diff / x)
    rel = np.where(np.isnan(rel), np.inf, rel)  # NaN bytes: never within the bound
    return rel, ok & ~np.isnan(diff)


def block_errors(src: np.ndarray, s2_src: float, new: np.ndarray, c: float) -> tuple[np.ndarray, np.ndarray]:
    """For E4M3 block-scale bytes ``src`` (scale_2 ``s2_src``) stored as ``new`` (scale_2 ``c``):
    (relative error of every value in each block, whether each block is within the rescale bound).

    A value q * s * s2 becomes q * s' * c: its relative error |s' c - s s2| / (s s2) does not depend
    on its E2M1 code q. The bound is half an E4M3 step of the exact rescaled scale x = s s2 / c (see
    the module notes); blocks whose source scale is 0 must stay 0. Both depend on the two bytes alone
    (computed in float64).
    """
    return pair_errors(src, new, s2_src, c)


_ALL_BYTES = np.arange(256, dtype=np.uint8)
_E4M3_MIN_NORMAL = 2.0**-6
_F32_TO_E4M3_EXPONENT = (127 - 7) << 3  # float32's exponent bias against E4M3's, in bits [3, 8) of a byte


def rescale_table(ratio: float) -> np.ndarray:
    """The byte each of the 256 E4M3 block-scale bytes becomes when multiplied by ``ratio`` and rounded
    back to E4M3 by the reference's rule (:func:`nvfp4.rescale_block_scales <nvfp4_fuse.nvfp4.rescale_block_scales>`:
    one float32 product, clamped to [2^-9, 448], exact zeros kept, NaN and negative products to zero,
    round to nearest even).

    Worked out on the float32 bits, apart from both the torch reference and the converter's numpy
    rounding (a search of the E4M3 values): a normal result keeps 3 of float32's 23 mantissa bits,
    rounded to nearest even with the carry running into the exponent; a subnormal one is the nearest
    even multiple of 2^-9 (8 of them being the smallest normal, byte 0x08)."""
    x = E4M3_VALUES.astype(np.float32) * np.float32(ratio)
    y = np.minimum(x, np.float32(E4M3_MAX))  # NaN stays NaN, and goes to zero below
    with np.errstate(invalid="ignore"):
        y = np.where(y > 0, np.maximum(y, np.float32(E4M3_MIN_SUBNORMAL)), np.float32(0)).astype(np.float32)
    bits = y.view(np.uint32).astype(np.int64)
    kept, dropped = bits >> 20, bits & 0xFFFFF
    kept = kept + ((dropped > 0x80000) | ((dropped == 0x80000) & (kept & 1 == 1)))
    subnormal = np.rint(y.astype(np.float64) * 2.0**9).astype(np.int64)
    return np.where(y >= _E4M3_MIN_NORMAL, kept - _F32_TO_E4M3_EXPONENT, subnormal).astype(np.uint8)


def rescaled_half_problem(src: np.ndarray, new: np.ndarray, expected: np.ndarray, s2_src: float, c: float) -> tuple[float, str | None]:
    """Check a rescaled half's block scales: ``new`` must be ``expected[src]`` (the RNE rescale of each
    byte) and every block within the rescale bound. Returns (largest relative error, the first problem
    as "[row, col] ..." or None).

    Once ``new`` is ``expected[src]`` byte for byte, each block's error depends on its source byte
    alone, so the bound is that of the worst source byte present: the 256 byte values are ranked
    (outside the bound first, then by error), the half is mapped to ranks, and its smallest rank
    names the worst byte. Both maps are ``bytes.translate`` (a C loop over bytes; numpy's fancy
    indexing would widen every byte to an 8-byte index first)."""
    src_b = np.ascontiguousarray(src, dtype=np.uint8).tobytes()
    if src_b.translate(expected.astype(np.uint8).tobytes()) != np.ascontiguousarray(new, dtype=np.uint8).tobytes():
        r, k = (int(i[0]) for i in np.nonzero(new != expected[src]))
        return 0.0, f"[{r}, {k}] differs from the rescaled source's"
    if not src_b:
        return 0.0, None
    rel, ok = pair_errors(_ALL_BYTES, expected, s2_src, c)
    order = np.lexsort((-rel, ok))  # outside the bound first, then the largest error first
    rank = np.empty(256, dtype=np.uint8)
    rank[order] = _ALL_BYTES
    worst = int(order[np.frombuffer(src_b.translate(rank.tobytes()), dtype=np.uint8).min()])
    if ok[worst]:
        return float(rel[worst]), None
    rel_e, ok_e = block_errors(src, s2_src, new, c)  # only to say where
    r, k = (int(i[0]) for i in np.nonzero(~ok_e))
    return 0.0, f"at [{r}, {k}] is {100 * rel_e[r, k]:.3g}% off the source: more than half an E4M3 step"


# ---------------------------------------------------------------------------------------------------
# structure


def checked_sidecars(spec: OutputSpec, model_card: str | None = None) -> list[str]:
    """The source's sidecars a converted folder holds byte for byte: all but the configs (written from
    the plan) and, where ``push`` replaced it with the model card (``model_card``: the manifest's), README.md."""
    return [rel for rel in spec.source.sidecars if rel not in CONFIG_FILES and not (rel == "README.md" and model_card is not None)]


def check_structure(
    spec: OutputSpec,
    conv_dir: Path,
    conv: Source,
    *,
    model_card: str | None = None,
    source_file: Callable[[str], Path] | None = None,
    done: Callable[[str], None] | None = None,
) -> None:
    """A converted folder's index, shard headers and metadata, configs and sidecars are those
    ``convert`` writes for ``spec`` (``model_card``: the manifest's, where push replaced README.md).
    ``source_file(rel)`` is where a source sidecar is read (default: in the source folder), and
    ``done(rel)`` is called once it has been compared."""
    want_map = spec.weight_map()
    idx = json.loads((conv_dir / INDEX_NAME).read_text())
    got_map = idx.get("weight_map", {})
    missing = sorted(set(want_map) - set(got_map))
    extra = sorted(set(got_map) - set(want_map))
    if missing:
        raise fail(f"output lacks tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise fail(f"output has unexpected tensor {extra[0]}")
    for name, shard in want_map.items():
        if got_map[name] != shard:
            raise fail(f"index puts {name} in {got_map[name]}, the spec in {shard}")
    if idx.get("metadata", {}).get("total_size") != spec.total_size:
        raise fail(f"index total_size {idx.get('metadata', {}).get('total_size')} != {spec.total_size}")
    check_shard_headers(spec, conv.headers, [s.name for s in spec.shards])
    for name, data in spec.configs().items():
        if (conv_dir / name).read_bytes() != data:
            raise fail(f"{name} differs from what convert writes for this source and options")
    for rel in checked_sidecars(spec, model_card):
        p = conv_dir / rel
        src = source_file(rel) if source_file is not None else spec.source.root / rel
        if not p.is_file() or p.read_bytes() != src.read_bytes():
            raise fail(f"sidecar {rel} is missing or differs from the source")
        if done is not None:
            done(rel)



def check_shard_headers(spec: OutputSpec, headers: Mapping[str, ShardHeader], names: Iterable[str]) -> None:
    """Output shards ``names`` (their ``headers``, by file name) hold the tensors, dtypes, shapes and
    ``__metadata__`` that ``spec`` gives them."""
    meta = spec.shard_metadata()
    by_name = {s.name: s for s in spec.shards}
    for name in names:
        shard = by_name.get(name)
        if shard is None:
            raise fail(f"{name} is not an output shard of this conversion")
        hdr = headers.get(shard.name)
        if hdr is None:
            raise fail(f"shard {shard.name} is missing")
        if hdr.metadata != meta:
            raise fail(f"{shard.name}: __metadata__ {hdr.metadata} differs from what convert writes ({meta})")
        for t in shard.tensors:
            info = hdr.tensors.get(t.entry.name)
            if info is None or info.dtype != t.entry.dtype or info.shape != t.entry.shape:
                got = f"{info.dtype}{list(info.shape)}" if info else "nothing"
                raise fail(f"{shard.name}: {t.entry.name} is {got}, expected {t.entry.dtype}{list(t.entry.shape)}")
        extra = sorted(set(hdr.tensors) - {t.entry.name for t in shard.tensors})
        if extra:
            raise fail(f"{shard.name}: unexpected tensor {extra[0]}")


# ---------------------------------------------------------------------------------------------------
# byte comparison


def _load_memcmp() -> Callable[[int, int, int], int]:
    """libc's memcmp (ctypes releases the GIL for the call)."""
    import ctypes

    fn = ctypes.CDLL(None).memcmp
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_memcmp = _load_memcmp()


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two contiguous byte ranges are equal (memcmp: no temporaries)."""
    return a.size == b.size and (a.size == 0 or _memcmp(a.ctypes.data, b.ctypes.data, a.size) == 0)

