"""ggnd-plugin: Geometric Graph Neural Diffusion for machine-learned interatomic potentials.

Importing the package loads torch and e3nn only; the hosts (MACE, NequIP, SchNetPack) and TorchSim are
imported by the modules that need them, when they need them.
"""

from ggnd_plugin.block import FeatureSpec, GGNDBlock, GGNDConfig, PairTable

__version__ = "0.1.0"
__all__ = ["FeatureSpec", "GGNDBlock", "GGNDConfig", "PairTable", "__version__"]
