"""Plain helpers shared by the tests: read a whole checkpoint, rewrite its tensors, run the CLI, a
recording stand-in for the Hub client, the resident size of a mapping and what stays mapped."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file


def decode_device() -> str:
    """Where the tests that run the end-to-end decode run it: the GPU (the Triton kernel, in the decode
    process) when there is one, else the kernel's torch reference on the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(idx["weight_map"].values())):
        out.update(load_file(folder / f))
    return out


def rewrite_tensors(folder: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply fn to each shard's tensor dict in place (it may add, drop or change tensors); fix the index."""
    idx_path = folder / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    wm = {}
    for f in sorted(set(idx["weight_map"].values())):
        tensors = load_file(folder / f)
        fn(tensors)
        save_file(tensors, folder / f, metadata={"format": "pt"})
        for n in tensors:
            wm[n] = f
    idx["weight_map"] = wm
    idx_path.write_text(json.dumps(idx))


def run_inprocess(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (faster than a subprocess): (exit code, stdout, stderr)."""
    from nvfp4_fuse import cli

    capsys.readouterr()
    old = sys.argv
    sys.argv = ["nvfp4-fuse", *args]
    try:
        with pytest.raises(SystemExit) as ei:
            cli.main()
    finally:
        sys.argv = old
    cap = capsys.readouterr()
    return int(ei.value.code or 0), cap.out, cap.err


def split(path: Path) -> tuple[bytes, bytes]:
    """(header JSON bytes, data section) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return raw[8 : 8 + n], raw[8 + n :]


def join(path: Path, header: bytes, data: bytes, *, declared: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(header) if declared is None else declared) + header + data)


def edit_header(path: Path, fn: Callable[[dict], None]) -> None:
    hdr, data = split(path)
    obj = json.loads(hdr)
    fn(obj)
    join(path, json.dumps(obj).encode(), data)


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


CRASH_RUNNER = Path(__file__).with_name("crash_runner.py")


def run_cli(
    *args: str, cwd: Path | None = None, kill_at: str | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """The CLI in a process of its own; with ``kill_at``, through tests/crash_runner.py, which SIGKILLs
    it at that point (returncode ``-SIGKILL`` then)."""
    cmd = [sys.executable, str(CRASH_RUNNER), kill_at, *args] if kill_at else [sys.executable, "-m", "nvfp4_fuse.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def fake_hub_env(hub, home: Path) -> dict[str, str]:
    """The environment of a CLI process that talks to the fake Hub ``hub`` (tests/fake_hub.py), with
    its own Hugging Face home (cache, token) ``home``; no Xet, stalls given up after 5 s."""
    import os

    return {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": hub.token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
        "NVFP4_FUSE_HUB_STALL_S": "5",
    }


class RecordingApi:
    """The four HfApi methods push uses. ``upload_outcomes`` scripts upload_folder: an exception
    is raised, anything else means success (the folder is then "stored" as the Hub would)."""

    def __init__(self, upload_outcomes=(), *, create_outcomes=()):
        self.calls: list[tuple[str, dict]] = []
        self.upload_outcomes = list(upload_outcomes)
        self.create_outcomes = list(create_outcomes)
        self.remote: dict[str, bytes] = {}
        self.tamper: dict[str, bytes] = {}  # path -> bytes the "Hub" ends up holding instead
        self.drop: set[str] = set()

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        if self.create_outcomes and isinstance(e := self.create_outcomes.pop(0), BaseException):
            raise e
        return f"http://127.0.0.1:1/{repo_id}"

    def create_branch(self, repo_id, **kw):
        self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        from nvfp4_fuse.hub import local_upload_files

        self.calls.append(("upload_folder", kw))
        if self.upload_outcomes and isinstance(e := self.upload_outcomes.pop(0), BaseException):
            raise e
        folder = Path(kw["folder_path"])
        for rel in local_upload_files(folder):
            if rel not in self.drop:
                self.remote[rel] = self.tamper.get(rel, (folder / rel).read_bytes())

        class Commit:
            oid = "c" * 40
            commit_url = "http://127.0.0.1:1/me/x/commit/" + "c" * 40

        return Commit()

    def get_paths_info(self, repo_id, paths, *, revision=None, repo_type=None):
        from huggingface_hub.hf_api import RepoFile

        self.calls.append(("get_paths_info", {"paths": list(paths), "revision": revision}))
        out = []
        for p in paths:
            if p not in self.remote:
                continue
            data = self.remote[p]
            d = {"path": p, "size": len(data), "oid": git_blob_sha1(data)}
            if p.endswith(".safetensors"):
                d["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            out.append(RepoFile(**d))
        return out

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


def mapped_resident(mapping) -> int:
    """Bytes of one ``mmap.mmap`` that are mapped into this process now (the Rss of its entry in
    /proc/self/smaps)."""
    addr = np.frombuffer(mapping, dtype=np.uint8, count=1).ctypes.data
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: start-end perms ...
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "Rss:":
                return int(line.split()[1]) << 10
    raise AssertionError("mapping not found in /proc/self/smaps")


def mapped_at_close(monkeypatch, owner: type, readers: Callable) -> list[int]:
    """Records, each time ``owner.close`` runs, the bytes its ShardReaders (``readers(self)``) still
    have mapped, just before they are closed."""
    seen: list[int] = []
    real = owner.close

    def close(self):
        seen.append(sum(mapped_resident(r._map) for r in readers(self) if r._map is not None))
        real(self)

    monkeypatch.setattr(owner, "close", close)
    return seen


def files_bytes(root: Path, counts: Callable[[Path], bool]) -> int:
    """Bytes of the files under ``root`` that ``counts``, read while a run may delete them."""
    n = 0
    for p in list(root.rglob("*")):
        try:
            if p.is_file() and counts(p):
                n += p.stat().st_size
        except FileNotFoundError:
            pass
    return n


def sample_disk_as_it_grows(monkeypatch: pytest.MonkeyPatch, measure: Callable[[], int]) -> list[int]:
    """``measure()`` taken at every moment a run's disk grows: each piece a download stores
    (``FetchStats.add``) and each piece a shard writer writes (``StreamingShardWriter.put``)."""
    from nvfp4_fuse import convert as conv
    from nvfp4_fuse.hub import fetch

    samples: list[int] = []
    orig_add = fetch.FetchStats.add
    orig_put = conv.StreamingShardWriter.put

    def add(self, *a, **kw):
        orig_add(self, *a, **kw)
        samples.append(measure())

    def put(self, *a, **kw):
        fut = orig_put(self, *a, **kw)
        samples.append(measure())
        return fut

    monkeypatch.setattr(fetch.FetchStats, "add", add)
    monkeypatch.setattr(conv.StreamingShardWriter, "put", put)
    return samples


def skew_decoded_scale_2(monkeypatch, victim: int) -> None:
    """The output's scale_2 the end-to-end decode is given is off (x1.5) for expert ``victim``'s down
    projection, a copied half, so it cannot decode bit-identically; the per-block check, which would
    see it first, is switched off."""
    from nvfp4_fuse.piece_checks import PieceChecker

    real = PieceChecker._scale_2

    def skewed(self, layer, role, e):
        s2, c, ratio = real(self, layer, role, e)
        return (s2, c * 1.5, ratio) if role == "down" and e == victim else (s2, c, ratio)

    monkeypatch.setattr(PieceChecker, "_scale_2", skewed)
    monkeypatch.setattr(PieceChecker, "_half_scales", lambda *a, **kw: 0.0)
