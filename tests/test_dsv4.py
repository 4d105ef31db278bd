"""DeepSeek-V4 NVFP4 checkpoints as the two published recipes write them: convert (both targets),
verify, configs, bad inputs, and the plan of a real-size V4-Pro from its shard headers alone."""

from __future__ import annotations

import json
import math
import os
import random
import struct
import time
from pathlib import Path

import pytest
import torch
from helpers import edit_header, load_all, rewrite_tensors, run_inprocess
from references import check_output_against_reference

from nvfp4_fuse.convert import ConvertOptions, convert
from nvfp4_fuse.manifest import load_manifest
from nvfp4_fuse.quant_config import output_configs
from nvfp4_fuse.sample_dsv4 import DSv4SampleSpec, make_dsv4_sample
from nvfp4_fuse.verify import verify

MTP = "mtp.0.ffn.experts"


@pytest.fixture
def dsv4(tmp_path):
    count = [0]

    def make(**kw) -> Path:
        count[0] += 1
        kw.setdefault("seed", random.randrange(2**31))
        folder = tmp_path / f"dsv4-{count[0]}"
        make_dsv4_sample(folder, DSv4SampleSpec(**kw))
        return folder

    return make


def _shard_of(folder: Path, name: str) -> Path:
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / idx["weight_map"][name]


@pytest.mark.parametrize("target,layout", [("mega-moe", "mega-moe"), ("vllm-fused", "swizzled")])
@pytest.mark.parametrize("recipe,values", [("nvidia", "U8"), ("canada", "U8"), ("canada", "I8")])
def test_both_recipes_convert_exactly_and_verify(dsv4, tmp_path, recipe, values, target, layout):
    src = dsv4(recipe=recipe, values=values, layers=4, experts=8)
    s = load_all(src)
    # the sample is the real thing: hash routing on the first 3 layers, E8M0 scales, MXFP4 MTP experts
    assert s["layers.0.ffn.gate.tid2eid"].dtype == torch.int64 and "layers.3.ffn.gate.bias" in s
    assert s["layers.1.attn.wq_a.scale"].dtype == torch.float8_e8m0fnu
    assert s[f"{MTP}.0.w1.weight"].dtype == torch.int8 and s[f"{MTP}.0.w1.scale"].dtype == torch.float8_e8m0fnu
    field = "scale" if recipe == "canada" else "weight_scale"
    assert s[f"layers.2.ffn.experts.5.w3.{field}"].dtype == torch.float8_e4m3fn
    assert s["layers.2.ffn.experts.5.w3.weight_scale_2"].shape == ((1,) if recipe == "canada" else ())
    out = tmp_path / "out"
    res = convert(src, out, ConvertOptions(target=target))
    assert [r.prefix for r in res.layers] == [f"layers.{n}.ffn.experts" for n in range(4)]
    # every byte against references written from the formats, the MTP experts and every other tensor
    # (tid2eid, hc_*, FP8 with E8M0 scales, embed/head/norm) byte-identical
    check_output_against_reference(src, out, layout=layout)
    o = load_all(out)
    for name in (f"{MTP}.3.w2.weight", f"{MTP}.3.w2.scale"):
        assert o[name].dtype == s[name].dtype and torch.equal(o[name].view(torch.uint8), s[name].view(torch.uint8))
    # one documented shape and dtype for the scalars whatever the source had (0-d or [1])
    for part in ("w13_weight_scale_2", "w13_input_scale", "w2_weight_scale_2", "w2_input_scale"):
        t = o[f"layers.1.ffn.experts.{part}"]
        assert t.dtype == torch.float32 and t.shape == (8,)
    v = verify(src, out, device="cpu")
    assert [g["prefix"] for g in v.copied_groups] == [MTP] and v.copied_groups[0]["format"] == "MXFP4"
    assert all(l.checked == 8 for l in v.layers)


