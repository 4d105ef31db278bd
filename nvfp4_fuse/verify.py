"""``nvfp4-fuse verify``: prove that a converted checkpoint decodes to what its source did.

One pass over each checkpoint, memory bounded by a fixed budget (a few experts), whatever the model's
size. Before the pass, from headers and small files: the manifest is present and every file has its
size; the output spec rebuilt from the source and the recorded options names exactly the tensors,
dtypes, shapes and shard assignment of the output's index and headers; the configs and the shard
metadata equal what ``convert`` writes; every sidecar is byte-identical.

The pass reads every output shard once, in file order, hashing it (its sha256 must equal the
manifest's) and checking each piece as it goes by, against the source read once too:

- copied tensors (everything but the converted experts, MXFP4 expert groups included) are
  byte-identical to the source; a compressed block scale (``encoded_scales.py``) is decoded from the
  source's streams, and read as that plain E4M3 matrix by this check and the expert checks below;
- the small per-layer tensors equal what the source's scalar scales give;
- packed values: byte-identical to the source's after undoing the target's row order (no target
  changes a value byte), so the values need no decoding;
- block scales, after undoing the layout, equal the source's, or for a rescaled half the
  round-to-nearest-even rescale of them (the torch reference of the converter's numpy rescale);
- the rescale bound, per block and exactly: a value's relative error is a function of its block
  scale alone (its E2M1 factor cancels), ``|s'c - s s2| / (s s2)`` for source scale ``s`` and
  scale_2 ``s2``, output scale ``s'`` and scale_2 ``c``; copied halves must be exact, rescaled ones
  within half an E4M3 step of ``x = s s2 / c`` (6.25% of it in E4M3's normal range, half the
  subnormal spacing 2^-10 below 2^-6, and 2^-9 where ``x < 2^-10`` was clamped to the smallest
  subnormal rather than flushed to zero);
- end to end, where a GPU is used (``decode``): every checked expert of both checkpoints is
  dequantized by the Triton compare kernel and compared: copied halves bit-identical, rescaled ones
  no further apart than their block scales allow. On the CPU this runs the torch reference of the
  kernel when asked for (slow); by default the CPU run leaves it out and says so.

The result lists the checks that ran.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .budget import ByteBudget
from .constants import E4M3_HALF_STEP as HALF_STEP
from .constants import E4M3_SUBNORMAL_HALF_SPACING as SUBNORMAL_HALF_SPACING
from .constants import NVFP4_BLOCK
from .encoded_scales import EncodedScale
from .errors import CheckFailed, InputError
from .experts import ExpertLayer
from .host_layout import E4M3_VALUES
from .manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file
from .shard_reader import ShardReader
from .shard_writer import tensor_bytes
from .source import CONFIG_FILES, INDEX_NAME, Source, scan_source
from .spec import COPY_CHUNK, OutputOptions, OutputSpec, OutShard, OutTensor, build_spec

if TYPE_CHECKING:
    import torch

BUDGET_BYTES = 256 << 20  # output bytes read ahead of the hashing, at most (always at least one piece)
# GPU decodes put off while the kernel loads, at most this many bytes of packed values: the pass goes
# on with its other checks meanwhile. A put-off decode holds nothing but its place in the mapped output.
DEFERRED_BYTES = 4 << 30

CHECK_STRUCTURE = "structure: index, shard headers and metadata, configs and sidecars as convert writes them"
CHECK_HASHES = "manifest: every file's size and sha256 (each file read once)"
CHECK_SIZES = "manifest: every file's size (sha256 not computed: --skip-hashes)"
CHECK_COPIED = "copied tensors (MXFP4 expert groups included): byte-identical to the source"
CHECK_VALUES = "packed values: byte-identical to the source's after undoing the row order"
CHECK_SCALES = "block scales: the source's after undoing the layout, or for rescaled halves their RNE rescale"
CHECK_BOUND = "rescale bound: every block of every checked expert, from the scales, exactly"
CHECK_GLOBALS = "per-layer scale_2 and input-scale tensors: as the source's scalars give them"
CHECK_SCALARS = (
    "per-expert weight_scale_2 and input_scale: the bytes of the source scalar the rules pick (gate/up the larger; "
    "a missing or zero input scale the layer's largest of its projection)"
)
CHECK_DECODED = "compressed block scales: decoded from the source's streams (every check of vLLM's decoder), then held to the above as plain E4M3"


@dataclass
class LayerResult:
    prefix: str
    experts: int
    checked: int = 0
    rescaled: int = 0
    max_rel: float = 0.0  # largest relative error of a value, over every block of the checked experts
    decoded: int = 0  # experts dequantized end to end
    max_abs: float | None = None  # largest |difference| of a dequantized value (end to end only)
    sampled: list[int] | None = None  # the experts checked, when --sample drew some

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VerifyResult:
    source: str
    converted: str
    target: str
    device: str
    layers: list[LayerResult] = field(default_factory=list)
    files_hashed: int = 0
    copied_tensors: int = 0
    decoded_block_scales: int = 0  # compressed source block scales outside the expert groups, checked decoded
    copied_groups: list[dict[str, Any]] = field(default_factory=list)  # expert groups left as they were
    checks: list[str] = field(default_factory=list)
    peak_read_ahead: int = 0  # most output bytes held at once by the pass
    seconds: float = 0.0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["layers"] = [l.to_json() for l in self.layers]
        d["ok"] = True
        return d


def _fail(msg: str) -> CheckFailed:
    return CheckFailed(msg)


# ---------------------------------------------------------------------------------------------------
# the rescale bound, per block


def _pair_errors(a: np.ndarray, b: np.ndarray, s2_src: float, c: float) -> tuple[np.ndarray, np.ndarray]:
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
    return _pair_errors(src, new, s2_src, c)


_ALL_BYTES = np.arange(256, dtype=np.uint8)


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
    rel, ok = _pair_errors(_ALL_BYTES, expected, s2_src, c)
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


def _check_structure(spec: OutputSpec, conv_dir: Path, conv: Source, *, model_card: str | None = None) -> None:
    want_map = spec.weight_map()
    idx = json.loads((conv_dir / INDEX_NAME).read_text())
    got_map = idx.get("weight_map", {})
    missing = sorted(set(want_map) - set(got_map))
    extra = sorted(set(got_map) - set(want_map))
    if missing:
        raise _fail(f"output lacks tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise _fail(f"output has unexpected tensor {extra[0]}")
    for name, shard in want_map.items():
        if got_map[name] != shard:
            raise _fail(f"index puts {name} in {got_map[name]}, the spec in {shard}")
    if idx.get("metadata", {}).get("total_size") != spec.total_size:
        raise _fail(f"index total_size {idx.get('metadata', {}).get('total_size')} != {spec.total_size}")
    meta = spec.shard_metadata()
    for shard in spec.shards:
        hdr = conv.headers.get(shard.name)
        if hdr is None:
            raise _fail(f"shard {shard.name} is missing")
        if hdr.metadata != meta:
            raise _fail(f"{shard.name}: __metadata__ {hdr.metadata} differs from what convert writes ({meta})")
        for t in shard.tensors:
            info = hdr.tensors.get(t.entry.name)
            if info is None or info.dtype != t.entry.dtype or info.shape != t.entry.shape:
                got = f"{info.dtype}{list(info.shape)}" if info else "nothing"
                raise _fail(f"{shard.name}: {t.entry.name} is {got}, expected {t.entry.dtype}{list(t.entry.shape)}")
    for name, data in spec.configs().items():
        if (conv_dir / name).read_bytes() != data:
            raise _fail(f"{name} differs from what convert writes for this source and options")
    for rel in spec.source.sidecars:
        if rel in CONFIG_FILES:
            continue
        if rel == "README.md" and model_card is not None:
            continue  # push replaced it with the model card; the manifest's hash covers it
        p = conv_dir / rel
        if not p.is_file() or p.read_bytes() != (spec.source.root / rel).read_bytes():
            raise _fail(f"sidecar {rel} is missing or differs from the source")


# ---------------------------------------------------------------------------------------------------
# the pass: pieces of output shards, each read once, hashed in order and checked


def _load_memcmp() -> Callable[[int, int, int], int]:
    """libc's memcmp (ctypes releases the GIL for the call)."""
    import ctypes

    fn = ctypes.CDLL(None).memcmp
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


