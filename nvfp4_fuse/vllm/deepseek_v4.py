"""DeepSeek-V4 on vLLM's (0.33, 0.34) ``deep_gemm_mega_moe`` backend with NVFP4 routed experts.

Imported lazily by vLLM's model registry (``register()`` in ``__init__.py`` points the
``DeepseekV4ForCausalLM`` architecture here), so nothing below runs unless that model is built.
What it changes, and why:

1. ``DeepseekV4ForCausalLM`` (subclass of vLLM's NVIDIA one, same name). Its ``__init__``
   (:func:`building`) checks the installed vLLM against :mod:`.versions`, the load strategy
   (``eager`` cannot read DeepSeek-V4's F8_E8M0 tensors) and the checkpoint's
   ``quantization_config`` (refusing a fused layout or target it does not know) and builds vLLM's
   model inside a scope that lets the experts format be chosen per layer. ``model_cls`` points at
   our ``DeepseekV4Model``.
2. ``DeepGemmMegaMoEExperts.__init__`` is wrapped, once: inside that scope only, a layer whose
   checkpoint experts are NVFP4 gets ``MEGA_MOE_NVFP4`` where vLLM's ``DeepseekV4MoE.
   _init_mega_moe_experts`` hard-codes ``MEGA_MOE_MXFP4``. Everything else that method does (EP
   placement, redundant experts, shared-expert fusion) is vLLM's. Outside the scope (another model,
   the MTP draft, a stock ``DeepseekV4ForCausalLM``) the wrapper passes straight through.
3. ``DeepseekV4Model`` (subclass, same name) overrides ``load_weights`` only, and only filters the
   stream of checkpoint tensors (:func:`nvfp4_weights`) before handing the rest to vLLM's
   ``load_weights``:
   - per-expert ``experts.E.w1/w3.input_scale`` of an NVFP4 MegaMoE layer are dropped: vLLM's loader
     maps them to ``experts.w13_input_scale``, a parameter NVFP4 MegaMoE does not have (it quantizes
     activations per token), and raised ``KeyError: 'layers.0.ffn.experts.w13_input_scale'``;
   - fused tensors (``layers.N.ffn.experts.w13_weight`` ...), for which vLLM's loader has no
     mapping: of target ``mega-moe`` on NVFP4 MegaMoE, copied by ``fused.load_fused_tensor``
     straight into the rank's parameters; otherwise (the per-expert NVFP4 backends, or another
     target) turned back into each expert's tensors by ``fused_per_expert`` and handed on, under
     their per-expert names, to vLLM's loader.

DeepSeek-V4.1 gets the same from :mod:`.deepseek_v41`, which shares :func:`building` and
:func:`nvfp4_weights`. The MTP draft model (``DeepSeekV4MTPModel``) is left to vLLM: both published recipes keep its
experts MXFP4, which vLLM builds and loads as they are. A config that says the MTP experts are NVFP4
is refused with a clear error instead of failing later on a tensor name.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import re
from collections.abc import Iterable, Iterator

import torch
import vllm.models.deepseek_v4.nvidia.model as _dsv4
from vllm.config import VllmConfig
from vllm.config.kernel import NATIVE_MEGA_MOE_BACKENDS
from vllm.model_executor.layers.fused_moe import deep_gemm_mega_moe as _mega
from vllm.model_executor.models.utils import extract_layer_index, is_pp_missing_parameter

from . import vllm_version
from .checkpoint import FUSED_TARGET, ExpertCheckpoint, checkpoint_module
from .fused import FUSED_NAME_RE, load_fused_tensor
from .fused_per_expert import FusedPerExpertReader
from .versions import mismatches, release_for

logger = logging.getLogger("vllm.plugins.nvfp4_fuse")

# Set while our DeepseekV4ForCausalLM builds vLLM's model: (checkpoint facts, num_hidden_layers).
_BUILDING: contextvars.ContextVar[tuple[ExpertCheckpoint, int] | None] = contextvars.ContextVar(
    "nvfp4_fuse_building_dsv4", default=None
)
# Per-expert w1/w3 activation scales, which NVFP4 MegaMoE has no parameter for.
_W13_INPUT_SCALE_RE = re.compile(r"\.experts\.\d+\.w[13]\.input_scale$")
# The decoder layer a checkpoint tensor name (relative to DeepseekV4Model) belongs to.
_LAYER_RE = re.compile(r"^layers\.(\d+)\.")


@functools.cache
def check_release() -> None:
    """Refuse, with one line, a vLLM whose code differs from what :mod:`.versions` records for its
    minor release (what this module relies on)."""
    version = vllm_version()
    release = release_for(version)
    if release is None:
        raise RuntimeError(f"nvfp4-fuse: vLLM {version} is not a release this plugin serves")
    diff = mismatches(release)
    if diff:
        raise RuntimeError(
            f"nvfp4-fuse: vLLM {version}'s DeepSeek-V4 code is not what the plugin's table says for "
            f"{release.name} (nvfp4_fuse/vllm/versions.py): {'; '.join(diff)}"
        )


@functools.cache
def eager_load_reads_e8m0() -> bool:
    """Whether safetensors' Python ``load()`` (what vLLM's ``--safetensors-load-strategy eager``
    calls on each whole file) knows the ``F8_E8M0`` dtype of DeepSeek-V4's FP8 block scales
    (safetensors 0.8 does not: ``KeyError: 'F8_E8M0'``)."""
    from safetensors.torch import load, save

    try:
        load(save({"s": torch.ones(1, dtype=torch.float8_e8m0fnu)}))
    except KeyError:
        return False
    return True


def check_load_strategy(vllm_config: VllmConfig) -> None:
    """Refuse, with one line, a load strategy that cannot read a DeepSeek-V4 checkpoint."""
    if vllm_config.load_config.safetensors_load_strategy == "eager" and not eager_load_reads_e8m0():
        import safetensors

        raise ValueError(
            "nvfp4-fuse: --safetensors-load-strategy eager cannot read DeepSeek-V4 checkpoints: "
            f"safetensors {safetensors.__version__}'s load() has no F8_E8M0 type (their FP8 block "
            "scales; vLLM would fail with KeyError: 'F8_E8M0'). Use the default or lazy (memory-"
            "mapped: each EP rank reads only its experts' rows of a fused checkpoint) or prefetch "
            "(reads the files ahead into the page cache, for network filesystems)."
        )


def routed_experts_format(prefix: str) -> _mega.MegaMoEWeightFormat | None:
    """The format for the MegaMoE experts at module ``prefix`` while our model is being built:
    ``MEGA_MOE_NVFP4`` where the checkpoint's experts are NVFP4, else ``None`` (vLLM's choice)."""
    building = _BUILDING.get()
    if building is None:
        return None
    info, num_hidden_layers = building
    module = checkpoint_module(extract_layer_index(prefix), num_hidden_layers)
    return _mega.MEGA_MOE_NVFP4 if info.experts_are_nvfp4(module) else None


def _wrap_experts_init() -> None:
    init = _mega.DeepGemmMegaMoEExperts.__init__
    if getattr(init, "__nvfp4_fuse__", False):
        return

    @functools.wraps(init)
    def __init__(self, vllm_config, **kwargs):
        if kwargs.get("weight_format") is _mega.MEGA_MOE_MXFP4:
            fmt = routed_experts_format(kwargs.get("prefix", ""))
            if fmt is not None:
                kwargs["weight_format"] = fmt
        init(self, vllm_config, **kwargs)

    __init__.__nvfp4_fuse__ = True  # type: ignore[attr-defined]
    _mega.DeepGemmMegaMoEExperts.__init__ = __init__


_wrap_experts_init()


def _nvfp4_mega_experts(model: torch.nn.Module, name: str) -> _mega.DeepGemmMegaMoEExperts | None:
    """The NVFP4 MegaMoE experts module that checkpoint tensor ``name`` belongs to, if any."""
    m = _LAYER_RE.match(name)
    if m is None or is_pp_missing_parameter(name, model):
        return None
    try:
        layer = model.layers[int(m[1])]
    except IndexError:
        return None
    experts = getattr(getattr(layer, "ffn", None), "experts", None)
    if isinstance(experts, _mega.DeepGemmMegaMoEExperts) and experts.weight_format is _mega.MEGA_MOE_NVFP4:
        return experts
    return None


def nvfp4_weights(
    backbone: torch.nn.Module, weights: Iterable[tuple[str, torch.Tensor]], fused_loaded: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensors ``weights`` (named as under ``backbone``: ``layers.N.ffn.experts...``)
    that vLLM's own loader is to see: fused ``mega-moe`` tensors are copied into ``backbone``'s
    NVFP4 MegaMoE experts here (their parameter names added to ``fused_loaded``); fused tensors of
    any other target, or on any other MoE backend, become each expert's tensors
    (:mod:`.fused_per_expert`) for vLLM's per-expert loader; the per-expert w1/w3 input scales of
    NVFP4 MegaMoE experts are dropped; everything else passes through. Shared by the DeepSeek-V4
    and V4.1 classes."""
    target = ExpertCheckpoint.from_hf_config(backbone.config).fused_target()
    reader = FusedPerExpertReader(backbone, target)
    for name, tensor in weights:
        m = FUSED_NAME_RE.match(name)
        if m is not None:
            if is_pp_missing_parameter(name, backbone):
                continue
            experts = _nvfp4_mega_experts(backbone, name)
            if experts is not None and (target is None or target.name == FUSED_TARGET):
                loaded = load_fused_tensor(experts, m["field"], tensor, name)
                if loaded is not None:
                    fused_loaded.add(f"{m['module']}.{loaded}")
                continue
            # Another backend, or another target: each expert's tensors, under their per-expert
            # names, to vLLM's loader (a MegaMoE layer's w1/w3 input scales are never produced).
            yield from reader.per_expert(m["module"], m["field"], tensor, name)
            continue
        if _W13_INPUT_SCALE_RE.search(name) and _nvfp4_mega_experts(backbone, name) is not None:
            continue
        yield name, tensor


