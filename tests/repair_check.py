"""What a per-expert NVFP4 MoE engine computes with loaded expert parameters, against the source's
true values: the comparison behind the ``per-expert`` repair's proofs on vLLM (``tests/vllm``) and
SGLang (``tests/sglang``), engine-neutral.

The loaded experts are any module holding ``w13_weight`` [E, 2I, H/2] (gate rows then up rows),
``w13_weight_scale`` E4M3, ``w13_weight_scale_2`` [E, 2] (gate, up), and the same for ``w2`` with
``w2_weight_scale_2`` [E], which is what both engines' per-expert NVFP4 loaders fill. The backend's
epilogue takes ONE alpha per expert for all of w13; ``alpha`` says which (default: column 0, the
gate's, as both engines keep it). Each loaded value (E2M1 code x E4M3 block scale x that alpha) is
compared with the source's (source code x source block scale x that half's own ``weight_scale_2``):
on an unrepaired source the up half comes out scaled by gate/up; on a repaired checkpoint every block
of both halves is within half an E4M3 step (the bound ``verify`` checks) and the larger half is exact.
"""


from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from nvfp4_fuse.constants import E4M3_HALF_STEP, E4M3_SUBNORMAL_HALF_SPACING
from nvfp4_fuse.nvfp4 import dequantize

ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class ExpertNames:
    """Where a checkpoint keeps expert ``x`` of layer ``n``: ``linear(n, x, role)`` is the Linear's
    name (role: gate, up, down), ``block_scale`` the field of its E4M3 block scales."""

    linear: Callable[[int, int, str], str]
    block_scale: str = "weight_scale"


@dataclass(frozen=True)
class ExpertErrors:
    """One expert's errors as the epilogue computes with it: per NVFP4 block, the largest relative
    error of the gate and up halves of w13; whether w2 is exact; the source's gate/up scale_2 and the
    source block scales of both halves."""

    gate: torch.Tensor
    up: torch.Tensor
    w2_exact: bool
    scale_2: dict[str, float]
    block_scale: dict[str, torch.Tensor]


def true_values(tensors: dict[str, torch.Tensor], names: ExpertNames, n: int, x: int, role: str) -> torch.Tensor:
    """The source's value of expert ``x``'s ``role`` in layer ``n``: code x block scale x its own scale_2."""
    p = names.linear(n, x, role)
    return dequantize(
        tensors[f"{p}.weight"].view(torch.uint8),
        tensors[f"{p}.{names.block_scale}"],
        tensors[f"{p}.weight_scale_2"].float().reshape(()),
    )


def gate_alpha(experts: torch.nn.Module, x: int) -> torch.Tensor:
    """Column 0 of ``w13_weight_scale_2``: the gate's."""
    return experts.w13_weight_scale_2.data[x, 0].float()


