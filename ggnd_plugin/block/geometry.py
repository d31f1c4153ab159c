"""The block's geometry: radial functions, envelopes, spherical harmonics and Clebsch-Gordan couplings.

Everything here is a function of pair vectors or of the degrees ``l = 0..lmax`` only, with no learned
weights (but :class:`RadialBasis`, whose centres are a buffer). The state ``Z`` of the block holds ``C``
channels of every degree; two layouts of it appear: e3nn's (all channels of degree 0, then of degree 1,
...; :func:`split_degrees`) and the channel-major one the pair products use (each channel's
``(lmax + 1)^2`` components in a row; :func:`to_channels`).
"""

import math

import torch
from torch import Tensor, nn

from ggnd_plugin.e3nn_compat import o3

__all__ = [
    "DISTANCE_EPS",
    "RadialBasis",
    "degree_of_component",
    "filter_couplings",
    "filter_paths",
    "from_channels",
    "join_degrees",
    "polynomial_envelope",
    "smooth_cutoff",
    "spherical_harmonics",
    "split_degrees",
    "state_irreps",
    "to_channels",
]

# Distances are regularised as sqrt(r^2 + eps^2) so that coincident atoms and the self pair give finite
# values and finite derivatives; at bond lengths the change is below 1e-6 relative.
DISTANCE_EPS = 1e-3


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
