"""--target per-expert: one Linear per expert in ModelOpt's spelling, gate/up made equal, input scales repaired.

Fresh random checkpoints of every naming scheme, with experts whose gate/up ``weight_scale_2`` are
equal and unequal, gate/up input scales that differ, and input scales missing and zero. Everything is
compared byte for byte against what the rules give, computed here from the source independently of
the converter; verify passes, and fails naming the tensor on a flipped bit.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_all, rewrite_tensors
from test_crash_resume import cli, journaled, killed, snapshot

from nvfp4_fuse.convert import ConvertOptions, convert, make_plan
from nvfp4_fuse.errors import CheckFailed
from nvfp4_fuse.experts import INPUT_SCALE_RULE
from nvfp4_fuse.manifest import load_manifest
from nvfp4_fuse.nvfp4 import rescale_block_scales
from nvfp4_fuse.safetensors_header import read_header
from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint
from nvfp4_fuse.sample_dsv4 import DSv4SampleSpec, make_dsv4_sample
from nvfp4_fuse.verify import verify
from nvfp4_fuse.verify_checks import block_errors

TARGET = "per-expert"
PROJ = {
    "hf": ("model.layers.1.mlp.experts", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
    "mixtral": ("model.layers.1.block_sparse_moe.experts", {"gate": "w1", "up": "w3", "down": "w2"}),
    "deepseek": ("layers.1.ffn.experts", {"gate": "w1", "up": "w3", "down": "w2"}),
    "compressed-tensors": ("model.layers.1.mlp.experts", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}),
}
CT_NAMES = {"weight": "weight_packed", "weight_scale": "weight_scale", "weight_scale_2": "weight_global_scale", "input_scale": "input_global_scale"}


# ---------------------------------------------------------------------------------------------------
# reading checkpoints as raw bytes


def raw_tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (safetensors dtype, shape, bytes) of every tensor of a checkpoint folder."""
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(idx["weight_map"].values())):
        h = read_header(folder / f)
        data = (folder / f).read_bytes()
        for name, t in h.tensors.items():
            out[name] = (t.dtype, tuple(t.shape), data[h.data_start + t.begin : h.data_start + t.begin + t.nbytes])
    return out


def f32(b: bytes) -> float:
    return struct.unpack("<f", b)[0]


