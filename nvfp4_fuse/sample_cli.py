"""``nvfp4-fuse sample``: its options checked up front (a flag that does not apply to the chosen
``--arch`` is refused, not ignored), then the checkpoint written; a failure leaves no folder behind."""

from __future__ import annotations

import shutil
from pathlib import Path

from .csf import ENCODINGS
from .errors import InputError
from .sample import SCHEMES
from .sample_dsv4 import RECIPES

ARCHS = ("modelopt", "deepseek-v4", "deepseek-v41")
DEFAULT_SIZE = 512  # hidden and intermediate: what every target takes (mega-moe needs multiples of 512)


def check_sample_options(
    arch: str,
    recipe: str | None,
    scheme: str | None,
    values: str | None,
    unequal_scale_2: bool,
    layers: int | None,
    experts: int,
    hidden: int | None,
    intermediate: int | None,
    shards: int,
    output: Path,
    scale_encoding: str | None = None,
) -> None:
    """``InputError`` for a bad or inapplicable option, naming it and what to do."""
    if arch not in ARCHS:
        raise InputError(f"--arch must be one of {', '.join(ARCHS)}, not {arch!r}")
    if arch == "modelopt":
        for name, given in (("--recipe", recipe), ("--values", values)):
            if given is not None:
                raise InputError(f"{name} applies to --arch deepseek-v4 only; drop it, or add --arch deepseek-v4")
        if scheme is not None and scheme not in SCHEMES:
            raise InputError(f"--scheme must be one of {', '.join(SCHEMES)}, not {scheme!r}")
        if scale_encoding is not None and scale_encoding not in ENCODINGS:
            raise InputError(f"--scale-encoding must be one of {', '.join(ENCODINGS)}, not {scale_encoding!r}")
        if scale_encoding is not None and (scheme or "deepseek") == "compressed-tensors":
            raise InputError("--scale-encoding is a ModelOpt encoding; drop it, or choose another --scheme")
    else:
        if scheme is not None:
            raise InputError("--scheme applies to --arch modelopt only (deepseek-v4 has its own names); drop it")
        if unequal_scale_2:
            raise InputError("--unequal-scale-2 applies to --arch modelopt only; drop it")
        if scale_encoding is not None:
            raise InputError("--scale-encoding applies to --arch modelopt only; drop it")
        if arch == "deepseek-v41" and recipe not in (None, "nvidia"):
            raise InputError("--recipe applies to --arch deepseek-v4 only (deepseek-v41 is written in NVIDIA's recipe); drop it")
        if recipe is not None and recipe not in RECIPES:
            raise InputError(f"--recipe must be one of {', '.join(RECIPES)}, not {recipe!r}")
        if values is not None and values not in ("U8", "I8"):
            raise InputError(f"--values must be U8 or I8, not {values!r}")
    for name, v, least in (("--experts", experts, 1), ("--shards", shards, 1), ("--layers", layers, 1)):
        if v is not None and v < least:
            raise InputError(f"{name} must be at least {least}, not {v}")
    if arch == "modelopt" and layers is not None and layers < 2:
        raise InputError("--layers must be at least 2 for modelopt (layer 0 is dense, the MoE layers follow)")
    for name, v in (("--hidden", hidden), ("--intermediate", intermediate)):
        if v is not None and (v < 64 or v % 64):
            raise InputError(f"{name} must be a positive multiple of 64 (NVFP4 blocks of 16, packed scales), not {v}")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(f"{output} exists and is not an empty folder; choose a new one")


def write_sample(
    output: Path,
    arch: str,
    recipe: str | None,
    scheme: str | None,
    layers: int | None,
    experts: int,
    hidden: int | None,
    intermediate: int | None,
    shards: int,
    values: str | None,
    unequal_scale_2: bool,
    seed: int | None,
    scale_encoding: str | None = None,
) -> str:
    """Write the sample; returns what was written, in words. On failure, nothing is left behind."""
    from .writable import require_writable

    require_writable(output, "sample folder")
    existed = output.exists()
    try:
        if arch in ("deepseek-v4", "deepseek-v41"):
            from .sample_dsv4 import DSv4SampleSpec, make_dsv4_sample

            v41 = arch == "deepseek-v41"
            n = layers or 4
            spec4 = DSv4SampleSpec(
                recipe or "nvidia", n, 0 if v41 else min(3, n), experts, hidden or DEFAULT_SIZE, intermediate or DEFAULT_SIZE, shards,
                values or "U8", seed=seed, v41=v41,
            )  # fmt: skip
            make_dsv4_sample(output, spec4)
            what = "DeepSeek-V4.1 checkpoint (NVIDIA's format" if v41 else f"DeepSeek-V4 checkpoint ({spec4.recipe} recipe"
            return f"sample {what}, {n} layers + MTP, {experts} experts, H={spec4.hidden}, I={spec4.inter})"
        from .sample import SampleSpec, make_sample_checkpoint

        spec = SampleSpec(
            scheme or "deepseek", layers or 3, experts, hidden or DEFAULT_SIZE, intermediate or DEFAULT_SIZE, shards, unequal_scale_2, seed=seed,
            scale_encoding=scale_encoding,
        )
        make_sample_checkpoint(output, spec)
        return f"sample checkpoint ({spec.scheme} names, {spec.layers} layers, {experts} experts, H={spec.hidden}, I={spec.inter})"
    except BaseException as e:
        if output.exists():
            if existed:  # it was an empty folder: empty it again
                for p in output.iterdir():
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            else:
                shutil.rmtree(output, ignore_errors=True)
        if isinstance(e, ValueError) and not isinstance(e, InputError):
            raise InputError(str(e)) from None
        raise
