"""Serve a fused checkpoint through vLLM's own per-expert weight loaders.

A fused (``nvfp4-fuse/v2``) checkpoint of any target holds, per expert module ``P``, stacked
tensors ``P.w13_weight`` ... ``P.w2_input_scale`` (``targets.py``). vLLM reads them as they are
only on ``deep_gemm_mega_moe`` with target ``mega-moe`` (``fused.py``). Everywhere else (the
per-expert NVFP4 backends, where DeepSeek-V4 builds ``ModelOptNvFp4FusedMoE`` parameters through
``_init_fused_moe_experts``: FlashInfer CuteDSL, MoE-EP CuteDSL, CUTLASS, TRTLLM, vLLM CUTLASS,
Marlin; and MegaMoE with a ``vllm-fused`` or ``linear`` checkpoint) each expert's tensors are
recovered from the fused layout and handed, under their per-expert checkpoint names
(``P.<e>.w1.weight``, ``.weight_scale``, ``.weight_scale_2``, ``.input_scale``), to vLLM's
DeepSeek-V4 loader, which maps them and calls the experts module's own ``weight_loader`` exactly
as for a per-expert checkpoint. vLLM's post-processing then runs as it always does.

What each expert gets back, by inverting the target's parts (``layout.py``, numpy, per expert):

- w1 (gate) and w3 (up) values ``U8 [I, H/2]``: ``target.rows.split_np`` of its w13 rows; w2
  ``[H, I/2]`` as stored;
- E4M3 block scales ``[I, H/16]`` (w1, w3) and ``[H, I/16]`` (w2): ``target.scales.natural_np``
  (the unswizzle, or the MegaMoE word unpacking and UTCCP inverse), then the row split;
- ``weight_scale_2``: ``target.scale_2.split`` of the per-expert value (merged by max: both halves
  get it; the smaller half's block scales were rescaled by the converter, so this is the source
  with its gate/up ``weight_scale_2`` merged);
- ``input_scale``: w13's is one value per expert (the max of gate and up), given to both w1 and w3;
  w2's as stored.

Each rank reads only the rows of the logical experts it holds (one slice ``source[e0:e1]`` per run
of consecutive experts; safetensors' views read nothing else), except the per-expert scalars a
loader keeps for every expert: the input scales on backends with global scale factors
(``ModelOptNvFp4FusedMoE.use_global_sf``: FlashInfer CUTLASS/TRTLLM/CuteDSL/B12X keep them
``[E_global, 2]`` and ``[E_global]``), and ``w2_input_scale`` on MegaMoE (its L2 activation scale
is the max over all experts): ``4 E`` bytes each.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..naming import FUSED_PARTS
from ..targets import LayerDims, Target
from .fused import FusedCheckpointError, logical_runs

_SAFETENSORS_NAMES = {
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float8_e4m3fn: "F8_E4M3",
}
_VALUE_DTYPES = frozenset({"I8", "U8"})  # packed E2M1 bytes, declared either way (PackedValues)


@dataclass(frozen=True)
class WantedExperts:
    """The logical experts one rank's experts module loads from a checkpoint."""

    num_logical: int
    local: tuple[int, ...]  # logical experts with a slot on this rank, ascending
    every_expert: frozenset[str]  # fused fields whose every expert the module's loader keeps
    unread: frozenset[str] = frozenset()  # fused fields the module has no parameter for

    def for_field(self, field: str) -> tuple[int, ...]:
        if field in self.unread:
            return ()
        return tuple(range(self.num_logical)) if field in self.every_expert else self.local


