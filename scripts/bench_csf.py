#!/usr/bin/env python3
"""What compressed block scales cost the converter: decode rate, and convert time against the plain twin.

1. Decode rate of one DeepSeek-V4-Pro-shaped expert scale (gate/up [3072, 448], down [7168, 192]) in
   each encoding, with realistic exceptions (1% of the bytes outside their row's window), in MB of
   decoded E4M3 a second (one thread; best of several runs).
2. A sample checkpoint written twice from one seed, once plain and once with every block scale
   compressed (``nvfp4-fuse sample --scale-encoding``), each converted in turn (page cache warm,
   alternating), and the median of compressed/plain convert wall time per encoding. The weights are
   really quantized, so the scales vary as real ones do (a few exceptions); ``--fast`` draws every
   scale byte at random instead (most of them exceptions: a worst case for the decoders).

    python scripts/bench_csf.py [--workdir DIR] [--runs 5] [--experts 16] [--hidden 2048 --inter 1024] [--fast]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nvfp4_fuse import csf  # noqa: E402
from nvfp4_fuse.convert import ConvertOptions, convert  # noqa: E402
from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint  # noqa: E402


def _scales(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    s = (rng.integers(0x20, 0x50, size=(rows, 1)) + rng.integers(0, 14, size=(rows, cols))).astype(np.uint8)
    far = rng.random((rows, cols)) < 0.01
    s[far] = rng.integers(0, 0x7F, size=int(far.sum())).astype(np.uint8)
    return s


def decode_rates(runs: int) -> None:
    rng = np.random.default_rng(0)
    for encoding in sorted(csf.ENCODINGS):
        for rows, cols in ((3072, 448), (7168, 192)):
            streams = csf.encode(encoding, _scales(rng, rows, cols))
            csf.decode(encoding, streams)  # the geometry, once a shape
            best = min(_timed(lambda e=encoding, s=streams: csf.decode(e, s)) for _ in range(max(runs, 5)))
            stored = sum(a.nbytes for a in streams.values())
            print(
                f"decode {encoding:12s} [{rows}, {cols}]: {rows * cols / best / 1e6:7.1f} MB/s of E4M3 "
                f"({1e3 * best:.2f} ms; streams {stored / (rows * cols):.3f} of the plain bytes)"
            )


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def convert_ratio(work: Path, runs: int, experts: int, hidden: int, inter: int, fast: bool) -> None:
    spec = dict(scheme="deepseek", layers=3, experts=experts, hidden=hidden, inter=inter, shards=4, fast=fast, seed=7)
    plain = make_sample_checkpoint(work / "plain", SampleSpec(**spec))
    size = sum(p.stat().st_size for p in plain.glob("*.safetensors"))
    for encoding in sorted(csf.ENCODINGS):
        packed = make_sample_checkpoint(work / encoding, SampleSpec(**spec, scale_encoding=encoding))
        ratios, cpu_ratios, times, cpus = [], [], {"plain": [], encoding: []}, {"plain": [], encoding: []}
        for _ in range(runs):
            for name, src in (("plain", plain), (encoding, packed)):
                out = work / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                c0 = _cpu()
                times[name].append(_timed(lambda src=src, out=out: convert(src, out, ConvertOptions(target="mega-moe"))))
                cpus[name].append(_cpu() - c0)
            ratios.append(times[encoding][-1] / times["plain"][-1])
            cpu_ratios.append(cpus[encoding][-1] / cpus["plain"][-1])
        print(
            f"convert {size / 1e6:.0f} MB ({'random' if fast else 'quantized'} scales), mega-moe, {encoding}/plain: wall "
            f"{statistics.median(times[encoding]):.2f} s / {statistics.median(times['plain']):.2f} s, median ratio "
            f"{statistics.median(ratios):.3f} (runs: {', '.join(f'{r:.2f}' for r in ratios)}); CPU time (user + system) "
            f"median ratio {statistics.median(cpu_ratios):.3f} (runs: {', '.join(f'{r:.2f}' for r in cpu_ratios)})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--fast", action="store_true", help="random scale bytes instead of quantized weights")
    a = ap.parse_args()
    decode_rates(a.runs)
    with tempfile.TemporaryDirectory(dir=a.workdir) as d:
        convert_ratio(Path(d), a.runs, a.experts, a.hidden, a.inter, a.fast)


if __name__ == "__main__":
    main()
