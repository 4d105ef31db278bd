"""What SGLang's import path needs that cannot run on this CPU host, stood in for (conftest says why).

``install()`` makes ``torchvision`` (and its submodules) empty packages whose attributes are
placeholders that refuse to be called. It imports transformers first, so that transformers, which
looks for torchvision once at import, takes it as absent, as it is.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _EmptyPackages(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty packages for ``torchvision`` and its submodules (see the module notes)."""

    roots = {"torchvision"}

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Absent(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


class _Absent(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self.__name__}.{attr}")


class _Placeholder:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return _Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: torchvision is not installed in this venv")


def install() -> None:
    import transformers.utils.import_utils  # noqa: F401  (decides torchvision is absent first)

    if not any(isinstance(f, _EmptyPackages) for f in sys.meta_path):
        sys.meta_path.insert(0, _EmptyPackages())
