"""verify's end-to-end decode on a GPU: the decode process's lanes (expert parts of one shape batched,
each batch read from the files into one pinned buffer and uploaded once, its inputs finished on the
device, one compare launch a batch, statistics read back every few batches) report what the kernel's
torch reference reports on the CPU. The lanes' settings are the worker's (``NVFP4_FUSE_DECODE_KNOBS``),
so each test starts a worker of its own.

Skipped without CUDA (the CPU suite runs the same checks through the reference); run on a GPU with
``python3 -m pytest tests/test_verify_gpu.py``.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch
from helpers import skew_decoded_scale_2

from nvfp4_fuse import decode_process, kernel_cache
from nvfp4_fuse.convert import ConvertOptions, convert
from nvfp4_fuse.decode_worker import KNOBS_ENV
from nvfp4_fuse.errors import CheckFailed
from nvfp4_fuse.verify import verify

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    """Checked when each test runs, not at collection: test_kernels.py, collected later in the same
    process, switches Triton to its interpreter, which would run these on the GPU's tensors a
    thousand times slower than compiled. The workers here compile through torch and Triton and keep
    nothing (no kernel cache) unless the test gives them a cache of its own."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter is on in this process (test_kernels.py sets it): run this file on its own")
    monkeypatch.setenv(kernel_cache.CACHE_ENV, "off")
    decode_process.close_shared()  # each test's worker reads its own settings
    yield
    decode_process.close_shared()


def knobs(monkeypatch, **values) -> None:
    monkeypatch.setenv(KNOBS_ENV, ",".join(f"{k}={v}" for k, v in values.items()))


@pytest.mark.parametrize("target", ["mega-moe", "vllm-fused", "per-expert"])
@pytest.mark.parametrize("slow_kernel_load", [False, True])
def test_gpu_decode_matches_the_cpu_reference(make_ckpt, tmp_path, target, monkeypatch, slow_kernel_load):
    # 40 experts on one worker: more launches than a lane holds before reading back
    src = make_ckpt(layers=2, experts=40, hidden=512, inter=512, unequal_scale_2=True)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=target))
    knobs(
        monkeypatch,
        FLUSH=random.choice([7, 32]),
        BATCH=random.choice([1, 3, 8]),  # part-filled batches launched at the flush
        STAGE_BYTES=random.choice([1, 300_000, 32 << 20]),  # a batch's bytes cap it too
        GRAPHS=random.choice([0, 1]),
        WARM_DELAY=2.0 if slow_kernel_load else 0,  # the lanes run the kernel's torch reference on the GPU first
    )
    t0 = time.perf_counter()
    gpu = verify(src, out, device="cuda", workers=random.choice([1, 3]))
    again = verify(src, out, device="cuda")  # the same worker, its kernel loaded
    assert time.perf_counter() - t0 < 120
    cpu = verify(src, out, device="cpu", decode=True)
    for res in (gpu, again):
        assert res.device == "cuda"
        for g, c in zip(res.layers, cpu.layers):
            assert g.decoded == c.decoded == 40 and g.checked == 40
            assert g.max_abs == c.max_abs
            assert g.max_rel == c.max_rel  # per block, from the scales: the same on both
        assert any("Triton compare kernel on the GPU" in c for c in res.checks)


@pytest.mark.parametrize("target", ["vllm-fused", "per-expert"])
def test_gpu_decode_failure_is_named(make_ckpt, tmp_path, monkeypatch, target):
    """A decoded difference found only at a read-back still names its expert: here the output's
    scale_2 the decode is given is off for one copied half, so it cannot decode bit-identically."""
    src = make_ckpt(layers=2, experts=12, hidden=512, inter=512)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=target))
    victim = random.randrange(12)
    skew_decoded_scale_2(monkeypatch, victim)
    knobs(monkeypatch, BATCH=random.choice([3, 8]))  # the expert is found by its row in a batch
    part = "w2_weight" if target == "vllm-fused" else f"experts.{victim}.w2.weight"
    with pytest.raises(CheckFailed, match=f"{part}: expert {victim} should decode bit-identically"):
        verify(src, out, device="cuda", workers=2)


