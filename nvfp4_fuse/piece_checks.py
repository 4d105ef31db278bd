"""The checks of output shards' pieces against their source, as a pass reads them (see
:mod:`~nvfp4_fuse.verify` for what each check proves, and :func:`~nvfp4_fuse.verify.check_shards`
for the pass that drives them)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .constants import NVFP4_BLOCK, S2_LIMIT
from .decode_lanes import DecodeJob, ReferenceLane, expert_shapes
from .encoded_scales import EncodedScale
from .experts import ExpertLayer
from .safetensors_header import ShardHeader
from .shard_reader import ShardReader
from .shard_writer import tensor_bytes
from .spec import COPY_CHUNK, OutputSpec, OutShard, OutTensor
from .verify_checks import fail, rescale_table, rescaled_half_problem, same
from .verify_result import LayerResult


@dataclass
class CheckedPiece:
    """``nbytes`` of output tensor ``tensor`` from byte ``start``; ``check`` (if any) runs on them."""

    tensor: OutTensor
    start: int
    nbytes: int
    check: Callable[[np.ndarray], None] | None


class _SourceReaders(dict):
    """The source's shard readers by file name, each opened on first use: a check of a few output
    shards opens only the source shards they were made from."""

    def __init__(self, headers: Mapping[str, ShardHeader]):
        super().__init__()
        self._headers = headers
        self._lock = threading.Lock()

    def __missing__(self, file: str) -> ShardReader:
        with self._lock:
            if file not in self:
                self[file] = ShardReader(self._headers[file])
            return dict.__getitem__(self, file)


class PieceChecker:
    """The checks of output shards' pieces against the source, as the pass reads them: copied tensors
    byte for byte, per-layer and per-expert scalars, packed values, block scales and their bound, and
    the end-to-end decode (the kernel's torch reference here on the CPU, or the GPU decode process of
    :mod:`~nvfp4_fuse.decode_process`). It holds read-only mappings
    of the source's shards and of the output shards in ``conv_headers`` (by file name), and gathers
    what it found in ``results`` and the counters; :func:`~nvfp4_fuse.verify.check_shards` drives it.

    An expert part whose values and block scales lie in two output shards is decoded with the shard
    of its scales when the values' shard is not among ``conv_headers`` (from the source's values,
    which the values' own check holds byte-identical to the output's), and with the values' shard
    otherwise: over any partition of the shards into calls, each part is decoded once."""

    def __init__(
        self,
        spec: OutputSpec,
        conv_headers: Mapping[str, ShardHeader],
        experts: dict[str, set[int]],
        decode: str | None,
        decoder: Any = None,
    ):
        self.spec, self.tgt = spec, spec.target
        # Both checkpoints are read through read-only mappings: pieces are compared and hashed in place
        # (no copy into user memory), and their pages are dropped from this process once done, so
        # resident memory stays at what is in flight; the page cache keeps them for whoever reads next.
        self.src_m = _SourceReaders(spec.source.headers)
        self.conv_m = {f: ShardReader(h) for f, h in conv_headers.items()}
        self.conv_map = {t: f for f, h in conv_headers.items() for t in h.tensors}
        self.experts = experts  # prefix -> experts to check
        self.decode = decode  # None, or the device the end-to-end compare runs on
        self.results = {p: LayerResult(p, l.dims.experts, rescaled=l.rescaled_experts) for p, l in spec.layers.items()}
        self.copied = 0
        self.decoded = 0  # compressed block scales outside the expert groups, checked decoded
        self.block_rel: dict[tuple[str, str, int], float] = {}  # largest block error of each checked expert part
        self.decoded_rel: dict[tuple[str, str, int], float] = {}  # end to end, rescaled expert parts
        self.stop = threading.Event()  # set when a check failed: the other shards' streams end early
        self._lock = threading.Lock()
        self.channel = None  # the GPU decode process's channel (decode "cuda")
        if decode == "cuda":
            decoder.warm(self.tgt.scales, expert_shapes(spec))
            self.channel = decoder.channel(self._decoded, self.stop.set)
        self._globals = {p: self.tgt.global_tensors(p, l.scalars) for p, l in spec.layers.items()}
        self.on_bytes: Callable[[str, int], None] | None = None  # progress: (shard, bytes done), from the streams

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        for m in (*self.src_m.values(), *self.conv_m.values()):
            m.close()

    # -- reading --------------------------------------------------------------------------------
    def src(self, layer: ExpertLayer, e: int, role: str, fld: str) -> np.ndarray:
        """One source tensor of an expert, mapped (read-only) and held until :meth:`release_src`; a
        compressed block scale is decoded instead (a new array: nothing stays held)."""
        ref = layer.ref(e, role, fld)
        if ref.encoded is not None:
            return self.decoded_src(ref.encoded)
        return self.src_m[ref.file].held_array(ref.info.name).reshape(ref.info.shape)

    def release_src(self, layer: ExpertLayer, e: int, role: str, fld: str) -> None:
        ref = layer.ref(e, role, fld)
        if ref.encoded is None:
            self.src_m[ref.file].release_tensor(ref.info.name)

    def decoded_src(self, enc: EncodedScale) -> np.ndarray:
        """A compressed source block scale, decoded from its mapped streams (released once read)."""
        held: list[tuple[ShardReader, str]] = []

        def read(file: str, name: str) -> np.ndarray:
            held.append((self.src_m[file], name))
            return held[-1][0].held_array(name)

        try:
            return enc.decode(read)
        finally:
            for m, name in held:
                m.release_tensor(name)

    def conv_expert(self, layer: ExpertLayer, name: str, e: int) -> tuple[ShardReader, int, int]:
        """The reader of a stacked output tensor, and where expert ``e``'s bytes sit in it (start,
        count)."""
        m = self.conv_m[self.conv_map[name]]
        per = m.header.tensors[name].nbytes // layer.dims.experts
        return m, e * per, per

    # -- pieces, in file order --------------------------------------------------------------------
    def pieces(self, shard: OutShard) -> Iterator[CheckedPiece]:
        for t in shard.tensors:
            n = t.entry.nbytes
            if t.kind == "copy":
                for start in range(0, n, COPY_CHUNK):
                    yield CheckedPiece(t, start, min(COPY_CHUNK, n - start), self._copy_check(t, start))
            elif t.kind == "decoded":
                yield CheckedPiece(t, 0, n, self._decoded_check(t))
            elif t.kind == "global":
                yield CheckedPiece(t, 0, n, self._global_check(t))
            elif t.kind == "scalar":
                yield CheckedPiece(t, 0, n, self._scalar_check(t))
            elif t.kind == "expert":
                assert t.layer is not None and t.part is not None and t.expert is not None
                check = self._one_expert_check(self.spec.layers[t.layer], t.part, t.expert) if t.expert in self.experts[t.layer] else None
                yield CheckedPiece(t, 0, n, check)
            else:
                assert t.layer is not None and t.part is not None
                layer = self.spec.layers[t.layer]
                per = n // layer.dims.experts
                for e in range(layer.dims.experts):
                    yield CheckedPiece(t, e * per, per, self._expert_check(layer, t.part, e) if e in self.experts[t.layer] else None)

    def _copy_check(self, t: OutTensor, start: int) -> Callable[[np.ndarray], None]:
        def check(got: np.ndarray) -> None:
            assert t.source is not None
            m = self.src_m[t.source.file]
            want = m.held_array(t.source.info.name, start, got.size)
            if not same(got, want):
                at = start + int(np.flatnonzero(got != want)[0])
                raise fail(f"{t.entry.name} is not byte-identical to the source (first difference at byte {at})")
            m.release_tensor(t.source.info.name, start, got.size)
            if start == 0:
                with self._lock:
                    self.copied += 1

        return check

    def _decoded_check(self, t: OutTensor) -> Callable[[np.ndarray], None]:
        def check(got: np.ndarray) -> None:
            assert t.source is not None and t.source.encoded is not None
            want = self.decoded_src(t.source.encoded).reshape(-1)
            if not same(got, want):
                at = int(np.flatnonzero(got != want)[0])
                raise fail(
                    f"{t.entry.name} is not the source's {t.source.encoded.encoding} block scale decoded "
                    f"(first difference at byte {at})"
                )
            with self._lock:
                self.decoded += 1

        return check

    def _global_check(self, t: OutTensor) -> Callable[[np.ndarray], None]:
        def check(got: np.ndarray) -> None:
            assert t.layer is not None
            want = self._globals[t.layer][t.entry.name]
            if bytes(got) != bytes(tensor_bytes(want)):
                raise fail(f"{t.entry.name} differs from the values derived from the source scales")

        return check

    def _scalar_check(self, t: OutTensor) -> Callable[[np.ndarray], None]:
        """A per-expert target's weight_scale_2 or input_scale: the bytes of the source scalar the
        rules pick (the larger of gate and up; for a repaired input scale, the rule's)."""

        def check(got: np.ndarray) -> None:
            assert t.source is not None and t.layer is not None and t.part is not None and t.expert is not None
            want = self.src_m[t.source.file].read_small(t.source.info.name)
            if bytes(got) != want:
                role, fld = t.part.split(".")
                layer = self.spec.layers[t.layer]
                how = " (repaired: missing or zero in the source)" if t.expert in layer.repaired_input_scales.get(role, ()) and fld == "input_scale" else ""
                raise fail(f"{t.entry.name} is not the {fld} the source's scales give{how} ({t.source.info.name})")

        return check

    def _one_expert_check(self, layer: ExpertLayer, part: str, e: int) -> Callable[[np.ndarray], None]:
        """A per-expert target's values (``<role>.weight``) or block scales (``<role>.weight_scale``)."""
        role, fld = part.split(".")
        if fld == "weight":
            return lambda got: self._one_values(layer, role, e, got)
        return lambda got: self._one_scales(layer, role, e, got)

    def _one_values(self, layer: ExpertLayer, role: str, e: int, got: np.ndarray) -> None:
        src = self.src(layer, e, role, "weight").reshape(-1)
        if not same(got, src):
            row = (layer.dims.inter if role == "down" else layer.dims.hidden) // 2
            k = int(np.flatnonzero(got != src)[0])
            raise fail(f"{self._out_name(layer, e, role, 'weight')}: packed bytes differ from the source at [{k // row}, {k % row}]")
        if self.decode and self._is_open(self._out_name(layer, e, role, "weight_scale")):
            self._decode(layer, f"{role}.weight", e, got)
        self.release_src(layer, e, role, "weight")

    def _one_scales(self, layer: ExpertLayer, role: str, e: int, got: np.ndarray) -> None:
        rows, cols = (layer.dims.hidden, layer.dims.inter) if role == "down" else (layer.dims.inter, layer.dims.hidden)
        worst = self._half_scales(layer, f"{role}.weight_scale", role, e, got.reshape(rows, cols // NVFP4_BLOCK), self._out_name(layer, e, role, "weight_scale"))
        with self._lock:
            self.block_rel[(layer.prefix, f"{role}.weight_scale", e)] = worst
            res = self.results[layer.prefix]
            res.max_rel = max(res.max_rel, worst)
            if role == "down":
                res.checked += 1
        if self.decode and not self._is_open(self._out_name(layer, e, role, "weight")):
            self._decode_from_source(layer, f"{role}.weight", e)

    def _part_name(self, prefix: str, part: str, e: int) -> str:
        """The output tensor a decoded part is read from: ``<prefix>.<part>`` stacked, or a per-expert
        target's own tensor."""
        if "." not in part:
            return f"{prefix}.{part}"
        role, fld = part.split(".")
        return self._out_name(self.spec.layers[prefix], e, role, fld)

    @staticmethod
    def _out_name(layer: ExpertLayer, e: int, role: str, fld: str) -> str:
        from .per_expert import out_name

        return out_name(layer, e, role, fld)

    def _expert_check(self, layer: ExpertLayer, part: str, e: int) -> Callable[[np.ndarray], None]:
        if part in ("w13_weight", "w2_weight"):
            return lambda got: self._values(layer, part, e, got)
        return lambda got: self._scales(layer, part, e, got)

    # -- per-expert checks ------------------------------------------------------------------------
    def _halves(self, layer: ExpertLayer, part: str, got: np.ndarray) -> dict[str, np.ndarray]:
        """One expert's packed values by role, flat, the row order undone (:meth:`RowOrder.split_np`:
        views where each half is one run of rows, else copies)."""
        if part == "w2_weight":
            return {"down": got}
        gate, up = self.tgt.rows.split_np(got.reshape(2 * layer.dims.inter, -1))
        return {"gate": gate.reshape(-1), "up": up.reshape(-1)}

    def _values_equal(self, layer: ExpertLayer, part: str, e: int, got: np.ndarray) -> bool:
        """Whether the output's packed values are the source's in the target's row order, compared in
        place: one memcmp a half where it is one run of rows; for groups of rows alternating between
        gate and up, each half as a strided view of 8-byte words (no gather copy)."""
        if part == "w2_weight":
            return same(got, self.src(layer, e, "down", "weight").reshape(-1))
        d = layer.dims
        row = d.hidden // 2
        src = {role: self.src(layer, e, role, "weight").reshape(-1) for role in ("gate", "up")}
        alt = self.tgt.rows.alternating_groups(d.inter)
        if alt is None:
            return all(same(half, src[role]) for role, half in self._halves(layer, part, got).items())
        first, g = alt
        if g == d.inter:
            return same(got[: g * row], src[first[0]]) and same(got[g * row :], src[first[1]])
        width = g * row
        if width % 8:
            return all(same(half, src[role]) for role, half in self._halves(layer, part, got).items())
        words = got.view(np.uint64).reshape(d.inter // g, 2, width // 8)
        return all(np.array_equal(words[:, k], src[role].view(np.uint64).reshape(d.inter // g, width // 8)) for k, role in enumerate(first))

    def _values(self, layer: ExpertLayer, part: str, e: int, got: np.ndarray) -> None:
        """Packed values: the output's rows are the source's, in the target's row order."""
        if not self._values_equal(layer, part, e, got):
            row = (layer.dims.hidden if part == "w13_weight" else layer.dims.inter) // 2
            for role, conv in self._halves(layer, part, got).items():
                src = self.src(layer, e, role, "weight").reshape(-1)
                if not same(conv, src):
                    k = int(np.flatnonzero(conv != src)[0])
                    raise fail(f"{layer.prefix}.{part}: expert {e} {role} packed bytes differ from the source at [{k // row}, {k % row}]")
            raise AssertionError("packed values compared unequal, then equal")
        if self.decode and self._is_open(f"{layer.prefix}.{part}_scale"):
            self._decode(layer, part, e, got)
        for role in ("down",) if part == "w2_weight" else ("gate", "up"):
            self.release_src(layer, e, role, "weight")

    def _natural_scales(self, layer: ExpertLayer, part: str, stored: np.ndarray) -> dict[str, np.ndarray]:
        """One expert's stored scales, layout and row order undone: role -> uint8 [rows, K/16]. The
        layout is undone by the target's numpy inverse (a view or one strided copy), the gate/up row
        order by :meth:`RowOrder.split_np`."""
        d = layer.dims
        w13 = part.startswith("w13")
        rows, cols = (2 * d.inter, d.hidden) if w13 else (d.hidden, d.inter)
        nat = self.tgt.scales.natural_np(stored, rows, cols)
        if not w13:
            return {"down": nat}
        gate, up = self.tgt.rows.split_np(nat)
        return {"gate": gate, "up": up}

    def _scale_2(self, layer: ExpertLayer, role: str, e: int) -> tuple[float, float, float]:
        """(source scale_2, output scale_2, rescale ratio) of one expert's half."""
        part = "w2" if role == "down" else "w13"
        out = self._globals[layer.prefix][f"{layer.prefix}.{part}_weight_scale_2"]
        c = float(out[e]) if out.ndim == 1 else float(out[e, 0 if role == "gate" else 1])
        s2 = float(layer.scalars[f"{role}.weight_scale_2"][e])
        ratio = 1.0 if role == "down" else float((layer.ratio_gate if role == "gate" else layer.ratio_up)[e])
        return s2, c, ratio

    def _half_scales(self, layer: ExpertLayer, part: str, role: str, e: int, nat: np.ndarray, where: str) -> float:
        """One half's natural block scales against the source's: the same bytes where it was copied,
        else the RNE rescale, every block within the bound. Returns its largest relative error."""
        src = self.src(layer, e, role, "weight_scale")
        s2, c, ratio = self._scale_2(layer, role, e)
        worst = 0.0
        if ratio == 1.0:  # a copied half: the same bytes and the same scale_2
            if not same(np.ascontiguousarray(nat).reshape(-1), src.reshape(-1)):
                r, k = (int(i[0]) for i in np.nonzero(nat != src))
                raise fail(f"{where}: expert {e} {role} block scale at [{r}, {k}] differs from the source's")
            if s2 != c:
                raise fail(f"{where}: expert {e} {role} is a copied half but its scale_2 changed ({s2} -> {c})")
        else:
            # The RNE rescale is a function of the byte: worked out for all 256 (no torch: the CPU path
            # imports none; tests hold the table to the torch reference).
            table = rescale_table(ratio)
            rel, problem = rescaled_half_problem(src, nat, table, s2, c)
            if problem is not None:
                raise fail(f"{where}: expert {e} {role} block scale {problem}")
            worst = rel
        self.release_src(layer, e, role, "weight_scale")
        return worst

    def _scales(self, layer: ExpertLayer, part: str, e: int, got: np.ndarray) -> None:
        p = layer.prefix
        worst = 0.0
        for role, nat in self._natural_scales(layer, part, got).items():
            worst = max(worst, self._half_scales(layer, part, role, e, nat, f"{p}.{part}"))
        with self._lock:
            self.block_rel[(p, part, e)] = worst
            res = self.results[p]
            res.max_rel = max(res.max_rel, worst)
            if part == "w2_weight_scale":
                res.checked += 1
        values = part.removesuffix("_scale")
        if self.decode and not self._is_open(f"{p}.{values}"):
            self._decode_from_source(layer, values, e)

    def _is_open(self, name: str) -> bool:
        """Whether output tensor ``name`` lies in a shard this checker reads."""
        return name in self.conv_map

    def _decode_from_source(self, layer: ExpertLayer, part: str, e: int) -> None:
        """:meth:`_decode` of values ``part`` from the shard of its block scales, when the values lie in
        a shard this checker does not read: the source's values, in the output's row order, stand in
        for the output's, which the values' own check holds byte-identical to them."""
        roles = ("gate", "up") if part == "w13_weight" else ("down",) if part == "w2_weight" else (part.split(".")[0],)
        src = {r: self.src(layer, e, r, "weight") for r in roles}
        if part == "w13_weight":
            half = (layer.dims.inter, -1)
            values = self.tgt.rows.join_np(src["gate"].reshape(half), src["up"].reshape(half)).reshape(-1)
        else:
            values = src[roles[0]].reshape(-1)
        try:
            self._decode(layer, part, e, values)
        finally:
            for r in roles:
                self.release_src(layer, e, r, "weight")

    def _decode(self, layer: ExpertLayer, part: str, e: int, values: np.ndarray) -> None:
        """End to end: dequantize the expert of both checkpoints with the compare kernel (the values
        are the output's, just found byte-identical to the source's); a rescaled half's result is held
        against the largest error its block scales allow once the pass has checked them
        (:meth:`check_decoded`). On the CPU the kernel's torch reference runs here. On the GPU the
        decode rides along the pass in a process of its own: the worker sends where the part's bytes
        lie and goes on with its next check (see :mod:`~nvfp4_fuse.decode_process`)."""
        assert self.decode is not None
        self._launch(layer, part, e, values)

    def finish_decode(self) -> None:
        """Once the pass is over: every decode sent to the GPU process run and judged; raises the first
        failure of a decode."""
        if self.channel is not None:
            self.channel.finish()

    def _operand_name(self, layer: ExpertLayer, part: str, e: int) -> str:
        """The output tensor holding expert ``e``'s ``part`` (see :meth:`_operand`)."""
        if "." not in part:
            return f"{layer.prefix}.{part}"
        role, fld = part.split(".")
        return self._out_name(layer, e, role, fld)

    def _operand(self, layer: ExpertLayer, part: str, e: int) -> tuple[str, ShardReader, int, int]:
        """Where expert ``e``'s ``part`` (values, or with ``_scale`` its block scales) sits in the
        output: tensor name, its reader, start and count. A stacked part (``w13_weight``) is a slice
        of ``<prefix>.<part>``; a per-expert one (``gate.weight``) a whole tensor."""
        name = self._operand_name(layer, part, e)
        if "." not in part:
            return (name, *self.conv_expert(layer, name, e))
        m = self.conv_m[self.conv_map[name]]
        return name, m, 0, m.header.tensors[name].nbytes

    def _launch(self, layer: ExpertLayer, part: str, e: int, values: np.ndarray) -> None:
        """The decode of :meth:`_decode`: its inputs gathered (views of both checkpoints, held) into a
        :class:`DecodeJob`, run at once by the CPU reference or sent to the GPU process (which reads
        the bytes from the files itself: the holds end once the job is sent)."""
        assert self.decode is not None
        d = layer.dims
        w13 = part == "w13_weight"
        roles: tuple[str, ...] = ("gate", "up") if w13 else (part.split(".")[0],) if "." in part else ("down",)
        rows, cols = (2 * d.inter, d.hidden) if w13 else (d.hidden, d.inter) if roles == ("down",) else (d.inter, d.hidden)
        sname, m, start, n = self._operand(layer, f"{part}_scale", e)
        held_src: list[str] = []
        held_out = False

        def release() -> None:
            # Both sides' scales were read here, maybe after their own checks had dropped them: drop them
            # again (only the pages go).
            if held_out:
                m.release_tensor(sname, start, n)
            for r in held_src:
                self.release_src(layer, e, r, "weight_scale")

        release = _once(release)
        try:
            s2 = {r: self._scale_2(layer, r, e) for r in roles}  # (source, output, ratio)
            if self.decode == "cuda" and max(abs(v) for r in roles for v in s2[r][:2]) >= S2_LIMIT:
                raise fail(f"{layer.prefix}.{part}: expert {e} has a scale_2 too large for the compare kernel")
            # Source block scales (natural layout, a half each for w13, put in the output's row order by
            # the lane), the output's scales as stored, and both sides' scale_2 (gate's, then up's).
            a_scales = []
            for r in roles:
                a_scales.append(self.src(layer, e, r, "weight_scale"))
                held_src.append(r)
            stored = m.held_array(sname, start, n)  # small; hashed later, in order, by its own piece
            held_out = True
            last = roles[-1]
            job = DecodeJob(
                rows=rows,
                cols=cols,
                values=values,
                a_scales=tuple(a_scales),
                row_perm=self.tgt.rows.permutation(d.inter) if w13 else None,
                b_stored=stored,
                layout=self.tgt.scales,
                s2=(s2[roles[0]][0], s2[last][0], s2[roles[0]][1], s2[last][1]),
                first_rows=(self.tgt.rows.permutation(d.inter) < d.inter) if w13 else None,
                release=release,
            )
            key = (layer.prefix, part, e, all(s2[r][2] == 1.0 for r in roles))
        except BaseException:
            release()
            raise
        if self.channel is not None:
            self.channel.submit(key, job, self.stop)  # releases the job's holds
        else:
            ReferenceLane(self._decoded).launch(key, job)

    def _decoded(self, key: tuple[str, str, int, bool], stats: Any) -> None:
        """The read-back statistics (n_diff, nonfinite, max_abs, max_rel) of one decoded expert part."""
        p, part, e, copied = key
        n_diff, nonfinite, mabs, mrel = int(stats[0]), bool(stats[1]), float(stats[2]), float(stats[3])
        if nonfinite:
            raise fail(f"{self._part_name(p, part, e)}: expert {e} decodes to NaN or Inf")
        if copied and n_diff:
            raise fail(f"{self._part_name(p, part, e)}: expert {e} should decode bit-identically but {n_diff} values differ")
        with self._lock:
            if not copied:
                self.decoded_rel[(p, part, e)] = mrel
            res = self.results[p]
            res.max_abs = max(res.max_abs or 0.0, mabs)
            if part in ("w2_weight", "down.weight"):
                res.decoded += 1

    def check_decoded(self) -> None:
        """Each rescaled expert decoded no further from the source than its block scales allow (each
        fp32 product rounds once): the end-to-end result against the per-block one."""
        for (p, part, e), mrel in self.decoded_rel.items():
            bound = self.block_rel[(p, f"{part}_scale", e)]
            if mrel > bound * (1 + 2**-20) + 2**-22:
                raise fail(
                    f"{self._part_name(p, part, e)}: expert {e} decodes {100 * mrel:.4g}% off the source, more than its block scales "
                    f"allow ({100 * bound:.4g}%)"
                )


def _once(fn: Callable[[], None] | None) -> Callable[[], None]:
    """``fn`` (if any) made safe to call more than once: it runs the first time only."""
    done = threading.Lock()

    def run() -> None:
        if fn is not None and done.acquire(blocking=False):
            fn()

    return run
