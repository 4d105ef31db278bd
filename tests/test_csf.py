"""Compressed block scales (``weight_scale_encoding``: csf, csf_32x2_v1): the decoder is exact and
strict, a compressed checkpoint converts to exactly what its plain twin converts to, and what cannot
be decoded exactly is refused with one line."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli
from test_hub import fake_hub  # noqa: F401  (the loopback Hub fixture)

from nvfp4_fuse import csf
from nvfp4_fuse.convert import ConvertOptions, convert
from nvfp4_fuse.errors import InputError
from nvfp4_fuse.manifest import MANIFEST_NAME
from nvfp4_fuse.verify import verify

ENCODINGS = sorted(csf.ENCODINGS)
P = "layers.1.ffn.experts"


def _random_scales(rng: np.random.Generator, rows: int, cols: int, outliers: float) -> np.ndarray:
    """E4M3 bytes near a per-row level, a fraction anywhere in 0..0x7E or 0x80..0xFE (exceptions)."""
    level = rng.integers(0, 0x70, size=(rows, 1))
    s = (level + rng.integers(0, 16, size=(rows, cols))).astype(np.uint8)
    far = rng.random((rows, cols)) < outliers
    s[far] = rng.choice(np.r_[0:0x7F, 0x80:0xFF], size=int(far.sum())).astype(np.uint8)
    return s


def _shapes(encoding: str, rng: np.random.Generator) -> list[tuple[int, int]]:
    if encoding == "csf":  # rows: multiples of 16, columns even
        fixed = [(16, 2), (32, 6), (48, 130), (16 * 19, 2 * 37), (16 * 150, 2 * 500)]
        return fixed + [(16 * int(rng.integers(1, 40)), 2 * int(rng.integers(1, 90))) for _ in range(4)]
    # rows: multiples of 32; any column count, odd included; partial 128x4 tiles and pages
    # (the last one has more cells than a geometry kept in the cache)
    fixed = [(32, 1), (32, 3), (96, 5), (160, 7), (128, 4), (32 * 9, 130), (4096 // 4, 33), (32 * 70, 1001)]
    return fixed + [(32 * int(rng.integers(1, 40)), int(rng.integers(1, 200))) for _ in range(4)]


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_encode_decode_round_trip_is_byte_exact(encoding):
    rng = np.random.default_rng(random.randrange(2**32))
    exceptions = 0
    for rows, cols in _shapes(encoding, rng):
        for outliers in (0.0, 0.03, 0.5, 1.0):
            s = _random_scales(rng, rows, cols, outliers)
            streams = csf.encode(encoding, s)
            assert set(streams) == set(csf.ENCODINGS[encoding])
            assert all(a.dtype == csf.numpy_dtype(n) for n, a in streams.items())
            shape = csf.decoded_shape(encoding, {n: csf.STREAM_DTYPES[n] for n in streams}, {n: a.shape for n, a in streams.items()})
            assert shape == (rows, cols)
            got = csf.decode(encoding, streams)
            assert got.dtype == np.uint8 and got.shape == (rows, cols)
            assert got.tobytes() == s.tobytes(), (encoding, rows, cols, outliers)
            exceptions += streams[csf.ENCODINGS[encoding][-1]].size
    assert exceptions > 1000  # the exception path really ran


def _streams(encoding: str, rows: int, cols: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(random.randrange(2**32))
    return {k: v.copy() for k, v in csf.encode(encoding, _random_scales(rng, rows, cols, 0.2)).items()}


def _set(a: np.ndarray, k: int, v: int) -> np.ndarray:
    a.reshape(-1)[k] = v
    return a


# (encoding, corruption, stream named): each is a check of vLLM's decoder
CORRUPTIONS = {
    "csf-base-above-240": ("csf", lambda s: _set(s["nvfp4_csf_fixed"], 3, 241), "nvfp4_csf_fixed"),
    "csf-exceptions-out-of-order": (
        "csf",
        lambda s: _set(s["nvfp4_csf_exceptions"], 1, int(s["nvfp4_csf_exceptions"][0])),
        "nvfp4_csf_exceptions",
    ),
    "csf-exception-past-the-end": ("csf", lambda s: _set(s["nvfp4_csf_exceptions"], -1, 0xFFFFFF), "nvfp4_csf_exceptions"),
    "csf-fixed-width": ("csf", lambda s: s.update(nvfp4_csf_fixed=s["nvfp4_csf_fixed"][:, :-8]), "nvfp4_csf_fixed"),
    "csf-fixed-1d": ("csf", lambda s: s.update(nvfp4_csf_fixed=s["nvfp4_csf_fixed"].reshape(-1)), "nvfp4_csf_fixed"),
    "csf-exceptions-dtype": (
        "csf",
        lambda s: s.update(nvfp4_csf_exceptions=s["nvfp4_csf_exceptions"].astype(np.int32)),
        "nvfp4_csf_exceptions",
    ),
    "csf32-base-above-240": ("csf_32x2_v1", lambda s: _set(s["csf32_bases"], 5, 250), "csf32_bases"),
    "csf32-rows": ("csf_32x2_v1", lambda s: s.update(csf32_bases=s["csf32_bases"][:-16]), "csf32_codes"),
    "csf32-page-count": ("csf_32x2_v1", lambda s: s.update(csf32_page_bases=s["csf32_page_bases"][:-1]), "csf32_page_bases"),
    "csf32-offsets-count": ("csf_32x2_v1", lambda s: s.update(csf32_offsets=s["csf32_offsets"][:-1]), "csf32_offsets"),
    "csf32-page-not-zero-led": ("csf_32x2_v1", lambda s: _set(s["csf32_offsets"], 0, 1), "csf32_offsets"),
    "csf32-page-origin": ("csf_32x2_v1", lambda s: _set(s["csf32_page_bases"], 1, int(s["csf32_page_bases"][1]) + 2), "csf32_page_bases"),
    "csf32-block-too-many": ("csf_32x2_v1", lambda s: _set(s["csf32_offsets"], 1, 65), "csf32_offsets"),
    "csf32-exception-count": (
        "csf_32x2_v1",
        lambda s: s.update(csf32_exceptions=s["csf32_exceptions"][:-1]),
        "csf32_exceptions",
    ),
    "csf32-position-64": ("csf_32x2_v1", lambda s: _set(s["csf32_exceptions"], 0, (int(s["csf32_exceptions"][0]) & 0xFF00) | 64), "csf32_exceptions"),
    "csf32-position-repeated": (
        "csf_32x2_v1",
        lambda s: _set(s["csf32_exceptions"], 1, int(s["csf32_exceptions"][0])),
        "csf32_exceptions",
    ),
    "csf32-odd-position-in-1-column-block": ("csf_32x2_v1", None, "csf32_exceptions"),
    "csf32-codes-dtype": ("csf_32x2_v1", lambda s: s.update(csf32_codes=s["csf32_codes"].astype(np.int8)), "csf32_codes"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_each_decoder_check_refuses_naming_the_stream(case):
    encoding, corrupt, stream = CORRUPTIONS[case]
    if corrupt is None:
        # a [32, 1] scale: one block, one column; every exception's position must be even
        s = _streams(encoding, 32, 1)
        s["csf32_exceptions"] = np.array([(0x40 << 8) | 1], dtype="<u2")
        s["csf32_offsets"] = np.array([0, 1], dtype="<u2")
    else:
        # two pages (33 tiles of 128x4), a first block with exceptions: every corruption has a target
        s = _streams(encoding, 256, 66)
        while encoding == "csf_32x2_v1" and (s["csf32_offsets"][1] < 2 or s["csf32_page_bases"].size < 2):
            s = _streams(encoding, 256, 66)
        corrupt(s)
    with pytest.raises(csf.StreamError) as ei:
        csf.decode(encoding, s)
    assert ei.value.stream == stream, (case, ei.value.stream, str(ei.value))


# ---------------------------------------------------------------------------------------------------
# checkpoints


def _twins(make_ckpt, tmp_path: Path, encoding: str, **kw) -> tuple[Path, Path]:
    """A compressed sample and its plain twin: the same seed, so the same tensors and scales."""
    seed = random.randrange(2**31)
    plain = make_ckpt(seed=seed, **kw)
    packed = make_ckpt(seed=seed, scale_encoding=encoding, **kw)
    return plain, packed


def _outputs_equal(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    # the manifest and the model card (README.md) name their own source, and so differ
    own = (MANIFEST_NAME, "README.md")
    for rel in files_a:
        if rel not in own:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    ma, mb = (json.loads((d / MANIFEST_NAME).read_text()) for d in (a, b))
    files = [{n: r for n, r in m["files"].items() if n not in own} for m in (ma, mb)]
    assert files[0] == files[1] and ma["source"]["layers"] == mb["source"]["layers"]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("target", ["mega-moe", "vllm-fused", "linear", "per-expert"])
def test_compressed_checkpoint_converts_like_its_plain_twin(make_ckpt, tmp_path, encoding, target):
    kw = dict(layers=3, experts=4, hidden=512, inter=512, shards=3, unequal_scale_2=True)
    if target != "mega-moe":  # shapes whose scales fill neither 128x4 tiles nor 32-tile pages
        kw.update(hidden=160, inter=96, fast=True)
    plain, packed = _twins(make_ckpt, tmp_path, encoding, **kw)
    index = json.loads((packed / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(n.endswith(".weight_scale") for n in index)  # every block scale is compressed
    outs = []
    for src in (plain, packed):
        outs.append(tmp_path / f"out-{src.name}")
        convert(src, outs[-1], ConvertOptions(target=target, workers=3))
    _outputs_equal(*outs)
    cfg = json.loads((outs[1] / "config.json").read_text())["quantization_config"]
    hq = json.loads((outs[1] / "hf_quant_config.json").read_text())["quantization"]
    assert "weight_scale_encoding" not in cfg and "weight_scale_encoding" not in hq
    man = json.loads((outs[1] / MANIFEST_NAME).read_text())
    assert man["source"]["decoded_block_scales"] == {encoding: 3 + 2 * (3 + 4 * 3)}
    res = verify(packed, outs[1], device="cpu", decode=(target in ("linear", "per-expert")))
    assert res.decoded_block_scales == 9  # the dense layer's and the shared experts' scales
    assert any("compressed block scales" in c for c in res.checks)


def test_per_layer_encoding_in_quantized_layers(make_ckpt, tmp_path):
    """MIXED_PRECISION: the encoding declared per layer (``quantized_layers[...]``), not globally."""
    plain, packed = _twins(make_ckpt, tmp_path, "csf_32x2_v1", layers=2, experts=4, hidden=64, inter=32, dense_first_layer=False)

    def per_layer(src: Path, encoding: str | None) -> None:
        for name, key in (("config.json", "quantization_config"), ("hf_quant_config.json", "quantization")):
            cfg = json.loads((src / name).read_text())
            block = cfg[key]
            block.pop("weight_scale_encoding", None)
            block["quant_algo"] = "MIXED_PRECISION"
            entry = {"quant_algo": "NVFP4", "group_size": 16} | ({"weight_scale_encoding": encoding} if encoding else {})
            block["quantized_layers"] = {
                f"layers.{L}.ffn.{m}": dict(entry) for L in range(2) for m in ("experts", "shared_experts.w1", "shared_experts.w2", "shared_experts.w3")
            }
            (src / name).write_text(json.dumps(cfg))

    per_layer(plain, None)
    per_layer(packed, "csf_32x2_v1")
    outs = [tmp_path / "o-plain", tmp_path / "o-packed"]
    for src, out in zip((plain, packed), outs):
        convert(src, out, ConvertOptions(target="linear", workers=2))
    _outputs_equal(*outs)
    ql = json.loads((outs[1] / "config.json").read_text())["quantization_config"]["quantized_layers"]
    assert ql and not any("weight_scale_encoding" in e for e in ql.values())
    verify(packed, outs[1], device="cpu")


def _one_line_error(r, *needles: str) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def _edit_tensor_bytes(src: Path, name: str, fn) -> None:
    """Change a stream's bytes in place (same size: the header, and so the fingerprint, stay)."""
    from helpers import split

    idx = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    shard = src / idx[name]
    hdr, data = split(shard)
    info = json.loads(hdr)[name]
    a, b = info["data_offsets"]
    start = 8 + len(hdr)
    raw = bytearray(shard.read_bytes())
    arr = np.frombuffer(bytes(raw[start + a : start + b]), dtype=csf.numpy_dtype(name.rsplit(".", 1)[1])).copy()
    fn(arr)
    raw[start + a : start + b] = arr.tobytes()
    shard.write_bytes(bytes(raw))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_a_corrupted_stream_is_refused_by_convert_and_verify(make_ckpt, tmp_path, encoding):
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=32, shards=2, scale_encoding=encoding, fast=True)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target="linear", workers=2))
    stream = "nvfp4_csf_fixed" if encoding == "csf" else "csf32_bases"
    name = f"{P}.2.w3.weight_scale.{stream}"
    _edit_tensor_bytes(src, name, lambda a: a.__setitem__(0, 0xF7))  # a row base above 240
    r = run_cli("convert", str(src), str(tmp_path / "out2"), "--target", "linear")
    _one_line_error(r, name, "above 240")
    assert not (tmp_path / "out2" / MANIFEST_NAME).exists()
    r = run_cli("verify", str(src), str(out))
    _one_line_error(r, name, "above 240")
    # and a header-level one: the plan (--dry-run) refuses it too
    from helpers import edit_header

    idx = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    exc = f"{P}.1.w1.weight_scale.{csf.ENCODINGS[encoding][-1]}"

    def retype(h: dict) -> None:
        h[exc]["dtype"] = "I32" if encoding == "csf" else "I16"

    edit_header(src / idx[exc], retype)
    r = run_cli("convert", str(src), str(tmp_path / "out3"), "--dry-run")
    _one_line_error(r, exc, "must be U")


