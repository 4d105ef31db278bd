#!/usr/bin/env python3
"""Where convert's threads spend their time, in one process: a diagnostic, not a benchmark.

    python scripts/profile_threads.py convert --workdir /dev/shm [--runs 4,4,128,1GB;8,8,512,500MB] [--tree DIR] [--src DIR]

It makes the synthetic checkpoint of bench_convert.py (4.64 GB; ``--src`` reuses one) and converts it
in this process once per run (streams, workers, read-ahead MiB a stream, max shard size), sampling
every thread's stack every 4 ms. It prints each run's rate, each output shard's start and end, and per
kind of thread (main, task pool, shard writers, hashers) where the samples fell: the first frame in
nvfp4_fuse and the innermost one. A thread waiting to get the GIL back shows at the line it is about to
run. In tmpfs no disk sets the pace, so what is left is the converter's.

``--tree DIR`` profiles another checkout's nvfp4_fuse (``git archive C nvfp4_fuse kernels | tar -x
-C DIR``; before ``1cc3f70`` the read-ahead MiB are for all the streams together); the sampling adds
overhead of its own, so compare runs of this script with each other only.

Its ``verify`` mode, which timed the GPU lanes inside the verify process, went once the decode moved
to a process of its own (docs/benchmarks.md, 2026-12-04); the figures there that it made came from
earlier copies of this script (the last is in commit ``118d47aa``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["convert"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--runs", default=None, help="streams,workers,MiB a stream,shard size;...")
    ap.add_argument("--src", type=Path, default=None, help="a checkpoint made earlier by this script (made there if absent, and kept)")
    ap.add_argument("--tree", default=None, help="profile the nvfp4_fuse of this checkout")
    a = ap.parse_args()
    print(f"nvfp4_fuse from {ROOT}, {os.cpu_count()} cpus", flush=True)
    work = Path(tempfile.mkdtemp(prefix="nvfp4-profile-", dir=a.workdir))
    try:
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
