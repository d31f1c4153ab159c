"""`ggnd data reorder`: frames of a molecule rewritten in another file's atom order (bond-graph match)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase.io import read

from ggnd_plugin.cli import main
from ggnd_plugin.data import bond_graph, match_atom_order
from ggnd_plugin.errors import GGNDError

PACKAGE = Path(__file__).resolve().parents[1] / "ggnd_plugin" / "default_data" / "3bpa"
DFT = Path(__file__).resolve().parents[2] / "shared" / "data" / "3bpa" / "train_300K.xyz"


def _edges(atoms) -> set[tuple[int, int]]:
    return {tuple(sorted(edge)) for edge in bond_graph(atoms).edges}


def test_a_shuffled_molecule_gets_its_bonds_back():
    reference = read(PACKAGE / "3bpa_300K_test.xyz", 0)
    order = np.random.default_rng(0).permutation(len(reference))
    shuffled = reference[order]
    assert _edges(shuffled) != _edges(reference)  # the test could fail
    (back,) = match_atom_order([shuffled], reference)
    assert (back.numbers == reference.numbers).all()
    assert _edges(back) == _edges(reference)
    # Equivalent hydrogens may trade places: a bond keeps its length to within their thermal difference.
    for i, j in _edges(reference):
        assert abs(back.get_distance(i, j) - reference.get_distance(i, j)) < 0.1


def test_refuses_another_molecule_and_another_isomer():
    reference = read(PACKAGE / "3bpa_300K_test.xyz", 0)
    with pytest.raises(GGNDError, match="not the same molecule"):
        match_atom_order([reference[:-1]], reference)
    isomer = reference.copy()
    hydrogen = int(np.flatnonzero(isomer.numbers == 1)[0])
    isomer.positions[hydrogen] += 5.0  # a hydrogen torn off: the bond graph differs
    with pytest.raises(GGNDError, match="bonds"):
        match_atom_order([isomer], reference)


@pytest.mark.skipif(not DFT.exists(), reason="3BPA DFT data not found at ../shared/data/3bpa")
def test_package_1200K_frames_in_the_dft_order(tmp_path):
    """The package's xTB frames (RDKit order) become start frames for models trained on the DFT set."""
    out = tmp_path / "start_1200K.xyz"
    assert main(["data", "reorder", str(PACKAGE / "3bpa_1200K.xyz"), "--like", str(DFT), "-o", str(out)]) == 0
    frames, reference = read(out, ":"), read(DFT, 0)
    assert len(frames) == 100 and all((f.numbers == reference.numbers).all() for f in frames)
    assert "energy" not in frames[0].info and "forces" not in frames[0].arrays  # positions only
    # In the DFT order, the 28 bonds of the DFT set (< 1.8 Å in its frames) are bonds of these frames.
    pairs = [(i, j) for i, j in _edges(reference)]
    lengths = np.array([[f.get_distance(i, j) for i, j in pairs] for f in frames])
    assert lengths.max() < 2.0
    assert main(["data", "reorder", str(PACKAGE / "3bpa_1200K.xyz"), "--like", str(DFT), "-o", str(out)]) == 2
