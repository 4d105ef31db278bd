"""vLLM plugin: serve NVFP4 DeepSeek-V4 checkpoints on ``--moe-backend deep_gemm_mega_moe``.

Installed with ``pip install nvfp4-fuse[vllm]``; vLLM finds it through the ``vllm.general_plugins``
entry point ``nvfp4_fuse`` and calls :func:`register` in every process before a model is built
(``VLLM_PLUGINS`` filters plugins by that name).

It serves both per-expert NVFP4 checkpoints (NVIDIA's and canada-quant's DeepSeek-V4 recipes) and
the fused ones ``nvfp4-fuse convert`` writes (layout ``nvfp4-fuse/v2``: target ``mega-moe`` as it is
on MegaMoE; any target on any NVFP4 MoE backend through vLLM's per-expert loader). What it
changes in vLLM, and why, is in :mod:`nvfp4_fuse.vllm.deepseek_v4`; that module is imported only
when vLLM builds a DeepSeek-V4 model.

Importing this package does not import vLLM, so the converter keeps working without it.
"""

from __future__ import annotations

import logging
import re
from importlib import metadata

SUPPORTED_VLLM = (0, 33)
ARCHITECTURE = "DeepseekV4ForCausalLM"
MODEL_CLASS = "nvfp4_fuse.vllm.deepseek_v4:DeepseekV4ForCausalLM"

logger = logging.getLogger("vllm.plugins.nvfp4_fuse")


def vllm_version() -> str:
    return metadata.version("vllm")


def supported(version: str) -> bool:
    """Whether ``version`` is a vLLM 0.33.x release (dev and local builds of it included)."""
    m = re.match(r"(\d+)\.(\d+)", version)
    return m is not None and (int(m[1]), int(m[2])) == SUPPORTED_VLLM


def register() -> bool:
    """The ``vllm.general_plugins`` entry point. Points vLLM's ``DeepseekV4ForCausalLM``
    architecture at :class:`nvfp4_fuse.vllm.deepseek_v4.DeepseekV4ForCausalLM` (lazily: nothing
    is imported until that model is built). On any vLLM other than 0.33.x, or a platform whose
    DeepSeek-V4 is not vLLM's NVIDIA implementation, it logs one line and changes nothing.
    Returns whether it registered. Safe to call more than once."""
    version = vllm_version()
    if not supported(version):
        logger.warning(
            "nvfp4-fuse: vLLM %s is not 0.33.x, which this plugin was written against; "
            "it changes nothing (NVFP4 DeepSeek-V4 on deep_gemm_mega_moe stays as vLLM has it).",
            version,
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

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    return True
