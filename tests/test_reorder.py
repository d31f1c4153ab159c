"""`ggnd data reorder`: frames of a molecule rewritten in another file's atom order (bond-graph match)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.io import read, write
from networkx.algorithms.isomorphism import GraphMatcher

from ggnd_plugin.cli import main
from ggnd_plugin.data import bond_graph, match_atom_order
from ggnd_plugin.default_data import default_data_path
from ggnd_plugin.errors import GGNDError

PACKAGE = default_data_path("3bpa")


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


def test_frames_are_written_in_the_atom_order_of_another_file(tmp_path):
    """The package's 1200 K frames (RDKit order) become start frames for a model whose training set lists
    the atoms in another order: here a known permutation of the package's own frame, so the answer is
    known up to the molecule's symmetries (swapping equivalent atoms maps its bond graph onto itself)."""
    frames_in = read(PACKAGE / "3bpa_1200K.xyz", ":")
    order = np.random.default_rng(7).permutation(len(frames_in[0]))
    package_frame = read(PACKAGE / "3bpa_300K_train.xyz", 0)  # the package's files share one atom order
    like = tmp_path / "like.xyz"
    write(like, package_frame[order])
    reference = read(like, 0)
    out = tmp_path / "start_1200K.xyz"
    assert (
        main(["data", "reorder", str(PACKAGE / "3bpa_1200K.xyz"), "--like", str(like), "-o", str(out)]) == 0
    )
    frames = read(out, ":")
    assert len(frames) == 100 and all((f.numbers == reference.numbers).all() for f in frames)
    assert "energy" not in frames[0].info and "forces" not in frames[0].arrays  # positions only
    # Which input atom each output atom is: positions are copied exactly.
    (found,) = [
        [int(np.flatnonzero((frame.positions[i] == source.positions).all(1))[0]) for i in range(len(frame))]
        for frame, source in zip(frames[:1], frames_in[:1], strict=True)
    ]
    for frame, source in zip(frames, frames_in, strict=True):
        assert np.array_equal(frame.positions, source.positions[found])
    # The written order is the permutation, or the permutation followed by a symmetry of the molecule.
    graph = bond_graph(package_frame)
    matcher = GraphMatcher(graph, graph, node_match=lambda a, b: a["element"] == b["element"])
    symmetries = [[symmetry[int(atom)] for atom in order] for symmetry in matcher.isomorphisms_iter()]
    assert len(symmetries) == 8 and order.tolist() in symmetries  # NH2 and CH2 hydrogens, phenyl flip
    assert found in symmetries
    # In the new order, the 28 bonds of the reference are bonds of these frames.
    pairs = [(i, j) for i, j in _edges(reference)]
    assert len(pairs) == 28
    lengths = np.array([[f.get_distance(i, j) for i, j in pairs] for f in frames])
    assert lengths.max() < 2.0
    assert (
        main(["data", "reorder", str(PACKAGE / "3bpa_1200K.xyz"), "--like", str(like), "-o", str(out)]) == 2
    )
