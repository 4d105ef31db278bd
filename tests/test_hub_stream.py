"""Converting straight from the Hub with bounded disk, against the loopback fake Hub.

`convert <repo id> <out>` plans from headers, fetches the source files the next output shards need
into the output folder's hidden `.nvfp4-fuse-source/`, frees each once the last shard reading it is
safe, and ends with the same output as converting the downloaded folder. Checked here: the output
bytes; the working set measured on disk at every moment it grows, never over --max-disk; a budget
below the minimum refused; transient faults retried and resumed mid-file with a Range request;
permanent ones stopping at once with one line and a resumable state; SIGKILLs while downloading and
while writing, each resumed to a byte-identical result; a source changed between runs refused; the
user's HF cache reused and left untouched; HF_HUB_OFFLINE with a cached snapshot as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from fake_hub import StoredFile
from helpers import fake_hub_env, files_bytes, run_cli, run_inprocess, sample_disk_as_it_grows
from test_hub import fake_hub  # noqa: F401  (the loopback Hub fixture)

from nvfp4_fuse import convert as conv
from nvfp4_fuse.convert import PROGRESS_NAME
from nvfp4_fuse.hub import fetch
from nvfp4_fuse.hub import retry as hub_retry
from nvfp4_fuse.manifest import MANIFEST_NAME
from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint
from nvfp4_fuse.shard_writer import PARTIAL_SUFFIX
from nvfp4_fuse.source_files import STAGING_NAME

ARGS = ("--target", "vllm-fused", "--max-shard-size", "40KB", "--workers", "2", "--json")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: file contents hashed, symlinks by target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def cached_in_hf_home(fake_hub, tmp_path: Path, *names: str) -> tuple[Path, dict[str, str], dict[str, int]]:  # noqa: F811
    """Download ``names`` of org/src into the test's HF cache (``tmp_path/hf-home``); -> the cache
    folder, its :func:`tree_hashes`, and how many whole-file GETs of each name the fake Hub served so
    far (a run that reads them in place adds none)."""
    from huggingface_hub import hf_hub_download

    for name in names:
        hf_hub_download("org/src", name)
    cache = tmp_path / "hf-home" / "hub"
    return cache, tree_hashes(cache), {n: fake_hub.ranged_gets(n).count(None) for n in names}


@pytest.fixture
def hub_src(tmp_path, fake_hub, monkeypatch):  # noqa: F811
    """org/src on the fake Hub: 4 source shards, several output shards at 40KB; the HF cache in tmp."""
    import huggingface_hub.constants as C

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.setattr(hub_retry, "_sleep", lambda s: None)
    folder = tmp_path / "src"
    make_sample_checkpoint(folder, SampleSpec(layers=6, experts=4, hidden=128, inter=64, shards=6, unequal_scale_2=True, seed=4321))
    (folder / "tokenizer.json").write_text('{"v": 1}')
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    fake_hub.create("org/src", files)
    return folder


@pytest.fixture
def local_reference(hub_src, tmp_path):
    """The same conversion from the folder itself (named as the repo, as the model card does)."""
    out = tmp_path / "ref-local"
    conv.convert(hub_src, out, conv.ConvertOptions(target="vllm-fused", max_shard_size=40_000, workers=2), source_label="org/src")
    return snapshot(out)


def shard_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.glob("*.safetensors")}


def same_as_local(out: dict[str, bytes], local: dict[str, bytes], sha: str) -> None:
    """Every file equal; the manifest too, but for the commit it records."""
    assert set(out) == set(local)
    for k in out:
        if k == MANIFEST_NAME:
            a, b = json.loads(out[k]), json.loads(local[k])
            assert a["source"].pop("revision") == sha
            assert a == b
        else:
            assert out[k] == local[k], k


def test_hub_to_disk_equals_the_folder_conversion_and_leaves_no_working_files(hub_src, local_reference, tmp_path, fake_hub, capsys):  # noqa: F811
    out = tmp_path / "out"
    rc, stdout, err = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS)
    assert rc == 0, err
    same_as_local(snapshot(out), local_reference, fake_hub.repos["org/src"].branches["main"])
    assert not (out / STAGING_NAME).exists() and not list(out.glob("*" + PARTIAL_SUFFIX))
    # each source shard was downloaded once, whole; nothing went to the HF cache
    for name in shard_sizes(hub_src):
        assert fake_hub.ranged_gets(name).count(None) == 1, name
    assert not (tmp_path / "hf-home" / "hub").exists()


def test_working_set_measured_on_disk_stays_within_max_disk(hub_src, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    """The run's own bytes (downloads in its folder, output shards being written) are measured with
    stat at every moment they grow: after each downloaded piece and each piece a shard writer
    writes. The peak stays within --max-disk, set to the minimum the plan reports, which is well
    below the source's size: files are freed while the run goes."""
    out = tmp_path / "out"
    r = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS, "--dry-run")
    disk = json.loads(r[1])["disk"]
    minimum, source_bytes = disk["min_max_disk"], disk["source_bytes"]
    assert minimum < source_bytes / 2

    samples = sample_disk_as_it_grows(monkeypatch, lambda: files_bytes(out, lambda p: STAGING_NAME in p.parts or p.name.endswith(PARTIAL_SUFFIX)))
    fake_hub.set_rates(download_rate=4e6)  # pieces of 64 KiB at most arrive apart
    rc, _, err = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS, "--max-disk", str(minimum))
    assert rc == 0, err
    assert len(samples) > 20 and 0 < max(samples) <= minimum, (max(samples), minimum)
    # the plan's own figures: the default budget is twice the minimum, the unbounded run holds it all
    assert disk["working_set_peak"] <= disk["max_disk"] == 2 * minimum
    assert disk["disk_peak_unbounded"] - disk["output_bytes"] >= sum(shard_sizes(hub_src).values()) > minimum


