"""`verify <repo id> <converted>` with bounded disk, against the loopback fake Hub.

The source is pinned to the commit the manifest records, planned from the Hub's headers, and its
files fetched one at a time in the order the output shards' checks need them, into a temporary
folder the run makes and removes, each deleted once no shard left to check reads it. Checked here:
the result equals verifying against the downloaded folder; a corrupted output shard fails naming
file and tensor; the working set measured at every moment it grows stays within --max-disk; the
user's HF cache is read in place and left untouched; nothing stays in the work folder after a
success, a failure or Ctrl-C; a repo that moved since the convert is refused naming both commits;
a 404 is one line, exit 2; offline, a cached snapshot is read as a folder.
"""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path

import pytest
from fake_hub import StoredFile
from helpers import decode_device, files_bytes, run_inprocess, sample_disk_as_it_grows
from test_hub import fake_hub  # noqa: F401  (the loopback Hub fixture)
from test_hub_stream import ARGS, cached_in_hf_home, fail_first_download, hub_src, once_planned, tree_hashes  # noqa: F401  (fixture)

from nvfp4_fuse.hub.verify_stream import WORK_PREFIX
from nvfp4_fuse.safetensors_header import read_header

VERIFY = ("--device", "cpu", "--workers", "2", "--json")


@pytest.fixture
def converted(hub_src, tmp_path, capsys):  # noqa: F811
    """org/src converted from the Hub (the manifest records the commit)."""
    out = tmp_path / "conv" / "out"
    rc, _, err = run_inprocess(capsys, "convert", "org/src", str(out), *ARGS)
    assert rc == 0, err
    return out


def verify_hub(capsys, out: Path, work: Path, *extra: str) -> tuple[int, dict]:
    work.mkdir(exist_ok=True)
    rc, stdout, err = run_inprocess(capsys, "verify", "org/src", str(out), *VERIFY, "--work-dir", str(work), *extra)
    return rc, json.loads(stdout)


def comparable(body: dict) -> dict:
    """A verify result without what differs run to run (timings) or by the source's name."""
    return {k: v for k, v in body.items() if k not in ("seconds", "peak_read_ahead", "source")}


def test_verify_from_a_repo_id_equals_verifying_the_folder_and_leaves_nothing(hub_src, converted, tmp_path, fake_hub, capsys):  # noqa: F811
    rc, stdout, err = run_inprocess(capsys, "verify", str(hub_src), str(converted), *VERIFY)
    assert rc == 0, err
    local = json.loads(stdout)
    n_gets = {p.name: fake_hub.ranged_gets(p.name).count(None) for p in hub_src.glob("*.safetensors")}
    before = {p.name: p.read_bytes() for p in converted.iterdir()}
    rc, body = verify_hub(capsys, converted, tmp_path / "work")
    assert rc == 0, body
    assert body["source"] == "org/src" and comparable(body) == comparable(local)
    assert body["files_hashed"] == len(before) - 1 and all(m["checked"] == m["experts"] == 4 for m in body["modules"])
    # every source shard fetched once, whole; nothing left in the work folder; the output as it was
    for name, n in n_gets.items():
        assert fake_hub.ranged_gets(name).count(None) == n + 1, name
    assert list((tmp_path / "work").iterdir()) == []
    assert {p.name: p.read_bytes() for p in converted.iterdir()} == before
    assert not (tmp_path / "hf-home" / "hub").exists()  # nothing went to the HF cache


def test_the_default_work_folder_is_beside_the_converted_one_and_removed(converted, capsys, monkeypatch):
    from nvfp4_fuse.source_files import HubSourceFiles

    seen = []
    orig = HubSourceFiles.start

    def start(self, *a, **kw):
        seen.append(self.staging)
        return orig(self, *a, **kw)

    monkeypatch.setattr(HubSourceFiles, "start", start)
    rc, stdout, err = run_inprocess(capsys, "verify", "org/src", str(converted), "--device", "cpu")
    assert rc == 0, err
    assert len(seen) == 1 and seen[0].parent == converted.parent and seen[0].name.startswith("." + WORK_PREFIX)
    assert str(seen[0]) in " ".join(err.split())  # the run says where its files go
    assert not seen[0].exists() and sorted(p.name for p in converted.parent.iterdir()) == ["out"]


