"""Hub-to-Hub against the loopback fake Hub, each direction throttled to the same rate: how long
``convert <repo id> <work> --push-to <repo>`` takes against the longer of downloading the source alone
and uploading the output alone (the goal: at most 1.25x), and the same for a local source
(``convert <folder> <work> --push-to``, against the upload alone). Peak disk (the work folder, plus the
Hub cache the source is read through) and peak RSS of the command are sampled every 50 ms.

    python scripts/bench_hub_push.py [--rate 25MB] [--experts 64] [--layers 4] [--hidden 1024]
                                     [--inter 512] [--max-shard-size 50MB] [--dir /path/to/scratch]

The fake Hub runs in this process; each command runs in a child process pointed at it by HF_ENDPOINT.
Every number of one printout comes from one run of this script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fake_hub import FakeHub  # noqa: E402

from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint  # noqa: E402
from nvfp4_fuse.spec import human, parse_shard_size  # noqa: E402


def tree_bytes(*roots: Path) -> int:
    n = 0
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                p = os.path.join(dirpath, name)
                try:
                    if not os.path.islink(p):
                        n += os.stat(p).st_blocks * 512
                except OSError:
                    pass
    return n


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(cmd: list[str], env: dict[str, str], watch: list[Path]) -> tuple[float, int, int]:
    """-> (seconds, peak disk of the ``watch`` folders, peak RSS), sampled every 50 ms."""
    peak_disk = peak_rss = 0
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_disk, peak_rss
        while not done.is_set():
            peak_disk = max(peak_disk, tree_bytes(*watch))
            peak_rss = max(peak_rss, rss(proc.pid))
            done.wait(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err}\n{out}")
    return seconds, peak_disk, peak_rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", default="25MB", help="each direction's rate, per second")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--max-shard-size", default="50MB")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    a = ap.parse_args()
    rate = parse_shard_size(a.rate)
    scratch = Path(tempfile.mkdtemp(prefix="bench-hub-push-", dir=a.dir))
    try:
        src = scratch / "src"
        make_sample_checkpoint(src, SampleSpec(layers=a.layers, experts=a.experts, hidden=a.hidden, inter=a.inter, shards=4, seed=1))
        src_bytes = tree_bytes(src)
        with FakeHub(download_rate=rate, upload_rate=rate) as hub:
            hub.create("org/src", {p.name: p.read_bytes() for p in src.iterdir()})
            home = scratch / "hf-home"
            env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home),
                   "NVFP4_FUSE_PROGRESS": "0"}  # fmt: skip
            cli = [sys.executable, "-m", "nvfp4_fuse.cli"]
            common = ["--max-shard-size", a.max_shard_size]

            # download alone: the source repo into an empty Hub cache
            dl = [sys.executable, "-c", "import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1])", "org/src"]
            t_down, _, _ = run(dl, env, [home])
            shutil.rmtree(home)
            # the output, converted locally (not timed), then uploaded alone by push
            ref = scratch / "ref"
            subprocess.run([*cli, "convert", str(src), str(ref), *common, "--quiet"], env=env, check=True, stdout=subprocess.DEVNULL)
            out_bytes = tree_bytes(ref)
            t_up, _, _ = run([*cli, "push", str(ref), "me/push-alone", "--no-card"], env, [ref])
            # Hub to Hub
            work = scratch / "work-h2h"
            t_h2h, disk_h2h, rss_h2h = run([*cli, "convert", "org/src", str(work), *common, "--push-to", "me/h2h", "--quiet"], env, [work, home])
            shutil.rmtree(home, ignore_errors=True)
            # local folder to Hub
            work2 = scratch / "work-l2h"
            t_l2h, disk_l2h, rss_l2h = run([*cli, "convert", str(src), str(work2), *common, "--push-to", "me/l2h", "--quiet"], env, [work2])
            shards = len(list(ref.glob("model-*.safetensors")))
            largest = max(p.stat().st_size for p in ref.glob("model-*.safetensors"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"source {human(src_bytes)}, output {human(out_bytes)} in {shards} shards (largest {human(largest)}); each direction throttled to {human(rate)}/s")
    print(f"download alone: {t_down:.1f} s; upload alone (push): {t_up:.1f} s")
    print(
        f"hub to hub:   {t_h2h:.1f} s = {t_h2h / max(t_down, t_up):.2f}x max(download, upload); "
        f"peak disk {human(disk_h2h)} (work folder + Hub cache; source {human(src_bytes)} + output {human(out_bytes)}); peak RSS {human(rss_h2h)}"
    )
    print(f"local to hub: {t_l2h:.1f} s = {t_l2h / t_up:.2f}x upload alone; peak disk {human(disk_l2h)} (work folder); peak RSS {human(rss_l2h)}")


if __name__ == "__main__":
    main()
