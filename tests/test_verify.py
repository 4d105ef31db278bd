"""verify: passes on a real conversion, and names tensor, expert and index for every kind of damage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from helpers import mapped_at_close, run_cli

from nvfp4_fuse import piece_checks
from nvfp4_fuse import verify as ver
from nvfp4_fuse.convert import ConvertOptions, convert
from nvfp4_fuse.errors import CheckFailed, InputError
from nvfp4_fuse.manifest import MANIFEST_NAME
from nvfp4_fuse.safetensors_header import read_header
from nvfp4_fuse.verify import verify

P = "layers.1.ffn.experts"


def _locate(folder: Path, name: str) -> tuple[Path, int, int]:
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / idx["weight_map"][name]
    h = read_header(shard)
    t = h.tensors[name]
    return shard, h.data_start + t.begin, t.nbytes


def _flip(folder: Path, name: str, rel: int, xor: int = 0x11) -> None:
    shard, start, _ = _locate(folder, name)
    with open(shard, "r+b") as f:
        f.seek(start + rel)
        b = f.read(1)[0]
        f.seek(start + rel)
        f.write(bytes([b ^ xor]))


@pytest.fixture
def converted(make_ckpt, tmp_path):
    def make(target: str = "vllm-fused", **kw):
        kw = {"layers": 2, "experts": 4, "hidden": 64, "inter": 32, "unequal_scale_2": True, **kw}
        src = make_ckpt(**kw)
        out = tmp_path / f"out-{target}-{random.randrange(10**9)}"
        convert(src, out, ConvertOptions(target=target))
        return src, out

    return make


@pytest.mark.parametrize("target", ["vllm-fused", "linear", "mega-moe"])
@pytest.mark.parametrize("unequal", [False, True])
@pytest.mark.parametrize("decode", [False, True])
def test_verify_passes_and_reports(converted, target, unequal, decode):
    kw = {"hidden": 512, "inter": 512} if target == "mega-moe" else {}
    src, out = converted(target, unequal_scale_2=unequal, **kw)
    res = verify(src, out, device="cpu", decode=decode)
    assert [l.prefix for l in res.layers] == [P]
    layer = res.layers[0]
    assert layer.checked == 4 and layer.decoded == (4 if decode else 0)
    assert layer.rescaled == (4 if unequal else 0)
    if unequal:
        assert 0 < layer.max_rel <= 0.0625
    else:
        assert layer.max_rel == 0
    if decode:  # the end-to-end compare ran (the kernel's torch reference, on the CPU)
        assert (layer.max_abs > 0) == unequal and any("end to end" in c for c in res.checks)
    else:
        assert layer.max_abs is None and "not run" in res.note
    assert res.copied_tensors > 0 and res.files_hashed > 0
    assert any("rescale bound" in c for c in res.checks) and any("sha256" in c for c in res.checks)


def test_verify_sample_checks_n_random_experts_and_honours_the_seed(converted):
    src, out = converted(experts=8)
    drawn = []
    for seed in range(6):
        res = verify(src, out, device="cpu", sample=2, seed=seed, hash_files=False)
        layer = res.layers[0]
        assert layer.checked == 2 and len(set(layer.sampled)) == 2 and set(layer.sampled) <= set(range(8))
        assert verify(src, out, device="cpu", sample=2, seed=seed, hash_files=False).layers[0].sampled == layer.sampled
        drawn.append(tuple(sorted(layer.sampled)))
    assert len(set(drawn)) > 1 and any(d != (0, 1) for d in drawn)  # not always the first N
    # a damaged expert outside 0..N-1 is found by the seeds that draw it, and only by those
    _flip(out, f"{P}.w2_weight", 7 * 64 * 16 + 3)  # expert 7 of [8, 64, 16]
    for seed, d in enumerate(drawn):
        if 7 in d:
            _expect_fail(src, out, "expert 7", sample=2, seed=seed, hash_files=False)
        else:
            verify(src, out, device="cpu", sample=2, seed=seed, hash_files=False)


def _expect_fail(src: Path, out: Path, needle: str, **kw) -> str:
    with pytest.raises(CheckFailed) as ei:
        verify(src, out, device="cpu", **kw)
    msg = str(ei.value)
    assert needle in msg, msg
    return msg


def test_tampered_file_fails_the_hash_check(converted):
    src, out = converted()
    # bytes no other check looks at: the order of a shard's header entries (same size, same meaning)
    shard, _, _ = _locate(out, f"{P}.w13_weight")
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    hdr = json.loads(data[8 : 8 + n])
    js = json.dumps(dict(reversed(list(hdr.items()))), separators=(",", ":")).encode()
    js += b" " * (n - len(js))
    assert len(js) == n and js != data[8 : 8 + n]
    shard.write_bytes(data[:8] + js + data[8 + n :])
    _expect_fail(src, out, "sha256 differs from manifest")


class _NoHub:
    """A Hub client that must never be reached: push has to refuse before any call."""

    def __getattr__(self, name):
        raise AssertionError(f"push called the Hub ({name}) for a folder that does not match its manifest")


@pytest.mark.parametrize("name", ["model.safetensors.index.json", "config.json", "README.md"])
def test_a_same_size_edit_of_any_file_fails_verify_and_push(converted, name):
    """Not only the shards: the index, the configs and the model card convert wrote are covered by the
    manifest."""
    from nvfp4_fuse.hub import push

    src, out = converted()
    data = (out / name).read_bytes()
    k = data.index(b": ") + 1  # a space after a colon becomes a tab: same size, same JSON
    (out / name).write_bytes(data[:k] + b"\t" + data[k + 1 :])
    _expect_fail(src, out, f"{name}: sha256 differs from manifest")
    with pytest.raises(InputError, match="does not match its manifest"):
        push(out, "me/x", api=_NoHub())


def test_multi_shard_output_verifies_and_a_wrong_index_entry_is_found(converted, tmp_path):
    from nvfp4_fuse.manifest import load_manifest, save_manifest, sha256_file

    src, out = converted(experts=6)
    out2 = tmp_path / "multi"
    convert(src, out2, ConvertOptions(target="vllm-fused", max_shard_size=20_000))
    idx_path = out2 / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 2
    verify(src, out2, device="cpu")
    # the index names another shard for one tensor; the manifest is made to agree, so only the
    # structure check stands between this folder and a loader that would look in the wrong file
    name = f"{P}.w2_weight_scale"
    idx["weight_map"][name] = next(s for s in shards if s != idx["weight_map"][name])
    idx_path.write_text(json.dumps(idx, indent=2) + "\n")
    man = load_manifest(out2)
    man.files[idx_path.name] = {"size": idx_path.stat().st_size, "sha256": sha256_file(idx_path)}
    save_manifest(out2, man)
    _expect_fail(src, out2, name)


def test_tampered_weight_byte_is_located(converted):
    src, out = converted()
    # expert 2, up half (gate-up order: rows 32..63), row 40, byte 7
    per_expert = 64 * 32
    _flip(out, f"{P}.w13_weight", 2 * per_expert + 40 * 32 + 7)
    msg = _expect_fail(src, out, "w13_weight: expert 2 up packed bytes differ", hash_files=False)
    assert "[8, 7]" in msg


@pytest.mark.parametrize("group_row", [random.randrange(8) for _ in range(2)])
def test_tampered_interleaved_weight_byte_is_located(converted, group_row):
    """mega-moe's w13 alternates groups of 8 gate and 8 up rows: a byte of a random up row of a random
    expert is named by role and by its row in the source's up half."""
    src, out = converted("mega-moe", hidden=512, inter=512)
    row_bytes, e, group, col = 256, random.randrange(4), random.randrange(64), random.randrange(256)
    out_row = group * 16 + 8 + group_row  # the up rows of group `group` follow its 8 gate rows
    _flip(out, f"{P}.w13_weight", e * 1024 * row_bytes + out_row * row_bytes + col)
    msg = _expect_fail(src, out, f"w13_weight: expert {e} up packed bytes differ", hash_files=False)
    assert f"[{group * 8 + group_row}, {col}]" in msg


