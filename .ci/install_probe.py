"""Runs inside one fresh install (a venv made by .ci/check_install.py), never inside the repo's .venv.

    python install_probe.py OUT_DIR [--hosts mace nequip schnetpack]

1. checks that ``import ggnd_plugin`` imports no torch;
2. runs the GGND block on an ASE molecule through its public API (GGNDConfig, FeatureSpec, GGNDBlock,
   ``block.pairs``, ``block(...)``) with random non-zero weights and checks that the per-atom energies
   are finite, non-zero and unchanged by a rotation of the molecule and its host features;
3. for each host named, builds a tiny random model with the host's own classes and saves it in the
   host's format (OUT_DIR/<host>/...), for ``ggnd upgrade`` and ``ggnd evaluate`` to run on;
4. writes two labelled frames of the data shipped inside the wheel to OUT_DIR/frames.xyz.

Prints one JSON object (the block's numbers, the model files) as its last line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path


def import_is_light() -> list[str]:
    """Heavy modules that ``import ggnd_plugin`` loads (none expected), checked in a fresh interpreter."""
    code = (
        "import sys, ggnd_plugin; "
        "print(' '.join(m for m in ('torch', 'e3nn', 'mace', 'nequip', 'schnetpack', 'torch_sim') "
        "if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return result.stdout.split()


def block_on_molecule() -> dict[str, float]:
    import torch

    # float64 throughout, the rotation matrix included: a float32 matrix is orthogonal to 1e-7 only.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _block_on_molecule()
    finally:
        torch.set_default_dtype(previous)


def _block_on_molecule() -> dict[str, float]:
    import torch
    from ase.build import molecule

    from ggnd_plugin.block import FeatureSpec, GGNDBlock, GGNDConfig

    # Only after ggnd_plugin.block, as a user would: under e3nn 0.4.4 the block's import of e3nn must
    # be the one that works.
    o3 = importlib.import_module("e3nn.o3")

    torch.manual_seed(0)
    atoms = molecule("CH3CH2OH")
    numbers = sorted(set(atoms.numbers.tolist()))
    species = torch.tensor([numbers.index(z) for z in atoms.numbers])
    spec = FeatureSpec({"node_feats": "4x0e+2x1o"}, num_species=len(numbers))
    block = GGNDBlock(spec, GGNDConfig(channels=8, heads=2, steps=2))
    with torch.no_grad():  # random weights everywhere, the zero-initialised readouts included
        for parameter in block.parameters():
            parameter.copy_(0.3 * torch.randn_like(parameter))
    positions = torch.tensor(atoms.positions)
    features = torch.randn(len(atoms), o3.Irreps(spec.irreps).dim)
    batch = torch.zeros(len(atoms), dtype=torch.long)

    def energies(pos, feats):
        return block({"node_feats": feats}, pos, species, block.pairs(pos, batch), batch)

    rotation = o3.rand_matrix()
    feature_rotation = o3.Irreps(spec.irreps).D_from_matrix(rotation)
    before = energies(positions, features)
    after = energies(positions @ rotation.T, features @ feature_rotation.T)
    if before.shape != (len(atoms),) or not torch.isfinite(before).all():
        raise SystemExit(
            f"block: per-atom energies of shape {tuple(before.shape)}, finite: {torch.isfinite(before).all()}"
        )
    size = before.abs().max().item()
    change = (after - before).abs().max().item()
    if size == 0.0:
        raise SystemExit("block: the energies are all zero with random non-zero weights")
    if change > 1e-9 * max(1.0, size):
        raise SystemExit(
            f"block: a rotation changed the per-atom energies by {change:.3g} (largest {size:.3g})"
        )
    return {"block_atoms": len(atoms), "block_max_energy": size, "block_rotation_change": change}


def tiny_mace(path: Path) -> None:
    import torch

    from ggnd_plugin.testing import tiny_mace

    torch.save(tiny_mace(), path)  # what mace_run_train writes as NAME.model


def tiny_nequip(path: Path) -> None:
    from ggnd_plugin.adapters.nequip import NequIPAdapter
    from ggnd_plugin.testing import tiny_nequip

    NequIPAdapter().save(tiny_nequip(), path)  # a NequIP package, as nequip-package writes


def tiny_schnetpack(path: Path) -> None:
    import torch

    from ggnd_plugin.testing import tiny_schnetpack

    torch.save(tiny_schnetpack("painn"), path)  # what spktrain writes as best_model


TINY_MODELS = {
    "mace": (tiny_mace, "tiny.model"),
    "nequip": (tiny_nequip, "tiny.nequip.zip"),
    "schnetpack": (tiny_schnetpack, "best_model"),
}


def shipped_frames(path: Path, count: int = 2) -> None:
    from ase.io import read, write

    shipped = resources.files("ggnd_plugin").joinpath("default_data", "3bpa", "3bpa_300K_test.xyz")
    with resources.as_file(shipped) as source:
        write(path, read(source, f":{count}"), format="extxyz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--hosts", nargs="*", default=[], choices=sorted(TINY_MODELS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict = {}
    heavy = import_is_light()
    if heavy:
        raise SystemExit(f"`import ggnd_plugin` imported {heavy}")
    record.update(block_on_molecule())
    shipped_frames(args.out / "frames.xyz")
    for host in args.hosts:
        build, file_name = TINY_MODELS[host]
        (args.out / host).mkdir(exist_ok=True)
        build(args.out / host / file_name)
        record[f"{host}_model"] = str(Path(host) / file_name)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
