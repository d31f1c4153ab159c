"""MACE 0.3.16 with a GGND block: the adapter, the wrapped model and ``ggnd-mace-train``.

* :mod:`~ggnd_plugin.adapters.mace.adapter`: :class:`MACEAdapter` (files, predictions, TorchSim, fit);
* :mod:`~ggnd_plugin.adapters.mace.wrapper`: :class:`GGNDMACE`, a MACE model plus a GGND block;
* :mod:`~ggnd_plugin.adapters.mace.legacy_e3nn`: loading files pickled under e3nn <= 0.5;
* :mod:`~ggnd_plugin.adapters.mace.training`: ``ggnd-mace-train`` (``mace_run_train`` plus GGND) and the
  command :meth:`MACEAdapter.fit` runs.

Importing this package imports neither torch nor MACE: its names load on first use. Saved files of
0.1.0 and 0.2.0 name ``ggnd_plugin.adapters.mace.GGNDMACE``, which resolves here.
"""

from ggnd_plugin.adapters.lazy_exports import lazy_exports
from ggnd_plugin.adapters.starter_config import StarterConfig

# `ggnd config mace` (entry-point group ggnd_plugin.starter_configs)
STARTER_CONFIG = StarterConfig(
    summary="ggnd-mace-train --config FILE (MACE + GGND from scratch)", file="configs/mace_train.yaml"
)

_EXPORTS = {
    "MACEAdapter": "ggnd_plugin.adapters.mace.adapter",
    "MODEL_SUFFIX": "ggnd_plugin.adapters.mace.adapter",
    "sniff_model_file": "ggnd_plugin.adapters.mace.adapter",
    "GGNDMACE": "ggnd_plugin.adapters.mace.wrapper",
    "FEATURE_FIELD": "ggnd_plugin.adapters.mace.wrapper",
    "attach_ggnd": "ggnd_plugin.adapters.mace.wrapper",
    "host_of": "ggnd_plugin.adapters.mace.wrapper",
    "host_feature_irreps": "ggnd_plugin.adapters.mace.wrapper",
    "mace_feature_spec": "ggnd_plugin.adapters.mace.wrapper",
    "legacy_e3nn_unpickling": "ggnd_plugin.adapters.mace.legacy_e3nn",
    "rebuild_under_current_e3nn": "ggnd_plugin.adapters.mace.legacy_e3nn",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
