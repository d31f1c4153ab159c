"""Package names that load from their submodules on first use (PEP 562).

The adapter packages export their public names this way, so importing ``ggnd_plugin.adapters`` or a
host's package below it imports nothing heavy: the registry lists adapters without torch or a host, and
nequip imports our ``nequip.extension`` module from the middle of its own ``__init__``. Saved files and
configs name classes by these package paths too (``ggnd_plugin.adapters.mace.GGNDMACE`` in MACE files of
0.1.0 and 0.2.0, ``ggnd_plugin.adapters.nequip.GGNDNequIPModel`` in NequIP checkpoints).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``, whose names ``exports`` maps to the defining modules."""

    def __getattr__(name: str):
        module_name = exports.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_name), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__
