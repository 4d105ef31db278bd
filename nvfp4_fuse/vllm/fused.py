"""Copy the stacked tensors of a fused (``nvfp4-fuse/v2``, target ``mega-moe``) checkpoint into one
EP rank's ``DeepGemmMegaMoEExperts`` parameters, as they are.

The contract, per expert module ``P`` with ``L`` logical (routed) experts, hidden ``H``,
intermediate ``I``: each tensor is what vLLM's NVFP4 MegaMoE parameter (unchanged from 0.33 to 0.34)
holds for all ``L`` experts, in the parameter's physical (storage) order:

=========================  ====================  ==========================================
``P.w13_weight``           I8 (or U8) [L, 2I, H/2]  gate/up rows interleaved by 8
``P.w13_weight_scale``     I32 [L, H/64, 2I]     storage of the MN-major parameter
                                                 ``zeros(L, H/64, 2I).transpose(-1, -2)``
``P.w13_weight_scale_2``   F32 [L]               one L1 global scale per expert
``P.w13_input_scale``      F32 [L]               not read: NVFP4 MegaMoE quantizes per token
``P.w2_weight``            I8 (or U8) [L, H, I/2]
``P.w2_weight_scale``      I32 [L, I/64, H]
``P.w2_weight_scale_2``    F32 [L]
``P.w2_input_scale``       F32 [L]               the L2 activation scale is the max over all
=========================  ====================  ==========================================

An EP rank owns physical experts ``[start, start + E_local)``; physical expert ``p`` holds logical
expert ``p % L``. That is vLLM's initial placement
(``EplbState.build_initial_global_physical_to_logical_map``: the ``L`` routed experts, then the
redundant ones ``i % L``) and what ``DeepGemmMegaMoEExperts._map_global_expert_id`` loads per-expert
checkpoints by. So a rank's logical experts are one contiguous range modulo ``L``: at most a few
runs of consecutive experts, each read with one slice ``source[e0:e1]`` and copied into the matching
local slots. Nothing else of the tensor is read: safetensors (0.8) hands vLLM's loader lazy
memory-mapped views, so slicing one reads only those bytes. The one full read is ``w2_input_scale``
(``4 L`` bytes), whose max over all experts every rank needs, as vLLM records it per-expert.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..naming import FUSED_PARTS as FUSED_FIELDS

# ``<module>.experts.<field>`` with no expert index: a fused tensor.
FUSED_NAME_RE = re.compile(r"^(?P<module>.*\.experts)\.(?P<field>" + "|".join(FUSED_FIELDS) + r")$")

_SAFETENSORS_DTYPES = {
    "I8": torch.int8,
    "U8": torch.uint8,
    "I32": torch.int32,
    "F32": torch.float32,
}


class FusedCheckpointError(ValueError):
    """A fused tensor that does not match what the experts module expects."""


def logical_runs(start: int, count: int, num_logical: int) -> list[tuple[int, int, int]]:
    """``(first local slot, first logical expert, length)`` runs covering local slots
    ``0 .. count - 1`` of a rank whose physical experts start at ``start``; slot ``j`` holds
    logical expert ``(start + j) % num_logical``."""
    runs: list[tuple[int, int, int]] = []
    j = 0
    while j < count:
        e = (start + j) % num_logical
        n = min(count - j, num_logical - e)
        runs.append((j, e, n))
        j += n
    return runs


def _shape_dtype(source: Any) -> tuple[tuple[int, ...], torch.dtype | str]:
    if isinstance(source, torch.Tensor):
        return tuple(source.shape), source.dtype
    shape = tuple(source.get_shape())  # safetensors PySafeSlice
    dt = source.get_dtype()
    return shape, _SAFETENSORS_DTYPES.get(dt, dt)


def expected(experts: Any, field: str) -> tuple[tuple[int, ...], tuple[torch.dtype, ...]]:
    """Shape and accepted dtypes of fused tensor ``field`` for ``experts``."""
    n = experts.num_logical_experts
    if field in ("w13_weight", "w2_weight"):
        return (n, *getattr(experts, field).shape[1:]), (torch.int8, torch.uint8)
    if field in ("w13_weight_scale", "w2_weight_scale"):
        _, rows, words = getattr(experts, field).shape
        return (n, words, rows), (torch.int32,)
    return (n,), (torch.float32,)


def load_fused_tensor(experts: Any, field: str, source: Any, name: str = "") -> str | None:
    """Copy this rank's experts of fused tensor ``field`` from ``source`` into ``experts``.

    ``source`` is anything sliced along its first dimension into a torch tensor: the tensor vLLM's
    weight iterator yields, or a safetensors ``get_slice`` handle. Returns the parameter name
    loaded, or ``None`` for ``w13_input_scale`` (no parameter; never read).
    """
    what = name or field
    if field not in FUSED_FIELDS:
        raise FusedCheckpointError(f"{what}: not a fused expert tensor")
    if experts.weight_format.name != "nvfp4":
        raise FusedCheckpointError(
            f"{what}: fused NVFP4 tensors, but {experts.prefix} was built "
            f"{experts.weight_format.name}; the checkpoint config must say moe_quant_algo NVFP4"
        )
    shape, dtype = _shape_dtype(source)
    want_shape, want_dtypes = expected(experts, field)
    if shape != want_shape or dtype not in want_dtypes:
        raise FusedCheckpointError(
            f"{what}: {dtype} {list(shape)}, but {experts.prefix} needs "
            f"{'/'.join(str(d) for d in want_dtypes)} {list(want_shape)} "
            f"({experts.num_logical_experts} experts, hidden {experts.hidden_size}, "
            f"intermediate {experts.intermediate_size})"
        )
    if field == "w13_input_scale":
        return None

    param = getattr(experts, field)
    for j, e, n in logical_runs(experts.experts_start_idx, experts.num_local_experts, experts.num_logical_experts):
        chunk = source[e : e + n]
        dst = param.data[j : j + n]
        if field.endswith("_weight"):
            dst.copy_(chunk.view(torch.int8))
        elif field.endswith("_weight_scale"):
            dst.transpose(-1, -2).copy_(chunk)  # the MN-major parameter's storage order
        else:
            dst.copy_(chunk)
    if field == "w2_input_scale":
        every = source[0 : experts.num_logical_experts]
        for e in range(experts.num_logical_experts):
            # vLLM's own bookkeeping, as for a per-expert checkpoint: it keeps every logical
            # expert's scale and sets l2_activation_scale to their max.
            experts._record_global_scale(f"{experts.prefix}.w2_input_scale", every[e], "w2", e)
    return field
