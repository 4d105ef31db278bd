"""The end-to-end decode: lanes that dequantize expert parts of both checkpoints and compare them.

Each expert part's decode is a :class:`DecodeJob` (its inputs: arrays, or in the GPU decode process
:class:`FileBytes`, file regions read when staged). A :class:`GpuLane` (one per lane thread of the
decode process, :mod:`~nvfp4_fuse.decode_worker`) gathers jobs of one shape into batches, stages a batch in one pinned copy and
one upload, finishes the inputs on the device and compares them with the Triton compare kernel (with
its torch reference, on the GPU, until the kernel is loaded), replayed as a CUDA graph, and reads the
statistics back in bulk; a :class:`ReferenceLane` runs the kernel's torch reference on the CPU at
once (:class:`HostLane` reads file regions first). Either hands each part's statistics (n_diff, nonfinite, max_abs, max_rel) to
``on_stats(key, row)``.
:func:`warm_kernels` loads the kernel for every expert shape of a conversion before the first launch.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .constants import NVFP4_BLOCK
from .layout import LinearScales, ScaleLayout
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


@dataclass
class DecodeJob:
    """One expert part's decode, as the host holds it: arrays that are mostly views of the mapped
    checkpoints, held until :attr:`release` (called once, when the lane has copied them).

    Both sides decode the same packed values (the output's, found byte-identical to the source's).
    Side A is the source: its block scales in their natural layout, one ``[rows, K/16]`` array or
    gate and up ``[rows/2, K/16]`` each, put in the output's row order by ``row_perm`` (output row j is
    row ``row_perm[j]`` of them stacked; None: stacked as they are). Side B is the output: its block
    scales as stored, in ``layout``. ``s2`` is each side's scale_2, (A first, A second, B first, B
    second): the first of a side applies to the rows ``first_rows`` marks (gate's rows of w13), the
    second to the others (None: the first applies to every row)."""

    rows: int
    cols: int
    values: np.ndarray
    a_scales: tuple[np.ndarray, ...]
    row_perm: np.ndarray | None
    b_stored: np.ndarray
    layout: ScaleLayout
    s2: tuple[float, float, float, float]
    first_rows: np.ndarray | None
    release: Callable[[], None]

    def host_inputs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(A's scales [rows, K/16] in the output's row order, A's scale_2 per row, B's scales as the
        compare kernel reads them, B's scale_2 per row), built on the host (the CPU reference)."""
        a = np.concatenate([x.reshape(-1, self.cols // NVFP4_BLOCK) for x in self.a_scales])
        if self.row_perm is not None:
            a = a[self.row_perm]
        first = np.ones(self.rows, dtype=bool) if self.first_rows is None else self.first_rows
        a2 = np.where(first, np.float32(self.s2[0]), np.float32(self.s2[1])).astype(np.float32)
        b2 = np.where(first, np.float32(self.s2[2]), np.float32(self.s2[3])).astype(np.float32)
        swz = self.layout.kernel_reads_in_place
        b = self.b_stored if swz else self.layout.natural_np(self.b_stored, self.rows, self.cols)
        return a, a2, b.reshape(self.b_shape), b2

    @property
    def b_shape(self) -> tuple[int, ...]:
        """B's scales' shape as the compare kernel reads them."""
        if self.layout.kernel_reads_in_place:
            return tuple(self.layout.expert_shape(self.rows, self.cols))
        return (self.rows, self.cols // NVFP4_BLOCK)


@dataclass(frozen=True)
class FileBytes:
    """``nbytes`` bytes at ``offset`` of the file at ``path`` (inode ``ino``), read when staged: the
    decode process's view of a part's input (see :mod:`~nvfp4_fuse.decode_process`)."""

    files: Any  # decode_worker.Files: the open descriptors
    path: str
    ino: int
    offset: int
    nbytes: int

    def read_into(self, dst: np.ndarray) -> None:
        from .shard_reader import vectored_transfer

        fd = self.files.fd(self.path, self.ino)
        if vectored_transfer(os.preadv, fd, [memoryview(dst)], self.offset) < 0:
            raise OSError(f"{self.path}: the file ended early while reading (truncated?)")

    def read(self) -> np.ndarray:
        a = np.empty(self.nbytes, dtype=np.uint8)
        self.read_into(a)
        return a


def stage(src: np.ndarray | FileBytes, dst: np.ndarray) -> None:
    """``src``'s bytes into ``dst`` (uint8, as many bytes)."""
    if isinstance(src, FileBytes):
        src.read_into(dst)
    else:
        dst[:] = np.ascontiguousarray(src).reshape(-1).view(np.uint8)


def make_job(shape: dict, s2: tuple[float, float, float, float], regions: tuple, files: Any) -> DecodeJob:
    """The decode process's :class:`DecodeJob` from a part's message (see
    :func:`nvfp4_fuse.decode_process.region`): file regions read when staged, bytes as arrays."""

    def one(r: tuple) -> np.ndarray | FileBytes:
        if r[0] == "file":
            return FileBytes(files, r[1], r[2], r[3], r[4])
        return np.frombuffer(r[1], dtype=np.uint8)

    values, a_scales, b_stored = regions
    return DecodeJob(
        rows=shape["rows"],
        cols=shape["cols"],
        values=one(values),
        a_scales=tuple(one(a) for a in a_scales),
        row_perm=shape["row_perm"],
        b_stored=one(b_stored),
        layout=shape["layout"],
        s2=s2,
        first_rows=shape["first_rows"],
        release=lambda: None,
    )


class _Batches:
    """A lane's state for expert parts of one shape: where each input sits in a part's slot (the same
    in the pinned staging buffer and on the device), the device's slots for a batch, the index
    tensors that finish the inputs on the device, and the jobs waiting for the next batch."""

    def __init__(self, job: DecodeJob, device: Any, stage_bytes: int, batch: int, align: int):
        import torch

        sizes = [job.values.nbytes, sum(a.nbytes for a in job.a_scales), job.b_stored.nbytes, 16]
        self.offs, total = [], 0
        for n in sizes:
            self.offs.append(total)
            total += -(-n // align) * align
        self.sizes, self.total = sizes, total
        self.pads = [self.offs[k + 1] - self.offs[k] - sizes[k] for k in range(3)] + [total - self.offs[3] - 16]
        self.cap = max(1, min(batch, stage_bytes // total))
        self.slots = torch.empty((self.cap, total), dtype=torch.uint8, device=device)
        self.rows, self.cols = job.rows, job.cols
        self.swz = job.layout.kernel_reads_in_place
        self.b_shape = job.b_shape
        self.perm = None if job.row_perm is None else torch.tensor(np.asarray(job.row_perm, dtype=np.int64), device=device)
        self.first = None if job.first_rows is None else torch.tensor(np.asarray(job.first_rows, dtype=bool), device=device)
        self.nat = None  # B's natural index, where the kernel cannot read B's layout as stored
        if not self.swz and not isinstance(job.layout, LinearScales):
            with _INDEX_LOCK:  # built once per shape and process (numpy), then sent to the device
                index = job.layout.natural_index(job.rows, job.cols)
            self.nat = torch.tensor(np.asarray(index, dtype=np.int64).reshape(-1), device=device)
        self.jobs: list[DecodeJob] = []
        self.keys: list[Any] = []
        self.eager_ready_runs = 0  # batches compared by the kernel, eagerly
        self.graph: Any = None  # then a CUDA graph of a full batch's device steps (GpuLane._compare)
        self.graph_out: Any = None
        self.graph_failed = False


_INDEX_LOCK = threading.Lock()
_NOT_WRITABLE = "The given NumPy array is not writable"


class BatchingLane:
    """What the GPU lanes (:class:`GpuLane`, and driver_lane.py's ``DriverLane``) share: parts wait in
    ``groups`` (one a shape, each with its ``jobs`` and ``keys``) for their batch, which ``_run``
    stages and launches; ``_read_back`` hands every launched part's statistics to ``on_stats``."""

    groups: dict
    FLUSH: int
    unread: int  # parts launched and not read back

    def _group(self, job: DecodeJob) -> Any:
        """The group ``job`` waits in (made on first use)."""
        raise NotImplementedError

    def _run(self, b: Any) -> None:
        raise NotImplementedError

    def _read_back(self) -> None:
        raise NotImplementedError

    def launch(self, key: Any, job: DecodeJob) -> None:
        """Queue ``job`` for its shape's next batch (which runs once full); the lane owns it from here
        and releases it once staged, or at once on a failure."""
        try:
            b = self._group(job)
        except BaseException:
            job.release()
            raise
        b.jobs.append(job)
        b.keys.append(key)
        if len(b.jobs) >= b.cap:
            self._run(b)
        if self.unread >= self.FLUSH:
            self._read_back()

    def flush(self) -> None:
        """Run the part-filled batches and read everything back."""
        for b in self.groups.values():
            if b.jobs:
                self._run(b)
        self._read_back()

    def discard(self) -> None:
        """Release the jobs still waiting for a batch, unrun (after a failure)."""
        for b in self.groups.values():
            jobs, b.jobs, b.keys = b.jobs, [], []
            for job in jobs:
                job.release()


class GpuLane(BatchingLane):
    """One decode thread's GPU state, on a CUDA stream of its own (a thread waits for its own work
    only). Expert parts of one shape gather into a batch (up to ``BATCH`` parts and ``STAGE_BYTES``
    of inputs); a full batch goes to the device in one host copy, every input of every part into a
    pinned buffer at once (one call, which leaves the GIL while it copies), and one non-blocking
    upload; on the device, a few operations a batch finish the inputs (A's scales in the output's row
    order, B's layout undone by a gather where the kernel cannot read it as stored, each row's
    scale_2) and one compare launch reads them all; once the kernel is loaded these device steps are
    one CUDA graph replay. Per part the host only takes its views and holds: with the pass's check
    workers holding the GIL most of the time, every call that gives it up and takes it back (each
    torch call does) is a wait. The pinned buffers are used in turn (``RING``), each refilled once its
    upload is done; the stream orders a batch's upload after the launch that read the slots before.
    Statistics stay on the device and are read back every ``FLUSH`` parts."""

    RING = 2
    BATCH = 8
    STAGE_BYTES = 32 << 20
    GRAPHS = True  # replay a batch's device steps as one CUDA graph (see _compare)
    FLUSH = 32
    ALIGN = 256

    def __init__(self, on_stats: OnStats, kernels_ready: threading.Event | None = None):
        import warnings

        import torch

        # The mapped checkpoints are read-only; torch only reads the views it copies from.
        warnings.filterwarnings("ignore", message=_NOT_WRITABLE, category=UserWarning)
        self.kernels_ready = kernels_ready  # until set, the kernel's torch reference runs on the GPU instead
        self.on_stats = on_stats
        self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device)
        self.bufs: list[torch.Tensor | None] = [None] * self.RING
        self.events: list[Any] = [None] * self.RING
        self.turn = 0
        self.groups: dict[tuple, _Batches] = {}
        self.pending: list[tuple[list[Any], torch.Tensor]] = []
        self.unread = 0  # parts launched and not read back
        self.counts = {"reference": 0, "eager": 0, "graph": 0}  # batches compared each way

    def _group(self, job: DecodeJob) -> _Batches:
        import torch

        shape = (job.rows, job.cols, job.b_shape, job.layout.kernel_reads_in_place, job.row_perm is not None, len(job.a_scales))
        with torch.cuda.stream(self.stream):
            b = self.groups.get(shape)
            if b is None:
                b = self.groups[shape] = _Batches(job, self.device, self.STAGE_BYTES, self.BATCH, self.ALIGN)
        return b

    def _run(self, b: _Batches) -> None:
        """Stage, upload and compare ``b``'s waiting jobs."""
        import torch

        jobs, keys, b.jobs, b.keys = b.jobs, b.keys, [], []
        try:
            n = len(jobs)
            nbytes = n * b.total
            i, self.turn = self.turn, (self.turn + 1) % self.RING
            if self.events[i] is not None:
                self.events[i].synchronize()  # its last upload has left it
            buf = self.bufs[i]
            if buf is None or buf.numel() < nbytes:
                buf = self.bufs[i] = torch.empty(max(nbytes, b.cap * b.total), dtype=torch.uint8, pin_memory=True)
            host = buf.numpy()
            for j, job in enumerate(jobs):  # a part's slot: its values, A's scales, B's scales, the four scale_2
                regions = (job.values,), job.a_scales, (job.b_stored,), (np.array(job.s2, dtype=np.float32),)
                for k, group in enumerate(regions):
                    pos = j * b.total + b.offs[k]
                    for a in group:
                        stage(a, host[pos : pos + a.nbytes])  # a file's bytes read straight into the pinned buffer
                        pos += a.nbytes
        finally:
            for job in jobs:
                job.release()
        with torch.cuda.stream(self.stream):
            b.slots.view(-1)[:nbytes].copy_(buf[:nbytes], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
            self.events[i] = ev
            self._compare(b, n, keys)

    def _compare(self, b: _Batches, n: int, keys: list[Any]) -> None:
        """The batch's ``n`` parts, uploaded, compared (the caller holds the lane's stream): once the
        kernel is loaded, by a CUDA graph of every device step of a full batch (captured after one
        eager batch of the shape; a part-filled batch replays it too, and the rows past ``n`` are left
        unread), else eagerly. Each eager step is a call that gives up the GIL and takes it back."""
        ready = self.kernels_ready is None or self.kernels_ready.is_set()
        if ready and self.GRAPHS and b.graph is None and b.eager_ready_runs and not b.graph_failed:
            b.graph, b.graph_out = self._capture(b)
            b.graph_failed = b.graph is None
        if ready and b.graph is not None:
            b.graph.replay()
            stats = b.graph_out[:n].clone()
            self.counts["graph"] += 1
        else:
            stats = self._stats(b, n, ready)
            b.eager_ready_runs += ready
            self.counts["eager" if ready else "reference"] += 1
        self.pending.append((keys, stats))
        self.unread += n

    def _capture(self, b: _Batches) -> tuple[Any, Any]:
        """(graph, its statistics [cap, 4]) of :meth:`_stats` over a full batch, captured on the lane's
        stream; (None, None) where capturing fails (the batches then run eagerly)."""
        import torch

        try:
            g = torch.cuda.CUDAGraph()
            g.capture_begin(capture_error_mode="thread_local")
            try:
                out = self._stats(b, b.cap, True)
            finally:
                g.capture_end()
            return g, out
        except Exception:  # noqa: BLE001 (eager batches are as exact, only slower to launch)
            return None, None

    def _stats(self, b: _Batches, n: int, ready: bool) -> torch.Tensor:
        """The device steps of a batch: inputs finished from the slots, one compare, statistics [n, 4]."""
        import torch

        rows, cols = b.rows, b.cols
        k16 = cols // NVFP4_BLOCK
        slots = b.slots[:n]

        def region(k: int) -> torch.Tensor:
            return slots[:, b.offs[k] : b.offs[k] + b.sizes[k]]

        vals = region(0).reshape(n, rows, cols // 2).contiguous()  # one copy for both sides
        a_t = region(1).reshape(n, rows, k16)
        if b.perm is not None:
            a_t = a_t.index_select(1, b.perm)
        b_t = region(2)
        b_t = b_t.reshape(n, *b.b_shape) if b.nat is None else b_t.index_select(1, b.nat).reshape(n, rows, k16)
        s2 = region(3).view(torch.float32)  # [n, 4]
        if b.first is None:
            a2, b2 = s2[:, 0:1].expand(n, rows), s2[:, 2:3].expand(n, rows)
        else:
            a2, b2 = torch.where(b.first, s2[:, 0:1], s2[:, 1:2]), torch.where(b.first, s2[:, 2:3], s2[:, 3:4])
        if ready:
            from .kernels.compare import compare_nvfp4

            return compare_stats(compare_nvfp4(vals, a_t, a2, vals, b_t, b2, b_swizzled=b.swz, check=False))
        # Triton is still loading the kernel (a second or two of a first call): its torch reference, on
        # the GPU, gives the same statistics.
        from .kernels.reference import compare_nvfp4_ref

        return compare_stats(compare_nvfp4_ref(vals, a_t, a2.contiguous(), vals, b_t, b2.contiguous(), b_swizzled=b.swz))

    def _read_back(self) -> None:
        import torch

        pending, self.pending, self.unread = self.pending, [], 0
        if pending:
            with torch.cuda.stream(self.stream):
                got = torch.cat([st for _, st in pending]).cpu()  # waits for this stream's work only
            keys = [k for ks, _ in pending for k in ks]
            for key, row in zip(keys, got.tolist()):
                self.on_stats(key, row)



class ReferenceLane:
    """The CPU's stand-in for :class:`GpuLane`: the kernel's torch reference, run at once."""

    def __init__(self, on_stats: OnStats, kernels_ready: threading.Event | None = None):
        self.on_stats = on_stats
        self.counts = {"cpu": 0}  # parts compared

    def launch(self, key, job: DecodeJob) -> None:
        import torch

        self.counts["cpu"] += 1
        from .kernels.reference import compare_nvfp4_ref

        try:
            a, a2, b, b2 = (torch.from_numpy(np.array(x)) for x in job.host_inputs())
            vals = torch.from_numpy(np.array(job.values)).reshape(job.rows, job.cols // 2)
        finally:
            job.release()
        res = compare_nvfp4_ref(vals, a, a2, vals, b, b2, b_swizzled=job.layout.kernel_reads_in_place)
        self.on_stats(key, compare_stats(res)[0])

    def flush(self) -> None:
        pass

    def discard(self) -> None:
        pass


class HostLane(ReferenceLane):
    """:class:`ReferenceLane` for the decode process's jobs, whose inputs may be file regions: they
    are read first (the process's CPU mode, for tests without a GPU)."""

    def launch(self, key, job: DecodeJob) -> None:
        def arr(x: np.ndarray | FileBytes) -> np.ndarray:
            return x.read() if isinstance(x, FileBytes) else x

        job.values, job.b_stored = arr(job.values), arr(job.b_stored)
        job.a_scales = tuple(arr(a) for a in job.a_scales)
        super().launch(key, job)


def expert_shapes(spec: OutputSpec) -> list[tuple[int, int]]:
    """(rows, cols) of every expert part a conversion's decode compares."""
    shapes = {s for l in spec.layers.values() for s in ((2 * l.dims.inter, l.dims.hidden), (l.dims.hidden, l.dims.inter))}
    if spec.target.per_expert:
        shapes |= {(l.dims.inter, l.dims.hidden) for l in spec.layers.values()}
    return sorted(shapes)


def warm_kernels(layout: ScaleLayout, shapes: list[tuple[int, int]], ready: threading.Event) -> None:
    """Import Triton and the compare kernel, launch it once on zeros of every expert shape (block
    scales in ``layout``), and set ``ready``. Until then the lanes run the kernel's torch reference on
    the GPU (see :meth:`GpuLane._compare`). Loading a compiled kernel takes most of a second the first
    time, and Triton does not serialise it: every lane whose first launch came before it was loaded
    would load it again. Only a warm-up: a failure here is left to the real launches to report."""
    try:
        import torch

        from .kernels.compare import compare_nvfp4

        dev = torch.device("cuda", torch.cuda.current_device())
        swz = layout.kernel_reads_in_place
        for rows, cols in shapes:
            vals = torch.zeros((rows, cols // 2), dtype=torch.uint8, device=dev)
            a_s = torch.zeros((rows, cols // NVFP4_BLOCK), dtype=torch.uint8, device=dev)
            b_s = torch.zeros(layout.expert_shape(rows, cols), dtype=torch.uint8, device=dev) if swz else a_s
            s2 = torch.ones(rows, dtype=torch.float32, device=dev)
            compare_nvfp4(vals, a_s, s2, vals, b_s, s2, b_swizzled=swz, check=False)
        torch.cuda.synchronize(dev)
    except Exception:  # noqa: BLE001
        pass
    finally:
        ready.set()
