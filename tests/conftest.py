"""Fixtures shared by the tests (plain helpers live in helpers.py)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from nvfp4_fuse.sample import SampleSpec, make_sample_checkpoint


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch) -> None:
    """Each test has its own nvfp4-fuse cache (verify records passed checks there for push)."""
    monkeypatch.setenv("NVFP4_FUSE_CACHE", str(tmp_path / "nvfp4-fuse-cache"))


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
