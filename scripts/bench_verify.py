#!/usr/bin/env python3
"""End-to-end verify on a real GPU: make a synthetic DeepSeek-shaped checkpoint, convert it, verify it.

Prints, measured in one run, for each target: convert time, verify time on the chosen device
(and, with --cpu-sample, the CPU reference on a few experts for scale), the bytes of expert data
read per second, and each layer's result. Run on a GPU machine through the device tool, e.g.:

    python3 scripts/bench_verify.py --experts 32 --layers 3 --hidden 7168 --inter 2048
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from nvfp4_fuse.convert import ConvertOptions, convert  # noqa: E402
from nvfp4_fuse.manifest import check_files, load_manifest  # noqa: E402
from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint  # noqa: E402
from nvfp4_fuse.verify import verify  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=3, help="layers; layer 0 is dense")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--targets", default="mega-moe,vllm-fused")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cpu-sample", type=int, default=2, help="experts per layer for the CPU comparison (0: skip)")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nvfp4-bench-verify-", dir=args.workdir))
    try:
        src = work / "src"
        t0 = time.perf_counter()
        spec = SampleSpec(
            scheme="deepseek", layers=args.layers, experts=args.experts, hidden=args.hidden, inter=args.inter,
            shards=4, unequal_scale_2=True, fast=True, seed=1,
        )
        make_sample_checkpoint(src, spec)
        expert_bytes = (args.layers - 1) * args.experts * 3 * args.hidden * args.inter * (1 / 2 + 1 / 16)
        print(f"sample: {expert_bytes / 1e9:.2f} GB of routed-expert data, made in {time.perf_counter() - t0:.1f} s")
        dev = "cuda" if (args.device == "auto" and torch.cuda.is_available()) else args.device
        if dev == "cuda":
            print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
        rows = []
        for target in args.targets.split(","):
            out = work / target
            t0 = time.perf_counter()
            convert(src, out, ConvertOptions(target=target, workers=8))
            t_conv = time.perf_counter() - t0
            t0 = time.perf_counter()
            problems = check_files(out, load_manifest(out))  # type: ignore[arg-type]
            t_hash = time.perf_counter() - t0
            assert not problems, problems
            verify(src, out, device=dev, hash_files=False, sample=1)  # warm-up: kernel compile
            t0 = time.perf_counter()
            res = verify(src, out, device=dev, hash_files=False)
            t_ver = time.perf_counter() - t0
            rows.append((target, t_conv, t_hash, t_ver, res))
            line = f"{target:11s} convert {t_conv:6.1f} s | hash check {t_hash:5.1f} s | verify ({dev}, no re-hash) {t_ver:6.1f} s"
            line += f" = {2 * expert_bytes / t_ver / 1e9:.2f} GB/s of expert data (both checkpoints)"
            if args.cpu_sample and dev != "cpu":
                t0 = time.perf_counter()
                verify(src, out, device="cpu", hash_files=False, sample=args.cpu_sample, seed=0)
                t_cpu = time.perf_counter() - t0
                per_cpu = t_cpu / (args.cpu_sample * (args.layers - 1))
                per_gpu = t_ver / (args.experts * (args.layers - 1))
                line += f" | CPU reference {per_cpu:.2f} s/expert vs {per_gpu:.3f} s/expert ({per_cpu / per_gpu:.1f}x)"
            print(line)
            for lr in res.layers:
                print(f"    {lr.prefix}: {lr.checked}/{lr.experts} experts, rescaled {lr.rescaled}, max abs {lr.max_abs:.3g}, max rel {100 * lr.max_rel:.3f}%")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
