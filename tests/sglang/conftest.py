"""Tests against SGLang 0.5.23's own code on the CPU (``scripts/setup_sglang_env.sh`` builds
``.venv-sglang``); in an interpreter without SGLang (the main ``.venv``, the vLLM venvs) this folder
is not collected at all.

What is stood in for, and why (nothing else is):

- ``torchvision``: PyPI's Linux wheels of it are CUDA builds, which do not load against the CPU torch
  (``operator torchvision::nms does not exist``); SGLang's config package imports it at module level
  for multimodal image preprocessing (``multimodal/internvl_utils.py``), which nothing here calls.
  An empty package stands in for it, installed after transformers has looked for the real one (so
  transformers takes it as absent, as it is).
- ``modelopt_quant.get_platform().is_blackwell``: ``ModelOptNvFp4FusedMoEMethod.__init__`` refuses a
  device that is not a Blackwell GPU (``modelopt_quant.py`` 2369-2388); the tests tell it Blackwell
  (see ``sglang_code.blackwell``).
"""

from __future__ import annotations

import importlib.util

_spec = importlib.util.find_spec("sglang")
if _spec is None or _spec.origin is None:
    collect_ignore_glob = ["*.py"]
else:
    import standins

    standins.install()
