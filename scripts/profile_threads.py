#!/usr/bin/env python3
"""Where convert's and verify's threads spend their time, in one process: a diagnostic, not a benchmark.

    python scripts/profile_threads.py convert --workdir /dev/shm [--runs 4,4,128,1GB;8,8,512,500MB] [--tree DIR]
    python scripts/profile_threads.py verify --workdir /tmp [--runs cuda:4,cuda:8,cpu:8] [--tree DIR]
        [--src DIR] [--timeline] [--preload import|key|kernel] [--switch S]

``convert`` makes the synthetic checkpoint of bench_convert.py (4.64 GB; ``--src`` reuses one) and
converts it in this process once per run (streams, workers, read-ahead MiB a stream, max shard size),
sampling every thread's stack every 4 ms. It prints each run's rate, each output shard's start and end,
and per kind of thread (main, task pool, shard writers, hashers) where the samples fell: the first
frame in nvfp4_fuse and the innermost one. A thread waiting to get the GIL back shows at the line it
is about to run. In tmpfs no disk sets the pace, so what is left is the converter's.

``verify`` makes bench_verify.py's checkpoint (4.08 GB of routed experts), converts it to mega-moe
(500 MB shards), then calls verify() once per run (device:workers) and prints, per function of the
workers and the GPU lanes, the calls, the wall time and the thread CPU time summed over threads: wall
far above CPU is time spent waiting (for the GIL, mostly). Each run also prints when the warm-up
imported Triton and had the kernel loaded, when the first lane started, the spans of verify()'s steps
on the calling thread and how many decodes were put off. With CUDA runs, Triton's kernel cache is
filled first in another process, as a user's earlier run would; the first run is then a first call.
``--timeline`` samples every thread's stack during each run and prints, a quarter second at a time,
where each kind of thread was. ``--preload`` pays part of Triton's one-off before the first run (its
import; its cache key, a hash of its own files; the kernel loaded for the checkpoint's shapes), to see
what that part costs a first call. ``--src DIR`` keeps the checkpoint there for later runs.

``--tree DIR`` profiles another checkout's nvfp4_fuse (``git archive C nvfp4_fuse kernels | tar -x
-C DIR``; before ``1cc3f70`` the read-ahead MiB are for all the streams together); the sampling and the timing wrappers add overhead of their own, so compare runs of this
script with each other only.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if "--tree" in sys.argv:
    ROOT = Path(sys.argv[sys.argv.index("--tree") + 1]).resolve()
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

Samples = defaultdict[str, Counter]


def _kind(name: str) -> str:
    if name == "MainThread":
        return "main"
    return name.rsplit("_", 1)[0] if name.startswith("nvfp4-") else "other"


def _where(frame: Any) -> tuple[str | None, str]:
    """(first frame in nvfp4_fuse, innermost frame), as file:function:line."""
    inner = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}:{frame.f_lineno}"
    f = frame
    while f is not None:
        if "nvfp4_fuse" in f.f_code.co_filename:
            return f"{Path(f.f_code.co_filename).name}:{f.f_code.co_name}:{f.f_lineno}", inner
        f = f.f_back
    return None, inner


def sample_stacks(stop: threading.Event, counts: Samples, interval: float = 0.004, timeline: list | None = None) -> None:
    """Every ``interval``, where each other thread is; with ``timeline``, also (time, kind, where) a sample."""
    me = threading.get_ident()
    while not stop.is_set():
        names = {t.ident: t.name for t in threading.enumerate()}
        now = time.perf_counter()
        for tid, frame in sys._current_frames().items():
            if tid != me:
                kind, where = _kind(names.get(tid, "?")), _where(frame)
                counts[kind][where] += 1
                if timeline is not None:
                    timeline.append((now, kind, where))
        time.sleep(interval)


def print_timeline(timeline: list, t0: float, window: float = 0.25, top: int = 2) -> None:
    """Per ``window`` seconds of the run and kind of thread: the samples and the most frequent places."""
    slots: dict[int, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for t, kind, (ours, inner) in timeline:
        slots[int((t - t0) / window)][kind][f"{ours or '-'} <- {inner}"] += 1
    for i in sorted(slots):
        print(f"   {i * window:5.2f} s")
        for kind, c in sorted(slots[i].items()):
            total = sum(c.values())
            print(f"      [{kind}] {total}: " + "; ".join(f"{100 * n // total}% {w}" for w, n in c.most_common(top)))


def print_samples(counts: Samples, top: int, floor: float = 1.0) -> None:
    for kind, c in sorted(counts.items()):
        total = sum(c.values())
        print(f"  [{kind}] {total} samples")
        for (ours, inner), n in c.most_common(top):
            if 100 * n / total >= floor:
                print(f"     {100 * n / total:5.1f}%  {ours}  <- {inner}")


def profile_convert(src: Path, out: Path, streams: int, workers: int, share: int, shard_size: str) -> None:
    import nvfp4_fuse.convert as conv
    from nvfp4_fuse.spec import parse_size

    conv.INFLIGHT_BYTES = share
    opts = conv.ConvertOptions(target="mega-moe", max_shard_size=parse_size(shard_size), workers=workers, shard_streams=streams)
    plan = conv.make_plan(src, opts)
    spans: list[tuple[str, float, float]] = []
    real = conv._write_shard

    def timed(shared: Any, folder: Path, shard: Any, meta: Any) -> Any:
        t = time.perf_counter()
        try:
            return real(shared, folder, shard, meta)
        finally:
            spans.append((shard.name, t, time.perf_counter()))

    conv._write_shard = timed
    counts: Samples = defaultdict(Counter)
    stop = threading.Event()
    th = threading.Thread(target=sample_stacks, args=(stop, counts), daemon=True)
    r0, t0 = os.times(), time.perf_counter()
    th.start()
    try:
        conv.convert(src, out, opts, spec=plan)
    finally:
        wall = time.perf_counter() - t0
        stop.set()
        th.join()
        conv._write_shard = real
    r1 = os.times()
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    print(
        f"\n== convert: {streams} streams, {workers} workers, {share >> 20} MiB a stream, shards of {shard_size}: "
        f"{wall:.2f} s, {size / wall / 1e9:.2f} GB/s, CPU {r1.user - r0.user:.2f} user + {r1.system - r0.system:.2f} sys"
    )
    for name, a, b in sorted(spans, key=lambda s: s[1]):
        print(f"   {name}: {a - t0:.2f} -> {b - t0:.2f} s")
    print_samples(counts, top=8)
    shutil.rmtree(out)


def _wrap(owner: Any, name: str, record: Callable[[str, float, float, float], None]) -> None:
    """Replace ``owner.name`` by a wrapper that calls ``record(name, start, wall, thread CPU)`` after each call."""
    fn: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kw: Any) -> Any:
        t, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kw)
        finally:
            record(name, t, time.perf_counter() - t, time.thread_time() - c)

    setattr(owner, name, wrapper)


def _timed(acc: dict[str, list[float]], lock: threading.Lock, owner: Any, name: str) -> None:
    """Sum each call's wall and thread CPU time, and count the calls, under ``acc[name]``."""

    def add(name: str, start: float, wall: float, cpu: float) -> None:
        with lock:
            r = acc.setdefault(name, [0.0, 0.0, 0])
            r[0] += wall
            r[1] += cpu
            r[2] += 1

    _wrap(owner, name, add)