def _declare(src: Path, value) -> None:
    for name, key in (("config.json", "quantization_config"), ("hf_quant_config.json", "quantization")):
        cfg = json.loads((src / name).read_text())
        cfg[key]["weight_scale_encoding"] = value
        (src / name).write_text(json.dumps(cfg))


def test_an_unknown_encoding_is_refused_by_convert_dry_run_and_verify(make_ckpt, tmp_path):
    src = make_ckpt(layers=2, experts=2, hidden=64, inter=32, shards=1)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target="linear", workers=2))
    _declare(src, "csf_64x4_v2")
    for args in (("convert", str(src), str(tmp_path / "o")), ("convert", str(src), str(tmp_path / "o"), "--dry-run"), ("verify", str(src), str(out))):
        _one_line_error(run_cli(*args), "weight_scale_encoding 'csf_64x4_v2'")
    assert not (tmp_path / "o").exists()


def test_streams_the_configs_do_not_declare_or_do_not_know_are_refused(make_ckpt, tmp_path):
    src = make_ckpt(layers=2, experts=2, hidden=64, inter=32, shards=1, scale_encoding="csf")
    _declare(src, None)
    for cfg in ("config.json", "hf_quant_config.json"):  # drop the key altogether
        d = json.loads((src / cfg).read_text())
        for block in (d.get("quantization_config"), d.get("quantization")):
            if block:
                block.pop("weight_scale_encoding")
        (src / cfg).write_text(json.dumps(d))
    with pytest.raises(InputError, match="no weight_scale_encoding in the configs declares csf"):
        convert(src, tmp_path / "o", ConvertOptions(target="linear"))
    # a stream of an encoding nvfp4-fuse does not know, on a routed expert
    from helpers import edit_header

    shard = next(iter(sorted(src.glob("model-*.safetensors"))))

    def rename(h: dict) -> None:
        for n in [n for n in h if n.startswith(f"{P}.0.w1.weight_scale.")]:
            h[n.replace("nvfp4_csf_", "csf64_")] = h.pop(n)

    edit_header(shard, rename)
    idx_path = src / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    idx["weight_map"] = {n.replace(f"{P}.0.w1.weight_scale.nvfp4_csf_", f"{P}.0.w1.weight_scale.csf64_"): f for n, f in idx["weight_map"].items()}
    idx_path.write_text(json.dumps(idx))
    _one_line_error(run_cli("convert", str(src), str(tmp_path / "o"), "--dry-run"), "'csf64_", "no block-scale stream nvfp4-fuse knows")