def test_a_budget_below_the_minimum_is_refused_before_anything_is_fetched(hub_src, tmp_path, fake_hub, capsys):  # noqa: F811
    out = tmp_path / "out"
    rc, stdout, _ = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS, "--dry-run")
    minimum = json.loads(stdout)["disk"]["min_max_disk"]
    rc, stdout, err = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS, "--max-disk", str(minimum - 1))
    assert rc == 2
    body = json.loads(stdout)
    assert "--max-disk" in body["error"]["message"] and "needs at least" in body["error"]["message"]
    assert fake_hub.ranged_gets("model-00001-of-00006.safetensors").count(None) == 0
    assert not out.exists()


def test_dry_run_prints_the_peak_with_and_without_the_budget_and_the_requests(hub_src, tmp_path, capsys):
    rc, stdout, err = run_inprocess(capsys, "convert", "org/src", str(tmp_path / "o"), "--target", "vllm-fused", "--max-shard-size", "40KB", "--dry-run")
    assert rc == 0, err
    text = " ".join(stdout.split())
    assert "disk: peak" in text and "without a bound" in text and "downloads" in text and "minimum" in text
    assert not (tmp_path / "o").exists()


def test_transient_faults_are_retried_and_resumed_mid_file(hub_src, local_reference, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(fetch, "DEFAULT_TIMEOUT_S", 0.5)
    first, second = "model-00001-of-00006.safetensors", "model-00002-of-00006.safetensors"

    def arm() -> None:
        fake_hub.fault_download(first, reset_after=20_000)
        fake_hub.fault_download(second, stall_after=30_000, stall_s=5.0)
        fake_hub.fail_next("download", 503, 429)

    once_planned(monkeypatch, arm)
    out = tmp_path / "out"
    rc, _, err = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS, "--shard-streams", "1")
    assert rc == 0, err
    same_as_local(snapshot(out), local_reference, fake_hub.repos["org/src"].branches["main"])
    assert [p for p, _ in fake_hub.fired_faults] == [first, second]
    assert "bytes=20000-" in fake_hub.ranged_gets(first)  # resumed where the reset left it
    assert "bytes=30000-" in fake_hub.ranged_gets(second)  # and where the stall did
    assert fake_hub.calls("resolve").count(503) == 1 and fake_hub.calls("resolve").count(429) == 1


def once_planned(monkeypatch, arm) -> None:
    """Call ``arm()`` when the downloads start, after planning (whose header reads are GETs too)."""
    from nvfp4_fuse.source_files import HubSourceFiles

    orig = HubSourceFiles.start

    def start(self, *a, **kw):
        arm()
        monkeypatch.setattr(HubSourceFiles, "start", orig)
        return orig(self, *a, **kw)

    monkeypatch.setattr(HubSourceFiles, "start", start)


