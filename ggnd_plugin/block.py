"""The GGND block: geometric graph neural diffusion over all atom pairs of each system.

Read top to bottom, the file follows the data:

1. :class:`GGNDConfig` and :class:`FeatureSpec` say what the block is and what the host gives it.
2. :class:`PairTable` and its builders say which pairs ``(i, j)`` interact: every atom of the same
   system for molecules, all periodic images within ``r_g`` for crystals.
3. :class:`GGNDBlock` computes

   * the initial state ``Z(0)`` = per-irrep linear map of the host features + all-pairs embedding
     ``phi_E(X, H)``;
   * the diffusion ``dz_i/dt = sum_j alpha_ij [G_ij + F_ij(G_ij)]`` with the equivariant gradient
     ``G_ij = W_l (z_j - z_i)`` (paper eq. 2), right-stochastic attention ``alpha`` (softmax over j per
     head, from invariants only) and the tensor filter ``F_ij`` (Clebsch-Gordan products of the
     gradient with ``Y(x_ij)``, weighted by a learned function ``R`` of the distance and of the pair's
     invariants, paper eq. 3), integrated from 0 to T with K explicit steps;
   * the fusion readout ``E_i = W_l l_i + W_z z_i,00(T)``, both weights starting at zero, which is added
     to the host's own per-atom energy.

Features are e3nn ``mul x l p`` tensors; ``Z`` uses the natural parities ``0e + 1o + 2e``. All
tensors of the pair loop are ``(rows, M, ...)``: row i, its M candidate partners ``j`` (padded, with a
mask). Nothing in :meth:`GGNDBlock.forward` depends on tensor values for its shapes; the pair table,
whose width M depends on the structure, is built outside, like a host's neighbour list.
"""

# No `from __future__ import annotations`: torch.package (nequip-package) cannot load an interned
# dataclass whose annotations are strings.
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from e3nn import o3
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "FeatureSpec",
    "GGNDBlock",
    "GGNDConfig",
    "PairTable",
    "complete_graph_pairs",
    "radius_pairs",
]

SOLVERS = ("euler", "rk4")
VARIANTS = ("diffusion", "local", "mp")
INITIAL_CONDITIONS = ("host", "embedding", "both")

# Distances are regularised as sqrt(r^2 + eps^2) so that coincident atoms and the self pair give finite
# values and finite derivatives; at bond lengths the change is below 1e-6 relative.
DISTANCE_EPS = 1e-3


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class GGNDConfig:
    """Hyper-parameters of one GGND block.

    Attributes:
        channels: channels k per degree of the diffusion state Z.
        lmax: highest degree L of Z (0, 1 or 2) and of the spherical harmonics in the filter.
        heads: attention heads; channels are split evenly between heads.
        steps: K, the number of solver steps from t = 0 to ``horizon``.
        horizon: T, the stopping time of the diffusion.
        solver: ``"euler"`` (explicit Euler) or ``"rk4"`` (classic Runge-Kutta).
        num_radial: size of the Gaussian radial basis.
        radial_range: Å spanned by the radial basis when no pair radius applies (complete graph).
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
        pair_normalization: sums over pairs in the embedding and the ``mp`` layer are divided by its
            square root (about the number of partners within the radial range).
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

    def __post_init__(self) -> None:
        problems = []
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
        if problems:
            raise ValueError("invalid GGNDConfig: " + "; ".join(problems))

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown GGND option(s) {unknown}; known options: {sorted(known)}")
        return cls(**dict(values))


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
        for name, irreps in self.fields:
            if name not in features:
                raise KeyError(f"host feature '{name}' ({irreps}) is missing; got {sorted(features)}")
            tensor = features[name]
            dim = o3.Irreps(irreps).dim
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


def _tracing() -> bool:
    """True under torch.compile/export or TorchScript tracing, where value checks must not run."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or get_proxy_mode() is not None  # make_fx tracing, as nequip-compile does
    )


def _check_batch(positions: Tensor, batch: Tensor) -> None:
    if positions.dim() != 2 or positions.shape[-1] != 3:
        raise ValueError(f"positions must have shape (n_atoms, 3), got {tuple(positions.shape)}")
    if positions.shape[0] == 0:
        raise ValueError("the batch holds no atoms")
    if batch.shape != positions.shape[:1]:
        raise ValueError(f"batch must have shape ({positions.shape[0]},), got {tuple(batch.shape)}")
    if positions.shape[0] > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("atoms must be grouped by system: batch must be non-decreasing")


