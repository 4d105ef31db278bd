"""Tests of the vLLM plugin against the installed vLLM's own code (0.33.0 or 0.34.0), on the CPU.

They run in ``.venv-vllm-<minor>`` (``scripts/setup_vllm_env.sh VERSION``); in an interpreter without vLLM (the
main ``.venv``) this folder is not collected at all.
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest

# With tests/ on sys.path this very folder is an importable namespace package named "vllm", so
# ask for a real one (a regular package has an origin, its __init__.py).
_spec = importlib.util.find_spec("vllm")
if _spec is None or _spec.origin is None:
    collect_ignore_glob = ["*.py"]
else:
    # vLLM picks its platform at import: the CPU one here (there is no GPU).
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


@pytest.fixture
def seed() -> int:
    return random.randrange(2**31)


@pytest.fixture
def plugin():
    """vLLM's registry with the plugin loaded through vLLM's own ``load_general_plugins`` (the entry
    point found in this package's installed metadata), restored afterwards. The platform check is
    told CUDA, where vLLM's NVIDIA DeepSeek-V4 (the one with MegaMoE) is the one in use."""
    from unittest import mock

    import vllm.plugins
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    saved = dict(ModelRegistry.models)
    vllm.plugins.plugins_loaded = False
    try:
        with mock.patch.object(type(current_platform), "is_cuda", lambda self: True):
            vllm.plugins.load_general_plugins()
        yield ModelRegistry
    finally:
        ModelRegistry.models.clear()
        ModelRegistry.models.update(saved)
        vllm.plugins.plugins_loaded = False
