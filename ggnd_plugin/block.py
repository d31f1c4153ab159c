"""The GGND block: geometric graph neural diffusion over all atom pairs of each system.

Read top to bottom, the file follows the data:

1. :class:`GGNDConfig` and :class:`FeatureSpec` say what the block is and what the host gives it.
2. :class:`SystemPairs`, :class:`PairTable` and their builders say which pairs ``(i, j)`` interact:
   every atom of the same system for molecules (square blocks, one per system), all periodic images
   within ``r_g`` for crystals (one padded row of partners per atom).
3. :class:`GGNDBlock` computes, for each system,

   * the pair geometry once per call: distances, spherical harmonics ``Y(x_ij)``, radial basis,
     envelopes, the attention's radial bias and the filter's radial functions ``R(|x_ij|)``;
   * the initial state ``Z(0)`` = per-irrep linear map of the host features + the atom's species
     embedding + the embedding ``phi_E(X, H)`` of its neighbourhood, averaged over a smooth partner count;
   * the diffusion ``dz_i/dt = sum_j alpha_ij [G_ij + F_ij(G_ij)]`` with the equivariant gradient
     ``G_ij = W (z_j - z_i)`` (paper eq. 2), right-stochastic attention ``alpha`` (softmax over j per
     head, from invariants only) and the tensor filter ``F_ij`` (Clebsch-Gordan products of the
     gradient with ``Y(x_ij)`` weighted by ``R_l(|x_ij|)``, gated per atom by invariants of ``z_i``,
     paper eq. 3), integrated from 0 to T with K explicit steps;
   * the fusion readout ``E_i = W_l l_i + W_z z_i,00(T)``, both weights starting at zero, which is added
     to the host's own per-atom energy.

docs/block.md states the same equations with every decision the paper leaves open and why the block is
written this way (size safety, cost). Every pair sum is one batched matrix product per stage: the
pair kernel ``alpha_ij K_ij,q`` times the partners' features. Nothing in :meth:`GGNDBlock.forward`
depends on tensor values for its shapes; the pair tables are built outside, like a host's neighbour list.

This file is numerics **version 2**. Files trained with ggnd-plugin 0.1.0 hold version-1 blocks, which
:mod:`ggnd_plugin.block_v1` keeps computing exactly as before (``GGNDConfig.version``).
"""

# No `from __future__ import annotations`: torch.package (nequip-package) cannot load an interned
# dataclass whose annotations are strings.
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ggnd_plugin.e3nn_compat import o3
from ggnd_plugin.tracing import is_tracing
from ggnd_plugin.validation import validate_block_inputs

__all__ = [
    "CURRENT_VERSION",
    "FeatureSpec",
    "GGNDBlock",
    "GGNDConfig",
    "GGNDVersionWarning",
    "PairTable",
    "SystemPairs",
    "complete_graph_pairs",
    "complete_graph_systems",
    "radius_pairs",
    "system_energy",
]

SOLVERS = ("euler", "rk4")
VARIANTS = ("diffusion", "local", "mp")
INITIAL_CONDITIONS = ("host", "embedding", "both")
# 1: ggnd-plugin 0.1.0 (ggnd_plugin.block_v1). 2: size-safe pair sums, pair geometry once per call,
# radial filter weights R(|x_ij|) with per-atom gates, batched pair products.
VERSIONS = (1, 2)
CURRENT_VERSION = 2

# Distances are regularised as sqrt(r^2 + eps^2) so that coincident atoms and the self pair give finite
# values and finite derivatives; at bond lengths the change is below 1e-6 relative.
DISTANCE_EPS = 1e-3
# exp() of a shifted logit is clamped here (float32 overflows near 88); only pairs whose envelope weight
# is below exp(-80) are affected, and their weight in the softmax is below float32 resolution anyway.
MAX_EXPONENT = 80.0
# Learned radial functions per degree in the embedding phi_E (mixed per channel).
EMBEDDING_RADIAL = 4
# State widths C (lmax+1)^2 up to which the gradient's channel mixing is one dense product per stage
# (cheaper in calls than a product per component; beyond, the wasted multiplications cost more).
DENSE_MIXING_LIMIT = 256


