"""The GPU decode in a process of its own: what verify's pass hands it, and what comes back.

verify's pass is Python threads that hash and compare mapped bytes; the GPU decode beside them used to
run on threads of the same process, and every torch call of theirs gave up the GIL and waited to take
it back behind the check workers: the pass ran 10-20% slower with the decode than without. And torch
takes 3.3-3.7 s to import on the H200 host (Triton's cache key another second, hashed in 1 MiB chunks
behind the same GIL), which a process that imports it before its pass pays in full. Here the parent
never imports torch or Triton: it starts ``python -m nvfp4_fuse.decode_worker`` (which starts CUDA
through the driver alone and launches the compare kernel's binary kept by an earlier run, or the first
time imports torch and Triton and compiles it, on its own cores while the pass runs) and sends it, for each expert
part, where its bytes lie: (file, inode, offset, length) of the packed values and both sides' block
scales, which the worker reads itself with ``pread`` (from the page cache: the pass has just read them),
plus the four scale_2. A part's message is about 300 bytes; the pass's thread sends it and goes on.

:class:`DecodeProcess` is the parent's end: one worker, used by any number of
:class:`DecodeChannel` (one per :class:`~nvfp4_fuse.piece_checks.PieceChecker`), each with its own
statistics callback and its own :meth:`DecodeChannel.finish`. A part's values stay in the page cache
until the worker has read them only if the worker is not too far behind: at most :func:`backlog_bytes`
of values wait, past that the pass waits. :func:`shared` keeps one worker for the process (a second
``verify()`` reuses it, already warm); it ends when this process does (its stdin closes).

The worker's own failures (no CUDA, a CUDA error, a file it cannot read) come back as one line and end
the pass; a worker that dies says how, with the end of its stderr.
"""

from __future__ import annotations

import atexit
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from . import mapped_faults
from .decode_lanes import DecodeJob
from .errors import DecodeFailed as DecodeError

_LEN = struct.Struct("<Q")
READY_TIMEOUT = 300.0  # seconds for the worker to import torch and start CUDA before it is given up on


