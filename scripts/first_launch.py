#!/usr/bin/env python3
"""What the GPU decode costs once in a fresh process, step by step: torch's import, CUDA's start,
Triton's import, the compare kernel's first launch (with Triton's kernel cache already filled: run
this twice, and read the second), pinned and device buffers, and the host time of a launch and its
statistics in steady state. A diagnostic (each step's milliseconds), not a benchmark.

    python scripts/first_launch.py; python scripts/first_launch.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
STEPS: list[tuple[str, float]] = [("start", time.perf_counter())]


def step(name: str) -> None:
    STEPS.append((name, time.perf_counter()))


def main() -> None:
    from source_tree import use_source_tree

    use_source_tree()
    import torch

    step("import torch")
    torch.cuda.init()
    step("CUDA init")
    import triton  # noqa: F401

    step("import triton")
    from nvfp4_fuse.kernels.compare import compare_nvfp4

    step("import the compare kernel")
    dev = torch.device("cuda", 0)
    for rows, cols in ((4096, 4096), (4096, 2048)):  # bench_verify's w13 and w2 shapes
        for i in range(2):
            vals = torch.zeros((rows, cols // 2), dtype=torch.uint8, device=dev)
            scales = torch.zeros((rows, cols // 16), dtype=torch.uint8, device=dev)
            s2 = torch.ones(rows, dtype=torch.float32, device=dev)
            compare_nvfp4(vals, scales, s2, vals, scales, s2, check=False)
            torch.cuda.synchronize()
            step(f"launch {rows}x{cols}, #{i + 1}")
    kept = [torch.empty(20 << 20, dtype=torch.uint8, pin_memory=True) for _ in range(8)]
    step("8 pinned buffers of 20 MiB")
    kept += [torch.empty(20 << 20, dtype=torch.uint8, device=dev) for _ in range(16)]
    step("16 device buffers of 20 MiB")
    vals = torch.zeros((4096, 2048), dtype=torch.uint8, device=dev)
    scales = torch.zeros((4096, 256), dtype=torch.uint8, device=dev)
    s2 = torch.ones(4096, dtype=torch.float32, device=dev)
    torch.cuda.synchronize()
    step("(set-up)")
    for _ in range(200):
        r = compare_nvfp4(vals, scales, s2, vals, scales, s2, check=False)
        torch.stack([r.n_diff.double(), r.nonfinite.double(), r.max_abs.double(), r.max_rel.double()], dim=1)
    step("200 launches and their statistics, host side")
    torch.cuda.synchronize()
    step("their GPU work")
    for (_, a), (name, b) in zip(STEPS, STEPS[1:]):
        print(f"{name:44s} {1000 * (b - a):8.1f} ms")


if __name__ == "__main__":
    main()
