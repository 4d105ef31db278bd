"""The converter's numpy transforms (host_layout.py) against the torch references, byte for byte.

The converter runs only the numpy functions; verify and the golden tests use the torch ones. Each
test here draws fresh random inputs and compares the bytes both produce.
"""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from nvfp4_fuse import host_layout as hl
from nvfp4_fuse import nvfp4
from nvfp4_fuse.layout import MegaMoEScales
from nvfp4_fuse.swizzle import swizzle_128x4


def rand_scales(rows: int, k16: int) -> np.ndarray:
    return np.random.default_rng(random.randrange(2**32)).integers(0, 0x7F, (rows, k16), dtype=np.uint8)


def test_e4m3_table_matches_torch():
    got = hl.E4M3_VALUES
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert got[ok].tobytes() == want[ok].tobytes()  # -0.0 included


def test_rescale_matches_torch_on_every_byte_and_many_ratios():
    raw = np.arange(0x7F, dtype=np.uint8)  # every non-negative, non-NaN scale byte
    ratios = [random.uniform(2**-12, 1.0) for _ in range(300)]
    ratios += [1 / 3, 0.5, 0.75, 2**-10, 0.999999, float(np.float32(0.1))]
    ratios += [float(np.nextafter(np.float32(r), np.float32(1))) for r in ratios[:20]]  # near ties
    for r in ratios:
        got, change = hl.rescale_block_scales(raw, r)
        want = nvfp4.rescale_block_scales(torch.from_numpy(raw), r).view(torch.uint8).numpy()
        assert got.tobytes() == want.tobytes(), r
        exact = torch.from_numpy(raw).view(torch.float8_e4m3fn).to(torch.float32) * torch.tensor(r, dtype=torch.float32)
        new = torch.from_numpy(want).view(torch.float8_e4m3fn).to(torch.float32)
        nz = exact != 0
        assert change == float(((new[nz] - exact[nz]).abs() / exact[nz]).max()), r


def test_rescale_of_arrays_matches_torch_element_by_element():
    """The lookup table path: any shape (empty, strided), only some byte values present, and the
    largest change taken over exactly the bytes present (subnormal bytes change the most, so a
    random subset moves the maximum)."""
    rng = np.random.default_rng(random.randrange(2**32))
    for _ in range(200):
        r = random.choice([random.uniform(2**-12, 1.0), 1 / 3, 0.5])
        lo, hi = sorted(int(x) for x in rng.integers(0, 0x7F, 2))
        raw = rng.integers(lo, hi + 1, (random.randint(0, 40), random.randint(1, 30)), dtype=np.uint8)
        if random.random() < 0.3:
            raw = raw[:, ::2]
        got, change = hl.rescale_block_scales(raw, r)
        t = torch.from_numpy(np.ascontiguousarray(raw))
        want = nvfp4.rescale_block_scales(t, r).view(torch.uint8).numpy()
        assert got.shape == raw.shape and got.tobytes() == want.tobytes(), r
        exact = t.view(torch.float8_e4m3fn).to(torch.float32) * torch.tensor(r, dtype=torch.float32)
        new = torch.from_numpy(want).view(torch.float8_e4m3fn).to(torch.float32)
        nz = exact != 0
        assert change == (float(((new[nz] - exact[nz]).abs() / exact[nz]).max()) if bool(nz.any()) else 0.0), r


def test_encode_rounds_ties_to_even_and_clamps():
    v = hl.E4M3_VALUES
    # the midpoint between 0x38 (1.0) and 0x39 (1.125) goes to the even byte, 0x38; between 0x39 and 0x3A to 0x3A
    assert hl.e4m3_encode(np.float32((v[0x38] + v[0x39]) / 2)) == 0x38
    assert hl.e4m3_encode(np.float32((v[0x39] + v[0x3A]) / 2)) == 0x3A
    x = np.float32(float(v[0x39]) + 1e-3)
    assert hl.e4m3_encode(x) == 0x39
    assert hl.e4m3_encode(np.float32(448.0)) == 0x7E and hl.e4m3_encode(np.float32(0.0)) == 0


def test_check_block_scale_bytes_finds_the_first_nan_or_negative():
    for _ in range(20):
        b = rand_scales(8, 12)
        for _ in range(random.randint(0, 3)):
            b.reshape(-1)[random.randrange(b.size)] = random.choice([0x7F, 0x80, 0xB8, 0xFF])
        vals = torch.from_numpy(b).view(torch.float8_e4m3fn).to(torch.float32).reshape(-1)
        bad = [i for i, v in enumerate(vals.tolist()) if v != v or v < 0 or (v == 0 and b.reshape(-1)[i] == 0x80)]
        assert hl.check_block_scale_bytes(b) == (bad[0] if bad else None)


@pytest.mark.parametrize("rows,k16", [(128, 4), (256, 28), (100, 7), (1, 1), (300, 65)])
def test_swizzle_matches_torch(rows, k16):
    raw = rand_scales(rows, k16)
    assert hl.swizzle_128x4(raw).tobytes() == swizzle_128x4(torch.from_numpy(raw)).numpy().tobytes()


@pytest.mark.parametrize("rows,k16", [(128, 4), (512, 32), (1024, 448 // 4 * 4)])
def test_mega_moe_scales_match_torch(rows, k16):
    raw = rand_scales(rows, k16)
    want = MegaMoEScales().reference_lay_out(torch.from_numpy(raw).view(torch.float8_e4m3fn))
    got = hl.mega_moe_scales(raw)
    assert got.dtype == np.dtype("<i4") and got.shape == tuple(want.shape)
    assert got.tobytes() == want.numpy().tobytes()


def test_converting_never_imports_torch(make_ckpt, tmp_path):
    """The point of host_layout: `nvfp4-fuse convert` runs without torch's multi-second import."""
    src = make_ckpt(layers=2, experts=2, hidden=512, inter=512, shards=2, unequal_scale_2=True)
    code = (
        "import sys\n"
        "from nvfp4_fuse.cli import main\n"
        f"sys.argv = ['nvfp4-fuse', 'convert', {str(src)!r}, {str(tmp_path / 'o1')!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        f"sys.argv = ['nvfp4-fuse', 'convert', {str(src)!r}, {str(tmp_path / 'o2')!r}, '--target', 'vllm-fused']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print('torch' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False"
