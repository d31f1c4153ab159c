"""Why a replica failed, read from its last frames: one named cause and the atoms that show it.

Causes, in the order they are tested (the first that applies names the failure):

1. ``non-finite``: the failing step's energy, forces, momenta or positions are not finite (the atoms
   with non-finite values; what the geometry of the last frame with finite positions shows is kept
   too, as ``geometry``).
2. ``close-contact``: two atoms closer than 0.7 x the sum of their covalent radii (ASE's
   ``covalent_radii``). On the package's GFN2-xTB 3BPA data no bonded pair comes below 0.81 x (a C-H
   compressed at 1200 K) and no non-bonded pair below 1.38 x; a bond between H, C, N and O compressed
   by the bond criterion's 0.5 Å is below 0.7 x (C-H at 0.59 Å: 0.55 x), and two hydrogens driven to
   0.28 Å are at 0.45 x.
3. ``fragmentation`` (molecules): the bonds the criterion watches that are stretched beyond the
   threshold are removed from the reference bond graph and the graph splits; the atoms of every
   piece but the largest are named, with the broken bonds and how fast each lengthens. The
   graph is the criterion's own (the reference bonds, or ASE's natural bonds with ``--bonds
   natural``) and the margin is its threshold Δ: ASE's natural cutoffs with their 0.3 Å skin would be
   too tight, since a C-H bond of the same 1200 K data comes within 0.006 Å of them while intact.
4. ``bond-stretch`` (molecules): a bond is beyond the threshold but the molecule is still one piece
   (a ring bond, a compression): the bond with the largest deviation, its elements and its rate.
5. ``rdf`` (periodic runs): the RDF criterion failed without a close contact.

Every cause records the largest force on the failing frame and on the frame sampled before it: a
collision shows forces jumping by orders of magnitude, a dissociation ordinary ones. Atoms are 0-based
indices, as in ASE.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CAUSES = ("non-finite", "close-contact", "fragmentation", "bond-stretch", "rdf")
CLOSE_CONTACT_FACTOR = 0.7


@dataclass
class FailureContext:
    """What the criterion watched: ``criterion`` (bonds or rdf), its ``threshold`` and, for bonds, the
    ``pairs`` (n_bonds, 2) and their reference ``lengths`` (Å)."""

    criterion: str
    threshold: float
    pairs: np.ndarray | None = None
    lengths: np.ndarray | None = None

    @classmethod
    def from_monitor(cls, monitor) -> FailureContext:
        if monitor.kind == "bonds":
            return cls(
                "bonds",
                monitor.threshold,
                monitor.pairs.detach().cpu().numpy(),
                monitor.lengths.detach().cpu().double().numpy(),
            )
        return cls("rdf", monitor.threshold)


def _symbols(numbers: np.ndarray) -> list[str]:
    from ase.data import chemical_symbols

    return [chemical_symbols[int(z)] for z in numbers]


def _velocities_per_fs(frames: dict[str, Any], frame: int) -> np.ndarray:
    """Velocities (Å/fs) of a frame: TorchSim's momenta are ASE's (amu Å per ASE time unit)."""
    from ase import units
    from ase.data import atomic_masses

    # the run's masses; frames kept before they were recorded have ASE's defaults
    masses = frames["masses"] if "masses" in frames else atomic_masses[frames["numbers"]]
    return frames["momenta"][frame] / masses[:, None] * units.fs


def _atoms(frames: dict[str, Any], frame: int):
    from ase import Atoms

    return Atoms(
        numbers=frames["numbers"],
        positions=frames["positions"][frame],
        cell=frames["cell"],
        pbc=frames["pbc"],
    )


def close_contact(frames: dict[str, Any], frame: int, factor: float = CLOSE_CONTACT_FACTOR):
    """(i, j, distance, distance / (r_i + r_j)) of the closest pair below ``factor``, or None.

    Minimum image for periodic frames; a neighbour list, so large cells cost O(atoms).
    """
    from ase.data import covalent_radii
    from ase.neighborlist import neighbor_list

    numbers = frames["numbers"]
    radii = covalent_radii[numbers]
    first, second, distance = neighbor_list("ijd", _atoms(frames, frame), factor * 2 * float(radii.max()))
    if len(first) == 0:
        return None
    ratio = distance / (radii[first] + radii[second])
    close = (ratio < factor) & (first < second)
    if not close.any():
        return None
    k = np.flatnonzero(close)[np.argmin(ratio[close])]
    return int(first[k]), int(second[k]), float(distance[k]), float(ratio[k])


def _components(n_atoms: int, pairs: np.ndarray) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n_atoms, n_atoms))
    return connected_components(graph, directed=False)[1]


def _name(symbols: Sequence[str], atoms: Sequence[int]) -> str:
    return ", ".join(f"{symbols[a]}{a}" for a in atoms)


def _bond_rate(frames: dict[str, Any], frame: int, i: int, j: int) -> float:
    """d|r_j - r_i|/dt (Å/fs): > 0 when the bond lengthens."""
    positions = frames["positions"][frame]
    axis = positions[j] - positions[i]
    axis = axis / np.linalg.norm(axis)
    velocities = _velocities_per_fs(frames, frame)
    return float((velocities[j] - velocities[i]) @ axis)


def _fragmentation(frames, frame, pairs, lengths, bond_lengths, broken, symbols) -> dict[str, Any] | None:
    """The pieces the bond graph falls into without its ``broken`` bonds, when it falls apart: every
    piece but the largest (ties: the one holding the lowest atom stays), each with the bonds it lost."""
    from ase.formula import Formula

    labels = _components(len(symbols), pairs[~broken])
    before = _components(len(symbols), pairs)  # a cluster of molecules is several pieces already
    extra = len(np.unique(labels)) - len(np.unique(before))
    if extra <= 0:
        return None
    members = {label: np.flatnonzero(labels == label) for label in np.unique(labels)}
    left = []
    for molecule in np.unique(before):  # only molecules that split, each keeping its largest piece
        pieces = np.unique(labels[before == molecule])
        order = sorted(pieces, key=lambda label: (len(members[label]), -members[label][0]))
        left += order[:-1]
    parts, atoms = [], []
    for label in left:
        piece = members[label]
        cut = [k for k in np.flatnonzero(broken) if (labels[pairs[k]] == label).sum() == 1]
        bonds = "; ".join(
            f"{symbols[pairs[k, 0]]}{pairs[k, 0]}-{symbols[pairs[k, 1]]}{pairs[k, 1]} at "
            f"{bond_lengths[k]:.2f} Å, reference {lengths[k]:.2f} Å, lengthening at "
            f"{_bond_rate(frames, frame, *pairs[k]):+.3f} Å/fs"
            for k in cut
        )
        formula = Formula.from_list([symbols[a] for a in piece]).format("hill")
        parts.append(f"{formula} ({_name(symbols, piece)}) left: {bonds}")
        atoms += piece.tolist()
    return {
        "cause": "fragmentation",
        "atoms": atoms,
        "detail": "; ".join(parts),
        "values": {
            "fragments": extra,
            "broken_bonds": [[int(a) for a in pairs[k]] for k in np.flatnonzero(broken)],
        },
    }


def _geometry(
    frames: dict[str, Any], frame: int, context: FailureContext, worst_bond: bool = False
) -> dict[str, Any] | None:
    """The geometric cause a frame shows (close contact, fragmentation, bond stretch), or None.

    ``worst_bond``: name the bond of largest deviation even within the threshold (a bond failure found
    in float32 can be at most the threshold when recomputed here in float64)."""
    symbols = _symbols(frames["numbers"])
    contact = close_contact(frames, frame)
    if contact is not None:
        i, j, distance, ratio = contact
        return {
            "cause": "close-contact",
            "atoms": [i, j],
            "detail": f"{symbols[i]}{i}-{symbols[j]}{j} at {distance:.2f} Å "
            f"({ratio:.2f} x their covalent radii)",
            "values": {"distance_A": distance, "covalent_ratio": ratio},
        }
    if context.criterion != "bonds":
        return None
    positions = frames["positions"][frame]
    pairs, lengths = context.pairs, context.lengths
    bond_lengths = np.linalg.norm(positions[pairs[:, 1]] - positions[pairs[:, 0]], axis=-1)
    deviation = bond_lengths - lengths
    broken = deviation > context.threshold
    if broken.any():
        split = _fragmentation(frames, frame, pairs, lengths, bond_lengths, broken, symbols)
        if split is not None:
            return split
    worst = int(np.argmax(np.abs(deviation)))
    if abs(deviation[worst]) <= context.threshold and not worst_bond:
        return None
    i, j = (int(a) for a in pairs[worst])
    rate = _bond_rate(frames, frame, i, j)
    how = "stretched" if deviation[worst] > 0 else "compressed"
    return {
        "cause": "bond-stretch",
        "atoms": [i, j],
        "detail": f"{symbols[i]}{i}-{symbols[j]}{j} {how} to {bond_lengths[worst]:.2f} Å (reference "
        f"{lengths[worst]:.2f} Å, {deviation[worst]:+.2f} Å), changing at {rate:+.3f} Å/fs",
        "values": {
            "bond_type": "-".join(sorted((symbols[i], symbols[j]))),
            "length_A": float(bond_lengths[worst]),
            "reference_A": float(lengths[worst]),
            "rate_A_per_fs": rate,
        },
    }


def _max_force(forces: np.ndarray) -> float | None:
    norms = np.linalg.norm(forces, axis=-1)
    norms = norms[np.isfinite(norms)]
    return float(norms.max()) if len(norms) else None


def classify(
    frames: dict[str, Any], failure: str, context: FailureContext, max_deviation: float | None = None
) -> dict[str, Any]:
    """The cause of one failure from its frames (:func:`~ggnd_plugin.md.failure_frames.replica_frames`).

    ``failure`` is the run's record (``bonds``, ``rdf`` or ``non-finite``); ``max_deviation`` the
    criterion's value at the failure (for the RDF detail). Returns ``cause`` (one of :data:`CAUSES`),
    ``atoms``, ``detail`` (one line), ``step``, ``max_force_eV_A`` (failing frame),
    ``previous_max_force_eV_A`` (the frame sampled before it, None without one), ``values`` and, for
    non-finite failures, ``geometry`` (the cause the last frame with finite positions shows, or None).
    """
    last = len(frames["steps"]) - 1
    step = int(frames["steps"][last])
    forces = {
        "max_force_eV_A": _max_force(frames["forces"][last]),
        "previous_max_force_eV_A": _max_force(frames["forces"][last - 1]) if last > 0 else None,
    }
    symbols = _symbols(frames["numbers"])
    values = [frames[name][last] for name in ("positions", "momenta", "forces")]
    bad_atoms = sorted(set(np.flatnonzero(~np.isfinite(np.stack(values)).all(axis=(0, 2))).tolist()))
    energy_finite = bool(np.isfinite(frames["energy"][last]))
    if failure == "non-finite" or bad_atoms or not energy_finite:
        finite_frames = [k for k in range(last, -1, -1) if np.isfinite(frames["positions"][k]).all()]
        geometry = None
        if finite_frames:
            geometry = _geometry(frames, finite_frames[0], context)
            if geometry is not None:
                geometry["step"] = int(frames["steps"][finite_frames[0]])
        what = [] if energy_finite else ["energy"]
        if bad_atoms:
            shown = _name(symbols, bad_atoms[:6]) + (", ..." if len(bad_atoms) > 6 else "")
            what.append(f"values on {len(bad_atoms)} atom(s) ({shown})")
        detail = "non-finite " + " and ".join(what or ["values"])
        if geometry is not None:
            detail += f"; step {geometry['step']} shows {geometry['cause']}: {geometry['detail']}"
        atoms = bad_atoms or ([] if geometry is None else geometry["atoms"])
        return {
            "cause": "non-finite",
            "atoms": atoms,
            "detail": detail,
            "step": step,
            **forces,
            "values": {},
            "geometry": geometry,
        }
    geometry = _geometry(frames, last, context)
    if geometry is None:
        if context.criterion == "rdf":
            value = "" if max_deviation is None else f"{max_deviation:.2f} "
            geometry = {
                "cause": "rdf",
                "atoms": [],
                "detail": f"RDF distance {value}> {context.threshold:g} without a close contact",
                "values": {"rdf_distance": max_deviation},
            }
        else:  # a bond failure: the bond at the threshold in the run's precision
            geometry = _geometry(frames, last, context, worst_bond=True)
        if geometry is None:
            geometry = {
                "cause": "bond-stretch",
                "atoms": [],
                "detail": "no bond beyond the threshold on the failing frame",
                "values": {},
            }
    return {**geometry, "step": step, **forces}


def describe_forces(cause: dict[str, Any]) -> str:
    """'max force 512 eV/Å (6.1 on the frame before)' for a cause."""
    now, before = cause.get("max_force_eV_A"), cause.get("previous_max_force_eV_A")
    if now is None:
        return "no finite force"
    text = f"max force {now:.3g} eV/Å"
    return text if before is None else f"{text} ({before:.3g} on the frame before)"


def failure_key(row: dict[str, Any]) -> str:
    """The series key of a result row (``MODEL/TK/REPLICA``), under which its frames are kept."""
    return f"{row['model']}/{row['temperature_K']:g}K/{row['replica']}"


def name_causes(result, context: FailureContext) -> None:
    """Classify every failed replica of ``result`` that left frames: ``result.failures[key]["cause"]``,
    and the row keys ``cause``, ``cause_atoms`` and ``cause_detail`` (None for replicas that did not fail)."""
    for row in result.rows:
        entry = result.failures.get(failure_key(row)) if row["failed"] else None
        if entry is None:
            row.update(cause=None, cause_atoms=None, cause_detail=None)
            continue
        cause = classify(entry["frames"], row["failure"], context, row.get("max_deviation"))
        entry["cause"] = cause
        row.update(
            cause=cause["cause"],
            cause_atoms=list(cause["atoms"]),
            cause_detail=f"{cause['detail']}; {describe_forces(cause)}",
        )