def _flip(folder: Path, name: str, rel: int, xor: int) -> None:
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / idx["weight_map"][name]
    h = read_header(shard)
    at = h.data_start + h.tensors[name].begin + rel
    with open(shard, "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ xor]))


# ---------------------------------------------------------------------------------------------------
# the rules, computed here from the source


def expected_expert_tensors(src: dict, prefix: str, proj: dict[str, str], experts: int, ct: bool) -> dict[str, tuple[str, tuple, bytes]]:
    """What the per-expert target must write for one layer, from the source's tensors and the rules."""
    field = (lambda f: CT_NAMES[f]) if ct else (lambda f: f)
    src_field = field
    canon = (lambda b: 1.0 / np.float32(f32(b))) if ct else (lambda b: np.float32(f32(b)))

    def scalar(e: int, role: str, f: str) -> bytes | None:
        got = src.get(f"{prefix}.{e}.{proj[role]}.{src_field(f)}")
        return None if got is None else got[2]

    # missing or zero input scales: the largest present one of the same projection in the layer
    inputs: dict[tuple[int, str], bytes] = {}
    for role in ("gate", "up", "down"):
        present = {e: b for e in range(experts) if (b := scalar(e, role, "input_scale")) is not None and f32(b) != 0}
        best = max(present, key=lambda e: (float(canon(present[e])), -e))
        for e in range(experts):
            inputs[(e, role)] = present.get(e, present[best])
    out = {}
    for e in range(experts):
        s2 = {r: scalar(e, r, "weight_scale_2") for r in ("gate", "up", "down")}
        win_s2 = "gate" if canon(s2["gate"]) >= canon(s2["up"]) else "up"
        win_in = "gate" if canon(inputs[(e, "gate")]) >= canon(inputs[(e, "up")]) else "up"
        c = float(canon(s2[win_s2]))
        for role in ("gate", "up", "down"):
            base = f"{prefix}.{e}.{proj[role]}"
            wdt, wshape, wbytes = src[f"{base}.{field('weight')}"]
            sdt, sshape, sbytes = src[f"{base}.{'weight_scale'}"]
            out[f"{base}.{field('weight')}"] = (wdt, wshape, wbytes)
            ratio = 1.0 if role == "down" or canon(s2[role]) == c else float(np.float32(canon(s2[role])) / np.float32(c))
            scales = torch.frombuffer(bytearray(sbytes), dtype=torch.uint8).reshape(sshape)
            new = scales if ratio == 1.0 else rescale_block_scales(scales, ratio).view(torch.uint8)
            out[f"{base}.weight_scale"] = ("F8_E4M3", sshape, new.numpy().tobytes())
            sshape0 = (1,) if ct else ()
            out[f"{base}.{field('weight_scale_2')}"] = ("F32", sshape0, s2["down" if role == "down" else win_s2])
            out[f"{base}.{field('input_scale')}"] = ("F32", sshape0, inputs[(e, "down" if role == "down" else win_in)])
    return out


def _make_source(tmp_path: Path, scheme: str) -> Path:
    """A fresh sample whose layer 1 has expert 1's up input scale dropped, expert 2's down input scale
    zero, and expert 0's gate/up weight_scale_2 equal (a copied pair among rescaled ones)."""
    src = tmp_path / "src"
    make_sample_checkpoint(
        src,
        SampleSpec(scheme=scheme, layers=2, experts=6, hidden=64, inter=32, shards=3, unequal_scale_2=True,
                   gate_up_input_scales_differ=True, seed=random.randrange(2**31)),
    )  # fmt: skip
    prefix, proj = PROJ[scheme]
    ct = scheme == "compressed-tensors"
    f_in = CT_NAMES["input_scale"] if ct else "input_scale"
    f_s2 = CT_NAMES["weight_scale_2"] if ct else "weight_scale_2"
    gate_s2 = load_all(src)[f"{prefix}.0.{proj['gate']}.{f_s2}"]

    def fn(t: dict) -> None:
        t.pop(f"{prefix}.1.{proj['up']}.{f_in}", None)
        if (name := f"{prefix}.2.{proj['down']}.{f_in}") in t:
            t[name] = torch.zeros_like(t[name])
        if (name := f"{prefix}.0.{proj['up']}.{f_s2}") in t:
            t[name] = gate_s2.clone()

    rewrite_tensors(src, fn)
    return src


# ---------------------------------------------------------------------------------------------------
# per naming scheme


@pytest.mark.parametrize("scheme", ["hf", "mixtral", "deepseek", "compressed-tensors"])
def test_per_expert_output_is_the_rules_applied_byte_for_byte(tmp_path, scheme):
    src = _make_source(tmp_path, scheme)
    prefix, proj = PROJ[scheme]
    ct = scheme == "compressed-tensors"
    out = tmp_path / "out"
    res = convert(src, out, ConvertOptions(target=TARGET, max_shard_size=40_000))
    s, o = raw_tensors(src), raw_tensors(out)

    want = expected_expert_tensors(s, prefix, proj, 6, ct)
    # nothing stacked; every expert tensor exactly as the rules give it (names, dtypes, shapes, bytes)
    assert not any(".w13_" in n or ".w2_weight" in n or n.endswith("w2_input_scale") for n in o)
    for name, (dt, shape, data) in want.items():
        assert name in o, name
        assert o[name][:2] == (dt, shape), (name, o[name][:2], (dt, shape))
        assert o[name][2] == data, f"{name} differs from the rules"
    # everything else: the source's tensors, byte for byte
    others = {n: v for n, v in s.items() if not n.startswith(prefix + ".")}
    assert set(o) == set(want) | set(others)
    for n, v in others.items():
        assert o[n] == v, n
    # gate and up: one weight_scale_2 and one input scale per expert
    for e in range(6):
        for f in ("weight_scale_2", "input_scale"):
            fld = CT_NAMES[f] if ct else f
            assert o[f"{prefix}.{e}.{proj['gate']}.{fld}"][2] == o[f"{prefix}.{e}.{proj['up']}.{fld}"][2]
    # expert 0's pair was equal: its block scales are copied; the others' smaller half is rescaled within the bound
    for role in ("gate", "up"):
        assert o[f"{prefix}.0.{proj[role]}.weight_scale"][2] == s[f"{prefix}.0.{proj[role]}.weight_scale"][2]
    f_s2 = CT_NAMES["weight_scale_2"] if ct else "weight_scale_2"
    canon = (lambda b: 1 / f32(b)) if ct else f32
    rescaled = 0
    for e in range(1, 6):
        for role in ("gate", "up"):
            base = f"{prefix}.{e}.{proj[role]}"
            a, b = (np.frombuffer(x[f"{base}.weight_scale"][2], dtype=np.uint8) for x in (s, o))
            s2, c = canon(s[f"{base}.{f_s2}"][2]), canon(o[f"{base}.{f_s2}"][2])
            _, ok = block_errors(a, s2, b, c)
            assert ok.all(), base
            rescaled += s2 != c
    assert rescaled == 5  # one half of every unequal pair
    # repaired input scales: reported in the result, the manifest, the plan and the configs
    layer = next(r for r in res.layers if r.prefix == prefix)
    assert layer.repaired_input_scales == {"up": 1, "down": 1}
    man = load_manifest(out)
    assert man.source["layers"][prefix]["repaired_input_scales"] == {"up": 1, "down": 1}
    plan = make_plan(src, ConvertOptions(target=TARGET)).summary(1)
    assert next(m for m in plan["modules"] if m["prefix"] == prefix)["repaired_input_scales"] == {"up": 1, "down": 1}
    cfg_src = json.loads((src / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    block = cfg["quantization_config"].pop("repaired_experts")
    assert "fused_experts" not in cfg["quantization_config"]
    assert cfg == cfg_src  # otherwise the source's config as it was
    assert block["target"] == TARGET and block["rules"]["missing_input_scale"] == INPUT_SCALE_RULE
    assert block["modules"][prefix]["repaired_input_scales"] == {"up": 1, "down": 1}
    assert block["modules"][prefix]["scale_2_rescaled_experts"] == 5
    if not ct:
        hq = json.loads((out / "hf_quant_config.json").read_text())
        assert hq.pop("repaired_experts") == block
        assert hq == json.loads((src / "hf_quant_config.json").read_text())
    # sidecars (README.md becomes the conversion's model card)
    sidecars = [p.name for p in src.iterdir() if not p.name.endswith(".safetensors") and p.name not in (
        "model.safetensors.index.json", "config.json", "hf_quant_config.json", "README.md")]  # fmt: skip
    assert "tokenizer_config.json" in sidecars
    for side in sidecars:
        assert (out / side).read_bytes() == (src / side).read_bytes(), side
    # and verify agrees, end to end included (the kernel's CPU reference)
    r = verify(src, out, device="cpu", decode=True)
    lr = next(x for x in r.layers if x.prefix == prefix)
    assert lr.checked == 6 and lr.decoded == 6 and lr.rescaled == 5


def test_fused_targets_stack_the_repaired_input_scales(tmp_path):
    src = _make_source(tmp_path, "deepseek")
    prefix, _ = PROJ["deepseek"]
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target="linear"))
    o = raw_tensors(out)
    s = raw_tensors(src)
    w2_in = np.frombuffer(o[f"{prefix}.w2_input_scale"][2], dtype="<f4")
    present = [f32(s[f"{prefix}.{e}.w2.input_scale"][2]) for e in range(6) if e != 2]
    assert w2_in[2] == np.float32(max(present))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]["fused_experts"]
    assert cfg["repaired_input_scales"] == {"rule": INPUT_SCALE_RULE, "modules": {prefix: {"up": 1, "down": 1}}}
    verify(src, out, device="cpu")


