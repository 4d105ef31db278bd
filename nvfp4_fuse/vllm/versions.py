"""The vLLM releases this plugin serves, and what differs between them, in one table.

Pure Python (no vLLM import), so ``register()`` can decide from the version string alone whether
to act. Each entry says what the plugin relies on in that minor release's code; the DeepSeek
modules check the installed vLLM against its entry (:func:`mismatches`) when a model is built, so
a point release that moved something fails with one line instead of loading wrong. Serving a new
minor release is one more entry here, once its code has been read and ``tests/vllm`` passes on it
(``scripts/test.sh`` builds one venv per release in its ``VLLM_RELEASES`` list).

What the entries record (read from each wheel's ``vllm/models/deepseek_v4``, ``deepseek_v41``,
``fused_moe/deep_gemm_mega_moe.py`` and ``model_loader``):

- ``finalizes_during_load``: ``DeepseekV4ForCausalLM.finalizes_weights_during_load`` and whether
  its ``load_weights`` (and V4.1's text model's) calls ``process_weights_after_loading()`` itself
  (0.33: yes, and for V4 the loader's ``process_weights_after_loading`` calls the model hook once
  more, V4.1's wrapper skips it; 0.34: no, the loader's ``finalize_model_weights`` runs every
  module's hook once, children first). The plugin's classes
  subclass vLLM's and override neither, so they run each release's own sequence.
- ``post_load_hooks``: where the model-level post-load hook is run from, after ``load_weights``.
- ``mega_moe_init_args``: the keyword arguments ``DeepseekV4MoE._init_mega_moe_experts`` may pass to
  ``DeepGemmMegaMoEExperts.__init__`` (0.34 adds ``max_num_tokens``). The plugin's wrap of that
  constructor changes ``weight_format`` only and passes the rest on.

Read and found equal in both (so not in the table): the NVFP4 MegaMoE parameters ``fused.py`` copies
into (names, shapes, dtypes, storage order; ``_load_weight``, ``_pack_scale``,
``_kernel_layout_shard``, ``_record_global_scale``), ``DeepseekV4MoE._init_mega_moe_experts``
passing ``MEGA_MOE_MXFP4``, and ``DeepseekV4Model.load_weights``' ``params_dict[name_mapped]``.
``DefaultModelLoader``'s EP weight filter now also runs with EPLB on (0.34, by the initial EPLB
placement); a fused tensor has no expert index, so it passes either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Release:
    minor: tuple[int, int]
    finalizes_during_load: bool
    post_load_hooks: str
    mega_moe_init_args: frozenset[str]

    @property
    def name(self) -> str:
        return f"{self.minor[0]}.{self.minor[1]}"


_MEGA_MOE_ARGS_033 = frozenset(
    {"num_experts", "num_local_experts", "experts_start_idx", "top_k", "hidden_size", "intermediate_size",
     "activation", "weight_format", "prefix"}
)

RELEASES: dict[tuple[int, int], Release] = {
    r.minor: r
    for r in (
        Release(
            minor=(0, 33),
            finalizes_during_load=True,
            post_load_hooks="vllm.model_executor.model_loader.utils.process_weights_after_loading",
            mega_moe_init_args=_MEGA_MOE_ARGS_033,
        ),
        Release(
            minor=(0, 34),
            finalizes_during_load=False,
            post_load_hooks="vllm.model_executor.model_loader.weight_utils.finalize_model_weights",
            mega_moe_init_args=_MEGA_MOE_ARGS_033 | {"max_num_tokens"},
        ),
    )
}


def minor_of(version: str) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version)
    return (int(m[1]), int(m[2])) if m else None


def release_for(version: str) -> Release | None:
    """The table's entry for vLLM ``version`` (any point, dev or local build of a listed minor)."""
    minor = minor_of(version)
    return RELEASES.get(minor) if minor else None


def supported_names() -> str:
    return ", ".join(f"{r.name}.x" for r in RELEASES.values())


def mismatches(release: Release) -> list[str]:
    """What in the installed vLLM's code differs from ``release``'s entry (empty: it matches).
    Imports vLLM's DeepSeek-V4 and MegaMoE modules."""
    import importlib
    import inspect

    import vllm.models.deepseek_v4.nvidia.model as dsv4
    import vllm.models.deepseek_v41.nvidia.model as dsv41
    from vllm.model_executor.layers.fused_moe import deep_gemm_mega_moe as mega

    def runs_hook(load_weights, default: bool) -> bool:
        try:
            return "process_weights_after_loading()" in inspect.getsource(load_weights)
        except OSError:  # installed without sources
            return default

    out = []
    finalizes = getattr(dsv4.DeepseekV4ForCausalLM, "finalizes_weights_during_load", False)
    calls_hook = runs_hook(dsv4.DeepseekV4ForCausalLM.load_weights, finalizes)
    if (finalizes, calls_hook) != (release.finalizes_during_load,) * 2:
        out.append(
            f"DeepseekV4ForCausalLM finalizes_weights_during_load={finalizes}, load_weights runs the "
            f"post-load hook: {calls_hook} (vLLM {release.name} has {release.finalizes_during_load})"
        )
    v41_calls_hook = runs_hook(dsv41.DeepseekV41LLMForCausalLM.load_weights, release.finalizes_during_load)
    if v41_calls_hook != release.finalizes_during_load:
        out.append(
            f"DeepseekV41LLMForCausalLM.load_weights runs the post-load hook: {v41_calls_hook} "
            f"(vLLM {release.name}: {release.finalizes_during_load})"
        )
    module, _, func = release.post_load_hooks.rpartition(".")
    if not callable(getattr(importlib.import_module(module), func, None)):
        out.append(f"no {release.post_load_hooks}")
    params = set(inspect.signature(mega.DeepGemmMegaMoEExperts.__init__).parameters) - {"self", "vllm_config"}
    if not release.mega_moe_init_args <= params:
        out.append(
            "DeepGemmMegaMoEExperts.__init__ lacks "
            + ", ".join(sorted(release.mega_moe_init_args - params))
        )
    if not hasattr(mega, "MEGA_MOE_NVFP4") or not hasattr(mega.DeepGemmMegaMoEExperts, "_record_global_scale"):
        out.append("no MEGA_MOE_NVFP4 / DeepGemmMegaMoEExperts._record_global_scale")
    return out
