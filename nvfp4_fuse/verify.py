"""``nvfp4-fuse verify``: prove that a converted checkpoint decodes to what its source did.

One pass over each checkpoint, memory bounded by a fixed budget (a few experts), whatever the model's
size. Before the pass, from headers and small files: the manifest is present and every file has its
size; the output spec rebuilt from the source and the recorded options names exactly the tensors,
dtypes, shapes and shard assignment of the output's index and headers; the configs and the shard
metadata equal what ``convert`` writes; every sidecar is byte-identical.

The pass reads every output shard once, in file order, hashing it (its sha256 must equal the
manifest's) and checking each piece as it goes by, against the source read once too:

- copied tensors (everything but the converted experts, MXFP4 expert groups included) are
  byte-identical to the source; a compressed block scale (``encoded_scales.py``) is decoded from the
  source's streams, and read as that plain E4M3 matrix by this check and the expert checks below;
- the small per-layer tensors equal what the source's scalar scales give;
- packed values: byte-identical to the source's after undoing the target's row order (no target
  changes a value byte), so the values need no decoding;
- block scales, after undoing the layout, equal the source's, or for a rescaled half the
  round-to-nearest-even rescale of them (the torch reference of the converter's numpy rescale);
- the rescale bound, per block and exactly: a value's relative error is a function of its block
  scale alone (its E2M1 factor cancels), ``|s'c - s s2| / (s s2)`` for source scale ``s`` and
  scale_2 ``s2``, output scale ``s'`` and scale_2 ``c``; copied halves must be exact, rescaled ones
  within half an E4M3 step of ``x = s s2 / c`` (6.25% of it in E4M3's normal range, half the
  subnormal spacing 2^-10 below 2^-6, and 2^-9 where ``x < 2^-10`` was clamped to the smallest
  subnormal rather than flushed to zero);
- end to end, where a GPU is used (``decode``): every checked expert of both checkpoints is
  dequantized by the Triton compare kernel and compared: copied halves bit-identical, rescaled ones
  no further apart than their block scales allow. On the CPU this runs the torch reference of the
  kernel when asked for (slow); by default the CPU run leaves it out and says so.

The result lists the checks that ran.

The checks are those of :mod:`~nvfp4_fuse.verify_checks` (pure functions) applied to each piece by
:mod:`~nvfp4_fuse.piece_checks`, the GPU decode in a process of its own (:mod:`~nvfp4_fuse.decode_process`); this
module holds the pass. :func:`check_shards` runs it over any subset of a conversion's output shards
(a shard checked as soon as it is written, before it is uploaded); :func:`verify` checks a whole
converted folder: the manifest and the structure first, then :func:`check_shards` over every shard.

From a Hub repo id (``hub``: :class:`~nvfp4_fuse.hub.verify_stream.HubVerifySource`), the source is
planned from the Hub's headers, its files fetched in the order the checks need them within a disk
budget, and the shards checked one at a time, in file order, each once its source files are there;
a source file is deleted once no shard left to check reads it. The result is the same.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .budget import ByteBudget
from .errors import DecodeFailed, InputError
from .manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file
from .piece_checks import CheckedPiece, PieceChecker
from .safetensors_header import ShardHeader, read_header
from .source import scan_source
from .spec import OutputOptions, OutputSpec, OutShard, build_spec
from .verify_checks import check_shard_headers, check_structure, checked_sidecars, fail
from .verify_result import (
    CHECK_BOUND,
    CHECK_COPIED,
    CHECK_DECODED,
    CHECK_GLOBALS,
    CHECK_HASHES,
    CHECK_SCALARS,
    CHECK_SCALES,
    CHECK_SIZES,
    CHECK_STRUCTURE,
    CHECK_VALUES,
    LayerResult,
    VerifyResult,
    merge_results,
)

__all__ = ["LayerResult", "VerifyResult", "check_shards", "default_workers", "pick_device", "verify"]

BUDGET_BYTES = 256 << 20  # output bytes read ahead of the hashing, at most (always at least one piece)


# ---------------------------------------------------------------------------------------------------
# the pass: pieces of output shards, each read once, hashed in order and checked


def _stream(v: PieceChecker, shard: OutShard, pool: ThreadPoolExecutor, budget: ByteBudget, hash_file: bool) -> str | None:
    """Check every piece of ``shard``; returns its sha256 (hashing every byte once, in order)."""
    m = v.conv_m[shard.name]
    h = hashlib.sha256() if hash_file else None
    if h is not None:
        h.update(os.pread(m.fd, m.header.data_start, 0))  # the length prefix and the header
    inflight: deque[tuple[CheckedPiece, Future | None, np.ndarray]] = deque()

    def finish_one() -> None:
        pc, fut, got = inflight.popleft()
        try:
            if fut is not None:
                fut.result()
            if h is not None:
                h.update(got)
            m.release_tensor(pc.tensor.entry.name, pc.start, pc.nbytes)
        finally:
            budget.release(pc.nbytes)
        if v.on_bytes is not None:
            v.on_bytes(shard.name, pc.nbytes)

    try:
        for pc in v.pieces(shard):
            if v.stop.is_set():
                break
            if pc.check is None and h is None:
                if v.on_bytes is not None:
                    v.on_bytes(shard.name, pc.nbytes)
                continue
            while inflight and (inflight[0][1] is None or inflight[0][1].done()):
                finish_one()
            while not budget.try_acquire(pc.nbytes):
                if inflight:
                    finish_one()  # never wait on the budget while holding unfinished pieces
                else:
                    budget.acquire(pc.nbytes)  # the others hold it, and release it as they finish
                    break
            got = m.held_array(pc.tensor.entry.name, pc.start, pc.nbytes)  # held until hashed
            inflight.append((pc, pool.submit(pc.check, got) if pc.check is not None else None, got))
            while len(inflight) > 64:
                finish_one()
        while inflight:
            finish_one()
    except BaseException:
        v.stop.set()
        for pc, fut, _ in inflight:
            if fut is not None:
                fut.cancel()
            budget.release(pc.nbytes)
        raise
    return h.hexdigest() if h is not None and not v.stop.is_set() else None


def _run_pass(
    v: PieceChecker, shards: list[OutShard], sha256: Mapping[str, str] | None, budget: ByteBudget, workers: int
) -> None:
    """The pass: every shard of ``shards`` streamed (side by side, each hashed in its own order when
    ``sha256`` gives the digests to hold them to), its pieces checked on ``workers`` threads, within
    ``budget``, the GPU decodes riding along in their own process; then every decode is read back. The mappings are closed on the way out."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="nvfp4-verify")
    streams = ThreadPoolExecutor(max_workers=max(1, min(len(shards), workers)), thread_name_prefix="nvfp4-verify-shard")
    futs: dict[str, Future] = {}
    try:
        futs = {s.name: streams.submit(_stream, v, s, pool, budget, sha256 is not None) for s in shards}
        for name, fut in futs.items():
            digest = fut.result()
            if digest is not None and sha256 is not None and digest != sha256[name]:
                raise fail(f"output files do not match the manifest: {name}: sha256 differs from manifest")
        v.finish_decode()
    finally:
        v.stop.set()  # a no-op after a full pass; after a failure, the other streams stop reading
        for fut in futs.values():
            fut.cancel()
        streams.shutdown(wait=True, cancel_futures=True)
        pool.shutdown(wait=True, cancel_futures=True)
        v.close()


