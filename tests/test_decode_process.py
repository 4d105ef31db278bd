"""The GPU decode's own process (decode_process.py, decode_worker.py), through its CPU mode: the same
messages and lanes' protocol, the kernel's torch reference in place of the kernel. What the parent
sends (file regions, not bytes), what comes back, and how each failure of the worker is told."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
from helpers import skew_decoded_scale_2

from nvfp4_fuse import decode_process, mapped_faults
from nvfp4_fuse import verify as ver
from nvfp4_fuse.convert import ConvertOptions, convert
from nvfp4_fuse.errors import CheckFailed, DecodeFailed, InputError
from nvfp4_fuse.safetensors_header import read_header
from nvfp4_fuse.shard_reader import ShardReader
from nvfp4_fuse.verify import check_shards, verify


@pytest.fixture
def converted(make_ckpt, tmp_path):
    target = random.choice(["vllm-fused", "per-expert", "linear"])
    src = make_ckpt(layers=2, experts=random.randint(4, 8), hidden=64, inter=32, unequal_scale_2=True, shards=2)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=target, max_shard_size=random.choice([40_000, 5 << 30])))
    return src, out


@pytest.fixture
def worker(monkeypatch):
    """verify's GPU path with this test's worker (CPU mode, unless the test starts another)."""
    procs: list[decode_process.DecodeProcess] = []

    def start(device: str = "cpu", env: dict | None = None) -> decode_process.DecodeProcess:
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        p = decode_process.DecodeProcess(device)
        procs.append(p)
        monkeypatch.setattr(decode_process, "shared", lambda device="cuda": p)
        monkeypatch.setattr(ver, "pick_device", lambda device: "cpu" if device == "cpu" else "cuda")
        return p

    yield start
    for p in procs:
        p.close()


def test_a_part_is_sent_as_where_its_bytes_lie(tmp_path):
    """A view of a mapped checkpoint file goes as (file, inode, offset, length), which the worker
    reads; anything else (a decoded or joined array) goes as its bytes."""
    data = np.random.randint(0, 256, 1 << 16, dtype=np.uint8)
    path = tmp_path / "a.safetensors"
    safetensors.numpy.save_file({"t": data.reshape(256, 256)}, str(path))
    r = ShardReader(read_header(path))
    try:
        start, n = random.randrange(1000), random.randrange(1, 5000)
        view = r.held_array("t", start, n)
        kind, p, ino, off, nbytes = decode_process.region(view)
        assert (kind, p, ino, nbytes) == ("file", str(path), os.stat(path).st_ino, n)
        with open(path, "rb") as f:
            f.seek(off)
            assert f.read(n) == data.tobytes()[start : start + n]
        copy = view.copy()
        assert decode_process.region(copy) == ("bytes", copy.tobytes())
        assert mapped_faults.locate(copy.ctypes.data, n) is None
        r.release_tensor("t", start, n)
    finally:
        r.close()


def test_the_worker_gives_the_cpu_reference_and_holds_no_file_after_a_flush(converted, worker):
    """Over any partition of the shards into check_shards calls, each decoded once, with the result of
    the in-process CPU reference; after each call the worker holds no file open (the Hub source's
    files are deleted once their shards are checked)."""
    src, out = converted
    ref = verify(src, out, device="cpu", decode=True)
    proc = worker()
    _, _, spec = ver.checked_plan(src, out)
    names = [s.name for s in spec.shards]
    random.shuffle(names)
    parts = []
    for name in names:
        parts.append(check_shards(spec, out, [name], decode="cuda", decoder=proc))
        fds = os.listdir(f"/proc/{proc.proc.pid}/fd")
        held = [os.readlink(f"/proc/{proc.proc.pid}/fd/{fd}") for fd in fds]
        assert not [h for h in held if h.endswith(".safetensors")], held
    got = ver.merge_results(parts)
    for g, c in zip(got.layers, ref.layers):
        assert g.decoded == c.decoded and g.max_abs == c.max_abs


def test_a_decoded_difference_found_by_the_worker_is_named(make_ckpt, tmp_path, monkeypatch, worker):
    src = make_ckpt(layers=2, experts=6, hidden=64, inter=32)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target="vllm-fused"))
    victim = random.randrange(6)
    skew_decoded_scale_2(monkeypatch, victim)
    worker()
    with pytest.raises(CheckFailed, match=f"w2_weight: expert {victim} should decode bit-identically"):
        verify(src, out, device="cuda", workers=2)


def test_a_killed_worker_is_one_line(converted, worker, monkeypatch):
    src, out = converted
    proc = worker()
    real = decode_process.DecodeChannel._stats

    def kill_then(self, key, row):
        os.kill(proc.proc.pid, signal.SIGKILL)
        return real(self, key, row)

    monkeypatch.setattr(decode_process.DecodeChannel, "_stats", kill_then)
    with pytest.raises(DecodeFailed, match="the GPU decode process was killed by signal 9"):
        verify(src, out, device="cuda")


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_a_gpu_the_worker_cannot_use(converted, worker, device):
    """The parent does not import torch to pick the device; the worker finds out. With auto, a GPU it
    cannot use means no decode, as on a machine without one; asked for (cuda), one error line."""
    src, out = converted
    worker("cuda", env={"CUDA_VISIBLE_DEVICES": ""})
    if device == "cuda":
        with pytest.raises(InputError, match="--device cuda but the GPU decode cannot run: no usable CUDA device"):
            verify(src, out, device=device)
        return
    res = verify(src, out, device=device)
    assert res.device == "cpu" and not any("end to end" in c for c in res.checks)
    assert all(l.decoded == 0 for l in res.layers) and "not run" in res.note


def test_the_verify_process_never_imports_torch_for_the_gpu_decode(converted):
    """torch (3-4 s to import on the GPU host) and Triton are the worker's: the verify process itself
    sends regions and reads statistics."""
    src, out = converted
    code = (
        "import sys\n"
        "from nvfp4_fuse import decode_process, verify as ver\n"
        "p = decode_process.DecodeProcess('cpu')\n"
        "decode_process.shared = lambda device='cuda': p\n"
        "ver.pick_device = lambda device: 'cuda'\n"
        f"r = ver.verify({str(src)!r}, {str(out)!r}, device='cuda')\n"
        "assert all(l.decoded for l in r.layers), r\n"
        "p.close()\n"
        "print(sorted(m for m in ('torch', 'triton') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_a_worker_far_behind_holds_the_pass_back(converted, worker):
    """With room for one part's values, every part still decodes once, the pass waiting for each."""
    src, out = converted
    ref = verify(src, out, device="cpu", decode=True)
    proc = worker()
    proc.backlog = 1
    got = verify(src, out, device="cuda", workers=4)
    for g, c in zip(got.layers, ref.layers):
        assert g.decoded == c.decoded and g.max_abs == c.max_abs


def test_the_worker_ends_with_its_parent(converted, tmp_path):
    """A verify killed (SIGKILL: no cleanup) leaves no worker behind: its stdin ends, and so does it."""
    src, out = converted
    pidfile = tmp_path / "pid"
    code = (
        "import os, time\n"
        "from nvfp4_fuse import decode_process\n"
        "p = decode_process.DecodeProcess('cpu')\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.proc.pid))\n"
        "p.wait_ready()\n"
        "os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", code], timeout=120)
    pid = int(pidfile.read_text())
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return  # ended, waiting for the init process to reap it
        time.sleep(0.1)
    pytest.fail(f"worker {pid} still running")
