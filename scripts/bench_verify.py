#!/usr/bin/env python3
"""verify's speed and memory against `cat` of both checkpoints, measured in one run.

Makes a synthetic DeepSeek-shaped checkpoint (real format: packed E2M1 codes, E4M3 block scales, F32
scalars, gate/up weight_scale_2 unequal so half the w13 experts are rescaled), converts it to each
target, then for each:

  1. `cat` of every file of both checkpoints to /dev/null, with both in the page cache (median of 3);
  2. verify of every expert with every check, in a fresh Python process (start and imports included,
     the CLI's own dependencies left out: what the command costs), its peak RSS sampled from /proc; on
     a GPU with the end-to-end dequant-and-compare, whose process (torch's import, CUDA's start, the
     kernel's load) starts with the call; then, in another process, verify() twice, timing the second
     call, which shows what of the first call's time was one-off (the second call finds the decode
     process started and the kernel loaded).

and prints verify/cat (for the whole process, and for the verify() call alone), the GB/s of both
checkpoints' routed-expert data, and the peak RSS (of the verify process; the GPU decode process's
is not counted).

    python scripts/bench_verify.py [--experts 96 --layers 4 --hidden 4096 --inter 2048] [--device auto]
        [--tree DIR ...] [--rounds N]

``--tree DIR`` times another checkout's verify too (``git archive C nvfp4_fuse kernels scripts | tar -x
-C DIR``), on the same checkpoint, the trees taken in turn in fresh processes, ``--rounds`` times each:
medians are printed, with the range. Machines differ by up to 1.5x for the same code, so compare trees
within one run of this script.

The default is ~3.9 GB of routed experts (96 experts x 3 MoE layers, H 4096, I 2048); it needs about
3x that in free disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_convert import files_of, run_measured  # noqa: E402

from nvfp4_fuse.convert import ConvertOptions, convert  # noqa: E402
from nvfp4_fuse.manifest import MANIFEST_NAME  # noqa: E402
from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint  # noqa: E402
from nvfp4_fuse.spec import parse_size  # noqa: E402

VERIFY = """
import json, sys
sys.path.insert(0, {scripts!r})
from source_tree import use_source_tree
use_source_tree()
from nvfp4_fuse.verify import verify
kw = json.loads(sys.argv[3])
again = kw.pop("again", False)
res = verify(sys.argv[1], sys.argv[2], **kw).to_json()
if again:  # the same verify() again in this process: without the one-off costs
    res["again_seconds"] = verify(sys.argv[1], sys.argv[2], **kw).seconds
