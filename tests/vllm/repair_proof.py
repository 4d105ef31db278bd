"""The ``per-expert`` repair's proof against vLLM's own per-expert NVFP4 loading, for any model.

A per-expert NVFP4 checkpoint whose gate and up ``weight_scale_2`` differ, and its repaired form
(``convert --target per-expert``), are each loaded by stock vLLM (``ModelOptNvFp4FusedMoE``'s
weight loading, into ``RoutedExperts``). The loaded routed experts are then dequantized the way the
backend's epilogue uses them: ONE alpha per expert for all of w13, column 0 of
``w13_weight_scale_2`` (the gate's). ``process_weights_after_loading`` needs a GPU, so that step is
emulated here from its code, which every NVFP4 MoE backend goes through:

- vLLM 0.34.0 ``quantization/modelopt.py``, ``ModelOptNvFp4FusedMoE.process_weights_after_loading``,
  lines 1090-1098: warns "w1_weight_scale_2 must match w3_weight_scale_2. Accuracy may be affected."
  and keeps ``w13_weight_scale_2 = layer.w13_weight_scale_2[:, 0].contiguous()``;
- vLLM 0.33.0, the same method, lines 1055-1063, the same code.

Each loaded value (E2M1 code x E4M3 block scale x the gate's alpha) is compared with the source's
true value (source code x source block scale x that half's own ``weight_scale_2``). On the source the
up half comes out scaled by gate/up; on the repaired checkpoint every block of both halves is within
half an E4M3 step (the bound ``verify`` checks, ``verify.block_errors``) and the larger half is exact.

The comparison itself is engine-neutral, ``tests/repair_check.py`` (re-exported here); this module
adds vLLM's loading.
"""

from __future__ import annotations

from pathlib import Path

import harness
import torch
from repair_check import (
    ExpertErrors,
    ExpertNames,
    assert_up_half_off_by_gate_over_up,
    assert_within_half_an_e4m3_step,
    block_rel,
    epilogue_values,
    errors,
    true_values,
)

__all__ = [
    "ExpertErrors",
    "ExpertNames",
    "assert_up_half_off_by_gate_over_up",
    "assert_within_half_an_e4m3_step",
    "block_rel",
    "epilogue_values",
    "errors",
    "loaded_experts",
    "true_values",
]


def loaded_experts(folder: Path, backend: str, layers: int) -> list[torch.nn.Module]:
    """The routed experts (``RoutedExperts``) of each layer after stock vLLM loaded ``folder`` on
    ``backend``; parameters are poisoned first, so nothing left unwritten passes as loaded."""
    cfg = harness.engine_config(folder, backend=backend)
    model = harness.build(cfg)
    harness.poison_routed_experts(model)
    harness.load(model, cfg)
    out = [harness.routed_experts(model, n) for n in range(layers)]
    for experts in out:
        method = experts.quant_method
        assert type(method).__name__ == "ModelOptNvFp4FusedMoE", type(method)
        assert method.nvfp4_backend.value == backend.upper(), (method.nvfp4_backend, backend)
    return out
