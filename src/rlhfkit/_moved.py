"""Old import paths of modules that moved into folders (issue 20's re-layout), kept working.

``import rlhfkit.rollout`` still works after generation moved to :mod:`rlhfkit.generation.rollout`: a finder on
``sys.meta_path`` answers an old name with the module now holding its contents. A module that moved whole is
returned itself (``rlhfkit.models is rlhfkit.modeling.models``), so ``monkeypatch.setattr`` on either name patches
both. A module that was split between two folders is answered by a read-only view that looks names up in each
part in turn. The new paths are the documented ones; nothing warns on the old, as no behaviour changed.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

MOVED: dict[str, tuple[str, ...]] = {
    "rlhfkit.models": ("rlhfkit.modeling.models",),
    "rlhfkit.forward": ("rlhfkit.modeling.forward",),
    "rlhfkit.policy": ("rlhfkit.modeling.policy",),
    "rlhfkit.packing": ("rlhfkit.data.packing", "rlhfkit.modeling.attention"),
    "rlhfkit.rollout": ("rlhfkit.generation.rollout", "rlhfkit.generation.fast_decode"),
    "rlhfkit.vllm_engine": ("rlhfkit.generation.vllm_engine",),
    "rlhfkit.loop": ("rlhfkit.training.loop",),
    "rlhfkit.optim": ("rlhfkit.training.optim",),
    "rlhfkit.tracking": ("rlhfkit.training.tracking",),
}
"""Old module name -> the module(s) that now hold what it had, looked up in this order."""


class _SplitModule(types.ModuleType):
    """An old module whose contents now live in several modules: attribute reads go to the first that has it."""

    def __init__(self, name: str, parts: tuple[types.ModuleType, ...]) -> None:
        super().__init__(name, f"moved to {', '.join(p.__name__ for p in parts)}")
        self._parts = parts

    def __getattr__(self, attr: str):
        for part in self.__dict__["_parts"]:
            if hasattr(part, attr):
                return getattr(part, attr)
        raise AttributeError(
            f"module {self.__name__!r} (now {', '.join(p.__name__ for p in self._parts)}) has no attribute {attr!r}"
        )

    def __dir__(self) -> list[str]:
        return sorted({n for p in self._parts for n in dir(p)})


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(self, fullname, path=None, target=None):
        return importlib.machinery.ModuleSpec(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        parts = tuple(importlib.import_module(name) for name in MOVED[spec.name])
        if len(parts) == 1:
            self._specs[spec.name] = parts[0].__spec__  # importlib sets __spec__ on what we return: put it back
            return parts[0]
        return _SplitModule(spec.name, parts)

    def exec_module(self, module) -> None:
        if not isinstance(module, _SplitModule):
            module.__spec__ = self._specs.pop(module.__spec__.name)


def install() -> None:
    """Put the finder on ``sys.meta_path`` once (``rlhfkit/__init__`` calls it)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
