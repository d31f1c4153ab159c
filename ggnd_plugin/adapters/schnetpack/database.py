"""Labelled extxyz -> the ASE database that ``spktrain`` reads (``data.datapath``).

    python -m ggnd_plugin.adapters.schnetpack.database train_300K.xyz 3bpa_train.db

Energies and forces are read with :func:`ggnd_plugin.data.read_labelled` (which accepts the usual
key spellings) and stored with their units (eV, eV/Å, Å) through SchNetPack's own
``ASEAtomsData.create``/``add_systems``, so spktrain converts them to whatever ``data.property_units``
asks for.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ggnd_plugin.errors import GGNDError


def extxyz_to_spk_db(
    source: str | Path | Sequence[str | Path],
    target: str | Path,
    index: str = ":",
    overwrite: bool = False,
) -> int:
    """Write the frames of ``source`` (energy, forces) to a new SchNetPack ASE database; return their count.

    ``source`` may be several files: their frames are stored in order (rows 1.. of the first file,
    then those of the next), ``index`` selecting frames from each.
    """
    from schnetpack.data import ASEAtomsData

    from ggnd_plugin.data import read_labelled

    sources = [Path(source)] if isinstance(source, (str, Path)) else [Path(s) for s in source]
    target = Path(target)
    if target.suffix != ".db":
        raise GGNDError(f"{target}: SchNetPack databases must end in .db")
    if target.exists():
        if not overwrite:
            raise GGNDError(f"{target} exists; remove it or pass --overwrite")
        target.unlink()
    frames = [atoms for source in sources for atoms in read_labelled(source, index)]
    target.parent.mkdir(parents=True, exist_ok=True)
    dataset = ASEAtomsData.create(
        str(target), distance_unit="Ang", property_unit_dict={"energy": "eV", "forces": "eV/Ang"}
    )
    properties, structures = [], []
    for atoms in frames:
        properties.append(
            {
                "energy": np.array([atoms.info["energy"]], dtype=np.float64),
                "forces": np.asarray(atoms.arrays["forces"], dtype=np.float64),
            }
        )
        structure = atoms.copy()
        structure.info, structure.calc = {}, None
        for key in list(structure.arrays):
            if key not in ("numbers", "positions"):
                del structure.arrays[key]
        structures.append(structure)
    dataset.add_systems(property_list=properties, atoms_list=structures)
    return len(frames)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ggnd_plugin.adapters.schnetpack.database",
        description="Convert labelled extxyz (energy, forces; eV, eV/Å) into an ASE database for spktrain.",
    )
    parser.add_argument("source", type=Path, help="extxyz file with energies and forces")
    parser.add_argument("target", type=Path, help="the .db file to write")
    parser.add_argument("--index", default=":", help="ASE frame selection, e.g. ':100' (default: all)")
    parser.add_argument("--overwrite", action="store_true", help="replace TARGET if it exists")
    args = parser.parse_args(argv)
    try:
        count = extxyz_to_spk_db(args.source, args.target, args.index, args.overwrite)
    except GGNDError as error:
        print(f"error: {error}")
        return 2
    print(f"wrote {count} frames from {args.source} to {args.target} (units: Ang, eV, eV/Ang)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
