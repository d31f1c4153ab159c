"""GGND numerics version 1: the block of ggnd-plugin 0.1.0, kept for the model files trained with it.

Model files written by 0.1.0 (MACE ``.model`` files, NequIP packages and checkpoints, SchNetPack
``best_model`` files) hold a version-1 block: a :class:`~ggnd_plugin.block.GGNDBlock` whose config
says ``version=1`` (a config without a version is read as 1). The block's constructor and its
``pairs``/``forward``/``diffuse``/``initial_state`` hand such a block to the functions here, which
compute exactly what 0.1.0 computed, so those files load and predict as before. They are also the
test oracle for the parts of version 2 whose mathematics did not change. New blocks are version 2: do
not change the numerics here.

Why functions of the block rather than a subclass: pickled files name the block's class
(``ggnd_plugin.block.GGNDBlock`` in 0.1.0 files as in 0.2.0 ones) and unpickling builds that class
before it reads the state that says which version it is, so the version is data on one class, not a
type. ``TensorFilter`` is a submodule of version-1 blocks and keeps its class.

Version 1 is not size-safe: its all-pairs embedding grows with the number of partners (docs/block.md).
"""

# No `from __future__ import annotations`: torch.package (nequip-package) cannot load an interned
# dataclass whose annotations are strings.
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ggnd_plugin.block.features import FeatureSpec
from ggnd_plugin.block.geometry import (
    DISTANCE_EPS,
    RadialBasis,
    filter_paths,
    join_degrees,
    split_degrees,
    state_irreps,
)
from ggnd_plugin.block.pairs import PairTable, check_batch, complete_graph_pairs, radius_pairs
from ggnd_plugin.e3nn_compat import o3
from ggnd_plugin.tracing import is_tracing

__all__ = [
    "PairGeometry",
    "TensorFilter",
    "build",
    "diffuse",
    "energy",
    "initial_state",
    "invariants_of",
    "pair_geometry",
    "pairs",
]


@dataclass
class PairGeometry:
    """Distances, basis, envelope and spherical harmonics of a block of rows: ``(rows, M, ...)``."""

    rbf: Tensor
    weight: Tensor  # envelope x mask: the smooth presence of each pair, 0 for padding
    sh: list[Tensor]  # per degree l: (rows, M, 2l + 1)


def pair_geometry(
    positions: Tensor,
    rows: slice,
    pairs: PairTable,
    cell_per_atom: Tensor | None,
    radial: RadialBasis,
    harmonics: o3.SphericalHarmonics,
    lmax: int,
) -> PairGeometry:
    vectors = positions[pairs.senders] - positions[rows][:, None, :]
    if pairs.cell_shifts is not None and cell_per_atom is not None:
        vectors = vectors + torch.einsum("nmk,nkl->nml", pairs.cell_shifts, cell_per_atom[rows])
    r = torch.sqrt((vectors * vectors).sum(-1) + DISTANCE_EPS**2)
    # x / sqrt(r^2 + eps^2) is a unit vector away from r = 0 and smooth at r = 0, where the
    # harmonics of degree >= 1 (homogeneous polynomials) vanish.
    directions = vectors / r[..., None]
    sh_all = harmonics(directions)
    sh = [sh_all[..., l * l : (l + 1) * (l + 1)] for l in range(lmax + 1)]
    weight = radial.envelope(r) * pairs.mask.to(r.dtype)
    return PairGeometry(rbf=radial(r), weight=weight, sh=sh)