print(json.dumps(res))
"""


def expert_bytes(layers: int = 4, experts: int = 96, hidden: int = 4096, inter: int = 2048) -> float:
    """Bytes of routed-expert data (values and block scales) of one such checkpoint; layer 0 is dense."""
    return (layers - 1) * experts * 3 * hidden * inter * (1 / 2 + 1 / 16)


def ensure_checkpoint(work: Path, target: str = "mega-moe", max_shard_size: str = "500MB", experts: int = 96) -> tuple[Path, Path]:
    """(source, converted) in ``work``: this script's default checkpoint (4.08 GB of routed experts
    with 96 experts a layer), converted to ``target``; made there if absent, else reused (the
    diagnostics that call verify() many times share it)."""
    src, out = work / f"src-{experts}", work / f"{target}-{experts}"
    if not (src / "model.safetensors.index.json").exists():
        make_sample_checkpoint(src, SampleSpec("deepseek", 4, experts, 4096, 2048, 4, unequal_scale_2=True, fast=True, seed=1))
    if not (out / MANIFEST_NAME).exists():
        convert(src, out, ConvertOptions(target=target, workers=8, max_shard_size=parse_size(max_shard_size)))
    return src, out


def _span(runs: list[tuple[float, ...]]):
    """min-max of field ``i`` of ``runs``, as text."""
    return lambda i: f"{min(r[i] for r in runs):.2f}-{max(r[i] for r in runs):.2f}"


def cat_both(a: Path, b: Path) -> float:
    files = [str(p) for p in files_of(a) + files_of(b)]
    t0 = time.perf_counter()
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=96)
    ap.add_argument("--layers", type=int, default=4, help="layers; layer 0 is dense")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--targets", default="mega-moe,vllm-fused")
    ap.add_argument("--device", default="auto", help="verify --device; several, comma-separated, are run in turn")
    ap.add_argument("--workers", type=int, default=None, help="verify --workers (default: its own)")
    ap.add_argument(
        "--max-shard-size", default="2GB", help="of the converted output: sha256 is a chain per shard, so the largest shard's hash is a floor"
    )
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--tree", action="append", default=[], help="another checkout to time in turn with this one (repeatable)")
    ap.add_argument("--rounds", type=int, default=1, help="timed processes per tree and device (medians printed)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="nvfp4-bench-verify-", dir=args.workdir))
    try:
        src = work / "src"
        t0 = time.perf_counter()
        spec = SampleSpec(
            scheme="deepseek", layers=args.layers, experts=args.experts, hidden=args.hidden, inter=args.inter,
            shards=4, unequal_scale_2=True, fast=True, seed=1,
        )  # fmt: skip
        make_sample_checkpoint(src, spec)
        data = expert_bytes(args.layers, args.experts, args.hidden, args.inter)
        print(f"sample: {data / 1e9:.2f} GB of routed-expert data, made in {time.perf_counter() - t0:.1f} s", flush=True)
        for target in args.targets.split(","):
            out = work / target
            res = convert(src, out, ConvertOptions(target=target, workers=8, max_shard_size=parse_size(args.max_shard_size)))
            print(f"{target}: {len(res.spec.shards)} output shards of at most {args.max_shard_size}", flush=True)
            for device in args.device.split(","):
                kw = {"device": device, **({"workers": args.workers} if args.workers else {})}
                trees = [("this", ROOT), *((Path(t).name, Path(t).resolve()) for t in args.tree)]

                def cmd(tree: Path, out: Path = out) -> list[str]:
                    return [sys.executable, "-c", VERIFY.format(scripts=str(tree / "scripts")), str(src), str(out)]

                run_measured([*cmd(ROOT), json.dumps({**kw, "sample": 1})])  # warm-up: page cache, Triton's kernel cache
                cats = [cat_both(src, out) for _ in range(3)]
                t_cat = statistics.median(cats)
                got: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name, _ in trees}
                for _ in range(args.rounds):
                    for name, tree in trees:
                        # run in the tree: its own nvfp4_fuse is imported first, by verify and by the GPU decode process
                        wall, peak, anon, stdout = run_measured([*cmd(tree), json.dumps(kw)], cwd=tree)
                        res = json.loads(stdout)
                        # a second process runs verify() twice; only its second call's time is used (the peak RSS
                        # is the single call's)
                        again = json.loads(run_measured([*cmd(tree), json.dumps({**kw, "again": True})], cwd=tree)[3])["again_seconds"]
                        got[name].append((wall, res["seconds"], again, peak))
                for name, _ in trees:
                    runs = got[name]
                    wall = statistics.median(r[0] for r in runs)
                    call = statistics.median(r[1] for r in runs)  # verify() itself, without Python's start and the imports
                    again = statistics.median(r[2] for r in runs)
                    peak = max(r[3] for r in runs)
                    span = _span(runs)
                    rel = max(l["max_rel"] for l in res["layers"])
                    print(
                        f"{target:10s} [{name}] verify ({res['device']}): process {wall:6.2f} s = {wall / t_cat:4.1f}x cat of both "
                        f"({t_cat:.2f} s); verify() {call:6.2f} s ({span(1)}) = {call / t_cat:4.1f}x cat, {2 * data / call / 1e9:5.2f} GB/s "
                        f"of both checkpoints' expert data | peak RSS {peak / 1e6:.0f} MB | decoded "
                        f"{sum(l['decoded'] for l in res['layers'])} experts, max rel {100 * rel:.3f}%",
                        flush=True,
                    )
                    print(
                        f"{'':10s} [{name}] the same verify() called a second time in one process (one-off costs paid): {again:6.2f} s "
                        f"({span(2)}) = {again / t_cat:4.1f}x cat, {2 * data / again / 1e9:5.2f} GB/s",
                        flush=True,
                    )
                for c in res["checks"]:
                    print(f"    - {c}")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
