"""Crash safety and resume: a real SIGKILL mid-conversion, then the same command finishes the job.

tests/crash_runner.py runs the CLI and SIGKILLs it at a named point (after a shard, mid-shard, before
the index, before the manifest) by wrapping the converter's functions from outside. A resumed folder must end byte-identical, file for file, to an uninterrupted run; shards
finished before the crash are kept (same inode and mtime); a folder interrupted before the manifest is
never complete; a rerun with other options or other input is refused unless --overwrite. Also: the
free-disk preflight refuses to start, and never after destroying what --overwrite would replace.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import run_cli

from nvfp4_fuse.convert import PROGRESS_NAME, ConvertOptions, convert, make_plan
from nvfp4_fuse.errors import InputError
from nvfp4_fuse.manifest import MANIFEST_NAME
from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint
from nvfp4_fuse.source import INDEX_NAME
from nvfp4_fuse.spec import human

TARGET = "vllm-fused"
SHARD = "20KB"
# One shard at a time, so that the kill points below fall in known shards; shards written at once have
# a test of their own.
ARGS = ("--target", TARGET, "--max-shard-size", SHARD, "--workers", "2", "--shard-streams", "1")


def cli(*args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, kill_at=kill_at, timeout=120)


def convert_cli(src: Path, out: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return cli("convert", str(src), str(out), *ARGS, *extra, "--json", kill_at=kill_at)


def killed(r: subprocess.CompletedProcess) -> bool:
    return r.returncode == -signal.SIGKILL


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stamps(folder: Path, names) -> dict[str, tuple[int, int]]:
    return {n: ((folder / n).stat().st_ino, (folder / n).stat().st_mtime_ns) for n in names}


def journaled(out: Path) -> list[str]:
    return sorted(json.loads((out / PROGRESS_NAME).read_text())["files"])


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    # unequal gate/up scale_2: the rescale report in the manifest must survive a resume too
    folder = tmp_path_factory.mktemp("crash") / "src"
    make_sample_checkpoint(folder, SampleSpec(layers=3, experts=4, hidden=64, inter=32, shards=2, unequal_scale_2=True, seed=1234))
    return folder


@pytest.fixture(scope="module")
def reference(src: Path) -> tuple[dict[str, bytes], list[int]]:
    """An uninterrupted run: every file's bytes, and the tensor bytes of each planned shard."""
    out = src.parent / "reference"
    r = convert_cli(src, out)
    assert r.returncode == 0, r.stderr
    plan = make_plan(src, ConvertOptions(target=TARGET, max_shard_size=20_000))
    sizes = [s.data_bytes for s in plan.shards]
    assert len(sizes) >= 5  # several shards, or the kill points below mean nothing
    return snapshot(out), sizes


def _kill_points(sizes: list[int]) -> dict[str, str]:
    return {
        "after-first-shard": "shard:1",
        "mid-second-shard": f"bytes:{sizes[0] + sizes[1] // 2}",
        "before-index": "index",
        "before-manifest": "manifest",
    }


@pytest.mark.parametrize("point", ["after-first-shard", "mid-second-shard", "before-index", "before-manifest"])
def test_sigkill_then_resume_is_byte_identical(src, reference, tmp_path, point):
    ref_files, sizes = reference
    n_shards = len(sizes)
    out = tmp_path / "out"
    r = convert_cli(src, out, kill_at=_kill_points(sizes)[point])
    assert killed(r), (r.returncode, r.stderr)
    # Interrupted: never complete-looking, and the journal names only whole, renamed shards.
    assert not (out / MANIFEST_NAME).exists()
    kept = journaled(out)
    expect_kept = {"after-first-shard": 1, "mid-second-shard": 1}.get(point, n_shards)
    assert len(kept) == expect_kept, kept
    if point == "mid-second-shard":
        second = sorted(n for n in ref_files if n.startswith("model-0"))[1]
        assert not (out / second).exists() and (out / (second + ".partial")).exists()
    if point != "before-manifest":
        assert not (out / INDEX_NAME).exists()
    for name in kept:
        assert (out / name).read_bytes() == ref_files[name]
    before = stamps(out, kept)

    r = convert_cli(src, out)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["already_complete"] is False
    assert res["resumed_shards"] == kept
    assert stamps(out, kept) == before  # kept, not rewritten
    got = snapshot(out)
    assert sorted(got) == sorted(ref_files)  # no .partial, no journal left behind
    for name in ref_files:
        assert got[name] == ref_files[name], f"{name} differs from an uninterrupted run"

    r = convert_cli(src, out)  # a third run finds the manifest: nothing to do
    assert r.returncode == 0 and json.loads(r.stdout)["already_complete"] is True