def backlog_bytes() -> int:
    """Packed values sent to the worker and not yet decoded, at most: a quarter of the memory available
    now, between 1 and 16 GiB. They sit in the page cache (the pass has just read them); a worker
    further behind could find them evicted and read them from disk again. While the worker starts
    (torch's import, 3-4 s on the H200 host) the pass runs on and fills this."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        return 4 << 30
    return max(1 << 30, min(16 << 30, avail // 4))


def send_msg(f: Any, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_LEN.pack(len(data)) + data)
    f.flush()


def recv_msg(f: Any) -> Any:
    """The next message from ``f``; None at the end of the stream."""
    head = f.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    (n,) = _LEN.unpack(head)
    data = f.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def region(arr: np.ndarray) -> tuple:
    """Where the worker finds ``arr``'s bytes: ``("file", path, inode, offset, nbytes)`` when it is a
    contiguous view of a mapped checkpoint file (:mod:`mapped_faults` knows every mapping), else
    ``("bytes", data)`` (a block scale decoded from a compressed one, gate and up joined)."""
    if arr.flags.c_contiguous and arr.nbytes:
        found = mapped_faults.locate(arr.ctypes.data, arr.nbytes)
        if found is not None:
            m, off = found
            return ("file", str(m.path), m.ino, off, arr.nbytes)
    return ("bytes", np.ascontiguousarray(arr).tobytes())


class DecodeProcess:
    """The worker process and the parent's end of it: ``device`` is "cuda" (the compare kernel) or
    "cpu" (its torch reference: the same protocol, for tests on a machine without a GPU)."""

    def __init__(self, device: str = "cuda"):
        self.device = device
        self._err = tempfile.TemporaryFile()
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nvfp4_fuse.decode_worker", device],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env,
            start_new_session=True,  # Ctrl-C reaches this process alone; the worker ends when its stdin does
        )
        self._wlock = threading.Lock()
        self._cond = threading.Condition()
        self._channels: dict[int, DecodeChannel] = {}
        self._next_chan = 0
        self._shapes: dict[Any, int] = {}
        self._warmed: set = set()
        self._flushes: dict[int, bool] = {}
        self._next_flush = 0
        self.ready: bool | None = None  # None until the worker's hello: True when it can decode
        self.why_not: str | None = None  # why not (no CUDA, torch missing...)
        self.strict = False  # a worker that cannot decode is an error (else its parts are dropped)
        self.failure: str | None = None  # the worker's own failure, once it has failed or died
        self.backlog = backlog_bytes()
        self.batches: dict[str, int] = {}  # the worker's batches so far, by how they were compared (at the last flush)
        self.kernel_loaded = False  # whether the worker had the compare kernel loaded at the last flush
        self._reader = threading.Thread(target=self._read, name="nvfp4-decode-reader", daemon=True)
        self._reader.start()

    # -- the wire ----------------------------------------------------------------------------------
    def _send(self, obj: Any) -> None:
        with self._wlock:
            if self.failure is not None:
                raise DecodeError(self.failure)
            try:
                send_msg(self.proc.stdin, obj)
            except (BrokenPipeError, OSError, ValueError):
                raise DecodeError(self._died()) from None

    def _died(self) -> str:
        code = self.proc.wait()
        tail = []
        if not self._err.closed:
            self._err.seek(0)
            tail = self._err.read().decode(errors="replace").strip().splitlines()[-8:]
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        return f"the GPU decode process {how}" + (": " + " | ".join(tail) if tail else "")

    def _read(self) -> None:
        while True:
            try:
                msg = recv_msg(self.proc.stdout)
            except Exception as e:  # noqa: BLE001 (a garbled stream: the worker is gone)
                msg, why = None, str(e)
            else:
                why = None
            if msg is None:
                text = self._died() if why is None else f"the GPU decode process's reply could not be read: {why}"
                with self._cond:
                    if self.failure is None and not self._closing:
                        self.failure = text
                    if self.ready is None:
                        self.ready, self.why_not = False, self.why_not or text
                    self._cond.notify_all()
                for ch in list(self._channels.values()):
                    ch._wake(self.failure)
                return
            kind = msg[0]
            if kind == "stats":
                for chan, key, row in msg[1]:
                    ch = self._channels.get(chan)
                    if ch is not None:
                        ch._stats(key, row)
            elif kind == "hello":
                with self._cond:
                    self.ready, self.why_not = msg[1], msg[2]
                    self._cond.notify_all()
                if not msg[1]:
                    for ch in list(self._channels.values()):
                        ch._wake(None)
            elif kind == "flushed":
                with self._cond:
                    self._flushes[msg[1]] = True
                    self.batches, self.kernel_loaded = msg[2], msg[3]
                    self._cond.notify_all()
            elif kind == "error":
                with self._cond:
                    self.failure = self.failure or msg[1]
                    self._cond.notify_all()
                for ch in list(self._channels.values()):
                    ch._wake(self.failure)

    _closing = False

    # -- what the checks use -----------------------------------------------------------------------
    def wait_ready(self, timeout: float = READY_TIMEOUT) -> bool:
        """Wait for the worker's hello: True when it can decode (else :attr:`why_not` says why)."""
        with self._cond:
            self._cond.wait_for(lambda: self.ready is not None, timeout)
            if self.ready is None:
                self.ready, self.why_not = False, f"the GPU decode process did not start within {timeout:g} s"
            return bool(self.ready)

    def warm(self, layout: Any, shapes: list[tuple[int, int]]) -> None:
        """Have the worker load the kernel for these expert shapes now (it decodes with the kernel's
        torch reference on the GPU until it has)."""
        new = sorted({(layout.__class__.__name__, *s) for s in shapes} - self._warmed)
        if new:
            self._warmed.update(new)
            self._send(("warm", layout, sorted(shapes)))

    def channel(self, on_stats: Callable[[Any, Any], None], on_error: Callable[[], None] | None = None) -> DecodeChannel:
        with self._cond:
            chan = self._next_chan
            self._next_chan += 1
            ch = self._channels[chan] = DecodeChannel(self, chan, on_stats, on_error)
            return ch

    def _shape_id(self, job: DecodeJob) -> int:
        """The id of ``job``'s shape at the worker (sent once: layout, row order and first rows)."""
        key = (job.rows, job.cols, job.layout.__class__.__name__, job.b_shape, len(job.a_scales),
               None if job.row_perm is None else job.row_perm.tobytes())  # fmt: skip
        with self._wlock:  # the shape's message goes out before any job that names it
            sid = self._shapes.get(key)
            if sid is None:
                sid = self._shapes[key] = len(self._shapes)
                shape = dict(rows=job.rows, cols=job.cols, layout=job.layout, row_perm=job.row_perm, first_rows=job.first_rows)
                try:
                    send_msg(self.proc.stdin, ("shape", sid, shape))
                except (BrokenPipeError, OSError, ValueError):
                    raise DecodeError(self._died()) from None
        return sid

    def flush(self) -> None:
        """Every part sent so far decoded and its statistics back (the worker's part-filled batches run)."""
        with self._cond:
            token = self._next_flush
            self._next_flush += 1
        self._send(("flush", token))
        with self._cond:
            self._cond.wait_for(lambda: self._flushes.pop(token, False) or self.failure is not None or self.ready is False)
        if self.failure is not None:
            raise DecodeError(self.failure)

    def close(self, timeout: float = 10.0) -> None:
        """End the worker: its stdin closed, then a kill if it has not ended within ``timeout``."""
        self._closing = True
        with self._wlock:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout)
        self._err.close()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and self.failure is None


