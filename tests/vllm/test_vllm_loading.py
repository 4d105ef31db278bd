"""Loading checkpoints into vLLM's DeepSeek-V4 the way ``vllm serve`` does (DefaultModelLoader ->
``load_weights``): stock vLLM's KeyError, the plugin's per-expert and fused loads, on every rank of
several EP sizes, with redundant experts."""

from __future__ import annotations

import checkpoints
import contract
import harness
import numpy as np
import pytest
import torch

E, LAYERS = 8, 2


@pytest.fixture(scope="module")
def seed_m():
    import random

    return random.randrange(2**31)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, seed_m):
    root = tmp_path_factory.mktemp("load")
    src = {r: checkpoints.write_source(root / r, r, seed=seed_m) for r in ("nvidia", "canada")}
    src["fused"] = checkpoints.make_fused_checkpoint(src["nvidia"], root / "fused")
    content = checkpoints.source_content(checkpoints.Dims(), seed_m)
    expected = {n: contract.expected_fused(content, n, E) for n in range(LAYERS)}
    return src, content, expected


def loaded(folder, *, ep_size=1, ep_rank=0, redundant=0):
    cfg = harness.engine_config(folder, redundant=redundant)
    model = harness.build(cfg, ep_size=ep_size, ep_rank=ep_rank)
    harness.load(model, cfg)
    return model


def raw(p: torch.Tensor) -> torch.Tensor:
    """A parameter's bytes in storage order (MN-major scales transposed back)."""
    t = p.data if p.is_contiguous() else p.data.transpose(-1, -2)
    return t.contiguous().view(torch.uint8)


def assert_same_state(a: dict, b: dict, what: str):
    assert a.keys() == b.keys()
    for k in a:
        same = a[k] == b[k] if isinstance(a[k], float) else torch.equal(a[k], b[k])
        assert same, f"{what}: {k} differs"


def assert_holds_logical_experts(model, expected, seed):
    """Every local slot of every layer holds exactly the contract's bytes of logical expert
    ``(start + slot) % E``; the L2 activation scale is the max of w2_input_scale over all experts."""
    for n, layer in enumerate(harness.backbone(model).layers):
        experts, want = layer.ffn.experts, expected[n]
        ids = [(experts.experts_start_idx + j) % E for j in range(experts.num_local_experts)]
        for name in ("w13_weight", "w2_weight", "w13_weight_scale_2", "w2_weight_scale_2", "w2_input_scale"):
            got = getattr(experts, name).data.numpy()
            assert np.array_equal(got.view(np.uint8), want[name][ids].view(np.uint8)), f"seed {seed}: layer {n} {name}"
        for name in ("w13_weight_scale", "w2_weight_scale"):
            got = getattr(experts, name).data.transpose(-1, -2).contiguous().numpy()
            assert np.array_equal(got, want[name][ids]), f"seed {seed}: layer {n} {name}"
        assert experts.l2_activation_scale == float(want["w2_input_scale"].max())
        assert np.array_equal(experts._w2_input_scales.numpy(), want["w2_input_scale"])


@pytest.mark.parametrize("recipe", ["nvidia", "canada"])
def test_stock_vllm_raises_the_keyerror_and_the_plugin_loads(plugin, sources, recipe, seed_m):
    src, _, expected = sources
    cfg = harness.engine_config(src[recipe])
    stock = harness.build(cfg, harness.STOCK)
    with pytest.raises(KeyError, match=r"layers\.0\.ffn\.experts\.w13_input_scale"):
        harness.load(stock, cfg)
    # The experts built NVFP4 are not enough: vLLM's own DeepseekV4Model.load_weights still looks
    # the w1/w3 input scales up as parameters.
    model = harness.build(cfg)
    mapped = model.hf_to_vllm_mapper.apply(checkpoints.read_all(src[recipe]).items())
    with pytest.raises(KeyError, match=r"layers\.0\.ffn\.experts\.w13_input_scale"):
        harness.dsv4.DeepseekV4Model.load_weights(
            model.model, ((n.removeprefix("model."), t) for n, t in mapped if n.startswith("model."))
        )
    model = loaded(src[recipe])
    assert_holds_logical_experts(model, expected, seed_m)


def test_both_recipes_load_to_the_same_bytes(plugin, sources):
    src, _, _ = sources
    assert_same_state(
        harness.experts_state(loaded(src["nvidia"])), harness.experts_state(loaded(src["canada"])), "nvidia vs canada"
    )


