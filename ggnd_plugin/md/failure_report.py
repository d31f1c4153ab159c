"""What a stability run writes about its failures: the frames as extxyz, a table of causes, plots.

``OUT/failures/<model>/<T>K/replica_<k>.extxyz`` holds each failed replica's last frames, oldest first,
the failing step's own frame last (frames whose positions are not finite are left out). Each frame's
info names ``model``, ``temperature_K``, ``replica``, ``seed``, ``start_frame``, ``step``, ``time_ps``,
``failing`` (the last frame), ``cause`` and ``model_energy_eV``; its arrays hold ``momenta`` and
``model_forces``. The model's energy and forces are deliberately not stored as ``energy`` and
``forces``: those keys are reference labels (``ggnd data label`` writes them), and a model's own
prediction must never be mistaken for one. ``OUT/failures/<cause>.png`` shows the first failure (in
time) of each cause: the failing frame, the offending atoms ringed, their path through the kept frames.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from ggnd_plugin.md.failures import CAUSES, failure_key

FAILURES_DIR = "failures"


def frames_file(row: dict[str, Any]) -> str:
    """Where a failed replica's frames go, relative to the run's output folder."""
    return f"{FAILURES_DIR}/{row['model']}/{row['temperature_K']:g}K/replica_{row['replica']}.extxyz"


def has_frames(result, row: dict[str, Any]) -> bool:
    """Whether a failed replica left a frame to write: one with finite positions (a replica can fail on a
    step whose positions already overflowed, with no earlier frame kept, e.g. ``--failure-frames 0``)."""
    entry = result.failures.get(failure_key(row)) if row["failed"] else None
    return entry is not None and bool(np.isfinite(entry["frames"]["positions"]).all(axis=(1, 2)).any())


def frames_as_atoms(row: dict[str, Any], frames: dict[str, Any], dt_ps: float) -> list:
    """The frames of one failed replica as ASE Atoms, with the run's provenance in their info."""
    from ase import Atoms

    last = len(frames["steps"]) - 1
    atoms_list = []
    for k, step in enumerate(frames["steps"]):
        if not np.isfinite(frames["positions"][k]).all():
            continue
        atoms = Atoms(
            numbers=frames["numbers"],
            positions=frames["positions"][k],
            cell=frames["cell"],
            pbc=frames["pbc"],
        )
        if "masses" in frames:  # before set_momenta, which keeps momenta and would rescale velocities
            atoms.set_masses(frames["masses"])
        atoms.set_momenta(frames["momenta"][k])
        atoms.arrays["model_forces"] = np.array(frames["forces"][k])
        atoms.info.update(
            model=row["model"],
            temperature_K=float(row["temperature_K"]),
            replica=int(row["replica"]),
            seed=int(row["seed"]),
            start_frame=int(row["start_frame"]),
            step=int(step),
            time_ps=round(float(step) * dt_ps, 9),
            failing=k == last,
            cause=row.get("cause") or row["failure"],
            model_energy_eV=float(frames["energy"][k]),
        )
        atoms_list.append(atoms)
    return atoms_list


def cause_counts(result) -> list[dict[str, Any]]:
    """Per model and temperature: replicas, failed, and the failures of each cause."""
    groups: dict[tuple[str, float], dict[str, Any]] = {}
    for row in result.rows:
        group = groups.setdefault(
            (row["model"], row["temperature_K"]),
            {"model": row["model"], "temperature_K": row["temperature_K"], "replicas": 0, "failed": 0}
            | {cause: 0 for cause in CAUSES},
        )
        group["replicas"] += 1
        if row["failed"]:
            group["failed"] += 1
            if row.get("cause") in CAUSES:
                group[row["cause"]] += 1
    return list(groups.values())


def shown_causes(result) -> list[str]:
    """The causes a run's tables show: those that occurred, in the order of ``CAUSES``."""
    seen = {row.get("cause") for row in result.rows if row["failed"]}
    return [cause for cause in CAUSES if cause in seen]


def cause_table(result) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """(columns, rows) of the table of causes per model and temperature."""
    causes = shown_causes(result)
    columns = ("model", "T (K)", "failed", *causes)
    rows = [
        (
            g["model"],
            f"{g['temperature_K']:g}",
            f"{g['failed']}/{g['replicas']}",
            *(str(g[c]) for c in causes),
        )
        for g in cause_counts(result)
    ]
    return columns, rows


def first_of_each_cause(result) -> dict[str, dict[str, Any]]:
    """The earliest failure (in time, then in row order) of each cause that left frames."""
    first: dict[str, dict[str, Any]] = {}
    for row in sorted(
        (r for r in result.rows if has_frames(result, r)),
        key=lambda r: r["stability_ps"],
    ):
        first.setdefault(row["cause"], row)
    return first


