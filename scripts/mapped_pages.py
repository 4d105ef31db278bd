#!/usr/bin/env python3
"""What verify() keeps mapped of both checkpoints: its peak resident set by mapping, and what is still
mapped once the pass is over, by tensor.

verify() reads both checkpoints through read-only mappings and drops each range once done
(``ShardReader.release``); whatever a pass leaves mapped grows with the model. This runs one verify()
in this process with a sampler of ``/proc/self/smaps`` (every 20 ms), then, as the pass closes its
mappings, reads ``/proc/self/pagemap`` for each of them and says which tensors still have pages mapped.

    python scripts/mapped_pages.py --ckpt /dev/shm/mp --experts 512 --hidden 2048 --inter 1024 --layers 3

The checkpoint (DeepSeek-shaped, layer 0 dense, converted to mega-moe with 500 MB output shards) is
made in ``--ckpt`` if absent. To run another checkout's verify, put it first on the path:
``PYTHONPATH=OTHER python scripts/mapped_pages.py ...``.
"""

from __future__ import annotations

import argparse
import collections
import mmap
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_tree import use_source_tree  # noqa: E402

use_source_tree()

from nvfp4_fuse import verify as ver  # noqa: E402
from nvfp4_fuse.convert import ConvertOptions, convert  # noqa: E402
from nvfp4_fuse.manifest import MANIFEST_NAME  # noqa: E402
from nvfp4_fuse.piece_checks import PieceChecker  # noqa: E402
from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint  # noqa: E402
from nvfp4_fuse.shard_reader import ShardReader  # noqa: E402
from nvfp4_fuse.spec import parse_size  # noqa: E402


def rss_by_mapping() -> collections.Counter:
    """KiB resident by mapped file (anonymous memory as "[anon]", the heap as "[heap]")."""
    per: collections.Counter = collections.Counter()
    name = "[anon]"
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                parts = line.split()
                name = parts[5] if len(parts) > 5 else "[anon]"
            elif head == "Rss:":
                per[name] += int(line.split()[1])
    return per


def present_pages(reader: ShardReader) -> np.ndarray:
    """Indices of the pages of ``reader``'s mapping that are mapped into this process now."""
    m = reader._mapped()
    addr = np.frombuffer(m, dtype=np.uint8, count=1).ctypes.data
    page = mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // page * 8)
        raw = f.read(-(-len(m) // page) * 8)
    return np.flatnonzero(np.frombuffer(raw, dtype=np.uint64) >> np.uint64(63))


def left_mapped(readers: dict[str, ShardReader], kind: str) -> int:
    total = 0
    for fname, r in readers.items():
        if r._map is None:
            continue
        pages = present_pages(r)
        if not len(pages):
            continue
        page = mmap.PAGESIZE
        total += len(pages) * page
        per: collections.Counter = collections.Counter()
        for name, t in r.header.tensors.items():
            a = (r.header.data_start + t.begin) // page
            b = -(-(r.header.data_start + t.end) // page)
            per[name] += int(((pages >= a) & (pages < b)).sum())
        top = ", ".join(f"{n} {k * page >> 10} KiB" for n, k in per.most_common(3) if k)
        print(f"  left mapped, {kind} {fname}: {len(pages) * page / 2**20:.1f} MiB ({top})")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, required=True, help="folder for the checkpoint (kept)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=3, help="layers; layer 0 is dense")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    tag = f"{a.layers}x{a.experts}x{a.hidden}x{a.inter}"
    src, out = a.ckpt / f"src-{tag}", a.ckpt / f"mega-moe-{tag}"
    if not (src / "model.safetensors.index.json").exists():
        make_sample_checkpoint(src, SampleSpec("deepseek", a.layers, a.experts, a.hidden, a.inter, 4, unequal_scale_2=True, fast=True, seed=1))
    if not (out / MANIFEST_NAME).exists():
        convert(src, out, ConvertOptions(target="mega-moe", workers=a.workers, max_shard_size=parse_size("500MB")))

    peak: dict = {"kib": 0, "by": collections.Counter()}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            per = rss_by_mapping()
            if sum(per.values()) > peak["kib"]:
                peak["kib"], peak["by"] = sum(per.values()), per
            time.sleep(0.02)

    left = [0]
    real_close = PieceChecker.close

    def close(self) -> None:
        left[0] = left_mapped(self.src_m, "source") + left_mapped(self.conv_m, "output")
        real_close(self)

    PieceChecker.close = close
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    ver.verify(src, out, device=a.device, workers=a.workers)
    took = time.perf_counter() - t0
    done.set()
    th.join()
    print(f"verify() {took:.2f} s; left mapped after the pass: {left[0] / 2**20:.1f} MiB")
    print(f"peak sampled RSS {peak['kib'] / 1024:.0f} MiB, the largest parts:")
    for name, kib in peak["by"].most_common(8):
        print(f"  {kib / 1024:8.1f} MiB  {name}")


if __name__ == "__main__":
    main()