class TensorFilter(nn.Module):
    """F_ij(G) = sum over paths of w_ij,path,c * CG(G_ij,c ; Y(x_ij)), the tensor part of S_ij.

    The weights ``w`` are the radial function R(|x_ij|) and the invariant part of the pair interaction
    phi(z_i, z_j) in one small MLP of [basis(r_ij), a(z_i) + b(z_j)], so the filter stays invariant in
    its weights and equivariant in its CG structure.
    """

    def __init__(self, channels: int, lmax: int, num_radial: int, num_invariants: int, hidden: int):
        super().__init__()
        self.channels, self.lmax = channels, lmax
        self.paths = filter_paths(lmax)
        for index, (l_in, l_f, l_out) in enumerate(self.paths):
            # e3nn's wigner_3j has unit Frobenius norm; sqrt(2l_out + 1) normalises the product per component.
            self.register_buffer(f"cg_{index}", o3.wigner_3j(l_in, l_f, l_out) * math.sqrt(2 * l_out + 1))
        fan_in = [sum(1 for p in self.paths if p[2] == l) for l in range(lmax + 1)]
        self.register_buffer("path_norm", torch.tensor([fan_in[p[2]] ** -0.5 for p in self.paths]))
        self.pair_in = nn.Linear(num_invariants, hidden, bias=False)
        self.pair_out = nn.Linear(num_invariants, hidden, bias=False)
        self.radial = nn.Linear(num_radial, hidden)
        self.weights = nn.Linear(hidden, len(self.paths) * channels)

    def atom_terms(self, invariants: Tensor) -> tuple[Tensor, Tensor]:
        return self.pair_in(invariants), self.pair_out(invariants)

    def forward(
        self, gradient: list[Tensor], sh: list[Tensor], rbf: Tensor, term_i: Tensor, term_j: Tensor
    ) -> list[Tensor]:
        hidden = torch.nn.functional.silu(self.radial(rbf) + term_i[:, None, :] + term_j)
        w = self.weights(hidden).unflatten(-1, (len(self.paths), self.channels)) * self.path_norm[:, None]
        out = [torch.zeros_like(g) for g in gradient]
        for index, (l_in, l_f, l_out) in enumerate(self.paths):
            cg = getattr(self, f"cg_{index}")
            # Two contractions rather than one three-operand einsum: opt_einsum's path search would fix
            # the tensor sizes at export time.
            coupling = torch.einsum("abk,nmb->nmak", cg, sh[l_f])
            product = torch.einsum("nmak,nmca->nmck", coupling, gradient[l_in])
            out[l_out] = out[l_out] + w[..., index, :, None] * product
        return out


def invariants_of(z: list[Tensor]) -> Tensor:
    """Per channel: the scalars and the norms of the degree >= 1 parts (smooth at zero)."""
    parts = [z[0][..., 0]]
    for zl in z[1:]:
        parts.append(torch.sqrt((zl * zl).sum(-1) + DISTANCE_EPS**2) - DISTANCE_EPS)
    return torch.cat(parts, dim=-1)


