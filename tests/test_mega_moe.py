"""The mega-moe reference layout against slow, independently written index-by-index references.

Inputs are fresh random tensors each run; the ``seed`` fixture draws the seed and prints it, so a
failing run shows it in pytest's captured output.
"""

from __future__ import annotations

import random
import struct

import pytest
import torch

from nvfp4_fuse import mega_moe as mm
from nvfp4_fuse.nvfp4 import dequantize, quantize


@pytest.fixture(autouse=True)
def seed() -> int:
    s = random.randrange(2**31)
    print(f"test seed: {s}")
    torch.manual_seed(s)
    return s


def rand_bytes(*shape: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8)


def rand_expert(hidden: int, inter: int, lead: tuple[int, ...] = ()) -> mm.NaturalExpert:
    """Random bytes in ModelOpt's natural shapes (layout tests do not care about values)."""
    e4 = torch.float8_e4m3fn
    return mm.NaturalExpert(
        rand_bytes(*lead, inter, hidden // 2),
        rand_bytes(*lead, inter, hidden // 16).view(e4),
        rand_bytes(*lead, inter, hidden // 2),
        rand_bytes(*lead, inter, hidden // 16).view(e4),
        rand_bytes(*lead, hidden, inter // 2),
        rand_bytes(*lead, hidden, inter // 16).view(e4),
    )


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return bool(torch.equal(a, b))


# ---------------------------------------------------------------- slow references (plain loops)


def slow_interleave(gate: torch.Tensor, up: torch.Tensor, group: int) -> torch.Tensor:
    rows = gate.shape[0]
    out = []
    for j in range(2 * rows):
        run, pos = divmod(j, 2 * group)
        src = gate if pos < group else up
        out.append(src[run * group + pos % group])
    return torch.stack(out)


def slow_utccp(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    for new in range(x.shape[0]):
        blk, r = divmod(new, 128)
        b, a = divmod(r, 4)  # new = blk*128 + b*4 + a
        out[new] = x[blk * 128 + a * 32 + b]
    return out


def slow_pack(scale_bytes: torch.Tensor) -> torch.Tensor:
    """Explicit little-endian construction of each word with struct."""
    rows, k16 = scale_bytes.shape
    words = []
    for r in range(rows):
        row = []
        for p in range(k16 // 4):
            four = bytes(int(scale_bytes[r, 4 * p + j]) for j in range(4))
            row.append(struct.unpack("<i", four)[0])
        words.append(row)
    return torch.tensor(words, dtype=torch.int32)


def mega_dequant_by_formula(mega: dict[str, torch.Tensor], hidden: int, inter: int, s2: float) -> dict[str, torch.Tensor]:
    """Read a mega-moe expert straight from its stored bytes by index arithmetic and dequantize.

    Returns natural-order fp32 gate/up/down; scale (n, g) of a GEMM with N rows is byte g%4 of the
    int32 at stored [g//4, utccp_pos(n')], where n' is the row's position after the gate/up interleave.
    """
    from nvfp4_fuse.nvfp4 import e2m1_decode, unpack_nibbles

    def utccp_pos(n: int) -> int:
        blk, r = divmod(n, 128)
        a, b = divmod(r, 32)
        return blk * 128 + b * 4 + a

    lut = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().tolist()

    def read(values: torch.Tensor, words: torch.Tensor, natural_to_stored) -> torch.Tensor:
        codes = unpack_nibbles(values)  # [N, K] in stored row order
        table = words.tolist()  # [K/64][N] python ints
        k = codes.shape[1]
        out = torch.empty(len(natural_to_stored), k)
        for nat, stored in enumerate(natural_to_stored):
            col = utccp_pos(stored)
            sc = []
            for g in range(k // 16):
                w = table[g // 4][col] & 0xFFFFFFFF
                sc.append(lut[(w >> (8 * (g % 4))) & 0xFF])
            scales = torch.tensor(sc, dtype=torch.float32).repeat_interleave(16)
            out[nat] = (e2m1_decode(codes[stored]) * scales) * torch.tensor(s2, dtype=torch.float32)
        return out

    def w13_row(nat: int) -> int:  # natural w13 row (gate then up) -> interleaved row
        half, i = divmod(nat, inter)
        run, pos = divmod(i, 8)
        return run * 16 + half * 8 + pos

    w13 = read(mega["w13_weight"], mega["w13_weight_scale"], [w13_row(n) for n in range(2 * inter)])
    w2 = read(mega["w2_weight"], mega["w2_weight_scale"], list(range(hidden)))
    return {"gate": w13[:inter], "up": w13[inter:], "down": w2}


# ---------------------------------------------------------------- interleave


@pytest.mark.parametrize("group", [8, 4])
def test_interleave_matches_loop_reference(group: int) -> None:
    rows, cols = 3 * group * 2, 5
    gate, up = rand_bytes(rows, cols), rand_bytes(rows, cols)
    got = mm.interleave_gate_up(gate, up, group=group)
    assert torch.equal(got, slow_interleave(gate, up, group))
    g2, u2 = mm.deinterleave_gate_up(got, group=group)
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_interleave_default_is_gate_first_runs_of_8() -> None:
    gate = torch.arange(16, dtype=torch.int32).reshape(16, 1)
    up = 100 + gate
    got = mm.interleave_gate_up(gate, up).reshape(-1).tolist()
    assert got == list(range(8)) + list(range(100, 108)) + list(range(8, 16)) + list(range(108, 116))


def test_interleave_leading_dims_and_float8() -> None:
    e, rows, cols = 3, 16, 4
    gate = rand_bytes(e, rows, cols).view(torch.float8_e4m3fn)
    up = rand_bytes(e, rows, cols).view(torch.float8_e4m3fn)
    got = mm.interleave_gate_up(gate, up)
    assert got.dtype == torch.float8_e4m3fn and got.shape == (e, 2 * rows, cols)
    for i in range(e):
        ref = slow_interleave(gate[i].view(torch.uint8), up[i].view(torch.uint8), 8)
        assert torch.equal(got[i].view(torch.uint8), ref)


# ---------------------------------------------------------------- UTCCP


def test_utccp_matches_loop_reference_and_inverts() -> None:
    x = torch.randint(-(2**31), 2**31 - 1, (256, 3), dtype=torch.int32)
    got = mm.utccp_permute(x)
    assert torch.equal(got, slow_utccp(x))
    assert torch.equal(mm.utccp_unpermute(got), x)
    # direction: stored row b*4+a holds logical row a*32+b
    idx = torch.arange(128, dtype=torch.int32).reshape(128, 1)
    p = mm.utccp_permute(idx).reshape(-1).tolist()
    assert p[:6] == [0, 32, 64, 96, 1, 33] and p[4 * 31 + 3] == 3 * 32 + 31


def test_utccp_leading_dims() -> None:
    x = torch.randint(-(2**31), 2**31 - 1, (2, 128, 2), dtype=torch.int32)
    got = mm.utccp_permute(x)
    for i in range(2):
        assert torch.equal(got[i], slow_utccp(x[i]))


# ---------------------------------------------------------------- int32 packing


def test_pack_is_little_endian_by_k_group() -> None:
    raw = rand_bytes(7, 12)
    got = mm.pack_scales_k64(raw.view(torch.float8_e4m3fn))
    assert got.dtype == torch.int32 and got.shape == (7, 3)
    assert torch.equal(got, slow_pack(raw))
    assert torch.equal(mm.pack_scales_k64(raw), got)  # raw uint8 accepted too
    assert same_bytes(mm.unpack_scales_k64(got), raw.view(torch.float8_e4m3fn))


def test_pack_view_and_arithmetic_paths_agree(monkeypatch) -> None:
    raw = rand_bytes(12, 8).t()  # not contiguous: the view path must copy first
    fast = mm.pack_scales_k64(raw)
    monkeypatch.setattr(mm.sys, "byteorder", "big")  # the arithmetic path, as on a big-endian host
    assert torch.equal(mm.pack_scales_k64(raw), fast)
    assert torch.equal(fast, slow_pack(raw.contiguous()))
    slow_unpack = mm.unpack_scales_k64(fast.t().contiguous().t())  # arithmetic, from a strided view
    monkeypatch.setattr(mm.sys, "byteorder", "little")
    fast_unpack = mm.unpack_scales_k64(fast.t().contiguous().t())
    assert torch.equal(fast_unpack.view(torch.uint8), slow_unpack.view(torch.uint8))
    assert torch.equal(fast_unpack.view(torch.uint8), raw.contiguous())


def test_pack_known_word() -> None:
    b = torch.tensor([[0x01, 0x02, 0x03, 0x84]], dtype=torch.uint8)
    assert int(mm.pack_scales_k64(b)[0, 0]) == struct.unpack("<i", bytes([1, 2, 3, 0x84]))[0]
    assert int(mm.pack_scales_k64(b)[0, 0]) & 0xFFFFFFFF == 0x84030201


# ---------------------------------------------------------------- whole experts


def test_expert_shapes_and_roundtrip_bytes() -> None:
    hidden, inter = 512, 512
    nat = rand_expert(hidden, inter)
    mega = mm.to_mega_moe_expert(*nat)
    assert mega["w13_weight"].shape == (2 * inter, hidden // 2) and mega["w13_weight"].dtype == torch.uint8
    assert mega["w13_weight_scale"].shape == (hidden // 64, 2 * inter) and mega["w13_weight_scale"].dtype == torch.int32
    assert mega["w2_weight"].shape == (hidden, inter // 2) and mega["w2_weight"].dtype == torch.uint8
    assert mega["w2_weight_scale"].shape == (inter // 64, hidden) and mega["w2_weight_scale"].dtype == torch.int32
    assert all(t.is_contiguous() for t in mega.values())
    assert torch.equal(mega["w2_weight"], nat.down_w)
    back = mm.from_mega_moe_expert(**mega)
    for name, a, b in zip(mm.NaturalExpert._fields, back, nat):
        assert same_bytes(a, b), name
    assert all(s.dtype == torch.float8_e4m3fn for s in (back.gate_s, back.up_s, back.down_s))


def test_expert_matches_composition_of_loop_references() -> None:
    """The per-expert tensors equal: pack -> interleave -> UTCCP -> transpose, each done by loops."""
    hidden, inter = 512, 512
    nat = rand_expert(hidden, inter)
    mega = mm.to_mega_moe_expert(*nat)
    assert torch.equal(mega["w13_weight"], slow_interleave(nat.gate_w, nat.up_w, 8))
    w13_words = slow_interleave(slow_pack(nat.gate_s.view(torch.uint8)), slow_pack(nat.up_s.view(torch.uint8)), 8)
    assert torch.equal(mega["w13_weight_scale"], slow_utccp(w13_words).T.contiguous())
    assert torch.equal(mega["w2_weight_scale"], slow_utccp(slow_pack(nat.down_s.view(torch.uint8))).T.contiguous())


def test_batched_equals_stacked_per_expert() -> None:
    e, hidden, inter = 3, 512, 512
    nat = rand_expert(hidden, inter, lead=(e,))
    batched = mm.to_mega_moe(*nat)
    per = [mm.to_mega_moe_expert(*(t[i] for t in nat)) for i in range(e)]
    for k in batched:
        assert torch.equal(batched[k], torch.stack([p[k] for p in per])), k
    assert batched["w13_weight_scale"].shape == (e, hidden // 64, 2 * inter)
    assert batched["w2_weight_scale"].shape == (e, inter // 64, hidden)
    back = mm.from_mega_moe(**batched)
    for name, a, b in zip(mm.NaturalExpert._fields, back, nat):
        assert same_bytes(a, b), name
    for i in range(e):
        one = mm.from_mega_moe_expert(**{k: v[i] for k, v in batched.items()})
        for name, a, b in zip(mm.NaturalExpert._fields, one, back):
            assert same_bytes(a, b[i]), name


def test_kernel_view_strides() -> None:
    e, hidden, inter = 2, 512, 512
    batched = mm.to_mega_moe(*rand_expert(hidden, inter, lead=(e,)))
    for name, n, k in (("w13_weight_scale", 2 * inter, hidden), ("w2_weight_scale", hidden, inter)):
        v = mm.kernel_scale_view(batched[name])
        assert v.shape == (e, n, k // 64) and v.stride() == (n * (k // 64), 1, n)


def test_dequant_after_inverse_equals_source_and_formula_reader() -> None:
    hidden, inter = 512, 512
    w = {p: torch.randn(r, c) for p, (r, c) in dict(gate=(inter, hidden), up=(inter, hidden), down=(hidden, inter)).items()}
    q = {p: quantize(t) for p, t in w.items()}
    nat = mm.NaturalExpert(q["gate"][0], q["gate"][1], q["up"][0], q["up"][1], q["down"][0], q["down"][1])
    mega = mm.to_mega_moe_expert(*nat)
    back = mm.from_mega_moe_expert(**mega)
    pairs = dict(gate=(back.gate_w, back.gate_s), up=(back.up_w, back.up_s), down=(back.down_w, back.down_s))
    for p, (vals, sc) in pairs.items():
        assert torch.equal(dequantize(vals, sc, q[p][2]), dequantize(q[p][0], q[p][1], q[p][2])), p
    # an index-arithmetic reader of the stored layout (one shared scale_2 so one call covers w13)
    s2 = 0.37
    sample = mega_dequant_by_formula(mega, hidden, inter, s2)
    assert torch.equal(sample["gate"], dequantize(nat.gate_w, nat.gate_s, s2))
    assert torch.equal(sample["up"], dequantize(nat.up_w, nat.up_s, s2))
    assert torch.equal(sample["down"], dequantize(nat.down_w, nat.down_s, s2))


def test_small_shapes_with_layout_rules_only() -> None:
    hidden, inter = 128, 64  # N(w13)=128, K=128; N(w2)=128, K=64
    nat = rand_expert(hidden, inter)
    with pytest.raises(ValueError):
        mm.to_mega_moe_expert(*nat)
    mega = mm.to_mega_moe_expert(*nat, kernel_rules=False)
    back = mm.from_mega_moe_expert(**mega, kernel_rules=False)
    for name, a, b in zip(mm.NaturalExpert._fields, back, nat):
        assert same_bytes(a, b), name


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "rows,cols,kernel,needle",
    [
        (192, 512, False, "multiple of 128"),
        (128, 96, False, "multiple of 64"),
        (0, 512, False, "positive multiple of 128"),
        (256, 512, True, "multiple of 512"),
        (512, 256, True, "multiple of 512"),
    ],
)
def test_check_shape_raises(rows: int, cols: int, kernel: bool, needle: str) -> None:
    with pytest.raises(ValueError, match=needle) as ei:
        mm.check_mega_moe_shape(rows, cols, "w13", kernel_rules=kernel)
    assert "w13" in str(ei.value)


def test_check_shape_accepts() -> None:
    mm.check_mega_moe_shape(1024, 512, "w13")
    mm.check_mega_moe_shape(128, 64, "w2", kernel_rules=False)


def test_expert_input_errors() -> None:
    nat = rand_expert(512, 512)
    with pytest.raises(ValueError, match="down_s"):
        mm.to_mega_moe_expert(*nat[:5], nat.down_s[:, :-1])
    with pytest.raises(ValueError, match="gate_w"):
        mm.to_mega_moe_expert(nat.gate_w.view(torch.int8), *nat[1:])
    bad = rand_expert(256, 512)  # hidden 256 breaks the kernel rule
    with pytest.raises(ValueError, match="512"):
        mm.to_mega_moe_expert(*bad)
    with pytest.raises(ValueError):
        mm.pack_scales_k64(rand_bytes(4, 6))
    with pytest.raises(ValueError):
        mm.utccp_permute(torch.zeros(96, 2, dtype=torch.int32))
    with pytest.raises(ValueError):
        mm.interleave_gate_up(rand_bytes(12, 2), rand_bytes(12, 2))
    mega = mm.to_mega_moe_expert(*nat)
    with pytest.raises(ValueError, match="w2_weight_scale"):
        mm.from_mega_moe_expert(mega["w13_weight"], mega["w13_weight_scale"], mega["w2_weight"], mega["w2_weight_scale"].T)


# ---------------------------------------------------------------- alphas