def test_a_warm_worker_replays_cuda_graphs(make_ckpt, tmp_path, monkeypatch):
    """Once the kernel is loaded, a shape's batches after its first eager one are CUDA graph replays
    (a capture that failed would fall back to eager batches: as exact, slower to launch, and this
    test would say so); with graphs off every batch runs eagerly."""
    src = make_ckpt(layers=2, experts=24, hidden=512, inter=512)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target="mega-moe"))
    graphs = random.choice([0, 1])
    knobs(monkeypatch, BATCH=4, GRAPHS=graphs)
    proc = decode_process.shared("cuda")
    for _ in range(30):  # until the kernel is loaded
        verify(src, out, device="cuda", sample=1)
        if proc.kernel_loaded:
            break
        time.sleep(1.0)
    assert proc.kernel_loaded
    before = dict(proc.batches)
    res = verify(src, out, device="cuda")
    assert all(l.decoded == 24 for l in res.layers)
    ran = {k: proc.batches.get(k, 0) - before.get(k, 0) for k in ("reference", "eager", "graph")}
    assert ran["reference"] == 0, ran
    if graphs:
        assert ran["graph"] > ran["eager"] >= 0, ran
    else:
        assert ran["graph"] == 0 and ran["eager"] > 0, ran


@pytest.mark.parametrize("target", ["mega-moe", "vllm-fused", "per-expert"])
def test_a_later_worker_decodes_without_torch(make_ckpt, tmp_path, monkeypatch, target):
    """The first worker compiles through torch and Triton and keeps each expert shape's binary (once
    the driver's launch of it matched Triton's); a later worker finds them, never imports torch, and
    its driver lanes report what the CPU reference does, whatever the batching."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    src = make_ckpt(layers=2, experts=40, hidden=512, inter=512, unequal_scale_2=True)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=target))
    first = decode_process.shared("cuda")
    verify(src, out, device="cuda", sample=2)
    assert "driver" not in first.batches
    decode_process.close_shared()  # the worker keeps the binaries before it ends
    kept = sorted(p.name for p in cache.iterdir())
    # two expert shapes (w13's and w2's; per-expert's gate and up are w2's here, at hidden = inter)
    assert len(kept) == 2 and all(n.startswith("compare-") for n in kept), kept
    knobs(monkeypatch, FLUSH=random.choice([1, 7, 32]), BATCH=random.choice([1, 3, 8]),
          STAGE_BYTES=random.choice([1, 300_000, 32 << 20]), RING=random.choice([1, 2]))  # fmt: skip
    proc = decode_process.shared("cuda")
    t0 = time.perf_counter()
    proc.wait_ready()
    started = time.perf_counter() - t0
    gpu = verify(src, out, device="cuda", workers=random.choice([1, 3]))
    maps = open(f"/proc/{proc.proc.pid}/maps").read()
    assert "libtorch" not in maps and "triton" not in maps
    assert set(proc.batches) == {"driver"} and proc.batches["driver"] > 0, proc.batches
    cpu = verify(src, out, device="cpu", decode=True)
    for g, c in zip(gpu.layers, cpu.layers):
        assert g.decoded == c.decoded == 40 and g.max_abs == c.max_abs and g.max_rel == c.max_rel
    assert started < 3.0, started


def test_a_driver_lane_failure_is_named(make_ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(kernel_cache.CACHE_ENV, str(cache))
    src = make_ckpt(layers=2, experts=12, hidden=512, inter=512)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target="vllm-fused"))
    verify(src, out, device="cuda", sample=1)
    decode_process.close_shared()
    victim = random.randrange(12)
    skew_decoded_scale_2(monkeypatch, victim)
    knobs(monkeypatch, BATCH=random.choice([3, 8]))
    with pytest.raises(CheckFailed, match=f"w2_weight: expert {victim} should decode bit-identically"):
        verify(src, out, device="cuda", workers=2)
    assert set(decode_process.shared("cuda").batches) <= {"driver"}
