"""Independent references for the converter's output, written from the formats' definitions (the
swizzle offset formula, vLLM's row formulas for the MegaMoE layout, RNE to E4M3 by table search),
sharing no code with the converter."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from helpers import load_all

_POS_E4M3 = torch.arange(0, 0x7F, dtype=torch.uint8)  # 0x00..0x7E: zero and every positive finite value
_POS_VALS = _POS_E4M3.view(torch.float8_e4m3fn).to(torch.float64)


def ref_e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Nearest E4M3 value by table search, ties to the even code; zero stays zero, else clamp to [2^-9, 448]."""
    flat = x.reshape(-1).to(torch.float64)
    out = torch.zeros(flat.shape, dtype=torch.uint8)
    for i, v in enumerate(flat.tolist()):
        if v == 0:
            continue
        v = min(max(v, 2.0**-9), 448.0)
        d = (_POS_VALS - v).abs()
        best = d.min()
        cands = [int(c) for c in _POS_E4M3[d == best]]
        even = [c for c in cands if c % 2 == 0]
        out[i] = (even or cands)[0]
    return out.reshape(x.shape)


def ref_swizzle(s: torch.Tensor) -> torch.Tensor:
    """The 128x4 swizzle of one expert by its offset formula: scale (m, k) goes to byte
    (m//128)*(Kp/4)*512 + (k//4)*512 + (m%32)*16 + ((m%128)//32)*4 + k%4 of the zero-padded block."""
    m_rows, k16 = s.shape
    mp = -(-m_rows // 128) * 128
    kp = -(-k16 // 4) * 4
    m = torch.arange(m_rows)[:, None]
    k = torch.arange(k16)[None, :]
    off = (m // 128) * (kp // 4) * 512 + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4)
    buf = torch.zeros(mp * kp, dtype=torch.uint8)
    buf[off.reshape(-1)] = s.view(torch.uint8).reshape(-1)
    return buf.reshape(mp, kp)


PROJ = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}


def src_part(src: dict[str, torch.Tensor], prefix: str, e: int, role: str, fld: str) -> torch.Tensor:
    for proj in PROJ[role]:
        base = f"{prefix}.{e}.{proj}"
        if fld == "weight":
            for n in (f"{base}.weight", f"{base}.weight_packed"):
                if n in src:
                    return src[n]
        elif fld == "weight_scale":
            if f"{base}.weight_scale" in src:
                return src[f"{base}.weight_scale"]
            if f"{base}.scale" in src and src[f"{base}.scale"].dtype == torch.float8_e4m3fn:  # canada-quant
                return src[f"{base}.scale"]
        else:
            if f"{base}.{fld}" in src:
                return src[f"{base}.{fld}"].reshape(())
            ct = {"weight_scale_2": "weight_global_scale", "input_scale": "input_global_scale"}[fld]
            if f"{base}.{ct}" in src:
                return torch.reciprocal(src[f"{base}.{ct}"].reshape(()))
    raise KeyError(f"{prefix}.{e} {role} {fld}")


def expert_prefixes(src: dict[str, torch.Tensor], *, mxfp4: bool = False) -> dict[str, int]:
    """NVFP4 expert groups (or, with ``mxfp4``, the MXFP4 ones: E8M0 scales) -> number of experts."""
    out: dict[str, int] = {}
    for n in src:
        m = re.match(r"^(.*\.experts)\.(\d+)\.", n)
        if m:
            out[m[1]] = max(out.get(m[1], 0), int(m[2]) + 1)
    is_mx = {p for p in out if any(n.startswith(p + ".") and t.dtype == torch.float8_e8m0fnu for n, t in src.items())}
    return {p: n for p, n in out.items() if (p in is_mx) == mxfp4}


def ref_mega_moe_rows(rows: int, half: int) -> list[int]:
    """Where row r of gate (half 0) or up (half 1) lands in w13: (r // 8) * 16 + 8 * half + r % 8."""
    return [(r // 8) * 16 + 8 * half + r % 8 for r in range(rows)]


def ref_mega_moe_scales(scales: list[torch.Tensor]) -> torch.Tensor:
    """vLLM's kernel-layout scales of one expert, stored MN-major: int32 [K/64, N].

    ``scales`` is [gate, up] (w13) or [down] (w2), E4M3 [rows, K/16] each. Four consecutive K-groups
    make one little-endian int32 word (byte j = group 4p+j). Rows go where vLLM's loader puts them:
    w13 row 64b + 16j + 8q + m of half h -> 128b + 64q + 32h + 4m + j; w2 row 128b + 32j + i ->
    128b + 4i + j.
    """
    rows, k16 = scales[0].shape
    n = rows * len(scales)
    out = torch.zeros(k16 // 4, n, dtype=torch.int64)
    for h, sc in enumerate(scales):
        b8 = sc.view(torch.uint8).to(torch.int64)
        words = b8[:, 0::4] | (b8[:, 1::4] << 8) | (b8[:, 2::4] << 16) | (b8[:, 3::4] << 24)  # [rows, K/64]
        for r in range(rows):
            if len(scales) == 2:
                b, j, q, m = r // 64, (r % 64) // 16, (r % 16) // 8, r % 8
                dst = 128 * b + 64 * q + 32 * h + 4 * m + j
            else:
                b, j, i = r // 128, (r % 128) // 32, r % 32
                dst = 128 * b + 4 * i + j
            out[:, dst] = words[r]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def ref_fused(src: dict[str, torch.Tensor], prefix: str, n: int, *, layout: str, order: str = "gate-up") -> dict[str, torch.Tensor]:
    w13, s13, s2_13, in13, w2, s2w, s2_2, in2 = [], [], [], [], [], [], [], []
    for e in range(n):
        g, u, d = (src_part(src, prefix, e, r, "weight") for r in ("gate", "up", "down"))
        gs, us, ds = (src_part(src, prefix, e, r, "weight_scale") for r in ("gate", "up", "down"))
        sg, su = float(src_part(src, prefix, e, "gate", "weight_scale_2")), float(src_part(src, prefix, e, "up", "weight_scale_2"))
        c = max(sg, su)
        if sg != c:
            gs = ref_e4m3_round(gs.to(torch.float64) * float(torch.tensor(sg, dtype=torch.float32) / torch.tensor(c, dtype=torch.float32))).view(torch.float8_e4m3fn)
        if su != c:
            us = ref_e4m3_round(us.to(torch.float64) * float(torch.tensor(su, dtype=torch.float32) / torch.tensor(c, dtype=torch.float32))).view(torch.float8_e4m3fn)
        if layout == "mega-moe":
            w = torch.empty((2 * g.shape[0], g.shape[1]), dtype=torch.uint8)
            w[ref_mega_moe_rows(g.shape[0], 0)] = g.view(torch.uint8)
            w[ref_mega_moe_rows(u.shape[0], 1)] = u.view(torch.uint8)
            w13.append(w.view(torch.int8))
            s13.append(ref_mega_moe_scales([gs, us]))
        else:
            first, second = ((g, gs), (u, us)) if order == "gate-up" else ((u, us), (g, gs))
            w13.append(torch.cat([first[0], second[0]]).view(torch.uint8))
            sc = torch.cat([first[1], second[1]])
            s13.append(ref_swizzle(sc) if layout == "swizzled" else sc.view(torch.uint8))
        s2_13.append(c)
        in13.append(max(float(src_part(src, prefix, e, "gate", "input_scale")), float(src_part(src, prefix, e, "up", "input_scale"))))
        w2.append(d.view(torch.int8) if layout == "mega-moe" else d.view(torch.uint8))
        s2w.append(
            ref_mega_moe_scales([ds]) if layout == "mega-moe" else ref_swizzle(ds) if layout == "swizzled" else ds.view(torch.uint8)
        )
        s2_2.append(float(src_part(src, prefix, e, "down", "weight_scale_2")))
        in2.append(float(src_part(src, prefix, e, "down", "input_scale")))
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    return {
        "w13_weight": torch.stack(w13),
        "w13_weight_scale": torch.stack(s13),
        "w13_weight_scale_2": f32(s2_13),
        "w13_input_scale": f32(in13),
        "w2_weight": torch.stack(w2),
        "w2_weight_scale": torch.stack(s2w),
        "w2_weight_scale_2": f32(s2_2),
        "w2_input_scale": f32(in2),
    }


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def check_output_against_reference(src_dir: Path, out_dir: Path, *, layout: str, order: str = "gate-up") -> None:
    src = load_all(src_dir)
    out = load_all(out_dir)
    prefixes = expert_prefixes(src)
    assert prefixes
    # every non-expert tensor byte-identical, nothing else added or lost
    expected_names = {n for n in src if not any(n.startswith(p + ".") and re.match(r"\d+\.", n[len(p) + 1 :]) for p in prefixes)}
    for p in prefixes:
        expected_names |= {f"{p}.{part}" for part in ("w13_weight", "w13_weight_scale", "w13_weight_scale_2", "w13_input_scale", "w2_weight", "w2_weight_scale", "w2_weight_scale_2", "w2_input_scale")}
    assert set(out) == expected_names
    for n, t in src.items():
        if n in out:
            assert out[n].dtype == t.dtype and out[n].shape == t.shape and raw(out[n]) == raw(t), n
    for p, n in prefixes.items():
        ref = ref_fused(src, p, n, layout=layout, order=order)
        for part, want in ref.items():
            got = out[f"{p}.{part}"]
            assert tuple(got.shape) == tuple(want.shape), (p, part, got.shape, want.shape)
            if part.endswith("_weight"):  # I8 for mega-moe, U8 otherwise, whatever the source had
                assert got.dtype == (torch.int8 if layout == "mega-moe" else torch.uint8), (p, part, got.dtype)
            elif part.endswith("_weight_scale"):
                assert got.dtype == (torch.int32 if layout == "mega-moe" else torch.float8_e4m3fn), (p, part, got.dtype)
            else:
                assert got.dtype == torch.float32, (p, part, got.dtype)
            assert raw(got) == raw(want), (p, part)


