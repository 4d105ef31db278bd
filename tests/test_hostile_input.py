"""Hostile and broken input: every case is refused with exit code 2 and one line, no traceback, and
nothing written anywhere but the output folder; a property test mutates real shard headers and bytes.

The cases here are the ones a crafted or damaged file can carry (header lengths, byte ranges, JSON
duplicates, encodings, symlinks); test_bad_input.py covers wrong checkpoint content (gaps, dtypes,
NaN scales). The CLI runs in process here, so the suite stays fast.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import edit_header, join, rewrite_tensors, run_inprocess, split
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from nvfp4_fuse.errors import InputError
from nvfp4_fuse.safetensors_header import MAX_HEADER_SIZE, read_header
from nvfp4_fuse.shard_reader import ShardReader

P = "layers.1.ffn.experts"
INDEX = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------------
# helpers


def first_shard(src: Path) -> Path:
    return sorted(src.glob("model-*.safetensors"))[0]


def by_offset(h: dict) -> list[str]:
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# ---------------------------------------------------------------------------------------------------
# the cases: each takes the source folder (and a scratch folder outside it) and breaks something


def header_len_past_eof(src: Path, scratch: Path) -> None:
    p = first_shard(src)
    hdr, data = split(p)
    join(p, hdr, data, declared=p.stat().st_size)


def header_over_limit(src: Path, scratch: Path) -> None:
    p = first_shard(src)
    hdr, data = split(p)
    join(p, hdr, data, declared=MAX_HEADER_SIZE + 1)


def file_shorter_than_prefix(src: Path, scratch: Path) -> None:
    first_shard(src).write_bytes(b"\x10\x00\x00")


def offsets_past_end(src: Path, scratch: Path) -> None:
    def fn(h: dict) -> None:
        last = h[by_offset(h)[-1]]
        b, e = last["data_offsets"]
        h["extra.bias"] = {"dtype": "U8", "shape": [64], "data_offsets": [e, e + 64]}

    edit_header(first_shard(src), fn)


def hole_in_data(src: Path, scratch: Path) -> None:
    p = first_shard(src)
    hdr, data = split(p)
    obj = json.loads(hdr)
    last = obj[by_offset(obj)[-1]]
    b, e = last["data_offsets"]
    last["data_offsets"] = [b + 8, e + 8]  # 8 unexplained bytes before the last tensor
    join(p, json.dumps(obj).encode(), data[:b] + b"\0" * 8 + data[b:])


def overlap_out_of_order(src: Path, scratch: Path) -> None:
    """Two tensors claim the same bytes; the header lists them in reverse order of their offsets."""

    def fn(h: dict) -> None:
        names = by_offset(h)
        a, b = names[2], names[3]
        if h[a]["dtype"] == h[b]["dtype"] and h[a]["shape"] == h[b]["shape"]:
            h[b]["data_offsets"] = list(h[a]["data_offsets"])
        else:
            h[b]["data_offsets"] = [h[b]["data_offsets"][0] - 1, h[b]["data_offsets"][1] - 1]
        for k in reversed(names):
            h[k] = h.pop(k)

    edit_header(first_shard(src), fn)


def shape_disagrees_with_bytes(src: Path, scratch: Path) -> None:
    def fn(h: dict) -> None:
        t = h[f"{P}.0.w1.weight"] if f"{P}.0.w1.weight" in h else h[by_offset(h)[0]]
        t["shape"] = [t["shape"][0], t["shape"][1] * 2]

    for p in sorted(src.glob("model-*.safetensors")):
        edit_header(p, fn)


def dtype_disagrees_with_bytes(src: Path, scratch: Path) -> None:
    def fn(h: dict) -> None:
        h[by_offset(h)[0]]["dtype"] = "F32"  # 4x the bytes for the same shape

    edit_header(first_shard(src), fn)


def dtype_unknown(src: Path, scratch: Path) -> None:
    edit_header(first_shard(src), lambda h: h[by_offset(h)[0]].update(dtype="F9_E9M9"))


def offsets_not_ints(src: Path, scratch: Path) -> None:
    edit_header(first_shard(src), lambda h: h[by_offset(h)[0]].update(data_offsets=["0", True]))


def duplicate_key_in_header(src: Path, scratch: Path) -> None:
    p = first_shard(src)
    hdr, data = split(p)
    obj = json.loads(hdr)
    name = by_offset(obj)[1]
    entry = json.dumps({name: obj[name]})[1:-1]
    text = hdr.decode().rstrip()
    assert text.endswith("}")
    join(p, (text[:-1] + "," + entry + "}").encode(), data)


def duplicate_key_in_index(src: Path, scratch: Path) -> None:
    text = (src / INDEX).read_text()
    idx = json.loads(text)
    name, fname = next(iter(idx["weight_map"].items()))
    other = next(f for f in sorted(set(idx["weight_map"].values())) if f != fname)
    # the duplicate comes first: a last-one-wins parser would see a consistent index
    body = json.dumps(idx["weight_map"])
    idx_text = json.dumps({"metadata": idx.get("metadata", {})})[:-1] + f', "weight_map": {{"{name}": "{other}", ' + body[1:] + "}"
    (src / INDEX).write_text(idx_text)


def duplicate_key_in_config(src: Path, scratch: Path) -> None:
    text = (src / "config.json").read_text().rstrip()
    (src / "config.json").write_text(text[:-1] + ', "model_type": "other"}')


def non_utf8_name(src: Path, scratch: Path) -> None:
    p = first_shard(src)
    hdr, data = split(p)
    name = by_offset(json.loads(hdr))[0].encode()
    join(p, hdr.replace(b'"' + name + b'"', b'"' + name[:-2] + b"\xff\xfe" + b'"', 1), data)


def lone_surrogate_name(src: Path, scratch: Path) -> None:
    p = first_shard(src)
    hdr, data = split(p)
    name = by_offset(json.loads(hdr))[0].encode()
    join(p, hdr.replace(b'"' + name + b'"', b'"' + name + b'\\udc80"', 1), data)


def shard_symlink_outside(src: Path, scratch: Path) -> None:
    p = first_shard(src)
    shutil.move(p, scratch / p.name)
    p.symlink_to(scratch / p.name)


def sidecar_symlink_outside(src: Path, scratch: Path) -> None:
    secret = scratch / "secret.txt"
    secret.write_text("not part of the checkpoint")
    (src / "tokenizer.json").symlink_to(secret)


def config_symlink_outside(src: Path, scratch: Path) -> None:
    shutil.move(src / "config.json", scratch / "config.json")
    (src / "config.json").symlink_to(scratch / "config.json")


def gate_up_shapes_differ(src: Path, scratch: Path) -> None:
    def fn(t: dict) -> None:
        for n in [n for n in t if n.startswith(P) and ".w3." in n]:
            v = t[n]
            if n.endswith(".weight") or n.endswith(".weight_scale"):
                t[n] = torch.cat([v, v])  # up gets twice gate's rows, in every expert alike

    rewrite_tensors(src, fn)


CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "header-length-past-eof": (header_len_past_eof, "runs past the end"),
    "header-over-100MB": (header_over_limit, "over the 100000000-byte limit"),
    "file-shorter-than-prefix": (file_shorter_than_prefix, "too short for a safetensors header"),
    "offsets-past-end": (offsets_past_end, "file holds only"),
    "hole-in-data": (hole_in_data, "hole in the data section"),
    "overlap-out-of-order": (overlap_out_of_order, "overlaps the previous tensor"),
    "shape-vs-bytes": (shape_disagrees_with_bytes, "bytes but data_offsets"),
    "dtype-vs-bytes": (dtype_disagrees_with_bytes, "bytes but data_offsets"),
    "dtype-unknown": (dtype_unknown, "unknown dtype 'F9_E9M9'"),
    "offsets-not-ints": (offsets_not_ints, "data_offsets"),
    "duplicate-key-header": (duplicate_key_in_header, "twice"),
    "duplicate-key-index": (duplicate_key_in_index, "index has the key"),
    "duplicate-key-config": (duplicate_key_in_config, "config.json has the key 'model_type' twice"),
    "non-utf8-name": (non_utf8_name, "not valid UTF-8"),
    "lone-surrogate-name": (lone_surrogate_name, "safetensors"),
    "shard-symlink-outside": (shard_symlink_outside, "leads outside the source folder"),
    "sidecar-symlink-outside": (sidecar_symlink_outside, "leads outside the source folder"),
    "config-symlink-outside": (config_symlink_outside, "leads outside the source folder"),
    "gate-up-shapes-differ": (gate_up_shapes_differ, "differs from expected"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_refused_cleanly(make_ckpt, tmp_path, capsys, monkeypatch, case):
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=32, shards=2)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    fn, needle = CASES[case]
    fn(src, scratch)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before_src, before_scratch = tree(src), tree(scratch)
    out = tmp_path / "out"
    for cmd in (("convert", str(src), str(out)), ("convert", str(src), str(out), "--dry-run")):
        rc, stdout, stderr = run_inprocess(capsys, *cmd)
        assert rc == 2, (case, rc, stdout, stderr)
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), stderr
        assert needle in lines[0], lines[0]
        assert "Traceback" not in stderr
    # nothing written anywhere: not in the source, not beside it, not in the working folder
    assert tree(src) == before_src and tree(scratch) == before_scratch and tree(work) == set()
    assert not out.exists() or not any(out.iterdir())


def test_header_order_differing_from_data_order_is_fine(make_ckpt, tmp_path, capsys):
    """safetensors allows header entries in any order: the result is the same as from the original."""
    src = make_ckpt(layers=2, experts=4, hidden=64, inter=32, shards=2)
    shuffled = tmp_path / "shuffled"
    shutil.copytree(src, shuffled)
    for p in sorted(shuffled.glob("model-*.safetensors")):
        edit_header(p, lambda h: [h.__setitem__(k, h.pop(k)) for k in reversed(by_offset(h))])
    rc, _, err = run_inprocess(capsys, "convert", str(src), str(tmp_path / "a"), "--target", "vllm-fused")
    assert rc == 0, err
    rc, _, err = run_inprocess(capsys, "convert", str(shuffled), str(tmp_path / "b"), "--target", "vllm-fused")
    assert rc == 0, err
    for p in sorted((tmp_path / "a").glob("model-*.safetensors")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()


# ---------------------------------------------------------------------------------------------------
# property: a mutated shard is either read exactly as safetensors reads it, or refused with InputError


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[bytes, Path]:
    g = torch.Generator().manual_seed(7)
    tensors = {
        "a.weight": torch.randint(0, 256, (8, 16), dtype=torch.uint8, generator=g),
        "a.weight_scale": torch.rand(8, 2, generator=g).to(torch.float8_e4m3fn),
        "a.weight_scale_2": torch.tensor(0.5),
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.empty": torch.zeros(0, 3),
    }
    folder = tmp_path_factory.mktemp("prop")
    save_file(tensors, folder / "orig.safetensors", metadata={"format": "pt"})
    return (folder / "orig.safetensors").read_bytes(), folder


def _mutate(raw: bytes, how: str, pos: int, val: int, num: int) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    hdr = raw[8 : 8 + n]
    if how == "flip-header-byte":
        i = 8 + pos % n
        return raw[:i] + bytes([val]) + raw[i + 1 :]
    if how == "flip-length-byte":
        i = pos % 8
        return raw[:i] + bytes([val]) + raw[i + 1 :]
    if how == "truncate":
        return raw[: pos % len(raw)]
    if how == "append":
        return raw + bytes([val]) * (1 + num % 64)
    if how == "insert-header-byte":
        i = 8 + pos % n
        return struct.pack("<Q", n + 1) + raw[8:i] + bytes([val]) + raw[i:]
    obj = json.loads(hdr)
    names = sorted(k for k in obj if k != "__metadata__")
    name = names[pos % len(names)]
    if how == "offset":
        obj[name]["data_offsets"][val % 2] = num
    elif how == "shape":
        shape = obj[name]["shape"]
        if shape:
            shape[val % len(shape)] = num
        else:
            obj[name]["shape"] = [num]
    elif how == "dtype":
        obj[name]["dtype"] = ["U8", "I8", "F8_E4M3", "BF16", "F16", "F32", "I64", "F4", "BOOL", "X"][val % 10]
    elif how == "drop-field":
        obj[name].pop(["dtype", "shape", "data_offsets"][val % 3])
    elif how == "rename":
        obj[names[(pos + 1) % len(names)] + ("" if val % 2 else "x")] = obj.pop(name)
    js = json.dumps(obj).encode()
    return struct.pack("<Q", len(js)) + js + raw[8 + n :]


HOW = ["flip-header-byte", "flip-length-byte", "truncate", "append", "insert-header-byte", "offset", "shape", "dtype", "drop-field", "rename"]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    how=st.sampled_from(HOW),
    pos=st.integers(0, 10_000),
    val=st.integers(0, 255),
    num=st.one_of(st.integers(0, 300), st.integers(2**31, 2**64)),
)
def test_mutated_headers_read_exactly_or_raise_input_error(pristine, how, pos, val, num):
    raw, folder = pristine
    data = _mutate(raw, how, pos, val, num)
    fd, name = tempfile.mkstemp(suffix=".safetensors", dir=folder)
    try:
        os.write(fd, data)
        os.close(fd)
        try:
            h = read_header(Path(name))
        except InputError:
            return
        # accepted: then safetensors must read it too, and every tensor's bytes must agree
        reader = ShardReader(h)
        try:
            with safe_open(name, framework="pt") as f:
                assert sorted(f.keys()) == sorted(h.tensors)
                for t in h.tensors.values():
                    ours = bytes(reader.read_bytes(t.name))
                    assert len(ours) == t.nbytes
                    if t.dtype in ("F4",):
                        continue  # no torch dtype to compare through
                    theirs = f.get_tensor(t.name)
                    assert list(theirs.shape) == list(t.shape)
                    assert theirs.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() == ours
        finally:
            reader.close()
    finally:
        os.unlink(name)
