"""SchNetPack 2.2 with a GGND block: the adapter, the output module, a TorchSim model, ``spktrain`` runs.

* :mod:`~ggnd_plugin.adapters.schnetpack.adapter`: :class:`SchNetPackAdapter`;
* :mod:`~ggnd_plugin.adapters.schnetpack.output_module`: :class:`GGNDEnergy`, the GGND block as one
  more output module of a ``NeuralNetworkPotential`` (what saved upgraded models pickle);
* :mod:`~ggnd_plugin.adapters.schnetpack.torchsim_model`: :class:`SchNetPackModel` for TorchSim;
* :mod:`~ggnd_plugin.adapters.schnetpack.calculator`: ASE calculators;
* :mod:`~ggnd_plugin.adapters.schnetpack.spktrain_run`: elements and units of an ``spktrain`` run;
* :mod:`~ggnd_plugin.adapters.schnetpack.training` and :mod:`~ggnd_plugin.adapters.schnetpack.database`:
  the ``spktrain`` run of :meth:`SchNetPackAdapter.fit` and its ASE database
  (``python -m ggnd_plugin.adapters.schnetpack.database`` converts extxyz);
* ``configs/``: hydra config groups for ``spktrain`` (found through ``hydra_plugins``).

Configs name ``ggnd_plugin.adapters.schnetpack.GGNDEnergy``. Importing this package imports neither
torch nor SchNetPack: its names load on first use.
"""

from ggnd_plugin.adapters.lazy_exports import lazy_exports
from ggnd_plugin.adapters.starter_config import StarterConfig

# `ggnd config schnetpack` (entry-point group ggnd_plugin.starter_configs)
STARTER_CONFIG = StarterConfig(
    summary="spktrain experiment (PaiNN + GGND)", file="configs/schnetpack_experiment.yaml"
)

_EXPORTS = {
    "SchNetPackAdapter": "ggnd_plugin.adapters.schnetpack.adapter",
    "output_keys": "ggnd_plugin.adapters.schnetpack.adapter",
    "GGNDEnergy": "ggnd_plugin.adapters.schnetpack.output_module",
    "insert_ggnd": "ggnd_plugin.adapters.schnetpack.output_module",
    "SchNetPackModel": "ggnd_plugin.adapters.schnetpack.torchsim_model",
    "run_metadata": "ggnd_plugin.adapters.schnetpack.spktrain_run",
    "extxyz_to_spk_db": "ggnd_plugin.adapters.schnetpack.database",
    "SIZES": "ggnd_plugin.adapters.schnetpack.training",
    "FIT_LOG": "ggnd_plugin.adapters.schnetpack.training",
    "fit_command": "ggnd_plugin.adapters.schnetpack.training",
    "run_fit": "ggnd_plugin.adapters.schnetpack.training",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
