"""``nvfp4-fuse verify``: prove that a converted checkpoint decodes to what its source did.

Three layers of checks, streamed expert by expert like ``convert`` (bounded memory):

1. Structure: a manifest is present and every file matches its size and sha256; the spec rebuilt
   from the source and the manifest's options names exactly the tensors, dtypes, shapes and shard
   assignment found in the output's index and headers; configs equal what ``convert`` writes; every
   sidecar and every non-expert tensor is byte-identical.
2. Exactness: for every expert, the packed weight bytes equal the source's after undoing the row
   order; the block scales, after undoing the layout, equal the source's, or, for a rescaled half,
   the round-to-nearest-even rescale of them; the small per-layer tensors equal what the scalars give.
3. Numerics: both checkpoints' experts are dequantized by the Triton compare kernel (on the GPU;
   on the CPU the torch reference of the same computation, which is slower) and compared. Halves
   whose scales were copied must decode bit-identically; rescaled halves must stay within half an
   E4M3 step (6.25%) per element, or, where the new block scale is subnormal, within half its spacing.
"""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .constants import E4M3_HALF_STEP as HALF_STEP
from .constants import E4M3_SUBNORMAL_HALF_SPACING as SUBNORMAL_HALF_SPACING
from .errors import CheckFailed, InputError
from .experts import ExpertLayer
from .manifest import MANIFEST_NAME, check_files, load_manifest
from .nvfp4 import rescale_block_scales
from .safetensors_io import ShardReader, tensor_bytes
from .source import CONFIG_FILES, INDEX_NAME, scan_source
from .spec import OutputOptions, OutputSpec, build_spec
from .targets import Target


@dataclass
class LayerResult:
    prefix: str
    experts: int
    checked: int = 0
    rescaled: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    sampled: list[int] | None = None  # the experts checked, when --sample drew some

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class VerifyResult:
    source: str
    converted: str
    target: str
    device: str
    layers: list[LayerResult] = field(default_factory=list)
    files_hashed: int = 0
    copied_tensors: int = 0
    copied_groups: list[dict[str, Any]] = field(default_factory=list)  # expert groups left as they were
    seconds: float = 0.0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["layers"] = [l.to_json() for l in self.layers]
        d["ok"] = True
        return d


def _fail(msg: str) -> CheckFailed:
    return CheckFailed(msg)


# ---------------------------------------------------------------------------------------------------
# structure


def _check_structure(spec: OutputSpec, conv_dir: Path, conv_src: Any, *, model_card: str | None = None) -> None:
    want_map = spec.weight_map()
    idx_path = conv_dir / INDEX_NAME
    idx = json.loads(idx_path.read_text())
    got_map = idx.get("weight_map", {})
    missing = sorted(set(want_map) - set(got_map))
    extra = sorted(set(got_map) - set(want_map))
    if missing:
        raise _fail(f"output lacks tensor {missing[0]} (and {len(missing) - 1} more)" if len(missing) > 1 else f"output lacks tensor {missing[0]}")
    if extra:
        raise _fail(f"output has unexpected tensor {extra[0]}")
    for name, shard in want_map.items():
        if got_map[name] != shard:
            raise _fail(f"index puts {name} in {got_map[name]}, the spec in {shard}")
    if idx.get("metadata", {}).get("total_size") != spec.total_size:
        raise _fail(f"index total_size {idx.get('metadata', {}).get('total_size')} != {spec.total_size}")
    for shard in spec.shards:
        hdr = conv_src.headers.get(shard.name)
        if hdr is None:
            raise _fail(f"shard {shard.name} is missing")
        for t in shard.tensors:
            info = hdr.tensors.get(t.entry.name)
            if info is None or info.dtype != t.entry.dtype or info.shape != t.entry.shape:
                got = f"{info.dtype}{list(info.shape)}" if info else "nothing"
                raise _fail(f"{shard.name}: {t.entry.name} is {got}, expected {t.entry.dtype}{list(t.entry.shape)}")
    for name, data in spec.configs().items():
        if (conv_dir / name).read_bytes() != data:
            raise _fail(f"{name} differs from what convert writes for this source and options")
    for rel in spec.source.sidecars:
        if rel in CONFIG_FILES:
            continue
        if rel == "README.md" and model_card is not None:
            continue  # push replaced it with the model card; the manifest's hash covers it
        p = conv_dir / rel
        if not p.is_file() or p.read_bytes() != (spec.source.root / rel).read_bytes():
            raise _fail(f"sidecar {rel} is missing or differs from the source")


