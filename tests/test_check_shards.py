"""check_shards: verify's checks over any subset of a conversion's output shards, each shard read alone."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from nvfp4_fuse import decode_lanes, shard_reader
from nvfp4_fuse.convert import ConvertOptions, convert
from nvfp4_fuse.errors import CheckFailed
from nvfp4_fuse.manifest import load_manifest
from nvfp4_fuse.safetensors_header import read_header
from nvfp4_fuse.source import scan_source
from nvfp4_fuse.spec import OutputOptions, build_spec
from nvfp4_fuse.verify import check_shards, verify


def _conversion(make_ckpt, tmp_path: Path, target: str):
    src = make_ckpt(layers=2, experts=6, hidden=64, inter=32, unequal_scale_2=True)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=target, max_shard_size=random.choice([5_000, 9_000])))
    man = load_manifest(out)
    spec = build_spec(scan_source(src), OutputOptions.from_json(man.options, file=str(out)))
    return src, out, man, spec


def _count_decodes(monkeypatch) -> Counter:
    """Every expert part the CPU lane decodes, by (layer, part, expert)."""
    launched: Counter = Counter()
    real = decode_lanes.ReferenceLane.launch

    def launch(self, key, *args):
        launched[key[:3]] += 1
        return real(self, key, *args)

    monkeypatch.setattr(decode_lanes.ReferenceLane, "launch", launch)
    return launched


@pytest.mark.parametrize("target", ["vllm-fused", "linear", "per-expert"])
def test_shard_by_shard_checks_decode_every_part_once_and_agree_with_verify(make_ckpt, tmp_path, monkeypatch, target):
    src, out, man, spec = _conversion(make_ckpt, tmp_path, target)
    names = [s.name for s in spec.shards]
    weight_map = spec.weight_map()
    values = {n: n.removesuffix("_scale") for n in weight_map if n.endswith("weight_scale")}
    split = [n for n, v in values.items() if v in weight_map and weight_map[n] != weight_map[v]]
    if target != "per-expert":  # (which keeps an expert's tensors in one shard)
        assert split, "no expert part has its values and block scales in two shards: the test would prove nothing"

    launched = _count_decodes(monkeypatch)
    whole = verify(src, out, device="cpu", decode=True)
    once = dict(launched)
    assert set(once.values()) == {1}
    launched.clear()

    opened: list[str] = []
    real_init = shard_reader.ShardReader.__init__

    def init(self, header):
        if Path(header.path).parent == out:
            opened.append(Path(header.path).name)
        real_init(self, header)

    monkeypatch.setattr(shard_reader.ShardReader, "__init__", init)
    sha = {n: man.files[n]["sha256"] for n in names}
    parts = []
    for n in random.sample(names, len(names)):
        opened.clear()
        parts.append(check_shards(spec, out, [n], sha256=sha, decode="cpu", workers=random.choice([1, 3])))
        assert opened == [n]  # no other output shard was read
    assert dict(launched) == once  # each part decoded once, over the calls, as by verify
    for i, lw in enumerate(whole.layers):
        got = [p.layers[i] for p in parts]
        assert sum(g.checked for g in got) == lw.checked == 6
        assert sum(g.decoded for g in got) == lw.decoded == 6
        assert max(g.max_rel for g in got) == lw.max_rel
        assert max(g.max_abs or 0.0 for g in got) == lw.max_abs
    assert sum(p.copied_tensors for p in parts) == whole.copied_tensors
    assert sum(p.files_hashed for p in parts) == len(names)


def test_a_damaged_shard_fails_alone_and_a_wrong_digest_is_caught(make_ckpt, tmp_path):
    src, out, man, spec = _conversion(make_ckpt, tmp_path, "vllm-fused")
    name = "layers.1.ffn.experts.w2_weight"
    shard = spec.weight_map()[name]
    others = [s.name for s in spec.shards if s.name != shard]
    h = read_header(out / shard)
    e = random.randrange(6)
    per = h.tensors[name].nbytes // 6
    with open(out / shard, "r+b") as f:
        f.seek(h.data_start + h.tensors[name].begin + e * per + random.randrange(per))
        b = f.read(1)[0]
        f.seek(-1, 1)
        f.write(bytes([b ^ 0x22]))
    with pytest.raises(CheckFailed, match=f"w2_weight: expert {e} down packed bytes differ"):
        check_shards(spec, out, [shard])
    check_shards(spec, out, others, sha256={n: man.files[n]["sha256"] for n in others})
    wrong = {others[0]: "0" * 64}
    with pytest.raises(CheckFailed, match=f"{others[0]}: sha256 differs"):
        check_shards(spec, out, others[:1], sha256=wrong)
    with pytest.raises(CheckFailed, match="not an output shard"):
        check_shards(spec, out, ["model-99999-of-99999.safetensors"])


def test_a_shard_header_with_a_tensor_the_spec_does_not_give_it_fails(make_ckpt, tmp_path):
    src, out, man, spec = _conversion(make_ckpt, tmp_path, "vllm-fused")
    a, b = spec.shards[0].name, spec.shards[1].name
    headers = {a: read_header(out / a)}
    extra = read_header(out / b)
    headers[a].tensors.update(extra.tensors)
    with pytest.raises(CheckFailed, match=f"{a}: unexpected tensor"):
        check_shards(spec, out, [a], headers=headers)
