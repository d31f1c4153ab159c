"""The GGND block on its own: energy and forces of an ASE molecule, checked under a rotation.

Host adapters do this wiring for MACE, NequIP and SchNetPack; this shows what the block needs from a
host: per-atom features with their irreps, species indices, positions and a ``batch`` vector.

    python examples/block_on_ase_molecule.py
"""

import torch
from ase.build import molecule
from e3nn import o3

from ggnd_plugin import GGNDBlock, GGNDConfig
from ggnd_plugin.block import FeatureSpec, system_energy


def main() -> None:
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    atoms = molecule("CH3CH2OH")
    elements = sorted(set(atoms.numbers))
    species = torch.tensor([elements.index(z) for z in atoms.numbers])
    positions = torch.tensor(atoms.positions)
    batch = torch.zeros(len(atoms), dtype=torch.long)
    # Stand-in host features: 8 invariants and 4 vectors per atom, as a host's last layer would give.
    spec = FeatureSpec({"scalars": "8x0e", "vectors": "4x1o"}, num_species=len(elements))
    block = GGNDBlock(spec, GGNDConfig(channels=8, steps=3))
    with torch.no_grad():  # the readout starts at zero (an upgrade changes nothing); give it weights
        block.readout_state.weight.normal_()

    def energy_and_forces(pos: torch.Tensor, rotation: torch.Tensor) -> tuple[float, torch.Tensor]:
        pos = pos.clone().requires_grad_(True)
        # Host features are functions of geometry in a real host: rotate the vectors with the molecule.
        scalars = torch.cos(pos.norm(dim=1, keepdim=True) * torch.arange(1.0, 9.0))
        vectors = torch.randn(len(atoms), 4, 3, generator=torch.Generator().manual_seed(1)) @ rotation.T
        host = {"scalars": scalars, "vectors": vectors.reshape(len(atoms), 12)}
        energy = system_energy(block(host, pos, species, block.pairs(pos, batch)), batch, 1).sum()
        (grad,) = torch.autograd.grad(energy, pos)
        return energy.item(), -grad

    identity = torch.eye(3)
    energy, forces = energy_and_forces(positions, identity)
    rotation = o3.rand_matrix()
    energy_rot, forces_rot = energy_and_forces(positions @ rotation.T, rotation)
    print(f"{len(atoms)} atoms, {sum(p.numel() for p in block.parameters()):,} block parameters")
    print(f"GGND energy {energy:.6f} eV, max |F| {forces.abs().max():.4f} eV/Å")
    print(
        f"after a rotation: |dE| = {abs(energy_rot - energy):.1e} eV, "
        f"|dF| = {(forces_rot - forces @ rotation.T).abs().max():.1e} eV/Å"
    )


if __name__ == "__main__":
    main()
