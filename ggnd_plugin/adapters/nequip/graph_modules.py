"""GGND as NequIP graph modules (the code that travels inside ``nequip-package`` files).

This module is interned by ``nequip-package`` (see :func:`ggnd_plugin.adapters.nequip.builders.register_for_packaging`),
so it imports only torch, nequip's data and nn layers and :mod:`ggnd_plugin.block`; the builders and
the upgrade target, which need more of nequip, live in :mod:`ggnd_plugin.adapters.nequip.builders`.

Pairs. The block needs its pair table inside the model's forward. Eager runs use the block's own
(``GGNDBlock.pairs``: one square block per system). Under ``nequip-compile`` (``make_fx`` with symbolic
sizes, which refuses data-dependent shapes) all atoms form one block with pairs across systems masked
(:func:`ggnd_plugin.block.traceable_complete_graph`): for one frame (the ``ase`` target) that is exactly
the complete graph, for a batch it costs ``(sum n)^2`` instead of ``sum n^2`` but needs no
value-dependent size. Version-1 blocks (models packaged by ggnd-plugin 0.1.0) keep the padded tables
they were written with. Pairs within a finite radius (``r_g``, periodic systems) come from
TorchSim's neighbour list and work in eager mode only.
"""

from __future__ import annotations

import torch
from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin

from ggnd_plugin.block import (
    FeatureSpec,
    GGNDBlock,
    GGNDConfig,
    PairTable,
    complete_graph_pairs,
    radius_pairs,
    traceable_complete_graph,
)

GGND_ENERGY_FIELD = "ggnd_atomic_energy"


def _symbolic_size(size) -> bool:
    """True for a size traced symbolically (``nequip-compile``'s ``make_fx``): the number of atoms is
    then unknown, so the pair table must be one whose shape follows from it alone.

    Whether to skip value checks is another question, which the block answers itself with
    :func:`ggnd_plugin.tracing.is_tracing` (it sees ``make_fx`` through its proxy mode).
    """
    return not isinstance(size, int)


class GGNDAtomicEnergy(GraphModuleMixin, torch.nn.Module):
    """The GGND block as a NequIP graph module: node features in, per-atom GGND energy out.

    Args:
        config: GGND options (a :class:`GGNDConfig` or a dict of its fields).
        num_types: number of NequIP atom types; the block's species are NequIP's ``atom_types``.
        feature_field: the node feature field read (equivariant features before the last convnet).
        out_field: where the per-atom energy (n_atoms, 1) is written.
        irreps_in: irreps of the fields available at the insertion point.
    """

    def __init__(
        self,
        config: GGNDConfig | dict,
        num_types: int,
        feature_field: str = AtomicDataDict.NODE_FEATURES_KEY,
        out_field: str = GGND_ENERGY_FIELD,
        irreps_in: dict | None = None,
    ):
        super().__init__()
        config = config if isinstance(config, GGNDConfig) else GGNDConfig.from_dict(config)
        self._init_irreps(
            irreps_in=irreps_in,
            required_irreps_in=[feature_field],
            irreps_out={out_field: "0e"},
        )
        self.feature_field, self.out_field = feature_field, out_field
        spec = FeatureSpec({feature_field: str(self.irreps_in[feature_field])}, num_species=num_types)
        self.block = GGNDBlock(spec, config)

    def pairs(self, data: AtomicDataDict.Type):
        positions = data[AtomicDataDict.POSITIONS_KEY]
        n = positions.shape[0]
        radius = self.block.config.pair_radius
        if radius is not None:
            if _symbolic_size(n):
                raise RuntimeError(
                    "GGND with a finite pair radius (r_g or the 'local' variant) builds its pairs with a "
                    "neighbour list and cannot be compiled; compile models with r_g=None (molecules)"
                )
            pbc = data.get(AtomicDataDict.PBC_KEY, None)
            cell = data.get(AtomicDataDict.CELL_KEY, None)
            return radius_pairs(
                positions,
                self._batch(data),
                radius,
                cell=None if cell is None else cell.reshape(-1, 3, 3),
                pbc=None if pbc is None else pbc.reshape(-1, 3),
            )
        if not _symbolic_size(n):
            pbc = data.get(AtomicDataDict.PBC_KEY, None)
            if pbc is not None and bool(pbc.any()):
                raise ValueError(
                    "periodic structure given to a GGND block without a pair radius: the complete graph is "
                    "for molecules; set the GGND option r_g (e.g. 10.0 Å) for periodic systems"
                )
            if AtomicDataDict.BATCH_KEY in data:
                batch = data[AtomicDataDict.BATCH_KEY]
                if self.block.config.version == 1:
                    return complete_graph_pairs(batch)
                return self.block.pairs(positions.detach(), batch)
        if self.block.config.version != 1:
            return traceable_complete_graph(self._batch(data))
        senders = torch.arange(n, device=positions.device).expand(n, n)
        if AtomicDataDict.BATCH_KEY in data:
            batch = data[AtomicDataDict.BATCH_KEY]
            mask = batch[:, None] == batch[None, :]
        else:
            mask = torch.ones(n, n, dtype=torch.bool, device=positions.device)
        return PairTable(senders=senders, mask=mask, cell_shifts=None)

    @staticmethod
    def _batch(data: AtomicDataDict.Type) -> torch.Tensor:
        if AtomicDataDict.BATCH_KEY in data:
            return data[AtomicDataDict.BATCH_KEY]
        positions = data[AtomicDataDict.POSITIONS_KEY]
        return torch.zeros(positions.shape[0], dtype=torch.long, device=positions.device)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        positions = data[AtomicDataDict.POSITIONS_KEY]
        cell = None
        if self.block.config.pair_radius is not None and AtomicDataDict.CELL_KEY in data:
            cell = data[AtomicDataDict.CELL_KEY].reshape(-1, 3, 3)
        energy = self.block(
            data[self.feature_field],
            positions,
            data[AtomicDataDict.ATOM_TYPE_KEY].reshape(-1),
            self.pairs(data),
            batch=self._batch(data),
            cell=cell,
        )
        data[self.out_field] = energy.unsqueeze(-1)
        return data


class AddGGNDEnergy(GraphModuleMixin, torch.nn.Module):
    """Adds the GGND per-atom energy to NequIP's per-atom energy (before the total-energy sum)."""

    def __init__(self, field: str = GGND_ENERGY_FIELD, irreps_in: dict | None = None):
        super().__init__()
        self._init_irreps(
            irreps_in=irreps_in,
            my_irreps_in={field: "0e", AtomicDataDict.PER_ATOM_ENERGY_KEY: "0e"},
        )
        self.field = field

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        data[AtomicDataDict.PER_ATOM_ENERGY_KEY] = data[AtomicDataDict.PER_ATOM_ENERGY_KEY] + data[self.field]
        return data
