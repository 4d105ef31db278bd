"""How many HTTP range requests ``inspect`` needs for the scalars of a DeepSeek-V4-Pro-sized checkpoint.

Lays out, header only (no file is written), the routed experts of 61 layers x 384 experts (H 7168,
I 3072, NVFP4: U8 values, E4M3 block scales, F32 weight_scale_2 and input_scale) over 64 shards in two
tensor orders: safetensors' own ``save_file`` order (dtype, then name: a shard's F32 scalars end up
together) and a writer that puts each expert's tensors one after another. Then it groups the scalars'
byte ranges as ``inspect`` does (:func:`nvfp4_fuse.hub.ranges.coalesce`) and prints the request
counts (plus one length-prefix request per shard) and their ratio to the scalar count.

    python scripts/inspect_range_requests.py [--layers 61] [--experts 384] [--shards 64]
"""

from __future__ import annotations

import argparse

from nvfp4_fuse.hub.ranges import coalesce

# safetensors' Dtype enum order (save_file sorts by it, descending, then by name)
DTYPE_RANK = {"U8": 4, "F8_E4M3": 7, "F32": 15}
SIZE = {"U8": 1, "F8_E4M3": 1, "F32": 4}


def tensors(layers: int, experts: int, h: int, i: int) -> list[tuple[str, str, int]]:
    out = []
    for ly in range(layers):
        for e in range(experts):
            for proj, rows, cols in (("w1", i, h), ("w3", i, h), ("w2", h, i)):
                n = f"layers.{ly}.ffn.experts.{e}.{proj}"
                out += [(f"{n}.weight", "U8", rows * cols // 2), (f"{n}.scale", "F8_E4M3", rows * cols // 16)]
                out += [(f"{n}.weight_scale_2", "F32", 4), (f"{n}.input_scale", "F32", 4)]
    return out


def requests(shards: list[list[tuple[str, str, int]]], sort: bool) -> int:
    total = 0
    for shard in shards:
        order = sorted(shard, key=lambda t: (-DTYPE_RANK[t[1]], t[0])) if sort else shard
        pos, ranges = 0, []
        for name, _dtype, nbytes in order:
            if name.endswith(("weight_scale_2", "input_scale")):
                ranges.append((pos, pos + nbytes))
            pos += nbytes
        total += 1 + len(coalesce(ranges))  # the length prefix, then the scalars
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=61)
    ap.add_argument("--experts", type=int, default=384)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--intermediate", type=int, default=3072)
    ap.add_argument("--shards", type=int, default=64)
    a = ap.parse_args()
    ts = tensors(a.layers, a.experts, a.hidden, a.intermediate)
    per = sum(t[2] for t in ts) / a.shards
    shards: list[list[tuple[str, str, int]]] = [[]]
    size = 0
    for t in ts:
        if size >= per and len(shards) < a.shards:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t[2]
    n = sum(t[0].endswith(("weight_scale_2", "input_scale")) for t in ts)
    print(f"{n} scalars in {len(shards)} shards ({sum(t[2] for t in ts) / 1e9:.0f} GB of expert tensors)")
    for label, sort in (("safetensors save_file order", True), ("expert-by-expert writer order", False)):
        r = requests(shards, sort)
        print(f"{label}: {r} range requests, {n / r:.0f} scalars per request")


if __name__ == "__main__":
    main()
