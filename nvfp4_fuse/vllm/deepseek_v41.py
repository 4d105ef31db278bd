"""DeepSeek-V4.1 (``DeepseekV41ForCausalLM``) on ``deep_gemm_mega_moe`` with NVFP4 routed experts.

vLLM 0.33 and 0.34 have DeepSeek-V4's failure in V4.1 too: V4.1's ``DeepseekV4MoE`` subclasses
V4's and inherits ``_init_mega_moe_experts``, which builds ``MEGA_MOE_MXFP4``, and V4.1's own
backbone ``load_weights`` looks every mapped name up with ``params_dict[name_mapped]``, so an
NVFP4 checkpoint fails with ``KeyError: 'layers.0.ffn.experts.w13_input_scale'``.

vLLM's V4.1 class is a vision-language wrapper: ``DeepseekV41ForCausalLM`` holds the text model as
``language_model`` (``DeepseekV41LLMForCausalLM``, backbone ``language_model.model``) and maps
checkpoint names (``layers.N...``, as in V4) itself. The fixes are V4's, from
:mod:`nvfp4_fuse.vllm.deepseek_v4`: the model is built inside :func:`~.deepseek_v4.building`'s
scope (NVFP4 layers get ``MEGA_MOE_NVFP4`` through the same wrap of
``DeepGemmMegaMoEExperts.__init__``), and the checkpoint stream passes through
:func:`~.deepseek_v4.nvfp4_weights` (fused tensors copied into the backbone's experts, per-expert
w1/w3 input scales dropped) before vLLM's own ``load_weights`` sees it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import vllm.models.deepseek_v41.nvidia.vl_model as _v41
from vllm.config import VllmConfig

from .deepseek_v4 import building, nvfp4_weights

# Where the text backbone sits in the wrapper (the prefix of its parameters' names).
BACKBONE = "language_model.model"


class DeepseekV41ForCausalLM(_v41.DeepseekV41ForCausalLM):
    """vLLM's DeepSeek-V4.1, with NVFP4 routed experts on ``deep_gemm_mega_moe``; any other
    checkpoint or backend builds exactly as vLLM's class does."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        with building(vllm_config, "DeepSeek-V4.1"):
            super().__init__(vllm_config=vllm_config, prefix=prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        fused_loaded: set[str] = set()
        loaded = super().load_weights(nvfp4_weights(self.language_model.model, weights, fused_loaded))
        return loaded | {f"{BACKBONE}.{name}" for name in fused_loaded}
