"""convert --push-to against the loopback fake Hub (tests/fake_hub.py): each shard uploaded once
written and freed, one final commit, the work folder left with the manifest and the push journal;
real SIGKILLs in the upload and commit phases (tests/crash_runner.py), each followed by a rerun that
ends byte-identical to an uninterrupted run and uploads nothing twice; transient faults retried,
permanent ones stopping at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fake_hub import FakeHub
from helpers import decode_device, fake_hub_env, files_bytes, run_cli, run_inprocess, sample_disk_as_it_grows
from test_hub import fake_hub, loopback_only  # noqa: F401  (the loopback Hub fixtures)

from nvfp4_fuse.convert import ConvertOptions, make_plan
from nvfp4_fuse.hub import retry as hub_retry
from nvfp4_fuse.hub.stream_upload import PUSH_JOURNAL
from nvfp4_fuse.manifest import MANIFEST_NAME
from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint

REPO = "me/fused"
# One shard at a time and one upload worker, so that the kill points fall in known shards.
ARGS = ("--target", "vllm-fused", "--max-shard-size", "20KB", "--workers", "2", "--shard-streams", "1")
INITIAL = {".gitattributes"}  # what a repo created by create_repo holds


def push_cli(hub: FakeHub, src: Path, work: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return push_cli_from(hub, str(src), work, *extra, kill_at=kill_at)


def puts(hub: FakeHub) -> int:
    """LFS objects the Hub stored (PUTs answered 200)."""
    return hub.calls("lfs-upload").count(200)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("push") / "src"
    make_sample_checkpoint(folder, SampleSpec(layers=3, experts=4, hidden=64, inter=32, shards=2, unequal_scale_2=True, seed=4321))
    return folder


@pytest.fixture(scope="module")
def reference(src: Path) -> dict[str, bytes]:
    """The repo an uninterrupted run leaves, file by file."""
    with FakeHub() as hub:
        r = push_cli(hub, src, src.parent / "ref-work")
        assert r.returncode == 0, r.stderr
        files = hub.files(REPO)
        n = len(make_plan(src, ConvertOptions(target="vllm-fused", max_shard_size=20_000)).shards)
        assert n >= 5 and puts(hub) == n  # several shards, each stored once
        return files


@pytest.fixture
def sleeps(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(hub_retry, "_sleep", slept.append)
    return slept


def shard_names(files: dict[str, bytes]) -> list[str]:
    return sorted(n for n in files if n.endswith(".safetensors"))


def test_push_to_commits_once_and_frees_the_work_folder(src, reference, tmp_path, capsys, sleeps):
    with FakeHub() as hub:
        work = tmp_path / "work"
        r = push_cli(hub, src, work)
        assert r.returncode == 0, r.stderr
        body = json.loads(r.stdout)
        assert hub.files(REPO) == reference  # the card names the repo, not a local path
        shards = shard_names(reference)
        assert puts(hub) == len(shards) and hub.calls("commit") == [200]
        assert sorted(body["push"]["uploaded"]) == shards and body["push"]["reused"] == []
        assert sorted(p.name for p in work.iterdir()) == sorted([MANIFEST_NAME, PUSH_JOURNAL])
        manifest = json.loads((work / MANIFEST_NAME).read_text())
        assert reference[MANIFEST_NAME] == (work / MANIFEST_NAME).read_bytes()
        assert set(manifest["files"]) | {MANIFEST_NAME} | INITIAL == set(reference)
        # the Hub's manifest lists the card it holds
        card = reference["README.md"]
        import hashlib

        assert manifest["files"]["README.md"]["sha256"] == hashlib.sha256(card).hexdigest()
        assert f"# {REPO.split('/')[1]}" in card.decode()
        # every shard was checked against its source before its upload, and the card says so
        journal = json.loads((work / PUSH_JOURNAL).read_text())
        assert sorted(journal["checked"]) == shards
        assert "## Verification" in card.decode() and f"- shards_checked: {len(shards)}" in card.decode()
        assert "packed values: byte-identical" in card.decode()

        # a second run is a no-op that says so: no upload, no commit, nothing converted
        n_log = len(hub.log)
        r = push_cli(hub, src, work)
        assert r.returncode == 0, r.stderr
        again = json.loads(r.stdout)
        assert again["already_complete"] and again["push"]["already_on_hub"] and again["push"]["commit"] is None
        names = [n for _, n, _, _ in hub.log[n_log:] if n != "?"]  # "?": the library asks for its agent list
        assert set(names) <= {"paths-info"}, names
        assert sorted(p.name for p in work.iterdir()) == sorted([MANIFEST_NAME, PUSH_JOURNAL])


def test_push_branch_commits_the_model_there_and_leaves_main_alone(src, reference, tmp_path):
    with FakeHub() as hub:
        work = tmp_path / "work"
        r = push_cli(hub, src, work, "--push-branch", "nvfp4-fused")
        assert r.returncode == 0, r.stderr
        body = json.loads(r.stdout)
        assert body["push"]["revision"] == "nvfp4-fused"
        assert hub.files(REPO, "nvfp4-fused") == reference  # the same files, byte for byte, on the branch
        assert set(hub.files(REPO)) == INITIAL  # main holds what create_repo put there, nothing more
        assert hub.calls("commit") == [200]  # one commit, on the branch
        # the journal belongs to that branch: a rerun there is a no-op, a run to main uploads again
        r = push_cli(hub, src, work, "--push-branch", "nvfp4-fused")
        assert r.returncode == 0 and json.loads(r.stdout)["already_complete"], r.stderr
        assert hub.calls("commit") == [200]
        r = push_cli(hub, src, work)
        assert r.returncode == 0 and not json.loads(r.stdout)["already_complete"], r.stderr
        assert hub.files(REPO) == reference and hub.calls("commit") == [200, 200]
    r = run_cli("convert", str(src), str(tmp_path / "w2"), "--push-branch", "x")
    assert r.returncode == 2 and "--push-branch applies with --push-to" in r.stderr


# ------------------------------------------------------------------------------------------------
# faults, in process against the fixture's fake Hub
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def lib_sleeps(monkeypatch):
    """huggingface_hub's own backoff (http_backoff) sleeps recorded, not slept."""
    import types

    from huggingface_hub.utils import _http

    slept: list[float] = []
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=slept.append))
    return slept


