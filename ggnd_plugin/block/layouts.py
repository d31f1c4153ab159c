"""Where the pair loop's rows and partners live, and what the block keeps of them during a call.

The block evaluates every pair sum as a batched product ``(B, R, M) @ (B, M, X)``: ``B`` blocks of
``R`` receiving rows, each with ``M`` partner slots. A layout says what those axes are:

* :class:`SystemLayout` (molecules, :class:`~ggnd_plugin.block.pairs.SystemPairs`): one block per
  system, rows and partners are the system's own slots, so partners need no gather;
* :class:`RowLayout` (periodic images, finite radii, :class:`~ggnd_plugin.block.pairs.PairTable`): one
  block, a row per atom, partners gathered from the table.

:class:`RowGeometry` holds the pair quantities of a set of rows that stay fixed during the diffusion;
:class:`StageOperators` the linear maps every solver stage applies per row.
"""

# No `from __future__ import annotations`: torch.package (nequip-package) cannot load an interned
# dataclass whose annotations are strings.
from dataclasses import dataclass

import torch
from torch import Tensor

from ggnd_plugin.block.pairs import PairTable, SystemPairs

__all__ = ["Layout", "RowGeometry", "RowLayout", "StageOperators", "StageProjection", "SystemLayout"]


class SystemLayout:
    """Rows are the slots of each system's square block; every slot of the system is a partner.

    Tensors of rows are ``(n_systems, width, ...)``; partners are the same slots, so a pair sum over
    partners is a batched matrix product with no gather.
    """

    def __init__(self, pairs: SystemPairs, positions: Tensor):
        self.pairs = pairs
        self.positions = positions[pairs.atoms]  # (S, N, 3)
        self.num_rows = pairs.atoms.shape[1]

    def rows(self, x: Tensor) -> Tensor:
        """Per-atom ``(n_atoms, ...)`` -> per-row ``(S, N, ...)``."""
        return x[self.pairs.atoms]

    def atoms(self, y: Tensor) -> Tensor:
        """Per-row ``(S, N, ...)`` -> per-atom ``(n_atoms, ...)`` (padding slots dropped)."""
        return y.reshape(-1, *y.shape[2:])[self.pairs.slots]

    def take(self, y: Tensor, start: int, stop: int) -> Tensor:
        return y[:, start:stop]

    def join(self, parts: list[Tensor]) -> Tensor:
        return torch.cat(parts, dim=1)

    def partners(self, y: Tensor, start: int, stop: int) -> Tensor:
        """The partners of rows ``start:stop``: every slot of the system, already in place."""
        return y

    def pair_vectors(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Pair vectors ``(S, r, N, 3)`` from rows ``start:stop`` to every partner, and which pairs are
        present."""
        positions = self.positions
        vectors = positions[:, None, :, :] - positions[:, start:stop, None, :]
        width = positions.shape[1]
        present = self.pairs.mask[:, None, :].expand(-1, stop - start, width)
        if self.pairs.same_system is not None:
            present = present & self.pairs.same_system[:, start:stop]
        own = torch.arange(start, stop, device=positions.device)[:, None] == torch.arange(
            width, device=positions.device
        )
        # Padding rows attend to themselves only, so every row has a partner and stays finite.
        return vectors, present | own


class RowLayout:
    """One row per atom with the partners of a :class:`PairTable` (periodic images, finite radii)."""

    def __init__(self, pairs: PairTable, positions: Tensor, cell_per_atom: Tensor | None):
        self.pairs = pairs
        self.positions = positions
        self.cell_per_atom = cell_per_atom
        self.num_rows = positions.shape[0]

    def rows(self, x: Tensor) -> Tensor:
        return x[:, None]

    def atoms(self, y: Tensor) -> Tensor:
        return y[:, 0]

    def take(self, y: Tensor, start: int, stop: int) -> Tensor:
        return y[start:stop]

    def join(self, parts: list[Tensor]) -> Tensor:
        return torch.cat(parts, dim=0)

    def partners(self, y: Tensor, start: int, stop: int) -> Tensor:
        """The partners of rows ``start:stop``, gathered from the table: ``(r, M, ...)``."""
        return y[:, 0][self.pairs.senders[start:stop]]

    def pair_vectors(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        senders = self.pairs.senders[start:stop]
        vectors = self.positions[senders] - self.positions[start:stop, None, :]
        if self.pairs.cell_shifts is not None and self.cell_per_atom is not None:
            vectors = vectors + torch.einsum(
                "nmk,nkl->nml", self.pairs.cell_shifts[start:stop], self.cell_per_atom[start:stop]
            )
        return vectors[:, None], self.pairs.mask[start:stop, None]


Layout = SystemLayout | RowLayout


@dataclass
class RowGeometry:
    """Everything about a set of rows' pairs that does not change during the diffusion: ``(B, R, M)``
    per pair (blocks, rows, partners), with the feature axis where a batched product wants it."""

    presence: Tensor  # (B, 1, R, M): the attention weight of a pair (envelope at r_g, 0 for padding)
    log_presence: Tensor  # (B, 1, R, M): its logarithm, detached (-inf for absent pairs)
    enveloped: bool  # presence is an envelope (r_g); otherwise 0 or 1 and already in attention_bias
    local: Tensor  # (B, R, M): presence times the envelope at the embedding's range
    count: Tensor  # (B, R): smooth partner count, sum_j local_ij (>= 1: the self pair)
    attention_bias: Tensor | None  # (B, H, R, M)
    filter_kernel: Tensor | None  # (B, R, C', M): local * R_l(f)(r) * Y_f(x)
    embedding_kernel: Tensor | None  # (B, R * S * C', M): local * rho_s,l(f)(r) * Y_f(x)


@dataclass
class StageProjection:
    """What a stage reads from each row's invariants: attention query and key, filter gates."""

    query: Tensor | None  # (B, R, H, d), scaled by 1/sqrt(d); None for the mp variant
    key: Tensor | None  # (B, R, H, d)
    gate: Tensor | None  # (B, R, P * C) pre-activation of the filter's path gates; None without filter


@dataclass
class StageOperators:
    """The per-row linear maps of a right-hand side, assembled once per call and used by every stage.

    ``projection`` stacks the query (pre-scaled), key and filter-gate weights so one product per stage
    computes all three; :meth:`project` splits the result by name.
    """

    mixing: Tensor | None  # W of the gradient: (D, D) acting on flattened (C, C') rows, or (C', C, C)
    projection: Tensor  # (query + key + gate widths, invariants)
    projection_bias: Tensor
    query_width: int  # 0 for the mp variant
    gate_width: int  # 0 without the tensor filter
    heads: int

    def project(self, invariants: Tensor) -> StageProjection:
        if self.projection.shape[0] == 0:  # mp without the filter: nothing to project
            return StageProjection(None, None, None)
        projected = torch.nn.functional.linear(invariants, self.projection, self.projection_bias)
        query = key = gate = None
        if self.query_width:
            query, key, rest = projected.split(
                [self.query_width, self.query_width, projected.shape[-1] - 2 * self.query_width], -1
            )
            query = query.unflatten(-1, (self.heads, -1))
            key = key.unflatten(-1, (self.heads, -1))
        else:
            rest = projected
        if self.gate_width:
            gate = rest
        return StageProjection(query, key, gate)
