"""The ``per-expert`` repair, proven against vLLM's own per-expert NVFP4 loading on the CPU.

A per-expert NVFP4 DeepSeek-V4 checkpoint whose gate (w1) and up (w3) ``weight_scale_2`` differ, and
its repaired form (``convert --target per-expert``), are each loaded by stock vLLM
(``ModelOptNvFp4FusedMoE``'s weight loading, ``flashinfer_cutedsl``). The model class is vLLM's
NVIDIA DeepSeek-V4 as the plugin registers it (the ``plugin`` fixture; on the CPU platform vLLM's
registry would give a class that needs CUDA to build); for a per-expert checkpoint on this backend
the plugin changes nothing, every expert tensor goes through vLLM's own ``weight_loader``. The loaded routed
experts are then dequantized the way the backend's epilogue uses them: ONE alpha per expert for all of
w13, column 0 of ``w13_weight_scale_2`` (the gate's). ``process_weights_after_loading`` needs a GPU, so
that step is emulated here from its code:

- vLLM 0.34.0 ``quantization/modelopt.py``, ``ModelOptNvFp4FusedMoE.process_weights_after_loading``,
  lines 1090-1098: warns "w1_weight_scale_2 must match w3_weight_scale_2. Accuracy may be affected."
  and keeps ``w13_weight_scale_2 = layer.w13_weight_scale_2[:, 0].contiguous()``;
- vLLM 0.33.0, the same method, lines 1055-1063, the same code.

Each loaded value (E2M1 code x E4M3 block scale x the gate's alpha) is compared with the source's true
value (source code x source block scale x that half's own ``weight_scale_2``). On the source the up
half comes out scaled by gate/up; on the repaired checkpoint every block of both halves is within half
an E4M3 step (the bound ``verify`` checks, ``verify.block_errors``) and the larger half is exact.
"""

from __future__ import annotations

import checkpoints
import harness
import pytest
import torch

from nvfp4_fuse.constants import E4M3_HALF_STEP, E4M3_SUBNORMAL_HALF_SPACING
from nvfp4_fuse.nvfp4 import dequantize

BACKEND = "flashinfer_cutedsl"
DIMS = checkpoints.Dims()


@pytest.fixture(scope="module")
def seed_m():
    import random

    return random.randrange(2**31)


@pytest.fixture(scope="module", params=["nvidia", "canada"])
def pair(request, tmp_path_factory, seed_m):
    """(source folder, repaired folder, the source's tensors) for one recipe."""
    from nvfp4_fuse.convert import ConvertOptions, convert

    recipe = request.param
    root = tmp_path_factory.mktemp(f"repair-proof-{recipe}")
    src = checkpoints.write_source(root / "src", recipe, dims=DIMS, seed=seed_m, unequal_scale_2=True)
    out = root / "repaired"
    convert(src, out, ConvertOptions(target="per-expert"))
    return recipe, src, out, checkpoints.read_all(src)


def _block_scale(tensors, recipe, n, x, w):
    return tensors[f"layers.{n}.ffn.experts.{x}.{w}.{'weight_scale' if recipe == 'nvidia' else 'scale'}"]


def _true_values(tensors, recipe, n, x, w):
    """The source's value of expert ``x``'s ``w`` in layer ``n``: code x block scale x its own scale_2."""
    p = f"layers.{n}.ffn.experts.{x}.{w}"
    scale = _block_scale(tensors, recipe, n, x, w)
    return dequantize(tensors[f"{p}.weight"].view(torch.uint8), scale, tensors[f"{p}.weight_scale_2"].float().reshape(()))


def _loaded(folder):
    cfg = harness.engine_config(folder, backend=BACKEND)
    model = harness.build(cfg)
    harness.poison_routed_experts(model)
    harness.load(model, cfg)
    return [harness.routed_experts(model, n) for n in range(DIMS.layers)]


def _epilogue_values(experts, x):
    """Expert ``x``'s (w13, w2) as the backend computes with them: w13 under one alpha, the gate's
    (``w13_weight_scale_2[:, 0]``, see the module notes), w2 under its own."""
    alpha = experts.w13_weight_scale_2.data[x, 0].float()
    w13 = dequantize(experts.w13_weight.data[x], experts.w13_weight_scale.data[x], alpha)
    w2 = dequantize(experts.w2_weight.data[x], experts.w2_weight_scale.data[x], experts.w2_weight_scale_2.data[x].float())
    return w13, w2


