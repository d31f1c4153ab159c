"""Labelled structures from extxyz files (ASE), checked before any model sees them.

Every problem is reported as a :class:`GGNDError` naming the file, the frame and what is wrong, so a
user never meets a traceback from inside torch for a bad data file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ggnd_plugin.errors import GGNDError
from ggnd_plugin.validation import check_elements, check_frames

__all__ = ["check_elements", "labels_of", "match_atom_order", "read_labelled", "read_structures"]

ENERGY_KEYS = ("energy", "REF_energy", "DFT_energy", "free_energy")
FORCES_KEYS = ("forces", "REF_forces", "DFT_forces")


def _find(mapping, candidates: Sequence[str]) -> str | None:
    for key in candidates:
        if key in mapping:
            return key
    return None


def read_structures(path: str | Path, index: str = ":") -> list:
    """All frames of an ASE-readable file, with a clear error when it cannot be read."""
    from ase.io import read

    path = Path(path)
    if not path.exists():
        raise GGNDError(f"{path}: no such file")
    if path.is_dir():
        raise GGNDError(f"{path} is a folder, not a structure file")
    try:
        frames = read(path, index=index)
    except Exception as error:  # ASE raises many types for malformed files
        raise GGNDError(
            f"{path}: cannot be read as a structure file ({type(error).__name__}: {error})"
        ) from error
    frames = frames if isinstance(frames, list) else [frames]
    check_frames(frames, str(path))
    return frames


def labels_of(atoms, path: str | Path = "input", frame: int = 0, need_forces: bool = True):
    """(energy, forces) of one frame, from its info/arrays or its single-point calculator."""
    energy_key = _find(atoms.info, ENERGY_KEYS)
    forces_key = _find(atoms.arrays, FORCES_KEYS)
    energy = atoms.info[energy_key] if energy_key else None
    forces = atoms.arrays[forces_key] if forces_key else None
    calc = atoms.calc
    if calc is not None and getattr(calc, "results", None):
        energy = calc.results.get("energy", energy) if energy is None else energy
        forces = calc.results.get("forces", forces) if forces is None else forces
    if energy is None:
        raise GGNDError(f"{path}: frame {frame} has no energy (looked for keys {', '.join(ENERGY_KEYS)})")
    if need_forces and forces is None:
        raise GGNDError(f"{path}: frame {frame} has no forces (looked for arrays {', '.join(FORCES_KEYS)})")
    energy = float(energy)
    if not np.isfinite(energy):
        raise GGNDError(f"{path}: frame {frame} has a non-finite energy")
    if forces is not None:
        forces = np.asarray(forces, dtype=float)
        if forces.shape != (len(atoms), 3):
            raise GGNDError(
                f"{path}: frame {frame} forces have shape {forces.shape}, expected ({len(atoms)}, 3)"
            )
        if not np.isfinite(forces).all():
            raise GGNDError(f"{path}: frame {frame} has non-finite forces")
    return energy, forces


def read_labelled(path: str | Path, index: str = ":", need_forces: bool = True) -> list:
    """Frames with reference labels stored as ``info['energy']`` and ``arrays['forces']``.

    Labels found under other common keys (``REF_energy``, ``DFT_forces``, a single-point calculator)
    are copied to those two keys, so downstream code reads one convention.
    """
    frames = read_structures(path, index)
    for number, atoms in enumerate(frames):
        energy, forces = labels_of(atoms, path, number, need_forces)
        atoms.calc = None
        atoms.info["energy"] = energy
        if forces is not None:
            atoms.arrays["forces"] = forces
    return frames


def bond_graph(atoms, mult: float = 1.15):
    """The molecule's bonds as a networkx graph (ASE natural cutoffs times ``mult``), elements on nodes."""
    import networkx
    from ase.neighborlist import natural_cutoffs, neighbor_list

    first, second = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=mult))
    graph = networkx.Graph()
    graph.add_nodes_from((index, {"element": int(z)}) for index, z in enumerate(atoms.numbers))
    graph.add_edges_from((int(i), int(j)) for i, j in zip(first, second, strict=True) if i < j)
    return graph


def match_atom_order(frames: Sequence, reference, source: str = "input") -> list:
    """``frames`` of one molecule, rewritten in ``reference``'s atom order (positions, cell, pbc only).

    Two files of the same molecule often list its atoms in different orders (the package's xTB data
    follows RDKit's order from the SMILES, the 3BPA DFT set its own). Bonds, stability criteria and
    models compare atoms by index, so start frames must follow the reference's order. The order is
    found by matching bond graphs with elements (networkx's VF2 isomorphism): equivalent atoms (the
    hydrogens of one group) may be swapped, which no bond criterion or model can tell apart. The graph
    of ``frames`` comes from its first frame with as many bonds as the reference.
    """
    from ase import Atoms
    from networkx.algorithms.isomorphism import GraphMatcher

    if not frames:
        raise GGNDError(f"{source}: holds no frames")
    numbers = sorted(int(z) for z in frames[0].numbers)
    if numbers != sorted(int(z) for z in reference.numbers):
        raise GGNDError(
            f"{source} ({frames[0].get_chemical_formula()}) and the reference "
            f"({reference.get_chemical_formula()}) are not the same molecule"
        )
    target = bond_graph(reference)
    graph = next(
        (
            g
            for g in (bond_graph(atoms) for atoms in frames)
            if g.number_of_edges() == target.number_of_edges()
        ),
        None,
    )
    if graph is None:
        raise GGNDError(f"{source}: no frame has the reference's {target.number_of_edges()} bonds")
    matcher = GraphMatcher(target, graph, node_match=lambda a, b: a["element"] == b["element"])
    mapping = next(matcher.isomorphisms_iter(), None)  # reference atom -> frame atom
    if mapping is None:
        raise GGNDError(f"{source}: its bonds do not match the reference's (another isomer?)")
    order = [mapping[index] for index in range(len(reference))]
    return [
        Atoms(
            numbers=reference.numbers,
            positions=atoms.positions[order],
            cell=atoms.cell,
            pbc=atoms.pbc,
        )
        for atoms in frames
    ]
