"""The GPU decode's own process (``python -m nvfp4_fuse.decode_worker cuda|cpu``): see
:mod:`~nvfp4_fuse.decode_process` for why, and for the other end.

It starts CUDA through the driver (:mod:`~nvfp4_fuse.cuda_driver`: no torch) and says so (``("hello",
ok, why_not)``), then reads messages from stdin: ``("warm", layout, shapes)`` loads the compare kernel
for those expert shapes: from :mod:`~nvfp4_fuse.kernel_cache` where an earlier run kept it (the
driver lanes of :mod:`~nvfp4_fuse.driver_lane` decode those), else on a thread of its own through torch
and Triton (until Triton has it loaded, torch's lanes run the kernel's torch reference on the GPU; then
it is kept for the next run). A second ``("hello", False, why)`` says torch could not start for the
shapes that needed it: their parts are dropped. ``("shape", id, shape)``
names an expert shape once; ``("job", channel, key, shape id, scale_2, regions)`` is one expert part,
whose bytes the lane that takes it reads from the files with ``pread``; ``("flush", token)`` runs every
part-filled batch, sends every statistic back and answers ``("flushed", token, counts, loaded)`` (the
batches compared so far by the torch reference, eagerly by the kernel, by CUDA graph replays and by the
driver lanes; whether the kernel is loaded), and closes the
files it had open: a file the parent deletes next is not held. It answers ``("stats", [(channel, key,
row), ...])`` and, once, ``("error", line)`` for a failure of its own, after which it only drains.
The end of stdin ends it. Ctrl-C in the terminal does not reach it (its own session): the parent
closes its stdin.

``cpu`` runs the kernel's torch reference on the CPU, through the same messages: the protocol's tests
on a machine without a GPU.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import traceback
from typing import Any

LANES = 3  # threads that read, stage and launch the decodes
HARVEST_WAIT = 20.0  # seconds the worker waits at its end for the kernels' binaries to be kept
# Test settings, "NAME=value,...": the lanes' BATCH, FLUSH, STAGE_BYTES, RING, GRAPHS (0/1; torch's
# lanes), LANES (threads), and WARM_DELAY (seconds before the kernel's load through torch starts: its
# lanes run the kernel's torch reference meanwhile).
KNOBS_ENV = "NVFP4_FUSE_DECODE_KNOBS"


def knobs() -> dict[str, float]:
    out = {}
    for item in filter(None, os.environ.get(KNOBS_ENV, "").split(",")):
        name, _, value = item.partition("=")
        out[name.strip()] = float(value)
    return out


class Files:
    """The files the lanes read, each opened once (and checked to be the one the parent mapped: same
    inode) until :meth:`close_all`."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: str, ino: int) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                if os.fstat(fd).st_ino != ino:
                    os.close(fd)
                    raise OSError(f"{path}: the file was replaced while being checked")
                self._fds[path] = fd
            return fd

    def close_all(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class RoutedLane:
    """A lane thread's two ways to decode on the GPU: the driver lane for the shapes whose compiled
    kernel was cached (``kernels``), and torch's :class:`~nvfp4_fuse.decode_lanes.GpuLane` for the
    others, made on first use once torch is up (``start_torch()``, which imports it once; when it cannot
    start, the part is dropped, as the parent was told)."""

    def __init__(self, on_stats: Any, drv: Any, kernels: dict, ready: threading.Event, start_torch: Any):
        self.on_stats, self.drv, self.kernels, self.ready = on_stats, drv, kernels, ready
        self.start_torch = start_torch
        self.driver: Any = None
        self.gpu: Any = None

    @property
    def counts(self) -> dict[str, int]:
        return {**(self.gpu.counts if self.gpu else {}), **(self.driver.counts if self.driver else {})}

    @counts.setter
    def counts(self, value: dict[str, int]) -> None:
        for lane in (self.gpu, self.driver):
            if lane is not None:
                lane.counts = {k: value.get(k, 0) for k in lane.counts}

    def launch(self, key: Any, job: Any) -> None:
        from .driver_lane import DriverLane, shape_key

        if shape_key(job.rows, job.cols, job.layout) in self.kernels:
            if self.driver is None:
                self.driver = DriverLane(self.on_stats, self.drv, self.kernels)
            self.driver.launch(key, job)
            return
        if self.gpu is None:
            if not self.start_torch():
                job.release()
                return
            from .decode_lanes import GpuLane

            self.gpu = GpuLane(self.on_stats, self.ready)
        self.gpu.launch(key, job)

    def flush(self) -> None:
        for lane in (self.driver, self.gpu):
            if lane is not None:
                lane.flush()

    def discard(self) -> None:
        for lane in (self.driver, self.gpu):
            if lane is not None:
                lane.discard()


def main(device: str) -> int:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed by a library goes to stderr, not into the replies
    inp = sys.stdin.buffer

    from .decode_process import recv_msg, send_msg

    wlock = threading.Lock()

    def send(obj: Any) -> None:
        with wlock:
            send_msg(out, obj)

    # cuda: the driver first (a fraction of a second); torch only for shapes whose compiled kernel is not
    # cached yet (driver_lane.py), or for everything where the driver cannot start (no libcuda: a ROCm
    # build of torch). cpu: the torch reference, the protocol's tests without a GPU.
    torch_up = threading.Event()  # torch imported and CUDA started (or found impossible: torch_why)
    torch_why: list[str] = []
    torch_lock = threading.Lock()
    said_hello = threading.Event()

    def start_torch() -> bool:
        with torch_lock:
            if not torch_up.is_set():
                try:
                    import torch

                    if not torch.cuda.is_available():
                        torch_why.append("torch sees no CUDA device")
                    else:
                        torch.cuda.init()
                        torch.empty(1, device="cuda")
                except Exception as e:  # noqa: BLE001
                    torch_why.append(f"torch could not start: {e}")
                if torch_why and said_hello.is_set():  # a hello that says no: the parent drops what it sent
                    send(("hello", False, torch_why[0]))
                torch_up.set()
        return not torch_why

    drv = None
    ok, why = True, None
    if device == "cuda":
        try:
            from .cuda_driver import CudaDriver

            drv = CudaDriver()
        except Exception as e:  # noqa: BLE001
            if not start_torch():
                ok, why = False, f"{e}; {torch_why[0]}"
    else:
        try:
            import torch  # noqa: F401
        except Exception as e:  # noqa: BLE001
            ok, why = False, f"torch could not start: {e}"
    send(("hello", ok, why))
    said_hello.set()
    if not ok:  # answer flushes until the parent is done
        while (msg := recv_msg(inp)) is not None:
            if msg[0] == "flush":
                send(("flushed", msg[1], {}, False))
        return 0

    from .decode_lanes import GpuLane, HostLane, make_job, warm_kernels
    from .driver_lane import DriverLane, harvest, load_kernels

    settings = knobs()
    for name in ("BATCH", "FLUSH", "STAGE_BYTES", "RING", "GRAPHS"):
        if name in settings:
            setattr(GpuLane, name, type(getattr(GpuLane, name))(settings[name]))
            if hasattr(DriverLane, name):
                setattr(DriverLane, name, type(getattr(DriverLane, name))(settings[name]))
    delay = settings.get("WARM_DELAY", 0.0)
    kernels: dict = {}  # shape key -> (function, cache entry): the shapes the driver lanes decode

    def warm(layout: Any, shapes: list) -> None:
        if not start_torch():
            return
        if delay:
            import time

            time.sleep(delay)
        warm_kernels(layout, shapes, ready)
        if drv is not None:
            harvest(drv, layout, shapes)  # a later run decodes these shapes without torch

    files = Files()
    shapes: dict[int, dict] = {}
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    ready = threading.Event()
    failed = threading.Event()
    n_lanes = int(settings.get("LANES", LANES))
    barrier = threading.Barrier(n_lanes)
    counts: dict[str, int] = {}  # batches compared each way, over every lane (GpuLane.counts)
    counts_lock = threading.Lock()

    def fail(exc: BaseException) -> None:
        if not failed.is_set():
            failed.set()
            line = f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) or exc.filename is None else f"{exc.filename}: {exc.strerror}"
            send(("error", f"the GPU decode failed: {line}"))
            traceback.print_exc(file=sys.stderr)

    def lane_main() -> None:
        stats: list = []

        def on_stats(key: Any, row: Any) -> None:
            stats.append((key[0], key[1], row.tolist() if hasattr(row, "tolist") else list(row)))

        def ship() -> None:
            if stats:
                got, stats[:] = list(stats), []
                send(("stats", got))

        lane = RoutedLane(on_stats, drv, kernels, ready, start_torch) if device == "cuda" else HostLane(on_stats)
        while True:
            item = jobs.get()
            if item is None or item[0] == "flush":
                try:
                    if not failed.is_set():
                        lane.flush()
                        ship()
                except BaseException as e:  # noqa: BLE001
                    fail(e)
                    lane.discard()
                with counts_lock:
                    for k, n in lane.counts.items():
                        counts[k] = counts.get(k, 0) + n
                    lane.counts = dict.fromkeys(lane.counts, 0)
                if item is None:
                    return
                if barrier.wait() == 0:
                    files.close_all()
                    send(("flushed", item[1], dict(counts), ready.is_set() or bool(kernels)))
                barrier.wait()
                continue
            if failed.is_set():
                continue
            try:
                _, chan, key, sid, s2, regions = item
                job = make_job(shapes[sid], s2, regions, files)
                lane.launch((chan, key), job)
                ship()
            except BaseException as e:  # noqa: BLE001
                fail(e)
                lane.discard()

    warming: list[threading.Thread] = []
    lanes = [threading.Thread(target=lane_main, name=f"nvfp4-decode-lane_{i}", daemon=True) for i in range(n_lanes)]
    for t in lanes:
        t.start()
    while (msg := recv_msg(inp)) is not None:
        kind = msg[0]
        if kind == "job":
            jobs.put(msg)
        elif kind == "shape":
            shapes[msg[1]] = msg[2]
        elif kind == "flush":
            for _ in range(n_lanes):
                jobs.put(msg)
        elif kind == "warm" and device == "cuda":
            layout, wanted = msg[1], msg[2]
            found, missing = load_kernels(drv, layout, wanted) if drv is not None else ({}, list(wanted))
            kernels.update(found)
            if missing:  # compiled (and cached) the usual way, through torch and Triton
                warming.append(threading.Thread(target=warm, args=(layout, missing), daemon=True))
                warming[-1].start()
    for _ in range(n_lanes):
        jobs.put(None)
    for t in lanes:
        t.join()
    for t in warming:  # the kernels' binaries kept for the next run (a second or so after the kernel loaded)
        t.join(HARVEST_WAIT)
    files.close_all()
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
