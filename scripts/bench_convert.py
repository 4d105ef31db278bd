#!/usr/bin/env python3
"""Convert speed and memory against `cp` and against a naive in-memory conversion, in one run.

Makes a synthetic DeepSeek-shaped NVFP4 checkpoint (real format: packed E2M1 codes, E4M3 block scales,
F32 scalars; experts of each layer spread over several shards), or takes one (--source), then, each
time from a cold page cache for the source (posix_fadvise DONTNEED after an fsync), or with --warm
from a source read into the page cache just before:

  1. `sh -c 'cp -r SRC DST && sync'`, the copy as a reader times it by hand: the baseline
  2. cp -r of the source folder plus an fsync of every copied file, one after the other (what convert
     does for its own files), as a second copy figure; both medians and their ratio are printed
  3. nvfp4-fuse convert, then a sync(2), as `convert SRC OUT && sync` by hand; peak RSS and peak
     anonymous RSS sampled from /proc
  4. a naive conversion: safetensors load_file of every shard, torch.cat/stack per layer, one save_file

The runs of a round go in a rotating order (cp first in one round, convert first in the next), each
after the source is prepared and a sync(2), so no run pays for the previous one's writeback and none
always follows the same one. Each run prints its wall time, the user and system CPU it spent and the
1-minute load average when it started (other work on the machine shows there). The summary gives
medians, convert/cp per round and its median, peak memory and the plan's own peak estimate.

    python scripts/bench_convert.py --workdir /big/disk [--warm] [--layers 5 --experts 32 --hidden 7168 --inter 2560]

The default makes ~4 GB of routed experts at ~31 MB an expert (H=7168, I=2560: DeepSeek-V3's hidden
size, a multiple of 512 so the default mega-moe target accepts it). Needs ~4x the checkpoint in free
disk and, for the naive run, ~2.5x it in RAM (--skip-naive to leave it out).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nvfp4_fuse.shard_writer import fsync_dir  # noqa: E402

NAIVE = r"""
import json, re, sys, torch
from collections import defaultdict
from safetensors.torch import load_file, save_file
src, dst = sys.argv[1], sys.argv[2]
idx = json.load(open(f"{src}/model.safetensors.index.json"))
tensors = {}
for f in sorted(set(idx["weight_map"].values())):
    tensors.update(load_file(f"{src}/{f}"))
pat = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w2|w3)\.(weight|weight_scale|weight_scale_2|input_scale)$")
groups = defaultdict(dict)
out = {}
for name, t in tensors.items():
    m = pat.match(name)
    if m:
        groups[m[1]][(int(m[2]), m[3], m[4])] = t
    else:
        out[name] = t
for prefix, g in groups.items():
    n = 1 + max(e for e, _, _ in g)
    for fld in ("weight", "weight_scale"):
        out[f"{prefix}.w13_{fld}"] = torch.stack([torch.cat([g[(e, "w1", fld)], g[(e, "w3", fld)]]) for e in range(n)])
        out[f"{prefix}.w2_{fld}"] = torch.stack([g[(e, "w2", fld)] for e in range(n)])
    for fld in ("weight_scale_2", "input_scale"):
        out[f"{prefix}.w13_{fld}"] = torch.stack([torch.maximum(g[(e, "w1", fld)], g[(e, "w3", fld)]).reshape(()) for e in range(n)])
        out[f"{prefix}.w2_{fld}"] = torch.stack([g[(e, "w2", fld)].reshape(()) for e in range(n)])
del tensors, groups
save_file(out, f"{dst}/model.safetensors", metadata={"format": "pt"})
"""


def files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def sync_files(folder: Path, *, drop_cache: bool = False) -> None:
    """fsync every file of a folder; with ``drop_cache`` also drop its pages from the page cache."""
    for p in files_of(folder):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            if drop_cache:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def evict(folder: Path) -> None:
    """Write back and drop a folder's pages from the page cache, so the next read comes from disk."""
    sync_files(folder, drop_cache=True)