def flip_random_byte(out: Path, rng: random.Random) -> tuple[str, str]:
    """Flip one byte of a random tensor's data in a random output shard: (shard, tensor)."""
    shard = rng.choice(sorted(out.glob("*.safetensors")))
    h = read_header(shard)
    name = rng.choice(sorted(n for n, t in h.tensors.items() if t.nbytes))
    t = h.tensors[name]
    pos = h.data_start + t.begin + rng.randrange(t.nbytes)
    with open(shard, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ (1 << rng.randrange(8))]))
    return shard.name, name


def test_a_corrupted_output_shard_fails_naming_file_and_tensor_and_leaves_nothing(converted, tmp_path, capsys):
    rng = random.Random()
    shard, tensor = flip_random_byte(converted, rng)
    rc, body = verify_hub(capsys, converted, tmp_path / "work")
    assert rc == 3, body
    msg = body["error"]["message"]
    assert "\n" not in msg and (tensor.rsplit(".", 1)[0] in msg or shard in msg), (shard, tensor, msg)
    assert list((tmp_path / "work").iterdir()) == []


def test_working_set_measured_on_disk_stays_within_max_disk(hub_src, converted, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    rc, stdout, err = run_inprocess(capsys, "verify", "org/src", str(converted), *VERIFY, "--work-dir", str(work), "--dry-run")
    assert rc == 0, err
    disk = json.loads(stdout)["disk"]
    minimum, source_bytes = disk["min_max_disk"], disk["source_bytes"]
    assert minimum < source_bytes / 2 and disk["working_set_unbounded"] > minimum
    samples = sample_disk_as_it_grows(monkeypatch, lambda: files_bytes(work, lambda p: True))
    fake_hub.set_rates(download_rate=4e6)  # pieces of 64 KiB at most arrive apart
    rc, body = verify_hub(capsys, converted, work, "--max-disk", str(minimum))
    assert rc == 0, body
    assert len(samples) > 20 and 0 < max(samples) <= minimum, (max(samples), minimum)
    assert list(work.iterdir()) == []


def test_a_budget_below_the_minimum_is_refused_before_anything_is_fetched(hub_src, converted, tmp_path, fake_hub, capsys):  # noqa: F811
    work = tmp_path / "work"
    work.mkdir()
    rc, stdout, _ = run_inprocess(capsys, "verify", "org/src", str(converted), *VERIFY, "--work-dir", str(work), "--dry-run")
    minimum = json.loads(stdout)["disk"]["min_max_disk"]
    n = fake_hub.ranged_gets("model-00001-of-00006.safetensors").count(None)
    rc, body = verify_hub(capsys, converted, work, "--max-disk", str(minimum - 1))
    assert rc == 2
    assert "--max-disk" in body["error"]["message"] and "needs at least" in body["error"]["message"]
    assert fake_hub.ranged_gets("model-00001-of-00006.safetensors").count(None) == n
    assert list(work.iterdir()) == []


def test_the_users_hf_cache_is_read_in_place_and_left_untouched(converted, tmp_path, fake_hub, capsys):  # noqa: F811
    cached = "model-00003-of-00006.safetensors"
    cache, before, gets = cached_in_hf_home(fake_hub, tmp_path, cached, "tokenizer.json")
    rc, body = verify_hub(capsys, converted, tmp_path / "work")
    assert rc == 0, body
    assert fake_hub.ranged_gets(cached).count(None) == gets[cached]  # read from the cache, not fetched
    assert fake_hub.ranged_gets("tokenizer.json").count(None) == gets["tokenizer.json"]
    assert tree_hashes(cache) == before


def test_a_repo_that_moved_since_the_convert_is_refused_naming_both_commits(converted, tmp_path, fake_hub, capsys):  # noqa: F811
    old = fake_hub.repos["org/src"].branches["main"]
    with fake_hub.lock:
        repo = fake_hub.repos["org/src"]
        files = dict(repo.resolve("main").files)
        files["tokenizer.json"] = StoredFile(b'{"v": 2}', False)
        new = fake_hub._commit(repo, "main", "update the tokenizer", files).oid
    rc, body = verify_hub(capsys, converted, tmp_path / "work")
    assert rc == 2
    msg = body["error"]["message"]
    assert old[:12] in msg and new[:12] in msg and f"--revision {old}" in msg, msg
    rc, body = verify_hub(capsys, converted, tmp_path / "work", "--revision", old)
    assert rc == 0, body
    assert list((tmp_path / "work").iterdir()) == []


def test_a_404_while_fetching_is_one_line_exit_2_and_leaves_nothing(converted, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    fail_first_download(monkeypatch, fake_hub, 404)
    rc, body = verify_hub(capsys, converted, tmp_path / "work")
    assert rc == 2, body
    msg = body["error"]["message"]
    assert "(404)" in msg and "downloading" in msg and "\n" not in msg
    assert list((tmp_path / "work").iterdir()) == []


def test_ctrl_c_mid_check_leaves_nothing_in_the_work_folder(converted, tmp_path, capsys, monkeypatch):
    from nvfp4_fuse import verify as ver

    orig = ver.check_shards
    calls = []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return orig(*a, **kw)

    monkeypatch.setattr(ver, "check_shards", interrupted)
    rc, body = verify_hub(capsys, converted, tmp_path / "work")
    assert rc == 130 and len(calls) == 2
    assert list((tmp_path / "work").iterdir()) == []


def test_offline_a_cached_snapshot_is_read_as_a_folder(converted, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    import huggingface_hub.constants as C
    from huggingface_hub import snapshot_download

    snapshot_download("org/src")
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    n_log = len(fake_hub.log)
    rc, stdout, err = run_inprocess(capsys, "verify", "org/src", str(converted), *VERIFY)
    assert rc == 0, err
    assert json.loads(stdout)["ok"] and len(fake_hub.log) == n_log  # not one request


def test_work_dir_and_max_disk_are_refused_for_a_local_source(hub_src, converted, tmp_path, capsys):  # noqa: F811
    for extra in (("--max-disk", "1GB"), ("--work-dir", str(tmp_path)), ("--dry-run",)):
        rc, stdout, _ = run_inprocess(capsys, "verify", str(hub_src), str(converted), *VERIFY, *extra)
        assert rc == 2 and "apply to a Hub repo id" in json.loads(stdout)["error"]["message"]


def _write_shard(path: Path, tensors: dict[str, tuple[dict, bytes]]) -> None:
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (info, data) in tensors.items():
        header[name] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _values_apart(folder: Path) -> None:
    """Rewrite a one-shard checkpoint as two: every expert's packed values in one, the rest in the other."""
    idx_p = folder / "model.safetensors.index.json"
    idx = json.loads(idx_p.read_text())
    (one,) = set(idx["weight_map"].values())
    raw = (folder / one).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    tensors = {k: (v, data[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()}
    (folder / one).unlink()
    def key(k: str) -> tuple[str, bool]:
        values = ".experts." in k and k.endswith(".weight")
        return (k.split(".experts.")[0] if values else "", values)

    groups = sorted({key(k) for k in tensors})
    names = {g: f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i, g in enumerate(groups)}
    for g, name in names.items():
        _write_shard(folder / name, {k: t for k, t in tensors.items() if key(k) == g})
    idx["weight_map"] = {k: names[key(k)] for k in tensors}
    idx_p.write_text(json.dumps(idx))


def test_the_decode_of_a_part_split_over_two_shards_has_its_source_values_at_hand(tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    """With the end-to-end decode (the GPU's where there is one, else its CPU reference), an expert part whose values and block
    scales lie in two output shards is decoded with the scales' shard, from the source's values. A
    source whose values lie apart from everything else, a file per layer, makes that file one the
    scales' shard alone still needs: it must be fetched for it, and not freed before."""
    import huggingface_hub.constants as C

    from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint

    pytest.importorskip("torch")
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    src = tmp_path / "split"
    make_sample_checkpoint(src, SampleSpec(layers=3, experts=4, hidden=128, inter=64, shards=1, unequal_scale_2=True, seed=1))
    _values_apart(src)
    fake_hub.create("org/split", {p.name: p.read_bytes() for p in src.iterdir()})
    out = tmp_path / "out"
    rc, _, err = run_inprocess(capsys, "convert", "org/split", str(out), "--target", "vllm-fused", "--max-shard-size", "16KB", "--json")
    assert rc == 0, err
    args = (*VERIFY, "--device", decode_device(), "--decode")  # the last --device given is the one used
    rc, stdout, err = run_inprocess(capsys, "verify", str(src), str(out), *args)
    assert rc == 0, err
    local = json.loads(stdout)
    assert local["device"] == decode_device()
    (tmp_path / "work").mkdir()
    rc, stdout, err = run_inprocess(capsys, "verify", "org/split", str(out), *args, "--work-dir", str(tmp_path / "work"))
    assert rc == 0, stdout
    body = json.loads(stdout)
    assert comparable(body) == comparable(local) and all(m["decoded"] == m["experts"] for m in body["modules"])


def test_a_work_folder_left_by_a_killed_verify_is_removed_by_the_next_one(converted, tmp_path, fake_hub, capsys):  # noqa: F811
    """SIGKILL mid-download leaves the run's work folder (no cleanup runs); the next verify with the
    same work folder base removes it before it plans, and says so, while a folder another live run
    holds, and one too young to tell, are left alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from helpers import fake_hub_env, run_cli

    work = tmp_path / "work"
    work.mkdir()
    r = run_cli(
        "verify", "org/src", str(converted), *VERIFY, "--work-dir", str(work), kill_at="fetch:50000",
        env=fake_hub_env(fake_hub, tmp_path / "hf-home-killed"), timeout=120,
    )  # fmt: skip
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    (left,) = list(work.iterdir())
    assert left.name.startswith("." + WORK_PREFIX) and files_bytes(left, lambda p: True) > 0
    old = time.time() - 3600
    os.utime(left, (old, old))
    live = work / ("." + WORK_PREFIX + "live")
    live.mkdir()
    os.utime(live, (old, old))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)", str(live)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        young = work / ("." + WORK_PREFIX + "young")
        young.mkdir()
        rc, stdout, err = run_inprocess(capsys, "verify", "org/src", str(converted), "--device", "cpu", "--workers", "2", "--work-dir", str(work))
        assert rc == 0, err
        assert f"removed {left}" in " ".join(err.split()) and "left by an earlier verify that was killed" in err
        assert sorted(p.name for p in work.iterdir()) == sorted([live.name, young.name])
    finally:
        holder.kill()
        holder.wait()


def test_a_work_folder_short_of_the_minimum_is_refused_and_the_default_budget_shrinks_to_it(converted, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    from nvfp4_fuse.hub import verify_stream

    work = tmp_path / "work"
    work.mkdir()
    rc, stdout, _ = run_inprocess(capsys, "verify", "org/src", str(converted), *VERIFY, "--work-dir", str(work), "--dry-run")
    disk = json.loads(stdout)["disk"]
    minimum = disk["min_max_disk"]
    assert disk["max_disk"] == 2 * minimum and disk["work_dir"] == str(work)
    monkeypatch.setattr(verify_stream, "disk_free", lambda p: minimum + 1000)
    rc, stdout, _ = run_inprocess(capsys, "verify", "org/src", str(converted), *VERIFY, "--work-dir", str(work), "--dry-run")
    assert rc == 0 and json.loads(stdout)["disk"]["max_disk"] == minimum + 1000
    monkeypatch.setattr(verify_stream, "disk_free", lambda p: minimum - 1)
    rc, body = verify_hub(capsys, converted, work)
    assert rc == 2
    msg = body["error"]["message"]
    assert str(work) in msg and "--work-dir" in msg and "needs at least" in msg, msg
    assert list(work.iterdir()) == [] and fake_hub.ranged_gets("model-00001-of-00006.safetensors").count(None) == 1  # the convert's alone


def test_the_default_work_folder_falls_back_to_tmpdir_beside_a_read_only_folder_or_in_the_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    from nvfp4_fuse import writable
    from nvfp4_fuse.hub.verify_stream import work_base

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr("tempfile.tempdir", None)
    conv = tmp_path / "data" / "out"
    conv.mkdir(parents=True)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    assert work_base(conv, None) == conv.parent
    cached = tmp_path / "hf" / "hub" / "models--me--x" / "snapshots" / "abc"
    cached.mkdir(parents=True)
    assert work_base(cached, None) == tmp
    monkeypatch.setattr(writable, "writable_problem", lambda p: f"{p} is on a read-only file system")
    assert work_base(conv, None) == tmp


def test_a_full_disk_while_fetching_names_the_work_folder_and_leaves_nothing(converted, tmp_path, capsys, monkeypatch):
    import errno

    from nvfp4_fuse.hub import fetch

    def full(self, *a, nbytes: int = 0, **kw):
        if nbytes:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fetch.FetchStats, "add", full)
    rc, body = verify_hub(capsys, converted, tmp_path / "work")
    assert rc == 2
    msg = body["error"]["message"]
    assert msg.startswith("no space left on the device") and str(tmp_path / "work") in msg and str(converted) not in msg, msg
    assert list((tmp_path / "work").iterdir()) == []


def test_an_unreachable_hub_falls_back_to_a_cached_snapshot(converted, tmp_path, capsys, monkeypatch):
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
    rc, body = verify_hub(capsys, converted, tmp_path / "work")
    assert rc == 0 and body["ok"], body
    assert list((tmp_path / "work").iterdir()) == []


def test_transient_faults_are_retried_and_resumed_mid_file(converted, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    from nvfp4_fuse.hub import fetch

    monkeypatch.setattr(fetch, "DEFAULT_TIMEOUT_S", 0.5)
    first = "model-00001-of-00006.safetensors"

    def arm() -> None:
        fake_hub.fault_download(first, reset_after=20_000)
        fake_hub.fail_next("download", 503)

    once_planned(monkeypatch, arm)
    rc, body = verify_hub(capsys, converted, tmp_path / "work")
    assert rc == 0, body
    assert [p for p, _ in fake_hub.fired_faults] == [first]
    assert "bytes=20000-" in fake_hub.ranged_gets(first)  # resumed where the reset left it
    assert list((tmp_path / "work").iterdir()) == []


def test_a_stopped_verify_resumes_where_it_stopped(converted, tmp_path, fake_hub, capsys, monkeypatch):  # noqa: F811
    """Each shard's result is kept as it passes: a verify stopped (Ctrl-C) after k shards, run again,
    checks only the other shards, fetches only their source files, and reports what an uninterrupted
    run does; a shard whose file changed since is checked again; a passed run leaves no journal."""
    import os

    from nvfp4_fuse import verify as ver
    from nvfp4_fuse.disk_budget import shard_check_files
    from nvfp4_fuse.source_files import HubSourceFiles
    from nvfp4_fuse.verify_journal import FOLDER
    from nvfp4_fuse.verify_record import cache_dir

    journals = cache_dir() / FOLDER
    rc, full = verify_hub(capsys, converted, tmp_path / "work")
    assert rc == 0, full
    assert not journals.exists() or not any(journals.iterdir())
    real = ver.check_shards
    checked: list[str] = []
    stop_at = [None]

    def counted(spec, conv_dir, names, **kw):
        if len(checked) == stop_at[0]:
            raise KeyboardInterrupt
        checked.append(names[0])
        return real(spec, conv_dir, names, **kw)

    monkeypatch.setattr(ver, "check_shards", counted)
    shards = sorted(p.name for p in converted.glob("model-*.safetensors"))
    k = random.randint(1, len(shards) - 1)
    stop_at[0] = k
    rc, _, _ = run_inprocess(capsys, "verify", "org/src", str(converted), *VERIFY, "--work-dir", str(tmp_path / "work"))
    assert rc == 130 and len(checked) == k
    first, checked[:], stop_at[0] = list(checked), [], None
    rc, stdout, _ = run_inprocess(capsys, "verify", "org/src", str(converted), *VERIFY, "--work-dir", str(tmp_path / "work"), "--dry-run")
    plan = json.loads(stdout)["disk"]
    assert rc == 0 and plan["resumed_shards"] == sorted(first) and plan["shards"] == len(shards)
    planned: list = []
    orig_start = HubSourceFiles.start

    def start(self, spec, todo):
        planned.append(({s.name for s in todo}, {f for s in todo for f in shard_check_files(spec, s, decode=False)}))
        return orig_start(self, spec, todo)

    monkeypatch.setattr(HubSourceFiles, "start", start)
    gets = {p.name: fake_hub.ranged_gets(p.name).count(None) for p in converted.parent.parent.glob("src/*.safetensors")}
    rc, stdout, err = run_inprocess(capsys, "verify", "org/src", str(converted), "--device", "cpu", "--workers", "2", "--work-dir", str(tmp_path / "work"))
    assert rc == 0, err
    assert f"resumed: {k} of {len(shards)} shard(s) passed in an earlier run" in " ".join(err.split())
    assert sorted(checked) == sorted(set(shards) - set(first))  # the others, each once
    ((todo, needed),) = planned
    assert todo == set(checked)
    # the source shards those others read, each fetched once; no other
    assert {n: fake_hub.ranged_gets(n).count(None) - g for n, g in gets.items()} == {n: int(n in needed) for n in gets}
    assert {f for f in plan["downloads"] if f.endswith(".safetensors")} == needed  # as the dry run said
    assert not any(journals.iterdir())
    # a shard rewritten since (its modification time) is checked again
    checked[:], stop_at[0] = [], k
    run_inprocess(capsys, "verify", "org/src", str(converted), *VERIFY, "--work-dir", str(tmp_path / "work"))
    touched = checked[0]
    os.utime(converted / touched, ns=(time.time_ns(), time.time_ns()))
    checked[:], stop_at[0] = [], None
    rc, body = verify_hub(capsys, converted, tmp_path / "work")
    assert rc == 0 and comparable(body) == comparable(full)
    assert touched in checked and len(checked) == len(shards) - k + 1
