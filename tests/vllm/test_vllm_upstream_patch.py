"""``patches/vllm-0.34.0-dsv4-nvfp4-mega-moe.patch``, the fix in vLLM's own source: applied with
``patch -p1`` to a copy of the installed vLLM 0.34.0, it makes stock vLLM (the plugin disabled)
build NVFP4 MegaMoE experts for NVFP4 DeepSeek-V4 and V4.1 checkpoints and load per-expert ones
to the same bytes as the plugin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import checkpoints
import harness
import pytest
import torch
from test_vllm_loading import assert_same_state

PATCH = Path(__file__).resolve().parents[2] / "patches" / "vllm-0.34.0-dsv4-nvfp4-mega-moe.patch"

pytestmark = pytest.mark.skipif(harness.VLLM_MINOR != "0.34", reason="the patch is against vLLM 0.34.0's source")

# Runs in a fresh interpreter whose `vllm` is the patched copy, with the plugin disabled: builds
# vLLM's own class (STOCK / STOCK_V41) on each EP rank, loads the checkpoint through
# DefaultModelLoader and saves the routed experts' bytes.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ["VLLM_TARGET_DEVICE"] = "cpu"
    import torch, vllm, harness
    src, ep_size, redundant, v41, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
    assert vllm.__file__.startswith(os.environ["PATCHED"]), vllm.__file__
    states = []
    for rank in range(ep_size):
        cfg = harness.engine_config(src, redundant=redundant)
        model = harness.build(cfg, harness.STOCK_V41 if v41 else harness.STOCK, ep_size=ep_size, ep_rank=rank)
        harness.load(model, cfg)
        states.append(harness.experts_state(model))
    assert not any(m.startswith("nvfp4_fuse.vllm.deepseek") for m in sys.modules), "the plugin ran"
    torch.save(states, out)
    print("ok")
    """
)


@pytest.fixture(scope="module")
def patched_vllm(tmp_path_factory):
    """A copy of the installed vLLM package with the patch applied by `patch -p1`."""
    import vllm

    if shutil.which("patch") is None:
        pytest.skip("no `patch` program")
    root = tmp_path_factory.mktemp("patched")
    shutil.copytree(Path(vllm.__file__).parent, root / "vllm", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run(["patch", "-p1", "--forward", "-i", str(PATCH)], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    yield root
    shutil.rmtree(root / "vllm")  # about 0.5 GB


def stock_states(patched: Path | None, src: Path, ep_size: int, redundant: int, v41: bool, tmp_path: Path):
    out = tmp_path / f"states-{ep_size}-{redundant}.pt"
    here = Path(__file__).resolve().parent
    env = {**os.environ, "VLLM_PLUGINS": "none", "PATCHED": str(patched or "/")}
    env["PYTHONPATH"] = os.pathsep.join([*([str(patched)] if patched else []), str(here), env.get("PYTHONPATH", "")])
    args = [sys.executable, "-c", CHILD, str(src), str(ep_size), str(redundant), "1" if v41 else "0", str(out)]
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    return r, (torch.load(out) if r.returncode == 0 else None)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    import random

    root = tmp_path_factory.mktemp("upstream")
    seed = random.randrange(2**31)
    return {
        "canada": checkpoints.write_source(root / "canada", "canada", seed=seed),
        "nvidia": checkpoints.write_source(root / "nvidia", "nvidia", seed=seed),
        "v41": checkpoints.write_source(root / "v41", "nvidia", dims=checkpoints.V41_DIMS, seed=seed, v41=True),
    }


def test_the_patch_is_against_the_packages_paths_and_touches_only_vllms_deepseek_code():
    text = PATCH.read_text()
    files = [line.split()[-1] for line in text.splitlines() if line.startswith("+++ ")]
    assert files and all(f.startswith("b/vllm/models/deepseek_v4") for f in files), files
    assert "fused" not in text.lower().replace("fused_moe", "").replace("fused_mapping", "").replace("fused_topk", "")


def test_stock_vllm_fails_without_the_patch(sources, tmp_path):
    r, _ = stock_states(None, sources["nvidia"], 1, 0, False, tmp_path)
    assert r.returncode != 0 and "KeyError: 'layers.0.ffn.experts.w13_input_scale'" in r.stderr


@pytest.mark.parametrize(("ckpt", "ep_size", "redundant"), [("nvidia", 1, 0), ("canada", 2, 2), ("v41", 3, 1)])
def test_patched_stock_vllm_loads_per_expert_checkpoints_as_the_plugin_does(
    plugin, patched_vllm, sources, tmp_path, ckpt, ep_size, redundant
):
    r, states = stock_states(patched_vllm, sources[ckpt], ep_size, redundant, ckpt == "v41", tmp_path)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]
    for rank, state in enumerate(states):
        cfg = harness.engine_config(sources[ckpt], redundant=redundant)
        model = harness.build(cfg, ep_size=ep_size, ep_rank=rank)
        harness.load(model, cfg)
        ours = harness.experts_state(model)
        assert any(k.endswith("w13_weight_scale_2") for k in state), "patched vLLM built no NVFP4 experts"
        assert_same_state(state, ours, f"patched vLLM vs plugin: {ckpt} EP {ep_size} rank {rank} +{redundant}")


def test_the_patch_keeps_layers_the_manifest_leaves_out_as_vllm_builds_them(patched_vllm, sources, tmp_path):
    """NVIDIA's manifest without layer 0: the patched quant config leaves layer 0 MXFP4."""
    src = tmp_path / "partial"
    src.mkdir()
    for f in sources["nvidia"].iterdir():
        if f.name != "config.json":
            (src / f.name).symlink_to(f)
    cfg = json.loads((sources["nvidia"] / "config.json").read_text())
    del cfg["quantization_config"]["quantized_layers"]["layers.0.ffn.experts"]
    cfg["quantization_config"]["ignore"].append("layers.0.*")
    (src / "config.json").write_text(json.dumps(cfg))
    code = "import os, sys; os.environ['VLLM_TARGET_DEVICE']='cpu'; import harness; " \
        "cfg = harness.engine_config(sys.argv[1]); m = harness.build(cfg, harness.STOCK); " \
        "print([l.ffn.experts.weight_format.name for l in m.model.layers])"
    env = {**os.environ, "VLLM_PLUGINS": "none",
           "PYTHONPATH": os.pathsep.join([str(patched_vllm), str(Path(__file__).resolve().parent)])}
    r = subprocess.run([sys.executable, "-c", code, str(src)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "['mxfp4', 'nvfp4']"
