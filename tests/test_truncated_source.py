"""A source shard truncated (or replaced) while it is being read ends the run with one line naming it
(exit 2), at whatever moment of the read it happens, and a conversion resumes once the file is whole
again.

tests/truncate_runner.py cuts a shard back to its header at a chosen moment, the same on every run
(one task thread, one shard stream): after a span of it is handed to the writer (the copy comes up
short), after a mapped view of it is handed out (its first reader faults: SIGBUS in the pool thread
checking block scales, or EFAULT in the writer's pwritev of gate/up rows), after a span of it is
copied and before it is hashed from the mapping (SIGBUS in the hashing thread), before a small pread
(it comes up short), and, in verify, after an array of a source or converted shard is handed to a
comparison (SIGBUS). A SIGBUS used to kill the process with no word (status -7). A shard replaced by
a copy of itself mid-read fails no read (the old file stays open) and is caught before the shard
being written is journaled.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nvfp4_fuse.convert import ConvertOptions, convert

RUNNER = Path(__file__).with_name("truncate_runner.py")
ARGS = ("--workers", "1", "--shard-streams", "1", "--max-shard-size", "2MB")


def truncating(point: str, file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RUNNER), point, str(file), *args], capture_output=True, text=True, timeout=120)


def one_error_line(r: subprocess.CompletedProcess, file: Path) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert f"(file {file}" in lines[0] and ("truncated?" in lines[0] or "while being read" in lines[0]), lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def source(make_ckpt, tmp_path) -> tuple[Path, Path]:
    """(a pristine checkpoint, the shard of it to truncate: the second, with experts of two layers)."""
    src = make_ckpt(layers=3, experts=8, hidden=512, inter=512, shards=3, unequal_scale_2=True)
    return src, sorted(src.glob("model-*.safetensors"))[1]


@pytest.mark.parametrize("point", ["span:2", "view:1", "view:4", "copied:1", "copied:3", "small:1", "replace:2"])
def test_convert_names_a_source_truncated_mid_read_and_resumes(source, tmp_path, point):
    pristine, shard = source
    src = tmp_path / "src"
    shutil.copytree(pristine, src)
    ref = tmp_path / "ref"
    convert(src, ref, ConvertOptions(max_shard_size=2 * 10**6, workers=1, shard_streams=1))
    out = tmp_path / "out"
    cut = src / shard.name

    r = truncating(point, cut, "convert", str(src), str(out), *ARGS)
    one_error_line(r, cut)
    assert not (out / "nvfp4-fuse-manifest.json").exists()

    shutil.copyfile(shard, cut)  # the file whole again: the same command finishes the job
    again = subprocess.run(
        [sys.executable, "-m", "nvfp4_fuse.cli", "convert", str(src), str(out), *ARGS, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert snapshot(out) == snapshot(ref)


@pytest.mark.parametrize("which", ["source", "converted"])
@pytest.mark.parametrize("n", [1, 6])
def test_verify_names_a_shard_truncated_mid_read(source, tmp_path, which, n):
    pristine, shard = source
    src = tmp_path / "src"
    shutil.copytree(pristine, src)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(max_shard_size=2 * 10**6, workers=1, shard_streams=1))
    cut = src / shard.name if which == "source" else sorted(out.glob("model-*.safetensors"))[0]

    r = truncating(f"held:{n}", cut, "verify", str(src), str(out), "--device", "cpu", "--workers", "1", "--json")
    line = one_error_line(r, cut)
    body = json.loads(r.stdout)
    assert body["ok"] is False and body["error"]["code"] == 2
    assert body["error"]["message"] == line.removeprefix("error: ")


def test_a_fault_outside_the_readers_mappings_is_left_to_the_system(tmp_path):
    """A SIGBUS the readers' mappings do not explain is not reported as theirs: the action that was
    there before is put back and the fault ends the process as it would have."""
    script = """
import mmap, os, sys
from nvfp4_fuse import mapped_faults
mapped_faults.install(lambda line: print("reported", line, flush=True))
p = sys.argv[1]
with open(p, "wb") as fh:
    fh.write(b"x" * 65536)
m = mmap.mmap(os.open(p, os.O_RDONLY), 65536, access=mmap.ACCESS_READ)
os.truncate(p, 0)
print(m[40000])
"""
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f")], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGBUS, (r.returncode, r.stdout, r.stderr)
    assert "reported" not in r.stdout
