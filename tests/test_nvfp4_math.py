"""The pure math: E2M1 packing and rounding, E4M3 rescale, scale_2 merge, the 128x4 swizzle."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from references import ref_e4m3_round, ref_swizzle

from nvfp4_fuse import host_layout, nvfp4
from nvfp4_fuse.swizzle import padded_shape, swizzle_128x4, swizzle_offset, unswizzle_128x4


def test_pack_unpack_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (7, 34), dtype=torch.uint8)
    packed = nvfp4.pack_nibbles(codes)
    assert torch.equal(nvfp4.unpack_nibbles(packed), codes)
    # even column in the low nibble
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


def test_e2m1_encode_is_round_to_nearest_even_with_saturation():
    table = torch.tensor(nvfp4.E2M1_VALUES)
    x = torch.cat([torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 100.0, -0.75, -5.0]), torch.randn(2000) * 4])
    codes = nvfp4.e2m1_encode(x)
    got = nvfp4.e2m1_decode(codes)
    for xi, gi in zip(x.tolist(), got.tolist()):
        mag = min(abs(xi), 6.0)
        d = (table - mag).abs()
        best = d.min()
        cands = [i for i in range(8) if float(d[i]) == float(best)]
        want = table[[c for c in cands if c % 2 == 0][0] if len(cands) > 1 else cands[0]]
        assert abs(gi) == float(want), (xi, gi, float(want))
        if gi != 0:
            assert (gi < 0) == (xi < 0)


def test_quantize_follows_modelopt_recipe_and_dequantizes_close():
    w = torch.randn(64, 128) * 0.05
    packed, scale, s2 = nvfp4.quantize(w)
    assert s2 == pytest.approx(float(w.abs().max()) / (6 * 448), rel=1e-6)
    bamax = w.reshape(64, 8, 16).abs().amax(-1)
    assert torch.equal(scale.view(torch.uint8), ref_e4m3_round(bamax / (6 * torch.tensor(s2, dtype=torch.float32))))
    d = nvfp4.dequantize(packed, scale, s2)
    assert float((d - w).norm() / w.norm()) < 0.12


def test_dequant_multiply_order_is_fixed():
    packed = torch.randint(0, 256, (16, 16), dtype=torch.uint8)
    scale = torch.randint(0x08, 0x78, (16, 2), dtype=torch.uint8).view(torch.float8_e4m3fn)
    s2 = random.uniform(1e-5, 1e-3)
    got = nvfp4.dequantize(packed, scale, s2)
    vals = nvfp4.e2m1_decode(nvfp4.unpack_nibbles(packed))
    want = (vals * scale.float().repeat_interleave(16, -1)) * torch.tensor(s2, dtype=torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_rescale_is_rne_to_e4m3_with_zero_kept_and_underflow_clamped():
    raw = torch.randint(0, 0x7F, (200,), dtype=torch.uint8)
    raw[0] = 0
    raw[1] = 0x01  # smallest subnormal: times a small ratio would flush to 0 without the clamp
    s = raw.view(torch.float8_e4m3fn)
    r = random.uniform(0.05, 1.0)
    got = nvfp4.rescale_block_scales(s, r)
    want = ref_e4m3_round(s.to(torch.float64) * float(torch.tensor(r, dtype=torch.float32)))
    assert torch.equal(got.view(torch.uint8), want)
    assert int(got.view(torch.uint8)[0]) == 0 and int(got.view(torch.uint8)[1]) == 0x01


def test_merge_scale_2():
    a = random.uniform(1e-5, 1e-4)
    assert nvfp4.merge_scale_2(a, a) == (float(torch.tensor(a, dtype=torch.float32)), 1.0, 1.0)
    c, rg, ru = nvfp4.merge_scale_2(a, 2 * a)
    assert c == float(torch.tensor(2 * a, dtype=torch.float32)) and ru == 1.0 and rg == pytest.approx(0.5)


def test_block_scale_byte_check():
    b = np.full((4, 4), 0x38, dtype=np.uint8)
    assert host_layout.check_block_scale_bytes(b) is None
    b[2, 1] = 0x7F
    assert host_layout.check_block_scale_bytes(b) == 9
    b[2, 1] = 0x38
    b[3, 3] = 0xB0
    assert host_layout.check_block_scale_bytes(b) == 15


@pytest.mark.parametrize("shape", [(128, 4), (300, 7), (5, 3), (256, 64), (129, 5)])
def test_swizzle_matches_the_offset_formula_and_inverts(shape):
    s = torch.randint(0, 256, shape, dtype=torch.uint8)
    z = swizzle_128x4(s)
    assert tuple(z.shape) == padded_shape(*shape)
    assert torch.equal(z, ref_swizzle(s))
    flat = z.reshape(-1)
    kp = z.shape[1]
    for _ in range(50):
        m, k = random.randrange(shape[0]), random.randrange(shape[1])
        assert flat[swizzle_offset(m, k, kp)] == s[m, k]
    pad = torch.ones_like(flat, dtype=torch.bool)
    for m in range(shape[0]):
        for k in range(shape[1]):
            pad[swizzle_offset(m, k, kp)] = False
    assert bool((flat[pad] == 0).all()), "padding bytes must be zero"
    assert torch.equal(unswizzle_128x4(z, *shape), s)
