"""Bond-stretch scans: how much energy a model asks to pull one bond apart, the rest of the molecule fixed.

A replica that fails at high temperature has either been driven into a collision (two atoms closer than
any training frame, forces exploding) or let an atom leave with ordinary forces, because the model's
dissociation curve is too soft. The scan tells the second case apart: for each bond of a molecule the
bond is stretched from its length in the given structure (its "equilibrium") to ``max_length``, moving
one atom along the bond axis and nothing else, and the model's energy is recorded relative to the
unstretched structure. Rigid scans overestimate relaxed dissociation energies; they compare models on
the same footing, which is what they are for.

Which atom moves: the hydrogen of an X-H bond, otherwise the atom with fewer bonded neighbours (ties:
the higher index), so that stretching a terminal group disturbs the fewest other bonds. Bonds are ASE's
natural cutoffs (covalent radii plus its skin) on the structure; bond types are element pairs in
alphabetical order (``C-H``, ``C-N``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ggnd_plugin.errors import GGNDError

__all__ = ["REPORT_LENGTHS", "BondScan", "bond_types", "scan_bonds", "scan_table", "stretched_frames"]

# The lengths (Å) the tables report: a moderately stretched, a broken, and a dissociated bond.
REPORT_LENGTHS = (1.4, 1.8, 2.6)


@dataclass
class BondScan:
    """One bond stretched under several models: energies (eV) relative to the unstretched structure."""

    atoms: tuple[int, int]  # (fixed, moved)
    bond_type: str
    equilibrium: float  # Å, the bond's length in the structure
    lengths: np.ndarray  # Å
    energies: dict[str, np.ndarray] = field(default_factory=dict)  # model -> eV, 0 at ``equilibrium``

    def energy_at(self, model: str, length: float) -> float:
        """Energy at ``length`` (Å), interpolated linearly on the scan grid (which contains REPORT_LENGTHS)."""
        return float(np.interp(length, self.lengths, self.energies[model]))

    def to_dict(self) -> dict[str, Any]:
        return {
            "atoms": list(self.atoms),
            "bond_type": self.bond_type,
            "equilibrium_A": self.equilibrium,
            "lengths_A": self.lengths.tolist(),
            "energies_eV": {name: values.tolist() for name, values in self.energies.items()},
        }


def bond_types(atoms) -> dict[str, list[tuple[int, int]]]:
    """Bonds of ``atoms`` by type, each as (fixed atom, moved atom) (see the module docstring)."""
    from ase.neighborlist import build_neighbor_list

    if len(atoms) < 2:
        raise GGNDError(f"a bond scan needs a molecule; the structure has {len(atoms)} atom(s)")
    matrix = build_neighbor_list(atoms, self_interaction=False).get_connectivity_matrix(sparse=False)
    matrix = ((matrix + matrix.T) > 0).astype(int)
    degree = matrix.sum(axis=1)
    symbols = atoms.get_chemical_symbols()
    types: dict[str, list[tuple[int, int]]] = {}
    for i, j in np.argwhere(np.triu(matrix, k=1)):
        i, j = int(i), int(j)
        if symbols[i] == "H" and symbols[j] != "H":
            moved = i
        elif symbols[j] == "H" and symbols[i] != "H":
            moved = j
        else:
            moved = i if (degree[i], i) > (degree[j], j) else j
        fixed = j if moved == i else i
        name = "-".join(sorted((symbols[i], symbols[j])))
        types.setdefault(name, []).append((fixed, moved))
    if not types:
        raise GGNDError("the structure has no bonds by ASE's natural cutoffs: is it a molecule?")
    return dict(sorted(types.items()))


def scan_grid(equilibrium: float, max_length: float, step: float) -> np.ndarray:
    """From the equilibrium length to ``max_length`` every ``step`` Å, with REPORT_LENGTHS included (a
    report length below the equilibrium length, e.g. 1.4 Å for a 1.45 Å C-O bond, is a compression)."""
    grid = np.arange(equilibrium, max_length + 1e-9, step)
    return np.unique(np.round(np.r_[equilibrium, grid, [r for r in REPORT_LENGTHS if r <= max_length]], 10))


def stretched_frames(atoms, fixed: int, moved: int, lengths: Sequence[float]) -> list:
    """Copies of ``atoms`` with atom ``moved`` at each distance from ``fixed`` along their bond axis."""
    positions = atoms.get_positions()
    axis = positions[moved] - positions[fixed]
    axis /= np.linalg.norm(axis)
    frames = []
    for length in lengths:
        frame = atoms.copy()
        frame.calc = None
        moved_positions = frame.get_positions()
        moved_positions[moved] = positions[fixed] + length * axis
        frame.set_positions(moved_positions)
        frames.append(frame)
    return frames


def scan_bonds(
    models: Mapping[str, tuple[Any, Any]],
    structure,
    max_length: float = 3.0,
    step: float = 0.05,
    types: Sequence[str] | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> list[BondScan]:
    """Scan every bond of ``structure`` (or those of ``types``) under each model.

    ``models``: name -> (adapter, model). Energies come from ``adapter.predict`` in batches, relative to
    the model's energy of the unstretched structure.
    """
    from tqdm.auto import tqdm

    if not max_length > 0 or not step > 0:
        raise GGNDError(f"max_length and step must be positive, got {max_length} and {step}")
    bonds = bond_types(structure)
    if types is not None:
        unknown = sorted(set(types) - set(bonds))
        if unknown:
            raise GGNDError(
                f"bond type(s) {', '.join(unknown)} not in the structure (it has {', '.join(bonds)})"
            )
        bonds = {name: bonds[name] for name in types}
    scans = []
    for name, pairs in bonds.items():
        for fixed, moved in pairs:
            equilibrium = float(structure.get_distance(fixed, moved))
            if max_length <= equilibrium:
                raise GGNDError(
                    f"max_length {max_length} Å is not beyond the {name} bond length {equilibrium:.2f} Å"
                )
            scans.append(
                BondScan((fixed, moved), name, equilibrium, scan_grid(equilibrium, max_length, step))
            )
    total = sum(len(s.lengths) for s in scans) * len(models)
    with tqdm(total=total, desc="bond scans", unit="energy", disable=not progress) as bar:
        for model_name, (adapter, model) in models.items():
            adapter.check_structures(model, [structure], f"structure for {model_name}")
            reference = float(adapter.predict(model, [structure]).energy.detach()[0])
            for scan in scans:
                frames = stretched_frames(structure, *scan.atoms, scan.lengths)
                energies = []
                for start in range(0, len(frames), batch_size):
                    prediction = adapter.predict(model, frames[start : start + batch_size])
                    energies.append(prediction.energy.detach().cpu().double().numpy())
                    bar.update(len(frames[start : start + batch_size]))
                scan.energies[model_name] = np.concatenate(energies) - reference
    return scans


def scan_table(scans: Sequence[BondScan], lengths: Sequence[float] = REPORT_LENGTHS) -> list[dict[str, Any]]:
    """Per bond type and model: the median (and range) over the type's bonds of E(length) - E(eq)."""
    rows = []
    models = list(scans[0].energies) if scans else []
    for bond_type in dict.fromkeys(s.bond_type for s in scans):
        of_type = [s for s in scans if s.bond_type == bond_type]
        for model in models:
            row: dict[str, Any] = {
                "bond_type": bond_type,
                "model": model,
                "bonds": len(of_type),
                "equilibrium_A": float(np.median([s.equilibrium for s in of_type])),
            }
            for length in lengths:
                values = [s.energy_at(model, length) for s in of_type if s.lengths[-1] >= length]
                row[f"E_{length:g}"] = float(np.median(values)) if values else None
                row[f"E_{length:g}_min"] = float(np.min(values)) if values else None
                row[f"E_{length:g}_max"] = float(np.max(values)) if values else None
            rows.append(row)
    return rows


def plot_scans(scans: Sequence[BondScan], path, bond_type: str) -> None:
    """Every model's median curve over the bonds of ``bond_type`` (each bond faint), on one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    of_type = [s for s in scans if s.bond_type == bond_type]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for index, model in enumerate(of_type[0].energies):
        colour = f"C{index}"
        grid = np.linspace(max(s.equilibrium for s in of_type), min(s.lengths[-1] for s in of_type), 80)
        curves = np.array([np.interp(grid, s.lengths, s.energies[model]) for s in of_type])
        for s in of_type:
            ax.plot(s.lengths, s.energies[model], color=colour, alpha=0.15, lw=0.8)
        ax.plot(grid, np.median(curves, axis=0), color=colour, lw=2, label=model)
    for length in REPORT_LENGTHS:
        ax.axvline(length, color="grey", lw=0.6, ls=":")
    ax.set_xlabel(f"{bond_type} bond length (Å)")
    ax.set_ylabel("energy above the unstretched structure (eV)")
    ax.set_title(f"{bond_type}: {len(of_type)} bond(s), one atom moved, rest fixed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