def test_tampered_swizzled_scale_is_located(converted):
    src, out = converted()
    _, _, n = _locate(out, f"{P}.w2_weight_scale")
    per_expert = n // 4
    _flip(out, f"{P}.w2_weight_scale", 3 * per_expert + 0, xor=0x01)  # swizzle offset 0 = scale (0, 0)
    msg = _expect_fail(src, out, "w2_weight_scale: expert 3 down block scale at [0, 0]", hash_files=False)
    assert "differs" in msg


def test_tampered_global_scale(converted):
    src, out = converted()
    _flip(out, f"{P}.w13_input_scale", 4 * 1 + 2)
    _expect_fail(src, out, f"{P}.w13_input_scale differs", hash_files=False)


def test_tampered_copied_tensor(converted):
    src, out = converted()
    _flip(out, "layers.1.self_attn.o_proj.weight", 100)
    _expect_fail(src, out, "layers.1.self_attn.o_proj.weight is not byte-identical", hash_files=False)


def test_incomplete_output_is_never_complete(converted):
    src, out = converted()
    (out / MANIFEST_NAME).unlink()
    _expect_fail(src, out, "conversion is incomplete")


def test_other_source_is_refused(converted, make_ckpt):
    _, out = converted()
    other_shape = make_ckpt(layers=2, experts=5, hidden=64, inter=32, unequal_scale_2=True)
    _expect_fail(other_shape, out, "not those this output was converted from")
    # same headers, other bytes: the header fingerprint matches, the byte checks do not
    other_bytes = make_ckpt(layers=2, experts=4, hidden=64, inter=32, unequal_scale_2=True)
    _expect_fail(other_bytes, out, "not byte-identical")


