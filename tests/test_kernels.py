"""Triton NVFP4 kernels under TRITON_INTERPRET=1 (CPU) vs the torch references, bit for bit.

Inputs are fresh random draws every run; each test prints its seed in the failure message.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are decorated (triton.jit reads it then)

import importlib  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nvfp4_fuse import nvfp4  # noqa: E402
from nvfp4_fuse.swizzle import swizzle_128x4  # noqa: E402

# If another test module imported the kernels before this one set the variable, re-decorate them.
for _name, _kernel in (("nvfp4_fuse.kernels.dequant", "_dequant_kernel"), ("nvfp4_fuse.kernels.compare", "_compare_kernel")):
    _mod = sys.modules.get(_name)
    if _mod is not None and type(getattr(_mod, _kernel)).__name__ != "InterpretedFunction":
        importlib.reload(_mod)

from nvfp4_fuse.kernels.compare import compare_nvfp4, first_difference  # noqa: E402
from nvfp4_fuse.kernels.dequant import dequantize_nvfp4  # noqa: E402
from nvfp4_fuse.kernels.reference import (  # noqa: E402
    compare_nvfp4_ref,
    compare_stats_from_values,
    dequantize_nvfp4_ref,
)

# the interpreter divides by |A| = 0 before masking those lanes out
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in divide:RuntimeWarning")

PADDED = (2, 37, 48)      # M not a multiple of 128, K/16 = 3 not a multiple of 4
UNPADDED = (2, 128, 64)   # M = 128, K/16 = 4


@pytest.fixture
def seed():
    s = random.getrandbits(63)
    torch.manual_seed(s)
    return s


def rand_encoding(e, m, k, *, per_row=False):
    """Random packed nibbles, E4M3 block-scale bytes (no NaN, no sign; 0 and subnormals allowed), scale_2."""
    packed = torch.randint(0, 256, (e, m, k // 2), dtype=torch.uint8)
    scales = torch.randint(0, 0x7F, (e, m, k // 16), dtype=torch.uint8)
    shape = (e, m) if per_row else (e,)
    s2 = torch.exp2(torch.empty(shape).uniform_(-24.0, 4.0)) * (1 + torch.rand(shape))
    return packed, scales, s2.float()


def swizzle_all(scales):
    return torch.stack([swizzle_128x4(scales[i]) for i in range(scales.shape[0])])


def bits(x):
    return x.view(torch.int16 if x.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.parametrize("shape", [PADDED, UNPADDED], ids=["padded", "unpadded"])
@pytest.mark.parametrize("swizzled", [False, True], ids=["linear", "swizzled"])
@pytest.mark.parametrize("per_row", [False, True], ids=["s2_expert", "s2_row"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_dequant_bit_exact(seed, shape, swizzled, per_row, out_dtype):
    packed, scales, s2 = rand_encoding(*shape, per_row=per_row)
    sc = swizzle_all(scales) if swizzled else scales
    if random.random() < 0.5:
        sc = sc.view(torch.float8_e4m3fn)
    out = dequantize_nvfp4(packed, sc, s2, swizzled=swizzled, out_dtype=out_dtype, bpp=16)
    ref = dequantize_nvfp4_ref(packed, sc, s2, swizzled=swizzled, out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (shape[0], shape[1], shape[2])
    assert torch.equal(bits(out), bits(ref)), f"seed {seed}: {(bits(out) != bits(ref)).sum()} elements differ"
    # and the reference is nvfp4.dequantize itself, expert by expert
    e0 = nvfp4.dequantize(packed[0], scales[0], s2[0, :, None] if per_row else s2[0]).to(out_dtype)
    assert torch.equal(bits(ref[0]), bits(e0)), f"seed {seed}"


def test_dequant_default_tile_rows_and_2d(seed):
    e, m, k = PADDED
    packed, scales, s2 = rand_encoding(e, m, k, per_row=True)
    sw = swizzle_all(scales)
    out = dequantize_nvfp4(packed, sw, s2, swizzled=True, rows=(5, 30))
    ref = dequantize_nvfp4_ref(packed, sw, s2, swizzled=True, rows=(5, 30))
    assert out.shape == (e, 25, k)
    assert torch.equal(bits(out), bits(ref)), f"seed {seed}"
    full = dequantize_nvfp4_ref(packed, scales, s2)
    assert torch.equal(bits(ref), bits(full[:, 5:30])), f"seed {seed}"
    one = dequantize_nvfp4(packed[1], scales[1], s2[1], out_dtype=torch.float32)  # 2-D: one expert, per-row s2
    assert torch.equal(bits(one), bits(nvfp4.dequantize(packed[1], scales[1], s2[1, :, None]))), f"seed {seed}"


def test_dequant_special_scales(seed):
    """All 16 codes against scale bytes 0x00 (zero), 0x01 (smallest subnormal), 0x7E (448), 0x7F (NaN)."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(4, 1)  # 4 rows x 16 columns: every code once a row
    packed = nvfp4.pack_nibbles(codes)[None]
    scales = torch.tensor([[0x00], [0x01], [0x7E], [0x7F]], dtype=torch.uint8)[None]
    s2 = torch.tensor([1.0 + random.random()])
    out = dequantize_nvfp4(packed, scales, s2, out_dtype=torch.float32)
    ref = dequantize_nvfp4_ref(packed, scales, s2, out_dtype=torch.float32)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and bool(torch.isnan(out[0, 3]).all())
    ok = ~torch.isnan(ref)
    assert torch.equal(bits(out[ok]), bits(ref[ok])), f"seed {seed}"
    assert bits(out)[0, 1, 8] == bits(torch.tensor(-0.0))  # code 8 is -0, kept as -0
    with pytest.raises(ValueError):
        dequantize_nvfp4(packed, scales, torch.tensor([2.0**121]))


