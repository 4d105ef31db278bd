"""The compare kernel's compiled binaries, kept between runs so a later GPU decode needs no torch.

The first verify on a machine (or after an upgrade of Triton, a change to the kernel's source, another
GPU) runs the compare kernel the usual way, through torch and Triton. Each expert shape's compiled
kernel (Triton's cubin and what a launch needs: entry point, warps, shared memory, the order and types
of its parameters) is then launched once more through the bare driver (:mod:`~nvfp4_fuse.cuda_driver`)
on random inputs beside Triton's own launch, and kept only when both give the same statistics bit for
bit. Later runs load it with the driver alone (:mod:`~nvfp4_fuse.driver_lane`), ready a fraction of a
second after the process starts instead of after torch's import.

An entry is one file, ``compare-<key>.bin`` under :func:`cache_dir`: a JSON line (with the cubin's
size and sha256, checked when it is loaded), then the cubin. The key
hashes everything the binary depends on: the kernel's source files, Triton's version, the GPU's
compute capability, the expert shape (every integer argument of the kernel follows from it, so Triton's
specialisations do too), whether the output's block scales are read as stored, and the launch's
constants. A folder that cannot be written leaves the fast start off, nothing else.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = 1
CACHE_ENV = "NVFP4_FUSE_KERNEL_CACHE"  # where entries go (default: the nvfp4-fuse cache's kernels/); "off": none
# The compare kernel's arguments, in its order (kernels/compare.py, _compare_kernel).
POINTERS = ("wa_ptr", "sa_ptr", "s2a_ptr", "wb_ptr", "sb_ptr", "s2b_ptr", "abs_ptr", "rel_ptr", "cnt_ptr", "flag_ptr")
INTS = ("M", "K16", "Mp", "Kp", "nblk", "T")
_CTYPES = {"i32": ctypes.c_int32, "i64": ctypes.c_int64, "u32": ctypes.c_uint32, "u64": ctypes.c_uint64}


def cache_dir() -> Path | None:
    """``$NVFP4_FUSE_KERNEL_CACHE`` ("off": none), else ``kernels`` in the nvfp4-fuse cache
    (verify_record.py: ``$NVFP4_FUSE_CACHE``, else ``$XDG_CACHE_HOME/nvfp4-fuse``, else
    ``~/.cache/nvfp4-fuse``)."""
    where = os.environ.get(CACHE_ENV)
    if where == "off":
        return None
    if where:
        return Path(where)
    from .verify_record import cache_dir as user_cache

    return user_cache() / "kernels"


def _source_hash() -> str | None:
    """sha256 of the kernel's source files (found without importing them: they import torch)."""
    spec = importlib.util.find_spec("nvfp4_fuse.kernels")
    if spec is None or not spec.submodule_search_locations:
        return None
    h = hashlib.sha256()
    for folder in spec.submodule_search_locations:
        for name in ("compare.py", "dequant.py"):
            p = Path(folder) / name
            if p.exists():
                h.update(p.read_bytes())
    return h.hexdigest()


def _triton_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return None


@functools.cache
def _base_key() -> str | None:
    """What every key shares: the format, the kernel's source, Triton's version (once a process)."""
    src, tv = _source_hash(), _triton_version()
    return None if src is None or tv is None else f"{FORMAT}|{src}|{tv}"


def entry_key(capability: tuple[int, int], rows: int, cols: int, in_place: bool, constants: dict[str, Any]) -> str | None:
    """The cache key of one compiled variant; None when the kernel's source or Triton cannot be found."""
    base = _base_key()
    if base is None:
        return None
    what = f"{base}|sm{capability[0]}{capability[1]}|{rows}x{cols}|{int(in_place)}|{json.dumps(constants, sort_keys=True)}"
    return hashlib.sha256(what.encode()).hexdigest()[:32]