class GGNDVersionWarning(UserWarning):
    """A mapping of GGND options without ``version`` was read as version 1 (see :class:`GGNDConfig`)."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class GGNDConfig:
    """Hyper-parameters of one GGND block.

    Attributes:
        channels: channels k per degree of the diffusion state Z.
        lmax: highest degree L of Z (0, 1 or 2; 3 is accepted and slower) and of the spherical
            harmonics in the filter.
        heads: attention heads; channels are split evenly between heads.
        steps: K, the number of solver steps from t = 0 to ``horizon``.
        horizon: T, the stopping time of the diffusion.
        solver: ``"euler"`` (explicit Euler) or ``"rk4"`` (classic Runge-Kutta).
        num_radial: size of the Gaussian radial basis.
        radial_range: Å spanned by the radial basis when no pair radius applies (complete graph); in
            version 2 also the range of the embedding and of the filter's radial functions there.
        r_g: global radius (Å). ``None``: every pair of the system (molecules). A float: every pair
            within r_g including periodic images, switched off smoothly by a polynomial envelope.
        chunk_size: evaluate the pair sums in blocks of this many receiving atoms, recomputing each
            block in the backward pass, so peak memory grows linearly with the number of atoms.
            ``None``: all rows at once (fastest for small systems, and the form to export).
        initial_condition: Z(0) from the ``"host"`` features, the all-pairs ``"embedding"``, or ``"both"``.
        variant: ``"diffusion"`` (GGND), ``"local"`` (the same diffusion restricted to
            ``local_cutoff``, paper table 3 dagger) or ``"mp"`` (one fully connected message-passing
            layer instead of the diffusion, paper table 3 double dagger).
        local_cutoff: pair radius of the ``"local"`` variant; None: the host's cutoff, which the MACE
            adapter fills in when it attaches the block (a block built directly needs a value).
        tensor_filter: include the Clebsch-Gordan filter F_ij. False reduces the diffusivity to the
            scalar attention (the pure-diffusion special case when ``mix_gradient`` is also False).
        mix_gradient: learn the channel mixing W_l of the gradient; False uses the identity.
        envelope_exponent: p of the polynomial envelope at the pair radius (C2-smooth cut-off).
        pair_normalization: version 1 only: pair sums in the embedding and the ``mp`` layer were divided
            by its square root. Version 2 averages over a smooth partner count instead.
        version: the block's numerics. 2 (default): size-safe and fast (docs/block.md). 1: the numerics
            of ggnd-plugin 0.1.0, which files trained with it keep. A saved model always carries its
            version; a mapping of options without ``version`` (a config written for 0.1.0, e.g. inside a
            NequIP checkpoint) is read as version 1, with a :class:`GGNDVersionWarning`.
    """

    channels: int = 16
    lmax: int = 1
    heads: int = 4
    steps: int = 3
    horizon: float = 1.0
    solver: str = "euler"
    num_radial: int = 8
    radial_range: float = 8.0
    r_g: float | None = None
    chunk_size: int | None = None
    initial_condition: str = "both"
    variant: str = "diffusion"
    local_cutoff: float | None = None
    tensor_filter: bool = True
    mix_gradient: bool = True
    envelope_exponent: int = 6
    pair_normalization: float = 16.0
    version: int = CURRENT_VERSION

    def __post_init__(self) -> None:
        problems = []
        if self.version not in VERSIONS:
            problems.append(f"version must be one of {VERSIONS}, got {self.version}")
        if self.channels < 1:
            problems.append(f"channels must be >= 1, got {self.channels}")
        if not 0 <= self.lmax <= 3:
            problems.append(f"lmax must be 0..3, got {self.lmax}")
        if self.heads < 1 or self.channels % self.heads:
            problems.append(f"heads ({self.heads}) must divide channels ({self.channels})")
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if not self.horizon > 0:
            problems.append(f"horizon must be > 0, got {self.horizon}")
        if self.solver not in SOLVERS:
            problems.append(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.variant not in VARIANTS:
            problems.append(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.initial_condition not in INITIAL_CONDITIONS:
            problems.append(
                f"initial_condition must be one of {INITIAL_CONDITIONS}, got {self.initial_condition!r}"
            )
        if self.r_g is not None and not self.r_g > 0:
            problems.append(f"r_g must be None or > 0, got {self.r_g}")
        if self.local_cutoff is not None and not self.local_cutoff > 0:
            problems.append(f"local_cutoff must be None or > 0, got {self.local_cutoff}")
        if self.chunk_size is not None and self.chunk_size < 1:
            problems.append(f"chunk_size must be None or >= 1, got {self.chunk_size}")
        if self.num_radial < 2:
            problems.append(f"num_radial must be >= 2, got {self.num_radial}")
        if not self.radial_range > 0:
            problems.append(f"radial_range must be > 0, got {self.radial_range}")
        if problems:
            raise ValueError("invalid GGNDConfig: " + "; ".join(problems))

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A config unpickled from a 0.1.0 file has no version attribute: it describes a version-1 block.
        state = dict(state)
        state.setdefault("version", 1)
        self.__dict__.update(state)

    @property
    def pair_radius(self) -> float | None:
        """The radius that selects pairs: ``local_cutoff`` for ``local``, else ``r_g``."""
        return self.local_cutoff if self.variant == "local" else self.r_g

    @property
    def step_size(self) -> float:
        return self.horizon / self.steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_file(cls, path) -> "GGNDConfig":
        """Read options from a YAML (or JSON) file: a mapping of option names to values."""
        import yaml

        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
        if not isinstance(values, Mapping):
            raise ValueError(
                f"{path}: a GGND config file must hold a mapping of options, got {type(values).__name__}"
            )
        values = values.get("ggnd", values)
        try:
            return cls.from_dict(values)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "GGNDConfig":
        """Options from a mapping; one without ``version`` was written for 0.1.0 and is version 1."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GGND option(s) {unknown}; known options: {sorted(known)}")
        values = dict(values)
        if "version" not in values:
            warnings.warn(
                "GGND options without 'version' are read as version 1, the numerics of ggnd-plugin 0.1.0 "
                "that models trained with it keep; new models should say 'version: 2' (size-safe and "
                "faster, docs/block.md)",
                GGNDVersionWarning,
                stacklevel=2,
            )
            values["version"] = 1
        return cls(**values)


# --------------------------------------------------------------------------------------------------
# What the host gives the block
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureSpec:
    """The host's per-atom features that the block reads, declared with their irreps.

    ``fields`` maps a name to an irreps string, e.g. ``{"node_feats": "32x0e+32x1o"}``: the ``0e``
    parts are invariant (they also feed the fusion readout), the rest are equivariant. The block checks
    every tensor it receives against this declaration and names the field when one does not fit.
    """

    fields: tuple[tuple[str, str], ...]
    num_species: int

    def __init__(self, fields: Mapping[str, str] | tuple[tuple[str, str], ...], num_species: int):
        items = tuple(fields.items()) if isinstance(fields, Mapping) else tuple(fields)
        if not items:
            raise ValueError("FeatureSpec needs at least one host feature field")
        normalised = tuple((str(name), str(o3.Irreps(irreps).simplify())) for name, irreps in items)
        if num_species < 1:
            raise ValueError(f"num_species must be >= 1, got {num_species}")
        object.__setattr__(self, "fields", normalised)
        object.__setattr__(self, "num_species", int(num_species))

    @property
    def irreps(self) -> o3.Irreps:
        """Irreps of all fields concatenated in declaration order."""
        total = o3.Irreps("")
        for _, irreps in self.fields:
            total = total + o3.Irreps(irreps)
        return total

    @property
    def invariant_dim(self) -> int:
        return sum(mul for mul, ir in self.irreps if ir == o3.Irrep("0e"))

    def invariant_indices(self) -> list[int]:
        """Columns of the concatenated tensor that hold ``0e`` scalars."""
        columns: list[int] = []
        for (mul, ir), part in zip(self.irreps, self.irreps.slices(), strict=True):
            if ir == o3.Irrep("0e"):
                columns.extend(range(part.start, part.start + mul))
        return columns

    def field_dims(self) -> tuple[tuple[str, int], ...]:
        """(name, width) of each field, as plain integers (nothing of e3nn left to trace)."""
        # Computed once and kept on the object: parsing irreps on every call costs time, and traced code
        # (torch.compile) then reads plain integers. Specs unpickled from 0.1.0 files compute it here.
        dims = self.__dict__.get("_dims")
        if dims is None:
            dims = tuple((name, o3.Irreps(irreps).dim) for name, irreps in self.fields)
            object.__setattr__(self, "_dims", dims)
        return dims

    def concatenate(self, features: Mapping[str, Tensor] | Tensor, num_atoms: int) -> Tensor:
        """Check the host tensors against the declaration and concatenate them."""
        if isinstance(features, Tensor):
            if len(self.fields) != 1:
                raise ValueError(
                    f"a single tensor was given but the feature spec declares {len(self.fields)} fields "
                    f"{[name for name, _ in self.fields]}; pass a dict"
                )
            features = {self.fields[0][0]: features}
        parts = []
        for (name, irreps), (_, dim) in zip(self.fields, self.field_dims(), strict=True):
            if name not in features:
                raise KeyError(f"host feature '{name}' ({irreps}) is missing; got {sorted(features)}")
            tensor = features[name]
            if tensor.dim() != 2 or tensor.shape[0] != num_atoms or tensor.shape[1] != dim:
                raise ValueError(
                    f"host feature '{name}' should have shape ({num_atoms}, {dim}) for irreps {irreps}, "
                    f"got {tuple(tensor.shape)}"
                )
            parts.append(tensor)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def describe(self) -> str:
        lines = [f"{self.num_species} species"]
        for name, irreps in self.fields:
            kinds = [
                f"{mul}x{ir} ({'invariant' if ir == o3.Irrep('0e') else 'equivariant'})"
                for mul, ir in o3.Irreps(irreps)
            ]
            lines.append(f"{name}: " + ", ".join(kinds))
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Which pairs interact
# --------------------------------------------------------------------------------------------------
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