def markdown_lines(result, plots: bool) -> list[str]:
    """The summary.md section on failures: the table of causes and one line per failed replica."""
    failed = [row for row in result.rows if row["failed"]]
    if not failed:
        return []
    columns, rows = cause_table(result)
    lines = [
        "",
        "## Failure causes",
        "",
        "Each failure is classified from the failing step's frame (docs/stability.md, Failure frames and "
        "causes): non-finite > close contact (< 0.7 x covalent radii) > fragmentation > bond stretch > RDF. "
        f"Frames: `{FAILURES_DIR}/MODEL/TK/replica_K.extxyz`; atoms are 0-based indices.",
        "",
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "| model | T (K) | replica | failed at (ps) | cause | what |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in failed:
        lines.append(
            f"| {row['model']} | {row['temperature_K']:g} | {row['replica']} | {row['stability_ps']:.3f} | "
            f"{row.get('cause') or row['failure']} | {row.get('cause_detail') or ''} |"
        )
    if {row.get("cause") for row in failed} & {"bond-stretch", "fragmentation"}:
        lines += [
            "",
            "Bonds broke: bond-stretch scans of those bond types (`ggnd stability ... --scan-failed`, or `ggnd scan`) "
            "show how much energy each model asks to break them.",
        ]
    if plots:
        lines += [""]
        for cause, row in first_of_each_cause(result).items():
            lines.append(
                f"![{cause}: {row['model']}, {row['temperature_K']:g} K, replica {row['replica']}]"
                f"({FAILURES_DIR}/{cause}.png)"
            )
    return lines


def print_causes(result, console) -> None:
    """The table of causes, printed (nothing when no replica failed)."""
    from rich.markup import escape
    from rich.table import Table

    if not any(row["failed"] for row in result.rows):
        return
    columns, rows = cause_table(result)
    table = Table(title="Failure causes (failures/ holds their frames)", box=None, pad_edge=False)
    for k, column in enumerate(columns):
        table.add_column(escape(column), justify="left" if k == 0 else "right")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    console.print(table)


def write_failures(result, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write the frames of every failed replica and (``plots``) one plot per cause; returns the paths.

    Files of an earlier run in ``OUT/failures`` that this result does not write again (an --overwrite
    with fewer failures) are removed, so the folder always matches results.json.
    """
    from ase.io import write

    from ggnd_plugin.safe_io import atomic_path

    out_dir = Path(out_dir)
    dt_ps = result.protocol["timestep_fs"] * 1e-3
    written: dict[str, Path] = {}
    for row in result.rows:
        frames = result.failures.get(failure_key(row)) if row["failed"] else None
        if frames is None:
            continue
        atoms = frames_as_atoms(row, frames["frames"], dt_ps)
        if not atoms:
            continue
        path = out_dir / frames_file(row)
        with atomic_path(path) as tmp:
            write(tmp, atoms, format="extxyz")
        written[frames_file(row)] = path
    if plots:
        for cause, row in first_of_each_cause(result).items():
            path = out_dir / FAILURES_DIR / f"{cause}.png"
            entry = result.failures[failure_key(row)]
            with atomic_path(path) as tmp:
                plot_failure(entry["frames"], entry["cause"], row, result.protocol, tmp)
            written[f"{FAILURES_DIR}/{cause}.png"] = path
    _remove_stale(out_dir / FAILURES_DIR, set(written.values()))
    return written


def _remove_stale(folder: Path, keep: set[Path]) -> None:
    from ggnd_plugin.safe_io import remove_stale_temporaries

    if not folder.is_dir():
        return
    for directory in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        remove_stale_temporaries(directory)  # a killed writer's, below the folder the lock cleans
    stale = [p for p in folder.glob("*/*K/replica_*.extxyz") if p not in keep]
    stale += [p for p in folder.glob("*.png") if p.stem in CAUSES and p not in keep]
    for path in stale:
        path.unlink()
    for directory in sorted(folder.glob("*/*K"), reverse=True) + sorted(folder.glob("*")):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def _projection(positions: np.ndarray) -> np.ndarray:
    """The two principal axes of a frame (its best 2D view), as a (3, 2) matrix."""
    centred = positions - positions.mean(axis=0)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)
    return axes[:2].T


def plot_failure(frames: dict[str, Any], cause: dict[str, Any], row: dict[str, Any], protocol, path) -> None:
    """The failing geometry: last frame with finite positions in its principal plane, bonds of the
    criterion (those beyond the threshold dashed red), offending atoms ringed, their path before."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ase.data import chemical_symbols, covalent_radii
    from ase.data.colors import jmol_colors

    finite = [k for k in range(len(frames["steps"])) if np.isfinite(frames["positions"][k]).all()]
    if not finite:
        return
    frame = finite[-1]
    positions = frames["positions"][frame]
    axes = _projection(positions)
    origin = positions.mean(axis=0)
    xy = (positions - origin) @ axes
    numbers = frames["numbers"]
    figure, axis = plt.subplots(figsize=(6.2, 5.6))
    for i, j in [] if frames["pbc"].any() else _guide_bonds(frames):
        axis.plot(xy[[i, j], 0], xy[[i, j], 1], color="0.6", lw=1.5, zorder=1)
    for i, j, stretched in _stretched(cause):
        style = "--" if stretched else "-"
        axis.plot(xy[[i, j], 0], xy[[i, j], 1], style, color="crimson", lw=1.8, zorder=2)
    sizes = 900 * covalent_radii[numbers] ** 2
    axis.scatter(
        xy[:, 0], xy[:, 1], s=sizes, c=jmol_colors[numbers], edgecolors="k", linewidths=0.6, zorder=3
    )
    named = _named_atoms(cause)
    for atom in cause.get("atoms", []):  # every offending atom ringed (a whole fragment, say)
        axis.scatter(
            [xy[atom, 0]],
            [xy[atom, 1]],
            s=sizes[atom] * 2.2,
            facecolors="none",
            edgecolors="crimson",
            lw=2 if atom in named else 1,
            zorder=4,
        )
    for k, atom in enumerate(named):  # the few that tell the story: labelled, with their path
        path_xy = (frames["positions"][finite][:, atom] - origin) @ axes
        axis.plot(path_xy[:, 0], path_xy[:, 1], ":", color="crimson", lw=1, zorder=2)
        axis.scatter(path_xy[:-1, 0], path_xy[:-1, 1], s=8, color="crimson", zorder=2)
        axis.annotate(
            f"{chemical_symbols[numbers[atom]]}{atom}",
            xy[atom],
            xytext=(7, 7 if k % 2 == 0 else -14),
            textcoords="offset points",
            color="crimson",
            fontsize=9,
            zorder=5,
        )
    axis.set_aspect("equal")
    axis.set_xlabel("principal axis 1 (Å)")
    axis.set_ylabel("principal axis 2 (Å)")
    step = int(frames["steps"][frame])
    title = (
        f"{row['model']}, {row['temperature_K']:g} K, replica {row['replica']}: {cause['cause']} at "
        f"{step * protocol['timestep_fs'] * 1e-3:.3f} ps (step {step})"
    )
    detail = "\n".join(textwrap.wrap(row.get("cause_detail") or cause["detail"], 95))
    axis.set_title(f"{title}\n{detail}", fontsize=7.5)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _named_atoms(cause: dict[str, Any]) -> list[int]:
    """The atoms a plot labels: a cause's atoms when few, else those of its broken bonds."""
    atoms = list(cause.get("atoms", []))
    if len(atoms) <= 4:
        return atoms
    bonds = cause.get("values", {}).get("broken_bonds", [])
    return sorted({a for bond in bonds for a in bond})[:6]


def _guide_bonds(frames: dict[str, Any]) -> list[tuple[int, int]]:
    """Bonds to draw: ASE's natural bonds of the first kept frame (a guide to the eye, not the criterion)."""
    from ase import Atoms
    from ase.neighborlist import build_neighbor_list

    atoms = Atoms(numbers=frames["numbers"], positions=frames["positions"][0])
    matrix = build_neighbor_list(atoms, self_interaction=False).get_connectivity_matrix(sparse=False)
    return [(int(i), int(j)) for i, j in np.argwhere(np.triu(matrix + matrix.T, k=1) > 0)]


def _stretched(cause: dict[str, Any]) -> list[tuple[int, int, bool]]:
    """The pairs a cause names, as lines to draw (dashed: a stretched or broken bond)."""
    if cause["cause"] == "non-finite":
        return [] if cause.get("geometry") is None else _stretched(cause["geometry"])
    if cause["cause"] == "fragmentation":
        return [(i, j, True) for i, j in cause["values"].get("broken_bonds", [])]
    atoms = cause.get("atoms", [])
    if cause["cause"] in ("close-contact", "bond-stretch") and len(atoms) == 2:
        return [(atoms[0], atoms[1], cause["cause"] == "bond-stretch")]
    return []


def json_record(result) -> dict[str, Any]:
    """``results.json`` keys on failures: the table of causes and each failure's full cause."""
    causes = {key: entry["cause"] for key, entry in result.failures.items() if "cause" in entry}
    return {"failure_causes": cause_counts(result), "failures": causes}
