"""Build the installed vLLM's (0.33.0 or 0.34.0) real DeepSeek-V4 model on this CPU machine and load checkpoints into it the
way ``vllm serve`` does (EngineArgs -> VllmConfig, the model registry, DefaultModelLoader).

What has to be stubbed, because it is GPU-only, and nothing else:

- ``check_deep_gemm_mega_moe_supported``: raises unless an SM100 GPU is present;
- ``_select_dsv4_attn_cls`` (V4's and V4.1's): the sparse-MLA attention kernels are CUDA-only
  (attention is not what is tested; a placeholder module stands in);
- ``torch.cuda.Stream``: the model makes three aux CUDA streams;
- ``fp8.init_fp8_linear_kernel``: there is no CPU kernel for the FP8 block-scaled linears;
- ``modelopt.init_nvfp4_linear_kernel``: nor for NVFP4 linears (a real ModelOpt export quantizes
  attention too); the stand-in kernel says it takes no pre-quantized input, all ``create_weights``
  asks of it;
- ``DeepGemmMegaMoEExperts._kernel_fuses_shared_experts``: asks DeepGEMM's Python API (not
  importable here) whether the kernel takes a shared expert; it says yes, as a current DeepGEMM does,
  so the shared expert is fused as on an SM100 host;
- ``get_ep_group`` in the DeepSeek-V4 model module, to simulate one rank of an EP group: vLLM's
  ``DeepseekV4MoE._init_mega_moe_experts`` computes that rank's experts from its size and rank;

and on the per-expert NVFP4 backends (``flashinfer_cutedsl``, ``flashinfer_moe_ep_cutedsl``, ...),
where DeepSeek-V4 builds ``ModelOptNvFp4FusedMoE`` parameters through ``_init_fused_moe_experts``:

- ``is_supported_config`` of the backend's kernel classes: they refuse a device that is not a
  Blackwell GPU; vLLM's own backend selection (``select_nvfp4_moe_backend``) runs otherwise;
- ``FusedMoEParallelConfig.make``: the same EP rank of the same EP size, for ``RoutedExperts``.

``process_weights_after_loading`` is CUDA-only on those backends, so parameters are compared right
after ``load_weights``. What one release needs beyond that is in :data:`CONFIG_STAND_INS`, keyed by
minor version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
import vllm.model_executor.layers.fused_moe.deep_gemm_mega_moe as dg
import vllm.models.deepseek_v4.nvidia.model as dsv4
import vllm.models.deepseek_v41.nvidia.model as dsv41
import vllm.models.deepseek_v41.nvidia.vl_model as dsv41_vl
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.engine.arg_utils import EngineArgs

_distributed = False

VLLM_MINOR = ".".join(version("vllm").split(".")[:2])


@contextlib.contextmanager
def _has_triton():
    # 0.34's CPU platform refuses x86 without triton-cpu while it checks the config
    # (platforms/cpu.py check_and_update_config); no Triton kernel runs in these tests.
    with mock.patch("vllm.triton_utils.HAS_TRITON", True):
        yield


# What each tested vLLM release needs around ``EngineArgs.create_engine_config`` on this CPU host.
CONFIG_STAND_INS = {"0.33": contextlib.nullcontext, "0.34": _has_triton}

# What stock vLLM's DeepSeek-V4.1 loader does with a fused expert tensor (a name it has no mapping
# for): 0.33 fails on an unset local (``name_mapped``); 0.34 sets it first and skips the tensor
# without a word, leaving the experts unloaded.
STOCK_V41_FUSED_ERROR = {"0.33": UnboundLocalError, "0.34": None}


class _CudaQuantChoice:
    """vLLM's platform object, except that it says CUDA to ``get_quantization_config``: on a CUDA
    host ``deepseek_v4_fp8`` is V4.1's ``DeepseekV4FP8Config`` (the V4 one extended to claim
    ``deepseek_v41``) for both models; on this CPU host it would be V4's, which V4.1 falls back
    from to a plain ``Fp8Config``."""

    def __init__(self, platform):
        self._platform = platform

    def is_cuda(self) -> bool:
        return True

    def __getattr__(self, name):
        return getattr(self._platform, name)


@contextlib.contextmanager
def config_stand_ins():
    """The stand-ins needed while vLLM builds or checks a ``VllmConfig``: the CUDA host's choice of
    quantization config class, and what this release needs (``CONFIG_STAND_INS``)."""
    import vllm.model_executor.layers.quantization as quantization

    with (
        mock.patch.object(quantization, "current_platform", _CudaQuantChoice(quantization.current_platform)),
        CONFIG_STAND_INS[VLLM_MINOR](),
    ):
        yield


class PlaceholderAttention(torch.nn.Module):
    def __init__(self, vllm_config, prefix: str = "", **kwargs):
        super().__init__()


MEGA = "deep_gemm_mega_moe"
# Per-expert NVFP4 backends the tests build DeepSeek-V4 on: vLLM's recommended one for NVFP4
# DeepSeek-V4 (global activation scales) and the MoE-EP megakernel (per-expert ones).
PER_EXPERT_BACKENDS = ("flashinfer_cutedsl", "flashinfer_moe_ep_cutedsl")


def engine_config(folder: Path, *, redundant: int = 0, mtp: bool = False, backend: str = MEGA) -> VllmConfig:
    kw = {}
    if json.loads((Path(folder) / "config.json").read_text()).get("model_type") == "deepseek_v41":
        # V4.1 is a vision-language model; with no images its tower is not built (the tiny
        # checkpoints have none), as `vllm serve --limit-mm-per-prompt '{"image": 0}'` does.
        kw["limit_mm_per_prompt"] = {"image": 0}
    if mtp:
        kw["speculative_config"] = {"method": "mtp", "num_speculative_tokens": 1}
    args = EngineArgs(
        model=str(folder),
        skip_tokenizer_init=True,
        moe_backend=backend,
        enable_expert_parallel=True,
        max_model_len=1024,
        enforce_eager=True,
        **kw,
    )
    with config_stand_ins():
        cfg = args.create_engine_config()
    cfg.parallel_config.eplb_config.num_redundant_experts = redundant
    if redundant and backend != MEGA:
        cfg.parallel_config.enable_eplb = True  # FusedMoE takes redundant experts only with EPLB
    _init_distributed(cfg)
    return cfg


def _init_distributed(cfg: VllmConfig) -> None:
    global _distributed
    if _distributed:
        return
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with set_current_vllm_config(cfg):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo"
        )
        initialize_model_parallel(1, 1)
    _distributed = True


def _kernel_classes(backend: str) -> list[type]:
    """The NVFP4 kernel classes vLLM picks among for ``--moe-backend backend`` (none for MegaMoE)."""
    if backend == MEGA:
        return []
    from vllm.model_executor.layers.fused_moe.oracle import nvfp4

    return list(nvfp4.backend_to_kernel_cls(nvfp4.map_nvfp4_backend(backend)))


@contextlib.contextmanager
def cpu_stand_ins(ep_size: int = 1, ep_rank: int = 0, backend: str = MEGA):
    from vllm.model_executor.layers.fused_moe.config import FusedMoEParallelConfig

    ep = SimpleNamespace(world_size=ep_size, rank_in_group=ep_rank)
    make = FusedMoEParallelConfig.make

    def moe_parallel_config(*args, **kwargs):
        real = make(*args, **kwargs)
        return dataclasses.replace(real, tp_size=1, tp_rank=0, ep_size=ep_size, ep_rank=ep_rank, use_ep=ep_size > 1)

    with contextlib.ExitStack() as stack:
        for patch in (
            mock.patch.object(dg, "check_deep_gemm_mega_moe_supported", lambda *a, **k: None),
            mock.patch.object(dsv4, "_select_dsv4_attn_cls", lambda cfg: PlaceholderAttention),
            mock.patch.object(dsv41, "_select_dsv4_attn_cls", lambda cfg: PlaceholderAttention),
            mock.patch.object(torch.cuda, "Stream", lambda *a, **k: None),
            mock.patch("vllm.model_executor.layers.quantization.fp8.init_fp8_linear_kernel", lambda *a, **k: None),
            mock.patch(
                "vllm.model_executor.layers.quantization.modelopt.init_nvfp4_linear_kernel",
                lambda *a, **k: SimpleNamespace(input_quant_key=lambda: None),
            ),
            mock.patch.object(dg.DeepGemmMegaMoEExperts, "_kernel_fuses_shared_experts", lambda self, spec: True),
            mock.patch.object(dsv4, "get_ep_group", lambda: ep),
            mock.patch.object(FusedMoEParallelConfig, "make", staticmethod(moe_parallel_config)),
            *(
                mock.patch.object(k_cls, "is_supported_config", staticmethod(lambda *a, **k: (True, None)))
                for k_cls in _kernel_classes(backend)
            ),
        ):
            stack.enter_context(patch)
        yield


def model_class(cfg: VllmConfig) -> type:
    """The class vLLM's registry gives for this config (its cache cleared, so a (un)registered
    plugin shows)."""
    from vllm.model_executor.model_loader import utils

    utils._MODEL_ARCH_BY_HASH.clear()
    return utils.get_model_architecture(cfg.model_config)[0]


# What vLLM's registry gives for DeepseekV4ForCausalLM on a CUDA host (on this CPU host its
# platform picker gives the CPU model, which has no MegaMoE).
STOCK = dsv4.DeepseekV4ForCausalLM
STOCK_V41 = dsv41_vl.DeepseekV41ForCausalLM


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack (``.layers``) of a DeepSeek-V4 or V4.1 (vision-language wrapper) model."""
    return model.language_model.model if hasattr(model, "language_model") else model.model


