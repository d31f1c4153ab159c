"""``ggnd demo``: the whole story in one command (what ``make demo`` runs)."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the end-to-end example (make demo)")
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--quick", action="store_true", help="toy sizes, for tests")
    parser.set_defaults(handler=run)


def run(args) -> int:
    """For now: the GGND block on a random molecule, with its defining properties checked."""
    import torch
    from e3nn import o3

    from ggnd_plugin.block import FeatureSpec, GGNDBlock, GGNDConfig, system_energy

    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    n_atoms = 12 if args.quick else 27
    positions = torch.randn(n_atoms, 3) * 2.0
    species = torch.randint(0, 3, (n_atoms,))
    batch = torch.zeros(n_atoms, dtype=torch.long)
    host = torch.randn(n_atoms, 8)  # stand-in invariant host features
    block = GGNDBlock(FeatureSpec({"node_feats": "8x0e"}, num_species=3), GGNDConfig())

    def energy_forces(pos):
        pos = pos.clone().requires_grad_(True)
        energy = system_energy(block(host, pos, species, block.pairs(pos, batch)), batch, 1)
        (grad,) = torch.autograd.grad(energy.sum(), pos)
        return energy.detach(), -grad

    e_init, _ = energy_forces(positions)
    with torch.no_grad():
        block.readout_state.weight.normal_()
    e, f = energy_forces(positions)
    rotation = o3.rand_matrix()
    e_rot, f_rot = energy_forces(positions @ rotation.T)
    print(
        f"GGND block: {sum(p.numel() for p in block.parameters()):,} parameters, {n_atoms} atoms, all pairs"
    )
    print(f"  zero-initialised readout energy: {e_init.item():.3e} eV (upgrade leaves the host unchanged)")
    print(f"  energy after perturbing the readout: {e.item():.6f} eV")
    print(
        f"  rotation: |dE| = {abs(e_rot - e).item():.2e} eV, |dF| = {(f_rot - f @ rotation.T).abs().max():.2e} eV/Å"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "block.txt").write_text(f"energy {e.item():.12f}\n")
    return 0
