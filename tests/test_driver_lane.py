"""The GPU decode's driver lanes (driver_lane.py), on the CPU: a stand-in driver whose memory is host
memory and whose "kernel" is the compare kernel's torch reference, given exactly the pointers and
integers the lane passes (by the cached entry's parameter order, shuffled here). Every part the
pass decodes goes through both the CPU reference and the driver lane; their statistics must be the
same, bit for bit, whatever the target's layout (in place, or undone on the host), row order and
batching. The cache's own files (kernel_cache.py): keyed, written whole, refused when damaged."""

from __future__ import annotations

import ctypes
import dataclasses
import random
import threading

import numpy as np
import pytest
import torch
from helpers import skew_decoded_scale_2

from nvfp4_fuse import driver_lane, kernel_cache, piece_checks
from nvfp4_fuse.convert import ConvertOptions, convert
from nvfp4_fuse.cuda_driver import Function
from nvfp4_fuse.decode_lanes import ReferenceLane
from nvfp4_fuse.errors import CheckFailed
from nvfp4_fuse.kernels.reference import compare_nvfp4_ref
from nvfp4_fuse.verify import verify


class HostDriver:
    """:class:`~nvfp4_fuse.cuda_driver.CudaDriver`'s calls on host memory; ``launch`` runs the
    compare kernel's torch reference on the buffers its pointers name, writing each part's
    statistics into its first tile (the others neutral: zeros)."""

    capability = (9, 0)

    def __init__(self):
        self.mem: dict[int, np.ndarray] = {}
        self.launches = 0

    def _new(self, n: int) -> np.ndarray:
        a = np.full(max(n, 1) + 64, 0xA5, dtype=np.uint8)
        self.mem[a.ctypes.data] = a
        return a

    def at(self, addr: int, nbytes: int) -> np.ndarray:
        for base, a in self.mem.items():
            if base <= addr and addr + nbytes <= base + a.nbytes:
                return a[addr - base : addr - base + nbytes]
        raise AssertionError(f"no buffer holds {nbytes} bytes at {addr:#x}")

    def use(self):
        pass

    def alloc(self, n):
        return self._new(n).ctypes.data

    def host_alloc(self, n):
        a = self._new(n)
        return a.ctypes.data, a[:n]

    def free(self, p):
        self.mem.pop(p)

    host_free = free

    def stream(self):
        return ctypes.c_void_p(0)

    def event(self):
        return object()

    def record(self, ev, stream):
        pass

    def wait_event(self, ev):
        pass

    def sync(self, stream):
        pass

    def upload(self, dst, src, n, stream):
        self.at(dst, n)[:] = self.at(src, n)

    download = upload

    def launch(self, fn, grid, params, stream):
        entry, in_place = fn.handle
        got = {name: p.value for (name, _), p in zip(entry.params, params)}
        assert len(params) == len(entry.params) + entry.scratch and all(p.value == 0 for p in params[len(entry.params) :])
        assert got["wa_ptr"] == got["wb_ptr"]  # both sides decode the output's values
        t, n = grid[0], grid[1]
        m, k16, mp, kp = got["M"], got["K16"], got["Mp"], got["Kp"]
        assert t == got["T"] and got["nblk"] == m * k16
        vals = torch.from_numpy(self.at(got["wa_ptr"], n * m * k16 * 8).reshape(n, m, k16 * 8).copy())
        sa = torch.from_numpy(self.at(got["sa_ptr"], n * m * k16).reshape(n, m, k16).copy())
        s2a = torch.from_numpy(self.at(got["s2a_ptr"], 4 * n * m).view(np.float32).reshape(n, m).copy())
        b_shape = (n, mp, kp) if in_place else (n, m, k16)
        sb = torch.from_numpy(self.at(got["sb_ptr"], int(np.prod(b_shape))).reshape(b_shape).copy())
        s2b = torch.from_numpy(self.at(got["s2b_ptr"], 4 * n * m).view(np.float32).reshape(n, m).copy())
        res = compare_nvfp4_ref(vals, sa, s2a, vals, sb, s2b, b_swizzled=in_place)
        outs = [(got["abs_ptr"], np.float32, res.max_abs), (got["rel_ptr"], np.float32, res.max_rel),
                (got["cnt_ptr"], np.int32, res.n_diff), (got["flag_ptr"], np.int8, res.nonfinite)]  # fmt: skip
        for ptr, dt, stat in outs:
            tiles = self.at(ptr, n * t * np.dtype(dt).itemsize).view(dt).reshape(n, t)
            tiles[:] = 0
            tiles[:, 0] = stat.numpy().astype(dt)
        self.launches += 1


class AnyShape(dict):
    """Kernels for every shape: a cached entry whose parameters come in a random order."""

    def __missing__(self, key):
        params = [(p, "*u8") for p in kernel_cache.POINTERS] + [(i, random.choice(["i32", "i64"])) for i in kernel_cache.INTS]
        random.shuffle(params)
        entry = kernel_cache.Entry("compare", 64, 0, params, random.choice([0, 2]), b"")
        self[key] = (Function((entry, key[2]), 0, 64), entry)
        return self[key]