def test_verify_cli_exit_codes_and_json(converted):
    src, out = converted()
    r = run_cli("verify", str(src), str(out), "--json", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["ok"] and body["modules"][0]["checked"] == 4
    assert not (out / "nvfp4-fuse-verify.json").exists()  # verify writes nothing into what it checks
    _flip(out, f"{P}.w2_weight", 3)
    r = run_cli("verify", str(src), str(out), "--device", "cpu", "--skip-hashes")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "w2_weight: expert 0 down packed bytes differ" in r.stderr
    r = run_cli("verify", str(src), str(out / "nope"))
    assert r.returncode == 2


def test_verify_mega_moe_names_a_flipped_scale_word(make_ckpt, tmp_path):
    src = make_ckpt(layers=2, experts=3, hidden=512, inter=512, unequal_scale_2=True)
    out = tmp_path / "mm"
    convert(src, out, ConvertOptions())
    assert verify(src, out, device="cpu").target == "mega-moe"
    # a flipped int32 scale word is found and named in natural coordinates
    _flip(out, f"{P}.w13_weight_scale", 4 * 5 + 1, xor=0x01)
    _expect_fail(src, out, "w13_weight_scale: expert 0", hash_files=False)


def test_rescale_bound_covers_subnormal_and_clamped_scales_and_catches_a_two_step_error():
    import torch

    from nvfp4_fuse.nvfp4 import rescale_block_scales
    from nvfp4_fuse.verify_checks import block_errors

    s = torch.randint(0x01, 0x30, (64, 2), dtype=torch.uint8)  # many subnormal
    s2_src, c = 1e-4, 3.7e-4
    r = float(torch.tensor(s2_src, dtype=torch.float32) / torch.tensor(c, dtype=torch.float32))
    new = rescale_block_scales(s.view(torch.float8_e4m3fn), r).view(torch.uint8)
    rel, ok = block_errors(s.numpy(), s2_src, new.numpy(), c)
    assert ok.all() and rel.max() > 0.0625  # the RNE rescale, subnormal and clamped blocks included
    bad = new.clone()
    k = (bad > 0x10).nonzero()[0].tolist()
    bad[k[0], k[1]] += 2  # two E4M3 steps off, in the normal range
    rel, ok = block_errors(s.numpy(), s2_src, bad.numpy(), c)
    assert not ok[k[0], k[1]] and ok.sum() == ok.size - 1


@pytest.mark.parametrize("x,ok", [(0.935, False), (0.945, True), (1.0, True), (1.065, True), (1.07, False)])
def test_rescale_tolerance_is_exactly_half_an_e4m3_step(x, ok):
    """A stored block scale s' = 1.0 where the exact rescaled scale is x: allowed iff |s' - x| <= x/16.

    Both sides of the bound are pinned within about one percent of it, in E4M3's normal range, so a
    looser (or tighter) tolerance fails here every time.
    """
    from nvfp4_fuse.verify_checks import block_errors

    one = np.full((3, 5), 0x38, dtype=np.uint8)  # E4M3 1.0, source and output alike
    rel, within = block_errors(one, 1.0, one, 1 / x)  # x = (1.0 * 1.0) / c
    assert bool(within.all()) == ok and np.allclose(rel, abs(1 - x) / x)


def test_a_block_scale_beyond_the_bound_fails_verify(make_ckpt, tmp_path, monkeypatch):
    """End to end through verify: an output whose rescaled block scales are all one E4M3 step too
    big is refused by the bound, even if the exactness check is told to expect those very bytes."""
    # enough rescaled blocks that a one-step error lands outside the bound in some (how far outside
    # depends on each scale's mantissa and on how the exact value rounded)
    src = make_ckpt(layers=2, experts=4, hidden=256, inter=128, unequal_scale_2=True)
    real = piece_checks.rescale_table

    def one_step_up(ratio):  # the exactness check now expects what the converter wrote
        b = real(ratio)
        return np.where((b > 0x08) & (b < 0x7E), b + 1, b).astype(np.uint8)

    import nvfp4_fuse.host_layout as hl

    real_np = hl.rescale_block_scales

    def one_step_up_np(raw, ratio):
        new, change = real_np(raw, ratio)
        if ratio == 1.0:  # copied halves stay copies
            return new, change
        return np.where((new > 0x08) & (new < 0x7E), new + 1, new).astype(np.uint8), change

    monkeypatch.setattr("nvfp4_fuse.convert.rescale_block_scales", one_step_up_np)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target="linear"))
    monkeypatch.setattr(piece_checks, "rescale_table", one_step_up)
    _expect_fail(src, out, "more than half an E4M3 step")


