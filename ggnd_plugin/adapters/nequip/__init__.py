"""NequIP 0.19 with a GGND block: the adapter, the graph modules, the ``nequip-train`` targets, packages.

* :mod:`~ggnd_plugin.adapters.nequip.adapter`: :class:`NequIPAdapter`;
* :mod:`~ggnd_plugin.adapters.nequip.graph_modules`: ``GGNDAtomicEnergy`` and ``AddGGNDEnergy``, the
  code that travels inside ``.nequip.zip`` packages;
* :mod:`~ggnd_plugin.adapters.nequip.builders`: inserting them into a model, and the names
  ``nequip-train`` configs use;
* :mod:`~ggnd_plugin.adapters.nequip.package_writer`: ``.nequip.zip`` packages of in-memory models;
* :mod:`~ggnd_plugin.adapters.nequip.training`: the ``nequip-train`` run of :meth:`NequIPAdapter.fit`;
* :mod:`~ggnd_plugin.adapters.nequip.extension`: the (empty) module of the ``nequip.extension`` entry
  point.

Configs and checkpoints name ``ggnd_plugin.adapters.nequip.GGNDNequIPModel`` (a NequIP model with a GGND
block) and ``ggnd_plugin.adapters.nequip.GGNDUpgrade`` (a fitted model from ``ModelFromCheckpoint`` or
``ModelFromPackage`` with a GGND block attached). Importing this package imports neither torch nor
nequip: its names load on first use.
"""

from ggnd_plugin.adapters.lazy_exports import lazy_exports
from ggnd_plugin.adapters.starter_config import StarterConfig

# `ggnd config nequip` and `ggnd config nequip-finetune` (entry-point group ggnd_plugin.starter_configs)
STARTER_CONFIG = StarterConfig(
    summary="nequip-train config (NequIP + GGND from scratch)", file="configs/nequip_train.yaml"
)
FINETUNE_STARTER_CONFIG = StarterConfig(
    summary="nequip-train config (GGND attached to a fitted NequIP checkpoint, fine-tuned)",
    file="configs/nequip_finetune.yaml",
)

_EXPORTS = {
    "NequIPAdapter": "ggnd_plugin.adapters.nequip.adapter",
    "PACKAGE_SUFFIX": "ggnd_plugin.adapters.nequip.adapter",
    "CHECKPOINT_SUFFIX": "ggnd_plugin.adapters.nequip.adapter",
    "COMPILED_SUFFIX": "ggnd_plugin.adapters.nequip.adapter",
    "GGNDNequIPModel": "ggnd_plugin.adapters.nequip.builders",
    "GGNDUpgrade": "ggnd_plugin.adapters.nequip.builders",
    "insert_ggnd": "ggnd_plugin.adapters.nequip.builders",
    "write_package": "ggnd_plugin.adapters.nequip.package_writer",
    "example_data": "ggnd_plugin.adapters.nequip.package_writer",
    "SIZES": "ggnd_plugin.adapters.nequip.training",
    "fit_config": "ggnd_plugin.adapters.nequip.training",
    "write_fit_config": "ggnd_plugin.adapters.nequip.training",
    "run_nequip_train": "ggnd_plugin.adapters.nequip.training",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
