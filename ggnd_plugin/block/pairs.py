"""Which pairs of atoms interact: the block's pair tables, built outside any traced forward.

Molecules (``r_g=None``) pair every atom with every atom of its system: :class:`SystemPairs`, one
square block per system, so every pair sum is a batched matrix product. Crystals (or a finite
``r_g``, or the ``local`` variant) pair every atom with all periodic images within the radius:
:class:`PairTable`, a padded row of partners per atom, from TorchSim's neighbour list. Their sizes
depend on the structure, like a neighbour list; everything the block computes from them has static
shapes.
"""

# No `from __future__ import annotations`: torch.package (nequip-package) cannot load an interned
# dataclass whose annotations are strings.
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "PairTable",
    "SystemPairs",
    "check_batch",
    "complete_graph_pairs",
    "complete_graph_systems",
    "radius_pairs",
    "traceable_complete_graph",
]


@dataclass
class SystemPairs:
    """Every pair of atoms of the same system, as one square block per system.

    Each system occupies a row of ``atoms`` (``(n_systems, width)``, ``width`` = largest system): the
    atom index in each slot, padded where a system is smaller (``mask`` False). Every slot is a partner
    of every slot of its system, itself included (the self pair: distance zero, no gradient, so that
    attention denominators never vanish). ``slots[a]`` is atom ``a``'s position in the flattened
    ``(n_systems * width)`` layout. ``same_system`` (optional, ``(n_systems, width, width)``) restricts
    the pairs further: a traced model puts all atoms in one block and masks pairs across systems.
    """

    atoms: Tensor
    mask: Tensor
    slots: Tensor
    same_system: Tensor | None = None


@dataclass
class PairTable:
    """Partners of every atom as a padded table.

    ``senders[i, m]`` is the m-th partner j of atom i; ``mask[i, m]`` says whether that slot is real.
    ``cell_shifts[i, m]`` (integers stored as floats) says which periodic image of j is meant:
    ``x_ij = x_j - x_i + cell_shifts[i, m] @ cell[system of i]`` with lattice vectors as rows (ASE).
    Every row holds the atom itself (distance zero, contributes no gradient) so that attention
    denominators never vanish. Padding slots point at the atom itself and are masked.
    """

    senders: Tensor
    mask: Tensor
    cell_shifts: Tensor | None = None

    @property
    def width(self) -> int:
        return self.senders.shape[1]

    def rows(self, start: int, stop: int) -> "PairTable":
        shifts = None if self.cell_shifts is None else self.cell_shifts[start:stop]
        return PairTable(self.senders[start:stop], self.mask[start:stop], shifts)


def check_batch(positions: Tensor, batch: Tensor) -> None:
    """Positions ``(n_atoms, 3)`` with a system index per atom, atoms grouped by system."""
    if positions.dim() != 2 or positions.shape[-1] != 3:
        raise ValueError(f"positions must have shape (n_atoms, 3), got {tuple(positions.shape)}")
    if positions.shape[0] == 0:
        raise ValueError("the batch holds no atoms")
    if batch.shape != positions.shape[:1]:
        raise ValueError(f"batch must have shape ({positions.shape[0]},), got {tuple(batch.shape)}")
    if positions.shape[0] > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("atoms must be grouped by system: batch must be non-decreasing")


def complete_graph_systems(batch: Tensor) -> SystemPairs:
    """Every pair of atoms in the same system (molecules, ``r_g=None``), as square blocks per system."""
    n = batch.shape[0]
    device = batch.device
    counts = torch.bincount(batch)
    num_systems, width = counts.shape[0], int(counts.max())
    index = torch.arange(n, device=device)
    if num_systems * width == n:  # equal sizes (MD replicas): the blocks are a reshape
        mask = torch.ones(num_systems, width, dtype=torch.bool, device=device)
        return SystemPairs(atoms=index.reshape(num_systems, width), mask=mask, slots=index)
    starts = torch.cumsum(counts, 0) - counts
    slots = batch * width + (index - starts[batch])
    # Padding slots point at an atom of their own system (the last one), so their geometry stays finite.
    atoms = (starts + counts - 1).clamp(0, n - 1)[:, None].expand(num_systems, width).reshape(-1).clone()
    atoms[slots] = index
    mask = torch.zeros(num_systems * width, dtype=torch.bool, device=device)
    mask[slots] = True
    return SystemPairs(atoms.reshape(num_systems, width), mask.reshape(num_systems, width), slots)


