"""The converter's decoder of compressed block scales (``nvfp4_fuse/csf.py``) against vLLM 0.34's own
(``nvfp4_utils.decode_csf_scale``, ``csf_weights_transform``) on the same streams: the same bytes
where vLLM decodes, a refusal where vLLM refuses. vLLM 0.33 has no such decoder: skipped there."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

nvfp4_utils = pytest.importorskip("vllm.model_executor.layers.quantization.utils.nvfp4_utils")
if not hasattr(nvfp4_utils, "decode_csf_scale"):
    from importlib.metadata import version

    pytest.skip(f"vLLM {version('vllm')} has no compressed block-scale decoder (added in 0.34)", allow_module_level=True)

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from nvfp4_fuse import csf  # noqa: E402
from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint  # noqa: E402
from nvfp4_fuse.source import scan_source  # noqa: E402

ENCODINGS = sorted(csf.ENCODINGS)


def _scales(rng: np.random.Generator, rows: int, cols: int, outliers: float) -> np.ndarray:
    level = rng.integers(0, 0x70, size=(rows, 1))
    s = (level + rng.integers(0, 16, size=(rows, cols))).astype(np.uint8)
    far = rng.random((rows, cols)) < outliers
    s[far] = rng.integers(0, 256, size=int(far.sum())).astype(np.uint8)
    return s


def _shape(encoding: str, rng: np.random.Generator) -> tuple[int, int]:
    if encoding == "csf":
        return 16 * int(rng.integers(1, 30)), 2 * int(rng.integers(1, 80))
    return 32 * int(rng.integers(1, 12)), int(rng.integers(1, 160))


def _vllm(encoding: str, streams: dict[str, np.ndarray]) -> np.ndarray:
    out = nvfp4_utils.decode_csf_scale(encoding, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in streams.items()})
    assert out.dtype == torch.float8_e4m3fn
    return out.view(torch.uint8).numpy()


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_same_bytes_as_vllm_on_random_streams(encoding, seed):
    rng = np.random.default_rng(seed)
    exceptions = 0
    for _ in range(40):
        rows, cols = _shape(encoding, rng)
        streams = csf.encode(encoding, _scales(rng, rows, cols, float(rng.choice([0.0, 0.02, 0.3, 1.0]))))
        exceptions += streams[csf.ENCODINGS[encoding][-1]].size
        ours, theirs = csf.decode(encoding, streams), _vllm(encoding, streams)
        assert ours.shape == theirs.shape == (rows, cols)
        assert ours.tobytes() == theirs.tobytes()
    assert exceptions > 0


def _mutate(rng: np.random.Generator, streams: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in streams.items()}
    name = str(rng.choice(sorted(out)))
    a = out[name]
    how = int(rng.integers(0, 4))
    if how == 0 and a.size:  # one element anywhere
        a.reshape(-1)[rng.integers(0, a.size)] = rng.integers(0, np.iinfo(a.dtype).max + 1, dtype=np.uint64).astype(a.dtype)
    elif how == 1 and a.size:  # a small step of one element
        k = rng.integers(0, a.size)
        a.reshape(-1)[k] = (int(a.reshape(-1)[k]) + int(rng.choice([-2, -1, 1, 2]))) % (np.iinfo(a.dtype).max + 1)
    elif how == 2 and a.size:  # one element fewer
        out[name] = a.reshape(-1)[:-1] if a.ndim == 1 else a[:-1]
    else:  # one element more
        out[name] = np.concatenate((a.reshape(-1), a.reshape(-1)[:1])) if a.ndim == 1 else np.concatenate((a, a[:1]))
    return out


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_same_refusals_as_vllm_on_corrupted_streams(encoding, seed):
    """Random corruptions of valid streams: either both decoders refuse, or both give the same bytes."""
    rng = np.random.default_rng(seed)
    refused = decoded = 0
    for _ in range(400):
        rows, cols = _shape(encoding, rng)
        streams = _mutate(rng, csf.encode(encoding, _scales(rng, rows, cols, 0.2)))
        try:
            theirs = _vllm(encoding, streams)
        except Exception:  # noqa: BLE001 (vLLM raises ValueError; numpy may raise others first)
            theirs = None
        try:
            ours = csf.decode(encoding, streams)
        except csf.StreamError:
            ours = None
        if theirs is None:
            assert ours is None, f"vLLM refuses what nvfp4-fuse decodes: {({k: v.shape for k, v in streams.items()})}"
            refused += 1
        else:
            assert ours is not None, "nvfp4-fuse refuses what vLLM decodes"
            assert ours.tobytes() == theirs.tobytes()
            decoded += 1
    assert refused > 50 and decoded > 50, (refused, decoded)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_vllm_loads_a_sample_checkpoint_s_scales_as_the_converter_reads_them(tmp_path: Path, encoding, seed):
    """A compressed sample checkpoint through vLLM's own weight transform: each decoded tensor has the
    name of the plain twin's block scale (``<name>`` of ``<name>.<stream>``) and its bytes, and the
    converter's source reads the same."""
    spec = dict(scheme="hf", layers=3, experts=4, hidden=160, inter=96, shards=2, fast=True, seed=seed)
    plain = make_sample_checkpoint(tmp_path / "plain", SampleSpec(**spec))
    packed = make_sample_checkpoint(tmp_path / "packed", SampleSpec(**spec, scale_encoding=encoding))

    def tensors(folder: Path):
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    yield k, fh.get_tensor(k)

    want = {k: t for k, t in tensors(plain) if k.endswith(".weight_scale")}
    got = {k: t for k, t in nvfp4_utils.csf_weights_transform((encoding,))(tensors(packed)) if k.endswith(".weight_scale")}
    assert set(got) == set(want) and len(want) == 3 + 2 * (3 + 4 * 3)
    for k, t in want.items():
        assert got[k].dtype == torch.float8_e4m3fn and got[k].shape == t.shape
        assert torch.equal(got[k].view(torch.uint8), t.view(torch.uint8)), k
    src = scan_source(packed)
    assert set(src.encoded) == set(want)
    for name, enc in src.encoded.items():
        headers = src.headers

        def read(file: str, tensor: str, headers=headers) -> bytes:
            h = headers[file]
            info = h.tensors[tensor]
            with open(h.path, "rb") as fh:
                fh.seek(h.data_start + info.begin)
                return fh.read(info.nbytes)

        assert enc.decode(read).tobytes() == want[name].view(torch.uint8).numpy().tobytes(), name


def test_the_module_is_where_vllm_0_34_has_it():
    assert set(nvfp4_utils.CSF_SCALE_ENCODINGS) == set(csf.ENCODINGS)
    for encoding, (streams, _) in nvfp4_utils.CSF_SCALE_ENCODINGS.items():
        assert tuple(streams) == csf.ENCODINGS[encoding]
    _ = random  # the seed fixture draws from random