def epilogue_values(experts: torch.nn.Module, x: int, alpha: Callable = gate_alpha) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``x``'s (w13, w2) as the backend computes with them: w13 under one alpha
    (``alpha(experts, x)``, by default the gate's), w2 under its own."""
    alpha = alpha(experts, x)
    w13 = dequantize(experts.w13_weight.data[x], experts.w13_weight_scale.data[x], alpha)
    w2 = dequantize(experts.w2_weight.data[x], experts.w2_weight_scale.data[x], experts.w2_weight_scale_2.data[x].float())
    return w13, w2


def block_rel(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per NVFP4 block (16 values of a row): largest |got - want| / |want|; 0 where both are 0 and inf
    where only ``want`` is."""
    diff = (got - want).abs().reshape(*got.shape[:-1], -1, 16)
    ref = want.abs().reshape(*want.shape[:-1], -1, 16)
    rel = torch.where(ref > 0, diff / ref.clamp(min=torch.finfo(torch.float32).tiny), torch.where(diff > 0, torch.inf, 0.0))
    return rel.amax(dim=-1)


def errors(
    tensors: dict[str, torch.Tensor],
    names: ExpertNames,
    experts_by_layer: list[torch.nn.Module],
    experts: int,
    inter: int,
    alpha: Callable = gate_alpha,
) -> dict[tuple[int, int], ExpertErrors]:
    """{(layer, expert): its errors} over every routed expert of every layer, against ``tensors``
    (the source's)."""
    out = {}
    for n, loaded in enumerate(experts_by_layer):
        for x in range(experts):
            w13, w2 = epilogue_values(loaded, x, alpha)
            gate, up = (true_values(tensors, names, n, x, r) for r in ("gate", "up"))
            halves = {r: names.linear(n, x, r) for r in ("gate", "up")}
            out[(n, x)] = ExpertErrors(
                gate=block_rel(w13[:inter], gate),
                up=block_rel(w13[inter:], up),
                w2_exact=torch.equal(w2, true_values(tensors, names, n, x, "down")),
                scale_2={r: float(tensors[f"{p}.weight_scale_2"].float().reshape(())) for r, p in halves.items()},
                block_scale={r: tensors[f"{p}.{names.block_scale}"] for r, p in halves.items()},
            )
    return out


def assert_up_half_off_by_gate_over_up(errs: dict[tuple[int, int], ExpertErrors], least: float = 0.2) -> float:
    """The stock loss on an unrepaired source: the gate half exact, every nonzero value of the up half
    off by exactly |gate/up - 1| (to fp32 rounding), w2 exact, the worst error above ``least``.
    Returns the worst up-half error."""
    worst = max(float(e.up.max()) for e in errs.values())
    expected = max(abs(e.scale_2["gate"] / e.scale_2["up"] - 1) for e in errs.values())
    for key, e in errs.items():
        assert e.w2_exact, key
        assert float(e.gate.max()) == 0.0, key  # the gate half is under its own alpha
        ratio = e.scale_2["gate"] / e.scale_2["up"]
        nonzero = e.up[torch.isfinite(e.up) & (e.up > 0)]
        assert torch.allclose(nonzero, torch.full_like(nonzero, abs(ratio - 1)), rtol=1e-5, atol=1e-6), (key, ratio)
    assert worst == pytest.approx(expected, rel=1e-5)
    assert worst > least, worst  # the source's up scale_2 differ enough that some expert is that far off
    return worst


def assert_within_half_an_e4m3_step(
    errs: dict[tuple[int, int], ExpertErrors], experts_by_layer: list[torch.nn.Module]
) -> float:
    """The repaired checkpoint's loss: both halves loaded under one ``weight_scale_2``, the larger
    half exact, every block of the smaller within half an E4M3 step, w2 exact. Returns the worst
    error over blocks with a normal E4M3 scale."""
    worst = 0.0
    for (n, x), e in errs.items():
        assert e.w2_exact, (n, x)
        s2_loaded = experts_by_layer[n].w13_weight_scale_2.data[x]
        assert torch.equal(s2_loaded[0], s2_loaded[1]), (n, x, s2_loaded)
        (big, larger), (small, smaller) = sorted([("gate", e.gate), ("up", e.up)], key=lambda h: -e.scale_2[h[0]])
        assert float(larger.max()) == 0.0, (n, x)  # the larger half is copied: exact
        # Each block of the smaller half within half an E4M3 step of its true value, the bound
        # verify.block_errors checks: with xs = source block scale x s2 / common s2 (the exact rescaled
        # scale), |error| <= 2^-4 xs where xs is a normal E4M3 (>= 2^-6), half the subnormal spacing
        # (2^-10) below, 2^-9 under 2^-10. A block of zeros stays exactly zero (inf marks one that
        # did not).
        xs = e.block_scale[small].float() * (e.scale_2[small] / e.scale_2[big])
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
        if normal.any():
            worst = max(worst, float(smaller[normal].max()))
    assert E4M3_HALF_STEP == 2**-4
    assert worst > 0  # the smaller halves were rescaled, not copied
    return worst
