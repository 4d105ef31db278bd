#!/usr/bin/env python3
"""Check and time the NVFP4 Triton kernels on a CUDA GPU.

    python scripts/bench_kernels.py [--sweep] [--json PATH] [--shapes 128x1536x2048,...]

1. Correctness on the GPU first: dequant (linear/swizzled scales, scale_2 per expert/per row,
   bf16/fp32, padded/unpadded shapes) bit for bit against the torch reference, and compare-kernel
   statistics against statistics computed in torch. Exits non-zero on any mismatch.
2. Timing (triton.testing.do_bench, median): a device-to-device copy (the bandwidth ceiling), dequant
   with linear and with swizzled scales, the compare kernel on identical values in different layouts
   (linear + per-row scale_2 vs swizzled + per-expert scale_2: the tiles' fast path) and on values
   that differ everywhere (full arithmetic), and the torch reference for scale.

Effective bandwidth counts the floor: dequant 0.5 + 1/16 + out bytes per element, compare
2 * (0.5 + 1/16). Each kernel is also given as a fraction of the copy measured in the same run.
``--sweep`` times every (BPP, num_warps) pair and reports the one best over all shapes.
Runs from a plain checkout too (no install needed): ``kernels/`` is mapped to ``nvfp4_fuse.kernels``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from source_tree import use_source_tree  # noqa: E402

use_source_tree()

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from nvfp4_fuse.kernels import compare as cmp  # noqa: E402
from nvfp4_fuse.kernels import dequant as dq  # noqa: E402
from nvfp4_fuse.kernels import reference as ref  # noqa: E402
from nvfp4_fuse.swizzle import swizzle_128x4  # noqa: E402

SHAPES = ["128x1536x2048", "128x2048x768", "32x4096x7168"]
CHECK_SHAPES = [(3, 300, 1040), (4, 1536, 2048), (2, 256, 7168)]  # padded M and K/16; unpadded; wide
# (BPP, num_warps, NSUB): dequant has no NSUB (0); a compare program walks NSUB sub-tiles of BPP blocks
DEQ_CONFIGS = [(64, 4, 0), (128, 4, 0), (128, 8, 0), (256, 8, 0)]
CMP_CONFIGS = [(128, 4, 1), (128, 4, 2), (128, 4, 4), (128, 4, 8), (256, 8, 1), (256, 8, 4), (256, 8, 8),
               (64, 2, 4), (64, 2, 8), (64, 2, 16)]
DEQUANT_GOAL, COMPARE_GOAL = 0.85, 0.80


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------------------------- data
def swizzle_gpu(scales: torch.Tensor) -> torch.Tensor:
    """[E, M, K16] -> [E, Mp, Kp] 128x4-swizzled per expert, on the tensor's device (swizzle_128x4's ops)."""
    e, m, k = scales.shape
    mp, kp = (m + 127) // 128 * 128, (k + 3) // 4 * 4
    pad = torch.zeros((e, mp, kp), dtype=torch.uint8, device=scales.device)
    pad[:, :m, :k] = scales.view(torch.uint8)
    return pad.reshape(e, mp // 128, 4, 32, kp // 4, 4).permute(0, 1, 4, 3, 2, 5).reshape(e, mp, kp).contiguous()


def rand_encoding(e, m, k, dev, per_row=False, gen=None):
    packed = torch.randint(0, 256, (e, m, k // 2), dtype=torch.uint8, device=dev, generator=gen)
    scales = torch.randint(0, 0x7F, (e, m, k // 16), dtype=torch.uint8, device=dev, generator=gen)
    shape = (e, m) if per_row else (e,)
    s2 = torch.exp2(torch.empty(shape, device=dev).uniform_(-24, 4, generator=gen)) * (
        1 + torch.rand(shape, device=dev, generator=gen))
    return packed, scales, s2.float()


def bits(x):
    return x.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32)


# ----------------------------------------------------------------------------------------- checks
def check_correctness(dev, deq_configs, cmp_configs) -> list[str]:
    seed = int.from_bytes(os.urandom(6), "little")
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    log(f"correctness (seed {seed})")
    fails = []

    def fail(msg):
        fails.append(msg)
        log("  FAIL", msg)

    # the device-side swizzle and torch reference against the CPU ones
    p, s, s2 = rand_encoding(3, 300, 1040, dev, per_row=True, gen=gen)
    if not torch.equal(swizzle_gpu(s).cpu(), torch.stack([swizzle_128x4(x) for x in s.cpu()])):
        fail("swizzle_gpu != swizzle_128x4")
    r_gpu = ref.dequantize_nvfp4_ref(p, s, s2, out_dtype=torch.float32).cpu()
    r_cpu = ref.dequantize_nvfp4_ref(p.cpu(), s.cpu(), s2.cpu(), out_dtype=torch.float32)
    if not torch.equal(bits(r_gpu), bits(r_cpu)):
        fail("GPU torch reference != CPU nvfp4.dequantize")

    # Every variant with the default config on three shapes (padded M and K/16; unpadded; wide), and
    # every swept config on the variants the timing runs use.
    shapes = CHECK_SHAPES
    default = deq_configs[:1]
    n = 0
    for si, (e, m, k) in enumerate(shapes):
        for per_row in (False, True):
            p, s, s2 = rand_encoding(e, m, k, dev, per_row=per_row, gen=gen)
            sw = swizzle_gpu(s)
            for swz in (False, True):
                sc = sw if swz else s
                for od in (torch.bfloat16, torch.float32):
                    want = ref.dequantize_nvfp4_ref(p, sc, s2, swizzled=swz, out_dtype=od)
                    timed = si == 1 and not per_row and od == torch.bfloat16
                    for bpp, w, _ in (deq_configs if timed else default):
                        got = dq.dequantize_nvfp4(p, sc, s2, swizzled=swz, out_dtype=od, bpp=bpp, num_warps=w)
                        n += 1
                        if not torch.equal(bits(got), bits(want)):
                            fail(f"dequant {e}x{m}x{k} swz={swz} per_row={per_row} {od} bpp={bpp} w={w}: "
                                 f"{int((bits(got) != bits(want)).sum())} differ")
            got = dq.dequantize_nvfp4(p, s, s2, rows=(7, m - 5))
            n += 1
            if not torch.equal(bits(got), bits(ref.dequantize_nvfp4_ref(p, s, s2, rows=(7, m - 5)))):
                fail(f"dequant rows {e}x{m}x{k}")
    log(f"  dequant: {n} runs checked bit for bit")

    n = 0
    default = cmp_configs[:1]
    for si, (e, m, k) in enumerate(shapes):
        pa, sa, s2a = rand_encoding(e, m, k, dev, per_row=True, gen=gen)
        pb, sb, s2b = rand_encoding(e, m, k, dev, gen=gen)
        swa, swb = swizzle_gpu(sa), swizzle_gpu(sb)
        s2_rows = s2b[:, None].expand(e, m).contiguous()
        pb[0], sb[0] = pa[0], sa[0]
        pb[1, : m // 2] = pa[1, : m // 2]
        swb = swizzle_gpu(sb)
        want = ref.compare_nvfp4_ref(pa, sa, s2a, pb, swb, s2b, b_swizzled=True)
        for bpp, w, ns in (cmp_configs if si == 1 else default):
            for fast in ((True, False) if (bpp, w, ns) == default[0] else (True,)):
                # identical values, different layouts
                r = cmp.compare_nvfp4(pa, sa, s2_rows, pa.clone(), swa, s2b, b_swizzled=True,
                                      fast_path=fast, bpp=bpp, nsub=ns, num_warps=w)
                n += 1
                if int(r.n_diff.sum()) or float(r.max_abs.max()) or bool(r.nonfinite.any()):
                    fail(f"compare identical {e}x{m}x{k} bpp={bpp} w={w} nsub={ns} fast={fast}")
                # differing values: exact stats with exact_rel, and the fast division within 2 ulp
                for exact in ((False, True) if (bpp, w, ns) == default[0] else (False,)):
                    r = cmp.compare_nvfp4(pa, sa, s2a, pb, swb, s2b, b_swizzled=True,
                                          fast_path=fast, exact_rel=exact, bpp=bpp, nsub=ns, num_warps=w)
                    n += 1
                    ok = (torch.equal(r.max_abs, want.max_abs) and torch.equal(r.n_diff, want.n_diff)
                          and torch.equal(r.nonfinite, want.nonfinite))
                    rel_ok = (torch.equal(r.max_rel, want.max_rel) if exact
                              else bool(torch.allclose(r.max_rel, want.max_rel, rtol=3e-7, atol=0)))
                    if not (ok and rel_ok):
                        fail(f"compare stats {e}x{m}x{k} bpp={bpp} w={w} nsub={ns} fast={fast} exact_rel={exact}: "
                             f"abs {r.max_abs.tolist()[:3]} vs {want.max_abs.tolist()[:3]}, "
                             f"rel {r.max_rel.tolist()[:3]} vs {want.max_rel.tolist()[:3]}, "
                             f"n {r.n_diff.tolist()[:3]} vs {want.n_diff.tolist()[:3]}")
        # one changed nibble is found, and located
        pc = pa.clone()
        ex, row, byte = e - 1, m // 3, k // 5
        pc[ex, row, byte] ^= 0x10
        r = cmp.compare_nvfp4(pa, sa, s2a, pc, swa, s2a, b_swizzled=True)
        d = cmp.first_difference(ex, pa, sa, s2a, pc, swa, s2a, b_swizzled=True)
        n += 1
        if r.n_diff.tolist() != [0] * (e - 1) + [1] or d is None or (d.row, d.col) != (row, 2 * byte + 1):
            fail(f"compare one nibble {e}x{m}x{k}: n_diff {r.n_diff.tolist()} at {d}")
    log(f"  compare: {n} runs checked against torch statistics")
    return fails


# ----------------------------------------------------------------------------------------- timing
def bench(fn, rep=200):
    return do_bench(fn, warmup=50, rep=rep, return_mode="median")  # ms


def time_copy(dev, nbytes=2 << 30):
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3), ms


def time_shape(dev, shape, deq_configs, cmp_configs, copy_bw, with_torch, results):
    e, m, k = map(int, shape.split("x"))
    n = e * m * k
    gen = torch.Generator(device=dev)
    gen.manual_seed(int.from_bytes(os.urandom(6), "little"))
    pa, sa, s2 = rand_encoding(e, m, k, dev, gen=gen)
    s2_rows = s2[:, None].expand(e, m).contiguous()  # A as a stacked [gate; up] would carry: per row
    sw = swizzle_gpu(sa)
    pb_same = pa.clone()  # a separate buffer, so both sides are really read
    pb, sb, s2b = rand_encoding(e, m, k, dev, gen=gen)
    swb = swizzle_gpu(sb)
    deq_bytes = n * (0.5 + 1 / 16 + 2)
    cmp_bytes = n * 2 * (0.5 + 1 / 16)

    cases = {
        "dequant linear -> bf16": (deq_bytes, deq_configs, lambda c: lambda: dq.dequantize_nvfp4(
            pa, sa, s2, out_dtype=torch.bfloat16, check=False, bpp=c[0], num_warps=c[1])),
        "dequant swizzled -> bf16": (deq_bytes, deq_configs, lambda c: lambda: dq.dequantize_nvfp4(
            pa, sw, s2, swizzled=True, out_dtype=torch.bfloat16, check=False, bpp=c[0], num_warps=c[1])),
        "compare, identical values (fast path)": (cmp_bytes, cmp_configs, lambda c: lambda: cmp.compare_tiles(
            pa, sa, s2_rows, pb_same, sw, s2, b_swizzled=True, check=False, bpp=c[0], num_warps=c[1], nsub=c[2])),
        "compare, all values differ (full path)": (cmp_bytes, cmp_configs, lambda c: lambda: cmp.compare_tiles(
            pa, sa, s2_rows, pb, swb, s2b, b_swizzled=True, check=False, bpp=c[0], num_warps=c[1], nsub=c[2])),
    }
    for name, (nbytes, configs, make) in cases.items():
        for c in configs:
            try:
                ms = bench(make(c))
            except Exception as exc:  # a config that fails to compile or launch is reported, not fatal
                log(f"  {shape} {name} cfg={c}: ERROR {type(exc).__name__}: {str(exc)[:200]}")
                continue
            bw = nbytes / (ms * 1e-3)
            results.append(dict(shape=shape, kernel=name, cfg=list(c), ms=ms, bytes=nbytes,
                                tbps=bw / 1e12, frac_copy=bw / copy_bw))
            log(f"  {shape:>14} {name:<40} {str(c):<13}  {ms:8.4f} ms  {bw / 1e12:5.2f} TB/s  "
                f"{bw / copy_bw:6.1%} of copy")
    # extra single-config rows: fp32 output, wrapper overhead, exact division, torch reference
    extra = {}
    try:
        extra["dequant linear -> fp32"] = (n * (0.5 + 1 / 16 + 4), bench(lambda: dq.dequantize_nvfp4(
            pa, sa, s2, out_dtype=torch.float32, check=False)))
    except torch.cuda.OutOfMemoryError:
        pass
    torch.cuda.empty_cache()
    extra["compare_nvfp4() wrapper, all differ (+reductions, check)"] = (cmp_bytes, bench(
        lambda: cmp.compare_nvfp4(pa, sa, s2_rows, pb, swb, s2b, b_swizzled=True)))
    extra["compare, all differ, exact_rel"] = (cmp_bytes, bench(lambda: cmp.compare_tiles(
        pa, sa, s2_rows, pb, swb, s2b, b_swizzled=True, exact_rel=True, check=False)))
    if with_torch:
        try:
            extra["torch reference dequant -> bf16"] = (deq_bytes, bench(
                lambda: ref.dequantize_nvfp4_ref(pa, sa, s2), rep=300))
        except torch.cuda.OutOfMemoryError:
            log(f"  {shape}: torch reference out of memory")
        torch.cuda.empty_cache()
    for name, (nbytes, ms) in extra.items():
        bw = nbytes / (ms * 1e-3)
        results.append(dict(shape=shape, kernel=name, cfg=None, ms=ms, bytes=nbytes,
                            tbps=bw / 1e12, frac_copy=bw / copy_bw, extra=True))
        log(f"  {shape:>14} {name:<40} default   {ms:8.4f} ms  {bw / 1e12:5.2f} TB/s  {bw / copy_bw:6.1%} of copy")
    del pa, sa, s2, s2_rows, sw, pb_same, pb, sb, s2b, swb
    torch.cuda.empty_cache()


def best_configs(results):
    """Per kernel, the config with the best geometric-mean time ratio over shapes."""
    best = {}
    kernels = sorted({r["kernel"] for r in results if not r.get("extra")})
    for kname in kernels:
        rows = [r for r in results if r["kernel"] == kname and not r.get("extra")]
        shapes = sorted({r["shape"] for r in rows})
        fastest = {s: min(r["ms"] for r in rows if r["shape"] == s) for s in shapes}
        scores = {}
        for cfg in sorted({tuple(r["cfg"]) for r in rows}):
            sel = [r for r in rows if tuple(r["cfg"]) == cfg]
            if len(sel) == len(shapes):
                scores[cfg] = math.exp(sum(math.log(r["ms"] / fastest[r["shape"]]) for r in sel) / len(sel))
        if scores:
            best[kname] = min(scores, key=scores.get)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated ExMxK")
    ap.add_argument("--sweep", action="store_true", help="time every config in DEQ_CONFIGS / CMP_CONFIGS")
    ap.add_argument("--torch-max-elements", type=float, default=5e8, help="skip the torch reference above this")
    ap.add_argument("--json", default=None, help="write all numbers here")
    ap.add_argument("--cmp-configs", default=None,
                    help="compare configs to sweep instead of CMP_CONFIGS, as 'BPP,warps,NSUB;...'")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    env = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
               triton=triton.__version__, cuda=torch.version.cuda, command=" ".join(sys.argv))
    log(json.dumps(env))
    deq_default = (dq.DEQUANT_BPP, dq.DEQUANT_WARPS, 0)
    cmp_default = (cmp.COMPARE_BPP, cmp.COMPARE_WARPS, cmp.COMPARE_NSUB)
    # the default first: the full correctness matrix runs with it
    deq_configs = [deq_default] + ([c for c in DEQ_CONFIGS if c != deq_default] if args.sweep else [])
    sweep_cmp = CMP_CONFIGS
    if args.cmp_configs:
        sweep_cmp = [tuple(int(x) for x in c.split(",")) for c in args.cmp_configs.split(";")]
    cmp_configs = [cmp_default] + ([c for c in sweep_cmp if c != cmp_default] if args.sweep else [])

    t0 = time.time()
    fails = check_correctness(dev, deq_configs, cmp_configs)
    log(f"correctness: {'FAILED' if fails else 'ok'} ({time.time() - t0:.0f} s)")
    out = dict(env=env, correctness_failures=fails, results=[])
    if fails:
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        sys.exit(1)

    copy_bw, copy_ms = time_copy(dev)
    out["copy_tbps"] = copy_bw / 1e12
    log(f"device copy: {copy_bw / 1e12:.3f} TB/s (2 GiB read + 2 GiB written in {copy_ms:.3f} ms)")
    for shape in args.shapes.split(","):
        e, m, k = map(int, shape.split("x"))
        time_shape(dev, shape, deq_configs, cmp_configs, copy_bw, e * m * k <= args.torch_max_elements,
                   out["results"])
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
    copy_check, _ = time_copy(dev)
    out["copy_tbps_after"] = copy_check / 1e12
    best = best_configs(out["results"])
    out["best"] = {k: list(v) for k, v in best.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))

    log(f"\ncopy {copy_bw / 1e12:.3f} TB/s before, {copy_check / 1e12:.3f} TB/s after; "
        f"{env['device']}, torch {env['torch']}, triton {env['triton']}")
    log("| shape (E x M x K) | kernel | BPP, warps, NSUB | time (ms) | effective TB/s | vs copy |")
    log("| --- | --- | --- | --- | --- | --- |")
    for r in out["results"]:
        chosen = best.get(r["kernel"])
        if r.get("extra") or chosen is None or tuple(r["cfg"]) == tuple(chosen):
            cfg = "default" if r.get("extra") else ", ".join(map(str, r["cfg"]))
            log(f"| {r['shape']} | {r['kernel']} | {cfg} | {r['ms']:.4f} | {r['tbps']:.2f} | {r['frac_copy']:.1%} |")
    log(f"best configs: {best}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