@dataclass
class Entry:
    """One compiled variant of the compare kernel and how to launch it."""

    name: str
    threads: int
    shared: int
    params: list[tuple[str, str]]  # (argument, type) of each launch parameter, in order
    scratch: int  # null pointers after them (Triton's global and profile scratch, unused here)
    binary: bytes

    def values(self, given: dict[str, int]) -> list:
        """The launch's parameters as ctypes values: ``given`` by argument name, then the scratch nulls."""
        out: list = []
        for name, ty in self.params:
            out.append(ctypes.c_uint64(given[name]) if ty.startswith("*") else _CTYPES[ty](given[name]))
        out += [ctypes.c_uint64(0)] * self.scratch
        return out


def load(key: str | None) -> Entry | None:
    """The entry under ``key``, or None (absent, unreadable, or not this format)."""
    folder = cache_dir()
    if key is None or folder is None:
        return None
    try:
        data = (folder / f"compare-{key}.bin").read_bytes()
        head, _, binary = data.partition(b"\n")
        meta = json.loads(head)
        if meta.get("format") != FORMAT or len(binary) != meta["size"] or hashlib.sha256(binary).hexdigest() != meta["sha256"]:
            return None
        return Entry(meta["name"], meta["threads"], meta["shared"], [tuple(p) for p in meta["params"]], meta["scratch"], binary)
    except (OSError, ValueError, KeyError):
        return None


def store(key: str | None, entry: Entry) -> bool:
    """Keep ``entry`` under ``key`` (written whole, then renamed in: a reader never sees half)."""
    folder = cache_dir()
    if key is None or folder is None:
        return False
    meta = dict(format=FORMAT, name=entry.name, threads=entry.threads, shared=entry.shared, params=entry.params,
                scratch=entry.scratch, size=len(entry.binary), sha256=hashlib.sha256(entry.binary).hexdigest())  # fmt: skip
    from .shard_writer import write_file_atomic

    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_file_atomic(folder / f"compare-{key}.bin", json.dumps(meta).encode() + b"\n" + entry.binary, shared=True)
        return True
    except OSError:
        return False


def from_compiled(compiled: Any) -> Entry | None:
    """What a launch through the bare driver needs, from Triton's compiled kernel; None where this
    launch would not be Triton's own (a cluster launch, scratch memory, a parameter type other than a
    pointer or an integer)."""
    try:
        md = compiled.metadata
        binary = compiled.asm["cubin"]
        src = compiled.src
        sig = dict(src.signature)
        names = list(src.fn.arg_names)
    except (AttributeError, KeyError, TypeError):
        return None
    if getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_pdl", False) or getattr(md, "launch_cooperative_grid", False):
        return None
    if getattr(md, "global_scratch_size", 0) or getattr(md, "profile_scratch_size", 0) or getattr(md, "tensordesc_meta", None):
        return None
    params = []
    for k, ty in sig.items():
        name = names[k[0] if isinstance(k, tuple) else k] if not isinstance(k, str) else k
        if ty == "constexpr":
            continue
        if not (ty.startswith("*") or ty in _CTYPES) or name not in POINTERS + INTS:
            return None
        params.append((name, ty))
    scratch = sum(hasattr(md, f) for f in ("global_scratch_size", "profile_scratch_size"))
    threads = md.num_warps * getattr(md, "warp_size", 32)
    return Entry(compiled.name, threads, md.shared, params, scratch, bytes(binary))


def compare_ints(rows: int, cols: int, bpp: int, nsub: int) -> dict[str, int]:
    """The kernel's integer arguments for an expert of ``rows`` x ``cols`` (as compare_tiles computes them)."""
    k16 = cols // 16
    # compare_tiles passes the swizzled padding whatever the layout; the kernel reads it only when swizzled
    mp, kp = (rows + 127) // 128 * 128, (k16 + 3) // 4 * 4
    nblk = rows * k16
    return dict(M=rows, K16=k16, Mp=mp, Kp=kp, nblk=nblk, T=-(-nblk // (bpp * nsub)))
