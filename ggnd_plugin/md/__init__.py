"""Batched many-replica MD stability on TorchSim (``ggnd stability``; docs/stability.md).

Importing this package imports neither TorchSim nor any host: the submodules import them when used.
"""

from ggnd_plugin.md.stability import StabilityProtocol, StabilityResult, run_stability

__all__ = ["StabilityProtocol", "StabilityResult", "run_stability"]
