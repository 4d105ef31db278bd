"""The converter's write path and its memory bounds.

Packed values go from the source to the output without a buffer of ours: spans with copy_file_range,
row runs with pwritev from a read-only mapping of the source shard, hashed from the same views. These
tests pin that, the plain-write fallback where copy_file_range is refused (and that output stays the
same), the read-ahead budget, the release of the mapping behind the hash, vectored reads and writes
(short ones included) and the writer's own checks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import mapped_at_close, mapped_resident
from safetensors.torch import save_file

from nvfp4_fuse import convert as conv
from nvfp4_fuse import shard_writer
from nvfp4_fuse.convert import ConvertOptions, convert, make_plan
from nvfp4_fuse.errors import InputError
from nvfp4_fuse.safetensors_header import read_header
from nvfp4_fuse.shard_reader import ShardReader, SourceSpan
from nvfp4_fuse.shard_writer import piece_views, write_pieces
from nvfp4_fuse.spec import PER_EXPERT_PARTS


def stingy(real, most: int):
    """``os.preadv`` / ``os.pwritev`` that transfers a random 1..``most`` bytes a call, as the kernel may."""

    def call(fd, bufs, off):
        head, left = [], random.randint(1, most)
        for b in bufs:
            if not left:
                break
            head.append(b[:left])
            left -= min(left, len(b))
        return real(fd, head, off)

    return call


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("short_reads", [False, True])
def test_reads_resume_after_short_reads(tmp_path, monkeypatch, short_reads):
    data = torch.randint(0, 256, (3000 + random.randint(0, 999),), dtype=torch.uint8)
    save_file({"pad": torch.zeros(5, dtype=torch.uint8), "t": data}, tmp_path / "x.safetensors")
    if short_reads:  # the kernel may return fewer bytes than asked; the reader must carry on
        monkeypatch.setattr(os, "preadv", stingy(os.preadv, 97))
    reader = ShardReader(read_header(tmp_path / "x.safetensors"))
    n = data.numel()
    a = random.randrange(n)
    assert bytes(reader.read_bytes("t")) == data.numpy().tobytes()
    assert reader.read_array("t", a, n - a).tobytes() == data.numpy()[a:].tobytes()
    with pytest.raises(ValueError):
        reader.read_bytes("t", a, n - a + 1)
    reader.close()


@pytest.mark.parametrize("streams", [1, 3])
def test_read_ahead_stays_within_its_byte_budget(make_ckpt, tmp_path, monkeypatch, streams):
    """Shrink the budget below a handful of experts: never more than the budget (a stream's share times
    the streams, or one task) of output between a task's bytes being produced and their being hashed
    (when the task's mapped source ranges are released), over all the shards being written at once."""
    src = make_ckpt(layers=4, experts=12, hidden=128, inter=64)
    share = 3 * (2 * 64 * 128 // 2) // streams  # three experts' w13 weight over all the streams
    budget = share * streams
    monkeypatch.setattr(conv, "INFLIGHT_BYTES", share)
    live = {"now": 0, "peak": 0, "tasks": 0, "hashed": 0}
    lock = threading.Lock()
    real_fused = conv._fused_task

    def counting(ctx, tgt, layer, part, e):
        work = real_fused(ctx, tgt, layer, part, e)

        def run():
            chunk = work()
            n = sum(v.nbytes for v in piece_views(chunk.pieces))
            with lock:
                live["now"] += n
                live["peak"] = max(live["peak"], live["now"])
                live["tasks"] += 1
            release = chunk.release

            def hashed():  # the writer calls it on its hashing thread once the chunk's bytes are hashed
                release()
                with lock:
                    live["now"] -= n
                    live["hashed"] += 1

            chunk.release = hashed
            return chunk

        return run

    monkeypatch.setattr(conv, "_fused_task", counting)
    res = convert(src, tmp_path / "out", ConvertOptions(target="vllm-fused", workers=4, max_shard_size=40_000, shard_streams=streams))
    assert len(res.spec.shards) >= 6
    assert live["tasks"] == live["hashed"] == 3 * 12 * 4 and live["now"] == 0  # three MoE layers (layer 0 is dense)
    assert 0 < live["peak"] <= budget, live


@pytest.mark.parametrize("target", ["mega-moe", "vllm-fused"])
@pytest.mark.parametrize("span_min", [0, 1 << 40])
def test_packed_values_go_from_the_source_not_through_a_buffer(make_ckpt, tmp_path, monkeypatch, target, span_min):
    """Every byte of w13/w2 values and of copied tensors reaches the writer as a span of a source file
    or a view of its mapping; only block scales and per-layer scalars are arrays of ours."""
    monkeypatch.setattr(conv, "SPAN_MIN", span_min)  # 0: every row run is copied file to file
    src = make_ckpt(layers=2, experts=3, hidden=512, inter=512, shards=2, unequal_scale_2=True)
    kinds: dict[str, set[str]] = {}
    orig = shard_writer.StreamingShardWriter.put

    def spy(self, pieces, *a, **kw):
        name = self.current or ""
        what = name.rsplit(".", 1)[-1] if name.rsplit(".", 1)[-1] in PER_EXPERT_PARTS else "copy" if ".experts." not in name else "global"
        for p in pieces:
            if isinstance(p, SourceSpan):
                kinds.setdefault(what, set()).add("span")
            elif isinstance(p, memoryview) and isinstance(p.obj, mmap.mmap):
                kinds.setdefault(what, set()).add("mapped")
            else:
                kinds.setdefault(what, set()).add("array")
        return orig(self, pieces, *a, **kw)

    monkeypatch.setattr(shard_writer.StreamingShardWriter, "put", spy)
    convert(src, tmp_path / "out", ConvertOptions(target=target))
    assert kinds["w13_weight"] == ({"mapped"} if span_min else {"span"})
    assert kinds["w2_weight"] == kinds["copy"] == {"span"}
    assert kinds["w13_weight_scale"] == kinds["w2_weight_scale"] == kinds["global"] == {"array"}


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_released_tensors_leave_nothing_mapped_whatever_the_order(tmp_path):
    """Tensors of odd sizes read through the mapping in a random order, each released once read: no
    page of the file stays mapped. (A read fault maps the cached pages of a whole window around it,
    neighbours' included; a release of the tensor's own pages alone left those of neighbours released
    earlier mapped for good.)"""
    n = random.randint(40, 80)
    data = {f"t{i}": torch.randint(0, 256, (random.randint(1, 200_000),), dtype=torch.uint8) for i in range(n)}
    save_file(data, tmp_path / "x.safetensors")  # just written: every page is in the page cache
    reader = ShardReader(read_header(tmp_path / "x.safetensors"))
    names = list(data)
    random.shuffle(names)
    for name in names:
        a = random.randrange(data[name].numel())
        assert reader.mapped_array(name).tobytes() == data[name].numpy().tobytes()
        assert reader.mapped_array(name, a).tobytes() == data[name].numpy()[a:].tobytes()
        reader.release_tensor(name)
    assert mapped_resident(reader._mapped()) == 0
    reader.close()


def test_a_release_leaves_held_neighbours_mapped_and_their_own_release_drops_them(tmp_path):
    """A held range (held_array) keeps its pages when a neighbour inside the widened release is
    released; when its own last hold ends, nothing of the file stays mapped. Holds are counted."""
    sizes = [random.randint(20_000, 90_000) for _ in range(3)]  # all three inside one 2 MiB folio
    data = {f"t{i}": torch.randint(0, 256, (n,), dtype=torch.uint8) for i, n in enumerate(sizes)}
    save_file(data, tmp_path / "x.safetensors")
    reader = ShardReader(read_header(tmp_path / "x.safetensors"))
    held = random.choice(["t0", "t2"])  # before or after the released one
    for _ in range(2):
        assert reader.held_array(held).tobytes() == data[held].numpy().tobytes()  # touches every page
    assert reader.mapped_array("t1").tobytes() == data["t1"].numpy().tobytes()
    reader.release_tensor("t1")
    assert mapped_resident(reader._mapped()) >= sizes[int(held[1])] - 2 * mmap.PAGESIZE
    reader.release_tensor(held)  # one of its two holds
    assert mapped_resident(reader._mapped()) >= sizes[int(held[1])] - 2 * mmap.PAGESIZE
    reader.release_tensor(held)
    assert mapped_resident(reader._mapped()) == 0
    reader.close()


@pytest.mark.parametrize("target", ["mega-moe", "vllm-fused"])
def test_convert_leaves_no_page_of_the_source_mapped(make_ckpt, tmp_path, monkeypatch, target):
    """Every source range convert maps it drops again once written and hashed, with whatever the reads
    mapped beside it: when the conversion ends, nothing of the source is mapped."""
    src = make_ckpt(layers=3, experts=random.randint(6, 12), hidden=512, inter=512, shards=3, unequal_scale_2=True)
    seen = mapped_at_close(monkeypatch, conv._Ctx, lambda ctx: ctx.readers.values())
    convert(src, tmp_path / "out", ConvertOptions(target=target, workers=random.choice([1, 4]), max_shard_size=random.choice([300_000, 5 << 30])))
    assert seen == [0], f"{seen[0] >> 10} KiB of the source still mapped"


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_source_mapping_is_released_behind_the_hash(make_ckpt, tmp_path, monkeypatch):
    """Mapped source pages leave the process once hashed: its resident file-backed memory stays near the
    read-ahead budget instead of growing to the size of the source."""
    src = make_ckpt(layers=3, experts=32, hidden=1024, inter=1024, shards=2, fast=True)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert size > 100 << 20
    monkeypatch.setattr(conv, "INFLIGHT_BYTES", 8 << 20)
    base, peak, samples, stop = _rss_file(), [0], [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_file())
            samples[0] += 1
            time.sleep(0.002)

    th = threading.Thread(target=sample)
    th.start()
    try:
        convert(src, tmp_path / "out", ConvertOptions(target="vllm-fused", workers=4))
    finally:
        stop.set()
        th.join()
    grew = peak[0] - base
    assert samples[0] > 10
    assert grew < 40 << 20, f"resident file pages grew by {grew >> 20} MiB converting {size >> 20} MiB"


# ---------------------------------------------------------------------------------------------------
# copy_file_range and its fallback


def _src_and_fast_output(make_ckpt, tmp_path, monkeypatch) -> tuple[Path, dict[str, bytes], ConvertOptions]:
    """A source, and its conversion on the fast path (copy_file_range really called)."""
    src = make_ckpt(layers=3, experts=4, hidden=512, inter=512, shards=3, unequal_scale_2=True)
    opts = ConvertOptions(target="mega-moe", max_shard_size=3_000_000)
    calls = []
    real = os.copy_file_range

    def counted(*a):
        calls.append(a)
        return real(*a)

    with monkeypatch.context() as m:
        m.setattr(os, "copy_file_range", counted)
        m.setattr(shard_writer, "_copy_file_range_ok", True)
        convert(src, tmp_path / "fast", opts)
    assert calls, "the fast path never called copy_file_range"
    return src, snapshot(tmp_path / "fast"), opts


@pytest.mark.parametrize("err", [errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM])
def test_copy_file_range_refused_falls_back_to_plain_writes(make_ckpt, tmp_path, monkeypatch, err):
    src, fast, opts = _src_and_fast_output(make_ckpt, tmp_path, monkeypatch)
    calls = []

    def refuse(*a):
        calls.append(a)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(shard_writer, "_copy_file_range_ok", True)
    convert(src, tmp_path / "plain", opts)
    assert len(calls) == 1 and shard_writer._copy_file_range_ok is False  # the first refusal switches it off
    assert snapshot(tmp_path / "plain") == fast


def test_short_copies_and_a_refusal_midway(make_ckpt, tmp_path, monkeypatch):
    """copy_file_range may copy less than asked, and be refused after it has copied part of a span: the
    rest of that span, and every span after it, is written from the mapped view at the right offset."""
    src, fast, opts = _src_and_fast_output(make_ckpt, tmp_path, monkeypatch)
    real = os.copy_file_range
    n = [0]

    def flaky(fd_in, fd_out, count, off_in, off_out):
        n[0] += 1
        if n[0] == 40:
            raise OSError(errno.EXDEV, "refused")
        return real(fd_in, fd_out, random.randint(1, min(count, 70_000)), off_in, off_out)

    monkeypatch.setattr(os, "copy_file_range", flaky)
    monkeypatch.setattr(shard_writer, "_copy_file_range_ok", True)
    convert(src, tmp_path / "flaky", opts)
    assert n[0] == 40
    assert snapshot(tmp_path / "flaky") == fast


def test_a_real_copy_error_is_raised_and_leaves_no_shard(make_ckpt, tmp_path, monkeypatch):
    src = make_ckpt(layers=2, experts=3, hidden=512, inter=512)

    def broken(*a):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    monkeypatch.setattr(shard_writer, "_copy_file_range_ok", True)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="I/O error"):
        convert(src, out, ConvertOptions())
    assert shard_writer._copy_file_range_ok is True  # not a refusal: no fallback
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.partial"))


@pytest.mark.parametrize("short_writes", [False, True])
@pytest.mark.parametrize("copy_ok", [True, False])
def test_write_pieces_mixes_spans_views_and_arrays(tmp_path, monkeypatch, short_writes, copy_ok):
    data = os.urandom(200_000)
    (tmp_path / "src").write_bytes(data)
    fd_in = os.open(tmp_path / "src", os.O_RDONLY)
    mm = mmap.mmap(fd_in, 0, access=mmap.ACCESS_READ)
    whole = memoryview(mm)
    monkeypatch.setattr(shard_writer, "_copy_file_range_ok", copy_ok)
    if short_writes:  # the kernel may write fewer bytes than asked
        monkeypatch.setattr(os, "pwritev", stingy(os.pwritev, 5000))
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


def test_a_source_shard_that_changed_size_is_refused_not_a_crash(make_ckpt, tmp_path):
    """A mapped file shorter than its header says would kill the process (SIGBUS) at the first access
    past its end; a shard that changed since it was planned is refused instead."""
    src = make_ckpt(layers=2, experts=3, hidden=512, inter=512, shards=2)
    opts = ConvertOptions()
    plan = make_plan(src, opts)
    shard = sorted(src.glob("*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 1)
    with pytest.raises(InputError, match="changed"):
        convert(src, tmp_path / "out", opts, spec=plan)


def test_peak_estimate_does_not_grow_with_experts(make_ckpt):
    """Only the shards written at once add to it, each its share of the read-ahead budget and one
    expert; the model's size does not."""
    from nvfp4_fuse.spec import INFLIGHT_BYTES

    opts = ConvertOptions(target="vllm-fused")
    small = make_plan(make_ckpt(layers=2, experts=4, hidden=128, inter=64), opts)
    big = make_plan(make_ckpt(layers=3, experts=32, hidden=128, inter=64, shards=3), opts)
    assert small.peak_memory_estimate(4) == big.peak_memory_estimate(4)
    assert big.peak_memory_estimate(4) - big.peak_memory_estimate(1) == 3 * (INFLIGHT_BYTES + big.max_expert_bytes)


def test_writer_refuses_too_few_or_too_many_bytes(tmp_path):
    """A shard is renamed into place only when every declared byte arrived, and never takes more."""
    from nvfp4_fuse.safetensors_header import OutEntry
    from nvfp4_fuse.shard_writer import StreamingShardWriter

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


# ---------------------------------------------------------------------------------------------------
# several shards written at once


def _concurrent_src(make_ckpt) -> tuple[Path, ConvertOptions]:
    src = make_ckpt(layers=4, experts=4, hidden=512, inter=512, shards=3, unequal_scale_2=True)
    return src, ConvertOptions(target="mega-moe", max_shard_size=600_000, workers=3)


def test_shards_written_at_once_give_the_same_bytes(make_ckpt, tmp_path, monkeypatch):
    """Three shard streams really write at once (the first three shard writers each wait in their first
    write until all three are there), and every file, manifest included, is byte-identical to one
    stream's output."""
    src, opts = _concurrent_src(make_ckpt)
    one = convert(src, tmp_path / "one", ConvertOptions(**{**opts.__dict__, "shard_streams": 1}))
    assert len(one.spec.shards) >= 5
    barrier = threading.Barrier(3, timeout=30)
    first_puts: set[int] = set()
    lock = threading.Lock()
    orig = shard_writer.StreamingShardWriter.put

    def put(self, pieces, *a, **kw):
        with lock:
            wait = id(self) not in first_puts and len(first_puts) < 3
            first_puts.add(id(self))
        if wait:
            barrier.wait()  # BrokenBarrierError unless three writers are open at once
        return orig(self, pieces, *a, **kw)

    monkeypatch.setattr(shard_writer.StreamingShardWriter, "put", put)
    three = convert(src, tmp_path / "three", ConvertOptions(**{**opts.__dict__, "shard_streams": 3}))
    assert barrier.n_waiting == 0 and not barrier.broken
    assert snapshot(tmp_path / "three") == snapshot(tmp_path / "one")
    assert [r.to_json() for r in three.layers] == [r.to_json() for r in one.layers]


def test_a_failing_shard_stops_the_others_and_leaves_no_partial(make_ckpt, tmp_path, monkeypatch):
    """An I/O error in one shard's stream is raised; the shards being written beside it are dropped (no
    .partial left, nothing renamed that the journal does not list), and a rerun completes the job."""
    src, opts = _concurrent_src(make_ckpt)
    opts = ConvertOptions(**{**opts.__dict__, "shard_streams": 3})
    ref = convert(src, tmp_path / "ref", opts)
    victim = ref.spec.shards[len(ref.spec.shards) // 2].name
    real = conv._write_shard

    def failing(shared, out, shard, meta):
        if shard.name == victim:
            time.sleep(0.05)  # let the other streams get going
            raise OSError(errno.EIO, "disk says no")
        return real(shared, out, shard, meta)

    with monkeypatch.context() as m:
        m.setattr(conv, "_write_shard", failing)
        with pytest.raises(OSError, match="disk says no"):
            convert(src, tmp_path / "out", opts)
    out = tmp_path / "out"
    assert not list(out.glob("*.partial")) and not (out / "nvfp4-fuse-manifest.json").exists()
    journal = json.loads((out / conv.PROGRESS_NAME).read_text())["files"]
    assert victim not in journal
    assert sorted(p.name for p in out.glob("model-*")) == sorted(journal)
    convert(src, out, opts)
    assert snapshot(out) == snapshot(tmp_path / "ref")
