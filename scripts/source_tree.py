"""Import nvfp4_fuse from this checkout when it is not installed (the GPU host runs the benchmarks
from a copy of the working tree): kernels/ is mapped to nvfp4_fuse.kernels, as pyproject.toml does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_source_tree() -> None:
    try:
        import nvfp4_fuse.kernels  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import nvfp4_fuse

        spec = importlib.util.spec_from_file_location(
            "nvfp4_fuse.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["nvfp4_fuse.kernels"] = mod
        spec.loader.exec_module(mod)
        nvfp4_fuse.kernels = mod  # type: ignore[attr-defined]