def test_verify_memory_is_a_fixed_budget_not_the_model(converted):
    """The pass holds at most its read-ahead budget (or one piece, if larger) of output bytes, with
    every check running, whatever the number of experts; the end-to-end compare works per expert."""
    src, out = converted(target="mega-moe", experts=12, hidden=512, inter=512)
    per_expert_w13 = 2 * 512 * 512 // 2
    budget = 3 * per_expert_w13
    res = verify(src, out, device="cpu", decode=True, budget_bytes=budget, workers=4)
    assert res.layers[0].checked == 12 and res.layers[0].decoded == 12
    assert 0 < res.peak_read_ahead <= budget
    layer_w13 = 12 * per_expert_w13
    assert res.peak_read_ahead < layer_w13 / 3  # never a stacked layer


def verify_mapped_at_close(monkeypatch) -> list[int]:
    """Records, as each verify() closes its mappings, the bytes of both checkpoints still mapped."""
    return mapped_at_close(monkeypatch, piece_checks.PieceChecker, lambda v: (*v.src_m.values(), *v.conv_m.values()))


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("shards", ["few", "many"])
def test_verify_leaves_no_page_of_either_checkpoint_mapped(make_ckpt, tmp_path, monkeypatch, decode, shards):
    """Whatever the pass reads through the mappings it drops from them again: after it, nothing of
    either checkpoint is mapped (not the few KiB to 2 MiB of every tensor that a read fault maps
    beside what it reads: gigabytes at DeepSeek's 23,000 experts), whether the output is one shard
    or a shard a tensor (each its own mapping, streamed side by side)."""
    target = random.choice(["vllm-fused", "mega-moe", "linear"])
    src = make_ckpt(layers=3, experts=random.randint(8, 16), hidden=512, inter=512, unequal_scale_2=True)
    out = tmp_path / "out"
    convert(src, out, ConvertOptions(target=target, max_shard_size=300_000 if shards == "many" else 5 << 30))
    seen = verify_mapped_at_close(monkeypatch)
    res = verify(src, out, device="cpu", decode=decode, workers=random.choice([1, 2, 4]))
    assert res.layers[0].checked == res.layers[0].experts
    assert seen == [0], f"{seen[0] >> 10} KiB still mapped after the pass ({target})"