@pytest.mark.parametrize("target", ["mega-moe", "vllm-fused", "linear", "per-expert"])
def test_the_driver_lane_decodes_what_the_reference_does(make_ckpt, tmp_path, monkeypatch, target):
    src = make_ckpt(layers=2, experts=random.randint(3, 6), hidden=512, inter=512, unequal_scale_2=True, shards=2)
    out = tmp_path / "out"
    order = random.choice(["gate-up", "up-gate"]) if target in ("vllm-fused", "linear") else "gate-up"
    convert(src, out, ConvertOptions(target=target, w13_order=order))
    skewed = random.random() < 0.5
    if skewed:
        skew_decoded_scale_2(monkeypatch, 1)
    for name, choices in (("BATCH", [1, 3, 8]), ("FLUSH", [1, 5, 32]), ("RING", [1, 2, 3]), ("STAGE_BYTES", [1, 32 << 20])):
        monkeypatch.setattr(driver_lane.DriverLane, name, random.choice(choices))
    drv = HostDriver()
    ref: dict = {}
    got: dict = {}
    lane = driver_lane.DriverLane(lambda key, row: got.__setitem__(key, list(row)), drv, AnyShape())

    lock = threading.Lock()

    class Both:
        def __init__(self, on_stats):
            self.on_stats = on_stats

        def launch(self, key, job):
            # copies: the values may be the pass's read buffer, reused once this check returns (the GPU
            # decode process is sent where they lie in the file instead)
            copy = dataclasses.replace(job, values=np.array(job.values), a_scales=tuple(np.array(a) for a in job.a_scales),
                                       b_stored=np.array(job.b_stored), release=lambda: None)  # fmt: skip
            job.release()

            def keep(k, row):
                ref[k] = [float(x) for x in row]
                self.on_stats(k, row)

            with lock:  # a lane is one decode thread's
                lane.launch(key, copy)
            ReferenceLane(keep).launch(key, copy)

    monkeypatch.setattr(piece_checks, "ReferenceLane", Both)
    try:
        verify(src, out, device="cpu", decode=True, workers=random.choice([1, 2]))
    except CheckFailed:
        assert skewed
    lane.flush()
    assert ref and got == ref
    assert drv.launches == lane.counts["driver"] >= -(-len(ref) // lane.BATCH)
    if skewed:
        assert any(row[0] for row in got.values())


def test_a_cache_entry_is_kept_whole_and_refused_when_damaged(tmp_path, monkeypatch):
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(tmp_path / "cache"))
    key = kernel_cache.entry_key((9, 0), 4096, 7168, True, driver_lane.LAUNCH)
    assert key and key != kernel_cache.entry_key((10, 0), 4096, 7168, True, driver_lane.LAUNCH)
    assert key != kernel_cache.entry_key((9, 0), 4096, 7168, False, driver_lane.LAUNCH)
    assert kernel_cache.load(key) is None
    params = [(p, "*i32") for p in kernel_cache.POINTERS] + [(i, "i32") for i in kernel_cache.INTS]
    binary = np.random.randint(0, 256, 5000, dtype=np.uint8).tobytes()
    assert kernel_cache.store(key, kernel_cache.Entry("_compare_kernel", 64, 0, params, 2, binary))
    back = kernel_cache.load(key)
    assert back is not None and back.binary == binary and back.params == params and back.scratch == 2
    files = list((tmp_path / "cache").iterdir())
    assert [f.name for f in files] == [f"compare-{key}.bin"]
    whole = files[0].read_bytes()
    files[0].write_bytes(whole[:-1])  # cut short
    assert kernel_cache.load(key) is None
    flipped = bytearray(whole)
    flipped[-1 - random.randrange(len(binary))] ^= 1 << random.randrange(8)  # one bit of the binary
    files[0].write_bytes(bytes(flipped))
    assert kernel_cache.load(key) is None
    monkeypatch.setenv(kernel_cache.CACHE_ENV, "off")
    assert kernel_cache.load(key) is None and not kernel_cache.store(key, back)
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(blocker / "kernels"))  # cannot be made, even by root
    assert not kernel_cache.store(key, back) and kernel_cache.load(key) is None


def test_an_entry_gives_its_parameters_in_its_own_order():
    params = [("T", "i64"), ("wa_ptr", "*u8"), ("M", "i32")]
    vals = kernel_cache.Entry("k", 64, 0, params, 2, b"").values({"M": 7, "T": 2**40, "wa_ptr": 0xDEAD00, "nblk": 1})
    assert [type(v) for v in vals] == [ctypes.c_int64, ctypes.c_uint64, ctypes.c_int32, ctypes.c_uint64, ctypes.c_uint64]
    assert [v.value for v in vals] == [2**40, 0xDEAD00, 7, 0, 0]