def build(cfg: VllmConfig, cls: type | None = None, *, ep_size: int = 1, ep_rank: int = 0) -> torch.nn.Module:
    """The model ``cls`` (default: the class vLLM's registry gives) built by vLLM's
    ``initialize_model`` for ``cfg``, on EP rank ``ep_rank`` of ``ep_size``."""
    from vllm.model_executor.model_loader.utils import initialize_model

    cfg.compilation_config.static_forward_context.clear()
    cls = cls or model_class(cfg)
    with cpu_stand_ins(ep_size, ep_rank, cfg.kernel_config.moe_backend):
        return initialize_model(vllm_config=cfg, model_class=cls)


def load(model: torch.nn.Module, cfg: VllmConfig) -> None:
    """Load the checkpoint of ``cfg`` into ``model`` as vLLM does: DefaultModelLoader's safetensors
    iterator (EP weight filter included) feeding ``model.load_weights``."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    with set_current_vllm_config(cfg):
        DefaultModelLoader(cfg.load_config).load_weights(model, cfg.model_config)


def experts_state(model: torch.nn.Module) -> dict[str, torch.Tensor | float]:
    """Every routed/shared expert parameter of every layer as raw bytes (uint8, storage order), plus
    the L2 activation scale bookkeeping, keyed by name."""
    out: dict[str, torch.Tensor | float] = {}
    for n, layer in enumerate(backbone(model).layers):
        experts = layer.ffn.experts
        for name, p in experts.named_parameters(recurse=False):
            data = p.data.transpose(-1, -2) if p.dim() == 3 and not p.is_contiguous() else p.data
            out[f"{n}.{name}"] = data.contiguous().view(torch.uint8).clone()
        if experts.weight_format.uses_nvfp4_api:
            out[f"{n}._w2_input_scales"] = experts._w2_input_scales.clone().view(torch.uint8)
            out[f"{n}.l2_activation_scale"] = experts.l2_activation_scale
    return out


def routed_experts(model: torch.nn.Module, n: int) -> torch.nn.Module:
    """Layer ``n``'s per-expert NVFP4 experts (``RoutedExperts`` inside vLLM's MoE runner), in any
    model whose decoder layers hold one MoE block."""
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts

    found = [m for m in backbone(model).layers[n].modules() if isinstance(m, RoutedExperts)]
    assert len(found) == 1, found
    return found[0]


def poison_routed_experts(model: torch.nn.Module, byte: int = 0xA5) -> None:
    """Fill every routed-expert parameter with ``byte``: rows no loader writes (vLLM leaves the
    redundant physical experts' global input scales unwritten) then hold the same bytes in every
    load instead of whatever ``torch.empty`` gave."""
    for n in range(len(backbone(model).layers)):
        for p in routed_experts(model, n).parameters(recurse=False):
            p.data.view(torch.uint8).fill_(byte)


def routed_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every routed-expert parameter of every layer as raw bytes, keyed by name."""
    return {
        f"{n}.{name}": p.data.contiguous().view(torch.uint8).clone()
        for n in range(len(backbone(model).layers))
        for name, p in routed_experts(model, n).named_parameters(recurse=False)
    }