# ---------------------------------------------------------------------------------------------------
# DeepSeek-V4, both recipes


def _sglang_takes_as_nvfp4(qc: dict) -> bool:
    """SGLang 0.5.23's test (configs/model_config.py ~774-794): MIXED_PRECISION, moe_quant_algo, group_size."""
    return qc.get("quant_algo") == "MIXED_PRECISION" and qc.get("moe_quant_algo") == "NVFP4" and "group_size" in qc


@pytest.mark.parametrize("recipe", ["nvidia", "canada"])
def test_dsv4_per_expert_names_and_configs(tmp_path, recipe):
    src = make_dsv4_sample(tmp_path / "src", DSv4SampleSpec(recipe=recipe, layers=2, hash_layers=1, experts=4, hidden=256, inter=256, seed=random.randrange(2**31)))
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=TARGET))
    s, o = raw_tensors(src), raw_tensors(out)
    canada = recipe == "canada"
    for layer in (0, 1):
        p = f"layers.{layer}.ffn.experts"
        want = expected_expert_tensors(
            {(k[: -len(".scale")] + ".weight_scale" if canada and k.startswith(p) and k.endswith(".scale") else k): v for k, v in s.items()},
            p, {"gate": "w1", "up": "w3", "down": "w2"}, 4, False,
        )  # fmt: skip
        for name, v in want.items():
            assert o[name] == v, name
        assert not any(n.startswith(p) and n.endswith(".scale") for n in o)  # SGLang would take .scale for FP8's
    # the MTP layer's MXFP4 experts and everything else: as they were
    others = {n: v for n, v in s.items() if not n.startswith(("layers.0.ffn.experts.", "layers.1.ffn.experts."))}
    assert any(n.startswith("mtp.0.ffn.experts.") and n.endswith(".scale") for n in others)
    for n, v in others.items():
        assert o[n] == v, n
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    src_qc = json.loads((src / "config.json").read_text())["quantization_config"]
    assert not _sglang_takes_as_nvfp4(src_qc) if canada else _sglang_takes_as_nvfp4(src_qc)
    assert _sglang_takes_as_nvfp4(qc)
    assert qc["quant_method"] == "fp8" and qc["group_size"] == 16
    assert qc["quantized_layers"] == {f"layers.{n}.ffn.experts": {"quant_algo": "NVFP4", "group_size": 16} for n in (0, 1)}
    assert qc["ignore"] == ["*.attn.*", "*.ffn.shared_experts.*", "head", "mtp.*"]
    block = qc.pop("repaired_experts")
    assert block["copied_expert_modules"] == {"mtp.0.ffn.experts": {"format": "MXFP4", "num_experts": 4}}
    hq = json.loads((out / "hf_quant_config.json").read_text())
    assert hq.pop("repaired_experts") == block
    if not canada:  # NVIDIA's recipe already says all of it: nothing else changes
        assert qc == src_qc
        assert hq == json.loads((src / "hf_quant_config.json").read_text())
    else:
        assert {k: v for k, v in qc.items() if k not in ("quant_algo", "group_size", "quantized_layers", "ignore")} == src_qc
        assert hq["quantization"] == {
            "quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "group_size": 16,
            "quantized_layers": qc["quantized_layers"], "exclude_modules": qc["ignore"],
        }  # fmt: skip
    r = verify(src, out, device="cpu", decode=True)
    assert [x.decoded for x in r.layers] == [4, 4]


