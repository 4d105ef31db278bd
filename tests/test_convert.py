"""Golden tests: every fused tensor equals an independent slow reference built from the source tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import load_all
from safetensors import safe_open

from nvfp4_fuse.convert import ConvertOptions, convert
from nvfp4_fuse.manifest import MANIFEST_NAME, check_files, load_manifest
from nvfp4_fuse.nvfp4 import dequantize

# ---------------------------------------------------------------------------------------------------
# independent references (written from the spec, sharing no code with the converter)

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
    """Byte-by-byte 128x4 swizzle with the offset formula (one expert)."""
    m_rows, k16 = s.shape
    mp = -(-m_rows // 128) * 128
    kp = -(-k16 // 4) * 4
    buf = torch.zeros(mp * kp, dtype=torch.uint8)
    raw = s.view(torch.uint8)
    for m in range(m_rows):
        for k in range(k16):
            off = (m // 128) * (kp // 4) * 512 + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + (k % 4)
            buf[off] = raw[m, k]
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
        else:
            if f"{base}.{fld}" in src:
                return src[f"{base}.{fld}"].reshape(())
            ct = {"weight_scale_2": "weight_global_scale", "input_scale": "input_global_scale"}[fld]
            if f"{base}.{ct}" in src:
                return torch.reciprocal(src[f"{base}.{ct}"].reshape(()))
    raise KeyError(f"{prefix}.{e} {role} {fld}")


def expert_prefixes(src: dict[str, torch.Tensor]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in src:
        m = re.match(r"^(.*\.experts)\.(\d+)\.", n)
        if m:
            out[m[1]] = max(out.get(m[1], 0), int(m[2]) + 1)
    return out


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
        first, second = ((g, gs), (u, us)) if order == "gate-up" else ((u, us), (g, gs))
        w13.append(torch.cat([first[0], second[0]]))
        sc = torch.cat([first[1], second[1]])
        s13.append(ref_swizzle(sc) if layout == "swizzled" else sc.view(torch.uint8))
        s2_13.append(c)
        in13.append(max(float(src_part(src, prefix, e, "gate", "input_scale")), float(src_part(src, prefix, e, "up", "input_scale"))))
        w2.append(d)
        s2w.append(ref_swizzle(ds) if layout == "swizzled" else ds.view(torch.uint8))
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
            assert raw(got) == raw(want), (p, part)


@pytest.mark.parametrize("scheme", ["deepseek", "hf", "mixtral", "compressed-tensors"])
def test_vllm_fused_matches_reference_every_scheme(make_ckpt, tmp_path, scheme):
    src = make_ckpt(scheme=scheme, layers=3, experts=5, hidden=64, inter=32, shards=3, unequal_scale_2=True)
    convert(src, tmp_path / "out", ConvertOptions(target="vllm-fused", max_shard_size=40_000))
    check_output_against_reference(src, tmp_path / "out", layout="swizzled")


def test_linear_target_and_up_gate_order(make_ckpt, tmp_path):
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=48, unequal_scale_2=True)
    convert(src, tmp_path / "lin", ConvertOptions(target="linear", w13_order="up-gate"))
    check_output_against_reference(src, tmp_path / "lin", layout="linear", order="up-gate")


def test_padded_swizzle_shapes(make_ckpt, tmp_path):
    # 2I = 96 rows (pads to 128), H/16 = 9 (pads to 12); down: H = 144 rows (pads to 256), I/16 = 3 (pads to 4)
    src = make_ckpt(layers=2, experts=3, hidden=144, inter=48, unequal_scale_2=True)
    convert(src, tmp_path / "out", ConvertOptions(target="vllm-fused"))
    check_output_against_reference(src, tmp_path / "out", layout="swizzled")
    with safe_open(str(next((tmp_path / "out").glob("model-*.safetensors"))), "pt") as f:
        names = list(f.keys())
    assert any(n.endswith("w13_weight_scale") for n in names)


def test_experts_split_across_shards_and_many_output_shards(make_ckpt, tmp_path):
    src = make_ckpt(layers=3, experts=8, hidden=64, inter=32, shards=4)
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    files_of_layer1 = {f for n, f in idx["weight_map"].items() if n.startswith("layers.1.ffn.experts.")}
    assert len(files_of_layer1) > 1, "the sample must spread a layer's experts over shards"
    convert(src, tmp_path / "out", ConvertOptions(target="vllm-fused", max_shard_size=20_000))
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 2
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    # the index names, for every tensor, the shard that holds it, and each shard holds only what it names
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    for shard in shards:
        with safe_open(str(shard), "pt") as f:
            assert set(f.keys()) == {t for t, name in idx["weight_map"].items() if name == shard.name}
    check_output_against_reference(src, tmp_path / "out", layout="swizzled")


@pytest.mark.parametrize("target", ["vllm-fused", "linear", "mega-moe"])
def test_w13_input_scale_is_the_max_of_gate_and_up(make_ckpt, tmp_path, target):
    src = make_ckpt(layers=2, experts=6, hidden=512, inter=512, gate_up_input_scales_differ=True)
    convert(src, tmp_path / "out", ConvertOptions(target=target))
    s, o = load_all(src), load_all(tmp_path / "out")
    p = "layers.1.ffn.experts"
    gate = torch.stack([s[f"{p}.{e}.w1.input_scale"] for e in range(6)])
    up = torch.stack([s[f"{p}.{e}.w3.input_scale"] for e in range(6)])
    assert bool((up > gate).any()) and bool((gate > up).any())  # both halves hold some expert's max
    want = torch.maximum(gate, up)
    got = o[f"{p}.w13_input_scale"]
    if got.dim() == 0:  # one value for the layer
        assert float(got) == float(want.max())
    else:
        assert raw(got) == raw(want)


def test_equal_scale_2_is_a_pure_copy(make_ckpt, tmp_path):
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=32, unequal_scale_2=False)
    res = convert(src, tmp_path / "out", ConvertOptions(target="linear"))
    assert all(r.rescaled_experts == 0 and r.max_rescale_change == 0 for r in res.layers)
    s, o = load_all(src), load_all(tmp_path / "out")
    for e in range(4):
        got = o["layers.1.ffn.experts.w13_weight_scale"][e]
        assert raw(got) == raw(torch.cat([s[f"layers.1.ffn.experts.{e}.w1.weight_scale"], s[f"layers.1.ffn.experts.{e}.w3.weight_scale"]]))


def test_rescaled_half_dequantizes_within_half_an_e4m3_step(make_ckpt, tmp_path):
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=32, unequal_scale_2=True)
    res = convert(src, tmp_path / "out", ConvertOptions(target="linear"))
    s, o = load_all(src), load_all(tmp_path / "out")
    layer = res.layers[0]
    assert layer.rescaled_experts == 4 and 0 < layer.max_rescale_change <= 0.0625
    p = "layers.1.ffn.experts"
    for e in range(4):
        c = float(o[f"{p}.w13_weight_scale_2"][e])
        got = dequantize(o[f"{p}.w13_weight"][e], o[f"{p}.w13_weight_scale"][e], c)
        want = torch.cat(
            [
                dequantize(s[f"{p}.{e}.{w}.weight"], s[f"{p}.{e}.{w}.weight_scale"], s[f"{p}.{e}.{w}.weight_scale_2"])
                for w in ("w1", "w3")
            ]
        )
        tol = 0.0625 * want.abs() + 1e-12
        assert bool(((got - want).abs() <= tol).all())


def test_output_files_configs_index_and_manifest(make_ckpt, tmp_path):
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=32)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target="vllm-fused"))
    for side in ("generation_config.json", "tokenizer_config.json", "README.md"):
        assert (out / side).read_bytes() == (src / side).read_bytes()
    cfg = json.loads((out / "config.json").read_text())
    hq = json.loads((out / "hf_quant_config.json").read_text())
    assert cfg["quantization_config"]["quant_algo"] == "NVFP4"
    assert hq["quantization"]["quant_algo"] == "NVFP4"
    for block in (cfg["quantization_config"]["fused_experts"], hq["fused_experts"]):
        assert block["layout"] == "nvfp4-fuse/v1" and block["target"] == "vllm-fused"
        assert block["scale_layout"] == "swizzle128x4" and block["w13_rows"] == "gate-up"
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = load_all(out)
    assert set(idx["weight_map"]) == set(tensors)
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f in set(idx["weight_map"].values()):
        with safe_open(str(out / f), "pt") as fh:
            meta = fh.metadata()
        assert meta["format"] == "pt" and meta["nvfp4_fuse_layout"] == "nvfp4-fuse/v1"
    man = load_manifest(out)
    assert man is not None and check_files(out, man) == []
    assert set(man.files) == {p.name for p in out.iterdir()} - {MANIFEST_NAME}
    assert not list(out.glob("*.partial")) and not (out / ".nvfp4-fuse-progress.json").exists()


def test_memory_does_not_hold_a_layer(make_ckpt, tmp_path, monkeypatch):
    """The writer gets at most one expert's bytes per call: nothing stacks a layer in memory."""
    from nvfp4_fuse import safetensors_io

    src = make_ckpt(layers=2, experts=16, hidden=128, inter=64)
    biggest = []
    orig = safetensors_io.StreamingShardWriter.write

    def spy(self, data):
        biggest.append(len(memoryview(data).cast("B")))
        return orig(self, data)

    monkeypatch.setattr(safetensors_io.StreamingShardWriter, "write", spy)
    convert(src, tmp_path / "out", ConvertOptions(target="vllm-fused"))
    per_expert_w13 = 2 * 64 * 128 // 2
    largest_copied = max(t.numel() * t.element_size() for n, t in load_all(src).items() if ".experts." not in n)
    layer_w13 = 16 * per_expert_w13
    assert largest_copied < layer_w13
    # one expert's w13, or one copied (non-expert) tensor; never a stacked layer
    assert max(biggest) <= max(per_expert_w13, largest_copied)


