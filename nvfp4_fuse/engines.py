"""What each serving engine and MoE backend does with a checkpoint ``inspect`` has described: one table.

Every rule is a record: the engines and backends it holds for, the condition (in words, and as a test
of the inspect report's facts), the verdict it gives (``fails``, ``lossy``, or ``n/a`` when the
backend does not serve this kind of model), the message, and the source file and line it was read
from, in which release. A rule marked ``inferred`` was reasoned from the code (or, for TensorRT-LLM,
from the project's research notes) but not run; a source ending "run: tests/..." names the test that
runs the engine's own code for it; ``unknown`` says what was not read and does not gate
the exit code. For each engine and backend the verdict is the worst
of the rules that hold (``n/a`` first); with none, it loads the checkpoint as is.

Read from: vLLM 0.34.0 (wheel) and 0.33.0 (installed), SGLang 0.5.23 (wheel), this package's vLLM
plugin; TensorRT-LLM from the research notes (engines-and-hub.md 3.2, 2.2, 4: TRT-LLM PR 18772).
Paths are relative to the package (``vllm/``, ``sglang/srt/``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Facts = dict[str, Any]

VERDICT_ORDER = {"loads": 0, "unknown": 1, "lossy": 2, "fails": 3}  # "unknown" does not gate the exit code


@dataclass(frozen=True)
class Engine:
    id: str  # "vllm-0.34"
    name: str  # "vLLM 0.34.0"
    backend: str  # "flashinfer_cutlass"
    note: str = ""


VLLM_BACKENDS = (
    ("deep_gemm_mega_moe", "stock"),
    ("deep_gemm_mega_moe+plugin", "with nvfp4-fuse's plugin"),
    ("flashinfer_cutlass", ""),
    ("flashinfer_trtllm", ""),
    ("flashinfer_cutedsl", ""),
    ("flashinfer_moe_ep_cutedsl", "MoE-EP megakernel"),
    ("cutlass", "vLLM CUTLASS"),
    ("marlin", ""),
)
SGLANG_BACKENDS = ("flashinfer_trtllm", "flashinfer_cutlass", "flashinfer_cutedsl", "cutlass", "deep_gemm_megamoe", "marlin")
TRTLLM_BACKENDS = ("trtllm", "cutlass")

ENGINES: tuple[Engine, ...] = (
    *(Engine(f"vllm-{v}", f"vLLM {v}.0", b, n) for v in ("0.33", "0.34") for b, n in VLLM_BACKENDS),
    *(Engine("sglang-0.5.23", "SGLang 0.5.23", b) for b in SGLANG_BACKENDS),
    *(Engine("trtllm", "TensorRT-LLM", b) for b in TRTLLM_BACKENDS),
)


@dataclass(frozen=True)
class Rule:
    engines: tuple[str, ...]  # engine ids
    backends: tuple[str, ...]  # backends, or ("*",)
    when: str  # the condition, in words
    test: Callable[[Facts], bool]
    verdict: str  # "fails" | "lossy" | "unknown" | "n/a"
    message: Callable[[Facts], str]
    source: str  # file:line it was read from
    version: str  # the release read
    inferred: bool = False


V33, V34, VLLM = ("vllm-0.33",), ("vllm-0.34",), ("vllm-0.33", "vllm-0.34")
SGL, TRT = ("sglang-0.5.23",), ("trtllm",)
ANY = ("*",)
PER_EXPERT_VLLM = (
    "flashinfer_cutlass",
    "flashinfer_trtllm",
    "flashinfer_cutedsl",
    "flashinfer_moe_ep_cutedsl",
    "cutlass",
    "marlin",
)
GLOBAL_MAX_VLLM = ("flashinfer_cutlass", "flashinfer_trtllm", "flashinfer_cutedsl")  # amax over all experts
MEGA = ("deep_gemm_mega_moe", "deep_gemm_mega_moe+plugin")


def _x(r: float) -> str:
    return f"{r:.3g}x"


def _up_off(f: Facts) -> str:
    """'up half off by up to Rx in N experts' (the gate's scale kept: up scaled by gate/up)."""
    s = f["s"]
    lo, hi = s["up_factor_min"], s["up_factor_max"]
    worst = max(hi, 1 / lo) if lo > 0 else hi
    where = f"; worst {s['scale_2_worst_at']['prefix']} expert {s['scale_2_worst_at']['expert']}" if s["scale_2_worst_at"] else ""
    return (
        f"up half off by up to {_x(worst)} in {s['scale_2_pairs_differ']} experts "
        f"({s['scale_2_layers']} layers; gate's weight_scale_2 kept{where})"
    )


def _count(f: Facts, *keys: str) -> int:
    return sum(f["s"][k] for k in keys)


def _facts(report: dict[str, Any]) -> Facts:
    from .inspect import is_deepseek_v4

    cfg = report["config"]
    s = report["summary"]
    qa = str(cfg.get("quant_algo") or "").upper()
    moe = str(cfg.get("moe_quant_algo") or "").upper()
    nvfp4 = s["nvfp4_groups"] > 0
    fused = s["fused_groups"] > 0
    in_config = {k: cfg.get(f"{k}_from") == "config.json" for k in ("quant_algo", "moe_quant_algo", "group_size")}
    sglang_missing = [
        k
        for k, ok in (
            ("quant_algo: MIXED_PRECISION", qa == "MIXED_PRECISION" and in_config["quant_algo"]),
            ("moe_quant_algo: NVFP4", moe == "NVFP4" and in_config["moe_quant_algo"]),
            ("top-level group_size", cfg.get("group_size") is not None and in_config["group_size"]),
        )
        if not ok
    ]
    f: Facts = {
        "s": s,
        "cfg": cfg,
        "dsv4": is_deepseek_v4(cfg),
        "nvfp4": nvfp4,
        "fused": fused,
        "fused_target": (cfg.get("fused_experts") or {}).get("target"),
        "fused_by_us": cfg.get("fused_experts") is not None,
        "experts_any": nvfp4 or fused or s["mxfp4_groups"] > 0,
        # SGLang reads these from config.json's quantization_config only (hf_quant_config.json does not count)
        "sglang_detects_hybrid": not sglang_missing,
        "dsv4_moe_nvfp4": moe == "NVFP4",
        "csf": cfg.get("weight_scale_encoding"),
        "csf_streams": report["csf"]["streams"] > 0,
        "defects": [g["problem"] for g in report["groups"] if g.get("problem")] + report["problems"],
    }
    f["sglang_missing"] = sglang_missing
    return f


def _first_defect(f: Facts) -> str:
    more = len(f["defects"]) - 1
    return f["defects"][0] + (f" (and {more} more)" if more else "")


# fmt: off
RULES: tuple[Rule, ...] = (
    # ---------------------------------------------------------------- applicability
    Rule(VLLM, MEGA, "the model is not DeepSeek-V4 (only its model wires the native MegaMoE backend)",
         lambda f: not f["dsv4"], "n/a",
         lambda f: "DeepSeek-V4 only", "vllm/models/deepseek_v4/nvidia/model.py:228", "0.34.0"),
    Rule(SGL, ("deep_gemm_megamoe",), "the model is not DeepSeek-V4",
         lambda f: not f["dsv4"], "n/a", lambda f: "wired for DeepSeek-V4 here",
         "sglang/srt/layers/quantization/modelopt_quant.py:2650", "0.5.23", inferred=True),
    Rule(VLLM + SGL + TRT, ANY, "no routed-expert groups",
         lambda f: not f["experts_any"], "n/a", lambda f: "no routed experts found", "nvfp4_fuse/experts.py", "-"),
    # ---------------------------------------------------------------- structural defects
    Rule(VLLM + SGL + TRT, ANY, "an expert group is defective (incomplete, wrong dtype or shape, mixed formats)",
         lambda f: bool(f["defects"]), "fails",
         lambda f: f"checkpoint defect: {_first_defect(f)}", "nvfp4_fuse/experts.py (scan_experts)", "-", inferred=True),
    Rule(VLLM + SGL + TRT, ANY, "NVFP4 expert block scales are absent (and not CSF streams)",
         lambda f: f["s"]["block_scales_missing"] > 0, "fails",
         lambda f: f"{f['s']['block_scales_missing']} expert block scales absent: the parameters stay uninitialized",
         "vllm/model_executor/layers/quantization/modelopt.py:944 (create_weights: torch.empty)", "0.34.0", inferred=True),
    Rule(VLLM, ANY, "no quantization_config in config.json, and hf_quant_config.json lacks a field vLLM requires",
         lambda f: not f["cfg"]["has_quantization_config"] and bool(f["cfg"]["hf_quant_config_missing"]), "fails",
         lambda f: "ValueError: \"NVFP4 quantization requires the following fields in hf_quant_config.json: "
                   f"{f['cfg']['hf_quant_config_missing']}\"",
         "vllm/model_executor/layers/quantization/modelopt.py:846-858 (0.33.0: 818-830)", "0.34.0, 0.33.0"),
    # ---------------------------------------------------------------- fused checkpoints
    Rule(VLLM, ("deep_gemm_mega_moe", "flashinfer_cutlass", "flashinfer_trtllm", "flashinfer_cutedsl",
                "flashinfer_moe_ep_cutedsl", "cutlass", "marlin"),
         "experts are stored fused (stacked <prefix>.w13_weight ...), served by stock vLLM",
         lambda f: f["fused"], "fails",
         lambda f: "stacked expert tensors have no per-expert mapping in stock vLLM's loader (it expects "
                   "experts.<e>.w1/w3/w2); nvfp4-fuse's plugin reads them for DeepSeek-V4 and V4.1, on "
                   "deep_gemm_mega_moe and, each expert recovered, on every per-expert NVFP4 backend",
         "vllm/models/deepseek_v4/nvidia/model.py:1130-1160 (expert_mapping)", "0.34.0", inferred=True),
    Rule(VLLM, ("deep_gemm_mega_moe+plugin",), "fused without an nvfp4-fuse fused_experts block",
         lambda f: f["fused"] and not f["fused_by_us"], "fails",
         lambda f: "stacked expert tensors without a fused_experts block: not an nvfp4-fuse layout",
         "nvfp4_fuse/vllm/checkpoint.py:75", "this package", inferred=True),
    Rule(SGL + TRT, ANY, "experts are stored fused by nvfp4-fuse",
         lambda f: f["fused"], "fails",
         lambda f: "nvfp4-fuse's stacked layout is read only by its vLLM plugin; these load per-expert tensors",
         "sglang/srt/models/deepseek_v4.py:5440-5470 (expert_params_mapping)", "0.5.23", inferred=True),
    # ---------------------------------------------------------------- vLLM DeepGEMM MegaMoE
    Rule(VLLM, ("deep_gemm_mega_moe",), "DeepSeek-V4 with per-expert NVFP4 experts, stock vLLM",
         lambda f: f["nvfp4"], "fails",
         lambda f: "KeyError: 'layers.0.ffn.experts.w13_input_scale' (experts built MEGA_MOE_MXFP4)",
         "vllm/models/deepseek_v4/nvidia/model.py:391,1140 (0.33.0: 389,1130)", "0.34.0, 0.33.0"),
    Rule(VLLM, ("deep_gemm_mega_moe+plugin",), "per-expert gate/up weight_scale_2 differ",
         lambda f: f["nvfp4"] and f["s"]["scale_2_pairs_differ"] > 0, "fails",
         lambda f: f"ValueError: \"MegaMoE NVFP4 expert {f['s']['scale_2_worst_at']['expert']}: w1 weight_scale_2 ... != "
                   f"w3 weight_scale_2 ...; the kernel takes one L1 scale per expert.\" "
                   f"({f['s']['scale_2_pairs_differ']} experts; `nvfp4-fuse convert` reconciles them)",
         "vllm/model_executor/layers/fused_moe/deep_gemm_mega_moe.py:499-521 (_record_global_scale)", "0.33.0"),
    Rule(VLLM, ("deep_gemm_mega_moe+plugin",), "a down input_scale is NaN (the L2 activation scale is max over all experts)",
         lambda f: f["nvfp4"] and f["s"]["input_w2_nan"] > 0, "fails",
         lambda f: f"{f['s']['input_w2_nan']} down input_scale NaN: max over experts is NaN, the L2 activation scale NaN",
         "vllm/model_executor/layers/fused_moe/deep_gemm_mega_moe.py:508-509", "0.33.0", inferred=True),
    Rule(VLLM, ("deep_gemm_mega_moe+plugin",), "a down input_scale is +Inf",
         lambda f: f["nvfp4"] and f["s"]["input_w2_inf"] > 0, "fails",
         lambda f: f"{f['s']['input_w2_inf']} down input_scale Inf: the L2 activation scale (max over experts) is Inf",
         "vllm/model_executor/layers/fused_moe/deep_gemm_mega_moe.py:508-509", "0.33.0", inferred=True),
    # ---------------------------------------------------------------- vLLM per-expert (ModelOptNvFp4FusedMoE)
    Rule(VLLM, PER_EXPERT_VLLM, "DeepSeek-V4 config without moe_quant_algo: NVFP4 (experts built as MXFP4)",
         lambda f: f["dsv4"] and f["nvfp4"] and not f["dsv4_moe_nvfp4"], "fails",
         lambda f: "quantization_config has no moe_quant_algo: NVFP4, so DeepseekV4FP8Config builds "
                   "Mxfp4MoEMethod experts; NVFP4 tensors do not fit them",
         "vllm/models/deepseek_v4/quant_config.py:218", "0.34.0, 0.33.0", inferred=True),
    Rule(VLLM, PER_EXPERT_VLLM, "gate/up weight_scale_2 differ: the gate's is kept for both halves",
         lambda f: f["nvfp4"] and f["s"]["scale_2_pairs_differ"] > 0, "lossy", _up_off,
         "vllm/model_executor/layers/quantization/modelopt.py:1091-1098 (0.33.0: 1056-1063); "
         "compressed_tensors_moe_w4a4_nvfp4.py:234-240 for compressed-tensors; ModelOpt's loading run: tests/vllm "
         "(test_vllm_repair_proof*.py, test_vllm_real_exports.py)", "0.34.0, 0.33.0"),
    Rule(VLLM, ("flashinfer_moe_ep_cutedsl",), "a weight_scale_2 is zero, negative, NaN or Inf",
         lambda f: f["nvfp4"] and f["s"]["weight_scale_2_bad"] > 0, "fails",
         lambda f: "ValueError: \"g1_alphas must contain finite positive scales\"",
         "vllm/model_executor/layers/fused_moe/experts/flashinfer_moe_ep.py:200-203", "0.34.0, 0.33.0"),
    Rule(VLLM, PER_EXPERT_VLLM[:3] + ("cutlass", "marlin"), "a weight_scale_2 is zero, negative, NaN or Inf",
         lambda f: f["nvfp4"] and f["s"]["weight_scale_2_bad"] > 0, "fails",
         lambda f: f"{f['s']['weight_scale_2_bad']} weight_scale_2 unusable: those experts' outputs are 0, NaN or Inf",
         "vllm/model_executor/layers/fused_moe/oracle/nvfp4.py:514-560 (g1_alphas = weight_scale_2)", "0.34.0", inferred=True),
    Rule(VLLM, GLOBAL_MAX_VLLM, "an input_scale is absent (its slot is torch.empty) and enters the max over all experts",
         lambda f: f["nvfp4"] and f["s"]["input_any_missing"] > 0, "fails",
         lambda f: f"{f['s']['input_any_missing']} input_scale absent: their slots stay uninitialized (torch.empty) "
                   "and the activation scale is the max over all experts, so it is whatever memory held",
         "vllm/model_executor/layers/quantization/modelopt.py:1044-1058; utils/flashinfer_fp4_moe.py:213,496-504; "
         "utils/quant_utils.py:77-96", "0.34.0", inferred=True),
    Rule(VLLM, GLOBAL_MAX_VLLM, "a layer's input scales are all zero or absent (max is 0 -> 1/0)",
         lambda f: f["nvfp4"] and bool(f["s"]["input_w13_layers_all_unusable"] or f["s"]["input_w2_layers_all_unusable"]), "fails",
         lambda f: "every input_scale of " + ", ".join((f["s"]["input_w13_layers_all_unusable"] + f["s"]["input_w2_layers_all_unusable"])[:3])
                   + " is unusable: max is 0, a1_gscale = 1/0 = inf, NaN output",
         "vllm/model_executor/layers/fused_moe/oracle/nvfp4.py:571", "0.34.0"),
    Rule(VLLM, GLOBAL_MAX_VLLM, "an input_scale is NaN or Inf (propagates through the max to every expert)",
         lambda f: f["nvfp4"] and f["s"]["input_any_nonfinite"] > 0, "fails",
         lambda f: f"{f['s']['input_any_nonfinite']} input_scale NaN or Inf: the max over all experts "
                   "carries it into every expert's activation scale",
         "vllm/model_executor/layers/quantization/utils/quant_utils.py:87", "0.34.0", inferred=True),
    Rule(VLLM, ("cutlass",), "an expert's input scales are unusable (per-expert max of w1/w3, then 1/x)",
         lambda f: f["nvfp4"] and (f["s"]["input_w13_experts_unusable"] + f["s"]["input_w2_experts_unusable"]) > 0, "fails",
         lambda f: f"{f['s']['input_w13_experts_unusable']} experts' w13 and {f['s']['input_w2_experts_unusable']} "
                   "experts' w2 input scales zero, absent, NaN or Inf: 1/0 = inf, NaN for tokens routed to them",
         "vllm/model_executor/layers/quantization/utils/flashinfer_fp4_moe.py:506; fused_moe/oracle/nvfp4.py:571", "0.34.0"),
    Rule(VLLM, ("cutlass",), "an input_scale is absent though its gate/up partner is there",
         lambda f: f["nvfp4"] and f["s"]["input_any_missing"] > 0, "fails",
         lambda f: f"{f['s']['input_any_missing']} input_scale absent: slots uninitialized (torch.empty), "
                   "read per expert",
         "vllm/model_executor/layers/quantization/modelopt.py:1044-1058", "0.34.0", inferred=True),
    # marlin and flashinfer_moe_ep_cutedsl do not read input scales: no rule.
    # ---------------------------------------------------------------- CSF block-scale encoding
    Rule(V33, ANY, "block scales CSF-encoded (weight_scale_encoding), which 0.33 does not decode",
         lambda f: bool(f["csf"]) or f["csf_streams"], "fails",
         lambda f: f"weight_scale_encoding {f['csf']!r}: vLLM 0.33 has no CSF decoder, the stream tensors match no "
                   "parameter and the block scales are never loaded",
         "vllm/model_executor/layers/quantization/modelopt.py (0.33.0: no weight_scale_encoding)", "0.33.0", inferred=True),
    Rule(V34, ANY, "weight_scale_encoding is not csf or csf_32x2_v1",
         lambda f: bool(f["csf"]) and f["csf"] not in ("csf", "csf_32x2_v1"), "fails",
         lambda f: f"ValueError: \"unsupported weight_scale_encoding: {f['csf']}\"",
         "vllm/model_executor/layers/quantization/modelopt.py:757-762", "0.34.0"),
    Rule(V34, ANY, "CSF streams present but no weight_scale_encoding declared",
         lambda f: f["csf_streams"] and not f["csf"], "fails",
         lambda f: "CSF stream tensors without weight_scale_encoding in the config: vLLM does not pair them",
         "vllm/model_executor/layers/quantization/modelopt.py:785-790", "0.34.0", inferred=True),
    Rule(V34, ANY, "DeepSeek-V4 with CSF block scales (its NVFP4 config is built without the encoding)",
         lambda f: f["dsv4"] and (bool(f["csf"]) or f["csf_streams"]), "fails",
         lambda f: "DeepseekV4FP8Config builds ModelOptNvFp4Config without weight_scale_encoding: the CSF streams "
                   "are not decoded",
         "vllm/models/deepseek_v4/quant_config.py:133-148", "0.34.0", inferred=True),
    Rule(SGL + TRT, ANY, "block scales CSF-encoded",
         lambda f: bool(f["csf"]) or f["csf_streams"], "fails",
         lambda f: "no CSF decoder: the stream tensors match no parameter",
         "sglang/srt/layers/quantization/modelopt_quant.py (no weight_scale_encoding)", "0.5.23", inferred=True),
    # ---------------------------------------------------------------- SGLang
    Rule(SGL, ANY, "DeepSeek-V4 whose config SGLang does not detect as hybrid FP8+NVFP4",
         lambda f: f["dsv4"] and f["nvfp4"] and not f["sglang_detects_hybrid"], "fails",
         lambda f: "not detected as NVFP4 (no " + ", ".join(f["sglang_missing"]) + " in config.json's "
                   "quantization_config): the experts get the MXFP4 method (Fp8MoEMethod: int8 codes, a float32 scale "
                   "per 32); an expert .scale lands on its weight_scale_inv, a shape it does not have, and "
                   "weight_scale_2, input_scale and .weight_scale on no parameter (skipped without a word)",
         "sglang/srt/configs/model_config.py:774-794; model_loader/loader.py:214-249; "
         "models/deepseek_v4.py:5113-5182,5414-5470 (run: tests/sglang)", "0.5.23"),
    Rule(SGL, ("flashinfer_cutlass", "flashinfer_cutedsl", "cutlass", "marlin"), "gate/up weight_scale_2 differ: one alpha (the gate's)",
         lambda f: f["nvfp4"] and f["s"]["scale_2_pairs_differ"] > 0, "lossy", _up_off,
         "sglang/srt/layers/quantization/modelopt_quant.py:2336-2359 (g1_alphas = gate), 2745-2760; the loading and "
         "_compute_gemm1_alphas run: tests/sglang", "0.5.23"),
    Rule(SGL, ("flashinfer_trtllm",), "gate/up weight_scale_2 differ and the model has no swiglu clamp "
                                      "(only then is the smaller half rescaled)",
         lambda f: f["nvfp4"] and f["s"]["scale_2_pairs_differ"] > 0 and f["cfg"].get("swiglu_limit") is None, "lossy", _up_off,
         "sglang/srt/layers/quantization/modelopt_quant.py:2851-2873", "0.5.23", inferred=True),
    Rule(SGL, ("flashinfer_cutlass", "flashinfer_trtllm", "flashinfer_cutedsl"), "an input_scale is NaN or Inf (max over experts)",
         lambda f: f["nvfp4"] and f["s"]["input_any_nonfinite"] > 0, "fails",
         lambda f: f"{f['s']['input_any_nonfinite']} input_scale NaN or Inf: the max over experts carries it",
         "sglang/srt/layers/quantization/modelopt_quant.py:2763-2766", "0.5.23", inferred=True),
    Rule(SGL, ("flashinfer_cutlass", "flashinfer_trtllm", "flashinfer_cutedsl"), "a layer's input scales all zero",
         lambda f: f["nvfp4"] and bool(f["s"]["input_w13_layers_all_unusable"] or f["s"]["input_w2_layers_all_unusable"]), "fails",
         lambda f: "a layer's input scales are all zero or absent: 1/max = inf",
         "sglang/srt/layers/quantization/modelopt_quant.py:2839-2845", "0.5.23", inferred=True),
    Rule(SGL, ANY, "an input_scale is absent: SGLang fills 1.0",
         lambda f: f["nvfp4"] and f["s"]["input_any_missing"] > 0, "lossy",
         lambda f: f"{f['s']['input_any_missing']} input_scale absent, taken as 1.0 (the parameter's fill)",
         "sglang/srt/layers/quantization/modelopt_quant.py:2633", "0.5.23"),
    Rule(SGL, ("flashinfer_cutedsl", "cutlass"), "a down input_scale is unusable (w2 input scales are used per expert)",
         lambda f: f["nvfp4"] and f["s"]["input_w2_experts_unusable"] > 0, "fails",
         lambda f: f"{f['s']['input_w2_experts_unusable']} experts' down input_scale zero, absent, NaN or Inf: per-expert 1/x",
         "sglang/srt/layers/quantization/modelopt_quant.py:2783-2810, 2839-2845", "0.5.23"),
    Rule(SGL, ("cutlass",), "an expert's gate and up input scales are unusable (per-expert max of the two)",
         lambda f: f["nvfp4"] and f["s"]["input_w13_experts_unusable"] > 0, "fails",
         lambda f: f"{f['s']['input_w13_experts_unusable']} experts' w13 input scales zero, absent, NaN or Inf: per-expert 1/x",
         "sglang/srt/layers/quantization/modelopt_quant.py:2808-2809, 2839-2845", "0.5.23"),
    Rule(SGL, ("deep_gemm_megamoe",), "a down input_scale is zero, NaN or Inf (per-expert L2 scale 1/x)",
         lambda f: f["nvfp4"] and f["s"]["input_w2_experts_unusable"] > 0, "fails",
         lambda f: f"{f['s']['input_w2_experts_unusable']} experts' down input_scale unusable: per-expert 1/x",
         "sglang/srt/layers/quantization/modelopt_quant.py:2684-2688", "0.5.23"),
    # ---------------------------------------------------------------- TensorRT-LLM (notes, not code)
    Rule(TRT, ("cutlass",), "gate/up weight_scale_2 differ: max() of the two for both halves, block scales not rescaled",
         lambda f: f["nvfp4"] and f["s"]["scale_2_pairs_differ"] > 0, "lossy",
         lambda f: f"smaller half off by up to {_x(f['s']['scale_2_worst_ratio'])} in {f['s']['scale_2_pairs_differ']} experts (max() + warning)",
         "research notes engines-and-hub.md 3.2, 4.1 (TensorRT-LLM PR 18772)", "TensorRT-LLM after PR 18772", inferred=True),
    Rule(TRT, ANY, "an input_scale is zero, absent, NaN or Inf (TensorRT-LLM's handling of them was not read)",
         lambda f: f["nvfp4"] and (f["s"]["input_any_missing"] + f["s"]["input_any_zero"] + f["s"]["input_any_nonfinite"] + f["s"]["input_any_negative"]) > 0, "unknown",
         lambda f: "some input scales are unusable; how TensorRT-LLM treats them was not read (not installable here)",
         "research notes engines-and-hub.md 3.2", "-", inferred=True),
)
# fmt: on


def evaluate(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One verdict per engine and backend, with the rules behind it."""
    f = _facts(report)
    out = []
    for eng in ENGINES:
        hits = [r for r in RULES if eng.id in r.engines and ("*" in r.backends or eng.backend in r.backends) and r.test(f)]
        na = [r for r in hits if r.verdict == "n/a"]
        if na:
            verdict, hits = "n/a", na[:1]
        elif hits:
            verdict = max((r.verdict for r in hits), key=VERDICT_ORDER.__getitem__)
        else:
            verdict = "loads"
        out.append(
            {
                "id": f"{eng.id}:{eng.backend}",
                "engine_id": eng.id,
                "engine": eng.name,
                "backend": eng.backend,
                "verdict": verdict,
                "messages": [r.message(f) for r in hits] or ["loads as is"],
                "rules": [
                    {"when": r.when, "source": r.source, "version": r.version, "inferred": r.inferred, "verdict": r.verdict}
                    for r in hits
                ],
            }
        )
    return out
