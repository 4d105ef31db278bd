"""Golden tests: every fused tensor equals an independent slow reference built from the source tensors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_all
from references import check_output_against_reference, raw
from safetensors import safe_open

from nvfp4_fuse.convert import ConvertOptions, convert
from nvfp4_fuse.manifest import MANIFEST_NAME, check_files, load_manifest
from nvfp4_fuse.nvfp4 import dequantize


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
    for side in ("generation_config.json", "tokenizer_config.json"):
        assert (out / side).read_bytes() == (src / side).read_bytes()
    # README.md describes the output, not the source: a model card of the conversion, in the manifest
    card = (out / "README.md").read_text()
    assert card != (src / "README.md").read_text() and "vllm-fused" in card and "library_name" not in card
    assert "vllm serve" not in card and str(out) not in card
    man = json.loads((out / "nvfp4-fuse-manifest.json").read_text())
    assert man["model_card"] == man["files"]["README.md"]["sha256"]
    cfg = json.loads((out / "config.json").read_text())
    hq = json.loads((out / "hf_quant_config.json").read_text())
    assert cfg["quantization_config"]["quant_algo"] == "NVFP4"
    assert hq["quantization"]["quant_algo"] == "NVFP4"
    for block in (cfg["quantization_config"]["fused_experts"], hq["fused_experts"]):
        assert block["layout"] == "nvfp4-fuse/v2" and block["target"] == "vllm-fused" and block["values"] == "U8"
        assert block["scale_layout"] == "swizzle128x4" and block["w13_rows"] == "gate-up"
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = load_all(out)
    assert set(idx["weight_map"]) == set(tensors)
    assert idx["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f in set(idx["weight_map"].values()):
        with safe_open(str(out / f), "pt") as fh:
            meta = fh.metadata()
        assert meta["format"] == "pt" and meta["nvfp4_fuse_layout"] == "nvfp4-fuse/v2"
    man = load_manifest(out)
    assert man is not None and check_files(out, man) == []
    assert set(man.files) == {p.name for p in out.iterdir()} - {MANIFEST_NAME}
    assert not list(out.glob("*.partial")) and not (out / ".nvfp4-fuse-progress.json").exists()


def test_memory_does_not_hold_a_layer(make_ckpt, tmp_path, monkeypatch):
    """The writer gets at most one expert's bytes per call: nothing stacks a layer in memory."""
    from nvfp4_fuse import shard_writer

    src = make_ckpt(layers=2, experts=16, hidden=128, inter=64)
    biggest = []
    orig = shard_writer.StreamingShardWriter.put

    def spy(self, pieces, *a, **kw):
        biggest.append(sum(v.nbytes for v in shard_writer.piece_views(pieces)))
        return orig(self, pieces, *a, **kw)

    monkeypatch.setattr(shard_writer.StreamingShardWriter, "put", spy)
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
@pytest.mark.parametrize("unequal", [False, True])
def test_mega_moe_matches_the_reference(make_ckpt, tmp_path, scheme, unequal):
    src = make_ckpt(scheme=scheme, layers=2, experts=3, hidden=512, inter=1024, shards=3, unequal_scale_2=unequal)
    out = tmp_path / "out"
    res = convert(src, out, ConvertOptions())  # the default target
    assert all((r.max_rescale_change > 0) == unequal for r in res.layers)
    check_output_against_reference(src, out, layout="mega-moe")


def test_mega_moe_refuses_shapes_the_kernel_cannot_take(make_ckpt, tmp_path):
    from nvfp4_fuse.errors import InputError

    src = make_ckpt(layers=2, experts=2, hidden=256, inter=128)
    with pytest.raises(InputError, match="multiples of 512.*hidden 256, intermediate 128.*--target vllm-fused"):
        convert(src, tmp_path / "out", ConvertOptions(target="mega-moe"))
    with pytest.raises(InputError, match="--w13-order"):
        convert(src, tmp_path / "out", ConvertOptions(target="mega-moe", w13_order="up-gate"))


def test_a_shared_atomic_write_lands_whole_whoever_writes_at_the_same_time(tmp_path):
    """A cache file (a kernel binary, a verify journal, a recorded result) may be written by two runs at
    once: with ``shared`` each write has a temporary file of its own, so the file ends as one writer's
    bytes, whole, and no temporary file is left."""
    import threading

    import numpy as np

    from nvfp4_fuse.shard_writer import write_file_atomic

    path = tmp_path / "entry.bin"
    blobs = [np.random.randint(0, 256, np.random.randint(1, 300_000), dtype=np.uint8).tobytes() for _ in range(6)]
    errors: list[BaseException] = []

    def writer(blob: bytes) -> None:
        try:
            for _ in range(20):
                assert write_file_atomic(path, blob, shared=True)[0] == len(blob)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(b,)) for b in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert path.read_bytes() in blobs
    assert [p.name for p in tmp_path.iterdir()] == ["entry.bin"]
