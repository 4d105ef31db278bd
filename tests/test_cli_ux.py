"""The CLI as a person meets it: defaults that work together, conventions (-h, --version, flags),
one error line and exit 2 for what the user can fix (a read-only folder, a busy folder, no network, a
bad flag), one JSON schema, and live progress on a terminal. Each test runs the real command in a
subprocess (a pseudo-terminal where the display is the point)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nvfp4_fuse import __version__
from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint

CLI = [sys.executable, "-m", "nvfp4_fuse.cli"]


def run(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = dict(os.environ, NVFP4_FUSE_PROGRESS="0", COLUMNS="80")
    e.update(env or {})
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=e)


def one_error_line(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


@pytest.fixture
def small_src(tmp_path) -> Path:
    folder = tmp_path / "src"
    make_sample_checkpoint(folder, SampleSpec(layers=3, experts=4, hidden=64, inter=32, shards=2, unequal_scale_2=True))
    return folder


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only mount (a tmpfs remounted ro): root ignores permission bits, not this."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mnt)], check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("cannot mount a tmpfs here (needs root)")

    def make_ro() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)

    yield mnt, make_ro
    subprocess.run(["umount", str(mnt)], check=False)


# -- item 4: the defaults work together -------------------------------------------------------------


def test_default_sample_converts_with_the_default_target(tmp_path):
    r = run("sample", str(tmp_path / "s"), "--layers", "2", "--experts", "2")
    assert r.returncode == 0, r.stderr
    r = run("convert", str(tmp_path / "s"), str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "converted to mega-moe" in r.stdout
    r = run("verify", str(tmp_path / "s"), str(tmp_path / "out"))
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


def test_mega_moe_refusal_names_the_sizes_and_the_fix(small_src, tmp_path):
    line = one_error_line(run("convert", str(small_src), str(tmp_path / "out")))
    assert "hidden 64, intermediate 32" in line and "multiples of 512" in line
    assert "--target vllm-fused" in line and "N=" not in line
    assert line.count("multiples of 512") == 1
    assert not (tmp_path / "out").exists()  # refused before anything was made


# -- item 6: conventions ----------------------------------------------------------------------------


def test_help_version_and_flags():
    r = run("-h")
    assert r.returncode == 0 and "convert" in r.stdout
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"nvfp4-fuse {__version__}"
    r = run("convert", "-h")
    assert r.returncode == 0
    assert "Usage: python -m nvfp4_fuse.cli convert [OPTIONS] SOURCE OUTPUT" in " ".join(r.stdout.split())
    assert "<bool>" not in r.stdout and "{" not in r.stdout and "--no-overwrite" in r.stdout
    assert "lin ear" not in r.stdout and "TARGET" in r.stdout
    for line in r.stdout.splitlines():
        assert len(line) <= 80, line
    r = run("push", "-h")
    for opt in ("--token", "--private", "--revision", "--dry-run", "--json"):
        assert opt in r.stdout, opt


def test_a_bad_flag_is_exit_2_and_json_when_asked(tmp_path):
    r = run("convert", "a", "b", "--overwrite", "true")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run("convert", "a", "b", "--bogus", "--json")
    assert r.returncode == 2
    body = json.loads(r.stdout)
    assert body["schema"] == "nvfp4-fuse/1" and body["ok"] is False and body["error"]["code"] == 2


# -- item 1: read-only folders ----------------------------------------------------------------------


def test_convert_to_a_read_only_folder_is_one_line_and_dry_run_predicts_it(small_src, read_only_dir):
    mnt, make_ro = read_only_dir
    make_ro()
    out = mnt / "out"
    for extra in ((), ("--dry-run",)):
        line = one_error_line(run("convert", str(small_src), str(out), "--target", "vllm-fused", *extra))
        assert "read-only file system" in line and str(mnt) in line, line
    r = run("convert", str(small_src), str(out), "--target", "vllm-fused", "--dry-run", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"]["message"].startswith("cannot write")


def test_verify_of_a_read_only_folder_passes_and_writes_nothing_there(small_src, read_only_dir, tmp_path):
    mnt, make_ro = read_only_dir
    out = mnt / "out"
    r = run("convert", str(small_src), str(out), "--target", "vllm-fused", "--max-shard-size", "30KB")
    assert r.returncode == 0, r.stderr
    before = sorted(p.name for p in out.iterdir())
    make_ro()
    r = run("verify", str(small_src), str(out), "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True
    assert sorted(p.name for p in out.iterdir()) == before
    # --report writes where asked; into the read-only folder it is refused up front, naming the path
    rep = tmp_path / "verify.json"
    r = run("verify", str(small_src), str(out), "--device", "cpu", "--report", str(rep))
    assert r.returncode == 0, r.stderr
    assert json.loads(rep.read_text())["ok"] is True
    line = one_error_line(run("verify", str(small_src), str(out), "--device", "cpu", "--report", str(out / "r.json")))
    assert "read-only" in line and str(out) in line
    # push takes its lock and builds its card without writing there either
    r = run("push", str(out), "me/x", "--dry-run")
    assert r.returncode == 0 and "README.md" in r.stdout, r.stderr


def test_no_space_mid_run_is_one_line_naming_the_path(small_src, tmp_path):
    """A tmpfs with room for the bytes but few inodes: the free-space preflight passes and the run
    meets ENOSPC when it creates its files."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,nr_inodes=5", "tmpfs", str(mnt)], check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        r = run("convert", str(small_src), str(mnt / "out"), "--target", "vllm-fused", "--max-shard-size", "30KB")
        line = one_error_line(r)
        assert "no space left on the device" in line and str(mnt / "out") in line, line
        assert "Traceback" not in r.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# -- item 11: one writer per folder -----------------------------------------------------------------


HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2:] == ["shared"] else fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_blocks_nothing(small_src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in (
            ("convert", str(small_src), str(out), "--target", "vllm-fused"),
            ("push", str(out), "me/x"),
            ("verify", str(small_src), str(out)),  # a reader waits for no writer either: it says so
        ):
            line = one_error_line(run(*args))
            assert f"process {holder.pid}" in line and "in use" in line, line
        assert list(out.iterdir()) == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = run("convert", str(small_src), str(out), "--target", "vllm-fused")
    assert r.returncode == 0, r.stderr
    # a verify running (a shared hold): another verify runs beside it, a writer is refused
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), "shared"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run("verify", str(small_src), str(out)).returncode == 0
        line = one_error_line(run("convert", str(small_src), str(out), "--target", "vllm-fused", "--overwrite"))
        assert f"process {holder.pid}" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_two_converts_at_once_one_finishes_the_other_is_refused(tmp_path):
    src = tmp_path / "src"
    make_sample_checkpoint(src, SampleSpec(layers=3, experts=16, hidden=512, inter=512, shards=2, fast=True))
    out = tmp_path / "out"
    args = [*CLI, "convert", str(src), str(out), "--max-shard-size", "2MB", "--workers", "1", "--shard-streams", "1"]
    env = dict(os.environ, NVFP4_FUSE_PROGRESS="0")
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes[0] == 0, results
    if codes[1] == 2:  # the usual case: the second found the first holding the folder
        assert any("in use by process" in e for c, e in results if c == 2), results
    else:  # the second started after the first had finished: it found the conversion complete
        assert codes == [0, 0]
    assert all("internal error" not in e for _, e in results)
    r = run("verify", str(src), str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr


# -- item 3: the network ----------------------------------------------------------------------------


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("endpoint, words", [("closed", "connection refused"), ("http://hub.invalid", "does not resolve")])
def test_no_network_ends_at_once_with_what_to_do(tmp_path, small_src, endpoint, words):
    url = f"http://127.0.0.1:{_closed_port()}" if endpoint == "closed" else endpoint
    env = {"HF_ENDPOINT": url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": "x"}
    out = tmp_path / "out"
    assert run("convert", str(small_src), str(out), "--target", "vllm-fused").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for args in (
        ("push", str(out), "me/x"),
        ("convert", "org/missing", str(tmp_path / "o2"), "--dry-run"),
        ("convert", "org/missing", str(tmp_path / "o2")),
    ):
        r = run(*args, env=env)
        line = one_error_line(r)  # one line: a retry would log its own "retry 1/5 in 2.0 s" line first
        assert words in line and "check the network" in line, line
        assert "attempts" not in line and "retry" not in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # a failed push changed nothing


def test_push_dry_run_needs_no_network_and_changes_nothing(tmp_path, small_src):
    out = tmp_path / "out"
    assert run("convert", str(small_src), str(out), "--target", "vllm-fused").returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run("push", str(out), "me/x", "--dry-run", "--json", env={"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"})
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["dry_run"] and "README.md" in body["files"] and body["bytes"] > 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# -- item 5: progress on a terminal -----------------------------------------------------------------


def run_in_pty(*args: str, timeout: float = 300) -> tuple[int, list[tuple[float, bytes]]]:
    """Run the CLI with stdout and stderr on a pseudo-terminal; (exit code, [(time, bytes read)])."""
    master, slave = pty.openpty()
    env = dict(os.environ, COLUMNS="100", TERM="xterm")
    env.pop("NVFP4_FUSE_PROGRESS", None)
    p = subprocess.Popen([*CLI, *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks: list[tuple[float, bytes]] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append((time.monotonic(), data))
        elif p.poll() is not None:
            break
    code = p.wait(timeout=30)
    os.close(master)
    return code, chunks


def test_convert_and_verify_show_progress_before_they_end(tmp_path):
    src = tmp_path / "src"
    make_sample_checkpoint(src, SampleSpec(layers=4, experts=32, hidden=512, inter=512, shards=3, fast=True))
    out = tmp_path / "out"
    code, chunks = run_in_pty("convert", str(src), str(out), "--max-shard-size", "10MB")
    assert code == 0
    final = next(i for i, (_, c) in enumerate(chunks) if b"converted to" in c)
    before_end = b"".join(c for _, c in chunks[:final]).decode(errors="replace")
    assert "planning" in before_end and "convert" in before_end and "left" in before_end, before_end[-500:]
    code, chunks = run_in_pty("verify", str(src), str(out), "--device", "cpu", "--workers", "1")
    assert code == 0, b"".join(c for _, c in chunks).decode(errors="replace")[-2000:]
    text = b"".join(c for _, c in chunks).decode(errors="replace")
    final = next(i for i, (_, c) in enumerate(chunks) if b"OK" in c)
    before_end = b"".join(c for _, c in chunks[:final]).decode(errors="replace")
    assert "verify:" in before_end and "MB" in before_end and "left" in before_end, before_end[-500:]
    assert "model-0000" in before_end  # what it is on
    assert "OK" in text


def test_no_progress_when_not_a_terminal_or_with_json(tmp_path, small_src):
    out = tmp_path / "out"
    e = {"NVFP4_FUSE_PROGRESS": ""}
    r = run("convert", str(small_src), str(out), "--target", "vllm-fused", env=e)
    assert r.returncode == 0 and r.stderr == ""
    r = run("verify", str(small_src), str(out), "--device", "cpu", "--json", env=e)
    assert r.returncode == 0 and r.stderr == ""
    json.loads(r.stdout)
    r = run("verify", str(small_src), str(out), "--device", "cpu", env={"NVFP4_FUSE_PROGRESS": "1"})  # forced
    assert r.returncode == 0 and "verify" in r.stderr and ("MB" in r.stderr or "kB" in r.stderr)


def test_resume_is_said_when_it_happens(tmp_path, small_src):
    out = tmp_path / "out"
    args = ("convert", str(small_src), str(out), "--target", "vllm-fused", "--max-shard-size", "30KB")
    assert run(*args).returncode == 0
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    man = json.loads((out / "nvfp4-fuse-manifest.json").read_text())
    # what an interrupted run leaves: a journal of the finished shards, no manifest
    journal = {
        "input_fingerprint": man["input_fingerprint"],
        "options_fingerprint": man["options_fingerprint"],
        "files": {n: r for n, r in man["files"].items() if n.startswith("model-") and n != shard.name},
        "max_rescale_change": {},
    }
    (out / "nvfp4-fuse-manifest.json").unlink()
    shard.unlink()
    (out / ".nvfp4-fuse-progress.json").write_text(json.dumps(journal))
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert f"resumed: kept {len(journal['files'])} complete shard(s)" in r.stderr


# -- item 9: one JSON schema ------------------------------------------------------------------------


def test_json_is_one_schema_for_every_command_and_error(tmp_path, small_src):
    out = tmp_path / "out"
    plan = json.loads(run("convert", str(small_src), str(out), "--target", "vllm-fused", "--dry-run", "--json").stdout)
    conv = json.loads(run("convert", str(small_src), str(out), "--target", "vllm-fused", "--json").stdout)
    ver = json.loads(run("verify", str(small_src), str(out), "--device", "cpu", "--json").stdout)
    for body, cmd in ((plan, "convert"), (conv, "convert"), (ver, "verify")):
        assert body["schema"] == "nvfp4-fuse/1" and body["command"] == cmd and body["ok"] is True
        assert [m["prefix"] for m in body["modules"]] == ["layers.1.ffn.experts", "layers.2.ffn.experts"]
    assert plan["modules"][0]["intermediate"] == conv["modules"][0]["intermediate"] == 32
    # one quantity, one key: convert computes it from the scales it writes, verify from what it reads
    # (float32 against float64 arithmetic), so they agree to rounding
    for c, v in zip(conv["modules"], ver["modules"]):
        assert c["max_rescale_error"] > 0 and c["max_rescale_error"] == pytest.approx(v["max_rescale_error"], rel=1e-3)
    errors = [
        run("convert", str(tmp_path / "nope"), str(out), "--json"),
        run("verify", str(small_src), str(tmp_path / "nope"), "--json"),
        run("push", str(tmp_path / "nope"), "me/x", "--json"),
        run("sample", str(tmp_path / "s"), "--experts", "0", "--json"),
    ]
    # a failed check: exit 3, the same shape
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run("verify", str(small_src), str(out), "--device", "cpu", "--json")
    assert r.returncode == 3
    body = json.loads(r.stdout)
    assert body["ok"] is False and body["error"]["code"] == 3 and body["error"]["kind"] == "check_failed"
    assert body["error"]["message"] and "\n" not in body["error"]["message"]
    for r, cmd in zip(errors, ("convert", "verify", "push", "sample")):
        assert r.returncode == 2
        body = json.loads(r.stdout)
        assert body == {"schema": "nvfp4-fuse/1", "command": cmd, "ok": False, "error": body["error"]}
        assert body["error"]["code"] == 2 and body["error"]["kind"] == "input" and body["error"]["message"]


# -- item 10: refusals with the detail to act on ----------------------------------------------------


def test_other_options_name_the_option(tmp_path, small_src):
    out = tmp_path / "out"
    assert run("convert", str(small_src), str(out), "--target", "vllm-fused").returncode == 0
    line = one_error_line(run("convert", str(small_src), str(out), "--target", "linear"))
    assert "--target vllm-fused there, linear here" in line


@pytest.mark.parametrize("size, words", [("5", "needs a unit"), ("5B", "below 1KB"), ("10 parsecs", "cannot read size")])
def test_max_shard_size_needs_a_unit_and_a_sane_size(tmp_path, small_src, size, words):
    line = one_error_line(run("convert", str(small_src), str(tmp_path / "out"), "--max-shard-size", size, "--target", "linear"))
    assert words in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "head, words",
    [
        (b"PK\x03\x04" + bytes(range(200)), "zip archive"),
        (b"\x80\x02}q\x00(X\x05\x00\x00\x00" + bytes(200), "pickle"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123\n", "git lfs pull"),
        (b"<!DOCTYPE html><html>" + b" " * 100, "it is text"),
    ],
)
def test_a_file_that_is_not_safetensors_is_named_so(tmp_path, small_src, head, words):
    shard = sorted(small_src.glob("model-*.safetensors"))[0]
    shard.write_bytes(head)
    line = one_error_line(run("convert", str(small_src), str(tmp_path / "out"), "--target", "linear"))
    assert "not a safetensors file" in line and words in line and shard.name in line


def test_missing_config_json_is_warned(tmp_path, small_src):
    (small_src / "config.json").unlink()
    r = run("convert", str(small_src), str(tmp_path / "out"), "--target", "linear")
    assert r.returncode == 0
    assert "warning:" in r.stderr and "no config.json" in r.stderr


# -- item 7: sample -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, words",
    [
        (("--recipe", "canada"), "--recipe applies to --arch deepseek-v4 only"),
        (("--arch", "deepseek-v4", "--scheme", "hf"), "--scheme applies to --arch modelopt only"),
        (("--arch", "deepseek-v4", "--unequal-scale-2"), "--unequal-scale-2 applies to --arch modelopt only"),
        (("--experts", "0"), "--experts must be at least 1"),
        (("--hidden", "100"), "--hidden must be a positive multiple of 64"),
    ],
)
def test_sample_refuses_flags_that_do_not_apply_and_leaves_no_folder(tmp_path, args, words):
    line = one_error_line(run("sample", str(tmp_path / "s"), *args))
    assert words in line
    assert not (tmp_path / "s").exists()


# -- item 8: tables -----------------------------------------------------------------------------------


def test_tables_are_in_layer_order_fit_80_columns_and_name_the_bound(tmp_path):
    src = tmp_path / "src"
    make_sample_checkpoint(src, SampleSpec(layers=12, experts=2, hidden=64, inter=32, shards=5, unequal_scale_2=True))
    out = tmp_path / "out"
    for args in (("convert", str(src), str(out), "--target", "linear"), ("verify", str(src), str(out), "--device", "cpu")):
        r = run(*args)
        assert r.returncode == 0, r.stderr
        layers = [int(ln.split("layers.")[1].split(".")[0]) for ln in r.stdout.splitlines() if "ffn.experts" in ln]
        assert layers == list(range(1, 12)), r.stdout
        assert "rescale error" in r.stdout and "half an E4M3 step" in r.stdout and "rel error" not in r.stdout
        assert "decoded" not in r.stdout.split("checks that ran")[0]  # no empty columns on the CPU
        for line in r.stdout.splitlines():
            if line[:1] in "┏┃┡│└":  # the tables: prose is left to the terminal to wrap (paths stay whole)
                assert len(line) <= 80, line
        assert sum(line[:1] == "┃" for line in r.stdout.splitlines()) == 1  # headers on one line, not cut


def test_time_left_moves_while_no_byte_arrives():
    """A stall (an fsync, writeback) must not freeze the estimate: it is recomputed from the average
    rate at every refresh. Rich's own column keeps its last sample. (A fake clock: nothing is timed.)"""
    from rich.console import Console

    from nvfp4_fuse.progress import AverageRateColumn, TimeLeftColumn, byte_progress

    now = [0.0]
    prog = byte_progress(Console(file=open(os.devnull, "w")), True)
    prog.get_time = lambda: now[0]
    with prog:
        pass
    task_id = prog.add_task("convert", total=1000, kept=200)  # 200 bytes kept by a resume: not speed
    task = prog.tasks[0]
    task.start_time = 0.0
    now[0] = 10.0
    prog.update(task_id, completed=600)  # 400 bytes in 10 s
    assert AverageRateColumn().render(task).plain == "40 B/s"
    first = TimeLeftColumn().render(task).plain
    assert first == "0:00:10 left"
    now[0] = 20.0  # ten seconds with no progress
    assert TimeLeftColumn().render(task).plain == "0:00:20 left" != first


def test_no_space_while_writing_names_the_folder(small_src, tmp_path, capsys, monkeypatch):
    """ENOSPC from a write on a descriptor carries no file name: the line names the output folder.
    (The byte writes are made to fail here; the test above meets a real ENOSPC at file creation.)"""
    import errno

    from helpers import run_inprocess

    from nvfp4_fuse import shard_writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shard_writer.os, "pwritev", full)
    monkeypatch.setattr(shard_writer.os, "copy_file_range", full)
    out = tmp_path / "out"
    code, _, stderr = run_inprocess(capsys, "convert", str(small_src), str(out), "--target", "vllm-fused")
    assert code == 2 and stderr.strip() == f"error: no space left on the device: {out}"


def test_dry_run_predicts_what_the_run_meets_in_the_output_folder(tmp_path, small_src):
    out = tmp_path / "out"
    args = ("convert", str(small_src), str(out), "--target", "vllm-fused")
    assert json.loads(run(*args, "--dry-run", "--json").stdout)["output_state"] == "fresh"
    assert run(*args).returncode == 0
    r = run(*args, "--dry-run")
    assert r.returncode == 0 and "holds this conversion" in r.stdout
    line = one_error_line(run("convert", str(small_src), str(out), "--target", "linear", "--dry-run"))
    assert "--target vllm-fused there, linear here" in line
    r = run("convert", str(small_src), str(out), "--target", "linear", "--dry-run", "--overwrite", "--json")
    assert json.loads(r.stdout)["output_state"] == "replace"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    line = one_error_line(run("convert", str(small_src), str(tmp_path / "theirs"), "--target", "linear", "--dry-run"))
    assert "holds no nvfp4-fuse conversion" in line


def test_no_option_leaves_its_flag_to_typer_when_its_metavar_is_its_name():
    """typer 0.27 (installed beside vLLM on the GPU host) turns ``target = typer.Option(..., metavar=
    "TARGET")`` into the flag ``--TARGET``, and ``--target`` is then "No such option"; 0.29 does not.
    Such options declare their flag themselves: checked on the source, whatever typer is installed."""
    import ast

    import nvfp4_fuse

    bad = []
    for path in Path(nvfp4_fuse.__file__).parent.rglob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef):
                continue
            a = fn.args
            pairs = list(zip(a.args[len(a.args) - len(a.defaults) :], a.defaults)) + list(zip(a.kwonlyargs, a.kw_defaults))
            for arg, default in pairs:
                if isinstance(default, ast.Call) and getattr(default.func, "attr", "") == "Option":
                    flags = [x for x in default.args[1:] if isinstance(x, ast.Constant)]
                    metavar = [k.value.value for k in default.keywords if k.arg == "metavar" and isinstance(k.value, ast.Constant)]
                    if not flags and metavar and metavar[0].lower() == arg.arg.lower():
                        bad.append(f"{path.name}:{default.lineno} {fn.name}({arg.arg})")
    assert not bad, bad
