"""``nvfp4-fuse inspect``: every defect found without stopping, the per-engine verdicts computed from
the checkpoint's own numbers, the JSON schema, the exit codes, and a repo id read by a bounded number
of range requests from the loopback fake Hub."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from helpers import load_all, rewrite_tensors, run_inprocess
from test_hub import fake_hub  # noqa: F401  (the loopback Hub fixture)
from typer.testing import CliRunner

from nvfp4_fuse import csf
from nvfp4_fuse.cli import app
from nvfp4_fuse.engines import ENGINES, RULES
from nvfp4_fuse.errors import EXIT_ENGINE_ISSUES, InputError
from nvfp4_fuse.experts import group_experts, scan_experts
from nvfp4_fuse.hub.ranges import coalesce
from nvfp4_fuse.inspect import SCHEMA, inspect, local_input
from nvfp4_fuse.sample_dsv4 import DSv4SampleSpec, make_dsv4_sample
from nvfp4_fuse.source import scan_source


def report_of(folder, **kw):
    return inspect(local_input(folder, **kw))


def verdict(report, engine_backend: str) -> dict:
    (row,) = [r for r in report["engines"] if r["id"] == engine_backend]
    return row


def groups(report) -> dict[str, dict]:
    return {g["prefix"]: g for g in report["groups"]}


# ------------------------------------------------------------------------------------------------
# gate/up weight_scale_2


def test_unequal_scale_2_counted_and_named_from_the_data(make_ckpt):
    src = make_ckpt(scheme="hf", layers=3, experts=6, hidden=64, inter=32, unequal_scale_2=True)
    # make a few pairs equal again, so the count is not simply "all"
    keep = random.sample(range(6), 2)

    def equalize(t):
        for e in keep:
            g = f"model.layers.2.mlp.experts.{e}.gate_proj.weight_scale_2"
            if g in t:
                t[f"model.layers.2.mlp.experts.{e}.up_proj.weight_scale_2"] = t[g].clone()

    rewrite_tensors(src, equalize)
    t = load_all(src)
    rep = report_of(src)
    n_total, worst = 0, 1.0
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp.experts"
        g = np.array([float(t[f"{p}.{e}.gate_proj.weight_scale_2"]) for e in range(6)])
        u = np.array([float(t[f"{p}.{e}.up_proj.weight_scale_2"]) for e in range(6)])
        differ = g != u
        n_total += int(differ.sum())
        off = np.maximum(g / u, u / g)[differ]
        worst = max(worst, float(off.max()))
        s2 = groups(rep)[p]["scale_2"]
        assert s2["pairs_differ"] == int(differ.sum())
        assert s2["experts_differ"] == [int(e) for e in np.flatnonzero(differ)]
        assert s2["worst_ratio"] == pytest.approx(float(off.max()))
        assert s2["worst_expert"] == int(np.argmax(np.where(differ, np.maximum(g / u, u / g), 0)))
    assert n_total == 12 - len(keep)
    want = f"up half off by up to {worst:.3g}x in {n_total} experts"
    for eng in ("vllm-0.33", "vllm-0.34"):
        for backend in ("flashinfer_cutlass", "flashinfer_trtllm", "flashinfer_cutedsl", "cutlass", "marlin"):
            row = verdict(rep, f"{eng}:{backend}")
            assert row["verdict"] == "lossy" and want in row["messages"][0], row
    assert verdict(rep, "sglang-0.5.23:flashinfer_cutlass")["verdict"] == "lossy"
    assert rep["exit_code"] == EXIT_ENGINE_ISSUES


def test_equal_scales_and_clean_inputs_load_everywhere(make_ckpt):
    rep = report_of(make_ckpt(scheme="mixtral", layers=2, experts=4, hidden=64, inter=32))
    assert {r["verdict"] for r in rep["engines"]} <= {"loads", "n/a"}
    assert rep["exit_code"] == 0
    g = groups(rep)["model.layers.1.block_sparse_moe.experts"]
    assert g["naming"] == {"projections": "w1/w3/w2", "fields": "modelopt", "block_scale": "weight_scale", "scalar_shape": "0-d"}
    assert g["scale_2"]["pairs_differ"] == 0


# ------------------------------------------------------------------------------------------------
# input scales


DEFECTS = ("missing", "zero", "nan", "inf", "negative")


def test_every_input_scale_defect_is_found_where_it_is(make_ckpt):
    e, layers = 8, (1, 2)
    # two places a kind, all distinct (a place drawn twice would keep only its last kind)
    places = random.sample([(ly, x, r) for ly in layers for x in range(e) for r in ("gate", "up", "down")], 2 * len(DEFECTS))
    planted = {place: kind for place, kind in zip(places, [k for k in DEFECTS for _ in range(2)])}
    src = make_ckpt(scheme="deepseek", layers=3, experts=e, hidden=64, inter=32, input_scale_defects=planted)
    rep = report_of(src)  # the converter stops at the first; inspect reports all
    with pytest.raises(InputError):
        from nvfp4_fuse.convert import ConvertOptions, make_plan

        make_plan(src, ConvertOptions())
    t = load_all(src)
    for layer in layers:
        p = f"layers.{layer}.ffn.experts"
        g = groups(rep)[p]
        for role, key in (("gate", "w13"), ("up", "w13"), ("down", "w2")):
            for kind in DEFECTS:
                want = sorted(x for (ly, x, r), k in planted.items() if ly == layer and r == role and k == kind)
                assert g[f"input_scale_{key}"][role][kind] == want, (layer, role, kind)
        # spread over the usable scales, from the tensors themselves
        proj = {"gate": "w1", "up": "w3", "down": "w2"}
        for key, roles in (("w13", ("gate", "up")), ("w2", ("down",))):
            vals = [float(t[n]) for r in roles for x in range(e) if (n := f"{p}.{x}.{proj[r]}.input_scale") in t]
            ok = [v for v in vals if math.isfinite(v) and v > 0]
            assert g[f"input_scale_{key}"]["spread"] == pytest.approx(max(ok) / min(ok))
    s = rep["summary"]
    assert s["input_any_missing"] == sum(k == "missing" for k in planted.values())
    # per-expert 1/x (vLLM CUTLASS) fails; Marlin never reads input scales
    assert verdict(rep, "vllm-0.34:cutlass")["verdict"] == "fails"
    assert verdict(rep, "vllm-0.34:marlin")["verdict"] == "loads"
    assert verdict(rep, "vllm-0.34:flashinfer_moe_ep_cutedsl")["verdict"] == "loads"
    assert verdict(rep, "vllm-0.34:flashinfer_cutlass")["verdict"] == "fails"  # NaN / absent slot enters the max
    assert "1.0" in " ".join(verdict(rep, "sglang-0.5.23:marlin")["messages"])  # absent -> filled with 1.0


def test_a_zero_input_scale_is_harmless_to_a_max_over_experts_but_not_per_expert(make_ckpt):
    src = make_ckpt(
        scheme="hf",
        layers=2,
        experts=4,
        hidden=64,
        inter=32,
        input_scale_defects={(1, 2, "gate"): "zero", (1, 2, "up"): "zero", (1, 1, "down"): "negative"},
    )
    rep = report_of(src)
    assert groups(rep)["model.layers.1.mlp.experts"]["input_scale_w13"]["experts_unusable"] == [2]
    assert groups(rep)["model.layers.1.mlp.experts"]["input_scale_w2"]["experts_unusable"] == [1]
    # a zero or negative scale does not survive a max over all experts
    assert verdict(rep, "vllm-0.34:flashinfer_cutlass")["verdict"] == "loads"
    assert verdict(rep, "sglang-0.5.23:flashinfer_trtllm")["verdict"] == "loads"
    assert verdict(rep, "sglang-0.5.23:flashinfer_cutedsl")["verdict"] == "fails"  # its w2 scales are per expert
    assert verdict(rep, "sglang-0.5.23:cutlass")["verdict"] == "fails"
    row = verdict(rep, "vllm-0.34:cutlass")
    assert row["verdict"] == "fails" and "1 experts' w13 and 1 experts' w2" in row["messages"][0]
    # all zero in a layer: the max is 0 too
    src = make_ckpt(scheme="hf", layers=2, experts=3, hidden=64, inter=32,
                    input_scale_defects={(1, x, r): "zero" for x in range(3) for r in ("gate", "up")})  # fmt: skip
    rep = report_of(src)
    assert rep["summary"]["input_w13_layers_all_unusable"] == ["model.layers.1.mlp.experts"]
    assert verdict(rep, "vllm-0.34:flashinfer_cutlass")["verdict"] == "fails"


def test_bad_weight_scale_2_fails_the_moe_ep_megakernel(make_ckpt):
    src = make_ckpt(scheme="hf", layers=2, experts=4, hidden=64, inter=32)
    rewrite_tensors(src, lambda t: t.update({"model.layers.1.mlp.experts.3.down_proj.weight_scale_2": torch.tensor(float("nan"))})
                    if "model.layers.1.mlp.experts.3.down_proj.weight_scale_2" in t else None)  # fmt: skip
    rep = report_of(src)
    assert groups(rep)["model.layers.1.mlp.experts"]["weight_scale_2_defects"]["down"]["nan"] == [3]
    assert "finite positive scales" in verdict(rep, "vllm-0.34:flashinfer_moe_ep_cutedsl")["messages"][0]


# ------------------------------------------------------------------------------------------------
# DeepSeek-V4 recipes, fused outputs, CSF


@pytest.fixture(scope="module")
def dsv4(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv4")
    out = {}
    for recipe in ("nvidia", "canada"):
        out[recipe] = make_dsv4_sample(root / recipe, DSv4SampleSpec(recipe, 3, 2, 4, 512, 512, 2, seed=random.randrange(2**31)))
    return out


def test_dsv4_recipes(dsv4):
    nv, ca = report_of(dsv4["nvidia"]), report_of(dsv4["canada"])
    assert verdict(nv, "sglang-0.5.23:flashinfer_trtllm")["verdict"] == "loads"
    row = verdict(ca, "sglang-0.5.23:flashinfer_trtllm")
    assert row["verdict"] == "fails" and "not detected as NVFP4" in row["messages"][0]
    assert "quant_algo: MIXED_PRECISION" in row["messages"][0] and "group_size" in row["messages"][0]
    for rep in (nv, ca):
        assert "KeyError: 'layers.0.ffn.experts.w13_input_scale'" in verdict(rep, "vllm-0.33:deep_gemm_mega_moe")["messages"][0]
        assert verdict(rep, "vllm-0.33:deep_gemm_mega_moe+plugin")["verdict"] == "loads"
        assert verdict(rep, "vllm-0.34:flashinfer_cutedsl")["verdict"] == "loads"
        g = groups(rep)
        assert g["mtp.0.ffn.experts"]["format"] == "MXFP4"
        assert [x["layer"] for x in rep["groups"]] == ["0", "1", "2", "mtp.0"]
    assert groups(ca)["layers.0.ffn.experts"]["naming"]["block_scale"] == "scale"
    assert groups(ca)["layers.0.ffn.experts"]["naming"]["scalar_shape"] == "[1]"
    assert groups(nv)["layers.0.ffn.experts"]["naming"]["scalar_shape"] == "0-d"
    assert nv["config"]["quant_algo"] == "MIXED_PRECISION" and nv["config"]["quantized_layers"] == {
        "config.json": 3,
        "hf_quant_config.json": 3,
    }
    assert ca["config"]["quant_algo"] is None and ca["config"]["expert_format"]["scale_dtype"] == "fp8_e4m3"


def test_sglang_reads_the_dsv4_recipe_keys_from_config_json_only(dsv4, tmp_path):
    """SGLang 0.5.23 detects NVFP4 DeepSeek-V4 from config.json's quantization_config alone
    (tests/sglang runs its code on this case): the same keys only in hf_quant_config.json fail."""
    import shutil

    src = tmp_path / "nv"
    shutil.copytree(dsv4["nvidia"], src)
    cfg = json.loads((src / "config.json").read_text())
    hq = json.loads((src / "hf_quant_config.json").read_text())
    for k in ("quant_algo", "moe_quant_algo", "group_size"):
        hq["quantization"][k] = cfg["quantization_config"].pop(k)
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "hf_quant_config.json").write_text(json.dumps(hq))
    rep = report_of(src)
    assert rep["config"]["quant_algo"] == "MIXED_PRECISION"  # what vLLM reads is still there
    row = verdict(rep, "sglang-0.5.23:flashinfer_trtllm")
    assert row["verdict"] == "fails" and "in config.json's quantization_config" in row["messages"][0]
    assert verdict(report_of(dsv4["nvidia"]), "sglang-0.5.23:flashinfer_trtllm")["verdict"] == "loads"


def test_dsv4_unequal_scale_2_fails_megamoe_on_the_plugin(dsv4, tmp_path):
    import shutil

    src = tmp_path / "nv"
    shutil.copytree(dsv4["nvidia"], src)
    rewrite_tensors(src, lambda t: t.update({"layers.1.ffn.experts.2.w3.weight_scale_2": t["layers.1.ffn.experts.2.w3.weight_scale_2"] * 3})
                    if "layers.1.ffn.experts.2.w3.weight_scale_2" in t else None)  # fmt: skip
    rep = report_of(src)
    row = verdict(rep, "vllm-0.33:deep_gemm_mega_moe+plugin")
    assert row["verdict"] == "fails" and "MegaMoE NVFP4 expert 2" in row["messages"][0]
    assert "up half off by up to 3x in 1 experts" in verdict(rep, "vllm-0.34:flashinfer_cutedsl")["messages"][0]
    assert rep["summary"]["scale_2_worst_at"] == {"prefix": "layers.1.ffn.experts", "expert": 2}


@pytest.mark.parametrize("target", ["mega-moe", "vllm-fused"])
def test_fused_output_stock_fails_plugin_loads(dsv4, tmp_path, target):
    from nvfp4_fuse.convert import ConvertOptions, convert

    out = tmp_path / "fused"
    convert(dsv4["nvidia"], out, ConvertOptions(target=target))
    rep = report_of(out)
    assert [g["format"] for g in rep["groups"]] == ["fused", "fused", "fused", "MXFP4"]
    assert rep["config"]["fused_experts"]["target"] == target
    for v in ("0.33", "0.34"):
        for b in ("deep_gemm_mega_moe", "flashinfer_cutlass", "marlin"):
            stock = verdict(rep, f"vllm-{v}:{b}")
            assert stock["verdict"] == "fails" and "on every per-expert NVFP4 backend" in stock["messages"][0]
        # the plugin reads every target: mega-moe as it is, the others through MegaMoE's per-expert loader
        assert verdict(rep, f"vllm-{v}:deep_gemm_mega_moe+plugin")["verdict"] == "loads"
    assert not rep["problems"] and not rep["summary"]["defective_groups"]


def test_csf_block_scales_detected(make_ckpt):
    src = make_ckpt(scheme="hf", layers=2, experts=4, hidden=64, inter=32)

    def encode(t):
        for n in [n for n in t if n.endswith(".weight_scale") and ".experts." in n]:
            for stream, data in csf.encode("csf", t.pop(n).view(torch.uint8).numpy()).items():
                t[f"{n}.{stream}"] = torch.from_numpy(np.ascontiguousarray(data))

    rewrite_tensors(src, encode)
    hq = json.loads((src / "hf_quant_config.json").read_text())
    hq["quantization"]["weight_scale_encoding"] = "csf"
    (src / "hf_quant_config.json").write_text(json.dumps(hq))
    rep = report_of(src)
    g = groups(rep)["model.layers.1.mlp.experts"]
    assert g["naming"]["block_scale_encoding"] == "csf" and g["csf_block_scales"] == 12 and g["block_scales_missing"] == 0
    assert g["problem"] is None and rep["csf"] == {"streams": 24, "encoded_scales": 12, "encodings": ["csf"]}
    assert rep["config"]["weight_scale_encoding"] == "csf"
    assert verdict(rep, "vllm-0.33:flashinfer_cutlass")["verdict"] == "fails"
    assert verdict(rep, "vllm-0.34:flashinfer_cutlass")["verdict"] == "loads"
    assert verdict(rep, "sglang-0.5.23:flashinfer_cutlass")["verdict"] == "fails"


# ------------------------------------------------------------------------------------------------
# the tolerant scan and the strict path


def test_strict_path_raises_what_it_raised_before_and_the_scan_keeps_going(make_ckpt):
    src = make_ckpt(scheme="deepseek", layers=3, experts=4, hidden=64, inter=32)

    def damage(t):
        t.pop("layers.1.ffn.experts.2.w3.input_scale", None)
        if "layers.2.ffn.experts.1.w2.weight_scale" in t:
            t["layers.2.ffn.experts.1.w2.weight_scale"] = t["layers.2.ffn.experts.1.w2.weight_scale"].view(torch.uint8)

    rewrite_tensors(src, damage)
    s = scan_source(src)
    with pytest.raises(InputError) as ei:
        group_experts(s)
    # the converter tolerates an absent input scale (read_scalars repairs it): it raises the next defect
    assert "weight_scale must be F8_E4M3, not U8" in str(ei.value)
    scan = scan_experts(s)
    assert len(scan.problems) == 2 and str(scan.problems[1]) == str(ei.value)
    assert str(scan.problems[0]) == "layers.1.ffn.experts.2 up: missing input_scale (has weight, weight_scale, weight_scale_2)"
    # tolerant of absent input scales, the first group checks and the second stays a defect
    tol = scan_experts(s, tolerate_missing=("input_scale",))
    assert tol.groups["layers.1.ffn.experts"].layer is not None
    assert tol.groups["layers.1.ffn.experts"].missing == [(2, "up", "input_scale")]
    assert len(tol.problems) == 1
    rep = report_of(src)
    assert groups(rep)["layers.1.ffn.experts"]["input_scale_w13"]["up"]["missing"] == [2]
    assert "F8_E4M3, not U8" in groups(rep)["layers.2.ffn.experts"]["problem"]
    assert verdict(rep, "vllm-0.34:marlin")["verdict"] == "fails"  # the defect fails every engine


def test_rules_name_their_source_and_cover_every_engine():
    ids = {e.id for e in ENGINES}
    assert {"vllm-0.33", "vllm-0.34", "sglang-0.5.23", "trtllm"} == ids
    for r in RULES:
        assert r.source and r.version and r.when
        assert set(r.engines) <= ids


# ------------------------------------------------------------------------------------------------
# CLI: JSON, exit codes, --engine


def test_cli_json_schema_and_exit_codes(make_ckpt, tmp_path, monkeypatch, capsys):
    runner = CliRunner()
    clean = make_ckpt(scheme="hf", layers=2, experts=4, hidden=64, inter=32)
    r = runner.invoke(app, ["inspect", str(clean), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["schema"] == SCHEMA and d["command"] == "inspect" and d["ok"] is True and d["exit_code"] == 0
    assert set(d) >= {"source", "config", "groups", "summary", "engines", "csf", "problems"}
    for row in d["engines"]:
        assert set(row) >= {"id", "engine", "backend", "verdict", "messages", "rules"}
    unequal = make_ckpt(scheme="hf", layers=2, experts=4, hidden=64, inter=32, unequal_scale_2=True)
    r = runner.invoke(app, ["inspect", str(unequal)])
    assert r.exit_code == EXIT_ENGINE_ISSUES and "up half off by up to" in r.output
    assert all(len(line) <= 80 for line in r.output.splitlines())
    # gate on one engine: TensorRT-LLM's trtllm-gen keeps both scales
    assert runner.invoke(app, ["inspect", str(unequal), "--engine", "trtllm:trtllm"]).exit_code == 0
    assert runner.invoke(app, ["inspect", str(unequal), "--engine", "vllm-0.34"]).exit_code == EXIT_ENGINE_ISSUES
    rc, _, err = run_inprocess(capsys, "inspect", str(unequal), "--engine", "nope")
    assert rc == 2 and "--engine 'nope' is none of" in err
    assert run_inprocess(capsys, "inspect", str(unequal), "--engine", "sglang-0.5.23")[0] == EXIT_ENGINE_ISSUES
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = run_inprocess(capsys, "inspect", str(tmp_path / "nothing-here"))
    assert rc == 2 and "HF_HUB_OFFLINE" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_inprocess(capsys, "inspect", str(tmp_path / "empty"))
    assert rc == 2 and "no model.safetensors.index.json" in err


# ------------------------------------------------------------------------------------------------
# repo ids over HTTP ranges


def test_coalesce_groups_nearby_ranges_within_a_span():
    rng = [(0, 4), (10, 14), (2000, 2004), (2008, 2012), (9000, 9004)]
    spans = coalesce(rng, max_gap=100, max_span=1 << 20)
    assert [(s.begin, s.end, s.members) for s in spans] == [(0, 14, (0, 1)), (2000, 2012, (2, 3)), (9000, 9004, (4,))]
    spans = coalesce(rng, max_gap=10**6, max_span=2004)
    assert [(s.begin, s.end) for s in spans] == [(0, 2004), (2008, 2012), (9000, 9004)]
    shuffled = rng[::-1]
    assert sorted(m for s in coalesce(shuffled, max_gap=100) for m in s.members) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("resave", [False, True], ids=["writer-order", "dtype-sorted"])
def test_repo_id_matches_the_local_report_in_bounded_requests(make_ckpt, fake_hub, tmp_path, monkeypatch, resave):  # noqa: F811
    src = make_ckpt(scheme="hf", layers=4, experts=16, hidden=64, inter=32, shards=3, unequal_scale_2=True,
                    input_scale_defects={(2, 5, "down"): "zero", (3, 1, "gate"): "missing"})  # fmt: skip
    if resave:
        rewrite_tensors(src, lambda t: None)  # safetensors' own writer: tensors sorted by dtype
    fake_hub.create("org/src", {p.name: p.read_bytes() for p in src.iterdir()})
    shards = len(set(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"].values()))
    before = len(fake_hub.log)
    r = CliRunner().invoke(app, ["inspect", "org/src", "--json"])
    assert r.exit_code == EXIT_ENGINE_ISSUES, (r.output, r.exception)
    remote = json.loads(r.output)
    local = report_of(src)
    for k in ("groups", "summary", "engines", "config", "csf", "problems"):
        assert remote[k] == local[k], k
    reads = remote["source"]["reads"]
    n_scalars = remote["scalars_read"]
    assert n_scalars == 3 * 16 * 2 * 3 - 1  # 3 MoE layers x 16 experts x 3 roles x 2 scalars, one absent
    # one length prefix per shard plus one request per shard's scalars (they lie within 1 MiB)
    assert reads["range_requests"] <= 2 * shards < n_scalars
    ranged = [x for x in fake_hub.log[before:] if x[1] == "resolve" and x[2].endswith(".safetensors") and x[3] == 206]
    assert len(ranged) == reads["range_requests"] + shards  # + get_safetensors_metadata's header reads


def test_a_group_mixing_mxfp4_and_nvfp4_is_reported_unknown_and_the_rest_still_read(dsv4, tmp_path):
    import shutil

    src = tmp_path / "ca"
    shutil.copytree(dsv4["canada"], src)
    name = "layers.1.ffn.experts.3.w1.scale"

    def mix(t):
        if name in t:
            rows, cols = t[name].shape
            t[name] = torch.full((rows, cols // 2), 1.0).to(torch.float8_e8m0fnu)

    rewrite_tensors(src, mix)
    rep = report_of(src)
    g = groups(rep)
    assert g["layers.1.ffn.experts"]["format"] == "unknown"
    assert "mixes MXFP4 and NVFP4 experts: expert 3 gate is MXFP4" in g["layers.1.ffn.experts"]["problem"]
    assert [g[p]["format"] for p in ("layers.0.ffn.experts", "layers.2.ffn.experts", "mtp.0.ffn.experts")] == [
        "NVFP4",
        "NVFP4",
        "MXFP4",
    ]
    assert rep["summary"]["defective_groups"] == ["layers.1.ffn.experts"]
    row = verdict(rep, "vllm-0.34:marlin")
    assert row["verdict"] == "fails" and "mixes MXFP4 and NVFP4" in row["messages"][0]