_memcmp = _load_memcmp()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two contiguous byte ranges are equal (memcmp: no temporaries)."""
    return a.size == b.size and (a.size == 0 or _memcmp(a.ctypes.data, b.ctypes.data, a.size) == 0)


@dataclass
class _Piece:
    """``nbytes`` of output tensor ``tensor`` from byte ``start``; ``check`` (if any) runs on them."""

    tensor: OutTensor
    start: int
    nbytes: int
    check: Callable[[np.ndarray], None] | None


def _stats(res: Any) -> torch.Tensor:
    """float64 [E, 4] (n_diff, nonfinite, max_abs, max_rel) of a compare result, a row per expert, on
    its device: what :meth:`_Verifier._decoded` reads back."""
    import torch

    return torch.stack([res.n_diff.double(), res.nonfinite.double(), res.max_abs.double(), res.max_rel.double()], dim=1)


class _Batch:
    """Up to :attr:`_Lane.BATCH` expert parts of one shape, gathered on the device for one compare
    launch: slot ``i`` of ``slots`` holds part ``i``'s inputs at ``offs`` (as staged)."""

    def __init__(self, slots: torch.Tensor, offs: list[int], sizes: list[int]):
        self.slots, self.offs, self.sizes = slots, offs, sizes
        self.keys: list[tuple[str, str, int, bool]] = []