def complete_graph_pairs(batch: Tensor) -> PairTable:
    """Every pair (i, j) of atoms in the same system, including i = j (molecules, ``r_g=None``)."""
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
# Geometry of the pairs of a block of rows
# --------------------------------------------------------------------------------------------------
def polynomial_envelope(x: Tensor, p: int) -> Tensor:
    """1 at x = 0, 0 for x >= 1, with value, first and second derivative continuous at x = 1."""
    x = x.clamp(max=1.0)
    value = 1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
    return torch.where(x < 1.0, value, torch.zeros_like(x))


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


# --------------------------------------------------------------------------------------------------
# Equivariant pieces
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
# The block
# --------------------------------------------------------------------------------------------------
class GGNDBlock(nn.Module):
    """Equivariant global diffusion over atom pairs, with a zero-initialised fusion readout.

    ``forward`` returns the block's per-atom energy contribution ``W_l l_i + W_z z_i,00(T)``; a host
    adds it to its own per-atom (or total) energy before taking forces, so forces stay conservative.
    At construction both readout weights are zero: the host's predictions are unchanged until trained.
    """

    def __init__(self, spec: FeatureSpec, config: GGNDConfig | None = None):
        super().__init__()
        config = config or GGNDConfig()
        self.spec, self.config = spec, config
        if config.variant == "local" and config.local_cutoff is None:
            raise ValueError(
                "GGNDConfig variant 'local' needs local_cutoff (the host's cutoff radius, in Å) to build a block"
            )
        c, lmax = config.channels, config.lmax
        self.irreps_state = state_irreps(c, lmax)
        self.irreps_host = spec.irreps
        self.radial = RadialBasis(
            config.num_radial, config.radial_range, config.pair_radius, config.envelope_exponent
        )
        # A module built once (not o3.spherical_harmonics per call), so export sees no new constants.
        self.harmonics = o3.SphericalHarmonics(
            list(range(lmax + 1)), normalize=False, normalization="component"
        )
        num_invariants = c * (lmax + 1)
        hidden = max(16, c)

        # Initial condition Z(0).
        self.uses_host = config.initial_condition in ("host", "both")
        self.uses_embedding = config.initial_condition in ("embedding", "both")
        if self.uses_host:
            self.host_to_state = o3.Linear(self.irreps_host, self.irreps_state)
        if self.uses_embedding:
            self.species_embedding = nn.Embedding(spec.num_species, c)
            self.embedding_radial = nn.Sequential(
                nn.Linear(config.num_radial, hidden), nn.SiLU(), nn.Linear(hidden, c * (lmax + 1))
            )

        # Diffusion operators.
        self.gradient_mixing = (
            o3.Linear(self.irreps_state, self.irreps_state) if config.mix_gradient else None
        )
        head_dim = c // config.heads
        self.query = nn.Linear(num_invariants, config.heads * head_dim)
        self.key = nn.Linear(num_invariants, config.heads * head_dim, bias=False)
        self.attention_radial = nn.Linear(config.num_radial, config.heads)
        self.filter = (
            TensorFilter(c, lmax, config.num_radial, num_invariants, hidden) if config.tensor_filter else None
        )
        self.register_buffer("channel_head", torch.arange(c) // head_dim)

        # Fusion readout E_i = W_l l_i + W_z z_i,00(T), both starting at zero.
        self.register_buffer(
            "host_invariant_columns", torch.tensor(spec.invariant_indices(), dtype=torch.long)
        )
        self.readout_host = nn.Linear(max(spec.invariant_dim, 1), 1, bias=False)
        self.readout_state = nn.Linear(c, 1, bias=False)
        nn.init.zeros_(self.readout_host.weight)
        nn.init.zeros_(self.readout_state.weight)

    # ---- public API --------------------------------------------------------------------------------
    def pairs(
        self, positions: Tensor, batch: Tensor, cell: Tensor | None = None, pbc: Tensor | None = None
    ) -> PairTable:
        """The pair table this block's configuration asks for (call outside the traced forward)."""
        _check_batch(positions, batch)
        radius = self.config.pair_radius
        if radius is None:
            if pbc is not None and bool(pbc.any()):
                raise ValueError(
                    "periodic systems need a finite global radius: set GGNDConfig.r_g (e.g. 10.0 Å)"
                )
            return complete_graph_pairs(batch)
        return radius_pairs(positions, batch, radius, cell=cell, pbc=pbc)

    def forward(
        self,
        host_features: Mapping[str, Tensor] | Tensor,
        positions: Tensor,
        species: Tensor,
        pairs: PairTable,
        batch: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Per-atom energy contribution (n_atoms,). ``cell`` (n_systems, 3, 3) needs ``batch``."""
        host = self.spec.concatenate(host_features, positions.shape[0])
        z_final = self.diffuse(host, positions, species, pairs, batch, cell)
        scalars = z_final[:, : self.config.channels]
        energy = self.readout_state(scalars).squeeze(-1)
        if self.host_invariant_columns.numel():
            energy = energy + self.readout_host(host[:, self.host_invariant_columns]).squeeze(-1)
        return energy

    def diffuse(
        self,
        host: Tensor,
        positions: Tensor,
        species: Tensor,
        pairs: PairTable,
        batch: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Z(T) as a flat e3nn tensor with irreps ``self.irreps_state``."""
        cell_per_atom = None
        if pairs.cell_shifts is not None:
            if cell is None or batch is None:
                raise ValueError("a periodic pair table needs cell and batch")
            cell_per_atom = cell.reshape(-1, 3, 3)[batch]
        z = self.initial_state(host, positions, species, pairs, cell_per_atom)
        if self.config.variant == "mp":
            return z + self.rhs(z, positions, pairs, cell_per_atom)
        tau = self.config.step_size
        for _ in range(self.config.steps):
            if self.config.solver == "euler":
                z = z + tau * self.rhs(z, positions, pairs, cell_per_atom)
            else:
                k1 = self.rhs(z, positions, pairs, cell_per_atom)
                k2 = self.rhs(z + 0.5 * tau * k1, positions, pairs, cell_per_atom)
                k3 = self.rhs(z + 0.5 * tau * k2, positions, pairs, cell_per_atom)
                k4 = self.rhs(z + tau * k3, positions, pairs, cell_per_atom)
                z = z + tau / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return z

    # ---- Z(0) --------------------------------------------------------------------------------------
    def initial_state(
        self, host: Tensor, positions: Tensor, species: Tensor, pairs: PairTable, cell_per_atom: Tensor | None
    ) -> Tensor:
        n = positions.shape[0]
        z = positions.new_zeros(n, self.irreps_state.dim)
        if self.uses_host:
            z = z + self.host_to_state(host)
        if self.uses_embedding:
            if not _tracing() and (species.min() < 0 or species.max() >= self.spec.num_species):
                raise ValueError(
                    f"species indices must lie in 0..{self.spec.num_species - 1}, "
                    f"got {int(species.min())}..{int(species.max())}"
                )
            embedded = self.species_embedding(species)
            pair_part = self._over_rows(self._embedding_rows, n, positions, pairs, cell_per_atom, embedded)
            own_part = torch.nn.functional.pad(embedded, (0, self.irreps_state.dim - self.config.channels))
            z = z + pair_part + own_part
        return z

    def _embedding_rows(
        self, rows: slice, positions: Tensor, pairs: PairTable, cell_per_atom: Tensor | None, embedded: Tensor
    ) -> Tensor:
        c, lmax = self.config.channels, self.config.lmax
        geo = pair_geometry(positions, rows, pairs, cell_per_atom, self.radial, self.harmonics, lmax)
        radial = self.embedding_radial(geo.rbf).unflatten(-1, (lmax + 1, c))
        partner = embedded[pairs.senders] * geo.weight[..., None]  # (rows, M, C)
        scale = self.config.pair_normalization**-0.5
        parts = [
            torch.einsum("nmc,nmk->nck", radial[..., l, :] * partner, geo.sh[l]) * scale
            for l in range(lmax + 1)
        ]
        return join_degrees(parts)

    # ---- dZ/dt -------------------------------------------------------------------------------------
    def rhs(self, z: Tensor, positions: Tensor, pairs: PairTable, cell_per_atom: Tensor | None) -> Tensor:
        """dZ/dt for every atom (or the message of the ``mp`` variant)."""
        c, lmax = self.config.channels, self.config.lmax
        mixed = self.gradient_mixing(z) if self.gradient_mixing is not None else z
        invariants = invariants_of(split_degrees(z, c, lmax))
        head_dim = c // self.config.heads
        query = self.query(invariants).unflatten(-1, (self.config.heads, head_dim))
        key = self.key(invariants).unflatten(-1, (self.config.heads, head_dim))
        terms = self.filter.atom_terms(invariants) if self.filter is not None else (None, None)
        return self._over_rows(
            self._message_rows, z.shape[0], positions, pairs, cell_per_atom, mixed, query, key, *terms
        )

    def _message_rows(
        self,
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
        c, lmax = self.config.channels, self.config.lmax
        geo = pair_geometry(positions, rows, pairs, cell_per_atom, self.radial, self.harmonics, lmax)
        partners = split_degrees(mixed[pairs.senders], c, lmax)  # (rows, M, C, 2l+1)
        if self.config.variant == "mp":
            # One fully connected message-passing layer: messages from W z_j, summed with a fixed scale.
            values = partners
            pair_weight = (geo.weight * self.config.pair_normalization**-0.5)[..., None]  # (rows, M, 1)
        else:
            own = split_degrees(mixed[rows], c, lmax)
            values = [pj - oi[:, None] for pj, oi in zip(partners, own, strict=True)]  # G_ij = W(z_j - z_i)
            pair_weight = self._attention(query[rows], key[pairs.senders], geo)  # (rows, M, H)
            pair_weight = pair_weight[..., self.channel_head]  # (rows, M, C)
        if self.filter is not None:
            filtered = self.filter(values, geo.sh, geo.rbf, term_in[rows], term_out[pairs.senders])
            values = [v + f for v, f in zip(values, filtered, strict=True)]
        parts = [torch.einsum("nmc,nmck->nck", pair_weight.expand(*v.shape[:3]), v) for v in values]
        return join_degrees(parts)

    def _attention(self, query: Tensor, key: Tensor, geo: PairGeometry) -> Tensor:
        """alpha_ij per head: softmax over j of q_i.k_j/sqrt(d) + b(r_ij), weighted by the envelope.

        Weighting exp(logit) by the envelope (0 for padding and beyond r_g) keeps the rows summing to
        one while a pair fades out continuously as it crosses the pair radius.
        """
        logits = torch.einsum("nhd,nmhd->nmh", query, key) * query.shape[-1] ** -0.5
        logits = logits + self.attention_radial(geo.rbf)
        present = geo.weight[..., None] > 0
        logits = torch.where(present, logits, torch.full_like(logits, -1e30))
        shifted = logits - logits.amax(dim=1, keepdim=True).detach()
        unnormalised = torch.exp(shifted) * geo.weight[..., None]
        return unnormalised / unnormalised.sum(dim=1, keepdim=True)

    # ---- chunking ----------------------------------------------------------------------------------
    def _over_rows(self, fn, n: int, positions: Tensor, pairs: PairTable, *args) -> Tensor:
        """Apply ``fn`` to all rows at once, or block by block with recomputation in backward."""
        chunk = self.config.chunk_size
        if chunk is None or chunk >= n:
            return fn(slice(0, n), positions, pairs, *args)
        outputs = []
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block_pairs = pairs.rows(start, stop)
            if torch.is_grad_enabled():
                out = checkpoint(
                    _RowBlock(fn, start, stop, block_pairs.cell_shifts is not None),
                    positions,
                    block_pairs.senders,
                    block_pairs.mask,
                    block_pairs.cell_shifts,
                    *args,
                    use_reentrant=False,
                )
            else:
                out = fn(slice(start, stop), positions, block_pairs, *args)
            outputs.append(out)
        return torch.cat(outputs, dim=0)

    def extra_repr(self) -> str:
        return f"state={self.irreps_state}, host={self.irreps_host}, config={self.config}"


class _RowBlock:
    """A picklable closure for checkpoint: rebuilds the row block's PairTable from tensors."""

    def __init__(self, fn, start: int, stop: int, periodic: bool):
        self.fn, self.rows, self.periodic = fn, slice(start, stop), periodic

    def __call__(self, positions, senders, mask, shifts, *args):
        return self.fn(
            self.rows, positions, PairTable(senders, mask, shifts if self.periodic else None), *args
        )


def system_energy(atom_energy: Tensor, batch: Tensor, num_systems: int) -> Tensor:
    """Sum per-atom energies into per-system energies (no data-dependent shapes)."""
    out = atom_energy.new_zeros(num_systems)
    return out.index_add(0, batch, atom_energy)