# ---------------------------------------------------------------------------------------------------
# verify's failures, resume


def test_verify_names_the_tensor_of_a_flipped_bit(tmp_path):
    src = _make_source(tmp_path, "hf")
    prefix, proj = PROJ["hf"]
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=TARGET))
    verify(src, out, device="cpu", hash_files=False)
    cases = [
        (f"{prefix}.3.{proj['up']}.weight", 5 * 32 + 7, 0x10, "packed bytes differ from the source at [5, 7]"),
        (f"{prefix}.0.{proj['gate']}.weight_scale", 2 * 4 + 1, 0x01, "block scale at [2, 1] differs from the source's"),
        (f"{prefix}.4.{proj['down']}.weight_scale", 9 * 2 + 1, 0x01, "block scale at [9, 1] differs from the source's"),
        (f"{prefix}.1.{proj['up']}.input_scale", 0, 0x01, "(repaired: missing or zero in the source)"),
        (f"{prefix}.2.{proj['down']}.input_scale", 3, 0x01, "(repaired: missing or zero in the source)"),
    ]
    for name, rel, xor, needle in cases:
        _flip(out, name, rel, xor)
        with pytest.raises(CheckFailed) as ei:
            verify(src, out, device="cpu", hash_files=False)
        assert name in str(ei.value) and needle in str(ei.value), str(ei.value)
        _flip(out, name, rel, xor)
    # a rescaled half's block scale, off by one E4M3 step
    s, o = raw_tensors(src), raw_tensors(out)
    e, role = next((e, r) for e in range(1, 6) for r in ("gate", "up") if o[f"{prefix}.{e}.{proj[r]}.weight_scale"][2] != s[f"{prefix}.{e}.{proj[r]}.weight_scale"][2])
    name = f"{prefix}.{e}.{proj[role]}.weight_scale"
    _flip(out, name, 0, 0x01)
    with pytest.raises(CheckFailed, match="differs from the rescaled source's") as ei:
        verify(src, out, device="cpu", hash_files=False)
    assert name in str(ei.value)


