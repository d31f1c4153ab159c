"""Host adapters: one package per host (``mace/``, ``nequip/``, ``schnetpack/``) and the contract they share.

The contract is :mod:`ggnd_plugin.adapters.base`, its check on a real model
:func:`~ggnd_plugin.adapters.validate.validate_adapter` (docs/adapters.md). Names load on first use
(:mod:`ggnd_plugin.adapters.lazy_exports`), so importing this package, or a host's package below it,
imports neither torch nor a host.
"""

from ggnd_plugin.adapters.lazy_exports import lazy_exports

_EXPORTS = {
    "HostAdapter": "ggnd_plugin.adapters.base",
    "Prediction": "ggnd_plugin.adapters.base",
    "validate_adapter": "ggnd_plugin.adapters.validate",
    "AdapterContractError": "ggnd_plugin.adapters.validate",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
