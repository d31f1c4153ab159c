"""Module paths of earlier releases that saved model files still name.

A MACE ``.model``, a SchNetPack ``best_model`` and the model inside a NequIP package are pickles: they
name every class by the module that defined it when the file was written (``ggnd_plugin.block_v1``,
``ggnd_plugin.adapters.schnetpack_module``, ...); a NequIP checkpoint names its model builder the same
way in its config. Files written by 0.1.0 and 0.2.0 must keep loading after the code moved, so each
old path that a file can name stays importable as an alias of the module that now holds its classes.

:data:`MOVED` is the whole table (old path -> new path). :func:`install` (called by
``ggnd_plugin/__init__.py``) registers each old path in ``sys.modules`` as a light alias: nothing is
imported until a name is looked up in it, so ``import ggnd_plugin`` stays cheap. Pickle
(``find_class``), ``importlib.import_module`` (torch.package's extern modules, hydra's ``_target_``)
and ``from OLD import Name`` all find it there. tests/test_block_compatibility.py loads files written
by both releases; tests/test_moved_modules.py checks every row.
"""

from __future__ import annotations

import importlib
import sys
import types

__all__ = ["MOVED", "install"]

# old module path -> module that defines its names now. Add a row whenever a module that a saved file
# can name moves; never remove one (files outlive releases).
MOVED: dict[str, str] = {
    # 0.2.0: version-1 blocks pickled as ggnd_plugin.block_v1.LegacyGGNDBlock (and .TensorFilter)
    "ggnd_plugin.block_v1": "ggnd_plugin.block",
    # console script ggnd-mace-train of environments installed before the move
    "ggnd_plugin.adapters.mace_train": "ggnd_plugin.adapters.mace.training",
    # nequip.extension entry point of environments installed before the move; a key of the versions
    # NequIP checkpoints and packages of 0.1.0 and 0.2.0 record
    "ggnd_plugin.adapters.nequip_extension": "ggnd_plugin.adapters.nequip.extension",
    # classes pickled in NequIP packages of 0.1.0 and 0.2.0 (which carry their own interned copy)
    "ggnd_plugin.adapters.nequip_modules": "ggnd_plugin.adapters.nequip.graph_modules",
    # insert_ggnd and the nequip-train targets, as users' code and configs may name them
    "ggnd_plugin.adapters.nequip_build": "ggnd_plugin.adapters.nequip.builders",
    # GGNDEnergy, pickled in SchNetPack model files and named by spktrain configs of 0.1.0 and 0.2.0
    "ggnd_plugin.adapters.schnetpack_module": "ggnd_plugin.adapters.schnetpack.output_module",
    # SchNetPackModel and the extxyz converter, as users' code may name them
    "ggnd_plugin.adapters.schnetpack_torchsim": "ggnd_plugin.adapters.schnetpack.torchsim_model",
    "ggnd_plugin.adapters.schnetpack_data": "ggnd_plugin.adapters.schnetpack.database",
    "ggnd_plugin.adapters.schnetpack_ase": "ggnd_plugin.adapters.schnetpack.calculator",
}


class _Alias(types.ModuleType):
    """A module object standing for another module: attribute look-ups import and read the target."""

    def __init__(self, name: str, target: str):
        super().__init__(name, f"moved to {target}; kept so that saved files naming it still load")
        self.__dict__["_target"] = target

    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        try:
            target = importlib.import_module(self.__dict__["_target"])
        except ImportError as error:
            # pickle.whichmodule and inspect look names up in every module of sys.modules and expect
            # AttributeError; an alias whose host is not installed must not break them.
            raise AttributeError(f"{self.__name__}.{name}: {error}") from error
        return getattr(target, name)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__dict__["_target"]))


def install() -> None:
    """Register every old path of :data:`MOVED` (idempotent; real modules of that name are kept)."""
    for old, new in MOVED.items():
        sys.modules.setdefault(old, _Alias(old, new))