def test_shared_expert_is_fused_as_stock_vllm_fuses_it(plugin, sources):
    """The shared expert runs inside the MegaMoE launch (vLLM's choice, kept); its parameters hold
    what stock vLLM's loader puts there."""
    src, _, _ = sources
    cfg = harness.engine_config(src["nvidia"])
    stock = harness.build(cfg, harness.STOCK)
    shared = [(n, t) for n, t in checkpoints.read_all(src["nvidia"]).items() if ".shared_experts." in n]
    harness.dsv4.DeepseekV4ForCausalLM.load_weights(stock, shared)
    for fused_ckpt in ("nvidia", "fused"):
        model = loaded(src[fused_ckpt])
        for a, b in zip(stock.model.layers, model.model.layers):
            assert a.ffn.experts.has_fused_shared_experts and b.ffn.experts.has_fused_shared_experts
            for name in ("shared_l1_weight", "shared_l1_weight_scale", "shared_l2_weight", "shared_l2_weight_scale"):
                pa, pb = raw(getattr(a.ffn.experts, name)), raw(getattr(b.ffn.experts, name))
                assert pa.any() and torch.equal(pa, pb), name


# (EP size, redundant experts): rank shares with and without EPLB replicas, ranks whose replicas
# wrap around to logical expert 0, and more replicas than experts.
EP_CASES = [(1, 0), (2, 0), (4, 0), (8, 0), (2, 2), (4, 4), (3, 1), (2, 10)]


@pytest.mark.parametrize(("ep_size", "redundant"), EP_CASES)
def test_fused_and_per_expert_load_the_same_bytes_on_every_rank(plugin, sources, ep_size, redundant, seed_m):
    src, _, expected = sources
    for rank in range(ep_size):
        per_expert = loaded(src["nvidia"], ep_size=ep_size, ep_rank=rank, redundant=redundant)
        fused = loaded(src["fused"], ep_size=ep_size, ep_rank=rank, redundant=redundant)
        assert_same_state(
            harness.experts_state(per_expert), harness.experts_state(fused), f"EP {ep_size} rank {rank} +{redundant}"
        )
        assert_holds_logical_experts(fused, expected, seed_m)
        # EPLB moves experts through these views; they still are (E_local, -1) and cover every
        # routed parameter.
        for layer in fused.model.layers:
            views = layer.ffn.experts.get_expert_weights()
            assert len(views) == 7 and all(v.shape[0] == layer.ffn.experts.num_local_experts for v in views)


class RecordingSlice:
    """A safetensors ``get_slice`` handle that records every range read from it."""

    def __init__(self, handle, name, log):
        self.s, self.name, self.log = handle.get_slice(name), name, log

    def get_shape(self):
        return self.s.get_shape()

    def get_dtype(self):
        return self.s.get_dtype()

    def __getitem__(self, idx):
        assert isinstance(idx, slice) and idx.step is None, idx
        self.log.append((self.name, idx.start, idx.stop))
        return self.s[idx]


@pytest.mark.parametrize(("ep_size", "rank", "redundant", "runs"), [(4, 1, 0, [(2, 4)]), (4, 2, 4, [(6, 8), (0, 1)])])
def test_a_rank_reads_only_its_experts_through_safetensors_slices(plugin, sources, ep_size, rank, redundant, runs):
    """The fused tensors handed to ``load_weights`` as safetensors slice handles: each rank asks only
    for its experts' rows (and for all of the 4-byte-per-expert w2_input_scale, whose max it needs);
    w13_input_scale is never read. The parameters equal those of a normal load."""
    import contextlib
    import json

    from safetensors import safe_open
    from vllm.config import set_current_vllm_config

    src, _, _ = sources
    cfg = harness.engine_config(src["fused"], redundant=redundant)
    model = harness.build(cfg, ep_size=ep_size, ep_rank=rank)
    weight_map = json.loads((src["fused"] / "model.safetensors.index.json").read_text())["weight_map"]
    log: list = []
    with contextlib.ExitStack() as stack:
        files = {f: stack.enter_context(safe_open(src["fused"] / f, "pt")) for f in set(weight_map.values())}

        def weights():
            for name, fname in weight_map.items():
                f = files[fname]
                if ".experts.w" in name:
                    yield name, RecordingSlice(f, name, log)
                else:
                    yield name, f.get_tensor(name)

        with set_current_vllm_config(cfg):
            model.load_weights(weights())
    reads = {}
    for name, a, b in log:
        reads.setdefault(name.rsplit(".", 1)[1], set()).add((name.split(".")[1], a, b))
    for field in ("w13_weight", "w13_weight_scale", "w13_weight_scale_2", "w2_weight", "w2_weight_scale", "w2_weight_scale_2"):
        assert reads[field] == {(str(n), a, b) for n in range(LAYERS) for a, b in runs}, field
    assert reads["w2_input_scale"] == {(str(n), a, b) for n in range(LAYERS) for a, b in runs + [(0, E)]}
    assert "w13_input_scale" not in reads
    assert_same_state(
        harness.experts_state(model),
        harness.experts_state(loaded(src["fused"], ep_size=ep_size, ep_rank=rank, redundant=redundant)),
        "slices vs vLLM's tensors",
    )


