"""What defines a stability number (:class:`StabilityProtocol`), one replica of its plan, and its result.

The protocol is recorded with every result and every checkpoint: a run resumes only under the same
protocol, and two numbers are comparable only when their protocols are equal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError

ENSEMBLES = ("nve", "nvt-langevin", "nvt-nose-hoover")
CRITERIA = ("auto", "bonds", "rdf")
BOND_RULES = ("reference", "natural")


@dataclass
class StabilityProtocol:
    """Everything that defines a stability number; recorded with every result.

    Defaults are the paper's protocol (NVE velocity Verlet, 1 fs, 100 ps, Δ = 0.5 Å on bonds closer
    than 1.8 Å in every reference frame) except ``replicas`` (paper: 5).
    """

    temperatures: tuple[float, ...] = (300.0,)
    replicas: int = 5
    time_ps: float = 100.0
    timestep_fs: float = 1.0
    ensemble: str = "nve"
    friction_per_fs: float = 0.01
    nose_hoover_tau_fs: float = 100.0
    threshold: float | None = None  # None: 0.5 Å (bonds) or 1.0 (RDF)
    criterion: str = "auto"  # auto: bonds for molecules, RDF for periodic systems
    bond_rule: str = "reference"  # reference: < bond_cutoff in every frame; natural: ASE covalent radii
    bond_cutoff: float = 1.8
    seed: int = 0
    record_every_steps: int = 10
    checkpoint_every_steps: int = 500
    rdf_window_ps: float = 1.0
    rdf_every_steps: int = 10
    rdf_bins: int = 100
    rdf_r_max: float | None = None

    @property
    def n_steps(self) -> int:
        return round(self.time_ps * 1000.0 / self.timestep_fs)

    @property
    def dt_ps(self) -> float:
        return self.timestep_fs * 1e-3

    def validate(self) -> None:
        """Refuse an impossible protocol; the value checks are the command line's (same words)."""
        if self.ensemble not in ENSEMBLES:
            raise GGNDError(f"unknown ensemble '{self.ensemble}' (choose from {', '.join(ENSEMBLES)})")
        if self.criterion not in CRITERIA:
            raise GGNDError(f"unknown criterion '{self.criterion}' (choose from {', '.join(CRITERIA)})")
        if self.bond_rule not in BOND_RULES:
            raise GGNDError(f"unknown bond rule '{self.bond_rule}' (choose from {', '.join(BOND_RULES)})")
        if not self.temperatures:
            raise GGNDError("give at least one temperature")
        for temperature in self.temperatures:
            v.check_value(v.positive_float, temperature, "temperatures")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise GGNDError(f"temperatures repeat: {list(self.temperatures)}")
        v.check_value(v.seed, self.seed, "seed")
        for name in (
            "replicas",
            "record_every_steps",
            "checkpoint_every_steps",
            "rdf_every_steps",
            "rdf_bins",
        ):
            v.check_value(v.positive_int, getattr(self, name), name)
        for name in (
            "time_ps",
            "timestep_fs",
            "friction_per_fs",
            "nose_hoover_tau_fs",
            "bond_cutoff",
            "rdf_window_ps",
        ):
            v.check_value(v.positive_float, getattr(self, name), name)
        for name in ("threshold", "rdf_r_max"):
            if getattr(self, name) is not None:
                v.check_value(v.positive_float, getattr(self, name), name)
        if self.n_steps < 1:
            raise GGNDError(f"--time-ps {self.time_ps} is shorter than one {self.timestep_fs} fs step")

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["temperatures"] = [float(t) for t in self.temperatures]
        record["n_steps"] = self.n_steps
        return record


@dataclass
class ReplicaSpec:
    """One replica: its temperature, index, seed (velocities) and start frame."""

    temperature: float
    replica: int
    seed: int
    start_frame: int


@dataclass
class StabilityResult:
    protocol: dict[str, Any]
    rows: list[dict[str, Any]]
    series: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # per failed replica (series key "MODEL/TK/REPLICA"): "frames" (its last frames, the failing step's
    # last; ggnd_plugin.md.failure_frames) and "cause" (ggnd_plugin.md.failures.classify)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    # how this process ran it (ranks, batching, seconds, replica-steps it computed); not a result
    execution: dict[str, Any] = field(default_factory=dict)
