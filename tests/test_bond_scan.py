"""Bond-stretch scans (ggnd_plugin.bond_scan, ``ggnd scan``): geometry and energies against a second
implementation, on the package's own 3BPA frames."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ggnd_plugin.adapters.base import Prediction
from ggnd_plugin.bond_scan import REPORT_LENGTHS, bond_types, scan_bonds, scan_table, stretched_frames
from ggnd_plugin.cli import main
from ggnd_plugin.data import read_structures
from ggnd_plugin.errors import GGNDError
from ggnd_plugin.md.metrics import reference_bonds

DATA = Path(__file__).resolve().parents[1] / "ggnd_plugin" / "default_data" / "3bpa" / "3bpa_300K_test.xyz"
THIRDPARTY = Path(__file__).parent / "thirdparty"


@pytest.fixture(scope="module")
def molecule():
    return read_structures(DATA, "0")[0]


def test_bond_types_of_3bpa_agree_with_the_distance_rule(molecule):
    types = bond_types(molecule)
    # 27 atoms, two rings: 28 bonds, the pairs of the stability criterion's "closer than 1.8 Å" rule on
    # this frame except the geminal H-H pairs of NH2 and CH2 (about 1.7 Å apart, not bonds).
    pairs = {tuple(sorted(p)) for bonds in types.values() for p in bonds}
    symbols = molecule.get_chemical_symbols()
    reference, _ = reference_bonds([molecule], 1.8)
    reference = {tuple(p) for p in reference.tolist() if (symbols[p[0]], symbols[p[1]]) != ("H", "H")}
    assert pairs == reference and len(pairs) == 28
    assert set(types) == {"C-C", "C-H", "C-N", "C-O", "H-N"}
    assert len(types["C-H"]) == 10 and len(types["H-N"]) == 2 and len(types["C-O"]) == 2
    for name, bonds in types.items():
        for fixed, moved in bonds:
            assert "-".join(sorted((symbols[fixed], symbols[moved]))) == name
            if "H" in name:
                assert symbols[moved] == "H"


def test_stretched_frames_move_one_atom_along_the_bond(molecule):
    fixed, moved = bond_types(molecule)["C-H"][0]
    lengths = [1.1, 1.8, 2.6]
    frames = stretched_frames(molecule, fixed, moved, lengths)
    axis = molecule.positions[moved] - molecule.positions[fixed]
    for frame, length in zip(frames, lengths, strict=True):
        assert frame.get_distance(fixed, moved) == pytest.approx(length, abs=1e-12)
        others = np.delete(np.arange(len(molecule)), moved)
        assert np.array_equal(frame.positions[others], molecule.positions[others])
        # still on the original axis
        new = frame.positions[moved] - frame.positions[fixed]
        assert np.linalg.norm(np.cross(new, axis)) == pytest.approx(0, abs=1e-10)


class PairPotential:
    """A duck-typed adapter: E = sum over all pairs of a Morse curve, the second implementation."""

    def __init__(self, depth=4.0, width=1.8, r0=1.2):
        self.depth, self.width, self.r0 = depth, width, r0

    def pair(self, r):
        return self.depth * (1 - np.exp(-self.width * (r - self.r0))) ** 2

    def energy(self, atoms):
        d = atoms.get_all_distances()[np.triu_indices(len(atoms), 1)]
        return float(self.pair(d).sum())

    def check_structures(self, model, structures, source):
        pass

    def predict(self, model, structures, training=False):
        energy = torch.tensor([self.energy(a) for a in structures], dtype=torch.float64)
        return Prediction(energy=energy, forces=torch.zeros(sum(len(a) for a in structures), 3))


def test_scan_energies_against_a_direct_pair_sum(molecule):
    potential = PairPotential()
    scans = scan_bonds({"morse": (potential, None)}, molecule, max_length=3.0, step=0.1, progress=False)
    assert len(scans) == 28
    reference = potential.energy(molecule)
    for scan in scans[::7]:
        # the grid runs from the equilibrium length (or a shorter report length: a compression) upwards
        assert scan.lengths[0] == pytest.approx(min(scan.equilibrium, *REPORT_LENGTHS))
        assert scan.energy_at("morse", scan.equilibrium) == pytest.approx(0, abs=1e-9)
        assert all(r in np.round(scan.lengths, 10) for r in REPORT_LENGTHS)
        fixed, moved = scan.atoms
        for length in (1.8, 2.6):
            (frame,) = stretched_frames(molecule, fixed, moved, [length])
            assert scan.energy_at("morse", length) == pytest.approx(
                potential.energy(frame) - reference, rel=1e-10
            )
    rows = scan_table(scans)
    ch = next(r for r in rows if r["bond_type"] == "C-H")
    values = [s.energy_at("morse", 1.8) for s in scans if s.bond_type == "C-H"]
    assert ch["bonds"] == 10 and ch["E_1.8"] == pytest.approx(np.median(values))
    assert ch["E_1.8_min"] <= ch["E_1.8"] <= ch["E_1.8_max"]


def test_scan_refuses_what_it_cannot_scan(molecule):
    with pytest.raises(GGNDError, match="not in the structure"):
        scan_bonds({"m": (PairPotential(), None)}, molecule, types=["S-H"], progress=False)
    with pytest.raises(GGNDError, match="is not beyond"):
        scan_bonds({"m": (PairPotential(), None)}, molecule, max_length=1.0, progress=False)
    with pytest.raises(GGNDError, match="needs a molecule"):
        bond_types(molecule[:1])


def test_scan_command_writes_table_json_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(THIRDPARTY))
    import toyhost_ggnd

    torch.manual_seed(0)
    adapter = toyhost_ggnd.ToyAdapter()
    plain = adapter.save(toyhost_ggnd.ToyPotential(), tmp_path / "plain.toy")
    out = tmp_path / "scan"
    argv = [
        "scan",
        str(plain),
        "--structure",
        str(DATA),
        "--types",
        "C-H",
        "H-N",
        "--step",
        "0.2",
        "--out",
        str(out),
    ]
    assert main([*argv, "--no-progress"]) == 0
    record = json.loads((out / "scan.json").read_text())
    assert [r["bond_type"] for r in record["table"]] == ["C-H", "H-N"]
    assert (out / "scan_C-H.png").stat().st_size > 0 and (out / "scan.md").read_text().startswith(
        "| bond type"
    )
    # A direct evaluation of one stretched frame gives the recorded energy.
    scan = record["scans"][0]
    molecule = read_structures(DATA, "0")[0]
    model = adapter.load(plain)
    (frame,) = stretched_frames(molecule, *scan["atoms"], [scan["lengths_A"][-1]])
    energies = adapter.predict(model, [molecule, frame]).energy.detach()
    assert scan["energies_eV"]["plain"][-1] == pytest.approx(float(energies[1] - energies[0]), abs=1e-9)
    # The folder now holds files: a second run into it is refused without --overwrite.
    assert main([*argv, "--no-progress"]) == 2
    assert "is not empty" in capsys.readouterr().err
