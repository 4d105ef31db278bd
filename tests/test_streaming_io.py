"""The converter's zero-copy read path and its read-ahead bound.

w13 rows are read with vectored preads straight into the output buffer, following the target's row
runs; these tests pin the runs to the torch transform they replace, the vectored read to the plain one
(short reads included), and the read-ahead to its byte budget.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nvfp4_fuse import convert as conv
from nvfp4_fuse import safetensors_io as sio
from nvfp4_fuse.convert import ConvertOptions, convert, make_plan
from nvfp4_fuse.safetensors_io import ShardReader, SourceSpan, piece_views, read_header, write_pieces
from nvfp4_fuse.spec import FUSED_PARTS


@pytest.mark.parametrize("short_reads", [False, True])
def test_read_into_scattered_views(tmp_path, monkeypatch, short_reads):
    data = torch.randint(0, 256, (3000 + random.randint(0, 999),), dtype=torch.uint8)
    save_file({"pad": torch.zeros(5, dtype=torch.uint8), "t": data}, tmp_path / "x.safetensors")
    if short_reads:  # the kernel may return fewer bytes than asked; the reader must carry on mid-view
        real = os.preadv

        def stingy(fd, bufs, off):
            want = random.randint(1, 97)
            head, left = [], want
            for b in bufs:
                if not left:
                    break
                head.append(b[:left])
                left -= min(left, len(b))
            return real(fd, head, off)

        monkeypatch.setattr(os, "preadv", stingy)
    reader = ShardReader(read_header(tmp_path / "x.safetensors"))
    n = data.numel()
    cuts = sorted(random.sample(range(1, n), 40))
    buf = bytearray(n + 100)  # views scattered through a bigger buffer, some empty
    mv = memoryview(buf)
    views, pos, prev = [], 0, 0
    for c in [*cuts, n]:
        pos += random.randint(0, 2)
        views.append(mv[pos : pos + (c - prev)])
        views.append(mv[pos:pos])
        pos += c - prev
        prev = c
    reader.read_into("t", views)
    assert b"".join(bytes(v) for v in views) == data.numpy().tobytes()
    with pytest.raises(ValueError):
        reader.read_into("t", views[:-3])
    reader.close()


def test_read_ahead_stays_within_its_byte_budget(make_ckpt, tmp_path, monkeypatch):
    """Shrink the budget below a handful of experts: never more than the budget (or one task) read ahead."""
    src = make_ckpt(layers=2, experts=12, hidden=128, inter=64)
    budget = 3 * (2 * 64 * 128 // 2)  # three experts' w13 weight
    monkeypatch.setattr(conv, "INFLIGHT_BYTES", budget)
    live = {"now": 0, "peak": 0, "tasks": 0}
    real_fused = conv._fused_task

    def counting(ctx, tgt, layer, part, e):
        work = real_fused(ctx, tgt, layer, part, e)

        def run():
            data, change = work()
            n = data.size if isinstance(data, np.ndarray) else len(memoryview(data).cast("B"))
            live["now"] += n
            live["peak"] = max(live["peak"], live["now"])
            live["tasks"] += 1
            return data, change

        return run

    real_write = conv.StreamingShardWriter.write

    def write(self, data):
        if (self.current or "").rsplit(".", 1)[-1] in FUSED_PARTS:  # per-expert slices: one task per write
            live["now"] -= len(memoryview(data).cast("B"))
        real_write(self, data)

    monkeypatch.setattr(conv, "_fused_task", counting)
    monkeypatch.setattr(conv.StreamingShardWriter, "write", write)
    convert(src, tmp_path / "out", ConvertOptions(target="vllm-fused", workers=4))
    assert live["tasks"] == 12 * 4 and live["now"] == 0  # one MoE layer (layer 0 is dense), all written
    assert 0 < live["peak"] <= budget, live


def test_buffer_pool_recycles_and_caps():
    pool = conv._BufferPool(cap=100)
    ptr = lambda a: a.ctypes.data  # noqa: E731
    a = pool.get(60)
    assert a.dtype == np.uint8 and a.size == 60
    pool.put(a)
    assert ptr(pool.get(60)) == ptr(a)  # the same memory again
    b, c = pool.get(60), pool.get(60)
    pool.put(b)
    pool.put(c)  # over the cap: dropped
    assert ptr(pool.get(60)) == ptr(b)
    pool.put(b)
    d = pool.get(40)  # another size: a new phase drops the 60-byte buffers
    assert d.size == 40 and pool._held == 0 and not any(pool._free.values())
    pool.put(d)
    assert ptr(pool.get(40)) == ptr(d)


@pytest.mark.parametrize("short_writes", [False, True])
@pytest.mark.parametrize("copy_ok", [True, False])
def test_write_pieces_mixes_spans_views_and_arrays(tmp_path, monkeypatch, short_writes, copy_ok):
    data = os.urandom(200_000)
    (tmp_path / "src").write_bytes(data)
    fd_in = os.open(tmp_path / "src", os.O_RDONLY)
    mm = mmap.mmap(fd_in, 0, access=mmap.ACCESS_READ)
    whole = memoryview(mm)
    monkeypatch.setattr(sio, "_copy_file_range_ok", copy_ok)
    if short_writes:
        real = os.pwritev

        def stingy(fd, bufs, off):  # the kernel may write fewer bytes than asked
            head, left = [], random.randint(1, 5000)
            for b in bufs:
                if not left:
                    break
                head.append(b[:left])
                left -= min(left, len(b))
            return real(fd, head, off)

        monkeypatch.setattr(os, "pwritev", stingy)
    pieces, want = [], []
    for _ in range(3000):  # more than IOV_MAX pieces between spans
        a = random.randrange(len(data))
        b = min(len(data), a + random.choice([0, 1, 7, 100, 4096, 30_000]))
        kind = random.random()
        if kind < 0.05:
            pieces.append(SourceSpan(fd_in, a, whole[a:b]))
        elif kind < 0.9:
            pieces.append(whole[a:b])
        else:
            pieces.append(torch.randint(-(2**15), 2**15, ((b - a) // 2,), dtype=torch.int16).numpy())  # not bytes
        want.append(bytes(piece_views([pieces[-1]])[0]))
    out = tmp_path / "out"
    fd = os.open(out, os.O_RDWR | os.O_CREAT, 0o644)
    end = write_pieces(fd, 13, pieces)
    os.close(fd)
    expect = b"".join(want)
    assert end == 13 + len(expect)
    assert out.read_bytes()[13:] == expect
    del whole, pieces
    mm.close()
    os.close(fd_in)


def test_peak_estimate_does_not_grow_with_experts(make_ckpt):
    opts = ConvertOptions(target="vllm-fused")
    small = make_plan(make_ckpt(layers=2, experts=4, hidden=128, inter=64), opts)
    big = make_plan(make_ckpt(layers=3, experts=32, hidden=128, inter=64, shards=3), opts)
    assert small.peak_memory_estimate(4) == big.peak_memory_estimate(4) == big.peak_memory_estimate(16)


def test_writer_refuses_too_few_or_too_many_bytes(tmp_path):
    """A shard is renamed into place only when every declared byte arrived, and never takes more."""
    from nvfp4_fuse.safetensors_io import OutEntry, StreamingShardWriter

    n1, n2 = random.randint(1, 5000), random.randint(1, 5000)
    entries = [OutEntry("a", "U8", (n1,)), OutEntry("b", "U8", (n2,))]
    short = StreamingShardWriter(tmp_path / "short.safetensors", entries)
    short.write(os.urandom(n1 + n2 - random.randint(1, n2)))
    with pytest.raises(RuntimeError, match="tensor b is missing"):
        short.finish()
    short.abort()
    assert not (tmp_path / "short.safetensors").exists() and not list(tmp_path.glob("*.partial"))

    long = StreamingShardWriter(tmp_path / "long.safetensors", entries)
    with pytest.raises(RuntimeError, match="more than the header declares"):
        long.write(os.urandom(n1 + n2 + random.randint(1, 9)))
    long.abort()

    exact = StreamingShardWriter(tmp_path / "exact.safetensors", entries)
    data = os.urandom(n1 + n2)
    exact.write(data[:n1 // 2])
    exact.write(data[n1 // 2 :])
    size, digest = exact.finish()
    h = read_header(tmp_path / "exact.safetensors")
    assert size == (tmp_path / "exact.safetensors").stat().st_size
    assert digest == hashlib.sha256((tmp_path / "exact.safetensors").read_bytes()).hexdigest()
    r = ShardReader(h)
    assert bytes(r.read_bytes("a")) + bytes(r.read_bytes("b")) == data
    r.close()