def checks_made(spec: OutputSpec, *, hash_files: bool, decode: str | None) -> list[str]:
    """The checks a pass over ``spec``'s shards makes, in words (:attr:`VerifyResult.checks`)."""
    checks = [CHECK_HASHES if hash_files else CHECK_SIZES, CHECK_STRUCTURE, CHECK_COPIED, CHECK_GLOBALS, CHECK_VALUES, CHECK_SCALES, CHECK_BOUND]
    if spec.target.per_expert:
        checks[checks.index(CHECK_GLOBALS)] = CHECK_SCALARS
    if spec.source.encoded:
        checks.append(CHECK_DECODED)
    if decode:
        how = "the Triton compare kernel on the GPU" if decode == "cuda" else "the kernel's torch reference on the CPU"
        checks.append(f"end to end: every checked expert of both checkpoints dequantized and compared ({how})")
    return checks


def check_shards(
    spec: OutputSpec,
    conv_dir: Path,
    names: Iterable[str],
    *,
    sha256: Mapping[str, str] | None = None,
    experts: Mapping[str, set[int]] | None = None,
    decode: str | None = None,
    workers: int = 0,
    budget_bytes: int = BUDGET_BYTES,
    headers: Mapping[str, ShardHeader] | None = None,
    decoder: Any = None,
    on_bytes: Callable[[str, int], None] | None = None,
) -> VerifyResult:
    """Check output shards ``names`` (file names in ``conv_dir``) of the conversion ``spec`` describes
    against its source, with every check :func:`verify` makes on shard data; the source's shards must
    be readable (``spec.source``), the other output shards need not exist yet (or any more).

    Checked: each shard's header holds the tensors, dtypes, shapes and ``__metadata__`` the spec gives
    it; copied tensors are byte-identical to the source; per-layer and per-expert scalars are those the
    source's scales give; packed values are the source's in the target's row order; block scales are
    the source's, or their RNE rescale within the bound; with ``decode`` ("cuda": the Triton compare
    kernel, "cpu": its torch reference; None: not run) every checked expert part is dequantized from
    both sides and compared end to end. An expert part whose values and block scales lie in two output
    shards is decoded with its values' shard when both are among ``names``, else with its scales'
    shard (from the source's values, which the values' own check holds byte-identical to the
    output's): over any partition of the shards into calls, each part is decoded once, and no call
    reads a shard outside its ``names``. ``sha256`` (file name -> hex digest) also hashes each shard, header included, and
    holds it to its digest.

    ``experts`` (layer prefix -> experts; default: all) limits the per-expert checks; ``headers`` are
    the shards' headers where the caller has read them (else they are read here, strictly);
    ``decoder`` is the GPU decode process (:class:`~nvfp4_fuse.decode_process.DecodeProcess`) that
    ``decode="cuda"`` sends its parts to (else this call starts one, and ends it); ``workers``
    threads check the pieces (0: :func:`default_workers`), within ``budget_bytes`` read ahead;
    ``on_bytes(shard, n)`` reports progress from several threads.

    Returns a :class:`VerifyResult` of what these shards hold: per-layer results (experts checked,
    rescaled, decoded, largest errors) count only the parts found in them, ``files_hashed`` the shards
    hashed, ``checks`` those run. Raises :class:`~nvfp4_fuse.errors.CheckFailed` naming file, tensor,
    expert and first bad index at the first failed check, as :func:`verify` does.
    """
    names = list(names)
    by_name = {s.name: s for s in spec.shards}
    shards = [by_name[n] if n in by_name else None for n in names]
    for n, s in zip(names, shards):
        if s is None:
            raise fail(f"{n} is not an output shard of this conversion")
    if headers is None:
        read: dict[str, ShardHeader] = {}
        for n in names:
            try:
                read[n] = read_header(Path(conv_dir) / n)
            except InputError as e:
                raise fail(f"output shard {n} is not a consistent safetensors file: {e}") from None
        headers = read
    headers = {n: headers[n] for n in names if n in headers}
    check_shard_headers(spec, headers, names)
    own = None
    if decode == "cuda" and decoder is None:
        from .decode_process import DecodeProcess

        decoder = own = DecodeProcess("cuda")
    workers = workers or default_workers(gpu_decode=decode == "cuda")
    if experts is None:
        experts = {p: set(range(l.dims.experts)) for p, l in spec.layers.items()}
    try:
        v = PieceChecker(spec, headers, dict(experts), decode, decoder)
        v.on_bytes = on_bytes
        budget = ByteBudget(budget_bytes)
        _run_pass(v, [s for s in shards if s is not None], sha256, budget, workers)
        v.check_decoded()
    finally:
        if own is not None:
            own.close()
    result = VerifyResult(str(spec.source.root), str(conv_dir), spec.target.name, decode or "cpu")
    result.checks = checks_made(spec, hash_files=sha256 is not None, decode=decode)
    result.layers = list(v.results.values())
    result.files_hashed = len(names) if sha256 is not None else 0
    result.copied_tensors = v.copied
    result.decoded_block_scales = v.decoded
    result.peak_read_ahead = budget.peak
    return result




