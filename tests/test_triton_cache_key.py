"""Triton's cache key from a child process: the same key Triton computes, handed to Triton so that its
cache lookups use it; anything unexpected leaves Triton's own function in place."""

from __future__ import annotations

import functools
import sys

import pytest

triton = pytest.importorskip("triton")
import triton.runtime.cache as cache  # noqa: E402

from nvfp4_fuse import triton_cache_key  # noqa: E402
from nvfp4_fuse.triton_cache_key import TritonKey  # noqa: E402


@pytest.fixture
def fresh_key(monkeypatch):
    """Triton's key function as a fresh process has it (nothing computed yet), put back afterwards;
    returns the key Triton computes itself."""
    own = cache.triton_key
    original = getattr(own, "__wrapped__", own)
    expected = original()
    monkeypatch.setattr(cache, "triton_key", functools.lru_cache()(original))
    return expected


def test_the_childs_key_is_tritons_own_and_triton_uses_it(fresh_key, monkeypatch):
    k = TritonKey()
    assert k.install(), k.why_not
    assert k.key == fresh_key
    # Triton's cache lookups now get it without hashing anything here
    import hashlib

    def no_hashing(*a, **kw):
        raise AssertionError("triton_key hashed in this process")

    monkeypatch.setattr(hashlib, "sha256", no_hashing)
    assert cache.triton_key() == fresh_key


def test_a_failing_child_leaves_triton_alone(fresh_key, monkeypatch):
    before = cache.triton_key
    monkeypatch.setattr(triton_cache_key, "_CHILD", "import sys; sys.exit(3)")
    k = TritonKey()
    assert not k.install() and "exited 3" in k.why_not
    assert cache.triton_key is before and cache.triton_key() == fresh_key


def test_a_child_that_imports_another_triton_is_not_believed(fresh_key, monkeypatch):
    before = cache.triton_key
    monkeypatch.setattr(triton_cache_key, "_CHILD", "import sys; sys.stdout.write('/elsewhere/triton/__init__.py\\nkey')")
    k = TritonKey()
    assert not k.install() and "/elsewhere/" in k.why_not
    assert cache.triton_key is before


def test_a_child_that_never_answers_is_given_up(fresh_key, monkeypatch):
    before = cache.triton_key
    monkeypatch.setattr(triton_cache_key, "_CHILD", "import time; time.sleep(60)")
    k = TritonKey(timeout=0.5)
    assert not k.install() and "no key within" in k.why_not
    assert cache.triton_key is before


def test_a_key_triton_computed_already_is_kept(fresh_key):
    cache.triton_key()  # computed in this process: nothing left to save
    before = cache.triton_key
    k = TritonKey()
    assert not k.install() and "already" in k.why_not
    assert cache.triton_key is before


def test_no_interpreter_to_start_leaves_triton_alone(fresh_key, monkeypatch):
    before = cache.triton_key
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    k = TritonKey()
    assert not k.install() and "could not start" in k.why_not
    assert cache.triton_key is before