def convert_local(src: Path, out: Path) -> dict[str, bytes]:
    from nvfp4_fuse.convert import convert

    convert(src, out, ConvertOptions(target="vllm-fused", max_shard_size=20_000, workers=2, shard_streams=1))
    return {p.name: p.read_bytes() for p in out.glob("model-*.safetensors")}


def push_inprocess(capsys, src: Path, work: Path, *extra: str) -> tuple[int, str, str]:
    return run_inprocess(capsys, "convert", str(src), str(work), *ARGS, "--push-to", REPO, *extra)


def test_transient_faults_are_retried(src, tmp_path, fake_hub, capsys, sleeps, lib_sleeps, monkeypatch):  # noqa: F811
    shards = convert_local(src, tmp_path / "local")
    monkeypatch.setenv("NVFP4_FUSE_HUB_STALL_S", "1")
    fake_hub.stall_s = 3.0
    fake_hub.fail_next("create", 503)
    fake_hub.fail_next("preupload", 429)
    fake_hub.fail_next("lfs-batch", 500, "reset")
    fake_hub.fail_next("lfs-upload", 503, "reset", "stall")
    fake_hub.fail_next("commit", 502)
    code, _, err = push_inprocess(capsys, src, tmp_path / "work")
    assert code == 0, err
    remote = fake_hub.files(REPO)
    assert {n: remote[n] for n in shards} == shards
    for name, queue in fake_hub.faults.items():
        assert queue == [], name  # every fault was met
    assert {503, "reset", "stall"} <= set(fake_hub.calls("lfs-upload"))
    assert puts(fake_hub) == len(shards) and fake_hub.calls("commit") == [502, 200]