def fail_first_download(monkeypatch, fake_hub, status: int) -> None:  # noqa: F811
    """Answer the first file download with ``status``."""
    once_planned(monkeypatch, lambda: fake_hub.fail_next("download", status))


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_permanent_fault_stops_at_once_with_one_line_and_resumes(hub_src, local_reference, tmp_path, fake_hub, capsys, monkeypatch, status):  # noqa: F811
    out = tmp_path / "out"
    fail_first_download(monkeypatch, fake_hub, status)
    n_before = len(fake_hub.log)
    rc, stdout, err = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS)
    assert rc == 2, err
    msg = json.loads(stdout)["error"]["message"]
    assert f"({status})" in msg and "downloading" in msg and "\n" not in msg
    answered = [s for _, n, _, s in fake_hub.log[n_before:] if n == "resolve"]
    assert answered.count(status) == 1  # not retried
    assert (out / PROGRESS_NAME).is_file() and not (out / MANIFEST_NAME).exists()
    rc, _, err = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS)
    assert rc == 0, err
    same_as_local(snapshot(out), local_reference, fake_hub.repos["org/src"].branches["main"])


def test_a_download_failing_every_time_gives_up_after_six_retries_in_a_row(hub_src, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    once_planned(monkeypatch, lambda: fake_hub.fail_next("download", *([503] * 7)))
    out = tmp_path / "out"
    rc, stdout, _ = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS)
    assert rc == 4
    msg = json.loads(stdout)["error"]["message"]
    assert "failed 7 times in a row" in msg and "rerun the same command to resume" in msg
    assert fake_hub.calls("resolve").count(503) == 7


def test_a_full_disk_while_downloading_stops_with_one_line(hub_src, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    import errno

    def full(self, *a, nbytes: int = 0, **kw):
        if nbytes:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch.FetchStats, "add", full)
    out = tmp_path / "out"
    rc, stdout, err = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS)
    assert rc == 2
    assert json.loads(stdout)["error"]["message"].startswith("no space left on the device")
    assert (out / PROGRESS_NAME).is_file()


def test_a_source_changed_between_runs_is_refused_not_mixed(hub_src, local_reference, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    out = tmp_path / "out"
    old = fake_hub.repos["org/src"].branches["main"]
    fail_first_download(monkeypatch, fake_hub, 403)
    # a first run that stops part way (after planning, before finishing)
    rc, _, _ = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS)
    assert rc == 2 and json.loads((out / PROGRESS_NAME).read_text())["source_revision"] == old
    # the repo moves on: one shard's bytes change
    with fake_hub.lock:
        repo = fake_hub.repos["org/src"]
        files = dict(repo.resolve("main").files)
        name = "model-00004-of-00006.safetensors"
        data = bytearray(files[name].data)
        data[-1] ^= 1
        files[name] = StoredFile(bytes(data), True)
        new = fake_hub._commit(repo, "main", "update a shard", files).oid
    rc, stdout, _ = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS)
    assert rc == 2
    msg = json.loads(stdout)["error"]["message"]
    assert old[:12] in msg and new[:12] in msg and f"--revision {old}" in msg and "--overwrite" in msg
    # finishing from the commit it was started from gives the uninterrupted result
    rc, _, err = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS, "--revision", old)
    assert rc == 0, err
    same_as_local(snapshot(out), local_reference, old)


def test_the_users_hf_cache_is_reused_read_only(hub_src, local_reference, tmp_path, fake_hub, capsys):  # noqa: F811
    cached = "model-00002-of-00006.safetensors"
    cache, before, gets = cached_in_hf_home(fake_hub, tmp_path, cached, "tokenizer.json")
    out = tmp_path / "out"
    rc, _, err = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS)
    assert rc == 0, err
    same_as_local(snapshot(out), local_reference, fake_hub.repos["org/src"].branches["main"])
    assert fake_hub.ranged_gets(cached).count(None) == gets[cached]  # read from the cache, not fetched again
    assert tree_hashes(cache) == before


def test_offline_with_a_cached_snapshot_converts_as_before(hub_src, local_reference, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants as C
    from huggingface_hub import snapshot_download

    snapshot_download("org/src")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    rc, _, err = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS)
    assert rc == 0, err
    got = snapshot(out)
    assert {k: v for k, v in got.items() if k != MANIFEST_NAME} == {k: v for k, v in local_reference.items() if k != MANIFEST_NAME}


# ------------------------------------------------------------------------------------------------
# SIGKILL while downloading and while writing, then the same command


