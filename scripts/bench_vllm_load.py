#!/usr/bin/env python3
"""What converting buys at vLLM start-up: ``load_weights`` of a per-expert and of the fused (mega-moe)
NVFP4 DeepSeek-V4 checkpoint, through the plugin, in the CPU harness of ``tests/vllm``.

Writes a per-expert checkpoint in NVIDIA's recipe at DeepSeek-V4-Flash's routed-expert shapes
(hidden 4096, intermediate 2048, 256 experts; ``--layers`` MoE layers, the rest of the model tiny, no
MTP layer), converts it with ``nvfp4-fuse convert`` (default target, mega-moe), then for each backend,
checkpoint and EP size loads one rank's experts in a fresh process: vLLM's model built as
``vllm serve`` builds it (EngineArgs, the registry with the plugin, ``initialize_model``), the
checkpoint's pages dropped from the page cache (``posix_fadvise(DONTNEED)``), then
``DefaultModelLoader.load_weights`` timed (safetensors' iterator feeding ``model.load_weights``; on
the per-expert backends ``process_weights_after_loading`` is CUDA-only and is not run, on MegaMoE
it is already part of the load: vLLM packs each expert as its weight_loader receives it). The bytes
read are the process's ``read_bytes`` from ``/proc/self/io`` (what it made the kernel fetch from
the disk, readahead included). At EP > 1 the per-expert checkpoint is also loaded as with
``--enable-ep-weight-filter`` (off by default, and off whenever EPLB is on): vLLM then skips the
other ranks' expert ``.weight`` tensors before reading them (not their scales).

    .venv-vllm-0.33/bin/python scripts/bench_vllm_load.py DIR [--layers 2] [--ep 1 8] [--repeat 2]

Needs about 2 x 3.7 GB of disk a layer in DIR (kept for reruns; delete it afterwards) and, at EP 1,
about 3.3 GB of memory a layer for the parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "vllm")]
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

BACKENDS = ("deep_gemm_mega_moe", "flashinfer_cutedsl")
EXPERTS_PER_SHARD = 32


def write_per_expert(folder: Path, layers: int, experts: int, hidden: int, inter: int) -> None:
    """NVIDIA's recipe (tests/vllm/checkpoints.py's config and names), written a shard of
    ``EXPERTS_PER_SHARD`` experts at a time so memory stays at one shard."""
    import torch
    from checkpoints import Dims, _config, _recipe_tensors, source_content
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    d = Dims(hidden=hidden, inter=inter, experts=experts, layers=layers)
    cfg = _config("nvidia", d)
    cfg["num_nextn_predict_layers"] = 0
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    qc = cfg["quantization_config"]
    keys = ("quant_algo", "kv_cache_quant_algo", "group_size", "quantized_layers", "exclude_modules")
    (folder / "hf_quant_config.json").write_text(
        json.dumps({"producer": qc["producer"], "quantization": {k: qc[k] for k in keys}}, indent=2))
    # Everything but the routed experts, from the tests' generator at a tiny expert count.
    small = source_content(Dims(hidden=hidden, inter=inter, experts=1, layers=layers), seed=0)
    rest = {n: t for n, t in _recipe_tensors(small, "nvidia").items() if ".experts." not in n and not n.startswith("mtp.")}
    rest |= {f"layers.{n}.ffn.gate.weight": torch.randn(experts, hidden).to(torch.bfloat16) for n in range(layers)}
    rest |= {f"layers.{n}.ffn.gate.tid2eid": torch.randint(0, experts, (d.vocab, d.top_k), dtype=torch.int32)
             for n in range(d.hash_layers)}
    rest |= {f"layers.{n}.ffn.gate.bias": torch.randn(experts) for n in range(d.hash_layers, layers)}
    files = {"model-rest.safetensors": rest}
    weight_map = {n: "model-rest.safetensors" for n in rest}
    save_file(rest, folder / "model-rest.safetensors", metadata={"format": "pt"})
    g = torch.Generator().manual_seed(1)
    for n in range(layers):
        for e0 in range(0, experts, EXPERTS_PER_SHARD):
            part = {}
            for x in range(e0, min(e0 + EXPERTS_PER_SHARD, experts)):
                s2, inp = torch.rand((), generator=g) * 1e-3 + 1e-4, torch.rand((), generator=g) * 0.1 + 0.01
                for w, (rows, cols) in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
                    p = f"layers.{n}.ffn.experts.{x}.{w}"
                    part[f"{p}.weight"] = torch.randint(0, 256, (rows, cols // 2), generator=g, dtype=torch.uint8)
                    part[f"{p}.weight_scale"] = torch.randint(1, 0x7F, (rows, cols // 16), generator=g,
                                                              dtype=torch.uint8).view(torch.float8_e4m3fn)
                    part[f"{p}.weight_scale_2"] = s2.clone() if w != "w2" else torch.rand((), generator=g) * 1e-3 + 1e-4
                    part[f"{p}.input_scale"] = inp.clone() if w != "w2" else torch.rand((), generator=g) * 0.1 + 0.01
            fname = f"model-layer{n}-experts{e0:03d}.safetensors"
            save_file(part, folder / fname, metadata={"format": "pt"})
            weight_map |= {k: fname for k in part}
            files[fname] = None
            del part
    total = sum((folder / f).stat().st_size for f in files)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def drop_page_cache(folder: Path) -> None:
    for f in folder.iterdir():
        if f.suffix == ".safetensors":
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise RuntimeError("no read_bytes in /proc/self/io")


def one(folder: Path, backend: str, ep_size: int, rank: int, ep_filter: bool) -> dict:
    """One load in this process: build rank ``rank`` of ``ep_size``, drop the cache, time the load.
    ``ep_filter``: as ``--enable-ep-weight-filter`` does on that rank (the harness's parallel config
    is one process, so the loader's EP rank is set here)."""
    from unittest import mock

    import harness
    import vllm.plugins
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.ep_weight_filter import compute_local_expert_ids
    from vllm.platforms import current_platform

    vllm.plugins.plugins_loaded = False
    with mock.patch.object(type(current_platform), "is_cuda", lambda self: True):
        vllm.plugins.load_general_plugins()
    cfg = harness.engine_config(folder, backend=backend)
    t0 = time.perf_counter()
    model = harness.build(cfg, ep_size=ep_size, ep_rank=rank)
    built = time.perf_counter() - t0
    assert type(model).__module__ == "nvfp4_fuse.vllm.deepseek_v4", type(model)
    drop_page_cache(folder)

    def ep_weight_filter(self, model_config):
        self.local_expert_ids = compute_local_expert_ids(model_config.get_num_experts(), ep_size, rank) if ep_filter else None

    r0 = read_bytes()
    t0 = time.perf_counter()
    with mock.patch.object(DefaultModelLoader, "_init_ep_weight_filter", ep_weight_filter):
        harness.load(model, cfg)
    seconds = time.perf_counter() - t0
    return {"load_s": seconds, "read_bytes": read_bytes() - r0, "build_s": built}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--ep", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS))
    ap.add_argument("--repeat", type=int, default=2, help="loads of each case (median reported)")
    ap.add_argument("--one", nargs=5, metavar=("FOLDER", "BACKEND", "EP", "RANK", "FILTER"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(Path(a.one[0]), a.one[1], int(a.one[2]), int(a.one[3]), a.one[4] == "1")), flush=True)
        return

    per_expert, fused = a.dir / "per-expert", a.dir / "fused-mega-moe"
    if not (per_expert / "model.safetensors.index.json").exists():
        print(f"writing {per_expert} ...", flush=True)
        write_per_expert(per_expert, a.layers, a.experts, a.hidden, a.inter)
    if not (fused / "nvfp4-fuse-manifest.json").exists():
        print(f"converting to {fused} ...", flush=True)
        from nvfp4_fuse.convert import ConvertOptions, convert

        convert(per_expert, fused, ConvertOptions())
    cfg = json.loads((per_expert / "config.json").read_text())
    layers, experts = cfg["num_hidden_layers"], cfg["n_routed_experts"]
    expert_bytes = {k: sum(f.stat().st_size for f in d.glob("*.safetensors")) for k, d in
                    (("per-expert", per_expert), ("fused", fused))}
    print(f"checkpoints: {layers} MoE layers x {experts} experts, hidden {cfg['hidden_size']}, intermediate "
          f"{cfg['moe_intermediate_size']}; per-expert {expert_bytes['per-expert'] / 1e9:.2f} GB, "
          f"fused {expert_bytes['fused'] / 1e9:.2f} GB (all files)\n", flush=True)

    rows = []
    for backend in a.backends:
        for ep in a.ep:
            res = {}
            kinds = [("per-expert", per_expert, "0"), ("fused", fused, "0")]
            if ep > 1:
                kinds.append(("per-expert, EP filter", per_expert, "1"))
            for kind, folder, ep_filter in kinds:
                runs = []
                for _ in range(a.repeat):
                    out = subprocess.run([sys.executable, __file__, "x", "--one", str(folder), backend, str(ep), "0", ep_filter],
                                         capture_output=True, text=True, check=False)
                    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                    if out.returncode or not line:
                        sys.exit(f"{backend} {kind} EP {ep}: failed\n{out.stderr[-4000:]}")
                    runs.append(json.loads(line[0][7:]))
                res[kind] = {"load_s": statistics.median(r["load_s"] for r in runs),
                             "all_s": [round(r["load_s"], 2) for r in runs],
                             "read_bytes": statistics.median(r["read_bytes"] for r in runs)}
            rows.append((backend, ep, res))
            pe, fu = res["per-expert"], res["fused"]
            print(f"{backend:20s} EP {ep} rank 0: per-expert {pe['load_s']:6.2f} s ({pe['load_s'] / layers:5.2f} s/layer, "
                  f"{pe['read_bytes'] / 1e9:5.2f} GB read, runs {pe['all_s']})  fused {fu['load_s']:6.2f} s "
                  f"({fu['load_s'] / layers:5.2f} s/layer, {fu['read_bytes'] / 1e9:5.2f} GB read, runs {fu['all_s']})  "
                  f"per-expert/fused {pe['load_s'] / fu['load_s']:.2f}x", flush=True)
            if "per-expert, EP filter" in res:
                pf = res["per-expert, EP filter"]
                print(f"{'':20s}      with --enable-ep-weight-filter: per-expert {pf['load_s']:6.2f} s "
                      f"({pf['read_bytes'] / 1e9:5.2f} GB read, runs {pf['all_s']}), per-expert/fused "
                      f"{pf['load_s'] / fu['load_s']:.2f}x", flush=True)
    print("\n| backend | EP | checkpoint | rank 0 load_weights | per-expert / this | read by the rank |")
    print("| --- | --- | --- | --- | --- | --- |")
    for backend, ep, res in rows:
        for kind, r in res.items():
            print(f"| {backend} | {ep} | {kind} | {r['load_s'] / layers:.2f} s/layer | "
                  f"{res['per-expert']['load_s'] / r['load_s']:.2f}x | {r['read_bytes'] / layers / 1e9:.2f} GB/layer |")


if __name__ == "__main__":
    main()
