"""SGLang 0.5.23's own checkpoint detection and DeepSeek-V4 expert-name mapping, run on a folder.

- ``detect``: ``ModelConfig(folder)`` (``configs/model_config.py``: NVFP4 DeepSeek-V4 is recognised,
  ``nvfp4_moe_meta``, only when ``quantization_config`` has ``quant_algo: MIXED_PRECISION``,
  ``moe_quant_algo: NVFP4`` and a top-level ``group_size``, lines 774-794), then the loader's
  ``_get_quantization_config`` (``model_loader/loader.py`` 175-275: ``Fp8Config``, wrapped in
  ``HybridFp8NvFp4Config`` when ``nvfp4_moe_meta`` is set), then that config's
  ``get_quant_method`` for a routed-experts ``FusedMoE`` and the method's ``create_weights``: the
  parameters SGLang gives the layer's experts (name, shape, dtype).
- ``target``: where ``DeepseekV4ForCausalLM.load_weights`` sends one checkpoint tensor of a routed
  expert: ``remap_weight_name_to_dpsk_hf_format`` (``models/deepseek_v4.py`` 5113-5182: ``.w1.`` to
  ``.gate_proj.``, ``.ffn.`` to ``.mlp.``, an expert ``.scale`` to ``.weight_scale_inv``), then the
  expert branch of its loop (5414-5470: ``FusedMoE.make_expert_params_mapping``; a name whose
  resolved parameter does not exist is skipped without a word).
- ``load_experts``: every routed expert tensor sent there through the parameter's own
  ``weight_loader`` (``FusedMoE.weight_loader``), as ``load_weights`` calls it; ``gemm1_alpha``: the
  one alpha SGLang's single-alpha NVFP4 backends take for w13 (``_compute_gemm1_alphas``).

The ``FusedMoE`` is a bare instance (``FusedMoE.__init__`` needs SGLang's distributed state and
server args) given the attributes ``create_weights`` and ``weight_loader`` read: one rank of EP 1,
TP 1, no fused shared expert, no expert-location metadata, a gated runner config, and the weight
layout of the non-TRT-LLM backends.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch


@contextlib.contextmanager
def blackwell():
    """``ModelOptNvFp4FusedMoEMethod`` checks for a Blackwell GPU when it is made (see conftest)."""
    import sglang.srt.layers.quantization.modelopt_quant as mq

    with mock.patch.object(mq, "get_platform", lambda: SimpleNamespace(is_blackwell=True)):
        yield


@dataclass
class Detected:
    nvfp4_moe_meta: dict | None
    is_fp4_experts: bool | None
    quant_config: str
    moe_method: str
    # per routed layer n: {full parameter name: parameter}
    params: dict[str, torch.nn.Parameter]


def _experts_layer(quant_config, prefix: str, experts: int, hidden: int, inter: int):
    """A routed-experts ``FusedMoE`` of one rank of EP 1, TP 1, no fused shared expert, without
    SGLang's FlashInfer TRT-LLM weight layout (its CUTLASS backend's); parameters made by the quant
    method SGLang picks, each with the layer's own ``weight_loader``."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE

    layer = FusedMoE.__new__(FusedMoE)
    torch.nn.Module.__init__(layer)
    for k, v in {
        "moe_tp_size": 1, "moe_tp_rank": 0, "moe_ep_size": 1, "moe_ep_rank": 0, "layer_id": 0,
        "num_experts": experts, "num_local_experts": experts, "uses_expert_location": False,
        "_expert_storage_rank": 0, "_num_local_routed": experts, "_num_global_routed": experts,
        "_has_fused_shared": False, "num_fused_shared_experts": 0, "scheme": None,
        "use_flashinfer_trtllm_moe": False, "use_triton_kernels": False, "use_presharded_weights": False,
        "quant_config": quant_config,
        "moe_runner_config": SimpleNamespace(is_gated=True, intermediate_size_per_partition=inter),
    }.items():
        object.__setattr__(layer, k, v)
    with blackwell():
        layer.quant_method = quant_config.get_quant_method(layer, prefix)
    layer.quant_method.create_weights(
        layer, num_experts=experts, hidden_size=hidden, intermediate_size_per_partition=inter,
        params_dtype=torch.bfloat16, weight_loader=layer.weight_loader,
    )
    return layer


def _experts_params(quant_config, prefix: str, experts: int, hidden: int, inter: int) -> tuple[str, dict]:
    layer = _experts_layer(quant_config, prefix, experts, hidden, inter)
    return type(layer.quant_method).__name__, {f"{prefix}.{n}": p for n, p in layer.named_parameters()}


