"""Every layout part on fresh random inputs: forward then inverse gives the input back, the converter's
numpy path equals the torch reference byte for byte, and the targets are what their parts say."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from nvfp4_fuse.errors import InputError
from nvfp4_fuse.layout import (
    ExpertMax,
    GateThenUp,
    InterleavedByGroup,
    LinearScales,
    MegaMoEScales,
    MergeByMax,
    ScaleLayout,
    Swizzled128x4,
    UpThenGate,
    W13Order,
)
from nvfp4_fuse.targets import TARGETS, LayerDims, get_target

ORDERS = [GateThenUp(), UpThenGate(), InterleavedByGroup()]
SCALES = [LinearScales(), Swizzled128x4(), MegaMoEScales()]


def rand_bytes(*shape: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8)


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.name)
def test_row_order_join_then_split_round_trips(order, monkeypatch):
    rows, cols = 8 * random.randint(1, 40), random.randint(1, 9)
    gate, up = rand_bytes(rows, cols), rand_bytes(rows, cols)
    w13 = order.join(gate, up)
    assert w13.shape == (2 * rows, cols)
    g, u = order.split(w13)
    assert torch.equal(g, gate) and torch.equal(u, up)
    # the converter's numpy join is the same bytes
    assert order.join_np(gate.numpy(), up.numpy()).tobytes() == w13.numpy().tobytes()
    # verify's numpy split undoes it, by slicing the alternating groups and by the gather fallback
    for _ in range(2):
        g, u = order.split_np(w13.numpy())
        assert np.array_equal(g, gate.numpy()) and np.array_equal(u, up.numpy())
        monkeypatch.setattr(type(order), "alternating_groups", lambda self, rows: None)
    # the runs the converter reads with place the same rows, each role's rows once and in source order
    src = {"gate": gate, "up": up}
    runs = order.runs(rows)
    assert torch.equal(torch.cat([src[r][r0 : r0 + n] for r, r0, n in runs]), w13)
    for role in ("gate", "up"):
        mine = [(r0, n) for r, r0, n in runs if r == role]
        assert [r0 for r0, _ in mine] == sorted(r0 for r0, _ in mine)
        assert sum(n for _, n in mine) == rows and mine[0][0] == 0


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.name)
def test_row_order_keeps_float8_and_leading_dims(order):
    e, rows, cols = random.randint(1, 4), 8 * random.randint(1, 8), random.randint(1, 6)
    gate = rand_bytes(e, rows, cols).clamp(max=0x7E).view(torch.float8_e4m3fn)
    up = rand_bytes(e, rows, cols).clamp(max=0x7E).view(torch.float8_e4m3fn)
    w13 = order.join(gate, up)
    assert w13.dtype == torch.float8_e4m3fn and w13.shape == (e, 2 * rows, cols)
    for k in range(e):
        assert torch.equal(w13[k].view(torch.uint8), order.join(gate[k], up[k]).view(torch.uint8))
    g, u = order.split(w13)
    assert torch.equal(g.view(torch.uint8), gate.view(torch.uint8)) and torch.equal(u.view(torch.uint8), up.view(torch.uint8))


def test_the_orders_themselves():
    rows = 16
    gate, up = torch.arange(rows)[:, None], torch.arange(100, 100 + rows)[:, None]
    assert GateThenUp().join(gate, up)[:, 0].tolist() == list(range(16)) + list(range(100, 116))
    assert UpThenGate().join(gate, up)[:, 0].tolist() == list(range(100, 116)) + list(range(16))
    assert InterleavedByGroup().join(gate, up)[:, 0].tolist() == (
        list(range(8)) + list(range(100, 108)) + list(range(8, 16)) + list(range(108, 116))
    )
    # what verify compares in place: whole halves, or groups of rows alternating between the roles
    assert GateThenUp().alternating_groups(rows) == (("gate", "up"), rows)
    assert UpThenGate().alternating_groups(rows) == (("up", "gate"), rows)
    assert InterleavedByGroup().alternating_groups(rows) == (("gate", "up"), 8)


def test_interleave_refuses_rows_off_its_group():
    bad = 8 * random.randint(1, 20) + random.randint(1, 7)
    assert InterleavedByGroup().problems(bad) and not InterleavedByGroup().problems(bad - bad % 8)
    with pytest.raises(ValueError, match="multiple of the interleave group"):
        InterleavedByGroup().runs(bad)


def _dims_for(layout) -> tuple[int, int]:
    if isinstance(layout, MegaMoEScales):
        return 512 * random.randint(1, 2), 512 * random.randint(1, 2)
    return random.randint(1, 300), 16 * random.randint(1, 70)


@pytest.mark.parametrize("layout", SCALES, ids=lambda s: s.name)
def test_scale_layout_forward_then_inverse(layout):
    rows, cols = _dims_for(layout)
    k16 = cols // 16
    assert layout.problems(rows, cols) == []
    raw = rand_bytes(rows, k16).clamp(max=0x7E)  # any non-NaN E4M3 byte
    stored = layout.lay_out(raw.numpy())
    assert stored.shape == layout.expert_shape(rows, cols)
    assert stored.dtype == (np.dtype("<i4") if layout.dtype == "I32" else np.uint8)
    ref = layout.reference_lay_out(raw.view(torch.float8_e4m3fn))
    assert stored.tobytes() == ref.contiguous().view(torch.uint8).numpy().tobytes()
    back = layout.natural(torch.from_numpy(stored), rows, k16)
    assert back.dtype == torch.float8_e4m3fn and torch.equal(back.view(torch.uint8), raw)
    # the inverse as a gather index reads the same bytes as natural(), and so does the numpy inverse
    # verify runs (a closed form where the layout has one, else that gather), from words or bytes
    flat = np.ascontiguousarray(stored).reshape(-1).view(np.uint8)
    assert np.array_equal(flat[layout.natural_index(rows, cols)], raw.numpy())
    for given in (stored, flat):
        got = layout.natural_np(given, rows, cols)
        assert got.dtype == np.uint8 and got.shape == (rows, k16) and np.array_equal(got, raw.numpy())
    assert np.array_equal(ScaleLayout.natural_np(layout, flat, rows, cols), raw.numpy())


def test_scale_layout_shape_rules():
    assert MegaMoEScales().problems(256, 512) and MegaMoEScales().problems(512, 768)
    assert MegaMoEScales().problems(512, 512) == []
    for layout in (LinearScales(), Swizzled128x4()):
        assert layout.problems(random.randint(1, 99), 16 * random.randint(1, 9)) == []
    assert Swizzled128x4().expert_shape(130, 16 * 5) == (256, 8)


def _scale_2_pairs(e: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.exp2(np.random.uniform(-20, -5, e)).astype(np.float32)
    u = (g * np.random.uniform(0.3, 1.7, e)).astype(np.float32)
    same = np.random.rand(e) < 0.3
    u[same] = g[same]
    return g, u


def test_merge_by_max():
    e = random.randint(2, 40)
    g, u = _scale_2_pairs(e)
    p = MergeByMax()
    t = p.w13_tensor(g, u)
    assert t.shape == p.w13_shape(e) == (e,) and t.dtype == np.dtype("<f4")
    assert np.array_equal(t, np.maximum(g, u))
    rg, ru = p.ratios(g, u)
    for k in range(e):  # the larger half is a pure copy; the smaller is scaled down to the max
        for s2, r in ((g[k], rg[k]), (u[k], ru[k])):
            assert (r == 1.0) if s2 == t[k] else (r == np.float32(s2 / t[k]) and r < 1.0)
    sg, su = p.split(torch.from_numpy(t))
    assert torch.equal(sg, torch.from_numpy(t)) and torch.equal(su, torch.from_numpy(t))


def test_input_scale_policies():
    e = random.randint(2, 40)
    g, u = _scale_2_pairs(e)
    per_expert = ExpertMax().w13_tensor(g, u)
    assert per_expert.shape == ExpertMax().w13_shape(e) and np.array_equal(per_expert, np.maximum(g, u))


@pytest.mark.parametrize("name", list(TARGETS))
def test_targets_are_their_parts(name):
    t = TARGETS[name]
    d = LayerDims(random.randint(1, 9), 512, 1024)
    entries = {e.name.rsplit(".", 1)[1]: e for e in t.out_entries("p.experts", d)}
    assert entries["w13_weight"].dtype == entries["w2_weight"].dtype == t.values.value
    assert entries["w13_weight_scale"].shape == (d.experts, *t.scales.expert_shape(2 * d.inter, d.hidden))
    assert entries["w2_weight_scale"].shape == (d.experts, *t.scales.expert_shape(d.hidden, d.inter))
    assert entries["w13_weight_scale_2"].shape == t.scale_2.w13_shape(d.experts)
    assert entries["w13_input_scale"].shape == t.input_scale.w13_shape(d.experts)
    block = t.describe()
    assert (block["target"], block["w13_rows"], block["scale_layout"]) == (name, t.rows.name, t.scales.name)


def test_get_target_choices():
    assert get_target("vllm-fused", "up-gate").rows.name == "up-gate"
    assert get_target("linear", W13Order.UP_GATE).rows.name == "up-gate"
    with pytest.raises(InputError, match="fixes the w13 row order"):
        get_target("mega-moe", "up-gate")
    with pytest.raises(InputError, match="unknown target"):
        get_target("nope")
    with pytest.raises(InputError, match="--w13-order"):
        get_target("linear", "sideways")
