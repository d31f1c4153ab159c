"""The package's reference method: GFN2-xTB (and GFN1, IPEA1) through tblite, molecules from RDKit.

``ggnd data generate`` labels MD frames with it (:mod:`ggnd_plugin.reference`) and ``ggnd data label``
labels any structures (:mod:`ggnd_plugin.labelling`), so the package's own training data and the labels
of failure frames come from the same method and settings. tblite and RDKit are the ``[xtb]`` extra,
imported only here, inside the functions.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ggnd_plugin.errors import GGNDError

XTB_EXTRA_HINT = "pip install 'ggnd-plugin[xtb]'"
METHODS = {"gfn2-xtb": "GFN2-xTB", "gfn1-xtb": "GFN1-xTB", "ipea1-xtb": "IPEA1-xTB"}

__all__ = [
    "METHODS",
    "XTB_EXTRA_HINT",
    "molecule_from_smiles",
    "one_openmp_thread",
    "require_xtb",
    "xtb_calculator",
]


def require_xtb() -> None:
    """Import tblite and RDKit, or say which is missing and how to install it."""
    missing = []
    for module, package in (("tblite.ase", "tblite"), ("rdkit.Chem.AllChem", "rdkit")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise GGNDError(
            f"generating xTB reference data needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed: {XTB_EXTRA_HINT}"
        )


def molecule_from_smiles(smiles: str, seed: int = 0):
    """(ASE Atoms, bonds as (n_bonds, 2) indices, total charge, unpaired electrons) from a SMILES."""
    require_xtb()
    from ase import Atoms
    from rdkit import Chem, RDLogger
    from rdkit.Chem import AllChem

    RDLogger.DisableLog("rdApp.*")  # RDKit's own stderr messages would duplicate our error
    try:
        mol = Chem.MolFromSmiles(smiles)
    finally:
        RDLogger.EnableLog("rdApp.*")
    if mol is None:
        raise GGNDError(f"RDKit cannot parse the SMILES {smiles!r}")
    mol = Chem.AddHs(mol)
    if AllChem.EmbedMolecule(mol, randomSeed=seed) != 0:
        # Random-coordinate embedding rescues molecules that distance geometry cannot embed.
        if AllChem.EmbedMolecule(mol, randomSeed=seed, useRandomCoords=True) != 0:
            raise GGNDError(f"RDKit cannot build a 3D geometry for the SMILES {smiles!r}")
    if AllChem.MMFFHasAllMoleculeParams(mol):
        AllChem.MMFFOptimizeMolecule(mol, maxIters=2000)
    else:
        AllChem.UFFOptimizeMolecule(mol, maxIters=2000)
    numbers = [atom.GetAtomicNum() for atom in mol.GetAtoms()]
    atoms = Atoms(numbers=numbers, positions=mol.GetConformer().GetPositions())
    bonds = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in mol.GetBonds()], dtype=int).reshape(
        -1, 2
    )
    charge = Chem.GetFormalCharge(mol)
    unpaired = sum(atom.GetNumRadicalElectrons() for atom in mol.GetAtoms())
    return atoms, bonds, charge, unpaired


def xtb_calculator(
    method: str = "GFN2-xTB", charge: int = 0, unpaired: int = 0, electronic_temperature_K=300.0
):
    """tblite's ASE calculator, made history-free: every single point starts from scratch.

    tblite reuses the previous wavefunction as the SCF guess, so a label would depend on the frames
    before it (by ~1e-4 eV/Å) and a resumed run could not reproduce an uninterrupted one. Rebuilding
    the API object each time costs nothing measurable next to the SCF.
    """
    require_xtb()
    from tblite.ase import TBLite

    class FreshGuessTBLite(TBLite):
        def calculate(self, *args, **kwargs):
            self._res = None
            self._xtb = None
            super().calculate(*args, **kwargs)

    return FreshGuessTBLite(
        method=method,
        charge=charge,
        multiplicity=unpaired + 1,
        electronic_temperature=electronic_temperature_K,
        verbosity=0,
    )


@contextmanager
def one_openmp_thread():
    """Run tblite on one OpenMP thread: its threaded sums differ in the last bit from run to run.

    tblite links ``libgomp.so.1``; torch (imported with ggnd_plugin) has already loaded its own copy
    under that name, so tblite shares it and OMP_NUM_THREADS is read too early to help.
    ``torch.set_num_threads`` sets that runtime's thread count; the previous count is restored after.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