def test_dequant_rejects_bad_shapes():
    packed, scales, s2 = rand_encoding(2, 8, 32)
    with pytest.raises(ValueError):
        dequantize_nvfp4(packed, scales[:, :, :1], s2)
    with pytest.raises(ValueError):
        dequantize_nvfp4(packed, scales, s2, swizzled=True)  # linear shape passed as swizzled
    with pytest.raises(ValueError):
        dequantize_nvfp4(packed, scales, torch.ones(3))
    with pytest.raises(ValueError):
        dequantize_nvfp4(packed, scales, s2, rows=(4, 9))


def assert_stats_equal(got, want, seed):
    for name in ("max_abs", "max_rel"):
        g, w = getattr(got, name), getattr(want, name)
        assert g.dtype == torch.float32 and torch.equal(g.isnan(), w.isnan()), f"seed {seed}: {name}"
        assert torch.equal(g.nan_to_num(0.0), w.nan_to_num(0.0)), f"seed {seed}: {name} {g.tolist()} != {w.tolist()}"
    assert got.n_diff.dtype == torch.int64 and torch.equal(got.n_diff, want.n_diff), \
        f"seed {seed}: n_diff {got.n_diff.tolist()} != {want.n_diff.tolist()}"
    assert torch.equal(got.nonfinite, want.nonfinite), f"seed {seed}: nonfinite"


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "full"])
@pytest.mark.parametrize("shape", [PADDED, UNPADDED], ids=["padded", "unpadded"])
def test_compare_identical_across_layouts(seed, fast_path, shape):
    """Linear + per-row scale_2 vs swizzled + per-expert scale_2 holding the same values: all zero."""
    packed, scales, s2 = rand_encoding(*shape)
    s2_rows = s2[:, None].expand(shape[0], shape[1]).contiguous()
    res = compare_nvfp4(packed, scales, s2_rows, packed.clone(), swizzle_all(scales).view(torch.float8_e4m3fn), s2,
                        b_swizzled=True, fast_path=fast_path, bpp=16)
    assert res.n_diff.tolist() == [0] * shape[0], f"seed {seed}"
    assert res.max_abs.tolist() == [0.0] * shape[0] and res.max_rel.tolist() == [0.0] * shape[0]
    assert not bool(res.nonfinite.any()) and bool(res.equal.all()) and res.first_bad_expert() is None
    assert res.elements_per_expert == shape[1] * shape[2]
    assert first_difference(1, packed, scales, s2_rows, packed, swizzle_all(scales), s2, b_swizzled=True) is None