def load_experts(folder: Path, tensors: dict[str, torch.Tensor]) -> list[torch.nn.Module]:
    """Each trunk layer's routed experts after SGLang's own loading of ``tensors`` (the checkpoint's,
    by name): every name goes where ``target`` says, through the parameter's ``weight_loader``
    (``FusedMoE.weight_loader``) with its shard and expert id, as ``load_weights`` calls it.
    Parameters are poisoned first, so nothing left unwritten passes as loaded."""
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.loader import _get_quantization_config

    mc = ModelConfig(str(folder))
    qc = _get_quantization_config(mc, LoadConfig())
    cfg = mc.hf_config
    out = []
    for n in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{n}.mlp.experts"
        layer = _experts_layer(qc, prefix, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        for p in layer.parameters():
            p.data.view(torch.uint8).fill_(0xA5)
        params = {f"{prefix}.{k}": p for k, p in layer.named_parameters()}
        for name, t in tensors.items():
            if not name.startswith(f"layers.{n}.ffn.experts."):
                continue
            got = target(name, params, cfg.n_routed_experts)
            assert got is not None, name
            pname, x, shard = got
            params[pname].weight_loader(params[pname], t, pname, shard_id=shard, expert_id=x)
        out.append(layer)
    return out


def gemm1_alpha(experts: torch.nn.Module, x: int) -> torch.Tensor:
    """The weight part of expert ``x``'s GEMM1 alpha on SGLang's single-alpha backends:
    ``modelopt_quant._compute_gemm1_alphas`` (2336-2359) gives ``g1_alphas = w13_input_scale x
    w13_weight_scale_2[:, 0]``, run here with input scales of 1."""
    from sglang.srt.layers.quantization.modelopt_quant import _compute_gemm1_alphas

    s2 = experts.w13_weight_scale_2.data
    g1, _ = _compute_gemm1_alphas(s2, torch.ones(s2.shape[0]), True)
    return g1[x]


def detect(folder: Path) -> Detected:
    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.model_loader.loader import _get_quantization_config

    mc = ModelConfig(str(folder))
    qc = _get_quantization_config(mc, LoadConfig())
    cfg = mc.hf_config
    params: dict[str, torch.nn.Parameter] = {}
    methods = set()
    for n in range(cfg.num_hidden_layers):
        method, p = _experts_params(qc, f"model.layers.{n}.mlp.experts", cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        methods.add(method)
        params |= p
    assert len(methods) == 1, methods
    return Detected(mc.nvfp4_moe_meta, mc.is_fp4_experts, type(qc).__name__, methods.pop(), params)


def target(name: str, params: dict, experts: int) -> tuple[str, int, str] | None:
    """(parameter, expert id, shard id) that SGLang's DeepSeek-V4 loader loads checkpoint tensor
    ``name`` (a routed expert's) into, or None when it skips it."""
    from sglang.srt.layers.moe.fused_moe_triton import FusedMoE
    from sglang.srt.models.deepseek_v4 import DEEPSEEK_V4_STACKED_PARAMS_MAPPING, DeepseekV4ForCausalLM

    name = DeepseekV4ForCausalLM.remap_weight_name_to_dpsk_hf_format(name)
    for _, weight_name, _ in DEEPSEEK_V4_STACKED_PARAMS_MAPPING:
        # the stacked branch: an expert's name is never a parameter, so it moves on
        assert not (weight_name in name and name in params), name
    mapping = FusedMoE.make_expert_params_mapping(
        ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj", ckpt_up_proj_name="up_proj", num_experts=experts
    )
    for param_name, weight_name, expert_id, shard_id in mapping:
        if weight_name not in name:
            continue
        resolved = name.replace(weight_name, param_name)
        if resolved not in params:
            continue  # skip_unmaterialized_expert_param
        return resolved, expert_id, shard_id
    return None


def with_sglang_fields(folder: Path) -> None:
    """The fields a real DeepSeek-V4 config.json has that SGLang's own ``DeepSeekV4Config`` reads
    and the tiny sample leaves to transformers' defaults (SGLang's config class has none for them)."""
    import json

    from nvfp4_fuse.sample_dsv4 import V41_TEXT_DEFAULTS

    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    cfg = {**V41_TEXT_DEFAULTS, **cfg}
    cfg["compress_ratios"] = [0] * (cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"])
    p.write_text(json.dumps(cfg, indent=2))
