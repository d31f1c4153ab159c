"""What a GGND block is: its options (:class:`GGNDConfig`) and the numerics versions files carry.

Every option is documented on :class:`GGNDConfig`; docs/block.md gives the equations behind them. A
block's numerics version is data, not a type: files written by ggnd-plugin 0.1.0 hold version-1 blocks,
and :class:`GGNDConfig` reads a mapping or a pickle without ``version`` as version 1.
"""

# No `from __future__ import annotations`: torch.package (nequip-package) cannot load an interned
# dataclass whose annotations are strings.
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["CURRENT_VERSION", "GGNDConfig", "GGNDVersionWarning", "VERSIONS"]

SOLVERS = ("euler", "rk4")
VARIANTS = ("diffusion", "local", "mp")
INITIAL_CONDITIONS = ("host", "embedding", "both")
# 1: ggnd-plugin 0.1.0 (ggnd_plugin.block.version1). 2: size-safe pair sums, pair geometry once per
# call, radial filter weights R(|x_ij|) with per-atom gates, batched pair products.
VERSIONS = (1, 2)
CURRENT_VERSION = 2


class GGNDVersionWarning(UserWarning):
    """A mapping of GGND options without ``version`` was read as version 1 (see :class:`GGNDConfig`)."""


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
