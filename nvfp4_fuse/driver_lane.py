"""The GPU decode without torch: the compare kernel's cached binary launched through the bare driver.

:class:`DriverLane` is :class:`~nvfp4_fuse.decode_lanes.GpuLane`'s counterpart for expert shapes whose
compiled kernel :mod:`~nvfp4_fuse.kernel_cache` holds: the decode process then starts in a fraction of
a second (``libcuda`` and numpy) instead of after torch's import (3.3-3.7 s on the H200 host), which
on a checkpoint of a few GB is longer than verify's whole pass. What torch did on the device (A's
block scales put in the output's row order, B's layout undone where the kernel cannot read it, each
row's scale_2) is done on the host as a batch is staged: a row gather of the block scales (an eighth of
the values' bytes) and one strided copy. Per batch: one upload, one launch, one download of the
per-tile statistics, reduced on the host.

:func:`harvest` is the other end, run where torch is loaded (a first verify): it keeps each shape's
compiled kernel once a launch through the driver matched Triton's own bit for bit.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from . import kernel_cache
from .constants import COMPARE_BPP, COMPARE_NSUB, COMPARE_WARPS, NVFP4_BLOCK
from .cuda_driver import CudaDriver, Function
from .decode_lanes import BatchingLane, DecodeJob, stage
from .layout import LinearScales, ScaleLayout

OnStats = Callable[[Any, Any], None]
# The compile-time choices of every launch the cache holds (the GPU lanes' launch: per-row scale_2 on
# both sides, A linear, the fast path on, max_rel by the approximate division).
LAUNCH = dict(bpp=COMPARE_BPP, nsub=COMPARE_NSUB, warps=COMPARE_WARPS, a_row=True, b_row=True, fast=True, rel_rn=False)
ALIGN = 256
_STAT_BYTES = (4, 4, 4, 1)  # max_abs f32, max_rel f32, n_diff i32, nonfinite i8, per tile


def shape_key(rows: int, cols: int, layout: ScaleLayout) -> tuple[int, int, bool]:
    return rows, cols, layout.kernel_reads_in_place


def load_kernels(drv: CudaDriver, layout: ScaleLayout, shapes: list[tuple[int, int]]) -> tuple[dict, list[tuple[int, int]]]:
    """({shape key: (function, entry)} for the shapes whose binary is cached, [the other shapes])."""
    found, missing = {}, []
    for rows, cols in shapes:
        entry = kernel_cache.load(kernel_cache.entry_key(drv.capability, rows, cols, layout.kernel_reads_in_place, LAUNCH))
        if entry is None:
            missing.append((rows, cols))
            continue
        try:
            fn = drv.load(entry.binary, entry.name, entry.shared, entry.threads)
        except Exception:  # noqa: BLE001 (an unloadable entry: compiled again the usual way)
            missing.append((rows, cols))
            continue
        found[shape_key(rows, cols, layout)] = (fn, entry)
    return found, missing


def _aligned(sizes: list[int]) -> tuple[list[int], int]:
    offs, total = [], 0
    for n in sizes:
        offs.append(total)
        total += -(-n // ALIGN) * ALIGN
    return offs, total


class _Shape:
    """A lane's state for one expert shape: where each side's inputs sit for a batch (the same in the
    pinned staging buffer and on the device: values, A's scales, B's scales, A's and B's scale_2 per
    row, each ``cap`` parts long), the device's statistics, and the jobs waiting."""

    def __init__(self, drv: CudaDriver, job: DecodeJob, fn: Function, entry: kernel_cache.Entry, stage_bytes: int, batch: int):
        rows, cols = job.rows, job.cols
        k16 = cols // NVFP4_BLOCK
        self.rows, self.k16 = rows, k16
        self.fn, self.entry = fn, entry
        self.ints = kernel_cache.compare_ints(rows, cols, COMPARE_BPP, COMPARE_NSUB)
        self.in_place = job.layout.kernel_reads_in_place
        self.linear = isinstance(job.layout, LinearScales)
        self.layout = job.layout
        self.b_bytes = int(np.prod(job.b_shape))
        self.stored_bytes = job.b_stored.nbytes
        self.per = [rows * cols // 2, rows * k16, self.b_bytes, 4 * rows, 4 * rows]
        self.cap = max(1, min(batch, stage_bytes // sum(self.per)))
        self.offs, self.total = _aligned([self.cap * n for n in self.per])
        t = self.ints["T"]
        self.out_offs, self.out_total = _aligned([self.cap * t * n for n in _STAT_BYTES])
        self.dev = drv.alloc(self.total)
        self.dev_out = drv.alloc(self.out_total)
        self.perm = None if job.row_perm is None else np.asarray(job.row_perm, dtype=np.intp)
        self.first = None if job.first_rows is None else np.asarray(job.first_rows, dtype=bool)
        self.a_tmp = np.empty((rows, k16), dtype=np.uint8) if self.perm is not None else None
        self.b_tmp = None if self.in_place or self.linear else np.empty(self.stored_bytes, dtype=np.uint8)
        self.jobs: list[DecodeJob] = []
        self.keys: list[Any] = []

    def put(self, host: np.ndarray, j: int, job: DecodeJob) -> None:
        """Part ``j``'s inputs into the staging buffer ``host``, finished for the kernel."""
        rows, k16, o, per = self.rows, self.k16, self.offs, self.per
        stage(job.values, host[o[0] + j * per[0] : o[0] + (j + 1) * per[0]])
        a_dst = host[o[1] + j * per[1] : o[1] + (j + 1) * per[1]]
        flat = a_dst if self.a_tmp is None else self.a_tmp.reshape(-1)
        pos = 0
        for a in job.a_scales:
            stage(a, flat[pos : pos + a.nbytes])
            pos += a.nbytes
        if self.a_tmp is not None:  # the output's row order: output row i is row perm[i] of gate and up stacked
            np.take(self.a_tmp, self.perm, axis=0, out=a_dst.reshape(rows, k16))
        b_dst = host[o[2] + j * per[2] : o[2] + (j + 1) * per[2]]
        if self.b_tmp is None:
            stage(job.b_stored, b_dst)
        else:
            stage(job.b_stored, self.b_tmp)
            np.copyto(b_dst.reshape(rows, k16), self.layout.natural_np(self.b_tmp, rows, k16 * NVFP4_BLOCK))
        s2 = np.asarray(job.s2, dtype=np.float32)
        for side, k in ((0, 3), (2, 4)):
            dst = host[o[k] + j * per[k] : o[k] + (j + 1) * per[k]].view(np.float32)
            if self.first is None:
                dst.fill(s2[side])
            else:
                np.copyto(dst, np.where(self.first, s2[side], s2[side + 1]))

    def params(self, n: int) -> list:
        """The launch's parameters for a batch in the slots (both sides decode the same values)."""
        d, o, q = self.dev, self.offs, self.out_offs
        ptrs = dict(wa_ptr=d + o[0], sa_ptr=d + o[1], s2a_ptr=d + o[3], wb_ptr=d + o[0], sb_ptr=d + o[2], s2b_ptr=d + o[4],
                    abs_ptr=self.dev_out + q[0], rel_ptr=self.dev_out + q[1], cnt_ptr=self.dev_out + q[2], flag_ptr=self.dev_out + q[3])  # fmt: skip
        return self.entry.values({**ptrs, **self.ints})


class DriverLane(BatchingLane):
    """One decode thread's lane for the shapes in ``kernels`` (see the module's docstring): parts of a
    shape gather into a batch (up to ``BATCH`` parts and ``STAGE_BYTES`` of inputs), staged into a
    pinned buffer (used in turn, ``RING`` of them, each refilled once its upload is done), uploaded,
    compared, and their statistics downloaded on the lane's own stream; read back every ``FLUSH``
    parts."""

    RING = 2
    BATCH = 8
    STAGE_BYTES = 32 << 20
    FLUSH = 32

    def __init__(self, on_stats: OnStats, drv: CudaDriver, kernels: dict):
        self.on_stats, self.drv, self.kernels = on_stats, drv, kernels
        drv.use()
        self.stream = drv.stream()
        self.bufs: list[tuple[int, np.ndarray] | None] = [None] * self.RING
        self.events = [drv.event() for _ in range(self.RING)]
        self.used = [False] * self.RING
        self.turn = 0
        self.groups: dict[tuple, _Shape] = {}
        self.pending: list[tuple[list[Any], _Shape, int, tuple[int, np.ndarray], Any]] = []
        self.spare: list[tuple[tuple[int, np.ndarray], Any]] = []  # pinned statistics buffers and events, free
        self.unread = 0
        self.counts = {"driver": 0}

    def handles(self, job: DecodeJob) -> bool:
        return shape_key(job.rows, job.cols, job.layout) in self.kernels

    def _group(self, job: DecodeJob) -> _Shape:
        sk = (*shape_key(job.rows, job.cols, job.layout), job.row_perm is not None, job.layout.__class__.__name__)
        b = self.groups.get(sk)
        if b is None:
            fn, entry = self.kernels[sk[:3]]
            b = self.groups[sk] = _Shape(self.drv, job, fn, entry, self.STAGE_BYTES, self.BATCH)
        return b

    def _buffer(self, i: int, nbytes: int) -> tuple[int, np.ndarray]:
        buf = self.bufs[i]
        if buf is None or buf[1].nbytes < nbytes:
            if buf is not None:
                self.drv.host_free(buf[0])
            buf = self.bufs[i] = self.drv.host_alloc(nbytes)
        return buf

    def _run(self, b: _Shape) -> None:
        jobs, keys, b.jobs, b.keys = b.jobs, b.keys, [], []
        drv = self.drv
        try:
            i, self.turn = self.turn, (self.turn + 1) % self.RING
            if self.used[i]:
                drv.wait_event(self.events[i])  # its last upload has left it
            addr, host = self._buffer(i, b.total)
            for j, job in enumerate(jobs):
                b.put(host, j, job)
        finally:
            for job in jobs:
                job.release()
        n = len(jobs)
        drv.upload(b.dev, addr, b.total, self.stream)
        drv.record(self.events[i], self.stream)
        self.used[i] = True
        t = b.ints["T"]
        drv.launch(b.fn, (t, n, 1), b.params(n), self.stream)
        out, ev = self.spare.pop() if self.spare else (None, None)
        if out is None or out[1].nbytes < b.out_total:
            if out is not None:
                drv.host_free(out[0])
            out = drv.host_alloc(b.out_total)
        ev = ev or drv.event()
        drv.download(out[0], b.dev_out, b.out_total, self.stream)
        drv.record(ev, self.stream)
        self.pending.append((keys, b, n, out, ev))
        self.unread += n
        self.counts["driver"] += 1

    def _read_back(self) -> None:
        pending, self.pending, self.unread = self.pending, [], 0
        for keys, b, n, out, ev in pending:
            self.drv.wait_event(ev)
            t, q, host = b.ints["T"], b.out_offs, out[1]
            mabs = host[q[0] : q[0] + 4 * n * t].view(np.float32).reshape(n, t)
            mrel = host[q[1] : q[1] + 4 * n * t].view(np.float32).reshape(n, t)
            cnt = host[q[2] : q[2] + 4 * n * t].view(np.int32).reshape(n, t)
            flag = host[q[3] : q[3] + n * t].view(np.int8).reshape(n, t)
            rows = np.stack([cnt.sum(axis=1, dtype=np.int64).astype(np.float64), (flag != 0).any(axis=1).astype(np.float64),
                             mabs.max(axis=1).astype(np.float64), mrel.max(axis=1).astype(np.float64)], axis=1)  # fmt: skip
            self.spare.append((out, ev))
            for key, row in zip(keys, rows.tolist()):
                self.on_stats(key, row)



_HARVEST_LOCK = threading.Lock()


def harvest(drv: CudaDriver, layout: ScaleLayout, shapes: list[tuple[int, int]]) -> int:
    """Keep the compare kernel Triton compiled for each of ``shapes`` (torch and CUDA up, on this
    thread), once a launch of it through ``drv`` gave the statistics Triton's own launch did, bit for
    bit, on random inputs that differ between the sides (a parameter out of place would show).
    Returns how many were kept; a failure keeps nothing and is not an error (the next run compiles
    again)."""
    import torch

    from .kernels.compare import compare_tiles

    kept = 0
    in_place = layout.kernel_reads_in_place
    with _HARVEST_LOCK:
        drv.use()
        for rows, cols in shapes:
            key = kernel_cache.entry_key(drv.capability, rows, cols, in_place, LAUNCH)
            if key is None or kernel_cache.load(key) is not None:
                continue
            try:
                dev = torch.device("cuda", torch.cuda.current_device())
                g = torch.Generator(device=dev).manual_seed(rows * 7919 + cols)
                k16 = cols // NVFP4_BLOCK
                wa = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, device=dev, generator=g)
                wb = wa.clone()
                wb.view(-1)[:: max(1, wb.numel() // 97)] ^= 0x35  # some values differ
                sa = torch.randint(0, 0x7F, (rows, k16), dtype=torch.uint8, device=dev, generator=g)
                b_shape = tuple(layout.expert_shape(rows, cols)) if in_place else (rows, k16)
                sb = torch.randint(0, 0x7F, b_shape, dtype=torch.uint8, device=dev, generator=g)
                s2a = torch.rand(rows, dtype=torch.float32, device=dev, generator=g) + 0.5
                s2b = s2a.clone()
                s2b[::3] *= 1.25
                got: list = []
                tiles, _ = compare_tiles(wa, sa, s2a, wb, sb, s2b, b_swizzled=in_place, check=False, kernel_out=got)
                entry = kernel_cache.from_compiled(got[0]) if got and got[0] is not None else None
                if entry is None:
                    continue
                fn = drv.load(entry.binary, entry.name, entry.shared, entry.threads)
                mine = {k: torch.full_like(v, 7) for k, v in tiles.items()}
                ints = kernel_cache.compare_ints(rows, cols, COMPARE_BPP, COMPARE_NSUB)
                ptrs = dict(wa_ptr=wa.data_ptr(), sa_ptr=sa.data_ptr(), s2a_ptr=s2a.data_ptr(), wb_ptr=wb.data_ptr(),
                            sb_ptr=sb.data_ptr(), s2b_ptr=s2b.data_ptr(), abs_ptr=mine["max_abs"].data_ptr(),
                            rel_ptr=mine["max_rel"].data_ptr(), cnt_ptr=mine["n_diff"].data_ptr(), flag_ptr=mine["nonfinite"].data_ptr())  # fmt: skip
                stream = ctypes.c_void_p(torch.cuda.current_stream(dev).cuda_stream)
                drv.launch(fn, (ints["T"], 1, 1), entry.values({**ptrs, **ints}), stream)
                torch.cuda.synchronize(dev)
                same = all(torch.equal(mine[k].view(torch.uint8), tiles[k].view(torch.uint8)) for k in tiles)
                if same and int(tiles["n_diff"].sum()) and kernel_cache.store(key, entry):
                    kept += 1
            except Exception:  # noqa: BLE001 (only a faster start lost)
                continue
    return kept