def test_the_rescaled_half_check_agrees_with_the_elementwise_one():
    """rescaled_half_problem checks the bound on the distinct source bytes present; it must say exactly
    what checking every block one by one says, on fresh random scales, right or tampered."""
    import torch

    from nvfp4_fuse.nvfp4 import rescale_block_scales
    from nvfp4_fuse.verify_checks import block_errors, rescaled_half_problem

    for _ in range(20):
        src = np.random.randint(0, 0x7F, (64, 8)).astype(np.uint8)
        s2, c = float(np.float32(np.random.uniform(1e-5, 1e-3))), float(np.float32(np.random.uniform(1e-3, 2e-3)))
        ratio = float(np.float32(s2) / np.float32(c))
        table = rescale_block_scales(torch.arange(256, dtype=torch.uint8), ratio).view(torch.uint8).numpy()
        new = table[src]
        if np.random.rand() < 0.5:  # tamper with one block by a step or two
            r, k = np.random.randint(64), np.random.randint(8)
            new[r, k] = min(0x7E, new[r, k] + np.random.randint(1, 3))
        rel, problem = rescaled_half_problem(src, new, table, s2, c)
        rel_e, ok_e = block_errors(src, s2, new, c)
        exact = np.array_equal(new, table[src])
        assert (problem is None) == (exact and ok_e.all())
        if problem is None:
            assert rel == rel_e.max()
    # a larger half: a tampered byte anywhere is found and placed
    src = np.random.randint(0, 0x7F, (600, 256)).astype(np.uint8)
    table = rescale_block_scales(torch.arange(256, dtype=torch.uint8), 0.37).view(torch.uint8).numpy()
    new = table[src]
    r, k = np.random.randint(600), np.random.randint(256)
    new[r, k] ^= 0x01
    assert rescaled_half_problem(src, new, table, 1.0, 1 / 0.37)[1] == f"[{r}, {k}] differs from the rescaled source's"
    # bytes that match the table but a table off by a step: only the bound can catch that
    src = np.random.randint(0x30, 0x70, (64, 8)).astype(np.uint8)
    table = rescale_block_scales(torch.arange(256, dtype=torch.uint8), 0.5).view(torch.uint8).numpy().copy()
    a = int(src[np.random.randint(64), np.random.randint(8)])
    table[a] += 2
    rel, problem = rescaled_half_problem(src, table[src], table, 1.0, 2.0)
    r, k = (int(i[0]) for i in np.nonzero(src == a))
    assert problem is not None and problem.startswith(f"at [{r}, {k}]") and "off the source" in problem