def test_a_scale_stored_twice_or_half_is_refused(make_ckpt, tmp_path):
    from helpers import rewrite_tensors

    src = make_ckpt(layers=2, experts=2, hidden=64, inter=32, shards=1, scale_encoding="csf")
    twice = tmp_path / "twice"
    shutil.copytree(src, twice)

    def drop(t: dict) -> None:
        t.pop(f"{P}.1.w2.weight_scale.nvfp4_csf_exceptions", None)

    rewrite_tensors(src, drop)
    with pytest.raises(InputError, match="lacks its nvfp4_csf_exceptions stream"):
        convert(src, tmp_path / "o", ConvertOptions(target="linear"))

    def add_plain(t: dict) -> None:
        import torch

        if f"{P}.1.w2.weight_scale.nvfp4_csf_fixed" in t:
            t[f"{P}.1.w2.weight_scale"] = torch.ones(64, 2).to(torch.float8_e4m3fn)

    rewrite_tensors(twice, add_plain)
    with pytest.raises(InputError, match="stored both plain and as csf streams"):
        convert(twice, tmp_path / "o", ConvertOptions(target="linear"))


def test_sample_cli_writes_a_compressed_checkpoint(tmp_path):
    r = run_cli("sample", str(tmp_path / "s"), "--scale-encoding", "csf_32x2_v1", "--scheme", "hf", "--experts", "2", "--layers", "2")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())["quantization_config"]
    assert cfg["weight_scale_encoding"] == "csf_32x2_v1"
    r = run_cli("sample", str(tmp_path / "t"), "--scale-encoding", "csf9")
    _one_line_error(r, "--scale-encoding")