# ---------------------------------------------------------------------------------------------------
# per-expert checks


class _Readers:
    def __init__(self, headers: dict[str, Any]):
        self.r = {f: ShardReader(h) for f, h in headers.items()}

    def close(self) -> None:
        for x in self.r.values():
            x.close()


def _slice(readers: _Readers, conv_map: dict[str, str], name: str, e: int, experts: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    r = readers.r[conv_map[name]]
    total = r.header.tensors[name].nbytes
    per = total // experts
    buf = r.read_bytes(name, e * per, per)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape) if per else torch.empty(shape, dtype=dtype)


def _whole(readers: _Readers, conv_map: dict[str, str], name: str) -> torch.Tensor:
    return readers.r[conv_map[name]].read_tensor(name)


def _expected_scales(src: torch.Tensor, ratio: float) -> torch.Tensor:
    return src if ratio == 1.0 else rescale_block_scales(src, ratio)


def _compare_backend(device: str) -> Callable[..., Any]:
    if device == "cuda":
        from .kernels.compare import compare_nvfp4

        return compare_nvfp4
    from .kernels.reference import compare_nvfp4_ref

    return compare_nvfp4_ref


def _rows_s2(tgt: Target, i_rows: int, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per-row scale_2 [E, 2I] in the target's w13 row order from per-expert gate/up values [E]."""
    gg = g[:, None, None].expand(-1, i_rows, 1)
    uu = u[:, None, None].expand(-1, i_rows, 1)
    return tgt.rows.join(gg, uu)[..., 0].contiguous()


@dataclass
class _ExpertPair:
    """One expert of both checkpoints, already checked for exactness, in the compare's form."""

    e: int
    a13w: torch.Tensor  # source w13 packed, in the target's row order
    a13s: torch.Tensor  # source w13 linear scales, same order
    b13w: torch.Tensor
    b13s: torch.Tensor  # converted scales: swizzled as stored, else natural
    a2w: torch.Tensor
    a2s: torch.Tensor
    b2w: torch.Tensor
    b2s: torch.Tensor


class _LayerCtx:
    def __init__(self, spec: OutputSpec, layer: ExpertLayer, src_r: _Readers, conv_r: _Readers, conv_map: dict[str, str]):
        self.tgt = spec.target
        self.layer = layer
        self.src_r, self.conv_r, self.conv_map = src_r, conv_r, conv_map
        d = layer.dims
        entries = {e.name.rsplit(".", 1)[1]: e for e in self.tgt.out_entries(layer.prefix, d)}
        self.w13s, self.w2s = entries["w13_weight_scale"], entries["w2_weight_scale"]
        self.s_dtype = self.tgt.scales.torch_dtype()
        self.swizzled = self.tgt.scales.kernel_reads_in_place  # the compare kernel reads these as stored

    def src(self, e: int, role: str, fld: str) -> torch.Tensor:
        ref = self.layer.ref(e, role, fld)
        t = self.src_r.r[ref.file].read_tensor(ref.info.name)
        if fld == "weight":
            return t.view(torch.uint8)  # U8 or I8 in the source: the same packed bytes
        return t.view(torch.float8_e4m3fn) if fld == "weight_scale" else t

    def load(self, e: int) -> _ExpertPair:
        """Read one expert of both checkpoints and check it byte for byte (runs on a worker thread)."""
        tgt, layer, p = self.tgt, self.layer, self.layer.prefix
        E, H, I = layer.dims.experts, layer.dims.hidden, layer.dims.inter
        gw, uw, dw = self.src(e, "gate", "weight"), self.src(e, "up", "weight"), self.src(e, "down", "weight")
        gs, us, ds = self.src(e, "gate", "weight_scale"), self.src(e, "up", "weight_scale"), self.src(e, "down", "weight_scale")
        cw13 = _slice(self.conv_r, self.conv_map, f"{p}.w13_weight", e, E, torch.uint8, (2 * I, H // 2))
        cs13 = _slice(self.conv_r, self.conv_map, self.w13s.name, e, E, self.s_dtype, self.w13s.shape[1:])
        cw2 = _slice(self.conv_r, self.conv_map, f"{p}.w2_weight", e, E, torch.uint8, (H, I // 2))
        cs2 = _slice(self.conv_r, self.conv_map, self.w2s.name, e, E, self.s_dtype, self.w2s.shape[1:])
        # exactness: weights, after undoing the row order
        cg, cu = tgt.rows.split(cw13)
        for what, got, want in (("gate", cg, gw), ("up", cu, uw), ("down", cw2, dw)):
            if not torch.equal(got, want):
                bad = (got != want).nonzero()[0].tolist()
                part = "w2_weight" if what == "down" else "w13_weight"
                raise _fail(f"{p}.{part}: expert {e} {what} packed bytes differ from the source at [{bad[0]}, {bad[1]}]")
        # exactness: scales, after undoing the layout and the row order
        assert layer.ratio_gate is not None and layer.ratio_up is not None
        nat13 = tgt.scales.natural(cs13, 2 * I, H // 16)
        nat2 = tgt.scales.natural(cs2, H, I // 16)
        ng, nu = tgt.rows.split(nat13)
        rg, ru = float(layer.ratio_gate[e]), float(layer.ratio_up[e])
        for what, got, want, ratio in (
            ("gate", ng, _expected_scales(gs, rg), rg),
            ("up", nu, _expected_scales(us, ru), ru),
            ("down", nat2, ds, 1.0),
        ):
            if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
                bad = (got.view(torch.uint8) != want.view(torch.uint8)).nonzero()[0].tolist()
                part = "w2_weight_scale" if what == "down" else "w13_weight_scale"
                how = "the source's" if ratio == 1.0 else "the rescaled source's"
                raise _fail(f"{p}.{part}: expert {e} {what} block scale at [{bad[0]}, {bad[1]}] differs from {how}")
        return _ExpertPair(
            e,
            tgt.rows.join(gw, uw),
            tgt.rows.join(gs, us),
            cw13,
            cs13.view(torch.uint8) if self.swizzled else nat13,
            dw,
            ds,
            cw2,
            cs2.view(torch.uint8) if self.swizzled else nat2,
        )


def _verify_layer(
    spec: OutputSpec,
    layer: ExpertLayer,
    experts: list[int],
    src_r: _Readers,
    conv_r: _Readers,
    conv_map: dict[str, str],
    device: str,
    batch_bytes: int,
    pool: ThreadPoolExecutor,
) -> LayerResult:
    tgt = spec.target
    p, d = layer.prefix, layer.dims
    E, H, I = d.experts, d.hidden, d.inter
    res = LayerResult(p, E, rescaled=layer.rescaled_experts)
    sc = {k: torch.from_numpy(v) for k, v in layer.scalars.items()}  # float32 [E] each
    # small per-layer tensors
    for name, want in tgt.global_tensors(p, layer.scalars).items():
        got = _whole(conv_r, conv_map, name)
        if tuple(got.shape) != tuple(want.shape) or bytes(tensor_bytes(got)) != bytes(tensor_bytes(want)):
            raise _fail(f"{name} differs from the values derived from the source scales")
    ctx = _LayerCtx(spec, layer, src_r, conv_r, conv_map)
    conv_s2 = _whole(conv_r, conv_map, f"{p}.w13_weight_scale_2")
    s2_g_conv, s2_u_conv = tgt.scale_2.split(conv_s2)
    conv_s2_down = _whole(conv_r, conv_map, f"{p}.w2_weight_scale_2")
    compare = _compare_backend(device)
    dev = torch.device(device)
    step = max(1, batch_bytes // max(1, 3 * I * H // 2))
    assert layer.ratio_gate is not None and layer.ratio_up is not None
    # Reads and byte checks run ahead on the pool (pread and torch release the GIL), one batch ahead.
    futures = deque(pool.submit(ctx.load, e) for e in experts[: 2 * step])
    nxt = len(futures)
    while futures:
        batch: list[_ExpertPair] = []
        while futures and len(batch) < step:
            batch.append(futures.popleft().result())
            if nxt < len(experts):
                futures.append(pool.submit(ctx.load, experts[nxt]))
                nxt += 1
        idx = torch.tensor([x.e for x in batch])
        s2a13 = _rows_s2(tgt, I, sc["gate.weight_scale_2"][idx], sc["up.weight_scale_2"][idx]).to(dev)
        s2b13 = _rows_s2(tgt, I, s2_g_conv[idx], s2_u_conv[idx]).to(dev)
        mv = lambda field, batch=batch: torch.stack([getattr(x, field) for x in batch]).to(dev)  # noqa: E731
        a13w, a13s, b13w, b13s = mv("a13w"), mv("a13s"), mv("b13w"), mv("b13s")
        st13 = compare(a13w, a13s, s2a13, b13w, b13s, s2b13, b_swizzled=ctx.swizzled)
        st2 = compare(
            mv("a2w"), mv("a2s"), sc["down.weight_scale_2"][idx].to(dev),
            mv("b2w"), mv("b2s"), conv_s2_down[idx].to(dev), b_swizzled=ctx.swizzled,
        )  # fmt: skip
        stats = {
            part: [t.tolist() for t in (st.n_diff, st.nonfinite, st.max_abs, st.max_rel)] for part, st in (("w13", st13), ("w2", st2))
        }
        for k, x in enumerate(batch):
            e = x.e
            copied13 = float(layer.ratio_gate[e]) == 1.0 and float(layer.ratio_up[e]) == 1.0
            for part, exact in (("w13", copied13), ("w2", True)):
                n_diff, nonfinite, mabs, mrel = (v[k] for v in stats[part])
                if nonfinite:
                    raise _fail(f"{p}.{part}_weight: expert {e} decodes to NaN or Inf")
                if exact and n_diff:
                    raise _fail(f"{p}.{part}_weight: expert {e} should decode bit-identically but {n_diff} values differ")
                if not exact and mrel > HALF_STEP:
                    nat = tgt.scales.natural(b13s[k].cpu(), 2 * I, H // 16).to(dev) if ctx.swizzled else b13s[k]
                    _check_rescaled_elementwise(p, e, a13w[k], a13s[k], s2a13[k], b13w[k], nat, s2b13[k])
                res.max_abs = max(res.max_abs, mabs)
                res.max_rel = max(res.max_rel, mrel)
            res.checked += 1
    return res


def _check_rescaled_elementwise(p: str, e: int, aw, as_, as2, bw, bs, bs2) -> None:
    """Slow path for a rescaled expert whose largest relative error is over 6.25%.

    The rescaled scale s' = RNE(x) of x = s * s2/c is within half a step of x: 6.25% of x in E4M3's
    normal range, half the subnormal spacing (2^-10) below 2^-6, and up to 2^-9 where x < 2^-10 was
    clamped to the smallest subnormal instead of flushing the block to zero. Every element must be
    within |e2m1| * that bound * c of the source value.
    """
    from .nvfp4 import dequantize, e2m1_decode, unpack_nibbles

    a = dequantize(aw, as_, 1.0) * as2[:, None]
    b = dequantize(bw, bs, 1.0) * bs2[:, None]
    x = (as_.view(torch.float8_e4m3fn).to(torch.float64) * (as2.double() / bs2.double())[:, None]).repeat_interleave(16, dim=-1)
    tol_s = torch.where(x < SUBNORMAL_HALF_SPACING, 2 * SUBNORMAL_HALF_SPACING, torch.clamp(HALF_STEP * x, min=SUBNORMAL_HALF_SPACING))
    vals = e2m1_decode(unpack_nibbles(bw)).abs().double()
    tol = vals * tol_s * bs2.double()[:, None] * (1 + 1e-6)
    bad = (a.double() - b.double()).abs() > tol
    if bool(bad.any()):
        r, c = bad.nonzero()[0].tolist()
        raise _fail(
            f"{p}.w13_weight: expert {e} value at [{r}, {c}] is {float(b[r, c]):.6g}, source {float(a[r, c]):.6g}: "
            f"more than half an E4M3 step apart"
        )


def _check_copied_tensors(spec: OutputSpec, src_r: _Readers, conv_r: _Readers, conv_map: dict[str, str], chunk: int = 64 << 20) -> int:
    n = 0
    for shard in spec.shards:
        for t in shard.tensors:
            if t.kind != "copy":
                continue
            assert t.source is not None
            sr, cr = src_r.r[t.source.file], conv_r.r[conv_map[t.entry.name]]
            size = t.entry.nbytes
            for start in range(0, size, chunk):
                ln = min(chunk, size - start)
                if sr.read_bytes(t.source.info.name, start, ln) != cr.read_bytes(t.entry.name, start, ln):
                    raise _fail(f"{t.entry.name} is not byte-identical to the source (in bytes {start}..{start + ln})")
            n += 1
    return n


def pick_device(device: str) -> tuple[str, str]:
    """('cuda'|'cpu', note)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda but no CUDA device is visible")
    if device not in ("cuda", "cpu"):
        raise InputError(f"--device must be auto, cuda or cpu, not {device!r}")
    note = "" if device == "cuda" else "no GPU: numerics run on the CPU through the torch reference of the kernels (slower)"
    return device, note


def verify(
    source_dir: Path,
    conv_dir: Path,
    *,
    sample: int | None = None,
    device: str = "auto",
    hash_files: bool = True,
    batch_bytes: int = 256 << 20,
    workers: int = 4,
    trust_root: Path | None = None,
    source_label: str | None = None,
    on_layer: Callable[[LayerResult], None] | None = None,
    seed: int | None = None,
) -> VerifyResult:
    """Check the converted folder ``conv_dir`` against the source ``source_dir`` (see the module notes).

    ``sample`` checks that many experts a layer, drawn at random (``seed`` makes the draw
    repeatable); ``hash_files=False`` compares sizes with the manifest without re-hashing. Raises
    :class:`CheckFailed` naming tensor, expert and first bad index when a check fails, and
    :class:`InputError` when the source or the options are unusable (missing folder, no GPU for
    ``device="cuda"``).
    """
    import time

    t0 = time.perf_counter()
    dev, note = pick_device(device)
    conv_dir = Path(conv_dir)
    if not conv_dir.is_dir():
        raise InputError("converted folder does not exist", file=str(conv_dir))
    manifest = load_manifest(conv_dir)
    if manifest is None:
        raise _fail(f"{conv_dir} has no {MANIFEST_NAME}: the conversion is incomplete (rerun convert to resume)")
    problems = check_files(conv_dir, manifest, hash_files=hash_files)
    if problems:
        raise _fail(f"output files do not match the manifest: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    options = OutputOptions.from_json(manifest.options, file=str(conv_dir / MANIFEST_NAME))
    target = options.target
    src = scan_source(source_dir, trust_root=trust_root)
    if src.fingerprint() != manifest.input_fingerprint:
        raise _fail("the source's headers and configs are not those this output was converted from (fingerprint differs)")
    spec = build_spec(src, options)
    try:
        conv = scan_source(conv_dir)
    except InputError as e:  # the output's index and shard headers disagree, a shard is unreadable...
        raise _fail(f"the converted folder is not a consistent checkpoint: {e}") from None
    _check_structure(spec, conv_dir, conv, model_card=manifest.model_card)
    conv_map = conv.tensor_file
    result = VerifyResult(source_label or str(source_dir), str(conv_dir), target.name, dev, note=note, files_hashed=len(manifest.files) if hash_files else 0)
    rng = random.Random(seed)
    src_r, conv_r = _Readers(src.headers), _Readers(conv.headers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nvfp4-verify")
    try:
        result.copied_tensors = _check_copied_tensors(spec, src_r, conv_r, conv_map)
        result.copied_groups = [
            {"prefix": g.prefix, "format": g.format, "experts": g.experts, "tensors": g.tensors, "identical": True}
            for g in spec.copied_groups.values()
        ]
        for layer in spec.layers.values():
            n = layer.dims.experts
            experts = list(range(n)) if not sample or sample >= n else sorted(rng.sample(range(n), sample))
            lr = _verify_layer(spec, layer, experts, src_r, conv_r, conv_map, dev, batch_bytes, pool)
            lr.sampled = experts if len(experts) < n else None
            result.layers.append(lr)
            if on_layer:
                on_layer(lr)
    finally:
        pool.shutdown(cancel_futures=True)
        src_r.close()
        conv_r.close()
    result.seconds = time.perf_counter() - t0
    return result
