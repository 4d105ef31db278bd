"""SGLang 0.5.23's own detection and DeepSeek-V4 name mapping, run on a canada-quant DeepSeek-V4
sample and its ``--target per-expert`` repair (and NVIDIA's recipe, which SGLang already takes).

canada-quant's recipe (E4M3 block scales under ``.scale``, no ``quant_algo: MIXED_PRECISION``) is not
taken as NVFP4: ``nvfp4_moe_meta`` stays unset, the experts get the native MXFP4 method
(``Fp8MoEMethod``, int8 codes and a float32 scale per 32), the NVFP4 block scales are mapped onto that
method's per-32 ``weight_scale_inv`` (a shape they do not have) and both ``weight_scale_2`` and
``input_scale`` onto nothing, which the loader skips without a word. The repaired checkpoint is
detected as SGLang's hybrid FP8 + NVFP4 (``HybridFp8NvFp4Config``, ``ModelOptNvFp4FusedMoEMethod``)
and every expert tensor lands on an NVFP4 parameter of its dtype and shape. What runs of SGLang, and
what is stood in for, is in ``sglang_code`` and ``conftest``.

Only detection and name mapping are run: building SGLang's DeepSeek-V4 model (and so its
``FusedMoE.weight_loader``) needs its distributed state and CUDA attention kernels.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import sglang_code
from safetensors import safe_open

from nvfp4_fuse.sample_dsv4 import NVIDIA_IGNORE, DSv4SampleSpec, make_dsv4_sample

EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(\w+)$")
SPEC = dict(layers=2, hash_layers=1, experts=8, hidden=512, inter=512)


@pytest.fixture(scope="module", params=["canada", "nvidia"])
def pair(request, tmp_path_factory):
    from nvfp4_fuse.convert import ConvertOptions, convert

    recipe = request.param
    root = tmp_path_factory.mktemp(f"sglang-{recipe}")
    src = make_dsv4_sample(root / "src", DSv4SampleSpec(recipe=recipe, seed=random.randrange(2**31), **SPEC))
    sglang_code.with_sglang_fields(src)
    out = root / "repaired"
    convert(src, out, ConvertOptions(target="per-expert"))
    return recipe, src, out


def _expert_tensors(folder):
    """{name: tensor} of every routed expert tensor of the trunk."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(folder / shard, "pt") as f:
            out |= {n: f.get_tensor(n) for n in f.keys() if EXPERT.match(n)}
    return out


NVFP4_META = {"group_size": 16, "exclude_modules": list(NVIDIA_IGNORE)}


def test_sglang_takes_the_repaired_checkpoint_as_nvfp4_and_not_canadas_source(pair):
    recipe, src, out = pair
    s, r = sglang_code.detect(src), sglang_code.detect(out)
    assert (r.nvfp4_moe_meta, r.quant_config, r.moe_method) == (NVFP4_META, "HybridFp8NvFp4Config", "ModelOptNvFp4FusedMoEMethod")
    if recipe == "canada":
        assert s.nvfp4_moe_meta is None
        assert (s.quant_config, s.moe_method, s.is_fp4_experts) == ("Fp8Config", "Fp8MoEMethod", True)  # MXFP4 experts
    else:
        assert (s.nvfp4_moe_meta, s.quant_config, s.moe_method) == (NVFP4_META, "HybridFp8NvFp4Config", "ModelOptNvFp4FusedMoEMethod")


def test_every_repaired_expert_tensor_lands_on_an_nvfp4_parameter_of_its_shape(pair):
    _, _, out = pair
    d = sglang_code.detect(out)
    experts = SPEC["experts"]
    filled: dict[str, set[int]] = {}
    for name, t in _expert_tensors(out).items():
        got = sglang_code.target(name, d.params, experts)
        assert got is not None, name
        pname, x, shard = got
        n, ex, w, field = EXPERT.match(name).groups()
        assert (int(ex), shard) == (x, w)
        assert pname == f"model.layers.{n}.mlp.experts.{'w2' if w == 'w2' else 'w13'}_{field}", (name, pname)
        p = d.params[pname]
        assert p.dtype == t.dtype, (name, p.dtype, t.dtype)
        if p.dim() == 3:  # per-expert matrices: w13 stacks gate and up rows
            rows = 2 * t.shape[0] if w != "w2" else t.shape[0]
            assert tuple(p.shape[1:]) == (rows, t.shape[1]), (name, tuple(p.shape), tuple(t.shape))
        else:
            assert t.dim() == 0, (name, tuple(t.shape))
        filled.setdefault(pname, set()).add(x)
    loadable = {k for k in d.params if not k.endswith("_blockscale_swizzled")}
    assert set(filled) == loadable
    assert all(v == set(range(experts)) for v in filled.values())


def test_canadas_source_block_scales_land_on_mxfp4_scales_and_its_scalars_nowhere(pair):
    recipe, src, _ = pair
    if recipe != "canada":
        pytest.skip("NVIDIA's recipe is taken as NVFP4 as it is")
    d = sglang_code.detect(src)
    skipped, misfit = [], []
    for name, t in _expert_tensors(src).items():
        field = EXPERT.match(name).group(4)
        got = sglang_code.target(name, d.params, SPEC["experts"])
        if field in ("weight_scale_2", "input_scale"):
            skipped.append(got is None)
        elif field == "scale":  # E4M3, one per 16 values
            assert got is not None and got[0].endswith("_weight_scale_inv"), (name, got)
            p = d.params[got[0]]
            misfit.append((p.dtype, p.shape[-1]) != (t.dtype, t.shape[-1]))
            assert p.shape[-1] * 2 == t.shape[-1]  # the MXFP4 parameter holds one scale per 32
    assert skipped and all(skipped)
    assert misfit and all(misfit)


def _keys_only_in_hf_quant_config(src, dst):
    """``src`` (NVIDIA's recipe) with quant_algo, moe_quant_algo and group_size moved from
    config.json's quantization_config to hf_quant_config.json's quantization block."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    hq = json.loads((dst / "hf_quant_config.json").read_text())
    for k in ("quant_algo", "moe_quant_algo", "group_size"):
        hq["quantization"][k] = cfg["quantization_config"].pop(k)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    (dst / "hf_quant_config.json").write_text(json.dumps(hq, indent=2))
    return dst


def test_inspect_says_what_sglang_detects(pair, tmp_path):
    """inspect's SGLang verdict ("not detected as NVFP4" or not) is what SGLang's own code decides,
    for the source, its repair, and NVIDIA's recipe with the keys only in hf_quant_config.json
    (SGLang reads config.json's quantization_config alone)."""
    from nvfp4_fuse.inspect import inspect, local_input

    recipe, src, out = pair
    folders = [src, out]
    if recipe == "nvidia":
        folders.append(_keys_only_in_hf_quant_config(src, tmp_path / "hq-only"))
    for folder in folders:
        detected = sglang_code.detect(folder)
        rows = [r for r in inspect(local_input(folder))["engines"] if r["engine_id"] == "sglang-0.5.23"]
        said = {any("not detected as NVFP4" in m for m in r["messages"]) for r in rows}
        assert said == {detected.nvfp4_moe_meta is None}, (folder.name, said, detected.nvfp4_moe_meta)
        if detected.nvfp4_moe_meta is None:
            assert {r["verdict"] for r in rows} == {"fails"}
            for name in _expert_tensors(folder):
                if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
                    assert sglang_code.target(name, detected.params, SPEC["experts"]) is None, name
    if recipe == "nvidia":
        assert sglang_code.detect(folders[-1]).nvfp4_moe_meta is None
