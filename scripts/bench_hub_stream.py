#!/usr/bin/env python3
"""Converting from the Hub, against the loopback fake Hub throttled to a set rate, in one run.

Makes a synthetic DeepSeek-shaped NVFP4 checkpoint, serves it from tests/fake_hub.py with every file
body sent through one token bucket of ``--rate`` bytes/s (like one network link), then runs, each in
a subprocess with a fresh HF_HOME:

  download   ``snapshot_download`` of the repo: the download alone, the same bytes at the same rate
  hub-to-disk  ``nvfp4-fuse convert <repo id> <out> --max-disk SIZE``: planned from headers, the
             source fetched as the output needs it and freed as it goes
  hub-to-hub (``--mode hub-to-hub``, uploads throttled to ``--rate`` too) the upload alone, ``push`` of
             the converted output (converted first, untimed), then ``convert <repo id> <work>
             --push-to <repo> --max-disk SIZE``: downloads, conversion, checks and uploads at once;
             the ratio is its wall time over max(download alone, upload alone) (goal <= 1.25)
  verify-from-hub (``--mode verify-from-hub``) the output converted first (untimed), then ``verify
             <repo id> <out> --device cpu --work-dir DIR``: the source fetched as the checks need it,
             each shard checked once its files are there; the ratio is its wall time over the
             download alone, and its work folder is sampled against its --max-disk

and prints the wall-time ratio hub-to-disk / download (goal <= 1.15), the peak working set sampled
on disk every 20 ms (the run's downloads plus output shards being written) against --max-disk
(never over), the peak disk, and convert's peak RSS (VmHWM, sampled; goal < 1 GB), measured in
this run. Modes are a table (``MODES``): a mode is a function of the prepared :class:`Bench` that
returns its figures. The shards are rewritten by safetensors' own ``save_file`` (as exports made
with ``save_pretrained`` are: a shard's F32 scalars lie together, so planning reads them in one
request a shard); ``--writer-order interleaved`` keeps the sample's expert-by-expert order, whose
scalars take a request per expert projection.

    python scripts/bench_hub_stream.py --workdir /big/disk [--rate 60MB] [--max-disk auto]
        [--layers 6 --experts 32 --hidden 2048 --inter 1024 --shards 12 --max-shard-size 100MB]

``--plan-dsv4-pro`` prints instead, from shard headers laid out in memory (no file, no network), the
plan of converting DeepSeek-V4-Pro from the Hub (61 layers x 384 routed experts, H 7168, I 3072, 64
source shards): disk peak with and without the budget, requests, and time at ``--bandwidth``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from nvfp4_fuse.spec import human, parse_size  # noqa: E402

REPO = "bench/src"


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    src: Path
    hub: object  # FakeHub
    source_bytes: int
    results: dict = field(default_factory=dict)

    def env(self, name: str) -> dict[str, str]:
        home = self.work / f"hf-home-{name}"
        shutil.rmtree(home, ignore_errors=True)
        env = dict(os.environ)
        env.update(
            HF_ENDPOINT=self.hub.endpoint,
            HF_TOKEN=self.hub.token,
            HF_HUB_DISABLE_XET="1",
            HF_HOME=str(home),
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_OFFLINE="0",
        )
        return env


def folder_bytes(path: Path) -> tuple[int, int]:
    """(every file's bytes under ``path``, the working set among them: downloads and .partial files)."""
    total = working = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                size = os.stat(os.path.join(root, n)).st_size
            except FileNotFoundError:
                continue
            total += size
            if ".nvfp4-fuse-source" in root or n.endswith(".partial"):
                working += size
    return total, working


def run_measured(cmd: list[str], env: dict[str, str], watch: Path | None) -> dict:
    """Run ``cmd``; its wall time, peak RSS (wait4) and, for ``watch``, the peak bytes under it."""
    peak = {"total": 0, "working": 0}
    done = threading.Event()

    peak["rss"] = 0

    def sample() -> None:
        while not done.is_set():
            if watch is not None and watch.exists():
                t, w = folder_bytes(watch)
                peak["total"], peak["working"] = max(peak["total"], t), max(peak["working"], w)
            try:  # the process's own high-water mark (ru_maxrss would count this process's pages, forked)
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak["rss"] = max(peak["rss"], int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                pass
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False)
    th.start()
    _, status, _ = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    out, err = p.stdout.read(), p.stderr.read()
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({p.returncode}): {err.decode()[-2000:]}")
    return {"wall_s": wall, "rss_bytes": peak["rss"], "peak_disk": peak["total"], "peak_working": peak["working"], "stdout": out}


def with_disk_plan(b: Bench, base: list[str]) -> tuple[list[str], dict]:
    """``base`` (a convert or verify command line) with ``--max-disk`` when one was given, and the disk
    plan its ``--dry-run --json`` prints (``max_disk``, ``min_max_disk``, ...)."""
    if b.args.max_disk != "auto":
        base = [*base, "--max-disk", b.args.max_disk]
    plan = json.loads(subprocess.run([*base, "--dry-run", "--json"], env=b.env("plan"), capture_output=True, check=True).stdout)
    return base, plan["disk"]


def mode_download(b: Bench) -> dict:
    """The download alone: snapshot_download of every file at the same rate."""
    dest = b.work / "download"
    shutil.rmtree(dest, ignore_errors=True)
    code = f"from huggingface_hub import snapshot_download; snapshot_download({REPO!r}, local_dir={str(dest)!r})"
    served = b.hub.bytes_served
    r = run_measured([sys.executable, "-c", code], b.env("download"), None)
    r["bytes"] = b.hub.bytes_served - served
    shutil.rmtree(dest, ignore_errors=True)
    return r


def mode_hub_to_disk(b: Bench) -> dict:
    """convert <repo id> <out> --max-disk: the source fetched as needed, overlapped with writing."""
    out = b.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    base, disk = with_disk_plan(b, [sys.executable, "-m", "nvfp4_fuse.cli", "convert", REPO, str(out), "--max-shard-size", b.args.max_shard_size])
    served = b.hub.bytes_served
    r = run_measured([*base, "--quiet", "--json"], b.env("hub-to-disk"), out)
    r["bytes"] = b.hub.bytes_served - served
    r["max_disk"], r["min_max_disk"], r["planned_working_peak"] = disk["max_disk"], disk["min_max_disk"], disk["working_set_peak"]
    r["output_bytes"] = folder_bytes(out)[0]
    shutil.rmtree(out, ignore_errors=True)
    return r


def mode_hub_to_hub(b: Bench) -> dict:
    """The upload alone (``push`` of the converted output), then ``convert <repo id> <work>
    --push-to``: every byte the work folder holds is sampled (downloads, shards being written or
    waiting for their upload, the small files at the end)."""
    ref = b.work / "converted"
    shutil.rmtree(ref, ignore_errors=True)
    cli = [sys.executable, "-m", "nvfp4_fuse.cli"]
    shape = ["--max-shard-size", b.args.max_shard_size]
    subprocess.run([*cli, "convert", REPO, str(ref), *shape, "--quiet", "--json"], env=b.env("convert"), capture_output=True, check=True)
    b.hub.lfs_store.clear()  # the fake keeps LFS objects by content for every repo: none may count as there already
    received, stored = b.hub.bytes_received, b.hub.calls("lfs-upload").count(200)
    up = run_measured([*cli, "push", str(ref), "bench/upload-alone", "--no-card", "--json"], b.env("upload"), None)
    up["bytes"] = b.hub.bytes_received - received
    up["stored"] = b.hub.calls("lfs-upload").count(200) - stored
    shards = len(list(ref.glob("model-*.safetensors")))
    output_bytes = folder_bytes(ref)[0]
    shutil.rmtree(ref, ignore_errors=True)

    work = b.work / "work-h2h"
    shutil.rmtree(work, ignore_errors=True)
    base, disk = with_disk_plan(b, [*cli, "convert", REPO, str(work), *shape, "--push-to", "bench/h2h"])
    b.hub.lfs_store.clear()
    served, received, stored = b.hub.bytes_served, b.hub.bytes_received, b.hub.calls("lfs-upload").count(200)
    r = run_measured([*base, "--quiet", "--json"], b.env("hub-to-hub"), work)
    r["stored"] = b.hub.calls("lfs-upload").count(200) - stored
    r["shards"] = shards
    r["fetched"] = b.hub.bytes_served - served
    r["sent"] = b.hub.bytes_received - received
    r["max_disk"], r["min_max_disk"] = disk["max_disk"], disk["min_max_disk"]
    r["output_bytes"] = output_bytes
    r["upload"] = up
    r["left"] = sorted(p.name for p in work.iterdir())
    shutil.rmtree(work, ignore_errors=True)
    return r


def mode_verify_from_hub(b: Bench) -> dict:
    """``verify <repo id> <out>`` against a conversion made first (untimed): the source fetched into
    a work folder as the checks need it, each file freed once no shard left to check reads it."""
    out, work = b.work / "verified", b.work / "verify-work"
    for p in (out, work):
        shutil.rmtree(p, ignore_errors=True)
    work.mkdir()
    cli = [sys.executable, "-m", "nvfp4_fuse.cli"]
    subprocess.run([*cli, "convert", REPO, str(out), "--max-shard-size", b.args.max_shard_size, "--quiet", "--json"], env=b.env("convert"), capture_output=True, check=True)
    base, disk = with_disk_plan(b, [*cli, "verify", REPO, str(out), "--device", "cpu", "--work-dir", str(work)])
    served = b.hub.bytes_served
    r = run_measured([*base, "--quiet", "--json"], b.env("verify"), work)
    r["bytes"] = b.hub.bytes_served - served
    r["max_disk"], r["min_max_disk"] = disk["max_disk"], disk["min_max_disk"]
    r["left"] = sorted(p.name for p in work.iterdir())
    for p in (out, work):
        shutil.rmtree(p, ignore_errors=True)
    return r


MODES = {"download": mode_download, "hub-to-disk": mode_hub_to_disk, "hub-to-hub": mode_hub_to_hub, "verify-from-hub": mode_verify_from_hub}


def report(b: Bench) -> None:
    rate = b.args.rate_bytes
    d = b.results["download"]
    print(
        f"source: {human(b.source_bytes)} in {b.args.shards} shards ({b.args.writer_order} order), served at {human(rate)}/s "
        f"(loopback fake Hub, one token bucket, burst {b.args.burst})"
    )
    print(f"download alone (snapshot_download): {d['wall_s']:.2f} s for {human(d['bytes'])}")
    if "hub-to-disk" in b.results:
        h = b.results["hub-to-disk"]
        print(f"hub-to-disk convert: {h['wall_s']:.2f} s, {human(h['bytes'])} fetched (headers and scalars included)")
        print(f"  wall time / download alone: {h['wall_s'] / d['wall_s']:.3f} (goal <= 1.15)")
        over = "OVER" if h["peak_working"] > h["max_disk"] else "within"
        print(
            f"  working set peak (sampled every 20 ms): {human(h['peak_working'])} against --max-disk {human(h['max_disk'])}: {over} "
            f"(planned peak {human(h['planned_working_peak'])}, minimum {human(h['min_max_disk'])})"
        )
        print(f"  disk peak: {human(h['peak_disk'])}; output {human(h['output_bytes'])}; source {human(b.source_bytes)}")
        print(f"  peak RSS: {human(h['rss_bytes'])} (goal < 1 GB); download alone: {human(d['rss_bytes'])}")
    if "hub-to-hub" in b.results:
        h = b.results["hub-to-hub"]
        u = h["upload"]
        print(f"upload alone (push of the converted output): {u['wall_s']:.2f} s for {human(u['bytes'])}")
        print(
            f"hub-to-hub convert --push-to: {h['wall_s']:.2f} s, {human(h['fetched'])} fetched, {human(h['sent'])} sent "
            f"({h['stored']} LFS objects stored for {h['shards']} shards; the upload alone stored {u['stored']})"
        )
        print(f"  wall time / max(download alone, upload alone): {h['wall_s'] / max(d['wall_s'], u['wall_s']):.3f} (goal <= 1.25)")
        over = "OVER" if h["peak_disk"] > h["max_disk"] else "within"
        print(
            f"  work folder peak (sampled every 20 ms; downloads, output shards not yet uploaded, small files): "
            f"{human(h['peak_disk'])} against --max-disk {human(h['max_disk'])}: {over} (minimum {human(h['min_max_disk'])}); "
            f"source {human(b.source_bytes)}, output {human(h['output_bytes'])}"
        )
        print(f"  peak RSS: {human(h['rss_bytes'])} (goal < 1 GB); left in the work folder: {', '.join(h['left'])}")
    if "verify-from-hub" in b.results:
        h = b.results["verify-from-hub"]
        print(f"verify <repo id> (CPU checks): {h['wall_s']:.2f} s, {human(h['bytes'])} fetched (headers and scalars included)")
        print(f"  wall time / download alone: {h['wall_s'] / d['wall_s']:.3f}")
        over = "OVER" if h["peak_disk"] > h["max_disk"] else "within"
        print(
            f"  work folder peak (sampled every 20 ms): {human(h['peak_disk'])} against --max-disk {human(h['max_disk'])}: {over} "
            f"(minimum {human(h['min_max_disk'])}); source {human(b.source_bytes)}; left after: {', '.join(h['left']) or 'nothing'}"
        )
        print(f"  peak RSS: {human(h['rss_bytes'])}")


def plan_dsv4_pro(a: argparse.Namespace) -> None:
    """The Hub-to-disk plan of DeepSeek-V4-Pro's routed experts, from headers laid out in memory."""
    from inspect_range_requests import DTYPE_RANK, tensors

    from nvfp4_fuse.disk_budget import default_budget, plan_disk
    from nvfp4_fuse.hub.remote_source import scalar_spans
    from nvfp4_fuse.safetensors_header import header_from_json
    from nvfp4_fuse.source import Source, tensor_files
    from nvfp4_fuse.spec import OutputOptions, build_spec

    h, i = a.hidden, a.inter
    shapes = {"w1": (i, h), "w3": (i, h), "w2": (h, i)}
    ts = tensors(a.layers, a.experts, h, i)
    per = sum(t[2] for t in ts) / a.shards
    groups: list[list[tuple[str, str, int]]] = [[]]
    size = 0
    for t in ts:
        if size >= per and len(groups) < a.shards:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t[2]
    headers, sizes = {}, {}
    scalar_requests = 0
    for k, g in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        obj, pos, scal = {}, 0, []
        # safetensors' save_file order (dtype, then name): a shard's F32 scalars lie together
        for name, dtype, nbytes in sorted(g, key=lambda t: (-DTYPE_RANK[t[1]], t[0])):
            proj = name.split(".")[-2]  # w1, w3 or w2
            rows, cols = shapes[proj]
            shape = [rows, cols // 2] if dtype == "U8" else [rows, cols // 16] if dtype == "F8_E4M3" else []
            obj[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + nbytes]}
            if dtype == "F32":
                scal.append((pos, pos + nbytes))
            pos += nbytes
        raw = json.dumps(obj, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        headers[fname] = header_from_json(Path(fname), obj, data_start=8 + len(raw), file_size=8 + len(raw) + pos, raw_header=raw)
        sizes[fname] = headers[fname].file_size
        scalar_requests += len(scalar_spans(scal))
    src = Source(Path("deepseek-ai/DeepSeek-V4-Pro (layout)"), headers, tensor_files(headers, None), [], {}, True, {}, sizes)
    spec = build_spec(src, OutputOptions.parse(a.target, max_shard_size=parse_size(a.max_shard_size)), with_scalars=False)
    plan = plan_disk(spec, spec.shards, sizes)
    limit = parse_size(a.max_disk) if a.max_disk != "auto" else default_budget(plan)
    src_total = sum(sizes.values())
    out_total = sum(plan.sizes[s.name] for s in spec.shards)
    bw = parse_size(a.bandwidth)
    print(
        f"DeepSeek-V4-Pro routed experts laid out: {a.layers} layers x {a.experts} experts, H {h}, I {i}: "
        f"{len(headers)} source shards, {human(src_total)} ({src_total:,} bytes; the repo's total_size is 864,704,792,696)"
    )
    print(f"target {a.target}, --max-shard-size {a.max_shard_size}: {len(spec.shards)} output shards, {human(out_total)}")
    print(f"minimum --max-disk: {human(plan.minimum)}; default (twice that): {human(default_budget(plan))}; this run: {human(limit)}")
    print(
        f"disk peak under --max-disk {human(limit)}: {human(plan.disk_peak(limit))} "
        f"(working set peak {human(plan.peak(limit))}, the output growing to {human(out_total)})"
    )
    print(f"without a bound (everything fetched ahead): {human(plan.disk_peak(None))}; snapshot then convert: {human(src_total + out_total)}")
    header_requests = sum(1 + (hd.data_start > 256 << 10) for hd in headers.values())
    print(
        f"requests: 2 to pin the commit, {header_requests} for headers, {scalar_requests} for scalar scales, "
        f"1-3 small files, {len(headers)} downloads"
    )
    print(f"time at {human(bw)}/s: {src_total / bw / 60:.1f} min of downloading ({human(src_total)}), conversion overlapped")
    from nvfp4_fuse.disk_budget import check_steps, plan_steps

    for decode in (False, True):
        vplan = plan_steps(*check_steps(spec, spec.shards, [], decode=decode), sizes)
        print(
            f"verify <repo id> <out>{' with the GPU decode' if decode else ''}: minimum --max-disk {human(vplan.minimum)}, "
            f"working set peak {human(vplan.peak(2 * vplan.minimum))} under the default (twice that); "
            f"snapshot_download first: {human(src_total)}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--mode", choices=[m for m in MODES if m != "download"], default="hub-to-disk")
    ap.add_argument("--rate", default="60MB", help="download rate of the fake Hub (and upload rate, hub-to-hub), bytes/s with a unit")
    ap.add_argument("--burst", default="1MiB", help="bytes the link may send at once after a pause (its buffering)")
    ap.add_argument("--max-disk", default="auto")
    ap.add_argument("--max-shard-size", default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--inter", type=int, default=None)
    ap.add_argument("--shards", type=int, default=None)
    ap.add_argument("--target", default="mega-moe")
    ap.add_argument("--writer-order", choices=["save-file", "interleaved"], default="save-file")
    ap.add_argument("--plan-dsv4-pro", action="store_true")
    ap.add_argument("--bandwidth", default="1GB", help="for --plan-dsv4-pro: the link's bytes/s")
    a = ap.parse_args()
    if a.plan_dsv4_pro:
        for k, v in dict(layers=61, experts=384, hidden=7168, inter=3072, shards=64, max_shard_size="5GB").items():
            if getattr(a, k) is None:
                setattr(a, k, v)
        return plan_dsv4_pro(a)
    for k, v in dict(layers=6, experts=32, hidden=2048, inter=1024, shards=12, max_shard_size="100MB").items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.workdir is None:
        raise SystemExit("--workdir is required (needs about 3x the checkpoint in free disk)")
    from fake_hub import FakeHub, TokenBucket

    from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint

    a.rate_bytes = parse_size(a.rate)
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    make_sample_checkpoint(src, SampleSpec(layers=a.layers, experts=a.experts, hidden=a.hidden, inter=a.inter, shards=a.shards, fast=True, seed=7))
    if a.writer_order == "save-file":
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        for p in sorted(src.glob("*.safetensors")):
            with safe_open(str(p), "pt") as f:
                meta = f.metadata()
            save_file(load_file(str(p)), str(p), metadata=meta)
    files = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    shutil.rmtree(src)  # served from memory from now on
    with FakeHub(download_rate=a.rate_bytes) as hub:
        # a link's buffers absorb a sender's hiccups: up to --burst bytes may catch up at once
        hub.download_bucket = TokenBucket(a.rate_bytes, burst=parse_size(a.burst))
        if a.mode == "hub-to-hub":  # the same rate the other way
            hub.upload_bucket = TokenBucket(a.rate_bytes, burst=parse_size(a.burst))
        hub.create(REPO, files)
        b = Bench(a, work, src, hub, sum(len(v) for v in files.values()))
        del files
        b.results["download"] = MODES["download"](b)
        b.results[a.mode] = MODES[a.mode](b)
    report(b)
    for p in work.glob("hf-home-*"):
        shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