def _block_rel(got, want):
    """Per NVFP4 block (16 values of a row): largest |got - want| / |want|; 0 where both are 0 and inf
    where only ``want`` is."""
    diff = (got - want).abs().reshape(*got.shape[:-1], -1, 16)
    ref = want.abs().reshape(*want.shape[:-1], -1, 16)
    rel = torch.where(ref > 0, diff / ref.clamp(min=torch.finfo(torch.float32).tiny), torch.where(diff > 0, torch.inf, 0.0))
    return rel.amax(dim=-1)


def _errors(recipe, tensors, experts_by_layer):
    """{(layer, expert): (gate rel error, up rel error, w2 exact, gate/up ratio)} over all experts."""
    out = {}
    i = DIMS.inter
    for n, experts in enumerate(experts_by_layer):
        for x in range(DIMS.experts):
            w13, w2 = _epilogue_values(experts, x)
            gate, up = (_true_values(tensors, recipe, n, x, w) for w in ("w1", "w3"))
            s2 = {w: float(tensors[f"layers.{n}.ffn.experts.{x}.{w}.weight_scale_2"].float().reshape(())) for w in ("w1", "w3")}
            out[(n, x)] = (
                _block_rel(w13[:i], gate),
                _block_rel(w13[i:], up),
                torch.equal(w2, _true_values(tensors, recipe, n, x, "w2")),
                s2,
            )
    return out


def test_stock_vllm_scales_the_up_half_of_the_source_by_gate_over_up(plugin, pair):
    recipe, src, _, tensors = pair
    errs = _errors(recipe, tensors, _loaded(src))
    worst = max(float(up.max()) for _, up, _, _ in errs.values())
    expected = max(abs(s2["w1"] / s2["w3"] - 1) for _, _, _, s2 in errs.values())
    for (n, x), (gate, up, w2_exact, s2) in errs.items():
        assert w2_exact, (n, x)
        assert float(gate.max()) == 0.0, (n, x)  # the gate half is under its own alpha
        ratio = s2["w1"] / s2["w3"]
        # every nonzero value of the up half is off by exactly gate/up - 1 (to fp32 rounding)
        nonzero = up[torch.isfinite(up) & (up > 0)]
        assert torch.allclose(nonzero, torch.full_like(nonzero, abs(ratio - 1)), rtol=1e-5, atol=1e-6), (n, x, ratio)
    assert worst == pytest.approx(expected, rel=1e-5)
    assert worst > 0.2, worst  # w3's scale_2 is 0.5-1.5x w1's: some expert is far off
    print(f"\n{recipe} source on stock vLLM {BACKEND}: worst up-half error {100 * worst:.2f}%")


def test_stock_vllm_loads_the_repaired_checkpoint_within_half_an_e4m3_step(plugin, pair):
    recipe, _, out, tensors = pair
    experts_by_layer = _loaded(out)
    errs = _errors(recipe, tensors, experts_by_layer)
    worst = 0.0
    for (n, x), (gate, up, w2_exact, s2) in errs.items():
        assert w2_exact, (n, x)
        s2_loaded = experts_by_layer[n].w13_weight_scale_2.data[x]
        assert torch.equal(s2_loaded[0], s2_loaded[1]), (n, x, s2_loaded)
        (big, larger), (w_small, smaller) = sorted([("w1", gate), ("w3", up)], key=lambda h: -s2[h[0]])
        assert float(larger.max()) == 0.0, (n, x)  # the larger half is copied: exact
        # Each block of the smaller half within half an E4M3 step of its true value, the bound
        # verify.block_errors checks: with x = source block scale x s2 / common s2 (the exact rescaled
        # scale), |error| <= 2^-4 x where x is a normal E4M3 (>= 2^-6), half the subnormal spacing
        # (2^-10) below, 2^-9 under 2^-10. A block of zeros stays exactly zero (inf marks one that
        # did not).
        xs = _block_scale(tensors, recipe, n, x, w_small).float() * (s2[w_small] / s2[big])
        tol = torch.where(
            xs < E4M3_SUBNORMAL_HALF_SPACING,
            2 * E4M3_SUBNORMAL_HALF_SPACING,
            torch.clamp(E4M3_HALF_STEP * xs, min=E4M3_SUBNORMAL_HALF_SPACING),
        )
        bound = tol / xs
        assert torch.isfinite(smaller).all(), (n, x)
        over = smaller > bound * (1 + 1e-5)
        assert not over.any(), (n, x, float(smaller[over].max()), float(bound[over].min()))
        normal = xs >= 2**-6
        assert (bound[normal] == E4M3_HALF_STEP).all()
        worst = max(worst, float(smaller[normal].max()))
    assert E4M3_HALF_STEP == 2**-4
    assert worst > 0  # the smaller halves were rescaled, not copied
    print(f"\n{recipe} repaired on stock vLLM {BACKEND}: worst error (normal scales) {100 * worst:.3f}% (bound 6.25%)")