def expert_runs(experts: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending logical experts as ``[e0, e1)`` runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for e in experts:
        if out and out[-1][1] == e:
            out[-1] = (out[-1][0], e + 1)
        else:
            out.append((e, e + 1))
    return out


def wanted_experts(experts: Any) -> WantedExperts:
    """Which logical experts ``experts`` (a vLLM ``DeepGemmMegaMoEExperts`` or ``RoutedExperts``)
    loads: those of its own slots, as vLLM's initial EPLB placement gives them (physical expert
    ``p`` holds logical ``p % E``), plus every expert for the scalars its loader keeps globally,
    and nothing of what it has no parameter for."""
    from vllm.model_executor.layers.fused_moe import deep_gemm_mega_moe as mega

    if isinstance(experts, mega.DeepGemmMegaMoEExperts):
        if experts.weight_format is not mega.MEGA_MOE_NVFP4:
            raise FusedCheckpointError(
                f"nvfp4-fuse: {experts.prefix} was built {experts.weight_format.name}, but the checkpoint's "
                "experts are fused NVFP4; the checkpoint config must say moe_quant_algo NVFP4"
            )
        n = experts.num_logical_experts
        local = {e + k for _, e, count in logical_runs(experts.experts_start_idx, experts.num_local_experts, n)
                 for k in range(count)}
        # NVFP4 MegaMoE quantizes L1 activations per token: no w13_input_scale to read.
        return WantedExperts(n, tuple(sorted(local)), frozenset({"w2_input_scale"}), frozenset({"w13_input_scale"}))

    from vllm.distributed.eplb.eplb_state import EplbState

    method = getattr(experts, "quant_method", None)
    if not hasattr(experts, "w13_weight_scale_2") or not hasattr(experts, "expert_map_manager"):
        raise FusedCheckpointError(
            f"nvfp4-fuse: {getattr(experts, 'layer_name', type(experts).__name__)} holds "
            f"{type(method).__name__} experts, not vLLM's per-expert NVFP4 (ModelOptNvFp4FusedMoE) parameters; "
            "a fused NVFP4 checkpoint loads only into NVFP4 experts"
        )
    n = experts.moe_config.num_logical_experts
    physical = experts.global_num_experts
    to_logical = EplbState.build_initial_global_physical_to_logical_map(n, physical - n)
    local = {to_logical[p] for p in range(physical) if experts.expert_map_manager.is_local_expert(p)}
    global_sf = bool(getattr(method, "use_global_sf", False))
    every = frozenset({"w13_input_scale", "w2_input_scale"}) if global_sf else frozenset()
    return WantedExperts(n, tuple(sorted(local)), every)


def _safetensors_dtype(source: Any) -> tuple[tuple[int, ...], str]:
    if isinstance(source, torch.Tensor):
        return tuple(source.shape), _SAFETENSORS_NAMES.get(source.dtype, str(source.dtype))
    return tuple(source.get_shape()), str(source.get_dtype())  # a safetensors slice handle


def check_fused_tensor(target: Target, dims: LayerDims, module: str, field: str, source: Any, name: str) -> None:
    """``FusedCheckpointError`` naming the tensor unless ``source`` has the shape and dtype target
    ``target`` writes for ``field`` (packed values: I8 or U8, the same bytes)."""
    want = {e.name.rsplit(".", 1)[1]: e for e in target.out_entries(module, dims)}[field]
    shape, dtype = _safetensors_dtype(source)
    ok_dtypes = _VALUE_DTYPES if want.dtype in _VALUE_DTYPES else {want.dtype}
    if shape != tuple(want.shape) or dtype not in ok_dtypes:
        raise FusedCheckpointError(
            f"nvfp4-fuse: {name}: {dtype} {list(shape)}, but target {target.name} of this layer "
            f"({dims.experts} experts, hidden {dims.hidden}, intermediate {dims.inter}) has "
            f"{'/'.join(sorted(ok_dtypes))} {list(want.shape)}"
        )


def _bytes(t: torch.Tensor) -> np.ndarray:
    """One expert's stored tensor as its uint8 bytes (numpy; a view where it can be)."""
    return t.contiguous().view(torch.uint8).numpy()


def _e4m3(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).view(torch.float8_e4m3fn)


def expert_tensors(target: Target, dims: LayerDims, module: str, field: str, stored: torch.Tensor, e: int
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """Expert ``e``'s per-expert checkpoint tensors held in ``stored`` (its row of fused ``field``)."""
    h, i = dims.hidden, dims.inter
    p = f"{module}.{e}"
    if field == "w13_weight":
        gate, up = target.rows.split_np(_bytes(stored))
        yield f"{p}.w1.weight", torch.from_numpy(np.ascontiguousarray(gate))
        yield f"{p}.w3.weight", torch.from_numpy(np.ascontiguousarray(up))
    elif field == "w2_weight":
        yield f"{p}.w2.weight", stored.view(torch.uint8)
    elif field == "w13_weight_scale":
        gate, up = target.rows.split_np(target.scales.natural_np(_bytes(stored), 2 * i, h))
        yield f"{p}.w1.weight_scale", _e4m3(gate)
        yield f"{p}.w3.weight_scale", _e4m3(up)
    elif field == "w2_weight_scale":
        yield f"{p}.w2.weight_scale", _e4m3(target.scales.natural_np(_bytes(stored), h, i))
    elif field == "w13_weight_scale_2":
        gate, up = target.scale_2.split(stored)
        yield f"{p}.w1.weight_scale_2", gate
        yield f"{p}.w3.weight_scale_2", up
    elif field == "w13_input_scale":
        # One value per expert, the max of the source's gate and up: both halves get it.
        yield f"{p}.w1.input_scale", stored
        yield f"{p}.w3.input_scale", stored
    elif field in ("w2_weight_scale_2", "w2_input_scale"):
        yield f"{p}.w2.{field.removeprefix('w2_')}", stored
    else:
        raise FusedCheckpointError(f"nvfp4-fuse: {module}.{field}: not a fused expert tensor ({', '.join(FUSED_PARTS)})")


def per_expert_tensors(target: Target, dims: LayerDims, module: str, field: str, source: Any,
                       wanted: WantedExperts, name: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The per-expert checkpoint tensors of fused tensor ``field`` of ``module`` for the experts a
    rank's loader wants, in expert order, reading ``source`` (a tensor or a safetensors slice
    handle) one run of consecutive experts at a time."""
    check_fused_tensor(target, dims, module, field, source, name or f"{module}.{field}")
    for e0, e1 in expert_runs(wanted.for_field(field)):
        chunk = source[e0:e1]
        for k in range(e1 - e0):
            yield from expert_tensors(target, dims, module, field, chunk[k], e0 + k)


def layer_experts(model: Any, module: str) -> Any:
    """The experts module whose ``weight_loader`` vLLM's DeepSeek-V4 loader calls for checkpoint
    expert module ``module`` (``layers.N.ffn.experts``): the MegaMoE experts, or the
    ``RoutedExperts`` inside the MoE runner the per-expert backends build."""
    from vllm.model_executor.layers.fused_moe import deep_gemm_mega_moe as mega

    parts = module.split(".")
    try:
        experts = model.layers[int(parts[1])].ffn.experts
    except (IndexError, ValueError, AttributeError):
        raise FusedCheckpointError(f"nvfp4-fuse: {module}: no such routed-experts module in this model") from None
    if isinstance(experts, mega.DeepGemmMegaMoEExperts):
        return experts
    for sub in experts.modules():
        if hasattr(sub, "expert_map_manager") and hasattr(sub, "w13_weight"):
            return sub
    return experts  # wanted_experts names what it is


class FusedPerExpertReader:
    """For one model: the per-expert tensors each layer's experts module loads, from fused ones."""

    def __init__(self, model: Any, target: Target | None):
        cfg = model.config
        self.model, self.target = model, target
        self.dims = LayerDims(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self._wanted: dict[str, WantedExperts] = {}

    def per_expert(self, module: str, field: str, source: Any, name: str) -> Iterator[tuple[str, torch.Tensor]]:
        if self.target is None:
            raise FusedCheckpointError(
                f"nvfp4-fuse: {name} is a fused expert tensor, but the checkpoint's quantization_config has "
                "no fused_experts block saying which layout it is in"
            )
        if module not in self._wanted:
            self._wanted[module] = wanted_experts(layer_experts(self.model, module))
        return per_expert_tensors(self.target, self.dims, module, field, source, self._wanted[module], name)
