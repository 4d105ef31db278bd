"""The GPU decode's own process (``python -m nvfp4_fuse.decode_worker cuda|cpu``): see
:mod:`~nvfp4_fuse.decode_process` for why, and for the other end.

It imports torch, starts CUDA and says so (``("hello", ok, why_not)``), then reads messages from stdin:
``("warm", layout, shapes)`` loads the compare kernel for those expert shapes on a thread of its own
(until it is loaded the lanes run the kernel's torch reference on the GPU); ``("shape", id, shape)``
names an expert shape once; ``("job", channel, key, shape id, scale_2, regions)`` is one expert part,
whose bytes the lane that takes it reads from the files with ``pread``; ``("flush", token)`` runs every
part-filled batch, sends every statistic back and answers ``("flushed", token, counts, loaded)`` (the
batches compared so far by the torch reference, eagerly by the kernel and by CUDA graph replays; whether
the kernel is loaded), and closes the
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
# Test settings, "NAME=value,...": GpuLane's BATCH, FLUSH, STAGE_BYTES, RING, GRAPHS (0/1), and
# WARM_DELAY (seconds before the kernel's load starts: the lanes run its torch reference meanwhile).
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

    ok, why = True, None
    try:
        import torch

        if device == "cuda":
            if not torch.cuda.is_available():
                ok, why = False, "torch sees no CUDA device"
            else:
                torch.cuda.init()
                torch.empty(1, device="cuda")
    except Exception as e:  # noqa: BLE001
        ok, why = False, f"torch could not start: {e}"
    send(("hello", ok, why))
    if not ok:  # answer flushes until the parent is done
        while (msg := recv_msg(inp)) is not None:
            if msg[0] == "flush":
                send(("flushed", msg[1], {}, False))
        return 0

    from .decode_lanes import GpuLane, HostLane, make_job, warm_kernels

    settings = knobs()
    for name in ("BATCH", "FLUSH", "STAGE_BYTES", "RING", "GRAPHS"):
        if name in settings:
            setattr(GpuLane, name, type(getattr(GpuLane, name))(settings[name]))
    delay = settings.get("WARM_DELAY", 0.0)

    def warm(layout: Any, shapes: list) -> None:
        if delay:
            import time

            time.sleep(delay)
        warm_kernels(layout, shapes, ready)

    files = Files()
    shapes: dict[int, dict] = {}
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    ready = threading.Event()
    failed = threading.Event()
    barrier = threading.Barrier(LANES)
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

        lane = GpuLane(on_stats, ready) if device == "cuda" else HostLane(on_stats)
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
                    send(("flushed", item[1], dict(counts), ready.is_set()))
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

    lanes = [threading.Thread(target=lane_main, name=f"nvfp4-decode-lane_{i}", daemon=True) for i in range(LANES)]
    for t in lanes:
        t.start()
    warmed = False
    while (msg := recv_msg(inp)) is not None:
        kind = msg[0]
        if kind == "job":
            jobs.put(msg)
        elif kind == "shape":
            shapes[msg[1]] = msg[2]
        elif kind == "flush":
            for _ in range(LANES):
                jobs.put(msg)
        elif kind == "warm":
            if device == "cuda" and not warmed:
                warmed = True
                threading.Thread(target=warm, args=(msg[1], msg[2]), daemon=True).start()
    for _ in range(LANES):
        jobs.put(None)
    for t in lanes:
        t.join()
    files.close_all()
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