def default_workers(*, gpu_decode: bool = False, cpus: int | None = None) -> int:
    """Worker threads by default: up to 8, with or without the GPU decode, which runs on threads of its
    own process (decode_process.py) beside them."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(8, cpus))


def pick_device(device: str) -> str:
    """'cuda' or 'cpu' for --device auto|cuda|cpu, without importing torch (3-4 s on a GPU host): 'cpu'
    for ``cpu``, and for ``auto`` where :func:`gpu_may_be_there` says there is no GPU; else 'cuda', and
    the GPU decode process finds out (with ``auto``, a GPU it cannot use means no decode, as on a
    machine without one; with ``cuda`` it is an error)."""
    if device not in ("auto", "cuda", "cpu"):
        raise InputError(f"--device must be auto, cuda or cpu, not {device!r}")
    if device == "cpu" or (device == "auto" and not gpu_may_be_there()):
        return "cpu"
    return "cuda"


def gpu_may_be_there() -> bool:
    """False where torch surely sees no GPU, found without importing it (1.3 s): torch is not
    installed, or a Linux machine has no GPU device node (NVIDIA's /dev/nvidia0..., ROCm's /dev/kfd,
    WSL's /dev/dxg). True otherwise: then the GPU decode process finds out (the CUDA driver, else torch)."""
    import glob
    import importlib.util
    import sys

    if importlib.util.find_spec("torch") is None:
        return False
    if sys.platform.startswith("linux"):
        return bool(glob.glob("/dev/nvidia[0-9]*")) or any(os.path.exists(p) for p in ("/dev/kfd", "/dev/dxg"))
    return True


def verify(
    source_dir: Path,
    conv_dir: Path,
    *,
    sample: int | None = None,
    device: str = "auto",
    decode: bool | None = None,
    hash_files: bool = True,
    workers: int = 0,
    budget_bytes: int = BUDGET_BYTES,
    trust_root: Path | None = None,
    source_label: str | None = None,
    seed: int | None = None,
    on_bytes: Callable[[str, int], None] | None = None,
    on_stage: Callable[[str, int], None] | None = None,
    hub: Any = None,
    on_resume: Callable[[int, int], None] | None = None,
) -> VerifyResult:
    """Check the converted folder ``conv_dir`` against the source ``source_dir`` (see the module notes),
    or with ``hub`` (:class:`~nvfp4_fuse.hub.verify_stream.HubVerifySource`) against a Hub commit
    fetched as the checks need it, within its disk budget (``source_dir`` is then unused).

    ``workers`` threads check the pieces (0: :func:`default_workers`). ``sample`` checks that many
    experts a layer, drawn at random (``seed`` makes the draw
    repeatable); every file is still hashed unless ``hash_files=False``, which compares sizes only.
    ``decode`` runs the end-to-end dequant-and-compare (default: on a GPU, yes; on the CPU, no: it
    runs the torch reference there, which is slow). Raises :class:`CheckFailed` naming file, tensor,
    expert and first bad index when a check fails, and :class:`InputError` when the source or the
    options are unusable (missing folder, no GPU for ``device="cuda"``).

    Progress: ``on_stage(what, total_bytes)`` when a stage begins (reading headers, hashing the small
    files, the pass over the shards), ``on_bytes(shard, n)`` as the pass checks bytes, from several
    threads at once.

    Against a Hub commit each shard's result is kept as it passes (:mod:`~nvfp4_fuse.verify_journal`),
    and a run that finds an earlier one's checks the other shards only: ``on_resume(kept, shards)``
    says so first. (Not with a sample drawn without a seed: each run draws another.)
    """
    import time

    t0 = time.perf_counter()
    dev = pick_device(device)
    decode = (dev == "cuda") if decode is None else decode
    workers = workers or default_workers(gpu_decode=decode and dev == "cuda")
    decoder = None
    if decode and dev == "cuda":  # started first: CUDA's start (a first run's torch import) overlaps the headers and the pass
        from .decode_process import shared

        decoder = shared("cuda")
        decoder.strict = device == "cuda"  # asked for: a GPU the process cannot use is an error
    conv_dir = Path(conv_dir)
    if on_stage:
        on_stage("reading headers", 0)
    manifest, options, spec = checked_plan(source_dir, conv_dir, trust_root, hub)
    try:
        conv = scan_source(conv_dir)
    except InputError as e:  # the output's index and shard headers disagree, a shard is unreadable...
        raise fail(f"the converted folder is not a consistent checkpoint: {e}") from None
    shard_names = {s.name for s in spec.shards}
    if hash_files and on_stage:
        on_stage("hashing the small files", 0)
    if hash_files:  # the small files first; the shards are hashed by the pass below
        for name, rec in manifest.files.items():
            if name not in shard_names and sha256_file(conv_dir / name) != rec["sha256"]:
                raise fail(f"output files do not match the manifest: {name}: sha256 differs from manifest")
    try:
        if hub is None:
            check_structure(spec, conv_dir, conv, model_card=manifest.model_card)
            result = _check_all(spec, conv_dir, manifest, conv, hash_files, dev if decode else None, workers, budget_bytes, decoder, seed, sample, on_bytes, on_stage)
        else:
            from .verify_journal import VerifyJournal, run_options

            run = run_options(sample, seed, dev if decode else None, hash_files)
            journal, kept = VerifyJournal.resume(conv_dir, hub.pinned.sha, run, [s.name for s in spec.shards])
            if kept and on_resume:
                on_resume(len(kept), len(spec.shards))
            try:
                todo = [s for s in spec.shards if s.name not in kept]
                files = hub.start(spec, checked_sidecars(spec, manifest.model_card), decode=bool(decode), todo=todo)
                check_structure(spec, conv_dir, conv, model_card=manifest.model_card, source_file=files.path, done=files.done)
                result = _check_all(
                    spec, conv_dir, manifest, conv, hash_files, dev if decode else None, workers, budget_bytes, decoder, seed, sample, on_bytes, on_stage,
                    files=files, kept=kept, journal=journal,
                )  # fmt: skip
            finally:
                hub.close()
            if journal is not None:
                journal.remove()  # passed: the result is recorded as every passed verify's is
    except DecodeFailed:
        if decoder is not None and decoder.ready is False:
            raise InputError(f"--device {device} but the GPU decode cannot run: {decoder.why_not}") from None
        raise
    if decoder is not None and decoder.ready is False:  # auto, and the GPU process found no CUDA: as without a GPU
        dev, decode = "cpu", False
        result.checks = checks_made(spec, hash_files=hash_files, decode=None)
    result.source, result.converted, result.device = source_label or str(source_dir), str(conv_dir), dev
    if not decode:
        result.note = "end-to-end dequant-and-compare not run (no GPU; --decode runs its CPU reference, slowly)"
    result.files_hashed = len(manifest.files) if hash_files else 0
    result.copied_groups = [
        {"prefix": g.prefix, "format": g.format, "experts": g.experts, "tensors": g.tensors, "identical": True}
        for g in spec.copied_groups.values()
    ]
    result.seconds = time.perf_counter() - t0
    return result


def _check_all(
    spec: OutputSpec,
    conv_dir: Path,
    manifest: Manifest,
    conv: Any,
    hash_files: bool,
    decode: str | None,
    workers: int,
    budget_bytes: int,
    decoder: Any,
    seed: int | None,
    sample: int | None,
    on_bytes: Callable[[str, int], None] | None,
    on_stage: Callable[[str, int], None] | None,
    files: Any = None,
    kept: dict[str, VerifyResult] | None = None,
    journal: Any = None,
) -> VerifyResult:
    """The pass over every output shard: all at once from a local source; from a Hub source's
    ``files``, one shard at a time in file order, each source file given back once no shard left
    reads it, each shard's result kept in ``journal`` as it passes; the shards in ``kept`` (an
    earlier run's results) are not checked again."""
    from .disk_budget import shard_check_files
    from .source_files import SourceUsers, local_headers

    shard_names = {s.name for s in spec.shards}
    rng = random.Random(seed)
    experts = {}
    for p, layer in spec.layers.items():
        n = layer.dims.experts
        experts[p] = set(range(n)) if not sample or sample >= n else set(rng.sample(range(n), sample))
    kept = kept or {}
    if on_stage:
        on_stage("checking", sum(s.data_bytes for s in spec.shards if s.name not in kept))
    sha256 = {n: manifest.files[n]["sha256"] for n in shard_names} if hash_files else None
    kw = dict(experts=experts, decode=decode, workers=workers, budget_bytes=budget_bytes, decoder=decoder, on_bytes=on_bytes)
    if files is None:
        result = check_shards(spec, conv_dir, [s.name for s in spec.shards], sha256=sha256, headers=conv.headers, **kw)
    else:
        needs = {s.name: shard_check_files(spec, s, decode=decode is not None) for s in spec.shards if s.name not in kept}
        users = SourceUsers(needs.values())
        read_spec = local_headers(spec, files)
        parts = []
        for s in spec.shards:  # in file order: the order the files are fetched in
            if s.name in kept:
                parts.append(kept[s.name])
                continue
            one = {s.name: sha256[s.name]} if sha256 is not None else None
            parts.append(check_shards(read_spec, conv_dir, [s.name], sha256=one, headers={s.name: conv.headers[s.name]}, **kw))
            if journal is not None:
                journal.record(s.name, parts[-1])
            for f in users.end(needs[s.name]):
                files.done(f)
        result = merge_results(parts)
    for lr in result.layers:
        n = spec.layers[lr.prefix].dims.experts
        lr.sampled = sorted(experts[lr.prefix]) if len(experts[lr.prefix]) < n else None
    return result


def checked_plan(source_dir: Path, conv_dir: Path, trust_root: Path | None = None, hub: Any = None) -> tuple[Manifest, OutputOptions, OutputSpec]:
    """The manifest, options and output spec of ``conv_dir``, once every file the manifest lists is
    there at its size and the source is the one it was converted from (``hub``: a Hub commit, planned
    from its headers and scalar scales)."""
    if not conv_dir.is_dir():
        raise InputError("converted folder does not exist", file=str(conv_dir))
    manifest = load_manifest(conv_dir)
    if manifest is None:
        raise fail(f"{conv_dir} has no {MANIFEST_NAME}: the conversion is incomplete (rerun convert to resume)")
    for name, rec in manifest.files.items():
        p = conv_dir / name
        if not p.is_file():
            raise fail(f"output files do not match the manifest: {name}: missing")
        if p.stat().st_size != rec["size"]:
            raise fail(f"output files do not match the manifest: {name}: size {p.stat().st_size} != manifest {rec['size']}")
    options = OutputOptions.from_json(manifest.options, file=str(conv_dir / MANIFEST_NAME))
    src, scalars = hub.source(manifest) if hub is not None else (scan_source(source_dir, trust_root=trust_root), None)
    if src.fingerprint() != manifest.input_fingerprint:
        raise fail("the source's headers and configs are not those this output was converted from (fingerprint differs)")
    return manifest, options, build_spec(src, options, scalar_readers=scalars)