@pytest.mark.parametrize(
    "endpoint, status, words",
    [("lfs-upload", 403, "403"), ("preupload", 401, "credentials"), ("lfs-batch", 404, "not found"), ("commit", 403, "no write access")],
)
def test_permanent_faults_stop_at_once_and_leave_a_resumable_state(src, tmp_path, fake_hub, capsys, sleeps, lib_sleeps, endpoint, status, words):  # noqa: F811
    shards = convert_local(src, tmp_path / "local")
    work = tmp_path / "work"
    fake_hub.fail_next(endpoint, status)
    code, _, err = push_inprocess(capsys, src, work)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], err
    assert sleeps == [] and fake_hub.calls(endpoint).count(status) == 1  # not retried
    assert set(fake_hub.files(REPO)) <= INITIAL  # nothing visible
    # A process that stops leaves its uploads in flight to die with it; in this one they run on: let
    # them end, as they would have ended with the process, before the rerun asks the Hub what it holds.
    import threading

    for t in threading.enumerate():
        if t.name.startswith("nvfp4-upload"):
            t.join(timeout=60)
    stored = puts(fake_hub)
    code, _, err = push_inprocess(capsys, src, work)
    assert code == 0, err
    remote = fake_hub.files(REPO)
    assert {n: remote[n] for n in shards} == shards
    assert puts(fake_hub) == len(shards), stored  # what the first run stored was not sent again
    assert sorted(p.name for p in work.iterdir()) == sorted([MANIFEST_NAME, PUSH_JOURNAL])


def test_a_hub_that_keeps_failing_is_exit_4(src, tmp_path, fake_hub, capsys, sleeps, lib_sleeps):  # noqa: F811
    fake_hub.fail_next("lfs-batch", *([503] * 400))
    code, _, err = push_inprocess(capsys, src, tmp_path / "work")
    assert code == 4 and "failed after 6 attempts" in err, (err, fake_hub.calls("lfs-batch"), sleeps)
    assert len(sleeps) >= 5 and set(fake_hub.files(REPO)) <= INITIAL  # each upload worker retried 5 times at most