def traceable_complete_graph(batch: Tensor) -> SystemPairs:
    """The complete graph as one block over all atoms, pairs across systems masked.

    No size depends on values, so a model tracing with symbolic sizes (``nequip-compile``) can use it;
    for one system it is exactly :func:`complete_graph_systems`, for a batch it costs ``(sum n)^2``.
    """
    n = batch.shape[0]
    index = torch.arange(n, device=batch.device)
    return SystemPairs(
        atoms=index[None],
        mask=torch.ones(1, n, dtype=torch.bool, device=batch.device),
        slots=index,
        same_system=(batch[:, None] == batch[None, :])[None],
    )


def complete_graph_pairs(batch: Tensor) -> PairTable:
    """Every pair (i, j) of atoms in the same system, including i = j, as a padded table of rows."""
    counts = torch.bincount(batch)
    starts = torch.cumsum(counts, 0) - counts
    width = int(counts.max())
    slots = torch.arange(width, device=batch.device)
    rows = torch.arange(batch.shape[0], device=batch.device)
    mask = slots[None, :] < counts[batch][:, None]
    senders = torch.where(mask, starts[batch][:, None] + slots[None, :], rows[:, None])
    return PairTable(senders=senders, mask=mask, cell_shifts=None)


def radius_pairs(
    positions: Tensor,
    batch: Tensor,
    cutoff: float,
    cell: Tensor | None = None,
    pbc: Tensor | None = None,
) -> PairTable:
    """All pairs within ``cutoff`` including periodic images, from TorchSim's neighbour list.

    ``cell`` is ``(n_systems, 3, 3)`` with lattice vectors as rows (ASE convention), ``pbc`` is
    ``(n_systems, 3)`` booleans. The neighbour list is built without gradient; distances are
    recomputed from positions and cell inside the block so forces and stress flow through them.
    """
    from torch_sim.neighbors import torchsim_nl  # lazy: TorchSim is only needed for radius graphs

    n_atoms = positions.shape[0]
    n_systems = int(batch.max()) + 1
    device = positions.device
    if cell is None:
        # Non-periodic: a cubic box that is never used for images (pbc all False).
        cell = torch.eye(3, dtype=positions.dtype, device=device).expand(n_systems, 3, 3).contiguous()
    if pbc is None:
        pbc = torch.zeros(n_systems, 3, dtype=torch.bool, device=device)
    cell = cell.reshape(n_systems, 3, 3)
    pbc = pbc.reshape(-1, 3).expand(n_systems, 3) if pbc.numel() == 3 else pbc.reshape(n_systems, 3)
    with torch.no_grad():
        # torchsim_nl takes lattice vectors as rows here (checked against ASE in the tests).
        mapping, _, shifts = torchsim_nl(
            positions.detach(),
            cell.detach(),
            pbc,
            float(cutoff),
            batch,
            self_interaction=False,
        )
    receivers, senders = mapping[0], mapping[1]
    shifts = shifts.to(positions.dtype)
    # The self pair first in every row (see PairTable), then the neighbours.
    own = torch.arange(n_atoms, device=device)
    receivers = torch.cat([own, receivers])
    senders = torch.cat([own, senders])
    shifts = torch.cat([torch.zeros(n_atoms, 3, dtype=shifts.dtype, device=device), shifts])
    order = torch.argsort(receivers * (senders.numel() + 1) + torch.arange(receivers.numel(), device=device))
    receivers, senders, shifts = receivers[order], senders[order], shifts[order]
    counts = torch.bincount(receivers, minlength=n_atoms)
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(receivers.numel(), device=device) - starts[receivers]
    table = own[:, None].expand(n_atoms, width).clone()
    table[receivers, slot] = senders
    mask = torch.zeros(n_atoms, width, dtype=torch.bool, device=device)
    mask[receivers, slot] = True
    if not bool(pbc.any()):
        return PairTable(senders=table, mask=mask, cell_shifts=None)
    table_shifts = torch.zeros(n_atoms, width, 3, dtype=positions.dtype, device=device)
    table_shifts[receivers, slot] = shifts
    return PairTable(senders=table, mask=mask, cell_shifts=table_shifts)