class _Lane:
    """One worker thread's GPU state. Its own CUDA stream (a worker waits for its own work only);
    every expert part's inputs are copied into a pinned staging buffer and go to the device in one
    non-blocking upload, into the next slot of a batch of parts of its shape (the pinned buffers used
    in turn, each refilled once its upload is done); a full batch is compared in one launch (the
    kernel's host side, Triton's argument binding and torch's dispatch, holds the GIL: once a batch
    instead of once a part); its statistics stay on the device and are read back every ``FLUSH``
    parts, so the worker goes on preparing the next expert while the GPU works. The stream orders
    each slot's next upload after the launch that read it."""

    RING = 2
    BATCH = 8
    FLUSH = 32
    ALIGN = 256

    def __init__(self, v: _Verifier):
        import torch

        if v.kernels_ready is not None:
            v.kernels_ready.wait()  # one load of the kernels, not one per worker
        self.v = v
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.bufs: list[torch.Tensor | None] = [None] * self.RING
        self.events: list[Any] = [None] * self.RING
        self.turn = 0
        self.batches: dict[tuple, _Batch] = {}
        self.pending: list[tuple[list[tuple[str, str, int, bool]], torch.Tensor]] = []
        self.unread = 0  # parts launched and not read back

    def _batch(self, shape: tuple, arrays: list[np.ndarray]) -> _Batch:
        import torch

        b = self.batches.get(shape)
        if b is None:
            offs, total = [], 0
            for a in arrays:
                offs.append(total)
                total += -(-a.nbytes // self.ALIGN) * self.ALIGN
            slots = torch.empty((self.BATCH, total), dtype=torch.uint8, device=self.device)
            b = self.batches[shape] = _Batch(slots, offs, [a.nbytes for a in arrays])
        return b

    def _stage(self, arrays: list[np.ndarray], b: _Batch) -> None:
        """The arrays' bytes into the batch's next slot, in one upload through a pinned buffer."""
        import torch

        total = b.slots.shape[1]
        i, self.turn = self.turn, (self.turn + 1) % self.RING
        if self.events[i] is not None:
            self.events[i].synchronize()  # its last upload has left it
        buf = self.bufs[i]
        if buf is None or buf.numel() < total:
            buf = self.bufs[i] = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        host = buf.numpy()
        for a, o in zip(arrays, b.offs):
            np.copyto(host[o : o + a.nbytes], np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        b.slots[len(b.keys)].copy_(buf[:total], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(self.stream)
        self.events[i] = ev

    def launch(self, key, rows: int, cols: int, values, a_scales, a_s2, b_scales, b_shape, b_swizzled: bool, b_s2) -> None:
        import torch

        shape = (rows, cols, tuple(b_shape), b_swizzled)
        arrays = [values, a_scales, a_s2, b_scales, b_s2]
        with torch.cuda.stream(self.stream):
            b = self._batch(shape, arrays)
            self._stage(arrays, b)
            b.keys.append(key)
            if len(b.keys) == self.BATCH:
                self._compare(shape, b)
            if self.unread >= self.FLUSH:
                self._read_back()

    def _compare(self, shape: tuple, b: _Batch) -> None:
        """One launch over the batch's parts (the caller holds the lane's stream)."""
        import torch

        from .kernels.compare import compare_nvfp4

        rows, cols, b_shape, b_swizzled = shape
        n = len(b.keys)

        def region(k: int, dtype: torch.dtype, *dims: int) -> torch.Tensor:
            return b.slots[:n, b.offs[k] : b.offs[k] + b.sizes[k]].view(dtype).reshape(n, *dims)

        vals = region(0, torch.uint8, rows, cols // 2).contiguous()  # one copy for both sides
        a_t, a2 = region(1, torch.uint8, rows, cols // NVFP4_BLOCK), region(2, torch.float32, rows)
        b_t, b2 = region(3, torch.uint8, *b_shape), region(4, torch.float32, rows)
        res = compare_nvfp4(vals, a_t, a2, vals, b_t, b2, b_swizzled=b_swizzled, check=False)
        self.pending.append((b.keys, _stats(res)))
        self.unread += n
        b.keys = []

    def _read_back(self) -> None:
        import torch

        pending, self.pending, self.unread = self.pending, [], 0
        if pending:
            got = torch.cat([st for _, st in pending]).cpu()  # waits for this stream's work only
            keys = [k for ks, _ in pending for k in ks]
            for key, row in zip(keys, got.tolist()):
                self.v._decoded(key, row)

    def flush(self) -> None:
        """Launch the part-filled batches and read everything back."""
        import torch

        with torch.cuda.stream(self.stream):
            for shape, b in self.batches.items():
                if b.keys:
                    self._compare(shape, b)
            self._read_back()


class _ReferenceLane:
    """The CPU's stand-in for :class:`_Lane`: the kernel's torch reference, run at once."""

    def __init__(self, v: _Verifier):
        self.v = v

    def launch(self, key, rows: int, cols: int, values, a_scales, a_s2, b_scales, b_shape, b_swizzled: bool, b_s2) -> None:
        import torch

        from .kernels.reference import compare_nvfp4_ref

        vals, a_t, a2, b_t, b2 = (torch.from_numpy(np.array(x)) for x in (values, a_scales, a_s2, b_scales, b_s2))
        vals = vals.reshape(rows, cols // 2)
        res = compare_nvfp4_ref(vals, a_t, a2, vals, b_t.reshape(b_shape), b2, b_swizzled=b_swizzled)
        self.v._decoded(key, _stats(res)[0])

    def flush(self) -> None:
        pass


class _Verifier:
    def __init__(self, spec: OutputSpec, conv: Source, experts: dict[str, set[int]], decode: str | None, kernels_ready: threading.Event | None = None):
        self.spec, self.tgt = spec, spec.target
        # Both checkpoints are read through read-only mappings: pieces are compared and hashed in place
        # (no copy into user memory), and their pages are dropped from this process once done, so
        # resident memory stays at what is in flight; the page cache keeps them for whoever reads next.
        self.src_m = {f: ShardReader(h) for f, h in spec.source.headers.items()}
        self.conv_m = {f: ShardReader(h) for f, h in conv.headers.items()}
        self.conv_map = conv.tensor_file
        self.experts = experts  # prefix -> experts to check
        self.decode = decode  # None, or the device the end-to-end compare runs on
        self.kernels_ready = kernels_ready  # set once the GPU kernels are loaded (_warm_kernels)
        self.results = {p: LayerResult(p, l.dims.experts, rescaled=l.rescaled_experts) for p, l in spec.layers.items()}
        self.copied = 0
        self.decoded = 0  # compressed block scales outside the expert groups, checked decoded
        self.block_rel: dict[tuple[str, str, int], float] = {}  # largest block error of each checked expert part
        self.decoded_rel: dict[tuple[str, str, int], float] = {}  # end to end, rescaled expert parts
        self.stop = threading.Event()  # set when a check failed: the other shards' streams end early
        self._local = threading.local()
        self._lanes: list[_Lane] = []  # one per worker thread that launched on the GPU
        self._deferred: deque[tuple[ExpertLayer, str, int, np.ndarray]] = deque()  # see _decode
        self._deferred_bytes = 0
        self._lock = threading.Lock()
        self._globals = {p: self.tgt.global_tensors(p, l.scalars) for p, l in spec.layers.items()}
        self.on_bytes: Callable[[str, int], None] | None = None  # progress: (shard, bytes done), from the streams

    def close(self) -> None:
        for m in (*self.src_m.values(), *self.conv_m.values()):
            m.close()

    # -- reading --------------------------------------------------------------------------------
    def src(self, layer: ExpertLayer, e: int, role: str, fld: str) -> np.ndarray:
        """One source tensor of an expert, mapped (read-only) and held until :meth:`release_src`; a
        compressed block scale is decoded instead (a new array: nothing stays held)."""
        ref = layer.ref(e, role, fld)
        if ref.encoded is not None:
            return self.decoded_src(ref.encoded)
        return self.src_m[ref.file].held_array(ref.info.name).reshape(ref.info.shape)

    def release_src(self, layer: ExpertLayer, e: int, role: str, fld: str) -> None:
        ref = layer.ref(e, role, fld)
        if ref.encoded is None:
            self.src_m[ref.file].release_tensor(ref.info.name)

    def decoded_src(self, enc: EncodedScale) -> np.ndarray:
        """A compressed source block scale, decoded from its mapped streams (released once read)."""
        held: list[tuple[ShardReader, str]] = []

        def read(file: str, name: str) -> np.ndarray:
            held.append((self.src_m[file], name))
            return held[-1][0].held_array(name)

        try:
            return enc.decode(read)
        finally:
            for m, name in held:
                m.release_tensor(name)

    def conv_expert(self, layer: ExpertLayer, name: str, e: int) -> tuple[ShardReader, int, int]:
        """The reader of a stacked output tensor, and where expert ``e``'s bytes sit in it (start,
        count)."""
        m = self.conv_m[self.conv_map[name]]
        per = m.header.tensors[name].nbytes // layer.dims.experts
        return m, e * per, per

    # -- pieces, in file order --------------------------------------------------------------------
    def pieces(self, shard: OutShard) -> Iterator[_Piece]:
        for t in shard.tensors:
            n = t.entry.nbytes
            if t.kind == "copy":
                for start in range(0, n, COPY_CHUNK):
                    yield _Piece(t, start, min(COPY_CHUNK, n - start), self._copy_check(t, start))
            elif t.kind == "decoded":
                yield _Piece(t, 0, n, self._decoded_check(t))
            elif t.kind == "global":
                yield _Piece(t, 0, n, self._global_check(t))
            elif t.kind == "scalar":
                yield _Piece(t, 0, n, self._scalar_check(t))
            elif t.kind == "expert":
                assert t.layer is not None and t.part is not None and t.expert is not None
                check = self._one_expert_check(self.spec.layers[t.layer], t.part, t.expert) if t.expert in self.experts[t.layer] else None
                yield _Piece(t, 0, n, check)
            else:
                assert t.layer is not None and t.part is not None
                layer = self.spec.layers[t.layer]
                per = n // layer.dims.experts
                for e in range(layer.dims.experts):
                    yield _Piece(t, e * per, per, self._expert_check(layer, t.part, e) if e in self.experts[t.layer] else None)

    def _copy_check(self, t: OutTensor, start: int) -> Callable[[np.ndarray], None]:
        def check(got: np.ndarray) -> None:
            assert t.source is not None
            m = self.src_m[t.source.file]
            want = m.held_array(t.source.info.name, start, got.size)
            if not _same(got, want):
                at = start + int(np.flatnonzero(got != want)[0])
                raise _fail(f"{t.entry.name} is not byte-identical to the source (first difference at byte {at})")
            m.release_tensor(t.source.info.name, start, got.size)
            if start == 0:
                with self._lock:
                    self.copied += 1

        return check

    def _decoded_check(self, t: OutTensor) -> Callable[[np.ndarray], None]:
        def check(got: np.ndarray) -> None:
            assert t.source is not None and t.source.encoded is not None
            want = self.decoded_src(t.source.encoded).reshape(-1)
            if not _same(got, want):
                at = int(np.flatnonzero(got != want)[0])
                raise _fail(
                    f"{t.entry.name} is not the source's {t.source.encoded.encoding} block scale decoded "
                    f"(first difference at byte {at})"
                )
            with self._lock:
                self.decoded += 1

        return check

    def _global_check(self, t: OutTensor) -> Callable[[np.ndarray], None]:
        def check(got: np.ndarray) -> None:
            assert t.layer is not None
            want = self._globals[t.layer][t.entry.name]
            if bytes(got) != bytes(tensor_bytes(want)):
                raise _fail(f"{t.entry.name} differs from the values derived from the source scales")

        return check

    def _scalar_check(self, t: OutTensor) -> Callable[[np.ndarray], None]:
        """A per-expert target's weight_scale_2 or input_scale: the bytes of the source scalar the
        rules pick (the larger of gate and up; for a repaired input scale, the rule's)."""

        def check(got: np.ndarray) -> None:
            assert t.source is not None and t.layer is not None and t.part is not None and t.expert is not None
            want = self.src_m[t.source.file].read_small(t.source.info.name)
            if bytes(got) != want:
                role, fld = t.part.split(".")
                layer = self.spec.layers[t.layer]
                how = " (repaired: missing or zero in the source)" if t.expert in layer.repaired_input_scales.get(role, ()) and fld == "input_scale" else ""
                raise _fail(f"{t.entry.name} is not the {fld} the source's scales give{how} ({t.source.info.name})")

        return check

    def _one_expert_check(self, layer: ExpertLayer, part: str, e: int) -> Callable[[np.ndarray], None]:
        """A per-expert target's values (``<role>.weight``) or block scales (``<role>.weight_scale``)."""
        role, fld = part.split(".")
        if fld == "weight":
            return lambda got: self._one_values(layer, role, e, got)
        return lambda got: self._one_scales(layer, role, e, got)

    def _one_values(self, layer: ExpertLayer, role: str, e: int, got: np.ndarray) -> None:
        src = self.src(layer, e, role, "weight").reshape(-1)
        if not _same(got, src):
            row = (layer.dims.inter if role == "down" else layer.dims.hidden) // 2
            k = int(np.flatnonzero(got != src)[0])
            raise _fail(f"{self._out_name(layer, e, role, 'weight')}: packed bytes differ from the source at [{k // row}, {k % row}]")
        if self.decode:
            self._decode(layer, f"{role}.weight", e, got)
        self.release_src(layer, e, role, "weight")

    def _one_scales(self, layer: ExpertLayer, role: str, e: int, got: np.ndarray) -> None:
        rows, cols = (layer.dims.hidden, layer.dims.inter) if role == "down" else (layer.dims.inter, layer.dims.hidden)
        worst = self._half_scales(layer, f"{role}.weight_scale", role, e, got.reshape(rows, cols // NVFP4_BLOCK), self._out_name(layer, e, role, "weight_scale"))
        with self._lock:
            self.block_rel[(layer.prefix, f"{role}.weight_scale", e)] = worst
            res = self.results[layer.prefix]
            res.max_rel = max(res.max_rel, worst)
            if role == "down":
                res.checked += 1

    def _part_name(self, prefix: str, part: str, e: int) -> str:
        """The output tensor a decoded part is read from: ``<prefix>.<part>`` stacked, or a per-expert
        target's own tensor."""
        if "." not in part:
            return f"{prefix}.{part}"
        role, fld = part.split(".")
        return self._out_name(self.spec.layers[prefix], e, role, fld)

    @staticmethod
    def _out_name(layer: ExpertLayer, e: int, role: str, fld: str) -> str:
        from .per_expert import out_name

        return out_name(layer, e, role, fld)

    def _expert_check(self, layer: ExpertLayer, part: str, e: int) -> Callable[[np.ndarray], None]:
        if part in ("w13_weight", "w2_weight"):
            return lambda got: self._values(layer, part, e, got)
        return lambda got: self._scales(layer, part, e, got)

    # -- per-expert checks ------------------------------------------------------------------------
    def _halves(self, layer: ExpertLayer, part: str, got: np.ndarray) -> dict[str, np.ndarray]:
        """One expert's packed values by role, flat, the row order undone (:meth:`RowOrder.split_np`:
        views where each half is one run of rows, else copies)."""
        if part == "w2_weight":
            return {"down": got}
        gate, up = self.tgt.rows.split_np(got.reshape(2 * layer.dims.inter, -1))
        return {"gate": gate.reshape(-1), "up": up.reshape(-1)}

    def _values_equal(self, layer: ExpertLayer, part: str, e: int, got: np.ndarray) -> bool:
        """Whether the output's packed values are the source's in the target's row order, compared in
        place: one memcmp a half where it is one run of rows; for groups of rows alternating between
        gate and up, each half as a strided view of 8-byte words (no gather copy)."""
        if part == "w2_weight":
            return _same(got, self.src(layer, e, "down", "weight").reshape(-1))
        d = layer.dims
        row = d.hidden // 2
        src = {role: self.src(layer, e, role, "weight").reshape(-1) for role in ("gate", "up")}
        alt = self.tgt.rows.alternating_groups(d.inter)
        if alt is None:
            return all(_same(half, src[role]) for role, half in self._halves(layer, part, got).items())
        first, g = alt
        if g == d.inter:
            return _same(got[: g * row], src[first[0]]) and _same(got[g * row :], src[first[1]])
        width = g * row
        if width % 8:
            return all(_same(half, src[role]) for role, half in self._halves(layer, part, got).items())
        words = got.view(np.uint64).reshape(d.inter // g, 2, width // 8)
        return all(np.array_equal(words[:, k], src[role].view(np.uint64).reshape(d.inter // g, width // 8)) for k, role in enumerate(first))

    def _values(self, layer: ExpertLayer, part: str, e: int, got: np.ndarray) -> None:
        """Packed values: the output's rows are the source's, in the target's row order."""
        if not self._values_equal(layer, part, e, got):
            row = (layer.dims.hidden if part == "w13_weight" else layer.dims.inter) // 2
            for role, conv in self._halves(layer, part, got).items():
                src = self.src(layer, e, role, "weight").reshape(-1)
                if not _same(conv, src):
                    k = int(np.flatnonzero(conv != src)[0])
                    raise _fail(f"{layer.prefix}.{part}: expert {e} {role} packed bytes differ from the source at [{k // row}, {k % row}]")
            raise AssertionError("packed values compared unequal, then equal")
        if self.decode:
            self._decode(layer, part, e, got)
        for role in ("down",) if part == "w2_weight" else ("gate", "up"):
            self.release_src(layer, e, role, "weight")

    def _natural_scales(self, layer: ExpertLayer, part: str, stored: np.ndarray) -> dict[str, np.ndarray]:
        """One expert's stored scales, layout and row order undone: role -> uint8 [rows, K/16]. The
        layout is undone by the target's numpy inverse (a view or one strided copy), the gate/up row
        order by :meth:`RowOrder.split_np`."""
        d = layer.dims
        w13 = part.startswith("w13")
        rows, cols = (2 * d.inter, d.hidden) if w13 else (d.hidden, d.inter)
        nat = self.tgt.scales.natural_np(stored, rows, cols)
        if not w13:
            return {"down": nat}
        gate, up = self.tgt.rows.split_np(nat)
        return {"gate": gate, "up": up}

    def _scale_2(self, layer: ExpertLayer, role: str, e: int) -> tuple[float, float, float]:
        """(source scale_2, output scale_2, rescale ratio) of one expert's half."""
        part = "w2" if role == "down" else "w13"
        out = self._globals[layer.prefix][f"{layer.prefix}.{part}_weight_scale_2"]
        c = float(out[e]) if out.ndim == 1 else float(out[e, 0 if role == "gate" else 1])
        s2 = float(layer.scalars[f"{role}.weight_scale_2"][e])
        ratio = 1.0 if role == "down" else float((layer.ratio_gate if role == "gate" else layer.ratio_up)[e])
        return s2, c, ratio

    def _half_scales(self, layer: ExpertLayer, part: str, role: str, e: int, nat: np.ndarray, where: str) -> float:
        """One half's natural block scales against the source's: the same bytes where it was copied,
        else the RNE rescale, every block within the bound. Returns its largest relative error."""
        import torch

        from .nvfp4 import rescale_block_scales

        src = self.src(layer, e, role, "weight_scale")
        s2, c, ratio = self._scale_2(layer, role, e)
        worst = 0.0
        if ratio == 1.0:  # a copied half: the same bytes and the same scale_2
            if not _same(np.ascontiguousarray(nat).reshape(-1), src.reshape(-1)):
                r, k = (int(i[0]) for i in np.nonzero(nat != src))
                raise _fail(f"{where}: expert {e} {role} block scale at [{r}, {k}] differs from the source's")
            if s2 != c:
                raise _fail(f"{where}: expert {e} {role} is a copied half but its scale_2 changed ({s2} -> {c})")
        else:
            # The RNE rescale (the torch reference) is a function of the byte: applied to all 256.
            table = rescale_block_scales(torch.arange(256, dtype=torch.uint8), ratio).view(torch.uint8).numpy()
            rel, problem = rescaled_half_problem(src, nat, table, s2, c)
            if problem is not None:
                raise _fail(f"{where}: expert {e} {role} block scale {problem}")
            worst = rel
        self.release_src(layer, e, role, "weight_scale")
        return worst

    def _scales(self, layer: ExpertLayer, part: str, e: int, got: np.ndarray) -> None:
        p = layer.prefix
        worst = 0.0
        for role, nat in self._natural_scales(layer, part, got).items():
            worst = max(worst, self._half_scales(layer, part, role, e, nat, f"{p}.{part}"))
        with self._lock:
            self.block_rel[(p, part, e)] = worst
            res = self.results[p]
            res.max_rel = max(res.max_rel, worst)
            if part == "w2_weight_scale":
                res.checked += 1

    def _decode(self, layer: ExpertLayer, part: str, e: int, values: np.ndarray) -> None:
        """End to end: dequantize the expert of both checkpoints with the compare kernel (the values
        are the output's, just found byte-identical to the source's); a rescaled half's result is held
        against the largest error its block scales allow once the pass has checked them
        (:meth:`check_decoded`). On the GPU (:class:`_Lane`) the launch is asynchronous and its
        statistics are read back in batches; on the CPU the kernel's torch reference runs."""
        assert self.decode is not None
        if self.decode == "cpu":
            self._launch(layer, part, e, values)
            return
        if not hasattr(self._local, "lane") and self._defer(layer, part, e, values):
            return
        self._lane()
        self._launch(layer, part, e, values)
        for item in self._take_deferred(2):  # a share of what was put off while the kernel loaded
            self._launch_deferred(item)

    def _lane(self) -> _Lane:
        """This thread's GPU lane; the first call makes it, waiting for the kernel to be loaded."""
        if not hasattr(self._local, "lane"):
            self._local.lane = _Lane(self)
            with self._lock:
                self._lanes.append(self._local.lane)
        return self._local.lane

    def _defer(self, layer: ExpertLayer, part: str, e: int, values: np.ndarray) -> bool:
        """Put a GPU decode off while the kernel is still loading (the first second or so of a run), up to
        ``DEFERRED_BYTES`` of values: the worker goes on to its next checks instead of waiting. Its
        values stay a view of the mapped output; their pages are dropped once hashed and read again
        from the page cache when the decode runs. Returns False (not put off) once the kernel is ready
        or the cap is reached."""
        if self.kernels_ready is None or self.kernels_ready.is_set():
            return False
        with self._lock:
            if self._deferred_bytes + values.nbytes > DEFERRED_BYTES:
                return False
            self._deferred.append((layer, part, e, values))
            self._deferred_bytes += values.nbytes
        return True

    def _take_deferred(self, n: int) -> list[tuple[ExpertLayer, str, int, np.ndarray]]:
        """Up to ``n`` of the put-off decodes, oldest first."""
        if not self._deferred:
            return []
        with self._lock:
            got = []
            while self._deferred and len(got) < n:
                got.append(self._deferred.popleft())
                self._deferred_bytes -= got[-1][3].nbytes
        return got

    def run_deferred(self, pool: ThreadPoolExecutor, workers: int) -> None:
        """Decode what is still put off, after the pass and before the mappings close, on ``workers``
        threads of ``pool``, each on its own lane (a first call's pass can end before the kernel is
        loaded, with most decodes put off)."""
        if self._deferred:
            for fut in [pool.submit(self._drain_deferred) for _ in range(max(1, workers))]:
                fut.result()

    def _drain_deferred(self) -> None:
        """Run put-off decodes, one at a time, until none is left."""
        while items := self._take_deferred(1):
            self._lane()
            self._launch_deferred(items[0])

    def _launch_deferred(self, item: tuple[ExpertLayer, str, int, np.ndarray]) -> None:
        """Run a put-off decode, then drop its values' pages from the mapping again: the pass dropped
        them once already, and nothing else would before the mappings close."""
        layer, part, e, values = item
        self._launch(layer, part, e, values)
        name, m, start, n = self._operand(layer, part, e)
        m.release_tensor(name, start, n)

    def _operand(self, layer: ExpertLayer, part: str, e: int) -> tuple[str, ShardReader, int, int]:
        """Where expert ``e``'s ``part`` (values, or with ``_scale`` its block scales) sits in the
        output: tensor name, its reader, start and count. A stacked part (``w13_weight``) is a slice
        of ``<prefix>.<part>``; a per-expert one (``gate.weight``) a whole tensor."""
        if "." not in part:
            name = f"{layer.prefix}.{part}"
            return (name, *self.conv_expert(layer, name, e))
        role, fld = part.split(".")
        name = self._out_name(layer, e, role, fld)
        m = self.conv_m[self.conv_map[name]]
        return name, m, 0, m.header.tensors[name].nbytes

    def _launch(self, layer: ExpertLayer, part: str, e: int, values: np.ndarray) -> None:
        """The decode of :meth:`_decode`: inputs prepared, then launched on this thread's lane or run by
        the CPU reference."""
        assert self.decode is not None
        d = layer.dims
        w13 = part == "w13_weight"
        roles: tuple[str, ...] = ("gate", "up") if w13 else (part.split(".")[0],) if "." in part else ("down",)
        rows, cols = (2 * d.inter, d.hidden) if w13 else (d.hidden, d.inter) if roles == ("down",) else (d.inter, d.hidden)
        sname, m, start, n = self._operand(layer, f"{part}_scale", e)
        s2 = {r: self._scale_2(layer, r, e) for r in roles}  # (source, output, ratio)
        if self.decode == "cuda":
            from .kernels.dequant import S2_LIMIT

            if max(abs(v) for r in roles for v in s2[r][:2]) >= S2_LIMIT:
                raise _fail(f"{layer.prefix}.{part}: expert {e} has a scale_2 too large for the compare kernel")
        # Host inputs: source block scales in the output's row order, the stored scales as they are,
        # the per-row scale_2 of both sides, and the values.
        src_s = {r: self.src(layer, e, r, "weight_scale").reshape(rows // len(roles), -1) for r in roles}
        a_scales = self.tgt.rows.join_np(src_s["gate"], src_s["up"]) if w13 else src_s[roles[0]]
        if w13:
            gate_row = self.tgt.rows.permutation(d.inter) < d.inter
            a_s2 = np.where(gate_row, np.float32(s2["gate"][0]), np.float32(s2["up"][0])).astype(np.float32)
            b_s2 = np.where(gate_row, np.float32(s2["gate"][1]), np.float32(s2["up"][1])).astype(np.float32)
        else:
            a_s2 = np.full(rows, s2[roles[0]][0], dtype=np.float32)
            b_s2 = np.full(rows, s2[roles[0]][1], dtype=np.float32)
        # The output's scales as the kernel reads them: as stored where it reads the layout itself,
        # else with the layout undone by its numpy inverse (row order kept: both sides are in it).
        stored = m.held_array(sname, start, n)  # small; hashed later, in order, by its own piece
        swz = self.tgt.scales.kernel_reads_in_place
        b_scales = stored if swz else self.tgt.scales.natural_np(stored, rows, cols)
        b_shape = self.tgt.scales.expert_shape(rows, cols) if swz else (rows, cols // NVFP4_BLOCK)
        key = (layer.prefix, part, e, all(s2[r][2] == 1.0 for r in roles))
        lane = self._lane() if self.decode == "cuda" else _ReferenceLane(self)
        lane.launch(key, rows, cols, values, a_scales, a_s2, b_scales, b_shape, swz, b_s2)
        # Both sides' scales were read here, maybe after their own checks had dropped them: drop them
        # again (the lane has copied them, or maps them again if it has not; only the pages go).
        m.release_tensor(sname, start, n)
        for r in roles:
            self.release_src(layer, e, r, "weight_scale")

    def _decoded(self, key: tuple[str, str, int, bool], stats: Any) -> None:
        """The read-back statistics (n_diff, nonfinite, max_abs, max_rel) of one decoded expert part."""
        p, part, e, copied = key
        n_diff, nonfinite, mabs, mrel = int(stats[0]), bool(stats[1]), float(stats[2]), float(stats[3])
        if nonfinite:
            raise _fail(f"{self._part_name(p, part, e)}: expert {e} decodes to NaN or Inf")
        if copied and n_diff:
            raise _fail(f"{self._part_name(p, part, e)}: expert {e} should decode bit-identically but {n_diff} values differ")
        with self._lock:
            if not copied:
                self.decoded_rel[(p, part, e)] = mrel
            res = self.results[p]
            res.max_abs = max(res.max_abs or 0.0, mabs)
            if part in ("w2_weight", "down.weight"):
                res.decoded += 1

    def finish_decode(self) -> None:
        """Read back what the GPU lanes still hold (after the pass; each lane's stream is synchronised)."""
        for lane in self._lanes:
            lane.flush()

    def check_decoded(self) -> None:
        """Each rescaled expert decoded no further from the source than its block scales allow (each
        fp32 product rounds once): the end-to-end result against the per-block one."""
        for (p, part, e), mrel in self.decoded_rel.items():
            bound = self.block_rel[(p, f"{part}_scale", e)]
            if mrel > bound * (1 + 2**-20) + 2**-22:
                raise _fail(
                    f"{self._part_name(p, part, e)}: expert {e} decodes {100 * mrel:.4g}% off the source, more than its block scales "
                    f"allow ({100 * bound:.4g}%)"
                )

    # -- one shard ---------------------------------------------------------------------------------
    def stream(self, shard: OutShard, pool: ThreadPoolExecutor, budget: ByteBudget, hash_file: bool) -> str | None:
        """Check every piece of ``shard``; returns its sha256 (hashing every byte once, in order)."""
        m = self.conv_m[shard.name]
        h = hashlib.sha256() if hash_file else None
        if h is not None:
            h.update(os.pread(m.fd, m.header.data_start, 0))  # the length prefix and the header
        inflight: deque[tuple[_Piece, Future | None, np.ndarray]] = deque()

        def finish_one() -> None:
            pc, fut, got = inflight.popleft()
            try:
                if fut is not None:
                    fut.result()
                if h is not None:
                    h.update(got)
                m.release_tensor(pc.tensor.entry.name, pc.start, pc.nbytes)
            finally:
                budget.release(pc.nbytes)
            if self.on_bytes is not None:
                self.on_bytes(shard.name, pc.nbytes)

        try:
            for pc in self.pieces(shard):
                if self.stop.is_set():
                    break
                if pc.check is None and h is None:
                    if self.on_bytes is not None:
                        self.on_bytes(shard.name, pc.nbytes)
                    continue
                while inflight and (inflight[0][1] is None or inflight[0][1].done()):
                    finish_one()
                while not budget.try_acquire(pc.nbytes):
                    if inflight:
                        finish_one()  # never wait on the budget while holding unfinished pieces
                    else:
                        budget.acquire(pc.nbytes)  # the others hold it, and release it as they finish
                        break
                got = m.held_array(pc.tensor.entry.name, pc.start, pc.nbytes)  # held until hashed
                inflight.append((pc, pool.submit(pc.check, got) if pc.check is not None else None, got))
                while len(inflight) > 64:
                    finish_one()
            while inflight:
                finish_one()
        except BaseException:
            self.stop.set()
            for pc, fut, _ in inflight:
                if fut is not None:
                    fut.cancel()
                budget.release(pc.nbytes)
            raise
        return h.hexdigest() if h is not None and not self.stop.is_set() else None


# ---------------------------------------------------------------------------------------------------
# entry point


def _run_pass(v: _Verifier, spec: OutputSpec, files: dict[str, dict[str, Any]], budget: ByteBudget, workers: int, hash_files: bool) -> None:
    """The pass: every output shard streamed (shards side by side, each hashed in its own order),
    its pieces checked on ``workers`` threads, within ``budget``; each shard's sha256 held to the
    manifest's ``files``; then the decodes still put off, on the same workers. The mappings are closed
    on the way out."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="nvfp4-verify")
    streams = ThreadPoolExecutor(max_workers=max(1, min(len(spec.shards), workers)), thread_name_prefix="nvfp4-verify-shard")
    futs: dict[str, Future] = {}
    try:
        futs = {s.name: streams.submit(v.stream, s, pool, budget, hash_files) for s in spec.shards}
        for name, fut in futs.items():
            digest = fut.result()
            if digest is not None and digest != files[name]["sha256"]:
                raise _fail(f"output files do not match the manifest: {name}: sha256 differs from manifest")
        v.run_deferred(pool, workers)
    finally:
        v.stop.set()  # a no-op after a full pass; after a failure, the other streams stop reading
        for fut in futs.values():
            fut.cancel()
        streams.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
        v.close()


def _warm_kernels(plan: Future, ready: threading.Event) -> None:
    """Import Triton and the compare kernel, then (once ``plan`` gives the output spec) launch it once
    on zeros of every expert shape, and set ``ready``. It starts with verify, so the import overlaps
    the headers being read and checked; the first decodes are put off meanwhile (see
    :meth:`_Verifier._decode`). Loading a compiled kernel takes most of a second the first time, and
    Triton does not serialise it: every worker whose first launch came before it was loaded would load
    it again. Only a warm-up: a failure here is left to the real launches to report."""
    try:
        import torch

        from .kernels.compare import compare_nvfp4

        dev = torch.device("cuda", torch.cuda.current_device())
        spec: OutputSpec | None = plan.result()
        if spec is None:
            return
        tgt = spec.target
        shapes = {s for l in spec.layers.values() for s in ((2 * l.dims.inter, l.dims.hidden), (l.dims.hidden, l.dims.inter))}
        if tgt.per_expert:
            shapes |= {(l.dims.inter, l.dims.hidden) for l in spec.layers.values()}
        for rows, cols in sorted(shapes):
            swz = tgt.scales.kernel_reads_in_place
            vals = torch.zeros((rows, cols // 2), dtype=torch.uint8, device=dev)
            a_s = torch.zeros((rows, cols // NVFP4_BLOCK), dtype=torch.uint8, device=dev)
            b_s = torch.zeros(tgt.scales.expert_shape(rows, cols), dtype=torch.uint8, device=dev) if swz else a_s
            s2 = torch.ones(rows, dtype=torch.float32, device=dev)
            compare_nvfp4(vals, a_s, s2, vals, b_s, s2, b_swizzled=swz, check=False)
        torch.cuda.synchronize(dev)
    except Exception:  # noqa: BLE001
        pass
    finally:
        ready.set()


def default_workers(*, gpu_decode: bool, cpus: int | None = None) -> int:
    """Worker threads by default: up to 8, or 6 with the GPU decode. Its per-expert host work (staging,
    the batched launches, torch's dispatch) is Python that holds the GIL: on the 16-core GPU host, in
    fresh processes, 6 workers gave the fastest first calls, and 8 little more in later calls
    (docs/benchmarks.md)."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(6 if gpu_decode else 8, cpus))


def pick_device(device: str) -> str:
    """'cuda' or 'cpu' for --device auto|cuda|cpu."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but no CUDA device is visible")
    if device not in ("cuda", "cpu"):
        raise InputError(f"--device must be auto, cuda or cpu, not {device!r}")
    return device


def verify(
    source_dir: Path,
    conv_dir: Path,
    *,
    sample: int | None = None,
    device: str = "auto",
    decode: bool | None = None,
    hash_files: bool = True,
    workers: int = 0,
    budget_bytes: int = BUDGET_BYTES,
    trust_root: Path | None = None,
    source_label: str | None = None,
    seed: int | None = None,
    on_bytes: Callable[[str, int], None] | None = None,
    on_stage: Callable[[str, int], None] | None = None,
) -> VerifyResult:
    """Check the converted folder ``conv_dir`` against the source ``source_dir`` (see the module notes).

    ``workers`` threads check the pieces (0: :func:`default_workers`). ``sample`` checks that many
    experts a layer, drawn at random (``seed`` makes the draw
    repeatable); every file is still hashed unless ``hash_files=False``, which compares sizes only.
    ``decode`` runs the end-to-end dequant-and-compare (default: on a GPU, yes; on the CPU, no: it
    runs the torch reference there, which is slow). Raises :class:`CheckFailed` naming file, tensor,
    expert and first bad index when a check fails, and :class:`InputError` when the source or the
    options are unusable (missing folder, no GPU for ``device="cuda"``).

    Progress: ``on_stage(what, total_bytes)`` when a stage begins (reading headers, hashing the small
    files, the pass over the shards), ``on_bytes(shard, n)`` as the pass checks bytes, from several
    threads at once.
    """
    import time

    t0 = time.perf_counter()
    dev = pick_device(device)
    decode = (dev == "cuda") if decode is None else decode
    workers = workers or default_workers(gpu_decode=decode and dev == "cuda")
    kernels_ready, plan = threading.Event(), Future()  # plan: the spec for _warm_kernels, None if there is none
    if decode and dev == "cuda":
        threading.Thread(target=_warm_kernels, args=(plan, kernels_ready), daemon=True).start()
    conv_dir = Path(conv_dir)
    spec = None
    if on_stage:
        on_stage("reading headers", 0)
    try:
        manifest, options, spec = _checked_plan(source_dir, conv_dir, trust_root)
    finally:
        plan.set_result(spec)  # None after a failure: the warm-up thread stops
    try:
        conv = scan_source(conv_dir)
    except InputError as e:  # the output's index and shard headers disagree, a shard is unreadable...
        raise _fail(f"the converted folder is not a consistent checkpoint: {e}") from None
    shard_names = {s.name for s in spec.shards}
    if hash_files and on_stage:
        on_stage("hashing the small files", 0)
    if hash_files:  # the small files first; the shards are hashed by the pass below
        for name, rec in manifest.files.items():
            if name not in shard_names and sha256_file(conv_dir / name) != rec["sha256"]:
                raise _fail(f"output files do not match the manifest: {name}: sha256 differs from manifest")
    _check_structure(spec, conv_dir, conv, model_card=manifest.model_card)

    rng = random.Random(seed)
    experts = {}
    for p, layer in spec.layers.items():
        n = layer.dims.experts
        experts[p] = set(range(n)) if not sample or sample >= n else set(rng.sample(range(n), sample))
    v = _Verifier(spec, conv, experts, dev if decode else None, kernels_ready)
    result = VerifyResult(source_label or str(source_dir), str(conv_dir), options.target.name, dev)
    result.checks = [CHECK_HASHES if hash_files else CHECK_SIZES, CHECK_STRUCTURE, CHECK_COPIED, CHECK_GLOBALS, CHECK_VALUES, CHECK_SCALES, CHECK_BOUND]
    if options.target.per_expert:
        result.checks[result.checks.index(CHECK_GLOBALS)] = CHECK_SCALARS
    if spec.source.encoded:
        result.checks.append(CHECK_DECODED)
    if decode:
        how = "the Triton compare kernel on the GPU" if dev == "cuda" else "the kernel's torch reference on the CPU"
        result.checks.append(f"end to end: every checked expert of both checkpoints dequantized and compared ({how})")
    else:
        result.note = "end-to-end dequant-and-compare not run (no GPU; --decode runs its CPU reference, slowly)"
    budget = ByteBudget(budget_bytes)
    v.on_bytes = on_bytes
    if on_stage:
        on_stage("checking", sum(s.data_bytes for s in spec.shards))
    _run_pass(v, spec, manifest.files, budget, workers, hash_files)
    v.finish_decode()
    v.check_decoded()
    result.files_hashed = len(manifest.files) if hash_files else 0
    result.copied_tensors = v.copied
    result.decoded_block_scales = v.decoded
    result.copied_groups = [
        {"prefix": g.prefix, "format": g.format, "experts": g.experts, "tensors": g.tensors, "identical": True}
        for g in spec.copied_groups.values()
    ]
    for p, lr in v.results.items():
        n = spec.layers[p].dims.experts
        lr.sampled = sorted(experts[p]) if len(experts[p]) < n else None
        result.layers.append(lr)
    result.peak_read_ahead = budget.peak
    result.seconds = time.perf_counter() - t0
    return result


def _checked_plan(source_dir: Path, conv_dir: Path, trust_root: Path | None) -> tuple[Manifest, OutputOptions, OutputSpec]:
    """The manifest, options and output spec of ``conv_dir``, once every file the manifest lists is
    there at its size and the source is the one it was converted from."""
    if not conv_dir.is_dir():
        raise InputError("converted folder does not exist", file=str(conv_dir))
    manifest = load_manifest(conv_dir)
    if manifest is None:
        raise _fail(f"{conv_dir} has no {MANIFEST_NAME}: the conversion is incomplete (rerun convert to resume)")
    for name, rec in manifest.files.items():
        p = conv_dir / name
        if not p.is_file():
            raise _fail(f"output files do not match the manifest: {name}: missing")
        if p.stat().st_size != rec["size"]:
            raise _fail(f"output files do not match the manifest: {name}: size {p.stat().st_size} != manifest {rec['size']}")
    options = OutputOptions.from_json(manifest.options, file=str(conv_dir / MANIFEST_NAME))
    src = scan_source(source_dir, trust_root=trust_root)
    if src.fingerprint() != manifest.input_fingerprint:
        raise _fail("the source's headers and configs are not those this output was converted from (fingerprint differs)")
    return manifest, options, build_spec(src, options)