def _check_batch(positions: Tensor, batch: Tensor) -> None:
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


# --------------------------------------------------------------------------------------------------
# Radial functions and spherical harmonics
# --------------------------------------------------------------------------------------------------
def polynomial_envelope(x: Tensor, p: int) -> Tensor:
    """1 at x = 0, 0 for x >= 1, with value, first and second derivative continuous at x = 1."""
    x = x.clamp(max=1.0)
    value = 1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
    return torch.where(x < 1.0, value, torch.zeros_like(x))


def smooth_cutoff(x: Tensor, p: int) -> Tensor:
    """:func:`polynomial_envelope` written as ``(1 - x)^3 sum_{k<p} C(k+2, 2) x^k``: the same polynomial,
    but with its triple root at x = 1 explicit, so it keeps its relative precision there (the expanded
    form cancels to an absolute error of ~1e-6 in float32, where the value itself is ~1e-7)."""
    x = x.clamp(max=1.0)
    powers = x[..., None] ** torch.arange(p, dtype=x.dtype, device=x.device)  # one op, not a Horner loop
    coefficients = torch.tensor([math.comb(k + 2, 2) for k in range(p)], dtype=x.dtype, device=x.device)
    return (1.0 - x) ** 3 * (powers @ coefficients)


class RadialBasis(nn.Module):
    """Gaussians on [0, range], times the envelope when a pair radius is set.

    Gaussians (not Bessel functions) because they are finite with finite derivatives at r = 0, which
    the complete graph reaches for the self pair and for coincident atoms.
    """

    def __init__(self, num_radial: int, radial_range: float, cutoff: float | None, exponent: int):
        super().__init__()
        span = cutoff if cutoff is not None else radial_range
        self.register_buffer("centers", torch.linspace(0.0, span, num_radial))
        self.width = span / (num_radial - 1)
        self.cutoff = cutoff
        self.exponent = exponent

    def envelope(self, r: Tensor) -> Tensor:
        if self.cutoff is None:
            return torch.ones_like(r)
        return polynomial_envelope(r / self.cutoff, self.exponent)

    def forward(self, r: Tensor) -> Tensor:
        return torch.exp(-(((r[..., None] - self.centers) / self.width) ** 2))


def spherical_harmonics(vectors: Tensor, lmax: int) -> Tensor:
    """e3nn's real spherical harmonics of degrees 0..lmax (component normalisation, not normalised).

    Written out for lmax <= 2 (a handful of element-wise products instead of e3nn's general code, and
    nothing for torch.compile to trip over); the tests check them against ``e3nn.o3.spherical_harmonics``.
    Columns: l = 0, then l = 1 as (x, y, z), then l = 2; ``(..., (lmax + 1)^2)``.
    """
    if lmax > 2:
        return o3.spherical_harmonics(
            list(range(lmax + 1)), vectors, normalize=False, normalization="component"
        )
    x, y, z = vectors.unbind(-1)
    parts = [torch.ones_like(x)]
    if lmax >= 1:
        root3 = math.sqrt(3.0)
        parts += [root3 * x, root3 * y, root3 * z]
    if lmax >= 2:
        root15, root5 = math.sqrt(15.0), math.sqrt(5.0)
        parts += [
            root15 * x * z,
            root15 * x * y,
            root5 * (y * y - 0.5 * (x * x + z * z)),
            root15 * y * z,
            0.5 * root15 * (z * z - x * x),
        ]
    return torch.stack(parts, dim=-1)


# --------------------------------------------------------------------------------------------------
# Equivariant layouts and couplings
# --------------------------------------------------------------------------------------------------
def split_degrees(x: Tensor, channels: int, lmax: int) -> list[Tensor]:
    """(..., D) with irreps ``C x 0e + C x 1o + ...`` -> per degree (..., C, 2l + 1)."""
    parts, start = [], 0
    for l in range(lmax + 1):
        size = channels * (2 * l + 1)
        parts.append(x[..., start : start + size].reshape(*x.shape[:-1], channels, 2 * l + 1))
        start += size
    return parts


def join_degrees(parts: list[Tensor]) -> Tensor:
    return torch.cat([p.reshape(*p.shape[:-2], -1) for p in parts], dim=-1)


def to_channels(x: Tensor, channels: int, lmax: int) -> Tensor:
    """e3nn layout (..., D) -> (..., C, (lmax+1)^2): each channel's components of all degrees in a row."""
    return torch.cat(split_degrees(x, channels, lmax), dim=-1)


def from_channels(x: Tensor, lmax: int) -> Tensor:
    """(..., C, (lmax+1)^2) -> e3nn layout (..., D); the inverse of :func:`to_channels`."""
    return join_degrees([x[..., l * l : (l + 1) * (l + 1)] for l in range(lmax + 1)])


def degree_of_component(lmax: int) -> list[int]:
    """The degree l of each of the (lmax+1)^2 components, in the order of :func:`spherical_harmonics`."""
    return [l for l in range(lmax + 1) for _ in range(2 * l + 1)]


def state_irreps(channels: int, lmax: int) -> o3.Irreps:
    return o3.Irreps([(channels, (l, (-1) ** l)) for l in range(lmax + 1)])


def filter_paths(lmax: int) -> list[tuple[int, int, int]]:
    """Clebsch-Gordan paths (l_in, l_filter, l_out) that keep the natural parity (-1)^l."""
    return [
        (l_in, l_f, l_out)
        for l_in in range(lmax + 1)
        for l_f in range(lmax + 1)
        for l_out in range(abs(l_in - l_f), min(l_in + l_f, lmax) + 1)
        if (l_in + l_f + l_out) % 2 == 0
    ]