def warm(folder: Path) -> None:
    """Write back, then read every file of a folder, so the next read finds it in the page cache."""
    sync_files(folder)
    for p in files_of(folder):
        with open(p, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass


def cpu_split(self_too: bool) -> tuple[float, float]:
    """(user, system) CPU seconds of the waited-for children so far, plus this process's own if asked."""
    b = resource.getrusage(resource.RUSAGE_CHILDREN)
    u, s = b.ru_utime, b.ru_stime
    if self_too:
        a = resource.getrusage(resource.RUSAGE_SELF)
        u, s = u + a.ru_utime, s + a.ru_stime
    return u, s


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in files_of(folder))


def run_measured(cmd: list[str], cwd: Path | None = None) -> tuple[float, int, int, str]:
    """Run cmd; returns (wall seconds, peak RSS, peak anonymous RSS, stdout).

    Both peaks are sampled from /proc/<pid>/status every 10 ms: VmHWM (the kernel's own high-water mark,
    reset at exec) and RssAnon. getrusage's ru_maxrss is not used: for a forked child it counts the
    parent's image before exec, which here holds the sample checkpoint it has just written."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
    peak = {"VmHWM:": 0, "RssAnon:": 0}
    stop = threading.Event()

    def sample() -> None:
        status = f"/proc/{proc.pid}/status"
        while not stop.is_set():
            try:
                for line in open(status):
                    key = line.split(None, 1)[0] if line.strip() else ""
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                break
            stop.wait(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, peak["VmHWM:"], peak["RssAnon:"], out


def cp_fsync(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    sync_files(dst)
    fsync_dir(dst)
    return time.perf_counter() - t0


def cp_sync(src: Path, dst: Path) -> float:
    """The copy as a reader times it by hand: ``cp -r src dst && sync`` in a shell of its own."""
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", 'cp -r "$0" "$1" && sync', str(src), str(dst)], check=True)
    return time.perf_counter() - t0


def measured(self_too: bool, fn, *args):  # noqa: ANN001, ANN202
    """fn(*args), with the (user, system) CPU seconds its child processes spent in it, and with
    ``self_too`` this process's own (cp's fsync loop runs here; run_measured's sampler must not count)."""
    u0, s0 = cpu_split(self_too)
    r = fn(*args)
    u1, s1 = cpu_split(self_too)
    return r, (u1 - u0, s1 - s0)


