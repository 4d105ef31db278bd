"""The streaming converter: plan from headers, then write each shard header-first, expert by expert.

Reads run on a thread pool (pread and numpy release the GIL) while the main thread writes and a helper
thread hashes, with read-ahead bounded in bytes, so resident memory is a few experts' tensors plus a
fixed overhead whatever the number of experts, layers or the shard size. The byte transforms are the
numpy ones in host_layout.py: converting never imports torch.

Order of writing, for crash safety: shards (each under a temporary name, fsynced, renamed, then
recorded in the progress journal), sidecar files, configs, the index, and last the manifest. A folder
without the manifest is never a complete conversion; a rerun with the same input and options resumes,
keeping every shard the journal lists whose size and sha256 still match.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from . import __version__
from .errors import InputError
from .manifest import MANIFEST_NAME, Manifest, fingerprint, load_manifest, save_manifest, sha256_file
from .host_layout import check_block_scale_bytes, rescale_block_scales
from .plan import COPY_CHUNK, INDEX_NAME, INFLIGHT_BYTES, ExpertLayer, OutShard, OutTensor, Plan, build_plan, disk_free, human, scan_source
from .safetensors_io import PARTIAL_SUFFIX, ShardReader, StreamingShardWriter, fsync_dir, tensor_bytes, write_file_atomic
from .targets import Target, get_target

PROGRESS_NAME = ".nvfp4-fuse-progress.json"


def window_size(workers: int) -> int:
    return 2 * workers + 2


@dataclass
class ConvertOptions:
    target: str = "mega-moe"
    w13_order: str = "gate-up"
    max_shard_size: int = 5 * 10**9
    workers: int = 4
    overwrite: bool = False
    dry_run: bool = False

    def fingerprinted(self) -> dict[str, Any]:
        """The options that change the output bytes (workers and overwrite do not)."""
        return {"target": self.target, "w13_order": self.w13_order, "max_shard_size": self.max_shard_size}


@dataclass
class LayerReport:
    prefix: str
    experts: int
    hidden: int
    inter: int
    rescaled_experts: int = 0
    max_rescale_change: float = 0.0  # largest relative change of a dequantized value
    input_scale_spread: float = 1.0  # max/min of the gate/up input scales

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ConvertResult:
    out_dir: Path
    plan: Plan
    layers: list[LayerReport]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed_shards: list[str] = field(default_factory=list)
    already_complete: bool = False
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------
# per-expert tasks


class _BufferPool:
    """Recycles the big uint8 buffers that tasks read expert bytes into.

    A fresh buffer per expert costs page faults and zeroing in the kernel for every byte converted.
    Buffers instead cycle between the read-ahead window and this free list. Sizes come in phases (a
    layer's w13 experts, then its w2 experts, then copy chunks), so a miss drops the buffers of other
    sizes; the list never holds more than ``cap`` bytes. Buffers are allocated with glibc told to mmap
    blocks of 1 MiB and more (see :func:`_mmap_big_blocks`), so what is dropped goes back to the OS.
    """

    def __init__(self, cap: int):
        self._free: dict[int, list[np.ndarray]] = {}
        self._held = 0
        self._cap = cap
        self._lock = threading.Lock()

    def get(self, n: int) -> np.ndarray:
        with self._lock:
            lst = self._free.get(n)
            if lst:
                self._held -= n
                return lst.pop()
            self._free.clear()  # a new phase: the old size is not coming back soon
            self._held = 0
        return np.empty(n, dtype=np.uint8)

    def put(self, buf: np.ndarray) -> None:
        n = buf.size
        with self._lock:
            if self._held + n <= self._cap:
                self._free.setdefault(n, []).append(buf)
                self._held += n


def _mmap_big_blocks() -> None:
    """Make glibc serve blocks of 1 MiB and more with mmap, and give them back on free.

    By default glibc raises its mmap threshold to the size of the last big block freed (up to 32 MiB),
    after which expert-sized buffers come from per-thread heaps that keep their pages: resident memory
    then grew with the number of reader threads (measured: 586 MB of anonymous memory with 4 workers
    on the bench checkpoint, against 283 MB with this).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        M_MMAP_THRESHOLD = -3
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        pass  # not glibc: its allocator has its own policy


class _Ctx:
    """Shared state of one conversion: readers per shard (one fd each; pread is thread safe), buffers."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.readers = {f: ShardReader(h) for f, h in plan.source.headers.items()}
        _mmap_big_blocks()
        self.pool = _BufferPool(INFLIGHT_BYTES)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()

    def scales(self, layer: ExpertLayer, e: int, role: str) -> np.ndarray:
        """One expert's block scales as uint8 [rows, K/16], checked for NaN and negative bytes."""
        ref = layer.ref(e, role, "weight_scale")
        raw = self.readers[ref.file].read_array(ref.info.name).reshape(ref.info.shape)
        bad = check_block_scale_bytes(raw)
        if bad is not None:
            k16 = ref.info.shape[1]
            raise InputError(
                f"block scale at [{bad // k16}, {bad % k16}] is 0x{int(raw.reshape(-1)[bad]):02X} (NaN or negative)",
                file=ref.file,
                tensor=ref.info.name,
            )
        return raw


def _fused_task(ctx: _Ctx, tgt: Target, layer: ExpertLayer, part: str, e: int) -> Callable[[], tuple[Any, float]]:
    def run() -> tuple[Any, float]:
        if part == "w13_weight":
            # Read gate and up straight into their rows of the output: one buffer, no copies.
            refs = {role: layer.ref(e, role, "weight") for role in ("gate", "up")}
            rows, row_bytes = refs["gate"].info.shape
            buf = ctx.pool.get(2 * rows * row_bytes)
            mv = memoryview(buf)
            views: dict[str, list[memoryview]] = {"gate": [], "up": []}
            pos = 0
            for role, _, n in tgt.w13_row_runs(rows):  # runs of each role come in source order
                views[role].append(mv[pos : pos + n * row_bytes])
                pos += n * row_bytes
            for role, ref in refs.items():
                ctx.readers[ref.file].read_into(ref.info.name, views[role])
            return buf, 0.0
        if part == "w2_weight":
            ref = layer.ref(e, "down", "weight")
            return ctx.readers[ref.file].read_array(ref.info.name, out=ctx.pool.get(ref.info.nbytes)), 0.0
        if part == "w13_weight_scale":
            assert layer.ratio_gate is not None and layer.ratio_up is not None
            g, cg = rescale_block_scales(ctx.scales(layer, e, "gate"), float(layer.ratio_gate[e]))
            u, cu = rescale_block_scales(ctx.scales(layer, e, "up"), float(layer.ratio_up[e]))
            return tensor_bytes(tgt.lay_out_scales_np(tgt.join_scale_rows_np(g, u))), max(cg, cu)
        if part == "w2_weight_scale":
            return tensor_bytes(tgt.lay_out_scales_np(ctx.scales(layer, e, "down"))), 0.0
        raise AssertionError(part)

    return run


# (output tensor, bytes it yields, work); work returns (bytes, largest rescale change), the bytes either a
# memoryview or a uint8 array from the buffer pool, which goes back to the pool once written.
Task = tuple[OutTensor, int, Callable[[], tuple[Any, float]]]


def _shard_tasks(ctx: _Ctx, shard: OutShard) -> Iterator[Task]:
    plan = ctx.plan
    globals_cache: dict[str, dict[str, np.ndarray]] = {}
    for t in shard.tensors:
        if t.kind == "copy":
            assert t.source is not None
            reader = ctx.readers[t.source.file]
            n = t.entry.nbytes
            for start in range(0, n, COPY_CHUNK):
                ln = min(COPY_CHUNK, n - start)
                yield t, ln, (lambda r=reader, nm=t.source.info.name, s=start, ln=ln: (r.read_array(nm, s, ln, out=ctx.pool.get(ln)), 0.0))
        elif t.kind == "global":
            assert t.layer is not None
            if t.layer not in globals_cache:
                layer = plan.layers[t.layer]
                globals_cache[t.layer] = plan.target.global_tensors(layer.prefix, layer.scalars)
            data = globals_cache[t.layer][t.entry.name]
            yield t, t.entry.nbytes, (lambda d=data: (tensor_bytes(d), 0.0))
        else:
            assert t.layer is not None and t.part is not None
            layer = plan.layers[t.layer]
            per_expert = t.entry.nbytes // layer.dims.experts
            for e in range(layer.dims.experts):
                yield t, per_expert, _fused_task(ctx, plan.target, layer, t.part, e)


# ---------------------------------------------------------------------------------------------------
# output folder state: fresh, resumable, complete, or foreign


def _load_progress(out: Path) -> dict[str, Any] | None:
    p = out / PROGRESS_NAME
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a torn journal is treated as absent: everything is redone


def _clear_output(out: Path) -> None:
    """Remove what an earlier conversion wrote (used with --overwrite)."""
    for p in out.iterdir():
        if p.is_file() or p.is_symlink():
            p.unlink()
        else:
            shutil.rmtree(p)


def _prepare_output(
    out: Path, fp: dict[str, str], opts: ConvertOptions, plan: Plan, reports: dict[str, LayerReport]
) -> tuple[dict[str, dict[str, Any]], bool]:
    """Decide what can be kept. Returns (complete shards to keep, whether the output is already complete).

    With --overwrite nothing is kept, but nothing is deleted here either: the caller clears the folder
    only after the disk preflight passed. On resume, the rescale report of the kept shards is restored
    from the journal into ``reports``, so the manifest matches an uninterrupted run's byte for byte.
    """
    if not out.exists():
        return {}, False
    if not out.is_dir():
        raise InputError("output path exists and is not a folder", file=str(out))
    # A kill while the first journal is being written leaves only its temporary file: still ours.
    entries = [p for p in out.iterdir() if p.name != PROGRESS_NAME + PARTIAL_SUFFIX]
    if not entries:
        return {}, False
    if not (out / MANIFEST_NAME).is_file() and not (out / PROGRESS_NAME).is_file():
        # --overwrite replaces an earlier conversion; it never empties a folder nvfp4-fuse did not write.
        raise InputError(
            "output folder is not empty and holds no nvfp4-fuse conversion (no manifest, no progress journal); "
            "empty it or choose another folder",
            file=str(out),
        )
    if opts.overwrite:
        return {}, False
    man = load_manifest(out)
    prog = _load_progress(out)
    record = man.to_json() if man else prog
    if record is None:
        raise InputError("the progress journal is unreadable; pass --overwrite to start over", file=str(out / PROGRESS_NAME))
    if record.get("input_fingerprint") != fp["input"] or record.get("options_fingerprint") != fp["options"]:
        what = "input" if record.get("input_fingerprint") != fp["input"] else "options"
        raise InputError(
            f"output folder holds a conversion of other {what}; pass --overwrite to replace it", file=str(out)
        )
    if man is not None:
        if all((out / n).is_file() and (out / n).stat().st_size == r.get("size") for n, r in man.files.items()):
            return dict(man.files), True  # complete (verify re-hashes; a rerun only checks sizes)
        # A file of a finished conversion went missing or changed size: the manifest no longer holds.
        # Withdraw it first, then redo what does not match, keeping the shards that still hash right.
        (out / MANIFEST_NAME).unlink()
        fsync_dir(out)
        prog = {"files": man.files, "max_rescale_change": {p: l.get("max_rescale_change") for p, l in man.source.get("layers", {}).items()}}
    keep: dict[str, dict[str, Any]] = {}
    planned = {s.name for s in plan.shards}
    for name, rec in (prog.get("files") or {}).items() if prog else []:
        p = out / name
        if name in planned and p.is_file() and p.stat().st_size == rec.get("size") and sha256_file(p) == rec.get("sha256"):
            keep[name] = rec
    # Same input and options: the journaled maxima are of the same deterministic computation, so
    # max(journaled, recomputed) is what one uninterrupted run reports.
    for prefix, change in ((prog or {}).get("max_rescale_change") or {}).items():
        if prefix in reports and isinstance(change, float):
            reports[prefix].max_rescale_change = max(reports[prefix].max_rescale_change, change)
    return keep, False


def _write_progress(out: Path, fp: dict[str, str], files: dict[str, dict[str, Any]], reports: dict[str, LayerReport]) -> None:
    body = {
        "input_fingerprint": fp["input"],
        "options_fingerprint": fp["options"],
        "files": files,
        "max_rescale_change": {p: r.max_rescale_change for p, r in reports.items()},
    }
    write_file_atomic(out / PROGRESS_NAME, json.dumps(body, indent=1).encode())


def _check_disk(out: Path, plan: Plan, keep: dict[str, dict[str, Any]], overwrite: bool) -> None:
    """Refuse to start when the output volume lacks the plan's need (less what is kept, plus what
    --overwrite would free)."""
    need = plan.output_bytes_estimate() - sum(r["size"] for r in keep.values())
    free = disk_free(out)
    freed = 0
    if overwrite and out.is_dir():
        freed = sum(p.lstat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    if need > free + freed:
        extra = f" (+{human(freed)} that --overwrite would free)" if freed else ""
        raise InputError(f"not enough free disk: the output needs {human(need)}, {human(free)} is free{extra}", file=str(out))


# ---------------------------------------------------------------------------------------------------
# configs


def _fused_block(plan: Plan) -> dict[str, Any]:
    opts = plan.options
    block = plan.target.describe(opts["w13_order"])
    block["tool"] = f"nvfp4-fuse {__version__}"
    block["modules"] = {
        p: {"num_experts": l.dims.experts, "hidden_size": l.dims.hidden, "intermediate_size": l.dims.inter}
        for p, l in plan.layers.items()
    }
    return block


def rewrite_configs(plan: Plan) -> dict[str, bytes]:
    """config.json and hf_quant_config.json with a ``fused_experts`` block; NVFP4 settings kept."""
    out = {}
    block = _fused_block(plan)
    cfg = plan.source.configs.get("config.json")
    if cfg is not None:
        cfg = json.loads(json.dumps(cfg))
        qc = cfg.setdefault("quantization_config", {})
        if not isinstance(qc, dict):
            raise InputError("config.json quantization_config is not an object", file="config.json")
        qc["fused_experts"] = block
        out["config.json"] = (json.dumps(cfg, indent=2) + "\n").encode()
    hq = plan.source.configs.get("hf_quant_config.json")
    if hq is not None:
        hq = json.loads(json.dumps(hq))
        hq["fused_experts"] = block
        out["hf_quant_config.json"] = (json.dumps(hq, indent=2) + "\n").encode()
    return out


def shard_metadata(plan: Plan) -> dict[str, str]:
    return {"format": "pt", "nvfp4_fuse_layout": plan.target.describe(plan.options["w13_order"])["layout"], "nvfp4_fuse_target": plan.target.name}


def _copy_file(src: Path, dst: Path) -> tuple[int, str]:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + PARTIAL_SUFFIX)
    h = hashlib.sha256()
    size = 0
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        while chunk := fi.read(COPY_CHUNK):
            fo.write(chunk)
            h.update(chunk)
            size += len(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    return size, h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# entry points


def make_plan(source_dir: Path, opts: ConvertOptions, *, trust_root: Path | None = None) -> Plan:
    if opts.workers < 1:
        raise InputError("--workers must be at least 1")
    target = get_target(opts.target, w13_order=opts.w13_order)
    src = scan_source(source_dir, trust_root=trust_root)
    plan_opts = opts.fingerprinted()
    return build_plan(src, target, plan_opts, opts.max_shard_size)


def plan_fingerprints(plan: Plan) -> dict[str, str]:
    return {"input": plan.source.fingerprint(), "options": fingerprint(plan.options)}


def layer_reports(plan: Plan) -> dict[str, LayerReport]:
    return {
        p: LayerReport(p, l.dims.experts, l.dims.hidden, l.dims.inter, l.rescaled_experts, 0.0, l.input_scale_spread)
        for p, l in plan.layers.items()
    }


def convert(
    source_dir: Path,
    out_dir: Path,
    opts: ConvertOptions,
    *,
    trust_root: Path | None = None,
    source_label: str | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_shard: Callable[[str, int], None] | None = None,
    plan: Plan | None = None,
) -> ConvertResult:
    import time

    t0 = time.perf_counter()
    out = Path(out_dir)
    plan = plan or make_plan(source_dir, opts, trust_root=trust_root)
    if out.resolve().is_relative_to(plan.source.root.resolve()) or plan.source.root.resolve().is_relative_to(out.resolve()):
        raise InputError("output folder must not be inside the source folder or contain it", file=str(out))
    fp = plan_fingerprints(plan)
    reports = layer_reports(plan)
    keep, complete = _prepare_output(out, fp, opts, plan, reports)
    result = ConvertResult(out, plan, list(reports.values()))
    if complete:
        result.already_complete = True
        result.files = keep
        return result
    _check_disk(out, plan, keep, opts.overwrite)
    if opts.overwrite and out.is_dir():
        _clear_output(out)
    out.mkdir(parents=True, exist_ok=True)
    for p in out.rglob("*" + PARTIAL_SUFFIX):  # sidecars in subfolders leave theirs there
        if p.is_file() and not p.is_symlink():
            p.unlink()
    files: dict[str, dict[str, Any]] = dict(keep)
    result.resumed_shards = sorted(keep)
    _write_progress(out, fp, files, reports)
    ctx = _Ctx(plan)
    meta = shard_metadata(plan)
    try:
        with ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="nvfp4-read") as pool:
            for shard in plan.shards:
                if shard.name in keep:
                    if on_bytes:
                        on_bytes(shard.data_bytes)
                    continue
                size, digest = _write_shard(ctx, pool, out, shard, meta, window_size(opts.workers), reports, on_bytes)
                files[shard.name] = {"size": size, "sha256": digest}
                _write_progress(out, fp, files, reports)
                if on_shard:
                    on_shard(shard.name, size)
    finally:
        ctx.close()
    # Sidecars, configs, index, then the manifest.
    configs = rewrite_configs(plan)
    for rel in plan.source.sidecars:
        if rel in configs:
            continue
        size, digest = _copy_file(plan.source.root / rel, out / rel)
        files[rel] = {"size": size, "sha256": digest}
    for name, data in configs.items():
        size, digest = write_file_atomic(out / name, data)
        files[name] = {"size": size, "sha256": digest}
    index = {"metadata": {"total_size": plan.total_size, "nvfp4_fuse_target": plan.target.name}, "weight_map": plan.weight_map()}
    size, digest = write_file_atomic(out / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    files[INDEX_NAME] = {"size": size, "sha256": digest}
    manifest = Manifest(
        tool_version=__version__,
        layout=plan.target.describe(plan.options["w13_order"])["layout"],
        target=plan.target.name,
        options=plan.options,
        input_fingerprint=fp["input"],
        files=files,
        source={"source": source_label or str(source_dir), "layers": {p: r.to_json() for p, r in reports.items()}},
    )
    save_manifest(out, manifest)
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    fsync_dir(out)
    result.files = files
    result.layers = list(reports.values())
    result.seconds = time.perf_counter() - t0
    return result


def _write_shard(
    ctx: _Ctx,
    pool: ThreadPoolExecutor,
    out: Path,
    shard: OutShard,
    meta: dict[str, str],
    window: int,
    reports: dict[str, LayerReport],
    on_bytes: Callable[[int], None] | None,
) -> tuple[int, str]:
    writer = StreamingShardWriter(out / shard.name, shard.entries, meta)
    inflight: deque[tuple[OutTensor, int, Future]] = deque()
    held = 0  # output bytes of the tasks in flight
    tasks = _shard_tasks(ctx, shard)
    pending: Task | None = None
    try:
        while True:
            # Read ahead while both the task count and the byte budget allow; always keep one going.
            while len(inflight) < window:
                pending = pending or next(tasks, None)
                if pending is None or (inflight and held + pending[1] > INFLIGHT_BYTES):
                    break
                t, nbytes, work = pending
                inflight.append((t, nbytes, pool.submit(work)))
                held += nbytes
                pending = None
            if not inflight:
                break
            t, nbytes, fut = inflight.popleft()
            data, change = fut.result()
            held -= nbytes
            if isinstance(data, np.ndarray):  # a pooled buffer: back to the pool once written
                writer.write(memoryview(data))
                ctx.pool.put(data)
            else:
                writer.write(data)
            if on_bytes:
                on_bytes(nbytes)
            if change and t.layer:
                r = reports[t.layer]
                r.max_rescale_change = max(r.max_rescale_change, change)
            del data
        return writer.finish()
    except BaseException:
        for _, _, fut in inflight:
            fut.cancel()
        writer.abort()
        raise