@pytest.mark.parametrize("point", ["first-journaled", "three-quarters"])
def test_sigkill_with_shards_written_at_once_then_resume(src, reference, tmp_path, point):
    """Three shards written at once, killed: the journal names only whole shards (in whatever order they
    finished), a shard killed while being written is a .partial, and the rerun keeps exactly the
    journaled shards and ends byte-identical to an uninterrupted run."""
    ref_files, sizes = reference
    out = tmp_path / "out"
    kill_at = "shard:1" if point == "first-journaled" else f"bytes:{3 * sum(sizes) // 4}"
    r = convert_cli(src, out, "--shard-streams", "3", kill_at=kill_at)
    assert killed(r), (r.returncode, r.stderr)
    assert not (out / MANIFEST_NAME).exists() and not (out / INDEX_NAME).exists()
    kept = journaled(out)
    if point == "first-journaled":
        assert len(kept) == 1
    else:  # the kill came right after a write to a shard not yet finished
        assert len(kept) < len(sizes) and list(out.glob("model-*.partial"))
    for name in kept:
        assert (out / name).read_bytes() == ref_files[name]
    before = stamps(out, kept)
    r = convert_cli(src, out, "--shard-streams", "3")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_shards"] == kept and stamps(out, kept) == before
    assert snapshot(out) == ref_files


def test_repeated_crashes_each_keep_more(src, reference, tmp_path):
    ref_files, sizes = reference
    out = tmp_path / "out"
    assert killed(convert_cli(src, out, kill_at="shard:1"))
    first = journaled(out)
    t1 = stamps(out, first)
    assert killed(convert_cli(src, out, kill_at="shard:2"))  # resumes, writes two more, dies
    second = journaled(out)
    assert len(first) == 1 and len(second) == 3 and set(first) < set(second)
    assert stamps(out, first) == t1
    t2 = stamps(out, second)
    r = convert_cli(src, out)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_shards"] == second and stamps(out, second) == t2
    assert snapshot(out) == ref_files