def filter_couplings(lmax: int) -> tuple[Tensor, Tensor, Tensor]:
    """The tensor filter's Clebsch-Gordan algebra as three constant matrices.

    The filter's pair sum gives, per atom and channel, ``T[f, a]``: the kernel ``R_l(f) Y_f`` (component
    ``f`` of the harmonics) against component ``a`` of the gradient. Then, for every path
    ``p = (l_in, l_f, l_out)``:

        F_l_out,o = sum_p  gate_p  sum_{f in l_f, a in l_in}  CG_p[a, f, o] sqrt(2 l_out + 1) / sqrt(n_p)  T[f, a]

    with ``n_p`` the number of paths into ``l_out``. Returned: ``coupling`` ``(C' * C', P_out)`` maps the
    flattened ``T`` to every path's output components at once (normalisations folded in), ``expand``
    ``(n_paths, P_out)`` copies each path's gate onto its output columns, and ``collect``
    ``(P_out, C')`` adds each path's output into the components of its ``l_out``. ``C' = (lmax+1)^2``.
    """
    paths = filter_paths(lmax)
    components = (lmax + 1) ** 2
    outputs = sum(2 * l_out + 1 for _, _, l_out in paths)
    fan_in = [sum(1 for p in paths if p[2] == l) for l in range(lmax + 1)]
    coupling = torch.zeros(components, components, outputs, dtype=torch.float64)
    expand = torch.zeros(len(paths), outputs, dtype=torch.float64)
    collect = torch.zeros(outputs, components, dtype=torch.float64)
    column = 0
    for index, (l_in, l_f, l_out) in enumerate(paths):
        cg = o3.wigner_3j(l_in, l_f, l_out, dtype=torch.float64)  # (2l_in+1, 2l_f+1, 2l_out+1), unit norm
        size = 2 * l_out + 1
        # coupling[f, a, o]: f a component of Y_l_f, a one of the gradient's degree l_in
        block = cg.permute(1, 0, 2) * math.sqrt(size) / math.sqrt(fan_in[l_out])
        coupling[l_f * l_f : (l_f + 1) ** 2, l_in * l_in : (l_in + 1) ** 2, column : column + size] = block
        expand[index, column : column + size] = 1.0
        collect[column : column + size, l_out * l_out : (l_out + 1) ** 2] = torch.eye(
            size, dtype=torch.float64
        )
        column += size
    return coupling.reshape(components * components, outputs), expand, collect