def test_sigkill_then_resume_is_byte_identical(tmp_path):
    src = _make_source(tmp_path, "deepseek")
    args = ("--target", TARGET, "--max-shard-size", "20KB", "--workers", "2", "--shard-streams", "1", "--json")
    ref = tmp_path / "ref"
    assert cli("convert", str(src), str(ref), *args).returncode == 0
    sizes = [s.data_bytes for s in make_plan(src, ConvertOptions(target=TARGET, max_shard_size=20_000)).shards]
    assert len(sizes) >= 4
    for kill_at in ("shard:1", f"bytes:{sizes[0] + sizes[1] // 2}", "manifest"):
        out = tmp_path / f"out-{kill_at.replace(':', '-')}"
        assert killed(cli("convert", str(src), str(out), *args, kill_at=kill_at))
        kept = journaled(out)
        r = cli("convert", str(src), str(out), *args)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res["resumed_shards"] == kept
        layer = next(x for x in res["modules"] if x["prefix"] == "layers.1.ffn.experts")
        assert layer["repaired_input_scales"] == {"up": 1, "down": 1}  # --json reports the repair
        assert snapshot(out) == snapshot(ref), kill_at
    verify(src, ref, device="cpu")


# ---------------------------------------------------------------------------------------------------
# what inspect's per-engine rules (engines.py, read from the engines' code) say before and after


def test_inspect_finds_the_source_lossy_and_the_output_loading_everywhere(tmp_path):
    from nvfp4_fuse.inspect import inspect, local_input

    src = _make_source(tmp_path, "hf")
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=TARGET))
    before, after = inspect(local_input(src)), inspect(local_input(out))
    assert {r["verdict"] for r in before["engines"]} & {"lossy", "fails"}  # unequal scale_2, missing/zero input scales
    assert {r["verdict"] for r in after["engines"]} <= {"loads", "n/a"}, [r for r in after["engines"] if r["verdict"] not in ("loads", "n/a")]
    assert after["exit_code"] == 0
    g = {x["prefix"]: x for x in after["groups"]}[PROJ["hf"][0]]
    assert g["naming"]["fields"] == "modelopt" and g["naming"]["scalar_shape"] == "0-d" and g["scale_2"]["pairs_differ"] == 0


def test_inspect_takes_the_repaired_canada_checkpoint_as_nvfp4_in_sglang(tmp_path):
    from nvfp4_fuse.inspect import inspect, local_input

    src = make_dsv4_sample(tmp_path / "src", DSv4SampleSpec(recipe="canada", layers=2, hash_layers=1, experts=4, hidden=256, inter=256, seed=random.randrange(2**31)))
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=TARGET))
    row = lambda rep: next(r for r in rep["engines"] if r["id"] == "sglang-0.5.23:flashinfer_trtllm")  # noqa: E731
    assert row(inspect(local_input(src)))["verdict"] == "fails"
    assert row(inspect(local_input(out)))["verdict"] == "loads"
    g = {x["prefix"]: x for x in inspect(local_input(out))["groups"]}["layers.0.ffn.experts"]
    assert g["naming"]["block_scale"] == "weight_scale" and g["naming"]["scalar_shape"] == "0-d"


def test_the_model_card_says_what_the_repair_did(tmp_path):
    src = _make_source(tmp_path, "deepseek")
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=TARGET))
    card = (out / "README.md").read_text()
    assert "repaired from" in card and "repaired_experts" in card and "fused-expert tensors" not in card
