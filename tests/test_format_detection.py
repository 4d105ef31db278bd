"""Format detection is exact: a block scale is read as E4M3 only when its header says F8_E4M3, and
a manifest's sha256 must match to its last hex digit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import edit_header, run_cli

from nvfp4_fuse import experts
from nvfp4_fuse.convert import ConvertOptions, convert, make_plan
from nvfp4_fuse.errors import CheckFailed, InputError
from nvfp4_fuse.manifest import MANIFEST_NAME
from nvfp4_fuse.verify import verify

P = "layers.1.ffn.experts"
E8M0_SCALE = f"{P}.2.w1.weight_scale"  # NVFP4-shaped, [out, in/16], its bytes unchanged


def _retype(src: Path, name: str, dtype: str) -> None:
    idx = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]

    def fn(h: dict) -> None:
        h[name]["dtype"] = dtype

    edit_header(src / idx[name], fn)


def test_an_e8m0_weight_scale_of_nvfp4_shape_is_refused_by_convert_and_the_plan(make_ckpt, tmp_path):
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=32, shards=2)
    _retype(src, E8M0_SCALE, "F8_E8M0")
    want = rf"weight_scale must be F8_E4M3, not F8_E8M0 \(file .*, tensor {E8M0_SCALE}\)"
    with pytest.raises(InputError, match=want):
        make_plan(src, ConvertOptions(target="linear"))
    with pytest.raises(InputError, match=want):
        convert(src, tmp_path / "out", ConvertOptions(target="linear"))
    assert not (tmp_path / "out" / MANIFEST_NAME).exists()
    for args in (("--dry-run",), ("--target", "linear")):
        r = run_cli("convert", str(src), str(tmp_path / "cli"), *args)
        assert r.returncode == 2 and E8M0_SCALE in r.stderr and "F8_E8M0" in r.stderr, (r.stdout, r.stderr)


def test_verify_does_not_bless_an_output_that_read_e8m0_scales_as_e4m3(make_ckpt, tmp_path, monkeypatch):
    """What a converter that took E8M0 for E4M3 writes (its bytes copied as E4M3 scales) must not pass
    verify, which reads the source's scales through the same detection."""
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=32, shards=2)
    _retype(src, E8M0_SCALE, "F8_E8M0")
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setitem(experts._WANT_DTYPE, "weight_scale", ("F8_E4M3", "F8_E8M0"))
        convert(src, out, ConvertOptions(target="linear"))  # the loose converter's output, manifest and all
    with pytest.raises(InputError, match=rf"weight_scale must be F8_E4M3, not F8_E8M0 .*tensor {E8M0_SCALE}"):
        verify(src, out, device="cpu")
    r = run_cli("verify", str(src), str(out))
    assert r.returncode == 2 and E8M0_SCALE in r.stderr, (r.stdout, r.stderr)


@pytest.mark.parametrize("which", ["shard", "config.json"])
def test_a_manifest_sha256_off_in_its_last_hex_digit_fails_verify(make_ckpt, tmp_path, which):
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=32, shards=2)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target="linear", max_shard_size=40_000))
    man = json.loads((out / MANIFEST_NAME).read_text())
    shards = sorted(n for n in man["files"] if n.endswith(".safetensors"))
    assert len(shards) > 1
    name = shards[len(shards) // 2] if which == "shard" else which
    digest = man["files"][name]["sha256"]
    man["files"][name]["sha256"] = digest[:-1] + ("1" if digest[-1] == "0" else "0")
    (out / MANIFEST_NAME).write_text(json.dumps(man, indent=1))
    verify(src, out, device="cpu", hash_files=False)  # sizes alone still match
    with pytest.raises(CheckFailed) as ei:
        verify(src, out, device="cpu")
    assert f"{name}: sha256 differs from manifest" in str(ei.value), str(ei.value)
    r = run_cli("verify", str(src), str(out))
    assert r.returncode == 3 and name in r.stdout + r.stderr, (r.stdout, r.stderr)