def _env(fake_hub, tmp_path) -> dict[str, str]:  # noqa: F811
    return fake_hub_env(fake_hub, tmp_path / "hf-home")


def _cli(env, out: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    args = ["convert", "org/src", str(out), *ARGS, "--shard-streams", "1", *extra]
    return run_cli(*args, kill_at=kill_at, env=env, timeout=120)


@pytest.mark.parametrize("point", ["fetch:50000", "fetch:150000", "shard:2", "bytes:60000", "manifest"])
def test_sigkill_while_downloading_or_writing_then_resume_is_byte_identical(hub_src, tmp_path, fake_hub, point):  # noqa: F811
    env = _env(fake_hub, tmp_path)
    fake_hub.set_rates(download_rate=4e6)  # file bodies arrive in pieces of 64 KiB, so a kill falls mid-file
    ref = tmp_path / "ref"
    r = _cli(env, ref)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = _cli(env, out, kill_at=point)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert not (out / MANIFEST_NAME).exists()
    if point.startswith("fetch"):
        left = list((out / STAGING_NAME).rglob("*" + fetch.INCOMPLETE_SUFFIX))
        resumed_at = {p.name[: -len(fetch.INCOMPLETE_SUFFIX)]: p.stat().st_size for p in left}
        sizes = shard_sizes(hub_src)
        assert any(0 < n < sizes[name] for name, n in resumed_at.items()), resumed_at  # killed mid-file
    kept = set(json.loads((out / PROGRESS_NAME).read_text())["files"]) if (out / PROGRESS_NAME).is_file() else set()
    n_log = len(fake_hub.range_log)
    r = _cli(env, out)
    assert r.returncode == 0, r.stderr
    assert snapshot(out) == snapshot(ref)
    # what the resumed run fetched whole is read by a shard it still had to write
    from nvfp4_fuse.disk_budget import shard_source_files

    plan = conv.make_plan(hub_src, conv.ConvertOptions(target="vllm-fused", max_shard_size=40_000))
    needed = {f for sh in plan.shards if sh.name not in kept for f in shard_source_files(plan, sh)}
    fetched = {p for p, rng in fake_hub.range_log[n_log:] if rng is None and p.endswith(".safetensors")}
    assert fetched <= needed
    if point.startswith("fetch"):
        later = fake_hub.range_log[n_log:]
        for name, size in resumed_at.items():
            if 0 < size < sizes[name]:
                assert (name, f"bytes={size}-") in later, (name, size, later)


def test_max_disk_is_refused_for_a_local_source(tmp_path, capsys):
    rc, stdout, _ = run_inprocess(capsys, "convert", str(tmp_path), str(tmp_path / "o"), "--max-disk", "1GB", "--json")
    assert rc == 2 and "--max-disk applies to a Hub repo id" in json.loads(stdout)["error"]["message"]


def test_an_unreachable_hub_falls_back_to_a_cached_snapshot(hub_src, local_reference, tmp_path, capsys, monkeypatch):
    """As snapshot_download does: no network, but the snapshot is in the cache (HF_HUB_OFFLINE unset)."""
    import socket

    import huggingface_hub.constants as C
    from huggingface_hub import snapshot_download

    snapshot_download("org/src")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(C, "ENDPOINT", closed)
    monkeypatch.setattr(C, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}")
    out = tmp_path / "out"
    rc, _, err = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS)
    assert rc == 0, err
    got = snapshot(out)
    assert {k: v for k, v in got.items() if k != MANIFEST_NAME} == {k: v for k, v in local_reference.items() if k != MANIFEST_NAME}


def test_the_default_budget_shrinks_to_the_free_disk_down_to_the_minimum(hub_src, tmp_path, capsys, monkeypatch):
    from nvfp4_fuse.hub import stream

    out = tmp_path / "out"
    minimum = json.loads(run_inprocess(capsys, "convert", "org/src", str(out), *ARGS, "--dry-run")[1])["disk"]["min_max_disk"]
    output = conv.make_plan(hub_src, conv.ConvertOptions(target="vllm-fused", max_shard_size=40_000)).output_bytes_estimate()
    monkeypatch.setattr(stream, "disk_free", lambda p: output + minimum + 1000)
    disk = json.loads(run_inprocess(capsys, "convert", "org/src", str(out), *ARGS, "--dry-run")[1])["disk"]
    assert disk["max_disk"] == minimum + 1000 < 2 * minimum