def test_nvidia_input_scales_differ_per_expert_and_the_spread_is_reported(dsv4, tmp_path, capsys):
    src = dsv4(recipe="nvidia", layers=4, experts=8)
    s = load_all(src)
    code, stdout, _ = run_inprocess(capsys, "convert", str(src), str(tmp_path / "out"), "--dry-run", "--json")
    assert code == 0
    plan = json.loads(stdout)
    man_layers = None
    convert(src, tmp_path / "out", ConvertOptions())
    man_layers = load_manifest(tmp_path / "out").source["layers"]
    for p in ("layers.1.ffn.experts", "layers.3.ffn.experts"):
        gate = torch.stack([s[f"{p}.{e}.w1.input_scale"] for e in range(8)])
        down = torch.stack([s[f"{p}.{e}.w2.input_scale"] for e in range(8)])
        assert len(set(gate.tolist())) == 8  # calibrated per expert
        want = float(gate.max() / gate.min()), float(down.max() / down.min())
        got_plan = next(m for m in plan["modules"] if m["prefix"] == p)
        for got in (got_plan, man_layers[p]):
            assert math.isclose(got["input_scale_spread"], want[0], rel_tol=1e-6)
            assert math.isclose(got["w2_input_scale_spread"], want[1], rel_tol=1e-6)
        o = load_all(tmp_path / "out")
        assert torch.equal(o[f"{p}.w2_input_scale"], down)  # per expert, as the target defines
        assert torch.equal(o[f"{p}.w13_input_scale"], gate)  # w1 and w3 share theirs: the max is it
    assert plan["copied_expert_modules"] == {MTP: {"format": "MXFP4", "experts": 8}}


@pytest.mark.parametrize("recipe", ["nvidia", "canada"])
def test_output_configs_keep_every_key_and_describe_the_disk(dsv4, tmp_path, recipe):
    src = dsv4(recipe=recipe, layers=4, experts=8)
    convert(src, tmp_path / "out", ConvertOptions())
    before = json.loads((src / "config.json").read_text())
    after = json.loads((tmp_path / "out" / "config.json").read_text())
    qa = after.pop("quantization_config")
    qb = before.pop("quantization_config")
    assert after == before
    block = qa.pop("fused_experts")
    assert qa == qb  # these configs already describe the disk: per-layer keys, mtp.* ignored
    assert block["copied_expert_modules"] == {MTP: {"format": "MXFP4", "num_experts": 8}}
    assert list(block["modules"]) == [f"layers.{n}.ffn.experts" for n in range(4)]
    if recipe == "nvidia":
        hq = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())
        assert hq.pop("fused_experts") == block
        assert hq == json.loads((src / "hf_quant_config.json").read_text())
    else:
        assert not (tmp_path / "out" / "hf_quant_config.json").exists()


def test_the_older_modelopt_schema_is_rewritten_to_what_is_on_disk():
    """NVIDIA's first recipe keyed quantized_layers per expert projection (MTP experts included) and
    listed no mtp.* in exclude_modules; after fusing, one entry per fused module, no NVFP4 claim on
    the MXFP4 MTP experts, and those covered by the exclude list."""
    fused = ["layers.0.ffn.experts", "layers.1.ffn.experts"]
    per_expert = {f"{p}.{e}.{w}": {"quant_algo": "NVFP4", "awq_block_size": 16} for p in [*fused, MTP] for e in range(2) for w in ("w1", "w2", "w3")}
    exclude = ["*.attn.*", "*.ffn.shared_experts.*", "embed.weight", "head.weight"]
    hq = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": None, "quantized_layers": per_expert, "exclude_modules": exclude}}
    out = json.loads(output_configs({"hf_quant_config.json": hq}, {"layout": "x"}, fused, [MTP])["hf_quant_config.json"])
    q = out["quantization"]
    assert q["quantized_layers"] == {p: {"quant_algo": "NVFP4", "awq_block_size": 16, "group_size": 16} for p in fused}
    assert q["exclude_modules"] == [*exclude, MTP]
    assert out["fused_experts"] == {"layout": "x"} and out["producer"] == {"name": "modelopt"}


# ---------------------------------------------------------------------------------------------------
# bad inputs of these formats: exit 2, one line naming file and tensor


