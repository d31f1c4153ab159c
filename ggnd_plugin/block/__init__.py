"""The GGND block, one idea per module:

=====================  ==============================================================================
``config``             :class:`GGNDConfig` (every option) and the numerics versions files carry
``features``           :class:`FeatureSpec`: the host features the block reads, as declared irreps
``pairs``              which pairs interact: :class:`SystemPairs`, :class:`PairTable` and their builders
``geometry``           radial functions, envelopes, spherical harmonics, Clebsch-Gordan couplings
``layouts``            rows and partners of the pair loop; what a call keeps of the pairs
``pair_sums``          the attention and the pair sums of one diffusion stage (batched products)
``ggnd_block``         :class:`GGNDBlock` (numerics version 2) and :func:`system_energy`
``version1``           the numerics of ggnd-plugin 0.1.0, for the files trained with it
=====================  ==============================================================================

Everything a host adapter or a user needs is importable from here (``from ggnd_plugin.block import
GGNDBlock, GGNDConfig, FeatureSpec``). Files pickled by earlier releases name classes in this package
(``ggnd_plugin.block.GGNDBlock``, ``.TensorFilter``, ``.RadialBasis``, ...) and, for 0.2.0's
version-1 blocks, ``ggnd_plugin.block_v1.LegacyGGNDBlock`` (an alias of this package, see
:mod:`ggnd_plugin.moved_modules`): those names stay here.
"""

from ggnd_plugin.block.config import (
    CURRENT_VERSION,
    INITIAL_CONDITIONS,
    SOLVERS,
    VARIANTS,
    VERSIONS,
    GGNDConfig,
    GGNDVersionWarning,
)
from ggnd_plugin.block.features import FeatureSpec
from ggnd_plugin.block.geometry import (
    DISTANCE_EPS,
    RadialBasis,
    degree_of_component,
    filter_couplings,
    filter_paths,
    from_channels,
    join_degrees,
    polynomial_envelope,
    smooth_cutoff,
    spherical_harmonics,
    split_degrees,
    state_irreps,
    to_channels,
)
from ggnd_plugin.block.ggnd_block import (
    DENSE_MIXING_LIMIT,
    EMBEDDING_RADIAL,
    GGNDBlock,
    system_energy,
)
from ggnd_plugin.block.pair_sums import MAX_EXPONENT
from ggnd_plugin.block.pairs import (
    PairTable,
    SystemPairs,
    check_batch,
    complete_graph_pairs,
    complete_graph_systems,
    radius_pairs,
    traceable_complete_graph,
)
from ggnd_plugin.block.version1 import PairGeometry, TensorFilter, invariants_of, pair_geometry

# 0.2.0 gave version-1 blocks a class of their own; files it wrote name it. One class holds both now.
LegacyGGNDBlock = GGNDBlock

__all__ = [
    "CURRENT_VERSION",
    "DENSE_MIXING_LIMIT",
    "DISTANCE_EPS",
    "EMBEDDING_RADIAL",
    "INITIAL_CONDITIONS",
    "MAX_EXPONENT",
    "SOLVERS",
    "VARIANTS",
    "VERSIONS",
    "FeatureSpec",
    "GGNDBlock",
    "GGNDConfig",
    "GGNDVersionWarning",
    "LegacyGGNDBlock",
    "PairGeometry",
    "PairTable",
    "RadialBasis",
    "SystemPairs",
    "TensorFilter",
    "check_batch",
    "complete_graph_pairs",
    "complete_graph_systems",
    "degree_of_component",
    "filter_couplings",
    "filter_paths",
    "from_channels",
    "invariants_of",
    "join_degrees",
    "pair_geometry",
    "polynomial_envelope",
    "radius_pairs",
    "smooth_cutoff",
    "spherical_harmonics",
    "split_degrees",
    "state_irreps",
    "system_energy",
    "to_channels",
    "traceable_complete_graph",
]