@pytest.mark.parametrize("backlog", ["roomy", "one part"])
def test_gpu_decodes_go_to_the_decode_process_and_each_runs_once(converted, monkeypatch, backlog):
    """The GPU path sends each decode to the decode process (here in its CPU mode: the same messages,
    the kernel's torch reference in place of the kernel) and goes on with the pass: every expert part
    is decoded exactly once, nothing of either checkpoint stays mapped here, and the result is the
    in-process CPU reference's. "one part": the worker's backlog holds one part's values, so the pass
    waits for it part by part."""
    from collections import Counter

    from nvfp4_fuse import decode_process

    target = random.choice(["vllm-fused", "mega-moe", "linear"])
    experts = random.randint(6, 12)
    hidden, inter = (512, 512) if target == "mega-moe" else (64, 32)
    src, out = converted(target, experts=experts, hidden=hidden, inter=inter)
    ref = verify(src, out, device="cpu", decode=True)
    proc = decode_process.DecodeProcess("cpu")
    if backlog == "one part":
        proc.backlog = 1
    monkeypatch.setattr(ver, "pick_device", lambda device: "cuda")
    monkeypatch.setattr(decode_process, "shared", lambda device="cuda": proc)
    decoded: Counter = Counter()
    real_stats = decode_process.DecodeChannel._stats

    def counting(self, key, row):
        decoded[key[:3]] += 1
        return real_stats(self, key, row)

    monkeypatch.setattr(decode_process.DecodeChannel, "_stats", counting)
    seen = verify_mapped_at_close(monkeypatch)
    try:
        got = verify(src, out, device="cuda", workers=random.choice([1, 2, 4]))
    finally:
        proc.close()
    assert seen == [0], f"{seen[0] >> 10} KiB still mapped after the pass"
    assert sorted(decoded.values()) == [1] * (2 * experts), decoded  # one MoE layer: w13 and w2 of each expert
    assert got.device == "cuda" and proc.batches == {"cpu": 2 * experts}
    for g, c in zip(got.layers, ref.layers):
        assert g.decoded == c.decoded == experts
        assert g.max_abs == c.max_abs and g.max_rel == c.max_rel


_REPORT_IMPORTS = (
    "import atexit, sys; atexit.register(lambda: print('imported:', "
    "sorted(m for m in ('torch', 'triton') if m in sys.modules), file=sys.stderr)); "
)


@pytest.mark.parametrize("how", ["verify(device='cpu')", "verify(device='auto')", "cli --device cpu"])
def test_a_cpu_verify_never_imports_torch(converted, how):
    """The CPU path is numpy only, like convert's: torch (1.3 s to import) and Triton are imported only
    when a GPU decode runs. Rescaled halves, so the block-scale check's RNE table is worked out too."""
    import subprocess
    import sys

    if how.endswith("'auto')") and ver.gpu_may_be_there():
        pytest.skip("auto picks the GPU where there may be one")
    src, out = converted("vllm-fused", unequal_scale_2=True)
    if how.startswith("cli"):
        code = _REPORT_IMPORTS + (
            f"sys.argv = ['nvfp4-fuse', 'verify', {str(src)!r}, {str(out)!r}, '--device', 'cpu']; "
            "from nvfp4_fuse.cli import main; main()"
        )
    else:
        code = _REPORT_IMPORTS + (
            f"from nvfp4_fuse.verify import verify; r = {how[:-1]}, source_dir={str(src)!r}, conv_dir={str(out)!r}); "
            "assert r.device == 'cpu' and r.layers[0].rescaled == 4 and r.layers[0].checked == 4, r"
        )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "imported: []" in r.stderr, r.stderr


def test_the_block_scale_check_rescales_as_the_torch_reference_does():
    """verify's own RNE table (float32 bits, no torch) against the reference the converter is held to,
    for every byte, at ratios over the whole range a rescale uses (subnormal results and clamps too)."""
    import torch

    from nvfp4_fuse.nvfp4 import rescale_block_scales
    from nvfp4_fuse.verify_checks import rescale_table

    ratios = [1.0, 0.5, 2.0**-12, float(np.nextafter(np.float32(1), np.float32(0)))]
    ratios += [k / 64 for k in range(1, 64)]  # products halfway between two E4M3 values: ties to even
    ratios += [float(2.0 ** random.uniform(-14, 0)) for _ in range(300)]
    for ratio in ratios:
        want = rescale_block_scales(torch.arange(256, dtype=torch.uint8), ratio).view(torch.uint8).numpy()
        assert np.array_equal(rescale_table(ratio), want), ratio