def test_a_fused_tensor_of_the_wrong_shape_is_named(plugin, sources, tmp_path):
    from nvfp4_fuse.vllm.fused import FusedCheckpointError

    src, _, _ = sources
    cfg = harness.engine_config(src["fused"])
    model = harness.build(cfg)
    bad = torch.zeros(E - 1, 2 * 512, 256, dtype=torch.int8)
    with pytest.raises(FusedCheckpointError, match=r"layers\.1\.ffn\.experts\.w13_weight: torch\.int8 \[7, 1024, 256\]"):
        model.load_weights([("layers.1.ffn.experts.w13_weight", bad)])


def _with_tensor_replaced(folder, out, name, tensor):
    """A copy of checkpoint ``folder`` (files linked) with tensor ``name`` replaced by ``tensor``."""
    import json

    from safetensors.torch import save_file

    out.mkdir()
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for f in folder.iterdir():
        if f.name != weight_map[name]:
            (out / f.name).symlink_to(f)
    tensors = checkpoints.read_all(folder)
    save_file({n: tensors[n] for n, f in weight_map.items() if f == weight_map[name]} | {name: tensor},
              out / weight_map[name], metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("field", ["w13_weight_scale", "w2_weight_scale", "w13_weight"])
def test_a_fused_tensor_of_the_right_shape_and_wrong_dtype_is_refused(plugin, sources, tmp_path, field):
    """A fused block scale stored F32 (each int32 word converted to a float) has the right shape;
    ``copy_`` into the int32 parameter would turn it into garbage scales without a word. Refused
    through vLLM's own loader, naming the tensor and both dtypes."""
    from nvfp4_fuse.vllm.fused import FusedCheckpointError

    src, _, _ = sources
    name = f"layers.1.ffn.experts.{field}"
    good = checkpoints.read_all(src["fused"])[name]
    bad = good.to(torch.float32) if field != "w13_weight" else good.view(torch.int8).to(torch.int16)
    assert bad.shape == good.shape and bad.dtype != good.dtype
    ckpt = _with_tensor_replaced(src["fused"], tmp_path / "bad", name, bad)
    cfg = harness.engine_config(ckpt)
    model = harness.build(cfg)
    with pytest.raises(FusedCheckpointError, match=rf"{name}: torch\.{str(bad.dtype)[6:]} \[.*\], but .* needs torch\.int"):
        harness.load(model, cfg)


@pytest.mark.parametrize("ckpt", ["nvidia", "fused"])
def test_post_load_hooks_run_as_this_vllm_release_runs_them(plugin, sources, ckpt):
    """The model-level post-load hook (``process_weights_after_loading`` ->
    ``finalize_mhc_broadcast_weights``) runs in the plugin's class exactly as vLLM's own class runs
    it in this release (``versions.py``): 0.33 inside ``load_weights`` and again from the loader's
    ``process_weights_after_loading``; 0.34 once, from ``finalize_model_weights``, after the load.
    Its result (layer 0's broadcast of ``hc_attn_fn``) is there and right."""
    from unittest import mock

    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    from nvfp4_fuse.vllm import vllm_version
    from nvfp4_fuse.vllm.versions import release_for

    src, _, _ = sources
    cfg = harness.engine_config(src[ckpt])
    model = harness.build(cfg)
    layer = model.model.layers[0]
    layer.hc_attn_fn.data.normal_()  # not in these checkpoints: fresh values for the hook to sum
    events: list[str] = []
    hook = harness.dsv4.DeepseekV4ForCausalLM.process_weights_after_loading
    mhc = harness.dsv4.DeepseekV4Model.finalize_mhc_broadcast_weights
    with (
        mock.patch.object(harness.dsv4.DeepseekV4ForCausalLM, "process_weights_after_loading",
                          lambda self: events.append("model hook") or hook(self)),
        mock.patch.object(harness.dsv4.DeepseekV4Model, "finalize_mhc_broadcast_weights",
                          lambda self: events.append("mhc") or mhc(self)),
    ):
        harness.load(model, cfg)
        events.append("loaded")
        with set_current_vllm_config(cfg):
            process_weights_after_loading(model, cfg.model_config, torch.device("cpu"))
    once = ["model hook", "mhc"]
    assert events == (once + ["loaded"] + once if release_for(vllm_version()).finalizes_during_load else ["loaded"] + once)
    want = layer.hc_attn_fn.detach().view(-1, layer.hc_mult, layer.hidden_size).sum(dim=1)
    assert torch.equal(layer.hc_attn_fn_broadcast, want)
