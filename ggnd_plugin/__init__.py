"""ggnd-plugin: Geometric Graph Neural Diffusion for machine-learned interatomic potentials.

Importing the package imports nothing heavy: ``ggnd --help`` and the package's entry points must not
pay for torch. The block's classes are loaded from :mod:`ggnd_plugin.block` (torch and e3nn) on first
use of ``ggnd_plugin.GGNDBlock`` and friends; the hosts (MACE, NequIP, SchNetPack) and TorchSim are
imported by the modules that need them, when they need them.
"""

import importlib

__version__ = "0.3.0.dev0"

# Public name -> module that defines it, imported on first attribute access (PEP 562).
_LAZY_EXPORTS = {
    "FeatureSpec": "ggnd_plugin.block",
    "GGNDBlock": "ggnd_plugin.block",
    "GGNDConfig": "ggnd_plugin.block",
    "PairTable": "ggnd_plugin.block",
}

__all__ = [*_LAZY_EXPORTS, "__version__"]


# Old module paths that saved model files name (ggnd_plugin.moved_modules): registered as light aliases.
_moved_modules = importlib.import_module("ggnd_plugin.moved_modules")
_moved_modules.install()


def __getattr__(name: str):
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_EXPORTS})
