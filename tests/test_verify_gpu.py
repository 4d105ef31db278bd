"""verify's end-to-end decode on a GPU: the asynchronous lanes (expert parts of one shape batched, each
batch staged in one pinned copy and one upload, its inputs finished on the device, one compare launch a
batch, statistics read back every few batches) report what the kernel's torch reference reports on the
CPU.

Skipped without CUDA (the CPU suite runs the same checks through the reference); run on a GPU with
``python3 -m pytest tests/test_verify_gpu.py``.
"""

from __future__ import annotations

import os
import random
import time

import pytest
import torch

from nvfp4_fuse import verify as ver
from nvfp4_fuse.convert import ConvertOptions, convert
from nvfp4_fuse.decode_lanes import GpuLane
from nvfp4_fuse.errors import CheckFailed
from nvfp4_fuse.piece_checks import PieceChecker
from nvfp4_fuse.verify import verify

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def compiled_kernels():
    """Checked when each test runs, not at collection: test_kernels.py, collected later in the same
    process, switches Triton to its interpreter, which would run these on the GPU's tensors a
    thousand times slower than compiled."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton's interpreter is on in this process (test_kernels.py sets it): run this file on its own")


@pytest.mark.parametrize("target", ["mega-moe", "vllm-fused", "per-expert"])
@pytest.mark.parametrize("slow_kernel_load", [False, True])
def test_gpu_decode_matches_the_cpu_reference(make_ckpt, tmp_path, target, monkeypatch, slow_kernel_load):
    # 40 experts on one worker: more launches than a lane holds before reading back
    src = make_ckpt(layers=2, experts=40, hidden=512, inter=512, unequal_scale_2=True)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=target))
    monkeypatch.setattr(GpuLane, "FLUSH", random.choice([7, 32]))
    monkeypatch.setattr(GpuLane, "BATCH", random.choice([1, 3, 8]))  # part-filled batches launched at the flush
    monkeypatch.setattr(GpuLane, "STAGE_BYTES", random.choice([1, 300_000, 32 << 20]))  # a batch's bytes cap it too
    if slow_kernel_load:  # the pass runs ahead: decodes are put off, then run by the lanes and the main thread
        warm = ver.warm_kernels
        monkeypatch.setattr(ver, "warm_kernels", lambda plan, ready: (time.sleep(0.5), warm(plan, ready)))
    gpu = verify(src, out, device="cuda", workers=random.choice([1, 3]))
    cpu = verify(src, out, device="cpu", decode=True)
    for g, c in zip(gpu.layers, cpu.layers):
        assert g.decoded == c.decoded == 40 and g.checked == 40
        assert g.max_abs == c.max_abs
        assert g.max_rel == c.max_rel  # per block, from the scales: the same on both
    assert any("Triton compare kernel on the GPU" in c for c in gpu.checks)


@pytest.mark.parametrize("target", ["vllm-fused", "per-expert"])
def test_gpu_decode_failure_is_named(make_ckpt, tmp_path, monkeypatch, target):
    """A decoded difference found only at a read-back still names its expert: here the output's
    scale_2 the decode is given is off for one copied half, so it cannot decode bit-identically."""
    src = make_ckpt(layers=2, experts=12, hidden=512, inter=512)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=target))
    victim = random.randrange(12)
    real = PieceChecker._scale_2

    def skewed(self, layer, role, e):
        s2, c, ratio = real(self, layer, role, e)
        return (s2, c * 1.5, ratio) if role == "down" and e == victim else (s2, c, ratio)

    monkeypatch.setattr(PieceChecker, "_scale_2", skewed)
    monkeypatch.setattr(PieceChecker, "_half_scales", lambda *a, **kw: 0.0)  # the per-block check would see it first
    monkeypatch.setattr(GpuLane, "BATCH", random.choice([3, 8]))  # the expert is found by its row in a batch
    part = "w2_weight" if target == "vllm-fused" else f"experts.{victim}.w2.weight"
    with pytest.raises(CheckFailed, match=f"{part}: expert {victim} should decode bit-identically"):
        verify(src, out, device="cuda", workers=2)