def test_hub_source_pushed_to_another_repo(src, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    fake_hub.create("org/src", {p.name: p.read_bytes() for p in src.iterdir()})
    shards = convert_local(src, tmp_path / "local")
    work = tmp_path / "work"
    code, _, err = run_inprocess(capsys, "convert", "org/src", str(work), *ARGS, "--push-to", REPO, "--token", "wrong")
    assert code == 2 and "credentials" in err and REPO not in fake_hub.repos, err  # --token is the one used
    code, _, err = run_inprocess(capsys, "convert", "org/src", str(work), *ARGS, "--push-to", REPO, "--private", "--token", fake_hub.token)
    assert code == 0, err
    remote = fake_hub.files(REPO)
    assert {n: remote[n] for n in shards} == shards
    assert "base_model: org/src" in remote["README.md"].decode() and fake_hub.repos[REPO].private


def test_dry_run_plans_the_uploads_and_the_commit(src, tmp_path, fake_hub, capsys):  # noqa: F811
    code, stdout, err = push_inprocess(capsys, src, tmp_path / "work", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(stdout)
    n = len(plan["shards"])
    assert plan["push"]["uploads"] == n and plan["push"]["commits"] == 1
    assert plan["push"]["files_in_commit"] > n and plan["push"]["disk_budget"] > 0
    assert not (tmp_path / "work").exists() and REPO not in fake_hub.repos


def test_ctrl_c_while_uploads_lag_stops_at_once_and_resumes(src, reference, tmp_path):
    """SIGINT while conversion waits for disk (uploads throttled behind it): exit 130 with one line,
    and the rerun ends with the uninterrupted run's repo, each shard stored once."""
    import time

    shards = shard_names(reference)
    with FakeHub(upload_rate=20_000) as hub:
        work = tmp_path / "work"
        args = ["convert", str(src), str(work), *ARGS, "--push-to", REPO]
        proc = subprocess.Popen(
            [sys.executable, "-m", "nvfp4_fuse.cli", *args], env=fake_hub_env(hub, tmp_path / "hf-home"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        journal = work / PUSH_JOURNAL
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if json.loads(journal.read_text())["uploaded"]:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        else:
            proc.kill()
            pytest.fail("no upload was journaled")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert [ln for ln in err.splitlines() if ln.strip()] == ["interrupted; rerun the same command to resume"]
        assert set(hub.files(REPO)) <= INITIAL
        hub.upload_bucket.rate = None
        r = push_cli(hub, src, work)
        assert r.returncode == 0, r.stderr
        assert hub.files(REPO) == reference and puts(hub) == len(shards)


def test_a_shard_that_fails_its_check_is_never_uploaded(src, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    """A byte flipped between writing and checking: exit 3 naming the shard; that shard is not sent,
    and nothing is visible on the Hub."""
    from nvfp4_fuse.hub import stream_upload as su

    orig = su.HubSink.written
    bad: list[str] = []

    def written(self, name, size, sha256, after=None):
        if not bad:  # the first shard written: flip a byte in its data
            bad.append(name)
            with open(self.out / name, "r+b") as f:
                f.seek(size - 1)
                b = f.read(1)
                f.seek(size - 1)
                f.write(bytes([b[0] ^ 0x01]))
        return orig(self, name, size, sha256, after)

    monkeypatch.setattr(su.HubSink, "written", written)
    code, _, err = push_inprocess(capsys, src, tmp_path / "work")
    assert code == 3 and "byte-identical to the source" in err, err  # the value check, before the hash
    assert set(fake_hub.files(REPO)) <= INITIAL
    uploaded = json.loads((tmp_path / "work" / PUSH_JOURNAL).read_text())["uploaded"]
    assert bad[0] not in uploaded


# ------------------------------------------------------------------------------------------------
# Hub to Hub: a repo id as source, streamed within --max-disk (hub/stream.py), pushed as it converts
# ------------------------------------------------------------------------------------------------


def source_files(src: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in src.iterdir()}


@pytest.fixture(scope="module")
def hub_reference(src: Path) -> dict[str, bytes]:
    """The repo an uninterrupted Hub-to-Hub run leaves (org/src -> me/fused), file by file."""
    with FakeHub() as hub:
        hub.create("org/src", source_files(src))
        r = push_cli_from(hub, "org/src", src.parent / "h2h-ref-work")
        assert r.returncode == 0, r.stderr
        return hub.files(REPO)


def push_cli_from(hub: FakeHub, source: str, work: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    args = ["convert", source, str(work), *ARGS, "--push-to", REPO, "--json", *extra]
    return run_cli(*args, kill_at=kill_at, env=fake_hub_env(hub, work.parent / "hf-home"), timeout=180)


def test_hub_to_hub_matches_the_folder_run_but_for_the_source_it_names(src, reference, hub_reference):
    shards = shard_names(reference)
    assert {n: hub_reference[n] for n in shards} == {n: reference[n] for n in shards}
    assert "base_model: org/src" in hub_reference["README.md"].decode()


# Kill points, by source: a local folder, or a repo id streamed from the Hub (tests/crash_runner.py
# names them: the n-th shard written, upload, upload done, journal entry; the commit; 30000 bytes into a
# download).
KILLS = {
    ("folder", "after-first-shard-written"): "shard:1",
    ("folder", "mid-second-upload"): "upload:2",
    ("folder", "after-third-upload-unjournaled"): "uploaded:3",
    ("folder", "after-second-upload-journaled"): "journaled:2",
    ("folder", "before-commit"): "commit",
    ("folder", "after-commit"): "committed",
    ("hub", "mid-download"): "fetch:30000",
    ("hub", "after-first-shard-written"): "shard:1",
    ("hub", "mid-second-upload"): "upload:2",
    ("hub", "after-second-upload-journaled"): "journaled:2",
    ("hub", "before-commit"): "commit",
}


@pytest.mark.parametrize("source, point", list(KILLS))
def test_sigkill_then_resume_is_byte_identical_and_uploads_nothing_twice(src, reference, hub_reference, tmp_path, source, point):
    want = reference if source == "folder" else hub_reference
    shards = shard_names(want)
    with FakeHub() as hub:
        work = tmp_path / "work"
        if source == "hub":
            hub.create("org/src", source_files(src))

        def run(**kw: Any) -> subprocess.CompletedProcess:
            return push_cli(hub, src, work, **kw) if source == "folder" else push_cli_from(hub, "org/src", work, **kw)

        r = run(kill_at=KILLS[source, point])
        assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
        if point != "after-commit" and REPO in hub.repos:  # nothing of the model visible before the final commit
            assert set(hub.files(REPO)) <= INITIAL, sorted(hub.files(REPO))
        stored = puts(hub)
        journal = work / PUSH_JOURNAL
        journaled = set(json.loads(journal.read_text())["uploaded"]) if journal.is_file() else set()

        r = run()
        assert r.returncode == 0, r.stderr
        body = json.loads(r.stdout)
        assert hub.files(REPO) == want
        assert puts(hub) == len(shards), (stored, hub.calls("lfs-upload"))  # each shard stored once over both runs
        assert sorted(p.name for p in work.iterdir()) == sorted([MANIFEST_NAME, PUSH_JOURNAL])
        if point != "after-commit":  # (after it, the rerun finds the Hub complete and converts nothing)
            assert journaled <= set(body["resumed_shards"])  # uploaded shards are not converted again
        if point == "after-second-upload-journaled":
            assert len(journaled) == 2
        if point == "before-commit":
            assert body["resumed_shards"] == shards and sorted(body["push"]["reused"]) == shards
        if point == "after-commit":
            assert body["already_complete"] and hub.calls("commit") == [200]


def test_hub_to_hub_working_set_measured_on_disk_stays_within_max_disk(tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    """Uploads throttled behind the conversion, so that written shards wait for them: every byte the
    run holds in the work folder (downloads, shards being written, shards waiting for their upload) is
    measured with stat whenever it grows, and never exceeds --max-disk, the smallest budget the plan
    allows."""
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    src = tmp_path / "src6"  # six source shards: a shard's sources are a small part of the whole
    make_sample_checkpoint(src, SampleSpec(layers=6, experts=4, hidden=128, inter=64, shards=6, unequal_scale_2=True, seed=99))
    fake_hub.create("org/src", source_files(src))
    work = tmp_path / "work"
    code, stdout, err = push_inprocess_from(capsys, "org/src", work, "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(stdout)
    minimum = plan["disk"]["min_max_disk"]
    assert plan["push"]["disk_budget"] == plan["disk"]["max_disk"]

    journals = (PUSH_JOURNAL, MANIFEST_NAME, ".nvfp4-fuse-progress.json")  # bookkeeping, a few KB, outside the budget
    samples = sample_disk_as_it_grows(monkeypatch, lambda: files_bytes(work, lambda p: p.name.removesuffix(".partial") not in journals))
    fake_hub.set_rates(download_rate=4e6, upload_rate=100_000)
    code, _, err = push_inprocess_from(capsys, "org/src", work, "--max-disk", str(minimum))
    assert code == 0, err
    assert len(samples) > 20 and 0 < max(samples) <= minimum, (max(samples), minimum)
    total = sum(len(d) for d in source_files(src).values())
    assert minimum < total / 2  # far less than the source, let alone source and output


def push_inprocess_from(capsys, source: str, work: Path, *extra: str) -> tuple[int, str, str]:
    return run_inprocess(capsys, "convert", source, str(work), *ARGS, "--push-to", REPO, *extra)


def test_a_full_disk_stops_at_once_with_one_line_and_resumes(src, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    """ENOSPC while an upload worker journals its shard: exit 2, one line naming the work folder,
    nothing visible; the rerun finishes with each shard stored once."""
    import errno

    from nvfp4_fuse import shard_writer

    shards = convert_local(src, tmp_path / "local")
    orig = shard_writer.write_file_atomic
    calls = {"n": 0}

    def full(path, data):
        if Path(path).name == PUSH_JOURNAL:
            calls["n"] += 1
            if calls["n"] > 1:  # the first is written before any upload
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return orig(path, data)

    monkeypatch.setattr(shard_writer, "write_file_atomic", full)
    work = tmp_path / "work"
    code, _, err = push_inprocess(capsys, src, work)
    assert code == 2 and err.strip() == f"error: no space left on the device: {work}", err
    assert set(fake_hub.files(REPO)) <= INITIAL
    monkeypatch.setattr(shard_writer, "write_file_atomic", orig)
    code, _, err = push_inprocess(capsys, src, work)
    assert code == 0, err
    remote = fake_hub.files(REPO)
    assert {n: remote[n] for n in shards} == shards and puts(fake_hub) == len(shards)


def test_hub_to_hub_permanent_upload_fault_stops_at_once(src, tmp_path):
    """From a Hub source under the smallest --max-disk, a 403 on an upload stops the run with that
    line at once, though the converter is waiting on the source's disk budget for a shard that the
    failed upload will never free."""
    with FakeHub() as hub:
        hub.create("org/src", source_files(src))
        work = tmp_path / "work"
        r = push_cli_from(hub, "org/src", work, "--dry-run")
        assert r.returncode == 0, r.stderr
        minimum = json.loads(r.stdout)["disk"]["min_max_disk"]
        hub.fail_next("lfs-upload", 403)
        r = push_cli_from(hub, "org/src", work, "--max-disk", str(minimum))
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "403" in lines[0], r.stderr
        assert set(hub.files(REPO)) <= INITIAL
        r = push_cli_from(hub, "org/src", work, "--max-disk", str(minimum))
        assert r.returncode == 0, r.stderr


def test_hub_to_hub_checks_with_the_decode_keep_the_source_values_their_scales_need(tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    """With the end-to-end decode in each shard's check (a GPU's, else its CPU reference), a shard of
    block scales decodes from the source values of its parts. In a source whose values lie in files of
    their own, the values' file is read by the values' output shard and, for the decode only, by the
    scales' shard: it must stay on disk until that shard's check, though the values' shard is long
    uploaded (checks are held back here so that every earlier shard is up first)."""
    import huggingface_hub.constants as C
    from test_hub_verify import _values_apart

    from nvfp4_fuse import written_check as wc
    from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    src = tmp_path / "split"
    make_sample_checkpoint(src, SampleSpec(layers=3, experts=4, hidden=128, inter=64, shards=1, unequal_scale_2=True, seed=7))
    _values_apart(src)
    fake_hub.create("org/split", {p.name: p.read_bytes() for p in src.iterdir()})
    monkeypatch.setattr(wc, "gpu_decode", decode_device)  # the GPU's where there is one
    real = wc.shard_check

    def slow_check(spec, files=None, **kw):
        check = real(spec, files, **kw)
        order = [s.name for s in spec.shards]

        def later(out, name, sha256):
            time.sleep(0.15 * order.index(name))  # each shard checked after the ones before it are up
            return check(out, name, sha256)

        return later

    monkeypatch.setattr(wc, "shard_check", slow_check)
    work = tmp_path / "work"
    rc, stdout, err = run_inprocess(capsys, "convert", "org/split", str(work), "--target", "vllm-fused", "--max-shard-size", "16KB",
                                    "--push-to", "me/split", "--json")  # fmt: skip
    assert rc == 0, stdout
    card = fake_hub.files("me/split")["README.md"].decode()
    assert "end to end: every checked expert of both checkpoints dequantized and compared" in card, card
