"""Instability criteria of the stability protocol (docs/stability.md), evaluated on batches of replicas.

Two monitors share one interface so the MD loop does not care which criterion applies:

- :class:`BondMonitor` (molecules): max over bonds of |r_ij(t) - b_ij|, unstable above Δ (0.5 Å).
- :class:`RDFMonitor` (periodic systems): ∫ |<g>_ref(r) - <g>_t(r)| dr over the last window (1 ps) of
  sampled RDFs, unstable above Δ (1.0).

A monitor sees positions shaped (n_systems, n_atoms, 3) (every replica is the same system, so the batch
reshapes without padding) and returns one deviation per system plus a mask of the systems for which the
criterion was decided at this step. Everything stays on the positions' device; the MD loop syncs once
per step to learn whether any replica failed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ggnd_plugin.errors import GGNDError

# ---------------------------------------------------------------------------------------------------
# Bonds
# ---------------------------------------------------------------------------------------------------


def _check_same_system(frames: Sequence, source: str) -> np.ndarray:
    numbers = frames[0].get_atomic_numbers()
    for index, atoms in enumerate(frames):
        if len(atoms) != len(numbers) or (atoms.get_atomic_numbers() != numbers).any():
            raise GGNDError(
                f"{source}: frame {index} has different atoms ({atoms.get_chemical_formula()}) from frame 0 "
                f"({frames[0].get_chemical_formula()}); a reference set must hold one system in one atom order"
            )
    return numbers


def reference_bonds(
    frames: Sequence, cutoff: float = 1.8, source: str = "reference"
) -> tuple[np.ndarray, np.ndarray]:
    """Bonds as the paper defines them: pairs closer than ``cutoff`` in every reference frame.

    Returns (pairs (n_bonds, 2) with i < j, equilibrium lengths (n_bonds,) = mean over the frames).
    Distances use the minimum image for periodic frames (ASE ``get_all_distances(mic=True)``).
    """
    _check_same_system(frames, source)
    distances = np.stack([atoms.get_all_distances(mic=bool(atoms.pbc.any())) for atoms in frames])
    upper = np.triu(np.ones(distances.shape[1:], dtype=bool), k=1)
    bonded = (distances < cutoff).all(axis=0) & upper
    pairs = np.argwhere(bonded)
    if len(pairs) == 0:
        raise GGNDError(
            f"{source}: no atom pair is closer than {cutoff} Å in every frame, so there are no bonds"
        )
    lengths = distances[:, pairs[:, 0], pairs[:, 1]].mean(axis=0)
    return pairs, lengths


def natural_bonds(frames: Sequence, source: str = "reference") -> tuple[np.ndarray, np.ndarray]:
    """Bonds from ASE's natural cutoffs on the first frame; lengths = mean over frames.

    Uses ASE's own default connectivity (``build_neighbor_list``: covalent radii plus its 0.3 Å skin);
    without the skin, C-H bonds (1.09 Å against radii summing to 1.07 Å) would be missed.
    """
    from ase.neighborlist import build_neighbor_list

    _check_same_system(frames, source)
    matrix = build_neighbor_list(frames[0], self_interaction=False).get_connectivity_matrix(sparse=False)
    # with bothways=False each pair is stored once, in either triangle
    pairs = np.argwhere(np.triu(matrix + matrix.T, k=1) > 0)
    if len(pairs) == 0:
        raise GGNDError(f"{source}: ASE natural cutoffs find no bonds in frame 0")
    distances = np.stack([atoms.get_all_distances(mic=bool(atoms.pbc.any())) for atoms in frames])
    return pairs, distances[:, pairs[:, 0], pairs[:, 1]].mean(axis=0)


class BondMonitor:
    """Max bond deviation per system; decided at every step."""

    kind = "bonds"

    def __init__(self, pairs: np.ndarray, lengths: np.ndarray, threshold: float = 0.5):
        self.pairs = torch.as_tensor(np.asarray(pairs), dtype=torch.long)
        self.lengths = torch.as_tensor(np.asarray(lengths), dtype=torch.float64)
        self.threshold = float(threshold)

    def describe(self) -> dict:
        return {"criterion": "bonds", "n_bonds": len(self.pairs), "threshold": self.threshold, "unit": "Å"}

    def start(self, n_systems: int, device, dtype) -> None:
        self.pairs = self.pairs.to(device)
        self.lengths = self.lengths.to(device=device, dtype=dtype)

    def update(
        self, step: int, positions: torch.Tensor, cell: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(max |r_ij - b_ij| per system, decided mask). Molecules only: no periodic images."""
        vectors = positions[:, self.pairs[:, 1]] - positions[:, self.pairs[:, 0]]
        deviation = (torch.linalg.vector_norm(vectors, dim=-1) - self.lengths).abs().amax(dim=-1)
        return deviation, torch.ones_like(deviation, dtype=torch.bool)

    def keep(self, index: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


# ---------------------------------------------------------------------------------------------------
# Radial distribution function
# ---------------------------------------------------------------------------------------------------


def max_rdf_radius(cell: np.ndarray | torch.Tensor) -> float:
    """Half the smallest distance between opposite cell faces: the largest r for minimum-image RDFs."""
    cell = torch.as_tensor(np.asarray(cell), dtype=torch.float64).reshape(-1, 3, 3)
    volume = torch.linalg.det(cell).abs()
    crosses = torch.stack(
        [
            torch.linalg.cross(cell[:, 1], cell[:, 2]),
            torch.linalg.cross(cell[:, 2], cell[:, 0]),
            torch.linalg.cross(cell[:, 0], cell[:, 1]),
        ],
        dim=1,
    )
    heights = volume[:, None] / torch.linalg.vector_norm(crosses, dim=-1)
    return float(heights.min() / 2)


def rdf(positions: torch.Tensor, cell: torch.Tensor, r_max: float, n_bins: int) -> torch.Tensor:
    """g(r) per system for periodic systems, minimum image, all elements together.

    positions (n_systems, n_atoms, 3), cell (n_systems, 3, 3) with lattice vectors as rows (ASE).
    Normalised as ASE (and LAMMPS) do: g = V / N^2 * n_ordered_pairs(shell) / V_shell.
    Needs r_max <= half the smallest face distance (then the minimum image is the only image within
    r_max); :func:`max_rdf_radius` gives that bound. Agrees with ``ase.geometry.rdf.get_rdf``.
    """
    n_systems, n_atoms, _ = positions.shape
    inverse = torch.linalg.inv(cell)
    fractional = positions @ inverse
    delta = fractional[:, :, None, :] - fractional[:, None, :, :]
    delta = delta - torch.round(delta)
    distances = torch.linalg.vector_norm(delta @ cell[:, None], dim=-1)
    upper = torch.triu(torch.ones(n_atoms, n_atoms, dtype=torch.bool, device=positions.device), diagonal=1)
    distances = distances[:, upper]  # (n_systems, n_pairs)
    width = r_max / n_bins
    bins = torch.floor(distances / width).long()
    inside = (bins < n_bins) & torch.isfinite(distances)
    flat = (bins + n_bins * torch.arange(n_systems, device=positions.device)[:, None])[inside]
    counts = torch.bincount(flat, minlength=n_systems * n_bins).reshape(n_systems, n_bins).to(positions.dtype)
    edges = torch.arange(n_bins + 1, device=positions.device, dtype=positions.dtype) * width
    shells = 4.0 / 3.0 * math.pi * (edges[1:] ** 3 - edges[:-1] ** 3)
    volume = torch.linalg.det(cell).abs()
    return 2.0 * counts * (volume / n_atoms**2)[:, None] / shells


def reference_rdf(
    frames: Sequence, r_max: float | None = None, n_bins: int = 100, source: str = "reference"
) -> tuple[np.ndarray, float]:
    """Mean g(r) over the reference frames and the r_max used (default: 6 Å or the cell bound)."""
    _check_same_system(frames, source)
    if not all(atoms.pbc.all() for atoms in frames):
        raise GGNDError(f"{source}: the RDF criterion needs fully periodic frames (pbc = T T T)")
    bound = min(max_rdf_radius(atoms.cell.array) for atoms in frames)
    r_max = min(6.0, bound) if r_max is None else r_max
    if r_max > bound + 1e-12:
        raise GGNDError(
            f"{source}: RDF radius {r_max} Å exceeds half the smallest cell width ({bound:.3f} Å)"
        )
    positions = torch.as_tensor(np.stack([a.get_positions() for a in frames]), dtype=torch.float64)
    cells = torch.as_tensor(np.stack([a.cell.array for a in frames]), dtype=torch.float64)
    return rdf(positions, cells, r_max, n_bins).mean(dim=0).numpy(), r_max


class RDFMonitor:
    """∫|<g>_ref - <g>_t| dr with <g>_t the mean of the RDFs sampled in the last ``window_samples`` samples.

    An RDF is sampled every ``every`` steps; the criterion is decided only once a full window is
    available (a single snapshot of a small cell is too noisy to judge), then at every sample.
    """

    kind = "rdf"

    def __init__(
        self,
        reference: np.ndarray,
        r_max: float,
        threshold: float = 1.0,
        every: int = 10,
        window_samples: int = 100,
    ):
        self.reference = torch.as_tensor(np.asarray(reference), dtype=torch.float64)
        self.r_max = float(r_max)
        self.n_bins = len(self.reference)
        self.threshold = float(threshold)
        self.every = int(every)
        self.window_samples = int(window_samples)

    def describe(self) -> dict:
        return {
            "criterion": "rdf",
            "threshold": self.threshold,
            "r_max_A": self.r_max,
            "n_bins": self.n_bins,
            "sample_every_steps": self.every,
            "window_samples": self.window_samples,
        }

    def start(self, n_systems: int, device, dtype) -> None:
        self.reference = self.reference.to(device=device, dtype=dtype)
        self.buffer = torch.zeros(n_systems, self.window_samples, self.n_bins, device=device, dtype=dtype)
        self.samples = 0

    def update(
        self, step: int, positions: torch.Tensor, cell: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n_systems = positions.shape[0]
        nothing = torch.full((n_systems,), float("nan"), device=positions.device, dtype=positions.dtype)
        if step % self.every:
            return nothing, torch.zeros(n_systems, dtype=torch.bool, device=positions.device)
        self.buffer[:, self.samples % self.window_samples] = rdf(positions, cell, self.r_max, self.n_bins)
        self.samples += 1
        if self.samples < self.window_samples:
            return nothing, torch.zeros(n_systems, dtype=torch.bool, device=positions.device)
        width = self.r_max / self.n_bins
        distance = (self.buffer.mean(dim=1) - self.reference).abs().sum(dim=-1) * width
        return distance, torch.ones(n_systems, dtype=torch.bool, device=positions.device)

    def keep(self, index: torch.Tensor) -> None:
        self.buffer = self.buffer[index]

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.detach().cpu(), "samples": self.samples}

    def load_state_dict(self, state: dict) -> None:
        self.buffer = state["buffer"].to(self.buffer.device, self.buffer.dtype)
        self.samples = int(state["samples"])


def first_failures(monitor, trajectory: torch.Tensor, cell: torch.Tensor | None = None) -> list[int | None]:
    """The first step at which each system of a stored trajectory is unstable (None: never).

    trajectory (n_frames, n_systems, n_atoms, 3), frame k being step k. Uses the same monitor code as
    the MD loop, so it checks the loop's criterion on hand-made or saved trajectories.
    """
    n_frames, n_systems = trajectory.shape[:2]
    if cell is None:
        cell = torch.eye(3, dtype=trajectory.dtype).expand(n_systems, 3, 3)
    monitor.start(n_systems, trajectory.device, trajectory.dtype)
    failures: list[int | None] = [None] * n_systems
    for step in range(n_frames):
        positions = trajectory[step]
        deviation, decided = monitor.update(step, positions, cell)
        finite = torch.isfinite(positions).flatten(1).all(dim=1)
        failed = ~finite | (decided & (deviation > monitor.threshold))
        for system in torch.nonzero(failed).flatten().tolist():
            if failures[system] is None:
                failures[system] = step
    return failures