def test_the_plan_says_which_scales_are_decoded_locally_and_from_hub_headers(make_ckpt, tmp_path, fake_hub, monkeypatch):  # noqa: F811
    """The dry run names the compressed scales, from a folder and from the Hub's shard headers alone
    (no configs there: the streams' names tell the encoding)."""
    from typer.testing import CliRunner

    from nvfp4_fuse.cli import app

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=32, shards=2, scale_encoding="csf")
    fake_hub.create("org/csf", {p.name: p.read_bytes() for p in src.iterdir()})
    line = "block scales: 18 stored compressed (csf), decoded exactly and written as plain E4M3"
    for where in (str(src), "org/csf"):
        r = CliRunner().invoke(app, ["convert", where, str(tmp_path / "dry"), "--dry-run", "--target", "linear"])
        assert r.exit_code == 0, (r.output, r.exception)
        assert line in " ".join(r.output.split()), r.output
        r = CliRunner().invoke(app, ["convert", where, str(tmp_path / "dry"), "--dry-run", "--target", "linear", "--json"])
        assert json.loads(r.output)["decoded_block_scales"] == {"csf": 18}
    assert not (tmp_path / "dry").exists()


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_decoding_holds_an_expert_at_a_time_and_leaves_nothing_mapped(make_ckpt, tmp_path, monkeypatch, encoding):
    """Scales are decoded one at a time from the mapped streams, inside the per-expert tasks: the
    writer never gets more than one expert's bytes (or one non-expert tensor) per call, and after
    convert and verify no page of either checkpoint is left mapped."""
    from helpers import mapped_at_close

    from nvfp4_fuse import convert as conv
    from nvfp4_fuse import shard_writer
    from nvfp4_fuse.encoded_scales import EncodedScale
    from nvfp4_fuse.piece_checks import PieceChecker

    src = make_ckpt(layers=3, experts=12, hidden=512, inter=512, shards=3, unequal_scale_2=True, scale_encoding=encoding, fast=True)
    biggest, decoded = [], []
    put, decode = shard_writer.StreamingShardWriter.put, EncodedScale.decode

    def spy_put(self, pieces, *a, **kw):
        biggest.append(sum(v.nbytes for v in shard_writer.piece_views(pieces)))
        return put(self, pieces, *a, **kw)

    def spy_decode(self, read):
        out = decode(self, read)
        decoded.append(out.nbytes)
        return out

    monkeypatch.setattr(shard_writer.StreamingShardWriter, "put", spy_put)
    monkeypatch.setattr(EncodedScale, "decode", spy_decode)
    seen = mapped_at_close(monkeypatch, conv._Ctx, lambda ctx: ctx.readers.values())
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target="mega-moe", workers=4, max_shard_size=2_000_000))
    assert seen == [0], f"{seen[0] >> 10} KiB of the source still mapped"
    per_expert_w13 = 2 * 512 * 512 // 2
    largest_other = 512 * 512 * 2  # o_proj, BF16
    assert max(biggest) <= max(per_expert_w13, largest_other) < 12 * per_expert_w13  # never a layer
    assert max(decoded) == 512 * 512 // 16
    assert len(decoded) == 3 + 2 * (3 + 12 * 3)  # each scale decoded once
    seen = mapped_at_close(monkeypatch, PieceChecker, lambda v: (*v.src_m.values(), *v.conv_m.values()))
    verify(src, out, device="cpu", workers=3)
    assert seen == [0], f"{seen[0] >> 10} KiB still mapped after verify"