def test_rerun_with_other_options_or_input_is_refused(src, reference, tmp_path):
    ref_files, sizes = reference
    out = tmp_path / "out"
    assert killed(convert_cli(src, out, kill_at="shard:2"))
    before = snapshot(out)
    # other options: shard size, target, w13 order
    for extra in (("--max-shard-size", "30KB"), ("--target", "linear"), ("--w13-order", "up-gate")):
        args = dict(zip(ARGS[::2], ARGS[1::2]))
        args.update(dict([extra]))
        r = cli("convert", str(src), str(out), *[x for kv in args.items() for x in kv])
        assert "other options" in one_error_line(r) and "--overwrite" in r.stderr
        assert snapshot(out) == before
    # other input: same tensors, another config.json
    other = tmp_path / "other-src"
    shutil.copytree(src, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (other / "config.json").write_text(json.dumps(cfg))
    r = convert_cli(other, out)
    assert "other input" in one_error_line(r)
    assert snapshot(out) == before
    # --overwrite replaces it: a fresh, complete conversion of the other options
    r = cli("convert", str(src), str(out), "--target", "linear", "--max-shard-size", "30KB", "--overwrite", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_shards"] == []
    man = json.loads((out / MANIFEST_NAME).read_text())
    assert man["target"] == "linear" and sorted(snapshot(out)) == sorted(["nvfp4-fuse-manifest.json", *man["files"]])
    # and a complete folder refuses other options too
    r = convert_cli(src, out)
    assert "other options" in one_error_line(r)


def test_crash_before_the_first_journal_still_resumes(src, reference, tmp_path):
    """A kill while the very first journal is being written leaves only its .partial: not a foreign folder."""
    ref_files, _ = reference
    out = tmp_path / "out"
    out.mkdir()
    (out / (PROGRESS_NAME + ".partial")).write_bytes(b'{"input_fin')
    r = convert_cli(src, out)
    assert r.returncode == 0, r.stderr
    assert snapshot(out) == ref_files


def test_corrupted_kept_shard_is_rewritten(src, reference, tmp_path):
    ref_files, _ = reference
    out = tmp_path / "out"
    assert killed(convert_cli(src, out, kill_at="shard:2"))
    a, b = journaled(out)
    data = bytearray((out / b).read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes: the journal's sha256 no longer matches
    (out / b).write_bytes(bytes(data))
    r = convert_cli(src, out)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["resumed_shards"] == [a]
    assert snapshot(out) == ref_files


# ---------------------------------------------------------------------------------------------------
# free-disk preflight (in process)


def test_disk_preflight_refuses_with_both_numbers(src, tmp_path, monkeypatch):
    opts = ConvertOptions(target=TARGET, max_shard_size=20_000, workers=1)
    need = make_plan(src, opts).output_bytes_estimate()
    free = need // 3
    monkeypatch.setattr("nvfp4_fuse.convert.disk_free", lambda p: free)
    out = tmp_path / "out"
    with pytest.raises(InputError) as ei:
        convert(src, out, opts)
    msg = str(ei.value)
    assert "not enough free disk" in msg and human(need) in msg and human(free) in msg, msg
    assert not out.exists()  # refused before writing anything


def test_disk_preflight_counts_kept_shards(src, reference, tmp_path, monkeypatch):
    _, sizes = reference
    out = tmp_path / "out"
    assert killed(convert_cli(src, out, kill_at="shard:3"))
    opts = ConvertOptions(target=TARGET, max_shard_size=20_000, workers=1)
    full = make_plan(src, opts).output_bytes_estimate()
    kept = sum((out / n).stat().st_size for n in journaled(out))
    monkeypatch.setattr("nvfp4_fuse.convert.disk_free", lambda p: full - kept + 1)  # enough for the rest only
    res = convert(src, out, opts)
    assert len(res.resumed_shards) == 3 and (out / MANIFEST_NAME).exists()


def test_overwrite_is_refused_before_anything_is_deleted(src, reference, tmp_path, monkeypatch):
    """--overwrite on a disk too small for the new output must leave the old output alone."""
    out = tmp_path / "out"
    r = convert_cli(src, out)
    assert r.returncode == 0, r.stderr
    before = snapshot(out)
    held = sum(len(b) for b in before.values())
    monkeypatch.setattr("nvfp4_fuse.convert.disk_free", lambda p: 1000)
    opts = ConvertOptions(target="linear", max_shard_size=30_000, workers=1, overwrite=True)
    with pytest.raises(InputError, match="not enough free disk"):
        convert(src, out, opts)
    assert snapshot(out) == before
    # what --overwrite frees counts as free: the same size of output fits in place of the old one
    monkeypatch.setattr("nvfp4_fuse.convert.disk_free", lambda p: make_plan(src, opts).output_bytes_estimate() - held + 1)
    convert(src, out, opts)
    assert json.loads((out / MANIFEST_NAME).read_text())["target"] == "linear"


def test_overwrite_never_empties_a_foreign_folder(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    for extra in ((), ("--overwrite",)):
        r = convert_cli(src, out, *extra)
        assert "holds no nvfp4-fuse conversion" in one_error_line(r)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "sub"]


def test_finished_output_missing_a_shard_is_repaired(src, reference, tmp_path):
    """A complete folder that lost a shard is no longer complete: the rerun redoes only that shard."""
    ref_files, _ = reference
    out = tmp_path / "out"
    assert convert_cli(src, out).returncode == 0
    shards = sorted(n for n in ref_files if n.startswith("model-0"))
    gone = shards[len(shards) // 2]
    (out / gone).unlink()
    r = convert_cli(src, out)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["already_complete"] is False and res["resumed_shards"] == [s for s in shards if s != gone]
    assert snapshot(out) == ref_files