def _spanned(spans: list, owner: Any, name: str) -> None:
    """Record (name, start, end) of each call made on the main thread."""

    def span(name: str, start: float, wall: float, cpu: float) -> None:
        if threading.current_thread() is threading.main_thread():
            spans.append((name, start, start + wall))

    _wrap(owner, name, span)


def profile_verify(work: Path, runs: list[tuple[str, int]], timeline: bool = False, preload: str = "", switch: float = 0.0) -> None:
    """``work`` keeps the checkpoints (made there if absent); ``preload`` (import, key, kernel) pays that much of
    Triton's one-off before the first run, to see what it costs the run; ``switch`` sets the GIL's
    switch interval."""
    from source_tree import use_source_tree

    use_source_tree()
    import nvfp4_fuse.convert  # noqa: F401  (the tree's modules first: bench_verify reuses them)
    import nvfp4_fuse.manifest  # noqa: F401
    import nvfp4_fuse.sample  # noqa: F401
    from nvfp4_fuse import decode_lanes, piece_checks
    from nvfp4_fuse import verify as ver

    ensure_checkpoint = importlib.import_module("bench_verify").ensure_checkpoint

    acc: dict[str, list[float]] = {}
    lock = threading.Lock()
    for name in ("_values_equal", "_scales", "_natural_scales", "_launch"):
        _timed(acc, lock, piece_checks.PieceChecker, name)
    for name in ("_run", "launch", "_read_back"):
        _timed(acc, lock, decode_lanes.GpuLane, name)
    src, out = ensure_checkpoint(work)
    if any(d == "cuda" for d, _ in runs):  # fill Triton's kernel cache in another process, as a user's earlier run would
        import subprocess

        code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from nvfp4_fuse.verify import verify; verify({str(src)!r}, {str(out)!r}, device='cuda', sample=1)"
        subprocess.run([sys.executable, "-c", code], check=True)
        import torch

        torch.cuda.init()  # as bench_verify does: a fixed cost kept out of the first call
    if preload:
        import triton

        if preload in ("key", "kernel"):
            triton.runtime.cache.triton_key()  # Triton's cache key: a hash of its own files (libtriton: 500 MB)
        if preload == "kernel":  # the compare kernel loaded for this checkpoint's shapes, as the warm-up does
            from concurrent.futures import Future

            from nvfp4_fuse.manifest import load_manifest
            from nvfp4_fuse.source import scan_source
            from nvfp4_fuse.spec import OutputOptions, build_spec

            plan: Future = Future()
            plan.set_result(build_spec(scan_source(src), OutputOptions.from_json(load_manifest(out).options, file=str(out))))
            ver.warm_kernels(plan, threading.Event())
    if switch:
        sys.setswitchinterval(switch)
    warm = ver.warm_kernels
    marks: dict[str, float] = {}

    def timed_warm(plan: Any, ready: threading.Event) -> None:
        marks["warm-up start"] = time.perf_counter()
        try:
            import triton  # noqa: F401  (the warm-up's first step: how long Triton's import takes)

            marks["triton imported"] = time.perf_counter()
            warm(plan, ready)
        finally:
            marks["kernels ready"] = time.perf_counter()

    ver.warm_kernels = timed_warm
    spans: list[tuple[str, float, float]] = []  # verify()'s steps on the calling thread
    verifier = piece_checks.PieceChecker
    for owner, name in ((ver, "load_manifest"), (ver, "scan_source"), (ver, "build_spec"), (ver, "check_structure"),
                        (ver, "PieceChecker"), (ver, "_run_pass"), (verifier, "drain_decodes"), (verifier, "finish_decode")):  # fmt: skip
        _spanned(spans, owner, name)
    lane_init, defer = decode_lanes.GpuLane.__init__, verifier._decode
    put_off = [0]

    def counted_lane(self: Any, *args: Any) -> None:
        lane_init(self, *args)
        marks.setdefault("first lane", time.perf_counter())

    def counted_defer(self: Any, *args: Any) -> None:
        put_off[0] += not self.kernels_ready.is_set()  # queued before the kernel was loaded
        defer(self, *args)

    decode_lanes.GpuLane.__init__, verifier._decode = counted_lane, counted_defer
    for device, workers in runs:
        acc.clear()
        marks.clear()
        counts: Samples = defaultdict(Counter)
        samples: list = []
        stop = threading.Event()
        th = threading.Thread(target=sample_stacks, args=(stop, counts, 0.004, samples), daemon=True)
        if timeline:
            th.start()
        r0, t0 = os.times(), time.perf_counter()
        try:
            res = ver.verify(src, out, device=device, workers=workers)
        finally:
            stop.set()
        r1 = os.times()
        print(f"\n== verify on {device}, {workers} workers: {res.seconds:.2f} s, CPU {r1.user - r0.user:.2f} user + {r1.system - r0.system:.2f} sys")
        print("   " + ", ".join(f"{k} at {v - t0:.2f} s" for k, v in marks.items()))
        print("   " + ", ".join(f"{k} {a - t0:.2f}-{b - t0:.2f}" for k, a, b in spans) + f"; {put_off[0]} decodes put off")
        put_off[0] = 0
        spans.clear()
        if timeline:
            th.join()
            print_timeline(samples, t0)
        for name, (wall, cpu, n) in sorted(acc.items(), key=lambda kv: -kv[1][0]):
            print(f"   {name:16s} {int(n):5d} calls, wall {wall:7.3f} s, thread CPU {cpu:7.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["convert", "verify"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--runs", default=None, help="convert: streams,workers,MiB a stream,shard size;...  verify: device:workers,...")
    ap.add_argument("--src", type=Path, default=None, help="a checkpoint made earlier by this script (made there if absent, and kept)")
    ap.add_argument("--tree", default=None, help="profile the nvfp4_fuse of this checkout")
    ap.add_argument("--timeline", action="store_true", help="verify: also where each kind of thread is, a quarter second at a time")
    ap.add_argument(
        "--preload", choices=["", "import", "key", "kernel"], default="", help="verify: import Triton (hash its key, load the kernel) before the first run"
    )
    ap.add_argument("--switch", type=float, default=0.0, help="verify: sys.setswitchinterval (s)")
    a = ap.parse_args()
    print(f"nvfp4_fuse from {ROOT}, {os.cpu_count()} cpus", flush=True)
    work = Path(tempfile.mkdtemp(prefix="nvfp4-profile-", dir=a.workdir))
    try:
        if a.what == "verify":
            runs = [(d, int(w)) for d, w in (r.split(":") for r in (a.runs or "cuda:4,cuda:8,cpu:8").split(","))]
            keep = a.src is not None
            if keep:
                a.src.mkdir(parents=True, exist_ok=True)
            profile_verify(a.src if keep else work, runs, a.timeline, a.preload, a.switch)
            return
        from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint

        src = a.src or work / "src"
        if not src.exists():
            make_sample_checkpoint(src, SampleSpec("deepseek", 5, 32, 7168, 2560, 4, unequal_scale_2=True, seed=0, fast=True))
        for run in (a.runs or "4,4,64,1GB;8,8,64,500MB").split(";"):
            streams, workers, share, size = run.split(",")
            profile_convert(src, work / "out", int(streams), int(workers), int(share) << 20, size)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