class DecodeChannel:
    """One checker's share of the worker: its parts, their statistics (``on_stats(key, row)``, called
    on the reader thread; an exception there is kept and raised by :meth:`finish`, and ``on_error``
    called), and the bytes of values it has waiting."""

    def __init__(self, proc: DecodeProcess, chan: int, on_stats: Callable[[Any, Any], None], on_error: Callable[[], None] | None):
        self.proc, self.chan = proc, chan
        self.on_stats, self.on_error = on_stats, on_error
        self._cond = threading.Condition()
        self.waiting: dict[Any, int] = {}  # key -> bytes of values, sent and not back
        self.waiting_bytes = 0
        self.error: BaseException | None = None
        self.sent = 0

    def submit(self, key: Any, job: DecodeJob, stop: threading.Event | None = None) -> bool:
        """Send ``job`` (released here, once its regions are found: the worker reads the files itself)
        under ``key``; first wait while the worker's backlog is full. False when the worker cannot
        decode (its hello said so): the job is dropped."""
        p = self.proc
        try:
            if p.ready is False and p.failure is None:
                if p.strict:
                    raise DecodeError(f"the GPU decode cannot run: {p.why_not}")
                return False
            regions = (region(job.values), tuple(region(a) for a in job.a_scales), region(job.b_stored))
            s2 = tuple(float(x) for x in job.s2)
        finally:
            job.release()
        n = job.values.nbytes
        with self._cond:
            while self.waiting_bytes and self.waiting_bytes + n > p.backlog and self.error is None and p.failure is None:
                if p.ready is False or (stop is not None and stop.is_set()):
                    break
                self._cond.wait(0.5)
            self._raise()
            self.waiting[key] = self.waiting.get(key, 0) + n
            self.waiting_bytes += n
        p._send(("job", self.chan, key, p._shape_id(job), s2, regions))
        self.sent += 1
        return True

    def _stats(self, key: Any, row: Any) -> None:
        with self._cond:
            n = self.waiting.pop(key, 0)
            self.waiting_bytes -= n
            self._cond.notify_all()
        if self.error is not None:
            return
        try:
            self.on_stats(key, row)
        except BaseException as e:  # noqa: BLE001 (raised again by finish)
            with self._cond:
                self.error = self.error or e
                self._cond.notify_all()
            if self.on_error is not None:
                self.on_error()

    def _wake(self, failure: str | None) -> None:
        with self._cond:
            self._cond.notify_all()
        if failure is not None and self.on_error is not None:
            self.on_error()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
        if self.proc.failure is not None:
            raise DecodeError(self.proc.failure)

    def finish(self) -> None:
        """Every part of this channel decoded and judged: raises the first failure (a check's
        :class:`~nvfp4_fuse.errors.CheckFailed`, or the worker's :class:`DecodeError`)."""
        if self.sent and self.error is None:
            self.proc.flush()
        if self.sent and self.proc.ready is False and self.proc.strict:
            raise DecodeError(f"the GPU decode cannot run: {self.proc.why_not}")
        with self._cond:
            if self.error is None and self.proc.failure is None and self.proc.ready is not False and self.waiting:
                raise DecodeError(f"the GPU decode process did not report {len(self.waiting)} expert parts")
            self._raise()

    def close(self) -> None:
        with self.proc._cond:
            self.proc._channels.pop(self.chan, None)


_shared: DecodeProcess | None = None
_shared_lock = threading.Lock()


def shared(device: str = "cuda") -> DecodeProcess:
    """This process's worker for ``device``, started on first use and kept for later calls (a second
    verify finds CUDA started and the kernel loaded); a new one if the last one failed."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.alive or _shared.device != device:
            if _shared is not None:
                _shared.close()
            _shared = DecodeProcess(device)
        return _shared


@atexit.register
def close_shared() -> None:
    """End this process's shared worker, if any (at exit; tests that change its settings)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close(timeout=5.0)
            _shared = None
