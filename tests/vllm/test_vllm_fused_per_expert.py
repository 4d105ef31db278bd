"""A fused checkpoint on the per-expert NVFP4 backends (and on MegaMoE in another target): the plugin
recovers each expert's tensors and vLLM's own per-expert weight_loader loads them. After
``load_weights`` every parameter holds exactly the bytes the per-expert source gives (with its gate/up
``weight_scale_2`` merged, where they differ), on every rank of several EP sizes, for both published
recipes and every target the converter writes."""

from __future__ import annotations

import contextlib
import json

import checkpoints
import harness
import pytest
import torch
from test_vllm_loading import RecordingSlice, assert_same_state

E, LAYERS = 8, 2
TARGETS = [("mega-moe", "gate-up"), ("vllm-fused", "gate-up"), ("vllm-fused", "up-gate"), ("linear", "gate-up")]


@pytest.fixture(scope="module")
def seed_m():
    import random

    return random.randrange(2**31)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, seed_m):
    """Per-expert sources (both recipes; one with unequal gate/up weight_scale_2 and its merged
    form) and the fused checkpoints convert writes of them, keyed (source, target, w13 order)."""
    root = tmp_path_factory.mktemp("per-expert-backends")
    src = {r: checkpoints.write_source(root / r, r, seed=seed_m) for r in ("nvidia", "canada")}
    src["unequal"] = checkpoints.write_source(root / "unequal", "nvidia", seed=seed_m + 1, unequal_scale_2=True)
    src["merged"] = checkpoints.write_merged_source(src["unequal"], root / "merged")
    fused = {}
    for name in ("nvidia", "canada", "unequal"):
        for target, order in TARGETS:
            if name != "nvidia" and (target, order) not in (("mega-moe", "gate-up"), ("linear", "gate-up")):
                continue
            fused[(name, target, order)] = checkpoints.make_fused_checkpoint(
                src[name], root / f"{name}-{target}-{order}", target, order
            )
    return src, fused


def loaded(folder, backend, *, ep_size=1, ep_rank=0, redundant=0):
    cfg = harness.engine_config(folder, redundant=redundant, backend=backend)
    model = harness.build(cfg, ep_size=ep_size, ep_rank=ep_rank)
    if backend != harness.MEGA:
        harness.poison_routed_experts(model)
    harness.load(model, cfg)
    return model


def state(model, backend):
    return harness.experts_state(model) if backend == harness.MEGA else harness.routed_state(model)


def assert_loads_alike(a, b, backend, ep_size, redundant, what):
    for rank in range(ep_size):
        ma = loaded(a, backend, ep_size=ep_size, ep_rank=rank, redundant=redundant)
        mb = loaded(b, backend, ep_size=ep_size, ep_rank=rank, redundant=redundant)
        assert_same_state(state(ma, backend), state(mb, backend), f"{what}: {backend} EP {ep_size} rank {rank} +{redundant}")


# (EP size, redundant experts): even and uneven shares (EP 3 splits 8 experts 3/3/2), one expert a
# rank, EPLB replicas that wrap around to logical expert 0.
EP_CASES = [(1, 0), (2, 0), (3, 0), (8, 0), (2, 2), (4, 4)]


@pytest.mark.parametrize("backend", harness.PER_EXPERT_BACKENDS)
@pytest.mark.parametrize(("ep_size", "redundant"), EP_CASES)
def test_fused_loads_the_bytes_of_its_source_on_every_rank(plugin, ckpts, backend, ep_size, redundant):
    src, fused = ckpts
    assert_loads_alike(src["nvidia"], fused[("nvidia", "mega-moe", "gate-up")], backend, ep_size, redundant, "mega-moe")


@pytest.mark.parametrize("backend", harness.PER_EXPERT_BACKENDS)
@pytest.mark.parametrize(("recipe", "target", "order"), [("nvidia", *t) for t in TARGETS] + [
    ("canada", "mega-moe", "gate-up"), ("canada", "linear", "gate-up")])
def test_every_target_and_recipe(plugin, ckpts, backend, recipe, target, order):
    src, fused = ckpts
    assert_loads_alike(src[recipe], fused[(recipe, target, order)], backend, 2, 2, f"{recipe} {target} {order}")


