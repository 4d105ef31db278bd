"""Shared test helpers: sample checkpoints and ways to break them."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint


@pytest.fixture
def make_ckpt(tmp_path: Path) -> Callable[..., Path]:
    """make_ckpt(**SampleSpec fields) -> folder with a fresh random sample checkpoint."""
    count = [0]

    def make(**kw) -> Path:
        count[0] += 1
        kw.setdefault("seed", random.randrange(2**31))
        folder = tmp_path / f"src{count[0]}"
        make_sample_checkpoint(folder, SampleSpec(**kw))
        return folder

    return make


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for f in sorted(set(idx["weight_map"].values())):
        out.update(load_file(folder / f))
    return out


def rewrite_tensors(folder: Path, fn: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply fn to each shard's tensor dict in place (it may add, drop or change tensors); fix the index."""
    idx_path = folder / "model.safetensors.index.json"
    idx = json.loads(idx_path.read_text())
    wm = {}
    for f in sorted(set(idx["weight_map"].values())):
        tensors = load_file(folder / f)
        fn(tensors)
        save_file(tensors, folder / f, metadata={"format": "pt"})
        for n in tensors:
            wm[n] = f
    idx["weight_map"] = wm
    idx_path.write_text(json.dumps(idx))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nvfp4_fuse.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