def _expect_refused(capsys, src: Path, out: Path, *needles: str) -> str:
    code, _, err = run_inprocess(capsys, "convert", str(src), str(out))
    line = " ".join(err.split())
    assert code == 2, err
    assert err.strip().count("\n") <= 2 and "Traceback" not in err, err  # one message (rich may wrap it)
    for n in needles:
        assert n in line, (n, line)
    assert not out.exists()
    return line


def test_e4m3_scale_of_the_wrong_shape(dsv4, tmp_path, capsys):
    src = dsv4(recipe="canada", layers=2, experts=4)
    name = "layers.1.ffn.experts.2.w3.scale"

    def fn(t):
        if name in t:
            t[name] = t[name][:, : t[name].shape[1] // 2].contiguous()  # [out, in/32]: MXFP4's shape, E4M3's dtype

    rewrite_tensors(src, fn)
    _expect_refused(capsys, src, tmp_path / "out", f"tensor {name}", "shape", _shard_of(src, name).name)


def test_a_group_mixing_mxfp4_and_nvfp4_parts(dsv4, tmp_path, capsys):
    src = dsv4(recipe="nvidia", layers=2, experts=4)
    p = "layers.1.ffn.experts.3.w2"

    def fn(t):  # expert 3's down projection left in the native MXFP4 format
        if f"{p}.weight" in t:
            w = t.pop(f"{p}.weight")
            for f in ("weight_scale", "weight_scale_2", "input_scale"):
                t.pop(f"{p}.{f}", None)
            t[f"{p}.weight"] = w.view(torch.int8)
            t[f"{p}.scale"] = torch.full((w.shape[0], w.shape[1] * 2 // 32), 127, dtype=torch.uint8).view(torch.float8_e8m0fnu)
        for f in ("weight_scale", "weight_scale_2", "input_scale"):
            t.pop(f"{p}.{f}", None)

    rewrite_tensors(src, fn)
    _expect_refused(capsys, src, tmp_path / "out", "mixes MXFP4 and NVFP4", f"tensor {p}.scale", "expert 3 down is MXFP4")


def test_scalars_of_shape_2(dsv4, tmp_path, capsys):
    src = dsv4(recipe="canada", layers=2, experts=4)
    name = "layers.0.ffn.experts.1.w1.weight_scale_2"

    def fn(t):
        if name in t:
            t[name] = t[name].repeat(2)

    rewrite_tensors(src, fn)
    _expect_refused(capsys, src, tmp_path / "out", f"tensor {name}", "must be a scalar ([] or [1]), not [2]")


@pytest.mark.parametrize("dtype,needle", [("F4", "weight must be U8 or I8, not F4"), ("Q4", "unknown dtype 'Q4'")])
def test_an_f4_or_unknown_value_dtype(dsv4, tmp_path, capsys, dtype, needle):
    src = dsv4(recipe="nvidia", layers=2, experts=4)
    name = "layers.1.ffn.experts.0.w1.weight"

    def fn(h):
        rows, half = h[name]["shape"]
        h[name]["dtype"] = dtype
        h[name]["shape"] = [rows, 2 * half]  # F4: the same bytes, two values a byte

    edit_header(_shard_of(src, name), fn)
    _expect_refused(capsys, src, tmp_path / "out", needle, name)


def test_only_mxfp4_experts_is_nothing_to_convert(dsv4, tmp_path, capsys):
    """A native DeepSeek-V4 checkpoint (every routed expert MXFP4) is refused, and says why."""
    src = dsv4(recipe="canada", layers=1, experts=4)
    rewrite_tensors(src, lambda t: [t.pop(n) for n in [n for n in t if n.startswith("layers.0.ffn.experts.")]])
    _expect_refused(capsys, src, tmp_path / "out", "no routed-expert NVFP4 tensors", f"{MTP} (MXFP4)")


# ---------------------------------------------------------------------------------------------------
# the plan at real scale, from shard headers alone


V4_PRO = {"layers": 61, "experts": 384, "hidden": 7168, "inter": 3072, "shards": 64, "hash_layers": 3, "vocab": 129280}


def _v4_pro_tensors() -> list[tuple[str, str, list[int]]]:
    """(name, dtype, shape) of a V4-Pro checkpoint in NVIDIA's recipe: every routed expert of the 61
    layers and the MXFP4 MTP layer, and a representative set of the other tensors."""
    h, i, e = V4_PRO["hidden"], V4_PRO["inter"], V4_PRO["experts"]
    out = [("embed.weight", "BF16", [V4_PRO["vocab"], h])]

    def block(prefix: str, *, mxfp4: bool, hashed: bool) -> None:
        out.append((f"{prefix}.attn.wq_a.weight", "F8_E4M3", [1536, h]))
        out.append((f"{prefix}.attn.wq_a.scale", "F8_E8M0", [12, h // 128]))
        out.append((f"{prefix}.hc_attn_fn", "F32", [24, 4 * h]))
        out.append((f"{prefix}.ffn.gate.weight", "BF16", [e, h]))
        out.append((f"{prefix}.ffn.gate.tid2eid", "I64", [V4_PRO["vocab"], 6]) if hashed else (f"{prefix}.ffn.gate.bias", "F32", [e]))
        for x in range(e):
            for proj, rows, cols in (("w1", i, h), ("w3", i, h), ("w2", h, i)):
                p = f"{prefix}.ffn.experts.{x}.{proj}"
                if mxfp4:
                    out.extend([(f"{p}.weight", "I8", [rows, cols // 2]), (f"{p}.scale", "F8_E8M0", [rows, cols // 32])])
                else:
                    out.extend(
                        [
                            (f"{p}.weight", "U8", [rows, cols // 2]),
                            (f"{p}.weight_scale", "F8_E4M3", [rows, cols // 16]),
                            (f"{p}.weight_scale_2", "F32", []),
                            (f"{p}.input_scale", "F32", []),
                        ]
                    )
        out.append((f"{prefix}.ffn.shared_experts.w1.weight", "F8_E4M3", [i, h]))
        out.append((f"{prefix}.ffn.shared_experts.w1.scale", "F8_E8M0", [i // 128, h // 128]))

    for n in range(V4_PRO["layers"]):
        block(f"layers.{n}", mxfp4=False, hashed=n < V4_PRO["hash_layers"])
    block("mtp.0", mxfp4=True, hashed=False)
    out.append(("head.weight", "BF16", [V4_PRO["vocab"], h]))
    return out


def _write_sparse_checkpoint(folder: Path, tensors: list[tuple[str, str, list[int]]], shards: int) -> int:
    """Shards whose headers are real and whose data is a hole, but for the F32 scalars (positive
    values, written where they lie). Returns the data bytes the headers declare."""
    from nvfp4_fuse.safetensors_header import tensor_nbytes

    folder.mkdir()
    total = sum(tensor_nbytes(d, s) for _, d, s in tensors)
    per = total / shards
    groups: list[list[tuple[str, str, list[int]]]] = [[]]
    size = 0
    for t in tensors:
        if size >= per * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(t)
        size += tensor_nbytes(t[1], t[2])
    weight_map = {}
    for k, g in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        hdr, pos, scalars = {"__metadata__": {"format": "pt"}}, 0, []
        for n, d, s in g:
            nb = tensor_nbytes(d, s)
            hdr[n] = {"dtype": d, "shape": s, "data_offsets": [pos, pos + nb]}
            if d == "F32" and s == []:
                scalars.append(pos)
            pos += nb
            weight_map[n] = name
        js = json.dumps(hdr).encode()
        js += b" " * (-len(js) % 8)
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<Q", len(js)) + js)
            base = 8 + len(js)
            f.truncate(base + pos)  # a hole: no data blocks are written
            for off in scalars:
                os.pwrite(f.fileno(), struct.pack("<f", random.uniform(1e-4, 1e-2)), base + off)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    cfg = {"architectures": ["DeepseekV4ForCausalLM"], "quantization_config": {"quant_method": "fp8", "moe_quant_algo": "NVFP4"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    return total


def test_v4_pro_plan_from_headers_alone_in_seconds(tmp_path, capsys):
    tensors = _v4_pro_tensors()
    src = tmp_path / "v4-pro"
    total = _write_sparse_checkpoint(src, tensors, V4_PRO["shards"])
    e, h, i, layers = V4_PRO["experts"], V4_PRO["hidden"], V4_PRO["inter"], V4_PRO["layers"]
    assert total > 860e9  # the real checkpoint's size, as far as the headers say
    t0 = time.perf_counter()
    code, stdout, err = run_inprocess(capsys, "convert", str(src), str(tmp_path / "out"), "--dry-run", "--json")
    seconds = time.perf_counter() - t0
    assert code == 0, err
    plan = json.loads(stdout)
    assert [m["prefix"] for m in plan["modules"]] == [f"layers.{n}.ffn.experts" for n in range(layers)]
    assert all((m["experts"], m["hidden"], m["intermediate"]) == (e, h, i) for m in plan["modules"])
    assert plan["copied_expert_modules"] == {MTP: {"format": "MXFP4", "experts": e}}
    # bytes: values and block scales restacked (I and H/16 are multiples of 128 and 4: no padding);
    # six F32 scalars an expert become four (w1 and w3 merge their weight_scale_2 and input_scale)
    per_layer_in = e * (2 * (i * h // 2 + i * h // 16 + 8) + (h * i // 2 + h * i // 16 + 8))
    per_layer_out = e * (2 * i * h // 2 + 2 * i * h // 16 + 4 + 4 + h * i // 2 + h * i // 16 + 4 + 4)
    assert per_layer_in - per_layer_out == 8 * e
    assert plan["total_bytes"] == total - layers * (per_layer_in - per_layer_out)
    assert sum(s["bytes"] for s in plan["shards"]) == plan["total_bytes"] and len(plan["shards"]) >= 170  # 5 GB shards
    assert seconds < 60, f"the V4-Pro plan took {seconds:.1f} s"
    print(f"V4-Pro plan ({len(tensors)} tensors, {total / 1e9:.1f} GB) from headers in {seconds:.1f} s")


def test_a_v41_sample_is_nvidias_v41_format_and_converts_and_verifies(tmp_path, capsys):
    """`nvfp4-fuse sample --arch deepseek-v41` writes NVIDIA's DeepSeek-V4.1 layout (model_type
    deepseek_v41, the text model under text_config, quantization_config at the top, every layer
    score-routed); `convert` and `verify` take it as they take V4, and keep its config's keys."""
    src, out = tmp_path / "v41", tmp_path / "out"
    code, stdout, _ = run_inprocess(capsys, "sample", str(src), "--arch", "deepseek-v41", "--layers", "3", "--seed", str(random.randrange(2**31)))
    assert code == 0 and "DeepSeek-V4.1" in stdout
    cfg = json.loads((src / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"]) == ("deepseek_v41", ["DeepseekV41ForCausalLM"])
    text, qc = cfg["text_config"], cfg["quantization_config"]
    assert text["num_hidden_layers"] == 3 and "num_hash_layers" not in text and "quantization_config" not in text
    assert len(text["compress_ratios"]) == 4 and text["kv_source_layer_ids"] and "vision_config" in cfg
    assert qc["moe_quant_algo"] == "NVFP4" and set(qc["quantized_layers"]) == {f"layers.{n}.ffn.experts" for n in range(3)}
    s = load_all(src)
    assert not any(k.endswith("tid2eid") for k in s) and all(f"layers.{n}.ffn.gate.bias" in s for n in range(3))
    code, _, err = run_inprocess(capsys, "convert", str(src), str(out))
    assert code == 0, err
    check_output_against_reference(src, out, layout="mega-moe")
    o = json.loads((out / "config.json").read_text())
    assert o["quantization_config"].pop("fused_experts")["target"] == "mega-moe" and o == cfg
    code, _, err = run_inprocess(capsys, "verify", str(src), str(out), "--device", "cpu")
    assert code == 0, err


def test_a_v41_sample_of_canadas_recipe_is_refused(tmp_path, capsys):
    code, _, err = run_inprocess(capsys, "sample", str(tmp_path / "x"), "--arch", "deepseek-v41", "--recipe", "canada")
    assert code == 2 and "NVIDIA's recipe" in err
