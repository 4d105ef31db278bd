#!/usr/bin/env python3
"""verify()'s steady state with parts of the GPU decode switched off, in one process, variants taken
in turn: what the launches, the staging and the decode's host preparation each cost the pass. A
diagnostic: the variants replace the lane's launch, so their results check nothing end to end.

    python scripts/verify_variants.py --ckpt /tmp/pv [--rounds 4]

The checkpoint is bench_verify.py's (made in ``--ckpt`` if absent, as ab_verify.py does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_verify import ensure_checkpoint  # noqa: E402
from source_tree import use_source_tree  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()
    a.ckpt.mkdir(parents=True, exist_ok=True)
    src, out = ensure_checkpoint(a.ckpt)
    use_source_tree()
    import torch

    from nvfp4_fuse import verify as ver

    torch.cuda.init()
    full = ver._Lane.launch

    def stage_only(self: Any, key: Any, rows: int, cols: int, *arrays_and_layout: Any) -> None:
        values, a_scales, a_s2, b_scales, b_shape, b_swizzled, b_s2 = arrays_and_layout
        arrays = [values, a_scales, a_s2, b_scales, b_s2]
        with torch.cuda.stream(self.stream):
            self._stage(arrays, self._batch((rows, cols, tuple(b_shape), b_swizzled), arrays))
        self.v._decoded(key, [0, 0, 0, 0])

    def nothing(self: Any, key: Any, *args: Any) -> None:
        self.v._decoded(key, [0, 0, 0, 0])

    variants = {
        "full, 4 workers": (full, {"workers": 4}),
        "full, 6 workers": (full, {"workers": 6}),
        "full, 8 workers": (full, {"workers": 8}),
        "staging only, 6 workers": (stage_only, {"workers": 6}),
        "host preparation only, 6": (nothing, {"workers": 6}),
        "no decode, 6 workers": (full, {"workers": 6, "decode": False}),
        "no decode, 8 workers": (full, {"workers": 8, "decode": False}),
    }
    ver.verify(src, out, device="cuda")  # the one-off costs paid
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.rounds):
        for name, (launch, kw) in variants.items():
            ver._Lane.launch = launch
            times[name].append(ver.verify(src, out, device="cuda", **kw).seconds)
    ver._Lane.launch = full
    base = statistics.median(times["full, 6 workers"])
    for name, t in times.items():
        m = statistics.median(t)
        print(f"{name:28s} median {m:.2f} s = {m / base:.2f}x full with 6 ({', '.join(f'{x:.2f}' for x in t)})")


if __name__ == "__main__":
    main()
