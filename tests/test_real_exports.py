"""Real exporters' NVFP4 checkpoints as inputs: a tiny Qwen3-MoE exported by NVIDIA ModelOpt (current,
and older-style with gate/up ``weight_scale_2`` unsynced) and by llm-compressor (compressed-tensors),
made fresh by ``scripts/make_real_exports.py`` in ``.venv-exporters``. Each is inspected, converted
with every target and verified; the older-style one is repaired by ``--target per-expert``.

Skipped when ``.venv-exporters`` does not exist (``bash scripts/make_real_exports.sh OUT`` creates it:
nvidia-modelopt and llmcompressor with their dependencies, about 1.7 GB).
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from helpers import run_inprocess

from nvfp4_fuse.inspect import exit_code, inspect, local_input

ROOT = Path(__file__).resolve().parents[1]
EXPORTERS = ROOT / ".venv-exporters" / "bin" / "python"
KINDS = ("modelopt", "modelopt-unsynced", "llmcompressor")
TARGETS = ("mega-moe", "vllm-fused", "linear", "per-expert")
LAYERS, EXPERTS = 2, 8


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    if not EXPORTERS.exists():
        pytest.skip("no .venv-exporters: run `bash scripts/make_real_exports.sh OUT` once to create it")
    out = tmp_path_factory.mktemp("real-exports")
    subprocess.run(
        [str(EXPORTERS), str(ROOT / "scripts" / "make_real_exports.py"), str(out), "--seed", str(random.randrange(2**31))],
        check=True, capture_output=True, cwd=ROOT,
    )
    return {k: out / k for k in KINDS}


def _summary(folder: Path) -> tuple[dict, int]:
    report = inspect(local_input(folder))
    return report, exit_code(report)


def _pairs_that_differ(folder: Path) -> int:
    """Gate/up pairs whose weight_scale_2 (ModelOpt) or weight_global_scale (compressed-tensors)
    differ, read straight from the shard."""
    from safetensors.torch import load_file

    t = load_file(folder / "model.safetensors")
    field = "weight_global_scale" if "model.layers.0.mlp.experts.0.gate_proj.weight_global_scale" in t else "weight_scale_2"
    p = "model.layers.{}.mlp.experts.{}.{}_proj." + field
    return sum(not bool((t[p.format(n, x, "gate")] == t[p.format(n, x, "up")]).all()) for n in range(LAYERS) for x in range(EXPERTS))


def test_what_the_exporters_wrote(exports):
    """The spellings and config each exporter writes, as the converter reads them."""
    for kind, folder in exports.items():
        report, _ = _summary(folder)
        groups = report["groups"]
        assert [g["prefix"] for g in groups] == [f"model.layers.{n}.mlp.experts" for n in range(LAYERS)]
        assert {g["format"] for g in groups} == {"NVFP4"}
        cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
        if kind == "llmcompressor":
            assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "nvfp4-pack-quantized"
        else:
            assert (cfg["quant_method"], cfg["quant_algo"]) == ("modelopt", "NVFP4")
            assert json.loads((folder / "hf_quant_config.json").read_text())["producer"]["name"] == "modelopt"


def test_inspect_finds_the_older_style_exports_unequal_gate_up_scales(exports):
    for kind, folder in exports.items():
        report, code = _summary(folder)
        differ = report["summary"]["scale_2_pairs_differ"]
        assert differ == _pairs_that_differ(folder)
        if kind == "modelopt-unsynced":
            # each half calibrated on its own weights: (nearly) every pair differs
            assert differ > LAYERS * EXPERTS // 2 and code == 5
            rows = [r for r in report["engines"] if r["id"] == "vllm-0.34:flashinfer_cutlass"]
            assert rows[0]["verdict"] == "lossy" and "up half off by up to" in rows[0]["messages"][0]
        else:
            assert differ == 0 and code == 0, (kind, differ, code)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_target_converts_and_verifies(exports, kind, target, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_inprocess(capsys, "convert", str(exports[kind]), str(out), "--target", target)
    assert code == 0, err
    code, _, err = run_inprocess(capsys, "verify", str(exports[kind]), str(out))
    assert code == 0, err
    if target == "per-expert":
        report, code = _summary(out)
        assert report["summary"]["scale_2_pairs_differ"] == 0 and code == 0
