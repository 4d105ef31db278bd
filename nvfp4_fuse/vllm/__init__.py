"""vLLM plugin: serve NVFP4 DeepSeek-V4 and V4.1 checkpoints on ``--moe-backend deep_gemm_mega_moe``.

Installed with ``pip install nvfp4-fuse[vllm]``; vLLM finds it through the ``vllm.general_plugins``
entry point ``nvfp4_fuse`` and calls :func:`register` in every process before a model is built
(``VLLM_PLUGINS`` filters plugins by that name).

It serves both per-expert NVFP4 checkpoints (NVIDIA's and canada-quant's DeepSeek-V4 recipes) and
the fused ones ``nvfp4-fuse convert`` writes (layout ``nvfp4-fuse/v2``: target ``mega-moe`` as it is
on MegaMoE; any target on any NVFP4 MoE backend through vLLM's per-expert loader). What it changes
in vLLM, and why, is in :mod:`nvfp4_fuse.vllm.deepseek_v4` (V4.1: :mod:`nvfp4_fuse.vllm.deepseek_v41`);
those modules are imported only when vLLM builds such a model. The vLLM releases it serves, and what
differs between them, are in :mod:`nvfp4_fuse.vllm.versions`.

Importing this package does not import vLLM, so the converter keeps working without it.
"""

from __future__ import annotations

import logging
from importlib import metadata

from .versions import release_for, supported_names

# The architectures the plugin serves, and its class for each.
MODEL_CLASSES = {
    "DeepseekV4ForCausalLM": "nvfp4_fuse.vllm.deepseek_v4:DeepseekV4ForCausalLM",
    "DeepseekV41ForCausalLM": "nvfp4_fuse.vllm.deepseek_v41:DeepseekV41ForCausalLM",
}

logger = logging.getLogger("vllm.plugins.nvfp4_fuse")


def vllm_version() -> str:
    return metadata.version("vllm")


def supported(version: str) -> bool:
    """Whether ``version`` is a vLLM release in :data:`versions.RELEASES` (0.33.x, 0.34.x; dev and
    local builds of them included)."""
    return release_for(version) is not None


def register() -> bool:
    """The ``vllm.general_plugins`` entry point. Points vLLM's ``DeepseekV4ForCausalLM`` and
    ``DeepseekV41ForCausalLM`` architectures at the plugin's subclasses (:data:`MODEL_CLASSES`;
    lazily: nothing is imported until such a model is built). On a vLLM not in :mod:`.versions`, or a platform whose
    DeepSeek-V4 is not vLLM's NVIDIA implementation, it logs one line and changes nothing.
    Returns whether it registered. Safe to call more than once."""
    version = vllm_version()
    if not supported(version):
        logger.warning(
            "nvfp4-fuse: vLLM %s is not one this plugin was written against (%s); "
            "it changes nothing (NVFP4 DeepSeek-V4 on deep_gemm_mega_moe stays as vLLM has it).",
            version,
            supported_names(),
        )
        return False

    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        logger.info(
            "nvfp4-fuse: platform %s runs vLLM's own DeepSeek-V4 (MegaMoE is NVIDIA-only); "
            "the plugin changes nothing.",
            current_platform.device_name,
        )
        return False

    from vllm import ModelRegistry

    for architecture, model_class in MODEL_CLASSES.items():
        ModelRegistry.register_model(architecture, model_class)
    return True
