"""Compressed block scales in a source checkpoint: which tensors are the streams of which scale, and
their decoded E4M3 matrix.

A ModelOpt checkpoint may declare ``weight_scale_encoding`` (``csf`` or ``csf_32x2_v1``: ``csf.py``)
in a config block, for the whole checkpoint, or in a ``quantized_layers`` entry, for that layer, and
store each such block scale ``<name>`` as ``<name>.<stream>`` tensors, as vLLM 0.34 reads them. The
converter reads such a scale as the E4M3 ``[rows, cols]`` matrix it decodes to, everywhere a plain
block scale would be read, and writes it plain. Found from headers and configs alone, and refused
with one line naming the encoding, scale or stream when it cannot be decoded exactly:

- an encoding the configs declare that is not one of :data:`csf.ENCODINGS`;
- streams of an encoding the configs do not declare (read from a folder; a plan from remote shard
  headers has no configs and goes by the stream names);
- a routed expert's ``weight_scale.<x>`` (or ``scale.<x>``) whose ``<x>`` is no known stream;
- a scale with streams of two encodings, a missing stream, or also a plain tensor of its name;
- a stream whose dtype or shape does not decode (the checks that need no content: ``decoded_shape``).

Content is checked as it is decoded (:meth:`EncodedScale.decode`), with every check of vLLM's
decoder.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import csf
from .errors import InputError
from .naming import UnknownExpertPart, parse_expert_name
from .quant_config import SCALE_ENCODING_KEY, declared_scale_encodings
from .safetensors_header import ShardHeader, TensorInfo

DECODED_DTYPE = "F8_E4M3"
_STREAM_LIKE = re.compile(r"^(?P<base>.+\.(?:weight_scale|scale))\.(?P<stream>[A-Za-z0-9_]+)$")


@dataclass(frozen=True)
class EncodedScale:
    """One compressed block scale: its name, encoding, streams and the matrix it decodes to."""

    encoding: str
    streams: dict[str, tuple[str, TensorInfo]]  # stream -> (shard file, tensor)
    info: TensorInfo  # the decoded scale: its name, F8_E4M3, [rows, cols] (offsets: none, 0..nbytes)
    first: str  # its stream that comes first in the checkpoint (where the decoded scale stands)

    @property
    def name(self) -> str:
        return self.info.name

    def decode(self, read: Callable[[str, str], Any]) -> np.ndarray:
        """The uint8 ``[rows, cols]`` matrix; ``read(file, tensor)`` gives a stream's bytes (a mapped
        view). ``InputError`` naming the stream that does not decode."""
        arrays = {}
        for s, (file, info) in self.streams.items():
            arrays[s] = np.frombuffer(read(file, info.name), dtype=csf.numpy_dtype(s)).reshape(info.shape)
        try:
            return csf.decode(self.encoding, arrays)
        except csf.StreamError as e:
            file, info = self.streams[e.stream]
            raise InputError(f"{self.encoding} block scale {self.name} does not decode: {e}", file=file, tensor=info.name) from None

    def describe(self) -> str:
        return f"{self.name} ({self.encoding}: {', '.join(self.streams)})"


def _declared(configs: dict[str, dict[str, Any]]) -> set[str]:
    known = set()
    for where, value in declared_scale_encodings(configs):
        if value is None:  # as vLLM reads it: not compressed
            continue
        if not isinstance(value, str) or value not in csf.ENCODINGS:
            raise InputError(
                f"{where} declares {SCALE_ENCODING_KEY} {value!r}: nvfp4-fuse decodes only "
                f"{' and '.join(csf.ENCODINGS)} exactly, and does not read compressed block scales as plain",
                file=where.split()[0],
            )
        known.add(value)
    return known


def _is_expert(name: str) -> bool:
    try:
        return parse_expert_name(name) is not None
    except UnknownExpertPart:
        return False


def find_encoded_scales(
    headers: dict[str, ShardHeader], tensor_file: dict[str, str], configs: dict[str, dict[str, Any]], *, configs_read: bool = True
) -> dict[str, EncodedScale]:
    """Every compressed block scale of a checkpoint, by the scale's name, in the order of its first
    stream; ``InputError`` for anything that cannot be decoded exactly (see the module notes)."""
    declared = _declared(configs)
    found: dict[str, dict[str, tuple[str, TensorInfo]]] = {}
    for name, file in tensor_file.items():
        base, _, stream = name.rpartition(".")
        if stream not in csf.STREAM_ENCODING:
            m = _STREAM_LIKE.match(name)
            if m and (m["base"].endswith(".weight_scale") or _is_expert(m["base"])) and m["base"] not in tensor_file:
                raise InputError(
                    f"{m['stream']!r} is no block-scale stream nvfp4-fuse knows (it decodes "
                    f"{SCALE_ENCODING_KEY} {' and '.join(csf.ENCODINGS)}); refusing rather than reading the scale as plain",
                    file=file,
                    tensor=name,
                )
            continue
        found.setdefault(base, {})[stream] = (file, headers[file].tensors[name])
    out: dict[str, EncodedScale] = {}
    for base, streams in found.items():
        first_file, first = next(iter(streams.values()))
        encodings = sorted({csf.STREAM_ENCODING[s] for s in streams})
        if len(encodings) > 1:
            raise InputError(f"block scale {base} has streams of two encodings ({', '.join(encodings)})", file=first_file, tensor=first.name)
        enc = encodings[0]
        if base in tensor_file:
            raise InputError(f"block scale {base} is stored both plain and as {enc} streams", file=tensor_file[base], tensor=base)
        missing = [s for s in csf.ENCODINGS[enc] if s not in streams]
        if missing:
            raise InputError(f"{enc} block scale {base} lacks its {', '.join(missing)} stream", file=first_file, tensor=first.name)
        if configs_read and enc not in declared:
            raise InputError(
                f"{enc} streams of block scale {base}, but no {SCALE_ENCODING_KEY} in the configs declares {enc}",
                file=first_file,
                tensor=first.name,
            )
        ordered = {s: streams[s] for s in csf.ENCODINGS[enc]}
        try:
            rows, cols = csf.decoded_shape(enc, {s: i.dtype for s, (_, i) in ordered.items()}, {s: i.shape for s, (_, i) in ordered.items()})
        except csf.StreamError as e:
            file, info = ordered[e.stream]
            raise InputError(f"{enc} block scale {base} does not decode: {e}", file=file, tensor=info.name) from None
        out[base] = EncodedScale(enc, ordered, TensorInfo(base, DECODED_DTYPE, (rows, cols), 0, rows * cols), first.name)
    return out