@pytest.mark.parametrize("nsub", [1, 3])
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "full"])
@pytest.mark.parametrize("layouts", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["lin-lin", "swz-lin", "lin-swz", "swz-swz"])
def test_compare_stats_match_torch(seed, fast_path, layouts, nsub):
    """Random A and a B that shares some blocks with A: every statistic equals the torch one exactly."""
    e, m, k = PADDED
    a_sw, b_sw = layouts
    pa, sa, s2a = rand_encoding(e, m, k, per_row=True)
    pb, sb, s2b = rand_encoding(e, m, k)
    # B equal to A on expert 0's values where possible (same bytes, same scales, s2 per row == s2b[0])
    s2a[0] = s2b[0]
    pb[0], sb[0] = pa[0], sa[0]
    pb[1, :10] = pa[1, :10]  # same nibbles, different scales: rescaled-looking rows
    A = (pa, swizzle_all(sa) if a_sw else sa, s2a)
    B = (pb, swizzle_all(sb) if b_sw else sb, s2b)
    got = compare_nvfp4(*A, *B, a_swizzled=a_sw, b_swizzled=b_sw, fast_path=fast_path, bpp=16, nsub=nsub,
                        exact_rel=True)
    assert got.tiles["n_diff"].shape == (e, -(-m * k // 16 // (16 * nsub)))
    want = compare_nvfp4_ref(*A, *B, a_swizzled=a_sw, b_swizzled=b_sw)
    assert_stats_equal(got, want, seed)
    assert got.n_diff[0] == 0 and got.n_diff[1] > 0
    # the default (fast fp32 division on GPU) is the same division under the interpreter
    assert_stats_equal(compare_nvfp4(*A, *B, a_swizzled=a_sw, b_swizzled=b_sw), want, seed)


@pytest.mark.parametrize("what", ["nibble", "scale"])
def test_compare_finds_one_change(seed, what):
    e, m, k = UNPADDED
    packed, scales, s2 = rand_encoding(e, m, k)
    scales.clamp_(min=0x08)  # normal scales: any nibble change is a value change
    ex, row, col = random.randrange(e), random.randrange(m), random.randrange(k)
    pb, sb = packed.clone(), scales.clone()
    if what == "nibble":
        code = int(pb[ex, row, col // 2] >> (4 * (col % 2))) & 0xF
        new = (code + random.randrange(1, 8)) % 8 | (code & 8)  # another magnitude, same sign
        pb[ex, row, col // 2] ^= (code ^ new) << (4 * (col % 2))
    else:
        sb[ex, row, col // 16] = (int(sb[ex, row, col // 16]) + random.randrange(1, 8)) % 0x77 + 0x08
        # the first differing column is the block's first nonzero code
        nz = (nvfp4.unpack_nibbles(packed[ex, row])[col // 16 * 16:col // 16 * 16 + 16] & 7).nonzero()
        if not nz.numel():
            pytest.skip("all-zero block")  # vanishingly rare
        col = col // 16 * 16 + int(nz[0, 0])
    res = compare_nvfp4(packed, scales, s2, pb, swizzle_all(sb), s2, b_swizzled=True)
    want = compare_nvfp4_ref(packed, scales, s2, pb, swizzle_all(sb), s2, b_swizzled=True)
    assert_stats_equal(res, want, seed)
    assert res.first_bad_expert() == ex, f"seed {seed}"
    assert [int(x > 0) for x in res.n_diff] == [int(i == ex) for i in range(e)], f"seed {seed}"
    if what == "nibble":
        assert int(res.n_diff[ex]) == 1
    d = first_difference(ex, packed, scales, s2, pb, swizzle_all(sb), s2, b_swizzled=True)
    assert d is not None and (d.expert, d.row, d.col) == (ex, row, col), f"seed {seed}: {d} vs {(ex, row, col)}"
    assert d.a != d.b


def test_compare_nonfinite_flag(seed):
    e, m, k = PADDED
    packed, scales, s2 = rand_encoding(e, m, k)
    sb = scales.clone()
    sb[1, 3, 2] = 0x7F  # NaN scale in B, expert 1
    res = compare_nvfp4(packed, scales, s2, packed, sb, s2)
    assert res.nonfinite.tolist() == [False, True] and bool(res.max_abs[1].isnan())
    assert res.n_diff[0] == 0 and res.n_diff[1] == 16
    assert_stats_equal(res, compare_nvfp4_ref(packed, scales, s2, packed, sb, s2), seed)
    d = first_difference(1, packed, scales, s2, packed, sb, s2)
    assert (d.row, d.col) == (3, 32)


def test_compare_merged_gate_up(seed):
    """The w13 use: A = [gate; up] with their own scale_2 per row, B = merged scale_2 per expert."""
    e, i, k = 2, 24, 64
    gate, up = list(rand_encoding(e, i, k)), list(rand_encoding(e, i, k))
    gate[1].clamp_(min=0x30)  # block scales >= 0.5, so rescaled ones stay normal E4M3
    up[1].clamp_(min=0x30)
    up[2] = gate[2] * torch.empty(e).uniform_(0.3, 1.0)  # up's scale_2 below gate's: up is rescaled
    pa = torch.cat([gate[0], up[0]], dim=1)
    sa = torch.cat([gate[1], up[1]], dim=1)
    s2_rows = torch.cat([gate[2][:, None].expand(e, i), up[2][:, None].expand(e, i)], dim=1).contiguous()
    s2_m, sb = torch.empty(e), sa.clone()
    for x in range(e):
        c, rg, ru = nvfp4.merge_scale_2(float(gate[2][x]), float(up[2][x]))
        s2_m[x] = c
        sb[x, :i] = nvfp4.rescale_block_scales(gate[1][x], rg).view(torch.uint8)
        sb[x, i:] = nvfp4.rescale_block_scales(up[1][x], ru).view(torch.uint8)
    res = compare_nvfp4(pa, sa, s2_rows, pa, swizzle_all(sb), s2_m, b_swizzled=True, exact_rel=True)
    ref_a = dequantize_nvfp4_ref(pa, sa, s2_rows, out_dtype=torch.float32)
    ref_b = dequantize_nvfp4_ref(pa, sb, s2_m, out_dtype=torch.float32)
    assert_stats_equal(res, compare_stats_from_values(ref_a, ref_b), seed)
    assert res.n_diff[:, ].sum() > 0 and float(res.max_rel.max()) <= 0.0625 * (1 + 1e-5), f"seed {seed}"


def test_cpu_without_interpreter_is_rejected(monkeypatch):
    import nvfp4_fuse.kernels.dequant as dq
    monkeypatch.setattr(dq, "is_interpreted", lambda k: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dq.dequantize_nvfp4(*rand_encoding(1, 4, 16))



@pytest.mark.parametrize("layouts", [(False, False), (False, True)], ids=["lin-lin", "lin-swz"])
def test_compare_equal_bytes_unequal_scale_2_is_a_difference(seed, layouts):
    """The fast path skips tiles whose bytes are equal only if their scale_2 is equal too."""
    e, m, k = UNPADDED
    packed, scales, s2 = rand_encoding(e, m, k)
    scales.clamp_(min=0x08)  # normal block scales: every nonzero code decodes to a nonzero value
    packed |= 0x11  # no zero codes
    s2b = s2.clone()
    x = random.randrange(e)
    s2b[x] = s2b[x] * 1.5
    b_scales = swizzle_all(scales) if layouts[1] else scales.clone()
    res = compare_nvfp4(packed, scales, s2, packed.clone(), b_scales, s2b, b_swizzled=layouts[1], bpp=16)
    want = [m * k if i == x else 0 for i in range(e)]
    assert res.n_diff.tolist() == want, f"seed {seed}"
    assert abs(float(res.max_rel[x]) - 0.5) < 1e-5 and res.first_bad_expert() == x, f"seed {seed}"