# --------------------------------------------------------------------------------------------------
# Where the pair loop's rows and partners live
# --------------------------------------------------------------------------------------------------
class _SystemLayout:
    """Rows are the slots of each system's square block; every slot of the system is a partner.

    Tensors of rows are ``(n_systems, width, ...)``; partners are the same slots, so a pair sum over
    partners is a batched matrix product with no gather.
    """

    def __init__(self, pairs: SystemPairs, positions: Tensor):
        self.pairs = pairs
        self.positions = positions[pairs.atoms]  # (S, N, 3)
        self.num_rows = pairs.atoms.shape[1]

    def rows(self, x: Tensor) -> Tensor:
        return x[self.pairs.atoms]

    def atoms(self, y: Tensor) -> Tensor:
        return y.reshape(-1, *y.shape[2:])[self.pairs.slots]

    def take(self, y: Tensor, start: int, stop: int) -> Tensor:
        return y[:, start:stop]

    def join(self, parts: list[Tensor]) -> Tensor:
        return torch.cat(parts, dim=1)

    def partners(self, y: Tensor, start: int, stop: int) -> Tensor:
        return y

    def geometry_inputs(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Pair vectors ``(S, r, N, 3)`` from the rows ``start:stop`` to every partner, and presence."""
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


class _RowLayout:
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
        return y[:, 0][self.pairs.senders[start:stop]]

    def geometry_inputs(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        senders = self.pairs.senders[start:stop]
        vectors = self.positions[senders] - self.positions[start:stop, None, :]
        if self.pairs.cell_shifts is not None and self.cell_per_atom is not None:
            vectors = vectors + torch.einsum(
                "nmk,nkl->nml", self.pairs.cell_shifts[start:stop], self.cell_per_atom[start:stop]
            )
        return vectors[:, None], self.pairs.mask[start:stop, None]


@dataclass
class _Geometry:
    """Everything about a block of pairs that does not change during the diffusion: ``(B, R, M)`` per
    pair (rows, partners), with the feature axis where a batched product wants it."""

    presence: Tensor  # (B, 1, R, M): the attention weight of a pair (envelope at r_g, 0 for padding)
    log_presence: Tensor  # (B, 1, R, M): its logarithm, detached (-inf for absent pairs)
    enveloped: bool  # presence is an envelope (r_g); otherwise 0 or 1 and already in attention_bias
    local: Tensor  # (B, R, M): presence times the envelope at the embedding's range
    count: Tensor  # (B, R): smooth partner count, sum_j local_ij (>= 1: the self pair)
    attention_bias: Tensor | None  # (B, H, R, M)
    filter_kernel: Tensor | None  # (B, R, C', M): local * R_l(f)(r) * Y_f(x)
    embedding_kernel: Tensor | None  # (B, R * S * C', M): local * rho_s,l(f)(r) * Y_f(x)


@dataclass
class _StageOperators:
    """The per-row linear maps of a right-hand side, assembled once per call and used by every stage."""

    mixing: Tensor | None  # W of the gradient: (D, D) acting on flattened (C, C') rows, or (C', C, C)
    projection: Tensor  # query (pre-scaled), key and filter-gate weights stacked: (outputs, invariants)
    projection_bias: Tensor
    sizes: list[int]  # widths of query, key, gate in the projection's output


# --------------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------------
class GGNDBlock(nn.Module):
    """Equivariant global diffusion over atom pairs, with a zero-initialised fusion readout.

    ``forward`` returns the block's per-atom energy contribution ``W_l l_i + W_z z_i,00(T)``; a host
    adds it to its own per-atom (or total) energy before taking forces, so forces stay conservative.
    At construction both readout weights are zero: the host's predictions are unchanged until trained.

    ``GGNDBlock(spec, config)`` with ``config.version == 1`` builds the 0.1.0 block
    (:class:`ggnd_plugin.block_v1.LegacyGGNDBlock`), as does unpickling a block saved by 0.1.0.
    """

    def __new__(cls, *args, **kwargs):
        config = kwargs.get("config", args[1] if len(args) > 1 else None)
        if cls is GGNDBlock and config is not None and getattr(config, "version", CURRENT_VERSION) == 1:
            from ggnd_plugin.block_v1 import LegacyGGNDBlock

            return super().__new__(LegacyGGNDBlock)
        return super().__new__(cls)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if type(self) is GGNDBlock and self.config.version == 1:
            from ggnd_plugin.block_v1 import LegacyGGNDBlock

            self.__class__ = LegacyGGNDBlock

    def __init__(self, spec: FeatureSpec, config: GGNDConfig | None = None):
        super().__init__()
        config = config or GGNDConfig()
        if config.version != 2:
            raise ValueError(f"GGNDBlock builds version 2 (got a version-{config.version} config)")
        if config.variant == "local" and config.local_cutoff is None:
            raise ValueError(
                "GGNDConfig variant 'local' needs local_cutoff (the host's cutoff radius, in Å) to build a block"
            )
        self.spec, self.config = spec, config
        c, lmax, heads = config.channels, config.lmax, config.heads
        # Plain integers for everything forward reads: e3nn's Irreps objects stay out of traced code.
        self.channels, self.lmax, self.heads = c, lmax, heads
        self.head_dim = c // heads
        self.components = (lmax + 1) ** 2
        self.state_dim = c * self.components
        self.pair_radius = config.pair_radius
        self.span = config.pair_radius if config.pair_radius is not None else config.radial_range
        self.irreps_state = state_irreps(c, lmax)
        self.irreps_host = spec.irreps
        self.radial = RadialBasis(
            config.num_radial, config.radial_range, config.pair_radius, config.envelope_exponent
        )
        self.register_buffer("component_degree", torch.tensor(degree_of_component(lmax)), persistent=False)
        # degree_sum[a, l - 1] = 1 where component a has degree l >= 1: per-degree norms by one product
        degree_sum = torch.tensor(degree_of_component(lmax))[:, None] == torch.arange(1, lmax + 1)[None, :]
        self.register_buffer("degree_sum", degree_sum.to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("component_eye", torch.eye(self.components), persistent=False)
        num_invariants = c * (lmax + 1)
        hidden = max(16, c)

        # Initial condition Z(0).
        self.uses_host = config.initial_condition in ("host", "both")
        self.uses_embedding = config.initial_condition in ("embedding", "both")
        if self.uses_host:
            self.host_to_state = o3.Linear(self.irreps_host, self.irreps_state)
        if self.uses_embedding:
            self.species_embedding = nn.Embedding(spec.num_species, c)
            # R^E_l,c(r) = sum_s W[s, l, c] rho_s,l(r): a few learned radial functions per degree (from
            # pair_radial), mixed per channel, so the neighbourhood sum is one batched product of a small
            # pair kernel with the partners' species embedding.
            self.embedding_mixing = nn.Parameter(torch.randn(EMBEDDING_RADIAL, lmax + 1, c))

        # Diffusion operators. W of the gradient: one C x C matrix per degree, initialised and normalised
        # as e3nn's o3.Linear (weights N(0, 1), divided by sqrt(C) in use).
        self.gradient_mixing = nn.Parameter(torch.randn(lmax + 1, c, c)) if config.mix_gradient else None
        self.query = nn.Linear(num_invariants, heads * self.head_dim)
        self.key = nn.Linear(num_invariants, heads * self.head_dim, bias=False)
        self.attention_radial = nn.Linear(config.num_radial, heads)
        # A learned preference for near partners, logit -= gamma_h r_ij with gamma_h = softplus(.) >= 0,
        # starting between 1/4 and 1 per Å across heads: every pair is attended, but the attention (and
        # the forces it carries) concentrates on a neighbourhood of fixed size however large the system.
        decay = torch.logspace(math.log10(0.2), math.log10(0.6), heads) if heads > 1 else torch.tensor([0.35])
        self.attention_decay = nn.Parameter(torch.log(torch.expm1(decay)))
        self.tensor_filter = config.tensor_filter
        if config.tensor_filter:
            paths = filter_paths(lmax)
            self.num_paths = len(paths)
            # R_lf(|x_ij|): one radial function per filter degree (from pair_radial), shared by the
            # channels; the per-atom gates make the filter channel- and path-specific.
            self.filter_gate = nn.Linear(num_invariants, self.num_paths * c)
            coupling, expand, collect = filter_couplings(lmax)
            dtype = torch.get_default_dtype()
            self.register_buffer("filter_coupling", coupling.to(dtype), persistent=False)
            self.register_buffer("filter_expand", expand.to(dtype), persistent=False)
            self.register_buffer("filter_collect", collect.to(dtype), persistent=False)

        # The radial functions of the geometry: R_l of the filter, then rho_s,l of the embedding, one MLP
        # of the Gaussian basis (evaluated once per pair and call).
        self.radial_outputs = (lmax + 1) * (
            int(config.tensor_filter) + EMBEDDING_RADIAL * int(self.uses_embedding)
        )
        if self.radial_outputs:
            self.pair_radial = nn.Sequential(
                nn.Linear(config.num_radial, hidden), nn.SiLU(), nn.Linear(hidden, self.radial_outputs)
            )
        expand = torch.tensor(degree_of_component(lmax))[None, :] == torch.arange(lmax + 1)[:, None]
        self.register_buffer("degree_expand", expand.to(torch.get_default_dtype()), persistent=False)

        # Fusion readout E_i = W_l l_i + W_z z_i,00(T), both starting at zero.
        self.register_buffer(
            "host_invariant_columns", torch.tensor(spec.invariant_indices(), dtype=torch.long)
        )
        self.has_host_invariants = bool(spec.invariant_dim)
        self.readout_host = nn.Linear(max(spec.invariant_dim, 1), 1, bias=False)
        self.readout_state = nn.Linear(c, 1, bias=False)
        nn.init.zeros_(self.readout_host.weight)
        nn.init.zeros_(self.readout_state.weight)
        # In every state dict, so a saved block says which numerics it needs (see _load_from_state_dict).
        self.register_buffer("numerics_version", torch.tensor(2, dtype=torch.long))

    # ---- public API --------------------------------------------------------------------------------
    def pairs(
        self, positions: Tensor, batch: Tensor, cell: Tensor | None = None, pbc: Tensor | None = None
    ) -> "SystemPairs | PairTable":
        """The pair table this block's configuration asks for (call outside the traced forward)."""
        _check_batch(positions, batch)
        radius = self.config.pair_radius
        if radius is None:
            if pbc is not None and bool(pbc.any()):
                raise ValueError(
                    "periodic systems need a finite global radius: set GGNDConfig.r_g (e.g. 10.0 Å)"
                )
            return complete_graph_systems(batch)
        return radius_pairs(positions, batch, radius, cell=cell, pbc=pbc)

    def forward(
        self,
        host_features: Mapping[str, Tensor] | Tensor,
        positions: Tensor,
        species: Tensor,
        pairs: "SystemPairs | PairTable",
        batch: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Per-atom energy contribution (n_atoms,). ``cell`` (n_systems, 3, 3) needs ``batch``."""
        compiled = self.__dict__.get("_compiled_energy")
        if compiled is not None and not self.training:
            return compiled(host_features, positions, species, pairs, batch, cell)
        return self._energy(host_features, positions, species, pairs, batch, cell)

    def _energy(self, host_features, positions, species, pairs, batch, cell) -> Tensor:
        host = self.spec.concatenate(host_features, positions.shape[0])
        layout, z = self._diffuse(host, positions, species, pairs, batch, cell)
        scalars = layout.atoms(z[..., 0])  # z_i,00(T): (n_atoms, C)
        energy = self.readout_state(scalars).squeeze(-1)
        if self.has_host_invariants:
            energy = energy + self.readout_host(host[:, self.host_invariant_columns]).squeeze(-1)
        return energy

    def compile_energy(self, dynamic: bool = True, **options) -> None:
        """Use a ``torch.compile``d forward in eval mode (see :mod:`ggnd_plugin.block_compile`)."""
        self._compiled_energy = torch.compile(self._energy, dynamic=dynamic, **options)

    def __getstate__(self) -> dict[str, Any]:
        # A compiled forward is bound to this object and cannot be pickled: copies compile their own.
        state = dict(self.__dict__)
        state.pop("_compiled_energy", None)
        return state

    def diffuse(
        self,
        host: Tensor,
        positions: Tensor,
        species: Tensor,
        pairs: "SystemPairs | PairTable",
        batch: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Z(T) as a flat e3nn tensor ``(n_atoms, D)`` with irreps ``self.irreps_state``."""
        layout, z = self._diffuse(host, positions, species, pairs, batch, cell)
        return from_channels(layout.atoms(z), self.lmax)

    def initial_state(
        self,
        host: Tensor,
        positions: Tensor,
        species: Tensor,
        pairs: "SystemPairs | PairTable",
        batch: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Z(0) as a flat e3nn tensor ``(n_atoms, D)``."""
        self._check_inputs(host, positions, species, batch)
        layout = self._layout(positions, pairs, batch, cell)
        geometry = self._geometry(layout, 0, layout.num_rows) if self._whole(layout) else None
        z = self._initial_state(host, species, layout, geometry)
        return from_channels(layout.atoms(z), self.lmax)

    def attention(
        self,
        host_features: Mapping[str, Tensor] | Tensor,
        positions: Tensor,
        species: Tensor,
        pairs: "SystemPairs | PairTable",
        batch: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The attention of the first stage, alpha_ij at Z(0), to see what the block attends to.

        Returns ``(alpha, partners)``: ``alpha`` ``(n_atoms, heads, M)`` over each atom's ``M`` partner
        slots (rows sum to one), and ``partners`` ``(n_atoms, M)`` the atom index of each slot (padding
        slots have weight zero). Not for the ``mp`` variant, which has no attention.
        """
        if self.config.variant == "mp":
            raise ValueError("the 'mp' variant has no attention")
        host = self.spec.concatenate(host_features, positions.shape[0])
        self._check_inputs(host, positions, species, batch)
        layout = self._layout(positions, pairs, batch, cell)
        geometry = self._geometry(layout, 0, layout.num_rows)
        invariants = self._invariants(self._initial_state(host, species, layout, geometry))
        query = self.query(invariants).unflatten(-1, (self.heads, self.head_dim)) * self.head_dim**-0.5
        key = self.key(invariants).unflatten(-1, (self.heads, self.head_dim))
        alpha = self._attention(geometry, query, layout.partners(key, 0, layout.num_rows))
        if isinstance(layout, _SystemLayout):
            partners = pairs.atoms[:, None, :].expand(-1, layout.num_rows, -1)
            return layout.atoms(alpha.transpose(1, 2)), layout.atoms(partners)
        return alpha[:, :, 0], pairs.senders

    # ---- the integration ---------------------------------------------------------------------------
    def _check_inputs(self, host, positions, species, batch) -> None:
        """The library's shared checks (empty input, non-finite positions or host features, species out
        of range, shapes), with the command line's messages; skipped under tracing and compilation."""
        validate_block_inputs(
            positions,
            species,
            batch,
            num_species=self.spec.num_species if self.uses_embedding else None,
            host=host,
            enabled=not is_tracing(),
        )

    def _layout(self, positions, pairs, batch, cell):
        if isinstance(pairs, SystemPairs):
            return _SystemLayout(pairs, positions)
        cell_per_atom = None
        if pairs.cell_shifts is not None:
            if cell is None or batch is None:
                raise ValueError("a periodic pair table needs cell and batch")
            cell_per_atom = cell.reshape(-1, 3, 3)[batch]
        return _RowLayout(pairs, positions, cell_per_atom)

    def _whole(self, layout) -> bool:
        """All rows at once (geometry computed once per call), unless chunking would split them."""
        return self.config.chunk_size is None or self.config.chunk_size >= layout.num_rows

    def _diffuse(self, host, positions, species, pairs, batch, cell):
        self._check_inputs(host, positions, species, batch)
        layout = self._layout(positions, pairs, batch, cell)
        # The geometry of all pairs is computed once and reused by every stage; chunked evaluation
        # instead recomputes each block's geometry where it is needed (memory linear in N).
        geometry = self._geometry(layout, 0, layout.num_rows) if self._whole(layout) else None
        z = self._initial_state(host, species, layout, geometry)
        ops = self._operators()
        if self.config.variant == "mp":
            return layout, z + self._rhs(z, layout, geometry, ops)
        tau = self.config.step_size
        for _ in range(self.config.steps):
            if self.config.solver == "euler":
                z = z + tau * self._rhs(z, layout, geometry, ops)
            else:
                k1 = self._rhs(z, layout, geometry, ops)
                k2 = self._rhs(z + 0.5 * tau * k1, layout, geometry, ops)
                k3 = self._rhs(z + 0.5 * tau * k2, layout, geometry, ops)
                k4 = self._rhs(z + tau * k3, layout, geometry, ops)
                z = z + tau / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return layout, z

    # ---- geometry ----------------------------------------------------------------------------------
    def _geometry(self, layout, start: int, stop: int, need_embedding: bool = True) -> _Geometry:
        vectors, present = layout.geometry_inputs(start, stop)  # (B, R, M, 3), (B, R, M)
        r = torch.sqrt((vectors * vectors).sum(-1) + DISTANCE_EPS**2)
        # x / sqrt(r^2 + eps^2) is a unit vector away from r = 0 and smooth at r = 0, where the
        # harmonics of degree >= 1 (homogeneous polynomials) vanish.
        sh = spherical_harmonics(vectors / r[..., None], self.lmax)  # (B, R, M, C')
        rbf = self.radial(r)  # (B, R, M, K)
        present = present.to(r.dtype)
        exponent = self.config.envelope_exponent
        presence = (
            present if self.pair_radius is None else present * smooth_cutoff(r / self.pair_radius, exponent)
        )
        local = presence if self.pair_radius is not None else present * smooth_cutoff(r / self.span, exponent)
        attention_bias = filter_kernel = embedding_kernel = None
        if self.config.variant != "mp":
            decay = torch.nn.functional.softplus(self.attention_decay)
            attention_bias = (self.attention_radial(rbf) - r[..., None] * decay).permute(0, 3, 1, 2)
            if self.pair_radius is None:  # presence is 0 or 1: absent pairs get logit -inf
                attention_bias = attention_bias + torch.log(present)[:, None]
        if self.radial_outputs:
            # (B, R, M, F + S, L+1) -> per component (B, R, M, F + S, C'), times the local envelope
            radial = self.pair_radial(rbf).unflatten(-1, (-1, self.lmax + 1)) @ self.degree_expand
            kernel = (radial * (local[..., None] * sh)[..., None, :]).permute(0, 1, 3, 4, 2)
            if self.tensor_filter:
                filter_kernel, kernel = kernel[:, :, 0], kernel[:, :, 1:]  # (B, R, C', M)
            if need_embedding and self.uses_embedding:
                embedding_kernel = kernel.reshape(kernel.shape[0], -1, kernel.shape[-1])  # (B, R*S*C', M)
        return _Geometry(
            presence=presence[:, None],
            log_presence=torch.log(presence.detach())[:, None],
            enveloped=self.pair_radius is not None,
            local=local,
            count=local.sum(-1),
            attention_bias=attention_bias,
            filter_kernel=filter_kernel,
            embedding_kernel=embedding_kernel,
        )

    # ---- Z(0) --------------------------------------------------------------------------------------
    def _initial_state(self, host, species, layout, geometry) -> Tensor:
        """(B, R, C, C') in the layout's rows."""
        z = None
        if self.uses_host:
            z = layout.rows(to_channels(self.host_to_state(host), self.channels, self.lmax))
        if self.uses_embedding:
            embedded = layout.rows(self.species_embedding(species))  # (B, R, C)
            own = torch.nn.functional.pad(embedded[..., None], (0, self.components - 1))
            own = own + self._over_rows(layout, geometry, self._embedding_rows, embedded)
            z = own if z is None else z + own
        return z

    def _embedding_rows(self, geometry: _Geometry, embedded_partners: Tensor) -> Tensor:
        """(1/n_i) sum_j local_ij R^E_l(r_ij) e(h_j) Y_l(x_ij) for a block of rows: (B, R, C, C')."""
        batch, rows = geometry.count.shape
        summed = torch.bmm(geometry.embedding_kernel, embedded_partners)  # (B, R*S*C', C)
        summed = summed.reshape(batch, rows, EMBEDDING_RADIAL, self.components, self.channels)
        weights = self.embedding_mixing[:, self.component_degree, :]  # (S, C', C)
        pair = (summed * weights).sum(2).transpose(-1, -2)  # (B, R, C, C')
        return pair / geometry.count[..., None, None]

    # ---- dZ/dt -------------------------------------------------------------------------------------
    def _operators(self) -> _StageOperators:
        mixing = None
        if self.gradient_mixing is not None:
            per_component = self.gradient_mixing[self.component_degree] * self.channels**-0.5  # (C', C, C)
            if self.state_dim <= DENSE_MIXING_LIMIT:
                # W[(c, a), (d, b)] = W_l(a)[c, d] delta_ab: one product per stage on flattened rows
                mixing = torch.einsum("acd,ab->cadb", per_component, self.component_eye)
                mixing = mixing.reshape(self.state_dim, self.state_dim)
            else:
                mixing = per_component
        weights, biases, sizes = [], [], []
        if self.config.variant != "mp":
            scale = self.head_dim**-0.5  # the attention's 1/sqrt(d), folded into the query
            weights += [self.query.weight * scale, self.key.weight]
            biases += [self.query.bias * scale, self.key.weight.new_zeros(self.key.weight.shape[0])]
            sizes += [self.query.weight.shape[0], self.key.weight.shape[0]]
        if self.tensor_filter:
            weights.append(self.filter_gate.weight)
            biases.append(self.filter_gate.bias)
            sizes.append(self.filter_gate.weight.shape[0])
        if not weights:  # mp without the filter: nothing to project
            empty = self.readout_state.weight.new_zeros(0, self.channels * (self.lmax + 1))
            return _StageOperators(mixing, empty, empty.new_zeros(0), [])
        return _StageOperators(mixing, torch.cat(weights), torch.cat(biases), sizes)

    def _rhs(self, z: Tensor, layout, geometry, ops: _StageOperators) -> Tensor:
        """dZ/dt for every row (or the message of the ``mp`` variant): (B, R, C, C')."""
        heads, c = self.heads, self.channels
        mixed = self._mix(z, ops)
        invariants = self._invariants(z)
        parts = list(
            torch.nn.functional.linear(invariants, ops.projection, ops.projection_bias).split(ops.sizes, -1)
        )
        query = key = None
        if self.config.variant != "mp":
            query = parts.pop(0).unflatten(-1, (heads, self.head_dim))
            key = parts.pop(0).unflatten(-1, (heads, self.head_dim))
        rate, filtered = self._over_rows(layout, geometry, self._pair_sums, mixed, query, key)
        if self.tensor_filter:
            # filtered[b, r, c, f * C' + a] = sum_j abar_ij R_l(f) Y_f (W z)_j,c,a [- row sum (W z)_i,c,a]
            gates = torch.tanh(parts.pop(0)).unflatten(-1, (self.num_paths, c))
            outputs = filtered @ self.filter_coupling  # (B, R, C, P_out)
            gated = outputs * (gates.transpose(-1, -2) @ self.filter_expand)
            rate = rate + gated @ self.filter_collect
        return rate

    def _mix(self, z: Tensor, ops: _StageOperators) -> Tensor:
        if ops.mixing is None:
            return z
        if ops.mixing.dim() == 2:
            return (z.flatten(-2) @ ops.mixing).unflatten(-1, (self.channels, self.components))
        return torch.einsum("brca,acd->brda", z, ops.mixing)

    def _invariants(self, z: Tensor) -> Tensor:
        """Per channel: the scalars, then the norms of the degree >= 1 parts (smooth at zero), degree-major."""
        if self.lmax == 0:
            return z[..., 0]
        squares = (z * z) @ self.degree_sum  # (B, R, C, L)
        norms = torch.sqrt(squares + DISTANCE_EPS**2) - DISTANCE_EPS
        return torch.cat([z[..., 0], norms.transpose(-1, -2).flatten(-2)], dim=-1)

    def _attention(self, geometry: _Geometry, query_rows: Tensor, key_partners: Tensor) -> Tensor:
        """alpha_ij per head ``(B, H, R, M)``: softmax over j of q_i.k_j/sqrt(d) + b(r_ij), weighted by
        the presence of the pair (the envelope at r_g), so rows sum to one and fade continuously."""
        # The query arrives scaled by 1/sqrt(d) (folded into its weights by _operators).
        logits = torch.matmul(query_rows.transpose(1, 2), key_partners.permute(0, 2, 3, 1))
        logits = logits + geometry.attention_bias  # (B, H, R, M)
        if not geometry.enveloped:
            return torch.softmax(logits, dim=-1)
        # Weighted by the envelope: the shift is the row maximum of logit + log(presence), so the largest
        # term is exactly 1, whatever the envelope (a pair at the edge of r_g cannot hold the maximum while
        # every other term underflows).
        shift = (logits.detach() + geometry.log_presence).amax(-1, keepdim=True)
        weights = torch.exp((logits - shift).clamp(max=MAX_EXPONENT)) * geometry.presence
        return weights / weights.sum(-1, keepdim=True)

    def _pair_sums(
        self,
        geometry: _Geometry,
        mixed_partners: Tensor,
        key_partners: Tensor | None,
        mixed_rows: Tensor,
        query_rows: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        """The pair sums of one stage for a block of rows, as batched products.

        Returns ``sum_j alpha_ij,head(c) W(z_j - z_i)_c`` ``(B, R, C, C')`` and, with the filter,
        ``sum_j abar_ij K_ij,f W(z_j - z_i)_c,a`` ``(B, R, C, C' * C')`` with ``abar`` the attention
        averaged over heads and ``K_ij,f = local_ij R_l(f)(r_ij) Y_f(x_ij)``. Sums over ``W z_j`` become
        sums over the gradient by subtracting the row sum times the row's own ``W z_i``. For ``mp`` the
        weights are a smooth partner average and the values ``W z_j`` themselves (no difference).
        """
        batch, rows, partners = geometry.local.shape
        c, components = self.channels, self.components
        diffusion = query_rows is not None
        if diffusion:
            groups = self.heads
            alpha = self._attention(geometry, query_rows, key_partners)
        else:  # mp: a smooth average over the partners, no attention
            groups = 1
            alpha = (geometry.local / geometry.count[..., None])[:, None]  # (B, 1, R, M)
        values = mixed_partners.reshape(batch, partners, groups, -1).transpose(1, 2)  # (B, G, M, X)
        rate = torch.matmul(alpha, values).transpose(1, 2).reshape(batch, rows, c, components)
        if diffusion:
            rate = rate - mixed_rows  # rows of alpha sum to one
        if geometry.filter_kernel is None:
            return rate, None
        pair = alpha.mean(1)[:, :, None, :] * geometry.filter_kernel  # (B, R, C', M)
        flat = mixed_partners.reshape(batch, partners, c * components)
        filtered = torch.bmm(pair.reshape(batch, rows * components, partners), flat)
        filtered = filtered.reshape(batch, rows, components, c * components)
        if diffusion:
            filtered = filtered - pair.sum(-1, keepdim=True) * mixed_rows.reshape(batch, rows, 1, -1)
        # (B, R, C'(f), C, C'(a)) -> (B, R, C, C'(f) * C'(a))
        filtered = filtered.reshape(batch, rows, components, c, components).transpose(2, 3)
        return rate, filtered.reshape(batch, rows, c, components * components)

    # ---- chunking ----------------------------------------------------------------------------------
    def _over_rows(self, layout, geometry: _Geometry | None, fn, *features: Tensor | None) -> Tensor:
        """``fn(geometry, partner features..., row features...)`` over all rows, or block by block.

        ``features`` are per-row tensors in the layout; :meth:`_call_rows` hands ``fn`` the partners of
        the block's rows and the block's own rows. With ``chunk_size`` the rows are processed
        in blocks whose geometry is computed inside the block and recomputed in the backward pass
        (``torch.utils.checkpoint``), so no tensor of all pairs is ever kept.
        """
        if geometry is not None:
            return self._call_rows(layout, geometry, fn, 0, layout.num_rows, features)
        chunk = self.config.chunk_size
        outputs = []
        for start in range(0, layout.num_rows, chunk):
            stop = min(start + chunk, layout.num_rows)
            if torch.is_grad_enabled():
                outputs.append(
                    checkpoint(self._chunk_rows, layout, fn, start, stop, *features, use_reentrant=False)
                )
            else:
                outputs.append(self._chunk_rows(layout, fn, start, stop, *features))
        if isinstance(outputs[0], tuple):
            return tuple(
                None if parts[0] is None else layout.join(list(parts)) for parts in zip(*outputs, strict=True)
            )
        return layout.join(outputs)

    def _chunk_rows(self, layout, fn, start: int, stop: int, *features):
        geometry = self._geometry(layout, start, stop, need_embedding=fn == self._embedding_rows)
        return self._call_rows(layout, geometry, fn, start, stop, features)

    def _call_rows(self, layout, geometry, fn, start, stop, features):
        if fn == self._embedding_rows:
            (embedded,) = features
            return fn(geometry, layout.partners(embedded, start, stop))
        mixed, query, key = features
        return fn(
            geometry,
            layout.partners(mixed, start, stop),
            None if key is None else layout.partners(key, start, stop),
            layout.take(mixed, start, stop),
            None if query is None else layout.take(query, start, stop),
        )

    # ---- loading -----------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        saved = state_dict.get(prefix + "numerics_version")
        saved_version = 1 if saved is None else int(saved)
        if saved_version != self.config.version:
            raise RuntimeError(
                f"the weights at '{prefix or '<root>'}' are those of a version-{saved_version} GGND block, "
                f"but this block was built as version {self.config.version}: build it from the config saved "
                f"with the weights (GGND option version: {saved_version})"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"state={self.irreps_state}, host={self.irreps_host}, config={self.config}"


_LEGACY_NAMES = ("LegacyGGNDBlock", "TensorFilter", "PairGeometry", "pair_geometry", "invariants_of")


def __getattr__(name: str):
    # Files pickled by 0.1.0 name its classes in this module (ggnd_plugin.block.TensorFilter, ...).
    if name in _LEGACY_NAMES:
        from ggnd_plugin import block_v1

        return getattr(block_v1, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def system_energy(atom_energy: Tensor, batch: Tensor, num_systems: int) -> Tensor:
    """Sum per-atom energies into per-system energies (no data-dependent shapes)."""
    out = atom_energy.new_zeros(num_systems)
    return out.index_add(0, batch, atom_energy)