@pytest.mark.parametrize("backend", harness.PER_EXPERT_BACKENDS)
@pytest.mark.parametrize("target", ["mega-moe", "linear"])
def test_unequal_gate_up_scale_2_loads_as_the_merged_source(plugin, ckpts, backend, target):
    """Where w1 and w3 weight_scale_2 differ, the fused checkpoint is the source with them merged
    (max, the smaller half's block scales rescaled); loading the unmerged source gives other bytes."""
    src, fused = ckpts
    assert_loads_alike(src["merged"], fused[("unequal", target, "gate-up")], backend, 2, 0, f"merged vs {target}")
    as_is = state(loaded(src["unequal"], backend), backend)
    merged = state(loaded(src["merged"], backend), backend)
    differ = {k for k in as_is if not torch.equal(as_is[k], merged[k])}
    assert differ == {f"{n}.{p}" for n in range(LAYERS) for p in ("w13_weight_scale", "w13_weight_scale_2")}


@pytest.mark.parametrize(("target", "order"), [t for t in TARGETS if t[0] != "mega-moe"])
@pytest.mark.parametrize(("ep_size", "redundant"), [(1, 0), (4, 4), (3, 1)])
def test_mega_moe_backend_loads_other_targets_through_its_per_expert_loader(plugin, ckpts, target, order, ep_size, redundant):
    """deep_gemm_mega_moe with a vllm-fused or linear checkpoint: each expert recovered and packed
    by vLLM's MegaMoE weight_loader, as for the per-expert source (the L2 activation scale too)."""
    src, fused = ckpts
    assert_loads_alike(src["nvidia"], fused[("nvidia", target, order)], harness.MEGA, ep_size, redundant, target)


def _load_through_slices(folder, backend, ep_size, rank, redundant):
    """``load_weights`` with every fused expert tensor handed over as a recording safetensors slice
    handle; returns the model and ``{field: {(layer, start, stop)}}`` of the rows read."""
    from safetensors import safe_open
    from vllm.config import set_current_vllm_config

    cfg = harness.engine_config(folder, redundant=redundant, backend=backend)
    model = harness.build(cfg, ep_size=ep_size, ep_rank=rank)
    if backend != harness.MEGA:
        harness.poison_routed_experts(model)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    log: list = []
    with contextlib.ExitStack() as stack:
        files = {f: stack.enter_context(safe_open(folder / f, "pt")) for f in set(weight_map.values())}

        def weights():
            for name, fname in weight_map.items():
                if ".experts.w" in name:
                    yield name, RecordingSlice(files[fname], name, log)
                else:
                    yield name, files[fname].get_tensor(name)

        with set_current_vllm_config(cfg):
            model.load_weights(weights())
    reads: dict = {}
    for name, a, b in log:
        reads.setdefault(name.rsplit(".", 1)[1], set()).add((name.split(".")[1], a, b))
    return model, reads


# backend, target, (EP size, rank, redundant), the runs of logical experts the rank holds, the fields
# read for every expert (global scales).
READ_CASES = [
    ("flashinfer_cutedsl", "mega-moe", (4, 1, 0), [(2, 4)], {"w13_input_scale", "w2_input_scale"}),
    ("flashinfer_cutedsl", "linear", (4, 3, 4), [(1, 4)], {"w13_input_scale", "w2_input_scale"}),
    ("flashinfer_moe_ep_cutedsl", "vllm-fused", (4, 2, 4), [(0, 1), (6, 8)], set()),
    ("flashinfer_moe_ep_cutedsl", "mega-moe", (3, 2, 0), [(6, 8)], set()),
    (harness.MEGA, "linear", (4, 2, 4), [(0, 1), (6, 8)], {"w2_input_scale"}),
]