@dataclass
class Series:
    """One kind of run: its wall times, (user, system) CPU and the load average each started at."""

    label: str
    wall: list[float] = field(default_factory=list)
    cpu: list[tuple[float, float]] = field(default_factory=list)
    load: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: tuple[float, float], load: float) -> str:
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.load.append(load)
        return f"{self.label} {wall:.2f} s (CPU {cpu[0]:.2f} + {cpu[1]:.2f}, load {load:.2f})"

    def median(self) -> float:
        return statistics.median(self.wall)

    def cpu_median(self) -> str:
        return f"{statistics.median(c[0] for c in self.cpu):.2f} + {statistics.median(c[1] for c in self.cpu):.2f} s"

    def json(self) -> dict[str, Any]:
        return {"s": self.wall, "cpu_user_sys": self.cpu, "load1": self.load}


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} median, {min(xs):.2f}..{max(xs):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=5, help="layers (the first is dense, the rest MoE)")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2560)
    ap.add_argument("--shards", type=int, default=4, help="source shards")
    ap.add_argument("--source", type=Path, default=None, help="convert this checkpoint instead of making one (not removed)")
    ap.add_argument("--target", default="mega-moe")
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument("--workers", type=int, default=4, help="as convert --workers (its default)")
    ap.add_argument("--shard-streams", type=int, default=0, help="as convert --shard-streams (0: its default, by the CPU count)")
    ap.add_argument(
        "--also-streams", type=int, default=0, help="in every round, also run this tree's convert with this many --shard-streams"
    )
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (cp, cp && sync, convert, ...); medians are reported")
    ap.add_argument(
        "--warm", action="store_true", help="read the source into the page cache before each run instead of evicting it"
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a source tree of another commit (git archive C nvfp4_fuse | tar -x -C DIR): its convert runs in every round too",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    a = ap.parse_args()

    from nvfp4_fuse.convert import ConvertOptions, make_plan
    from nvfp4_fuse.spec import human, parse_size

    work = Path(tempfile.mkdtemp(prefix="nvfp4-bench-", dir=a.workdir))
    try:
        t0 = time.perf_counter()
        if a.source:
            src = a.source.resolve()
            made = "given"
        else:
            from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint

            src = work / "src"
            spec = SampleSpec(
                "deepseek", a.layers, a.experts, a.hidden, a.inter, a.shards, unequal_scale_2=True, seed=0, fast=True
            )
            make_sample_checkpoint(src, spec)
            made = f"made in {time.perf_counter() - t0:.1f} s"
        size = folder_bytes(src)
        plan = make_plan(src, ConvertOptions(target=a.target, max_shard_size=parse_size(a.max_shard_size), workers=a.workers))
        layer = next(iter(plan.layers.values()))
        expert_bytes = sum(
            layer.ref(0, role, f).info.nbytes for role in ("gate", "up", "down") for f in ("weight", "weight_scale")
        )
        routed = sum(
            l.ref(e, r, f).info.nbytes
            for l in plan.layers.values()
            for e in range(l.dims.experts)
            for r in ("gate", "up", "down")
            for f in ("weight", "weight_scale")
        )
        print(
            f"checkpoint: {human(size)} in {len(plan.source.headers)} shards ({human(routed)} routed experts, "
            f"{len(plan.layers)} MoE layers x {layer.dims.experts} experts of {human(expert_bytes)}, H={layer.dims.hidden} "
            f"I={layer.dims.inter}), {made}; target {a.target}, {a.workers} workers, cpus {os.cpu_count()}",
            flush=True,
        )

        out = work / "out"
        cmd = [sys.executable, "-m", "nvfp4_fuse.cli", "convert", str(src), str(out), "--target", a.target,
               "--max-shard-size", a.max_shard_size, "--workers", str(a.workers), "--json"]  # fmt: skip
        base_cmd = list(cmd)  # another commit's convert may not know --shard-streams
        if a.shard_streams:
            cmd += ["--shard-streams", str(a.shard_streams)]
        streams = ConvertOptions(shard_streams=a.shard_streams).streams()
        print(f"shard streams: {streams} ({len(plan.shards)} output shards of at most {a.max_shard_size})", flush=True)
        prepare = warm if a.warm else evict
        mode = "source in the page cache" if a.warm else "source evicted from the page cache"
        goal = 1.5 if a.warm else 1.2
        print(f"mode: {mode}", flush=True)

        cp = Series("cp&&sync")
        fs = Series("cp+fsync")
        conv = Series("convert")
        base = Series("baseline")
        also = Series(f"{a.also_streams} stream(s)")
        peak = {"rss": 0, "anon": 0}
        out_size = 0

        def run_cp() -> str:
            t, cpu = measured(False, cp_sync, src, work / "cp")
            shutil.rmtree(work / "cp")
            return cp.add(t, cpu, load)

        def run_fsync() -> str:
            t, cpu = measured(True, cp_fsync, src, work / "cp")
            shutil.rmtree(work / "cp")
            return fs.add(t, cpu, load)

        def run_convert(series: Series, command: list[str], cwd: Path) -> Callable[[], str]:
            def run() -> str:
                nonlocal out_size
                (t, rss, anon, _), cpu = measured(False, run_measured, command, cwd)
                t0 = time.perf_counter()
                os.sync()  # as `convert ... && sync` by hand: what else is dirty is paid for alike
                t += time.perf_counter() - t0
                if series is conv:
                    peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
                    out_size = folder_bytes(out)
                shutil.rmtree(out)
                return series.add(t, cpu, load)

            return run

        runs: list[Callable[[], str]] = [run_cp, run_fsync, run_convert(conv, cmd, ROOT)]
        if a.baseline:
            # python -m imports from the working directory first: there, the baseline's package
            runs.append(run_convert(base, base_cmd, a.baseline.resolve()))
        if a.also_streams:
            runs.append(run_convert(also, [*base_cmd, "--shard-streams", str(a.also_streams)], ROOT))
        for rep in range(a.repeat):
            # rotate the order, so that no run always comes first or always follows the same one
            k = rep % len(runs)
            parts = []
            for run in runs[k:] + runs[:k]:
                prepare(src)
                os.sync()
                load = os.getloadavg()[0]
                parts.append(run())
            print(f"  round {rep + 1}: " + "; ".join(parts) + f"; convert / cp {conv.wall[-1] / cp.wall[-1]:.2f}", flush=True)
        ratios = [c / p for c, p in zip(conv.wall, cp.wall)]
        t_cp, t_conv = cp.median(), conv.median()
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import nvfp4_fuse.cli, nvfp4_fuse.convert"], check=True)
        t_import = time.perf_counter() - t0

        naive = None
        if not a.skip_naive:
            prepare(src)
            os.sync()
            nout = work / "naive"
            nout.mkdir()
            naive = run_measured([sys.executable, "-c", NAIVE, str(src), str(nout)])[:3]
            shutil.rmtree(nout)

        est = plan.peak_memory_estimate(streams)
        rows = [
            (f"cp -r && sync (median of {a.repeat})", t_cp, None, None),
            (f"cp -r + fsync of each file (median of {a.repeat})", fs.median(), None, None),
            (f"convert && sync (median of {a.repeat})", t_conv, peak["rss"], peak["anon"]),
        ]
        if naive:
            rows.append(("naive (load all, stack, save_file; no fsync)", *naive))
        print(f"\n{'run':<48} {'wall s':>8} {'GB/s':>6} {'peak RSS':>10} {'peak anon':>10}")
        for name, t, rss, anon in rows:
            print(
                f"{name:<48} {t:8.2f} {size / t / 1e9:6.2f} {human(rss) if rss else '-':>10} {human(anon) if anon else '-':>10}"
            )
        print(f"\nconvert / cp ({mode}): {spread(ratios)} over {a.repeat} rounds  (goal <= {goal})")
        print(
            f"the two copies in the same rounds: (cp -r + fsync of each file) / (cp -r && sync) "
            f"{spread([f / c for f, c in zip(fs.wall, cp.wall)])}; convert / (cp -r + fsync of each file) "
            f"{spread([c / f for c, f in zip(conv.wall, fs.wall)])}"
        )
        print(
            f"CPU, median (user + system; cp && sync's counts the shell, not the kernel's writeback threads; "
            f"cp + fsync's counts the fsync loop, which writes back in this process): cp && sync {cp.cpu_median()}, "
            f"cp + fsync {fs.cpu_median()}, convert {conv.cpu_median()}"
        )
        print(f"1-minute load average at the start of the runs: {spread(cp.load + fs.load + conv.load)} (cpus {os.cpu_count()})")
        if base.wall:
            print(
                f"baseline ({a.baseline}): {base.median():.2f} s median, / cp "
                f"{spread([b / c for b, c in zip(base.wall, cp.wall)])}; CPU {base.cpu_median()}"
            )
        if also.wall:
            print(
                f"--shard-streams {a.also_streams}: {also.median():.2f} s median, {size / also.median() / 1e9:.2f} GB/s, "
                f"/ cp {spread([b / c for b, c in zip(also.wall, cp.wall)])}; CPU {also.cpu_median()}"
            )
        print(f"of convert's time, starting Python and importing the CLI: {t_import:.2f} s (a fixed cost, whatever the size)")
        print(f"convert peak anonymous RSS: {human(peak['anon'])}  (goal < 600 MB; plan estimate {human(est)})")
        if naive:
            print(
                f"naive / convert: {naive[0] / t_conv:.2f}x the time, {naive[2] / max(1, peak['anon']):.1f}x the anonymous memory"
            )
        print(f"output: {human(out_size)}")
        if a.json:
            a.json.write_text(json.dumps({
                "checkpoint_bytes": size, "expert_bytes": expert_bytes, "target": a.target, "workers": a.workers,
                "warm": a.warm, "cpus": os.cpu_count(), "max_shard_size": a.max_shard_size, "ratios": ratios,
                "cp_and_sync": cp.json(), "cp_fsync": fs.json(), "convert": conv.json(),
                "baseline": base.json(), "also": also.json(), "shard_streams": streams, "also_streams": a.also_streams,
                "import_s": t_import, "convert_peak_rss": peak["rss"], "convert_peak_anon": peak["anon"], "estimate": est,
                "naive_s": naive[0] if naive else None, "naive_peak_anon": naive[2] if naive else None,
            }, indent=1))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