# ---------------------------------------------------------------------------------------------------
# mega-moe: the streaming writer must produce exactly what the reference transform gives


@pytest.mark.parametrize("scheme", ["deepseek", "hf"])
def test_mega_moe_matches_reference_transform(make_ckpt, tmp_path, scheme):
    from nvfp4_fuse.mega_moe import to_mega_moe

    src = make_ckpt(scheme=scheme, layers=2, experts=3, hidden=512, inter=512, shards=3, unequal_scale_2=True)
    out = tmp_path / "out"
    res = convert(src, out, ConvertOptions())  # the default target
    assert all(r.max_rescale_change == 0 for r in res.layers), "mega-moe keeps both scale_2: no rescale"
    s, o = load_all(src), load_all(out)
    for p, n in expert_prefixes(s).items():
        parts = [torch.stack([src_part(s, p, e, r, f) for e in range(n)]) for r in ("gate", "up") for f in ("weight", "weight_scale")]
        parts += [torch.stack([src_part(s, p, e, "down", f) for e in range(n)]) for f in ("weight", "weight_scale")]
        ref = to_mega_moe(*parts)
        for part, want in ref.items():
            got = o[f"{p}.{part}"]
            assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), part
            assert raw(got) == raw(want), part
        sc = lambda r, f, p=p, n=n: torch.stack([src_part(s, p, e, r, f) for e in range(n)])  # noqa: E731
        assert raw(o[f"{p}.w13_weight_scale_2"]) == raw(torch.stack([sc("gate", "weight_scale_2"), sc("up", "weight_scale_2")], 1))
        assert o[f"{p}.w13_input_scale"].shape == ()
        assert float(o[f"{p}.w13_input_scale"]) == max(float(sc("gate", "input_scale").max()), float(sc("up", "input_scale").max()))
        assert raw(o[f"{p}.w2_weight_scale_2"]) == raw(sc("down", "weight_scale_2"))
        assert raw(o[f"{p}.w2_input_scale"]) == raw(sc("down", "input_scale"))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]["fused_experts"]
    assert cfg["target"] == "mega-moe" and "l1_alphas" in cfg["loader"]


def test_mega_moe_refuses_shapes_the_kernel_cannot_take(make_ckpt, tmp_path):
    from nvfp4_fuse.errors import InputError

    src = make_ckpt(layers=2, experts=2, hidden=256, inter=128)
    with pytest.raises(InputError, match="multiple of 512"):
        convert(src, tmp_path / "out", ConvertOptions(target="mega-moe"))
    with pytest.raises(InputError, match="--w13-order"):
        convert(src, tmp_path / "out", ConvertOptions(target="mega-moe", w13_order="up-gate"))
