"""The end-to-end decode: lanes that dequantize expert parts of both checkpoints and compare them.

A :class:`GpuLane` (one per decode thread) stages each part's inputs through pinned buffers, compares
parts of one shape in batches with the Triton compare kernel (with its torch reference, on the GPU,
until the kernel is loaded) and reads the statistics back in bulk;
a :class:`ReferenceLane` runs the kernel's torch reference on the CPU at once. Either hands each
part's statistics (n_diff, nonfinite, max_abs, max_rel) to ``on_stats(key, row)``.
:func:`warm_kernels` loads the kernel for every expert shape of a conversion before the first launch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np

from .constants import NVFP4_BLOCK
from .spec import OutputSpec

if TYPE_CHECKING:
    import torch

# What a lane hands back: (key of the expert part, its statistics row).
OnStats = Callable[[Any, Any], None]


def compare_stats(res: Any) -> torch.Tensor:
    """float64 [E, 4] (n_diff, nonfinite, max_abs, max_rel) of a compare result, a row per expert, on
    its device: what a lane reads back."""
    import torch

    return torch.stack([res.n_diff.double(), res.nonfinite.double(), res.max_abs.double(), res.max_rel.double()], dim=1)


class Batch:
    """Up to :attr:`GpuLane.BATCH` expert parts of one shape, gathered on the device for one compare
    launch: slot ``i`` of ``slots`` holds part ``i``'s inputs at ``offs`` (as staged)."""

    def __init__(self, slots: torch.Tensor, offs: list[int], sizes: list[int]):
        self.slots, self.offs, self.sizes = slots, offs, sizes
        self.keys: list[tuple[str, str, int, bool]] = []


class GpuLane:
    """One decode thread's GPU state. Its own CUDA stream (a thread waits for its own work only);
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

    def __init__(self, on_stats: OnStats, kernels_ready: threading.Event | None = None):
        import torch

        self.kernels_ready = kernels_ready  # until set, the kernel's torch reference runs on the GPU instead
        self.on_stats = on_stats
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.bufs: list[torch.Tensor | None] = [None] * self.RING
        self.events: list[Any] = [None] * self.RING
        self.turn = 0
        self.batches: dict[tuple, Batch] = {}
        self.pending: list[tuple[list[tuple[str, str, int, bool]], torch.Tensor]] = []
        self.unread = 0  # parts launched and not read back

    def _batch(self, shape: tuple, arrays: list[np.ndarray]) -> Batch:
        import torch

        b = self.batches.get(shape)
        if b is None:
            offs, total = [], 0
            for a in arrays:
                offs.append(total)
                total += -(-a.nbytes // self.ALIGN) * self.ALIGN
            slots = torch.empty((self.BATCH, total), dtype=torch.uint8, device=self.device)
            b = self.batches[shape] = Batch(slots, offs, [a.nbytes for a in arrays])
        return b

    def _stage(self, arrays: list[np.ndarray], b: Batch) -> None:
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

    def _compare(self, shape: tuple, b: Batch) -> None:
        """One launch over the batch's parts (the caller holds the lane's stream)."""
        import torch

        rows, cols, b_shape, b_swizzled = shape
        n = len(b.keys)

        def region(k: int, dtype: torch.dtype, *dims: int) -> torch.Tensor:
            return b.slots[:n, b.offs[k] : b.offs[k] + b.sizes[k]].view(dtype).reshape(n, *dims)

        vals = region(0, torch.uint8, rows, cols // 2).contiguous()  # one copy for both sides
        a_t, a2 = region(1, torch.uint8, rows, cols // NVFP4_BLOCK), region(2, torch.float32, rows)
        b_t, b2 = region(3, torch.uint8, *b_shape), region(4, torch.float32, rows)
        if self.kernels_ready is None or self.kernels_ready.is_set():
            from .kernels.compare import compare_nvfp4

            stats = compare_stats(compare_nvfp4(vals, a_t, a2, vals, b_t, b2, b_swizzled=b_swizzled, check=False))
        else:
            # Triton is still loading the kernel (about a second of a first call): its torch reference,
            # on the GPU, a part at a time (it holds fp32 copies of a part), gives the same statistics.
            from .kernels.reference import compare_nvfp4_ref

            stats = torch.cat(
                [
                    compare_stats(compare_nvfp4_ref(vals[i], a_t[i], a2[i], vals[i], b_t[i], b2[i], b_swizzled=b_swizzled))
                    for i in range(n)
                ]
            )
        self.pending.append((b.keys, stats))
        self.unread += n
        b.keys = []

    def _read_back(self) -> None:
        import torch

        pending, self.pending, self.unread = self.pending, [], 0
        if pending:
            got = torch.cat([st for _, st in pending]).cpu()  # waits for this stream's work only
            keys = [k for ks, _ in pending for k in ks]
            for key, row in zip(keys, got.tolist()):
                self.on_stats(key, row)

    def flush(self) -> None:
        """Launch the part-filled batches and read everything back."""
        import torch

        with torch.cuda.stream(self.stream):
            for shape, b in self.batches.items():
                if b.keys:
                    self._compare(shape, b)
            self._read_back()


class ReferenceLane:
    """The CPU's stand-in for :class:`GpuLane`: the kernel's torch reference, run at once."""

    def __init__(self, on_stats: OnStats, kernels_ready: threading.Event | None = None):
        self.on_stats = on_stats

    def launch(self, key, rows: int, cols: int, values, a_scales, a_s2, b_scales, b_shape, b_swizzled: bool, b_s2) -> None:
        import torch

        from .kernels.reference import compare_nvfp4_ref

        vals, a_t, a2, b_t, b2 = (torch.from_numpy(np.array(x)) for x in (values, a_scales, a_s2, b_scales, b_s2))
        vals = vals.reshape(rows, cols // 2)
        res = compare_nvfp4_ref(vals, a_t, a2, vals, b_t.reshape(b_shape), b2, b_swizzled=b_swizzled)
        self.on_stats(key, compare_stats(res)[0])

    def flush(self) -> None:
        pass


def warm_kernels(plan: Future, ready: threading.Event) -> None:
    """Import Triton and the compare kernel, then (once ``plan`` gives the output spec) launch it once
    on zeros of every expert shape, and set ``ready``. It starts with verify, so the import overlaps
    the headers being read and checked; until ``ready`` is set the lanes run the kernel's torch
    reference on the GPU (see :meth:`GpuLane._compare`). Loading a compiled kernel takes most of a
    second the first time, and Triton does not serialise it: every lane whose first launch came before
    it was loaded would load it again. Only a warm-up: a failure here is left to the real launches to
    report."""
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
