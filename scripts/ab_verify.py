#!/usr/bin/env python3
"""verify()'s first and second call, in fresh processes, trees taken in turn: an A/B of the one-off
costs (Triton's import, the kernel load, first allocations) and of the steady state, on one machine.

    python scripts/ab_verify.py --ckpt /tmp/pv --rounds 4 new=.:'{"device": "cuda"}' base=DIR:'{"device": "cuda"}'

Each run is ``LABEL=TREE:KWARGS``: a checkout (``.`` is this one; a baseline is ``git archive C nvfp4_fuse
kernels scripts | tar -x -C DIR``) and verify()'s keyword arguments as JSON. The checkpoint is
bench_verify.py's (4.08 GB of routed experts with 96 experts a layer, ``--experts`` more or fewer;
mega-moe, 500 MB output shards), made in ``--ckpt`` if absent. Triton's kernel cache is filled first by one sampled run of the first tree, as a user's
earlier run would.
Each process imports torch and initialises CUDA (unless the run is on the CPU) before the timed calls,
as bench_verify.py does.
Prints each round, then per run the medians, the GB/s of both checkpoints' expert data, and the
largest peak RSS of its processes (VmHWM: anonymous and mapped file pages, over both calls).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_verify import ensure_checkpoint, expert_bytes  # noqa: E402

CALLS = """
import json, sys
sys.path.insert(0, 'scripts')
from source_tree import use_source_tree
use_source_tree()
import torch
from nvfp4_fuse.verify import verify
kw = json.loads(sys.argv[3])
if kw.get("device", "auto") != "cpu" and torch.cuda.is_available():
    torch.cuda.init()
seconds = [verify(sys.argv[1], sys.argv[2], **kw).seconds for _ in range(int(sys.argv[4]))]
hwm = next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss": hwm}))
"""


def calls(tree: Path, src: Path, out: Path, kw: dict, n: int) -> tuple[list[float], int]:
    """verify()'s seconds for each of ``n`` calls in one fresh process, and that process's peak RSS."""
    p = subprocess.run([sys.executable, "-c", CALLS, str(src), str(out), json.dumps(kw), str(n)], cwd=tree, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{tree}: {p.stderr[-3000:]}")
    got = json.loads(p.stdout.strip().splitlines()[-1])
    return got["seconds"], got["peak_rss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="LABEL=TREE:KWARGS")
    ap.add_argument("--ckpt", type=Path, required=True, help="folder for the checkpoint (kept)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--experts", type=int, default=96, help="experts a layer (3 MoE layers, H 4096, I 2048)")
    a = ap.parse_args()
    a.ckpt.mkdir(parents=True, exist_ok=True)
    src, out = ensure_checkpoint(a.ckpt, experts=a.experts)
    data = 2 * expert_bytes(experts=a.experts) / 1e9  # both checkpoints' routed-expert data
    runs = {}
    for r in a.runs:
        label, rest = r.split("=", 1)
        tree, kw = rest.split(":", 1)
        runs[label] = (Path(tree).resolve(), json.loads(kw))
    first = next(iter(runs.values()))
    calls(first[0], src, out, {**first[1], "sample": 1}, 1)  # Triton's kernel cache filled
    got: dict[str, tuple[list[float], list[float], list[int]]] = {k: ([], [], []) for k in runs}
    for rnd in range(a.rounds):
        for label, (tree, kw) in runs.items():
            (t1, t2), peak = calls(tree, src, out, kw, 2)
            for into, x in zip(got[label], (t1, t2, peak)):
                into.append(x)
        print(
            f"round {rnd + 1}: " + ", ".join(f"{k} {v[0][-1]:.2f}/{v[1][-1]:.2f} s, {v[2][-1] / 1e6:.0f} MB" for k, v in got.items()),
            flush=True,
        )
    for label, (t1, t2, peaks) in got.items():
        m1, m2 = statistics.median(t1), statistics.median(t2)
        print(
            f"{label:12s} first call median {m1:.2f} s ({min(t1):.2f}-{max(t1):.2f}), {data / m1:.2f} GB/s | "
            f"second call {m2:.2f} s ({min(t2):.2f}-{max(t2):.2f}), {data / m2:.2f} GB/s | peak RSS {min(peaks) / 1e6:.0f}-"
            f"{max(peaks) / 1e6:.0f} MB"
        )


if __name__ == "__main__":
    main()
