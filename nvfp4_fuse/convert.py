"""The streaming converter: spec from headers, then write each shard header-first, expert by expert.

Packed values need no transform beyond their row order, so they never pass through a buffer of ours:
they are written straight from the source into their place in the output, contiguous spans (w2,
whole gate/up halves, copied tensors) with ``copy_file_range`` and row runs (the 8-row gate/up
interleave) with ``pwritev`` from a read-only mapping of the source shard. Only block scales, 1/8 of
the bytes, are transformed in memory (numpy, host_layout.py: converting never imports torch);
compressed ones (``encoded_scales.py``) are decoded first, one expert's at a time, and written plain.

Several shards are written at once (``shard_streams``), largest first, each by a thread of its own
that writes its pieces in file order (one writer per file: the kernel serialises writes to a file
anyway) and a helper thread that hashes the same bytes (mapped views and arrays in place; the many
short row runs of an interleave read back from the page cache in large reads), then drops the source
ranges from the mapping. A shard's sha256 is one chain, so a shard takes at least its size over one
core's hash rate: taking the largest first keeps one large shard from running alone at the end. Tasks
run ahead on a thread pool the streams share (scales transformed, source ranges read ahead into the
page cache). At most a byte budget of output, a share a stream, is between being taken on and being
hashed, so resident memory is a few experts' bytes a stream plus a fixed overhead whatever the number
of experts, layers or the shard size.

Order of writing, for crash safety: shards (each under a temporary name, fsynced, renamed, then
recorded in the progress journal, in whatever order they finish), sidecar files, configs, the index,
and last the manifest. A folder without the manifest is never a complete conversion; a rerun with the
same input and options resumes, keeping every shard the journal lists whose size and sha256 still
match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .budget import ByteBudget
from .disk_budget import shard_check_files
from .encoded_scales import EncodedScale
from .errors import InputError, Nvfp4FuseError
from .experts import ExpertLayer
from .folder_lock import folder_lock
from .host_layout import check_block_scale_bytes, rescale_block_scales
from .layout import W13Order
from .manifest import MANIFEST_NAME, Manifest, fingerprint, load_manifest, save_manifest, sha256_file
from .shard_reader import ShardReader
from .shard_writer import PARTIAL_SUFFIX, Piece, StreamingShardWriter, fsync_dir, tensor_bytes, write_file_atomic
from .source import INDEX_NAME, SourceRef, scan_source
from .source_files import LocalSourceFiles, SourceFiles, SourceUsers
from .spec import COPY_CHUNK, INFLIGHT_BYTES, OutputOptions, OutputSpec, OutShard, OutTensor, build_spec, disk_free, human
from .targets import DEFAULT_TARGET, LAYOUT_VERSION, Target
from .writable import require_writable

PROGRESS_NAME = ".nvfp4-fuse-progress.json"
SPAN_MIN = 1 << 20  # row runs at least this long are copied file to file; shorter ones gathered into pwritev


def window_size(workers: int) -> int:
    return 2 * workers + 2


def auto_shard_streams(cpus: int | None = None) -> int:
    """Shards written at once by default: one per 2 cores, 2 to 8. Each stream is a thread writing
    (mostly in the kernel, copying into the page cache) and a thread hashing (sha256 at 1-2 GB/s a
    core, and each shard's hash is one chain), so the streams' hashers set the rate once the disk
    does not; two overlap one shard's fsync and hashing tail with the next shard's writes even on 2
    cores. On the 16-core GPU host 8 streams beat 4 in every case measured (docs/benchmarks.md)."""
    cpus = cpus or os.cpu_count() or 1
    return max(2, min(8, cpus // 2))


@dataclass
class ConvertOptions:
    """What ``convert`` is asked to do, as plain values (the CLI's options); ``workers`` and
    ``overwrite`` do not change the output bytes, :meth:`output_options` holds those that do."""

    target: str = DEFAULT_TARGET
    w13_order: str = W13Order.GATE_UP
    max_shard_size: int = 5 * 10**9
    workers: int = 4
    overwrite: bool = False
    shard_streams: int = 0  # shards written at once; 0: auto_shard_streams()

    def output_options(self) -> OutputOptions:
        return OutputOptions.parse(self.target, self.w13_order, self.max_shard_size)

    def streams(self) -> int:
        """Shards written at once: ``shard_streams``, or :func:`auto_shard_streams` for 0."""
        return self.shard_streams or auto_shard_streams()


@dataclass
class LayerReport:
    prefix: str
    experts: int
    hidden: int
    inter: int
    rescaled_experts: int = 0
    max_rescale_change: float = 0.0  # largest relative change of a dequantized value
    input_scale_spread: float = 1.0  # max/min of the gate/up input scales
    w2_input_scale_spread: float = 1.0  # max/min of the down input scales
    repaired_input_scales: dict[str, int] = field(default_factory=dict)  # role -> experts repaired (INPUT_SCALE_RULE)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ConvertResult:
    out_dir: Path
    spec: OutputSpec
    layers: list[LayerReport]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    resumed_shards: list[str] = field(default_factory=list)
    already_complete: bool = False
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------
# per-expert tasks


@dataclass
class _Chunk:
    """What one task produced: its output bytes as pieces in file order, the largest rescale change,
    and the source file ranges it (or the hash, later) reads through the mapping, which are dropped
    from it once hashed."""

    pieces: list[Piece] = field(default_factory=list)
    change: float = 0.0
    mapped: list[tuple[ShardReader, int, int]] = field(default_factory=list)

    def release(self) -> None:
        for reader, begin, end in self.mapped:
            reader.release(begin, end)


class _Readers(dict):
    """A reader per source shard (one fd and one read-only mapping each; both are safe to use from
    several threads), opened on first use at the path the source files give (which may wait for it)."""

    def __init__(self, spec: OutputSpec, files: SourceFiles):
        super().__init__()
        self.spec, self.files = spec, files
        self.lock = threading.Lock()

    def __missing__(self, f: str) -> ShardReader:
        path = self.files.path(f)  # outside the lock: it may wait for a download
        with self.lock:
            if f not in self:
                h = self.spec.source.headers[f]
                self[f] = ShardReader(h if h.path == path else dataclasses.replace(h, path=path))
            return self[f]


class _Ctx:
    """Shared state of one conversion: the source's readers, and when each source file is done with."""

    def __init__(self, spec: OutputSpec, files: SourceFiles | None = None, *, decode: bool = False):
        self.spec = spec
        self.decode = decode  # shards are checked with the end-to-end decode before they are safe
        self.files = files or LocalSourceFiles(spec.source.root)
        self.readers = _Readers(spec, self.files)
        self.users = SourceUsers([])  # which source files the output shards still to write read

    def plan(self, todo: list[OutShard]) -> dict[str, list[str]]:
        needs = {s.name: shard_check_files(self.spec, s, decode=self.decode) for s in todo}
        self.users = SourceUsers(needs.values())
        return needs

    def shard_written(self, files: list[str]) -> None:
        """An output shard is safe: the source files no other shard reads are closed and given back."""
        for f in self.users.end(files):
            with self.readers.lock:
                r = self.readers.pop(f, None)
            if r is not None:
                r.close()
            self.files.done(f)

    def close(self) -> None:
        with self.readers.lock:
            readers = list(self.readers.values())
            self.readers.clear()
        for r in readers:
            r.close()

    def changed_source(self) -> InputError | None:
        """The error naming an open source file that is no longer the one whose header was read
        (another size, another file under its name, written to), or None. One deleted once read is
        not: it reads on from its open descriptor (a fetched source shard is freed so)."""
        with self.readers.lock:
            readers = list(self.readers.values())
        for reader in readers:
            why = reader.changed(missing_ok=True)
            if why is not None:
                return InputError(why, file=str(reader.header.path))
        return None

    def tensor(self, ref: SourceRef, chunk: _Chunk, start: int = 0, length: int | None = None) -> tuple[ShardReader, str]:
        """The reader of a source tensor; records bytes ``[start, start + length)`` of it in ``chunk``."""
        reader = self.readers[ref.file]
        off, n = reader.file_range(ref.info.name, start, length)
        chunk.mapped.append((reader, off, off + n))
        return reader, ref.info.name

    def decoded(self, enc: EncodedScale, chunk: _Chunk) -> np.ndarray:
        """A compressed block scale, decoded from its mapped streams (recorded in ``chunk``)."""

        def read(file: str, name: str) -> memoryview:
            reader = self.readers[file]
            off, n = reader.file_range(name)
            chunk.mapped.append((reader, off, off + n))
            return reader.view(name)

        return enc.decode(read)

    def scales(self, layer: ExpertLayer, e: int, role: str, chunk: _Chunk) -> np.ndarray:
        """One expert's block scales as uint8 [rows, K/16] (a read-only view of the mapped source, or
        the matrix its compressed streams decode to), checked for NaN and negative bytes."""
        ref = layer.ref(e, role, "weight_scale")
        if ref.encoded is not None:
            raw = self.decoded(ref.encoded, chunk)
        else:
            reader, name = self.tensor(ref, chunk)
            raw = np.frombuffer(reader.view(name), dtype=np.uint8).reshape(ref.info.shape)
        bad = check_block_scale_bytes(raw)
        if bad is not None:
            k16 = ref.info.shape[1]
            how = f" (decoded from its {ref.encoded.encoding} streams)" if ref.encoded is not None else ""
            raise InputError(
                f"block scale at [{bad // k16}, {bad % k16}] is 0x{int(raw.reshape(-1)[bad]):02X} (NaN or negative){how}",
                file=ref.file,
                tensor=ref.info.name,
            )
        return raw


def _fused_task(ctx: _Ctx, tgt: Target, layer: ExpertLayer, part: str, e: int) -> Callable[[], _Chunk]:
    def run() -> _Chunk:
        chunk = _Chunk()
        if part == "w13_weight":
            # gate and up rows in the target's order, straight from the source: long runs file to file,
            # short ones (the 8-row interleave) gathered from the mapping.
            refs = {role: layer.ref(e, role, "weight") for role in ("gate", "up")}
            src = {}
            for role, ref in refs.items():
                reader, name = ctx.tensor(ref, chunk)
                src[role] = reader, name, reader.view(name)
            rows, row_bytes = refs["gate"].info.shape
            for role, r0, n in tgt.rows.cached_runs(rows):
                reader, name, whole = src[role]
                a, b = r0 * row_bytes, (r0 + n) * row_bytes
                chunk.pieces.append(reader.span(name, a, b - a) if b - a >= SPAN_MIN else whole[a:b])
        elif part == "w2_weight":
            reader, name = ctx.tensor(layer.ref(e, "down", "weight"), chunk)
            chunk.pieces.append(reader.span(name))
        elif part == "w13_weight_scale":
            assert layer.ratio_gate is not None and layer.ratio_up is not None
            g, cg = rescale_block_scales(ctx.scales(layer, e, "gate", chunk), float(layer.ratio_gate[e]))
            u, cu = rescale_block_scales(ctx.scales(layer, e, "up", chunk), float(layer.ratio_up[e]))
            chunk.pieces.append(tensor_bytes(tgt.scales.lay_out(tgt.rows.join_np(g, u))))
            chunk.change = max(cg, cu)
        elif part == "w2_weight_scale":
            chunk.pieces.append(tensor_bytes(tgt.scales.lay_out(ctx.scales(layer, e, "down", chunk))))
        else:
            raise AssertionError(part)
        return chunk

    return run


def _expert_task(ctx: _Ctx, layer: ExpertLayer, part: str, e: int) -> Callable[[], _Chunk]:
    """One expert's values (straight from the source) or block scales (rescaled where its gate/up
    weight_scale_2 were made equal), for the per-expert target."""
    role, fld = part.split(".")

    def run() -> _Chunk:
        chunk = _Chunk()
        if fld == "weight":
            reader, name = ctx.tensor(layer.ref(e, role, "weight"), chunk)
            chunk.pieces.append(reader.span(name))
        else:
            assert layer.ratio_gate is not None and layer.ratio_up is not None
            ratio = 1.0 if role == "down" else float((layer.ratio_gate if role == "gate" else layer.ratio_up)[e])
            raw, chunk.change = rescale_block_scales(ctx.scales(layer, e, role, chunk), ratio)
            chunk.pieces.append(tensor_bytes(np.ascontiguousarray(raw)))
        return chunk

    return run


def _scalar_task(ctx: _Ctx, ref: SourceRef) -> Callable[[], _Chunk]:
    """The 4 bytes of one source scalar (the per-expert target's weight_scale_2 and input_scale)."""

    def run() -> _Chunk:
        data = ctx.readers[ref.file].read_small(ref.info.name)
        if len(data) != 4:
            raise AssertionError(f"{ref.info.name} is not one float32")
        return _Chunk([tensor_bytes(np.frombuffer(data, dtype=np.uint8).copy())])

    return run


def _decoded_task(ctx: _Ctx, ref: SourceRef) -> Callable[[], _Chunk]:
    def run() -> _Chunk:
        assert ref.encoded is not None
        chunk = _Chunk()
        chunk.pieces.append(tensor_bytes(ctx.decoded(ref.encoded, chunk)))
        return chunk

    return run


def _copy_task(ctx: _Ctx, ref: SourceRef, start: int, length: int) -> Callable[[], _Chunk]:
    def run() -> _Chunk:
        chunk = _Chunk()
        reader, name = ctx.tensor(ref, chunk, start, length)
        chunk.pieces.append(reader.span(name, start, length))
        return chunk

    return run


# (output tensor, bytes it yields, work): the work runs on the thread pool and returns the task's bytes as
# pieces (mapped views, source spans, arrays), which the main thread writes in file order and the writer
# hashes.
Task = tuple[OutTensor, int, Callable[[], _Chunk]]


def _shard_tasks(ctx: _Ctx, shard: OutShard) -> Iterator[Task]:
    spec = ctx.spec
    globals_cache: dict[str, dict[str, np.ndarray]] = {}
    for t in shard.tensors:
        if t.kind == "copy":
            assert t.source is not None
            n = t.entry.nbytes
            for start in range(0, n, COPY_CHUNK):
                ln = min(COPY_CHUNK, n - start)
                yield t, ln, _copy_task(ctx, t.source, start, ln)
        elif t.kind == "decoded":
            assert t.source is not None
            yield t, t.entry.nbytes, _decoded_task(ctx, t.source)
        elif t.kind == "global":
            assert t.layer is not None
            if t.layer not in globals_cache:
                layer = spec.layers[t.layer]
                globals_cache[t.layer] = spec.target.global_tensors(layer.prefix, layer.scalars)
            data = globals_cache[t.layer][t.entry.name]
            yield t, t.entry.nbytes, (lambda d=data: _Chunk([tensor_bytes(d)]))
        elif t.kind == "scalar":
            assert t.source is not None
            yield t, t.entry.nbytes, _scalar_task(ctx, t.source)
        elif t.kind == "expert":
            assert t.layer is not None and t.part is not None and t.expert is not None
            yield t, t.entry.nbytes, _expert_task(ctx, spec.layers[t.layer], t.part, t.expert)
        else:
            assert t.layer is not None and t.part is not None
            layer = spec.layers[t.layer]
            per_expert = t.entry.nbytes // layer.dims.experts
            for e in range(layer.dims.experts):
                yield t, per_expert, _fused_task(ctx, spec.target, layer, t.part, e)


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


def _output_state(
    out: Path, fp: dict[str, str], opts: ConvertOptions, spec: OutputSpec
) -> tuple[str, Manifest | None, dict[str, Any] | None]:
    """What the output folder holds, read only: ``fresh`` (absent or empty), ``replace`` (an earlier
    conversion, with --overwrite) or ``ours`` (this conversion, complete or part done), with its
    manifest and journal; refusals (a foreign folder, other input or options) raise ``InputError``.
    The dry run asks the same, so it predicts what the run will meet."""
    if not out.exists():
        return "fresh", None, None
    if not out.is_dir():
        raise InputError("output path exists and is not a folder", file=str(out))
    # A kill while the first journal is being written leaves only its temporary file: still ours.
    entries = [p for p in out.iterdir() if p.name != PROGRESS_NAME + PARTIAL_SUFFIX]
    if not entries:
        return "fresh", None, None
    if not (out / MANIFEST_NAME).is_file() and not (out / PROGRESS_NAME).is_file():
        # --overwrite replaces an earlier conversion; it never empties a folder nvfp4-fuse did not write.
        raise InputError(
            "output folder is not empty and holds no nvfp4-fuse conversion (no manifest, no progress journal); "
            "empty it or choose another folder",
            file=str(out),
        )
    if opts.overwrite:
        return "replace", None, None
    man = load_manifest(out)
    prog = _load_progress(out)
    record = man.to_json() if man else prog
    if record is None:
        raise InputError("the progress journal is unreadable; pass --overwrite to start over", file=str(out / PROGRESS_NAME))
    if record.get("input_fingerprint") != fp["input"]:
        was = (record.get("source") or {}).get("source") if isinstance(record.get("source"), dict) else None
        was = f" (recorded source: {was})" if was else ""
        raise InputError(
            f"output folder holds a conversion of other input{was}: the source's headers or configs differ; "
            "pass --overwrite to replace it",
            file=str(out),
        )
    if record.get("options_fingerprint") != fp["options"]:
        raise InputError(
            f"output folder holds a conversion of other options ({_options_diff(record.get('options'), spec.options.to_json())}); "
            "pass --overwrite to replace it, or the same options to resume",
            file=str(out),
        )
    return "ours", man, prog


def check_output(out: Path, spec: OutputSpec, opts: ConvertOptions) -> str:
    """For a dry run: ``fresh``, ``replace`` or ``ours`` (see :func:`_output_state`), or the
    ``InputError`` the run would raise; reads only."""
    return _output_state(Path(out), plan_fingerprints(spec), opts, spec)[0]


def _prepare_output(
    out: Path, fp: dict[str, str], opts: ConvertOptions, spec: OutputSpec, reports: dict[str, LayerReport], sink: Any = None
) -> tuple[dict[str, dict[str, Any]], bool]:
    """Decide what can be kept. Returns (complete shards to keep, whether the output is already complete).

    With --overwrite nothing is kept, but nothing is deleted here either: the caller clears the folder
    only after the disk preflight passed. On resume, the rescale report of the kept shards is restored
    from the journal into ``reports``, so the manifest matches an uninterrupted run's byte for byte.
    With a ``sink`` (``--push-to``, hub/stream_upload.py) the output is complete when the Hub holds
    the manifest's files, and a shard the sink confirms uploaded is kept though its file is gone.
    """
    state, man, prog = _output_state(out, fp, opts, spec)
    if state in ("fresh", "replace"):
        return {}, False
    if man is not None:
        if sink is not None and sink.complete(man):
            return dict(man.files), True
        if sink is None and all((out / n).is_file() and (out / n).stat().st_size == r.get("size") for n, r in man.files.items()):
            return dict(man.files), True  # complete (verify re-hashes; a rerun only checks sizes)
        # A file of a finished conversion went missing or changed size: the manifest no longer holds.
        # Withdraw it first, then redo what does not match, keeping the shards that still hash right.
        (out / MANIFEST_NAME).unlink()
        fsync_dir(out)
        prog = {"files": man.files, "max_rescale_change": {p: l.get("max_rescale_change") for p, l in man.source.get("layers", {}).items()}}
    keep: dict[str, dict[str, Any]] = {}
    planned = {s.name for s in spec.shards}
    records = (prog.get("files") or {}) if prog else {}
    uploaded = sink.confirm({n: r for n, r in records.items() if n in planned and not (out / n).is_file()}) if sink else set()
    for name, rec in records.items():
        p = out / name
        on_disk = name in planned and p.is_file() and p.stat().st_size == rec.get("size") and sha256_file(p) == rec.get("sha256")
        if name in uploaded or (on_disk and (sink is None or sink.keeps(name))):
            keep[name] = rec
    # Same input and options: the journaled maxima are of the same deterministic computation, so
    # max(journaled, recomputed) is what one uninterrupted run reports.
    for prefix, change in ((prog or {}).get("max_rescale_change") or {}).items():
        if prefix in reports and isinstance(change, float):
            reports[prefix].max_rescale_change = max(reports[prefix].max_rescale_change, change)
    return keep, False


def _options_diff(recorded: Any, now: dict[str, Any]) -> str:
    """'--target vllm-fused there, mega-moe here; ...' for the options that differ."""
    if not isinstance(recorded, dict):
        return "the journal does not record which"
    out = []
    for k in sorted(set(recorded) | set(now)):
        a, b = recorded.get(k), now.get(k)
        if a != b:
            if k == "max_shard_size" and isinstance(a, int) and isinstance(b, int):
                a, b = human(a), human(b)
            out.append(f"--{k.replace('_', '-')} {a} there, {b} here")
    return "; ".join(out) or "the recorded options fingerprint differs"


def _write_progress(
    out: Path, fp: dict[str, str], files: dict[str, dict[str, Any]], reports: dict[str, LayerReport], spec: OutputSpec, source: dict | None = None
) -> None:
    body = {
        **(source or {}),  # a Hub source: its pinned commit and file oids
        "input_fingerprint": fp["input"],
        "options_fingerprint": fp["options"],
        "options": spec.options.to_json(),
        "files": files,
        "max_rescale_change": {p: r.max_rescale_change for p, r in reports.items()},
    }
    write_file_atomic(out / PROGRESS_NAME, json.dumps(body, indent=1).encode())


def _check_disk(out: Path, spec: OutputSpec, keep: dict[str, dict[str, Any]], overwrite: bool, working_set: int = 0) -> None:
    """Refuse to start when the output volume lacks the spec's need (less what is kept, plus what
    --overwrite would free, plus a Hub source's working set)."""
    need = spec.output_bytes_estimate() - sum(r["size"] for r in keep.values()) + working_set
    free = disk_free(out)
    freed = 0
    if overwrite and out.is_dir():
        freed = sum(p.lstat().st_size for p in out.rglob("*") if p.is_file() and not p.is_symlink())
    if need > free + freed:
        extra = f" (+{human(freed)} that --overwrite would free)" if freed else ""
        raise InputError(f"not enough free disk: the output needs {human(need)}, {human(free)} is free{extra}", file=str(out))


# ---------------------------------------------------------------------------------------------------
# sidecars


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


README_NAME = "README.md"


def _architectures(spec: OutputSpec) -> list[str]:
    """The source's ``config.json`` architectures (what the model card's serving advice depends on)."""
    archs = (spec.source.configs.get("config.json") or {}).get("architectures")
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def output_card(manifest: Manifest, source_label: str) -> bytes:
    """The README.md of a converted folder: a model card describing it (``push`` uploads a fuller one,
    with the repo id and the verification). It names no local path, so the bytes depend only on the
    source and the options."""
    from .hub.card import render_model_card
    from .hub.download import REPO_ID_RE

    base = source_label if REPO_ID_RE.match(source_label) and not Path(source_label).exists() else None
    return render_model_card(base_model=base, repo_id=None, manifest=manifest.to_json(), verify_summary=None, serve_hint="").encode()


def make_plan(source_dir: Path, opts: ConvertOptions, *, trust_root: Path | None = None) -> OutputSpec:
    """Scan ``source_dir`` and build the output spec (the plan a dry run prints); ``InputError``."""
    if opts.workers < 1:
        raise InputError("--workers must be at least 1")
    if opts.shard_streams < 0:
        raise InputError("--shard-streams must be 0 (auto) or more")
    return build_spec(scan_source(source_dir, trust_root=trust_root), opts.output_options())


def plan_fingerprints(spec: OutputSpec) -> dict[str, str]:
    return {"input": spec.source.fingerprint(), "options": fingerprint(spec.options.to_json())}


def layer_reports(spec: OutputSpec) -> dict[str, LayerReport]:
    return {
        p: LayerReport(
            p,
            l.dims.experts,
            l.dims.hidden,
            l.dims.inter,
            l.rescaled_experts,
            0.0,
            l.input_scale_spread,
            l.w2_input_scale_spread,
            {r: len(v) for r, v in l.repaired_input_scales.items()},
        )
        for p, l in spec.layers.items()
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
    on_resume: Callable[[list[str]], None] | None = None,
    spec: OutputSpec | None = None,
    sink: Any = None,
    files: SourceFiles | None = None,
) -> ConvertResult:
    """Convert the checkpoint in ``source_dir`` into ``out_dir`` (created, resumed, or left as is
    when it already holds this conversion).

    ``spec`` is the plan when the caller already built it (``make_plan``). ``on_bytes`` and
    ``on_shard`` report progress; they are called from the shard streams' threads, several at once
    (rich's ``Progress.advance`` is safe to call so). Raises :class:`InputError` for unusable input,
    options or output folder (nothing is written then, beyond what an earlier run of the same
    conversion left), and ``OSError`` for I/O failures while writing (what was written stays under
    ``.partial`` names or in the progress journal, and a rerun resumes). ``on_resume(kept shards)`` is
    called, before any writing, when an earlier run's complete shards are kept.

    The output folder is locked (:mod:`folder_lock`) for the whole run: a second writer is refused at
    once, and the lock goes with the process however it ends.

    ``sink`` (``--push-to``: :class:`nvfp4_fuse.hub.stream_upload.HubSink`) takes each shard once it
    is written and the finished folder at the end; before each shard is written, ``sink.reserve``
    may wait for disk.
    ``files`` is where the source bytes come from (:mod:`source_files`): the folder of the spec's
    source by default, or a Hub commit fetched as the output needs it (``spec`` then required).
    """
    import time

    t0 = time.perf_counter()
    out = Path(out_dir)
    spec = spec or make_plan(source_dir, opts, trust_root=trust_root)
    files = files or LocalSourceFiles(spec.source.root)
    if not files.remote and (
        out.resolve().is_relative_to(spec.source.root.resolve()) or spec.source.root.resolve().is_relative_to(out.resolve())
    ):
        raise InputError("output folder must not be inside the source folder or contain it", file=str(out))
    if out.exists() and not out.is_dir():
        raise InputError("output path exists and is not a folder", file=str(out))
    require_writable(out, "output folder")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with folder_lock(out, "convert"):
            return _convert_locked(spec, out, opts, t0, source_dir, source_label, on_bytes, on_shard, on_resume, files, sink)
    except OSError as e:
        if isinstance(e, Nvfp4FuseError):  # the Hub kept failing (PushFailed is a ConnectionError)
            raise
        if e.filename is None:  # a write on a descriptor (no space, quota, I/O error): name the folder
            raise OSError(e.errno, e.strerror, str(out)) from e
        raise
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # refused before writing anything: leave no empty folder behind


def _convert_locked(
    spec: OutputSpec,
    out: Path,
    opts: ConvertOptions,
    t0: float,
    source_dir: Path,
    source_label: str | None,
    on_bytes: Callable[[int], None] | None,
    on_shard: Callable[[str, int], None] | None,
    on_resume: Callable[[list[str]], None] | None,
    source: SourceFiles,
    sink: Any = None,
) -> ConvertResult:
    """The conversion proper, holding the output folder's lock (see :func:`convert`)."""
    import time

    fp = plan_fingerprints(spec)
    reports = layer_reports(spec)
    keep, complete = _prepare_output(out, fp, opts, spec, reports, sink)
    result = ConvertResult(out, spec, list(reports.values()))
    if complete:
        result.already_complete = True
        result.files = keep
        return result
    if sink is None:  # the sink checks the disk for its budget
        _check_disk(out, spec, keep, opts.overwrite, source.reserve_bytes)
    if opts.overwrite and out.is_dir():
        _clear_output(out)
    out.mkdir(parents=True, exist_ok=True)
    if keep and on_resume:
        on_resume(sorted(keep))
    for p in out.rglob("*" + PARTIAL_SUFFIX):  # sidecars in subfolders leave theirs there
        if p.is_file() and not p.is_symlink():
            p.unlink()
    files: dict[str, dict[str, Any]] = dict(keep)
    result.resumed_shards = sorted(keep)
    _write_progress(out, fp, files, reports, spec, source.journal())
    for shard in spec.shards:
        if shard.name in keep and on_bytes:
            on_bytes(shard.data_bytes)
    todo = [s for s in spec.shards if s.name not in keep]
    streams = max(1, min(opts.streams(), len(todo) or 1))

    # a shard checked with the decode before it is safe (--push-to on a GPU) reads, for the block scales
    # it holds, the source values too: their file stays until then (disk_budget.shard_check_files)
    ctx = _Ctx(spec, source, decode=bool(getattr(sink, "check_decodes", False)))
    needs = ctx.plan(todo)
    source.start(spec, todo)
    if sink is not None:
        sink.begin(spec, keep, streams, source)
    safe_lock = threading.Lock()

    def shard_safe(name: str) -> None:
        """The shard is safe (journaled; with --push-to, checked and uploaded too): its disk and the
        source files no other shard reads are given back."""
        with safe_lock:
            source.end_shard(name)
            ctx.shard_written(needs[name])

    def shard_done(name: str, size: int, digest: str) -> None:  # called under the streams' lock
        files[name] = {"size": size, "sha256": digest}
        _write_progress(out, fp, files, reports, spec, source.journal())
        if sink is not None:  # the check reads the source bytes, so they stay till it has run
            sink.written(name, size, digest, after=lambda: shard_safe(name))
        else:
            shard_safe(name)
        if on_shard:
            on_shard(name, size)

    reserve = sink.reserve if sink is not None else None
    try:
        _write_shards(ctx, todo, out, streams, opts.workers, reports, on_bytes, shard_done, reserve)
        # Sidecars, configs, index, then the manifest.
        configs = spec.configs()
        for rel in spec.source.sidecars:
            if rel in configs or rel == README_NAME:  # the source's README describes the source, not this
                source.done(rel)
                continue
            size, digest = _copy_file(source.path(rel), out / rel)
            source.done(rel)
            files[rel] = {"size": size, "sha256": digest}
    except BaseException as e:
        source.close()
        if sink is not None:
            sink.reraise(e)  # a failed upload is what stopped the writing: its error, not the wait's
        raise
    for name, data in configs.items():
        size, digest = write_file_atomic(out / name, data)
        files[name] = {"size": size, "sha256": digest}
    size, digest = write_file_atomic(out / INDEX_NAME, spec.index_bytes())
    files[INDEX_NAME] = {"size": size, "sha256": digest}
    manifest = Manifest(
        tool_version=__version__,
        layout=LAYOUT_VERSION,
        target=spec.target.name,
        options=spec.options.to_json(),
        input_fingerprint=fp["input"],
        files=files,
        source={
            "source": source_label or str(source_dir),
            **({"revision": j["source_revision"]} if (j := source.journal()) else {}),
            **({"architectures": archs} if (archs := _architectures(spec)) else {}),
            "layers": {p: r.to_json() for p, r in reports.items()},
            **({"copied_expert_modules": spec.fused_block()["copied_expert_modules"]} if spec.copied_groups else {}),
            **({"decoded_block_scales": spec.decoded_block_scales()} if spec.source.encoded else {}),
        },
    )
    card = output_card(manifest, source_label or str(source_dir))
    size, digest = write_file_atomic(out / README_NAME, card)
    manifest.files[README_NAME] = {"size": size, "sha256": digest}
    manifest.model_card = digest
    if sink is None:
        source.finish()  # before the manifest: a complete folder never holds the run's downloads
        save_manifest(out, manifest)
    else:
        save_manifest(out, manifest)
        sink.finish(out, manifest)  # waits for the uploads (which free the source files), then commits
        source.finish()
    (out / PROGRESS_NAME).unlink(missing_ok=True)
    fsync_dir(out)
    result.files = files
    result.layers = list(reports.values())
    result.seconds = time.perf_counter() - t0
    return result


class _Stopped(Exception):
    """Another shard's stream failed: this one stops and drops its partial file."""


@dataclass
class _Streams:
    """What the shard streams of one conversion share: the pool, the byte budget, the stop flag and a
    lock over the reports, the journal and the progress callbacks."""

    ctx: _Ctx
    pool: ThreadPoolExecutor
    budget: ByteBudget
    window: int
    reports: dict[str, LayerReport]
    on_bytes: Callable[[int], None] | None
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _write_shards(
    ctx: _Ctx,
    todo: list[OutShard],
    out: Path,
    streams: int,
    workers: int,
    reports: dict[str, LayerReport],
    on_bytes: Callable[[int], None] | None,
    shard_done: Callable[[str, int, str], None],
    reserve: Callable[[OutShard, threading.Event], bool] | None = None,
) -> None:
    """Write the shards of ``todo``, ``streams`` of them at once (the largest first), each by its own
    thread with its own hashing thread, sharing the task pool and the read-ahead budget. Each shard is
    handed to ``shard_done(name, size, sha256)`` (one call at a time) as soon as it is renamed into
    place, in whatever order the shards finish. The first failure stops the other streams (their
    partial files are dropped) and is raised."""
    meta = ctx.spec.shard_metadata()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nvfp4-read")
    shared = _Streams(ctx, pool, ByteBudget(streams * INFLIGHT_BYTES), window_size(workers), reports, on_bytes)
    writers = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="nvfp4-shard")

    def one(shard: OutShard) -> None:
        if shared.stop.is_set():
            raise _Stopped
        ctx.files.begin_shard(shard.name)  # a Hub source: the shard's disk is reserved
        if reserve is not None and not reserve(shard, shared.stop):  # --push-to from a folder: the same
            raise _Stopped  # (False: the run stopped while it waited)
        size, digest = _write_shard(shared, out, shard, meta)
        # A source replaced or rewritten while this shard was read leaves no failed read behind (the
        # old file stays open): it is caught here, before the shard is journaled, so a rerun redoes it.
        if (changed := shared.ctx.changed_source()) is not None:
            raise changed
        with shared.lock:
            shard_done(shard.name, size, digest)

    # Longest first (LPT): each stream's time is bounded below by its shards' hashing, a chain per shard.
    # One stream keeps file order, which is then also the order of progress.
    order = sorted(todo, key=lambda s: -s.data_bytes) if streams > 1 and not ctx.files.ordered else todo
    futs = [writers.submit(one, s) for s in order]
    try:
        for fut in as_completed(futs):
            fut.result()
    except BaseException as e:
        shared.stop.set()
        ctx.files.close()  # streams waiting on a download or on disk give up
        for fut in futs:
            fut.cancel()
        wait(futs)
        if isinstance(e, _Stopped):  # cannot be first: a stream stops only after another failed
            raise AssertionError("a shard stream stopped with no failure") from e
        if isinstance(e, OSError | InputError):
            # A source that shrank or was replaced mid-run fails a read wherever it happens: a copy
            # comes up short (EIO), a write from its mapping faults (EFAULT), a read ends early. Name
            # the file, not the output folder the error would otherwise be reported against.
            if (changed := ctx.changed_source()) is not None:
                raise changed from e
        raise
    finally:
        writers.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
        ctx.close()


def _write_shard(shared: _Streams, out: Path, shard: OutShard, meta: dict[str, str]) -> tuple[int, str]:
    """Write one shard. Tasks run ahead on the pool (scales transformed, source ranges read ahead); this
    thread writes their pieces in file order, the writer hashes them beside. At most ``window`` tasks
    run ahead, and at most the shared budget of output (or one task) is between being taken on and
    being hashed, over all the streams: that bounds both the scale arrays held and the source pages
    mapped."""
    budget, reports = shared.budget, shared.reports
    writer = StreamingShardWriter(out / shard.name, shard.entries, meta)
    ahead: deque[tuple[OutTensor, int, Future]] = deque()  # on the pool, in file order
    hashing: deque[tuple[int, Future]] = deque()  # written, being hashed
    tasks = _shard_tasks(shared.ctx, shard)
    pending: Task | None = None

    def hashed_one() -> None:
        n, fut = hashing.popleft()
        try:
            fut.result()
        finally:
            budget.release(n)

    try:
        while True:
            if shared.stop.is_set():
                raise _Stopped
            while hashing and hashing[0][1].done():
                hashed_one()
            # Take tasks on while the window and the budget allow; a stream holding nothing waits for
            # its share instead, so each always has one going.
            while len(ahead) < shared.window:
                pending = pending or next(tasks, None)
                if pending is None:
                    break
                if ahead or hashing:
                    if not budget.try_acquire(pending[1]):
                        break
                else:
                    budget.acquire(pending[1])
                t, nbytes, work = pending
                ahead.append((t, nbytes, shared.pool.submit(_prepare, work)))
                pending = None
            if ahead:
                t, nbytes, fut = ahead.popleft()
                try:
                    chunk = fut.result()
                    hashing.append((nbytes, writer.put(chunk.pieces, after=chunk.release)))
                except BaseException:
                    budget.release(nbytes)
                    raise
                if shared.on_bytes:
                    shared.on_bytes(nbytes)
                if chunk.change and t.layer:
                    with shared.lock:
                        r = reports[t.layer]
                        r.max_rescale_change = max(r.max_rescale_change, chunk.change)
                del chunk
            elif hashing:
                hashed_one()
            else:
                break
        return writer.finish()
    except BaseException:
        for _, _, fut in ahead:
            fut.cancel()
        writer.abort()
        for _, nbytes, _ in ahead:
            budget.release(nbytes)
        for n, _ in hashing:
            budget.release(n)
        raise


def _prepare(work: Callable[[], _Chunk]) -> _Chunk:
    """Run a task on the pool, then start reading its source ranges into the page cache (asynchronous
    read-ahead), so that the writer rarely waits on the disk for them. Cached ranges cost next to nothing."""
    chunk = work()
    for reader, begin, end in chunk.mapped:
        try:
            os.posix_fadvise(reader.fd, begin, end - begin, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):
            break  # only a hint
    return chunk