class DeepseekV4Model(_dsv4.DeepseekV4Model):
    """vLLM's DeepSeek-V4 backbone; ``load_weights`` also takes fused expert tensors and skips the
    per-expert w1/w3 input scales NVFP4 MegaMoE has no parameter for."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        fused_loaded: set[str] = set()
        return super().load_weights(nvfp4_weights(self, weights, fused_loaded)) | fused_loaded


class DeepseekV4ForCausalLM(_dsv4.DeepseekV4ForCausalLM):
    """vLLM's DeepSeek-V4, with NVFP4 routed experts on ``deep_gemm_mega_moe`` (see the module
    docstring); any other checkpoint or backend builds exactly as vLLM's class does."""

    model_cls = DeepseekV4Model

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        with building(vllm_config, "DeepSeek-V4"):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


def building(vllm_config: VllmConfig, model_name: str) -> contextlib.AbstractContextManager:
    """Check what is to be served (vLLM release, load strategy, the checkpoint's fused layout and
    MTP experts against the MoE backend) and return the scope to build vLLM's model in: one in
    which NVFP4 layers get ``MEGA_MOE_NVFP4``, or a no-op where the plugin has nothing to do. Each
    refusal is one line. Shared by the DeepSeek-V4 and V4.1 classes."""
    check_release()
    check_load_strategy(vllm_config)
    hf_config = vllm_config.model_config.hf_config
    info = ExpertCheckpoint.from_hf_config(hf_config)
    info.check_layout()
    mega = vllm_config.kernel_config.moe_backend in NATIVE_MEGA_MOE_BACKENDS
    target = info.fused_target()
    if target is not None and not (mega and target.name == FUSED_TARGET):
        logger.info("nvfp4-fuse: fused checkpoint (target %s) on moe_backend %s: each expert's tensors "
                    "are recovered and loaded by vLLM's per-expert loader", target.name,
                    vllm_config.kernel_config.moe_backend)
    spec = vllm_config.speculative_config
    if mega and spec is not None and spec.method == "mtp":
        for k in range(getattr(hf_config, "num_nextn_predict_layers", 0) or 0):
            if info.experts_are_nvfp4(f"mtp.{k}.ffn.experts"):
                raise NotImplementedError(
                    f"nvfp4-fuse: the checkpoint config lists the MTP experts (mtp.{k}.ffn."
                    "experts) as NVFP4; with deep_gemm_mega_moe the plugin serves NVFP4 trunk "
                    "experts with MXFP4 MTP experts, as NVIDIA's (by default) and canada-quant's "
                    "recipes publish them. Serve without --speculative-config, or with a "
                    "checkpoint whose MTP experts are MXFP4."
                )
    if not (mega and info.has_nvfp4_experts):
        return contextlib.nullcontext()
    logger.info("nvfp4-fuse: %s routed experts use MegaMoE NVFP4%s", model_name,
                " (fused checkpoint)" if info.is_fused else "")
    return _building(info, hf_config.num_hidden_layers)


@contextlib.contextmanager
def _building(info: ExpertCheckpoint, num_hidden_layers: int):
    token = _BUILDING.set((info, num_hidden_layers))
    try:
        yield
    finally:
        _BUILDING.reset(token)
