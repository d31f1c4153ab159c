"""Host adapters: one package per host (``mace/``, ``nequip/``, ``schnetpack/``) and the contract they share.

The contract is :mod:`ggnd_plugin.adapters.base`. Names are loaded on first use (PEP 562), so importing
this package, or a host's package below it, imports neither torch nor a host: nequip imports our
``nequip.extension`` module from the middle of its own ``__init__``, and the registry lists adapters
without importing their hosts.
"""

import importlib

# Public name -> module that defines it.
_LAZY_EXPORTS = {
    "HostAdapter": "ggnd_plugin.adapters.base",
    "Prediction": "ggnd_plugin.adapters.base",
    "validate_adapter": "ggnd_plugin.adapters.base",
}

__all__ = list(_LAZY_EXPORTS)


def __getattr__(name: str):
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_EXPORTS})
