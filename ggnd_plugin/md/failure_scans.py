"""Bond-stretch scans of the bond types a stability run saw break (``ggnd stability``'s bond_scans/).

A failure named ``bond-stretch`` or ``fragmentation`` (:mod:`ggnd_plugin.md.failures`) says which bond
gave way; the scan (:mod:`ggnd_plugin.bond_scan`) then shows how much energy each model asks to pull
bonds of that type apart, which tells a model whose dissociation curve is too soft (an atom leaves with
ordinary forces) from one that was driven there by a collision.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ggnd_plugin.md.failures import failure_key

SCANS_DIR = "bond_scans"


def failing_bond_types(result) -> list[str]:
    """Element pairs (``C-H``, ...) of the bonds named by the run's bond-stretch and fragmentation
    failures (also when they are what the last finite frame of a non-finite failure shows)."""
    from ase.data import chemical_symbols

    types: dict[str, None] = {}
    for row in result.rows:
        entry = result.failures.get(failure_key(row), {}) if row["failed"] else {}
        cause = entry.get("cause")
        if cause is not None and cause["cause"] == "non-finite":
            cause = cause.get("geometry")
        if cause is None:
            continue
        numbers = entry["frames"]["numbers"]
        if cause["cause"] == "bond-stretch" and len(cause["atoms"]) == 2:
            bonds = [cause["atoms"]]
        elif cause["cause"] == "fragmentation":
            bonds = cause["values"].get("broken_bonds", [])
        else:
            continue
        for i, j in bonds:
            types["-".join(sorted((chemical_symbols[numbers[i]], chemical_symbols[numbers[j]])))] = None
    return sorted(types)


def scan_failing_bonds(
    host_models: Mapping[str, tuple[Any, Any]],
    structure,
    types: list[str],
    out_dir: str | Path,
    plots: bool = True,
    progress: bool = True,
) -> list[str]:
    """Scan the bonds of ``types`` in ``structure`` under every model (name -> (adapter, model)); write
    ``OUT/bond_scans/scan.json``, ``scan.md`` and one plot per type; return summary.md's section."""
    from ggnd_plugin.bond_scan import bond_types, plot_scans, scan_bonds, scan_table
    from ggnd_plugin.commands.scan import table_markdown
    from ggnd_plugin.safe_io import atomic_path, atomic_write_text

    present = set(bond_types(structure))
    types = [name for name in types if name in present]
    if not types:
        return []
    scans = scan_bonds(host_models, structure, types=types, progress=progress)
    rows = scan_table(scans)
    folder = Path(out_dir) / SCANS_DIR
    table = table_markdown(rows)
    record = {
        "structure": "the first reference frame",
        "bond_types": types,
        "table": rows,
        "scans": [scan.to_dict() for scan in scans],
    }
    atomic_write_text(folder / "scan.json", json.dumps(record, indent=1))
    atomic_write_text(folder / "scan.md", table)
    images = []
    if plots:
        for bond_type in types:
            with atomic_path(folder / f"scan_{bond_type}.png") as tmp:
                plot_scans(scans, tmp, bond_type)
            images.append(f"![{bond_type} scan]({SCANS_DIR}/scan_{bond_type}.png)")
    return [
        "",
        "## Bond scans of the failing bond types",
        "",
        f"Bonds of the types that broke ({', '.join(types)}) in the first reference frame, stretched by moving "
        "one atom along the bond, the rest fixed (`ggnd scan`); energy relative to the unstretched frame, "
        "median [range] over the type's bonds. A curve far below the others at 1.8-2.6 Å lets atoms leave "
        "with ordinary forces.",
        "",
        table.rstrip("\n"),
        *([""] + images if images else []),
    ]