@pytest.mark.parametrize(("backend", "target", "ep", "runs", "every"), READ_CASES)
def test_a_rank_reads_only_its_experts_rows(plugin, ckpts, backend, target, ep, runs, every):
    """Each rank asks only for its logical experts' rows, one slice a run of consecutive experts,
    except the per-expert scalars the backend's loader keeps for all experts; the result equals a
    normal load."""
    src, fused = ckpts
    folder = fused[("nvidia", target, "gate-up")]
    model, reads = _load_through_slices(folder, backend, *ep)
    for field in ("w13_weight", "w13_weight_scale", "w13_weight_scale_2", "w13_input_scale",
                  "w2_weight", "w2_weight_scale", "w2_weight_scale_2", "w2_input_scale"):
        want = [(0, E)] if field in every else runs
        if backend == harness.MEGA and field == "w13_input_scale":
            want = []  # NVFP4 MegaMoE has no parameter for it: never read
        assert reads.get(field, set()) == {(str(n), a, b) for n in range(LAYERS) for a, b in want}, field
    size, rank, redundant = ep
    assert_same_state(state(model, backend), state(loaded(src["nvidia"], backend, ep_size=size, ep_rank=rank,
                                                          redundant=redundant), backend), "slices vs per-expert")


def test_a_fused_tensor_of_the_wrong_dtype_is_named(plugin, ckpts):
    """A F32 block scale where the target has E4M3 would be converted silently by copy_; it is refused."""
    from nvfp4_fuse.vllm.fused import FusedCheckpointError

    _, fused = ckpts
    cfg = harness.engine_config(fused[("nvidia", "linear", "gate-up")], backend="flashinfer_cutedsl")
    model = harness.build(cfg)
    bad = torch.ones(E, 2 * 512, 512 // 16, dtype=torch.float32)
    with pytest.raises(FusedCheckpointError, match=r"layers\.1\.ffn\.experts\.w13_weight_scale: F32 \[8, 1024, 32\], but "
                       r"target linear .* has F8_E4M3 \[8, 1024, 32\]"):
        model.model.load_weights([("layers.1.ffn.experts.w13_weight_scale", bad)])


@pytest.mark.parametrize("backend", ["flashinfer_cutlass", "flashinfer_trtllm", "cutlass", "marlin"])
def test_the_other_per_expert_nvfp4_backends(plugin, ckpts, backend):
    """FlashInfer CUTLASS and TRTLLM (global input scales), vLLM CUTLASS and Marlin (per expert) build
    the same ModelOptNvFp4FusedMoE parameters; a fused checkpoint loads their per-expert bytes."""
    src, fused = ckpts
    assert_loads_alike(src["nvidia"], fused[("nvidia", "mega-moe", "gate-up")], backend, 2, 2, "mega-moe")


def test_unequal_gate_up_input_scales_give_the_kernels_the_same_activation_scale(plugin, ckpts, tmp_path):
    """A fused checkpoint keeps one w13 input scale per expert (the max of w1's and w3's), given to
    both halves; the loaded [E, 2] parameter then differs from the source's, but not the activation
    scale vLLM derives from it: the max over all experts (FlashInfer backends) or over w1 and w3 of
    each expert (vLLM CUTLASS), computed here with vLLM's own reductions."""
    import shutil

    from vllm.model_executor.layers.quantization.utils.quant_utils import amax_for_moe_activation_quant

    src, _ = ckpts
    odd = tmp_path / "odd-input-scales"
    odd.mkdir()
    for f in src["nvidia"].iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, odd / f.name)
    tensors = checkpoints.read_all(src["nvidia"])
    for name in [n for n in tensors if n.endswith(".w3.input_scale")]:
        tensors[name] = tensors[name] * (1.5 if int(name.split(".")[4]) % 2 else 0.5)
    checkpoints.write_shards(odd, tensors)
    fused = checkpoints.make_fused_checkpoint(odd, tmp_path / "fused")
    for backend in harness.PER_EXPERT_BACKENDS:
        a, b = loaded(odd, backend), loaded(fused, backend)
        for n in range(LAYERS):
            sa, sb = harness.routed_experts(a, n).w13_input_scale.data, harness.routed_experts(b, n).w13_input_scale.data
            assert not torch.equal(sa, sb)
            assert torch.equal(sb[:, 0], sb[:, 1]) and torch.equal(sb[:, 0], sa.max(dim=1).values)
            assert torch.equal(amax_for_moe_activation_quant(sa, False), amax_for_moe_activation_quant(sb, False))
        sa, sb = harness.routed_state(a), harness.routed_state(b)
        assert {k for k in sa if not torch.equal(sa[k], sb[k])} == {f"{n}.w13_input_scale" for n in range(LAYERS)}