# --------------------------------------------------------------------------------------------------
# The block's modules and its calls, as functions of a GGNDBlock whose config says version 1
# --------------------------------------------------------------------------------------------------
def build(block: nn.Module, spec: FeatureSpec, config) -> None:
    """Add the version-1 modules to ``block`` (an initialised ``nn.Module`` with ``spec`` and
    ``config`` set), in 0.1.0's order, so parameters and their initial values are 0.1.0's."""
    if config.variant == "local" and config.local_cutoff is None:
        raise ValueError(
            "GGNDConfig variant 'local' needs local_cutoff (the host's cutoff radius, in Å) to build a block"
        )
    c, lmax = config.channels, config.lmax
    block.irreps_state = state_irreps(c, lmax)
    block.irreps_host = spec.irreps
    block.radial = RadialBasis(
        config.num_radial, config.radial_range, config.pair_radius, config.envelope_exponent
    )
    # A module built once (not o3.spherical_harmonics per call), so export sees no new constants.
    block.harmonics = o3.SphericalHarmonics(list(range(lmax + 1)), normalize=False, normalization="component")
    num_invariants = c * (lmax + 1)
    hidden = max(16, c)

    # Initial condition Z(0).
    block.uses_host = config.initial_condition in ("host", "both")
    block.uses_embedding = config.initial_condition in ("embedding", "both")
    if block.uses_host:
        block.host_to_state = o3.Linear(block.irreps_host, block.irreps_state)
    if block.uses_embedding:
        block.species_embedding = nn.Embedding(spec.num_species, c)
        block.embedding_radial = nn.Sequential(
            nn.Linear(config.num_radial, hidden), nn.SiLU(), nn.Linear(hidden, c * (lmax + 1))
        )

    # Diffusion operators.
    block.gradient_mixing = o3.Linear(block.irreps_state, block.irreps_state) if config.mix_gradient else None
    head_dim = c // config.heads
    block.query = nn.Linear(num_invariants, config.heads * head_dim)
    block.key = nn.Linear(num_invariants, config.heads * head_dim, bias=False)
    block.attention_radial = nn.Linear(config.num_radial, config.heads)
    block.filter = (
        TensorFilter(c, lmax, config.num_radial, num_invariants, hidden) if config.tensor_filter else None
    )
    block.register_buffer("channel_head", torch.arange(c) // head_dim)

    # Fusion readout E_i = W_l l_i + W_z z_i,00(T), both starting at zero.
    block.register_buffer("host_invariant_columns", torch.tensor(spec.invariant_indices(), dtype=torch.long))
    block.readout_host = nn.Linear(max(spec.invariant_dim, 1), 1, bias=False)
    block.readout_state = nn.Linear(c, 1, bias=False)
    nn.init.zeros_(block.readout_host.weight)
    nn.init.zeros_(block.readout_state.weight)


def _state_dim(block) -> int:
    # From the config's integers, not ``block.irreps_state.dim``: torch.compile cannot guard on e3nn's
    # Irreps objects (the value is the same).
    return block.config.channels * (block.config.lmax + 1) ** 2


def pairs(
    block, positions: Tensor, batch: Tensor, cell: Tensor | None = None, pbc: Tensor | None = None
) -> PairTable:
    """The pair table a version-1 block asks for: padded rows of partners."""
    check_batch(positions, batch)
    radius = block.config.pair_radius
    if radius is None:
        if pbc is not None and bool(pbc.any()):
            raise ValueError("periodic systems need a finite global radius: set GGNDConfig.r_g (e.g. 10.0 Å)")
        return complete_graph_pairs(batch)
    return radius_pairs(positions, batch, radius, cell=cell, pbc=pbc)


def energy(
    block,
    host_features: Mapping[str, Tensor] | Tensor,
    positions: Tensor,
    species: Tensor,
    pairs: PairTable,
    batch: Tensor | None = None,
    cell: Tensor | None = None,
) -> Tensor:
    """Per-atom energy contribution (n_atoms,). ``cell`` (n_systems, 3, 3) needs ``batch``."""
    host = block.spec.concatenate(host_features, positions.shape[0])
    z_final = diffuse(block, host, positions, species, pairs, batch, cell)
    scalars = z_final[:, : block.config.channels]
    result = block.readout_state(scalars).squeeze(-1)
    if block.host_invariant_columns.numel():
        result = result + block.readout_host(host[:, block.host_invariant_columns]).squeeze(-1)
    return result


def cell_per_atom_of(pairs: PairTable, batch: Tensor | None, cell: Tensor | None) -> Tensor | None:
    if pairs.cell_shifts is None:
        return None
    if cell is None or batch is None:
        raise ValueError("a periodic pair table needs cell and batch")
    return cell.reshape(-1, 3, 3)[batch]


def diffuse(
    block,
    host: Tensor,
    positions: Tensor,
    species: Tensor,
    pairs: PairTable,
    batch: Tensor | None = None,
    cell: Tensor | None = None,
) -> Tensor:
    """Z(T) as a flat e3nn tensor with irreps ``block.irreps_state``."""
    cell_per_atom = cell_per_atom_of(pairs, batch, cell)
    z = initial_state(block, host, positions, species, pairs, cell_per_atom)
    if block.config.variant == "mp":
        return z + _rhs(block, z, positions, pairs, cell_per_atom)
    tau = block.config.step_size
    for _ in range(block.config.steps):
        if block.config.solver == "euler":
            z = z + tau * _rhs(block, z, positions, pairs, cell_per_atom)
        else:
            k1 = _rhs(block, z, positions, pairs, cell_per_atom)
            k2 = _rhs(block, z + 0.5 * tau * k1, positions, pairs, cell_per_atom)
            k3 = _rhs(block, z + 0.5 * tau * k2, positions, pairs, cell_per_atom)
            k4 = _rhs(block, z + tau * k3, positions, pairs, cell_per_atom)
            z = z + tau / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
    return z


def initial_state(
    block, host: Tensor, positions: Tensor, species: Tensor, pairs: PairTable, cell_per_atom: Tensor | None
) -> Tensor:
    """Z(0) as a flat e3nn tensor."""
    n = positions.shape[0]
    z = positions.new_zeros(n, _state_dim(block))
    if block.uses_host:
        z = z + block.host_to_state(host)
    if block.uses_embedding:
        if not is_tracing() and (species.min() < 0 or species.max() >= block.spec.num_species):
            raise ValueError(
                f"species indices must lie in 0..{block.spec.num_species - 1}, "
                f"got {int(species.min())}..{int(species.max())}"
            )
        embedded = block.species_embedding(species)
        pair_part = _over_rows(block, _embedding_rows, n, positions, pairs, cell_per_atom, embedded)
        own_part = torch.nn.functional.pad(embedded, (0, _state_dim(block) - block.config.channels))
        z = z + pair_part + own_part
    return z


def _embedding_rows(
    block, rows: slice, positions: Tensor, pairs: PairTable, cell_per_atom: Tensor | None, embedded: Tensor
) -> Tensor:
    c, lmax = block.config.channels, block.config.lmax
    geo = pair_geometry(positions, rows, pairs, cell_per_atom, block.radial, block.harmonics, lmax)
    radial = block.embedding_radial(geo.rbf).unflatten(-1, (lmax + 1, c))
    partner = embedded[pairs.senders] * geo.weight[..., None]  # (rows, M, C)
    scale = block.config.pair_normalization**-0.5
    parts = [
        torch.einsum("nmc,nmk->nck", radial[..., l, :] * partner, geo.sh[l]) * scale for l in range(lmax + 1)
    ]
    return join_degrees(parts)


def _rhs(block, z: Tensor, positions: Tensor, pairs: PairTable, cell_per_atom: Tensor | None) -> Tensor:
    """dZ/dt for every atom (or the message of the ``mp`` variant)."""
    c, lmax = block.config.channels, block.config.lmax
    mixed = block.gradient_mixing(z) if block.gradient_mixing is not None else z
    invariants = invariants_of(split_degrees(z, c, lmax))
    head_dim = c // block.config.heads
    query = block.query(invariants).unflatten(-1, (block.config.heads, head_dim))
    key = block.key(invariants).unflatten(-1, (block.config.heads, head_dim))
    terms = block.filter.atom_terms(invariants) if block.filter is not None else (None, None)
    return _over_rows(
        block, _message_rows, z.shape[0], positions, pairs, cell_per_atom, mixed, query, key, *terms
    )


def _message_rows(
    block,
    rows: slice,
    positions: Tensor,
    pairs: PairTable,
    cell_per_atom: Tensor | None,
    mixed: Tensor,
    query: Tensor,
    key: Tensor,
    term_in: Tensor | None,
    term_out: Tensor | None,
) -> Tensor:
    c, lmax = block.config.channels, block.config.lmax
    geo = pair_geometry(positions, rows, pairs, cell_per_atom, block.radial, block.harmonics, lmax)
    partners = split_degrees(mixed[pairs.senders], c, lmax)  # (rows, M, C, 2l+1)
    if block.config.variant == "mp":
        # One fully connected message-passing layer: messages from W z_j, summed with a fixed scale.
        values = partners
        pair_weight = (geo.weight * block.config.pair_normalization**-0.5)[..., None]  # (rows, M, 1)
    else:
        own = split_degrees(mixed[rows], c, lmax)
        values = [pj - oi[:, None] for pj, oi in zip(partners, own, strict=True)]  # G_ij = W(z_j - z_i)
        pair_weight = _attention(block, query[rows], key[pairs.senders], geo)  # (rows, M, H)
        pair_weight = pair_weight[..., block.channel_head]  # (rows, M, C)
    if block.filter is not None:
        filtered = block.filter(values, geo.sh, geo.rbf, term_in[rows], term_out[pairs.senders])
        values = [v + f for v, f in zip(values, filtered, strict=True)]
    parts = [torch.einsum("nmc,nmck->nck", pair_weight.expand(*v.shape[:3]), v) for v in values]
    return join_degrees(parts)


def _attention(block, query: Tensor, key: Tensor, geo: PairGeometry) -> Tensor:
    """alpha_ij per head: softmax over j of q_i.k_j/sqrt(d) + b(r_ij), weighted by the envelope.

    Weighting exp(logit) by the envelope (0 for padding and beyond r_g) keeps the rows summing to
    one while a pair fades out continuously as it crosses the pair radius.
    """
    logits = torch.einsum("nhd,nmhd->nmh", query, key) * query.shape[-1] ** -0.5
    logits = logits + block.attention_radial(geo.rbf)
    present = geo.weight[..., None] > 0
    logits = torch.where(present, logits, torch.full_like(logits, -1e30))
    shifted = logits - logits.amax(dim=1, keepdim=True).detach()
    unnormalised = torch.exp(shifted) * geo.weight[..., None]
    return unnormalised / unnormalised.sum(dim=1, keepdim=True)


def _over_rows(block, fn, n: int, positions: Tensor, pairs: PairTable, *args) -> Tensor:
    """Apply ``fn`` to all rows at once, or block by block with recomputation in backward."""
    chunk = block.config.chunk_size
    if chunk is None or chunk >= n:
        return fn(block, slice(0, n), positions, pairs, *args)
    outputs = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block_pairs = pairs.rows(start, stop)
        if torch.is_grad_enabled():
            out = checkpoint(
                _RowBlock(block, fn, start, stop, block_pairs.cell_shifts is not None),
                positions,
                block_pairs.senders,
                block_pairs.mask,
                block_pairs.cell_shifts,
                *args,
                use_reentrant=False,
            )
        else:
            out = fn(block, slice(start, stop), positions, block_pairs, *args)
        outputs.append(out)
    return torch.cat(outputs, dim=0)


class _RowBlock:
    """A picklable closure for checkpoint: rebuilds the row block's PairTable from tensors."""

    def __init__(self, block, fn, start: int, stop: int, periodic: bool):
        self.block, self.fn, self.rows, self.periodic = block, fn, slice(start, stop), periodic

    def __call__(self, positions, senders, mask, shifts, *args):
        return self.fn(
            self.block,
            self.rows,
            positions,
            PairTable(senders, mask, shifts if self.periodic else None),
            *args,
        )
