"""The GGND block against the properties of ggnd-spec section 1 (float64 throughout).

The properties hold for both numerics versions: version 2 (the default) everywhere, version 1 (files of
ggnd-plugin 0.1.0) in the symmetry, force, batching and chunking tests.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOY_IRREPS, TOY_SPECIES, random_molecule, toy_host_features
from e3nn import o3

from ggnd_plugin.block import (
    FeatureSpec,
    GGNDBlock,
    GGNDConfig,
    complete_graph_pairs,
    radius_pairs,
    system_energy,
)

SPEC = FeatureSpec({"node_feats": TOY_IRREPS}, num_species=TOY_SPECIES)


def make_block(seed: int = 0, **options) -> GGNDBlock:
    torch.manual_seed(seed)
    block = GGNDBlock(SPEC, GGNDConfig(**{"channels": 8, "heads": 2, **options}))
    # The readout starts at zero (upgrade safety); give it weights so the tests see the diffusion.
    with torch.no_grad():
        block.readout_state.weight.normal_()
        block.readout_host.weight.normal_()
    return block


def energy_and_forces(block, positions, species, batch=None, cell=None, pbc=None, create_graph=False):
    batch = torch.zeros(len(positions), dtype=torch.long) if batch is None else batch
    positions = positions.clone().requires_grad_(True)
    pairs = block.pairs(positions, batch, cell=cell, pbc=pbc)
    host = toy_host_features(positions, species, batch)
    atom_energy = block(host, positions, species, pairs, batch=batch, cell=cell)
    energy = system_energy(atom_energy, batch, int(batch.max()) + 1)
    (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph)
    return energy, -grad


CONFIGS = [
    pytest.param({}, id="euler-l1"),
    pytest.param({"lmax": 2, "solver": "rk4", "steps": 2}, id="rk4-l2"),
    pytest.param({"lmax": 0}, id="l0"),
    pytest.param({"initial_condition": "host"}, id="host-only"),
    pytest.param({"initial_condition": "embedding"}, id="embedding-only"),
    pytest.param({"variant": "local", "local_cutoff": 3.0}, id="local"),
    pytest.param({"variant": "mp"}, id="mp"),
    pytest.param({"r_g": 4.0}, id="finite-rg"),
]


VERSIONS = [pytest.param(2, id="v2"), pytest.param(1, id="v1")]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("options", CONFIGS)
def test_rotation_reflection_translation_permutation(options, version):
    block = make_block(**options, version=version)
    positions, species = random_molecule(9, seed=1)
    e0, f0 = energy_and_forces(block, positions, species)
    scale = f0.abs().max()
    assert scale > 1e-3, "forces vanish: the test would not see an error"

    for seed in range(3):
        torch.manual_seed(seed)
        rotation = o3.rand_matrix(dtype=torch.float64)
        e, f = energy_and_forces(block, positions @ rotation.T, species)
        assert torch.allclose(e, e0, atol=1e-9, rtol=0)
        assert (f - f0 @ rotation.T).abs().max() < 1e-9

    reflection = torch.diag(torch.tensor([1.0, -1.0, 1.0]))
    e, f = energy_and_forces(block, positions @ reflection, species)
    assert abs(e - e0).max() < 1e-9
    assert (f - f0 @ reflection).abs().max() < 1e-9

    e, f = energy_and_forces(block, positions + torch.tensor([3.0, -7.5, 0.25]), species)
    assert abs(e - e0).max() < 1e-9 and (f - f0).abs().max() < 1e-9

    perm = torch.randperm(len(positions), generator=torch.Generator().manual_seed(5))
    e, f = energy_and_forces(block, positions[perm], species[perm])
    assert abs(e - e0).max() < 1e-9 and (f - f0[perm]).abs().max() < 1e-9


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("options", [CONFIGS[0], CONFIGS[1], CONFIGS[6]])
def test_forces_match_finite_differences(options, version):
    block = make_block(**options, version=version)
    positions, species = random_molecule(6, seed=2)
    _, forces = energy_and_forces(block, positions, species)
    h = 1e-5
    numeric = torch.zeros_like(positions)
    with torch.no_grad():
        for atom in range(len(positions)):
            for axis in range(3):
                shifted = []
                for sign in (1.0, -1.0):
                    moved = positions.clone()
                    moved[atom, axis] += sign * h
                    batch = torch.zeros(len(moved), dtype=torch.long)
                    pairs = block.pairs(moved, batch)
                    e = block(toy_host_features(moved, species, batch), moved, species, pairs).sum()
                    shifted.append(e)
                numeric[atom, axis] = -(shifted[0] - shifted[1]) / (2 * h)
    assert (forces - numeric).abs().max() < 1e-6 * max(1.0, forces.abs().max().item())


@pytest.mark.parametrize("version", VERSIONS)
def test_batch_of_systems_equals_each_alone(version):
    block = make_block(version=version)
    molecules = [random_molecule(n, seed=10 + n) for n in (5, 1, 8, 3)]
    positions = torch.cat([p for p, _ in molecules])
    species = torch.cat([s for _, s in molecules])
    batch = torch.cat([torch.full((len(p),), k, dtype=torch.long) for k, (p, _) in enumerate(molecules)])
    energy, forces = energy_and_forces(block, positions, species, batch)
    start = 0
    for k, (p, s) in enumerate(molecules):
        e_alone, f_alone = energy_and_forces(block, p, s)
        assert abs(energy[k] - e_alone[0]) < 1e-11
        assert (forces[start : start + len(p)] - f_alone).abs().max() < 1e-11
        start += len(p)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("options", [{}, {"solver": "rk4", "lmax": 2}, {"r_g": 4.0}])
def test_chunked_equals_dense(options, version):
    positions, species = random_molecule(13, seed=3)
    dense = make_block(**options, version=version)
    chunked = make_block(**options, chunk_size=4, version=version)
    chunked.load_state_dict(dense.state_dict())
    e_d, f_d = energy_and_forces(dense, positions, species, create_graph=True)
    e_c, f_c = energy_and_forces(chunked, positions, species, create_graph=True)
    assert abs(e_d - e_c).max() < 1e-10
    assert (f_d - f_c).abs().max() < 1e-10
    # Training differentiates the forces once more (double backward through the recomputed blocks).
    g_d = torch.autograd.grad((f_d**2).sum(), dense.readout_state.weight)[0]
    g_c = torch.autograd.grad((f_c**2).sum(), chunked.readout_state.weight)[0]
    assert (g_d - g_c).abs().max() < 1e-10 * max(1.0, g_d.abs().max().item())


@pytest.mark.parametrize("tau,steps", [(1.0, 4), (0.5, 6), (0.25, 3)])
def test_pure_diffusion_obeys_maximum_principle(tau, steps):
    """Identity tensor part, tau <= 1: each Euler step is a convex combination of the z_j."""
    block = make_block(tensor_filter=False, mix_gradient=False, steps=steps, horizon=tau * steps, lmax=1)
    molecules = [random_molecule(n, seed=20 + n, spread=2.5) for n in (7, 5)]
    positions = torch.cat([p for p, _ in molecules])
    species = torch.cat([s for _, s in molecules])
    batch = torch.repeat_interleave(torch.tensor([0, 1]), torch.tensor([7, 5]))
    pairs = complete_graph_pairs(batch)
    host = toy_host_features(positions, species, batch)
    with torch.no_grad():
        z0 = block.initial_state(host, positions, species, pairs, None)[:, :8]
        zt = block.diffuse(host, positions, species, pairs)[:, :8]
    spread_before = spread_after = 0.0
    for system in (0, 1):
        rows = batch == system
        low, high = z0[rows].min(0).values, z0[rows].max(0).values
        assert (zt[rows] >= low - 1e-12).all() and (zt[rows] <= high + 1e-12).all()
        spread_before += (high - low).sum().item()
        spread_after += (zt[rows].max(0).values - zt[rows].min(0).values).sum().item()
    # Diffusion contracts the features towards each system's weighted mean.
    assert spread_after < spread_before


def test_diffusion_with_large_step_is_not_bounded():
    """The bound is a property of tau <= 1, not of the test: tau = 3 overshoots."""
    block = make_block(tensor_filter=False, mix_gradient=False, steps=1, horizon=3.0)
    positions, species = random_molecule(7, seed=27, spread=2.5)
    batch = torch.zeros(7, dtype=torch.long)
    pairs = complete_graph_pairs(batch)
    host = toy_host_features(positions, species, batch)
    with torch.no_grad():
        z0 = block.initial_state(host, positions, species, pairs, None)[:, :8]
        zt = block.diffuse(host, positions, species, pairs)[:, :8]
    assert ((zt > z0.max(0).values + 1e-6) | (zt < z0.min(0).values - 1e-6)).any()


@pytest.mark.parametrize("options", [{}, {"r_g": 4.0}, {"variant": "mp"}])
def test_coincident_atoms_and_single_atom_systems_are_finite(options):
    block = make_block(**options)
    positions, species = random_molecule(5, seed=4)
    positions[3] = positions[1]
    single = torch.tensor([[0.3, -0.2, 1.0]])
    all_positions = torch.cat([positions, single])
    all_species = torch.cat([species, torch.tensor([1])])
    batch = torch.tensor([0, 0, 0, 0, 0, 1])
    energy, forces = energy_and_forces(block, all_positions, all_species, batch)
    assert torch.isfinite(energy).all() and torch.isfinite(forces).all()
    # A lone atom has no partner: no force on it, and its energy does not depend on where it is.
    assert forces[5].abs().max() == 0
    e_moved, _ = energy_and_forces(block, single + 5.0, torch.tensor([1]))
    assert abs(e_moved[0] - energy[1]) < 1e-12


def test_zero_initialised_fusion_changes_nothing():
    torch.manual_seed(0)
    block = GGNDBlock(SPEC, GGNDConfig(channels=8, heads=2))
    positions, species = random_molecule(7, seed=5)
    positions.requires_grad_(True)
    batch = torch.zeros(7, dtype=torch.long)
    out = block(
        toy_host_features(positions, species, batch), positions, species, block.pairs(positions, batch)
    )
    assert torch.equal(out, torch.zeros_like(out))
    (grad,) = torch.autograd.grad(out.sum(), positions)
    assert torch.equal(grad, torch.zeros_like(grad))
    # ... but training can move it: the readout weights receive a non-zero gradient.
    (w_grad,) = torch.autograd.grad(
        block(
            toy_host_features(positions, species, batch), positions, species, block.pairs(positions, batch)
        ).sum(),
        block.readout_state.weight,
    )
    assert w_grad.abs().max() > 0


# ---- periodic systems ---------------------------------------------------------------------------
def periodic_system(seed=6):
    generator = torch.Generator().manual_seed(seed)
    cell = torch.tensor([[5.0, 0.0, 0.0], [0.7, 5.5, 0.0], [-0.4, 0.3, 6.0]])
    fractional = torch.rand(6, 3, generator=generator, dtype=torch.float64)
    positions = fractional @ cell
    species = torch.randint(0, TOY_SPECIES, (6,), generator=generator)
    return positions, species, cell[None], torch.ones(1, 3, dtype=torch.bool)


def test_radius_pairs_match_ase_neighbour_list():
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    positions, _, cell, pbc = periodic_system()
    batch = torch.zeros(len(positions), dtype=torch.long)
    pairs = radius_pairs(positions, batch, 4.5, cell=cell, pbc=pbc)
    vectors = positions[pairs.senders] - positions[:, None] + pairs.cell_shifts @ cell[0]
    ours = sorted(round(d, 9) for d in vectors.norm(dim=-1)[pairs.mask].tolist() if d > 0)
    atoms = Atoms("H6", positions=positions.numpy(), cell=cell[0].numpy(), pbc=True)
    reference = sorted(round(d, 9) for d in neighbor_list("d", atoms, 4.5))
    assert len(ours) == len(reference) > 0
    assert max(abs(a - b) for a, b in zip(ours, reference, strict=True)) < 1e-8


def test_periodic_energy_invariant_to_lattice_translation_and_rotation():
    block = make_block(r_g=4.5)
    positions, species, cell, pbc = periodic_system()
    batch = torch.zeros(len(positions), dtype=torch.long)

    def host_free_energy(pos, cell_):
        # The toy host is not periodic; give the block host features that are (species only).
        pos = pos.clone().requires_grad_(True)
        pairs = block.pairs(pos, batch, cell=cell_, pbc=pbc)
        host = torch.cat([block_species_table[species], torch.zeros(len(pos), 12)], dim=-1)
        e = block(host, pos, species, pairs, batch=batch, cell=cell_).sum()
        (g,) = torch.autograd.grad(e, pos)
        return e, -g

    block_species_table = torch.randn(TOY_SPECIES, 4, generator=torch.Generator().manual_seed(9))
    e0, f0 = host_free_energy(positions, cell)
    assert f0.abs().max() > 1e-4
    moved = positions.clone()
    moved[2] += cell[0, 1] - 2 * cell[0, 2]
    e1, f1 = host_free_energy(moved, cell)
    assert abs(e1 - e0) < 1e-10 and (f1 - f0).abs().max() < 1e-10
    rotation = o3.rand_matrix(dtype=torch.float64)
    e2, f2 = host_free_energy(positions @ rotation.T, cell @ rotation.T)
    assert abs(e2 - e0) < 1e-9 and (f2 - f0 @ rotation.T).abs().max() < 1e-9


def test_energy_and_forces_continuous_as_a_pair_crosses_r_g():
    """Two atoms pulled apart through r_g: the interaction fades to zero with no jump."""
    r_g = 3.0
    block = make_block(r_g=r_g, initial_condition="embedding")
    species = torch.tensor([0, 1])
    distances = torch.linspace(r_g - 0.6, r_g + 0.1, 141)
    energies, forces = [], []
    for d in distances:
        positions = torch.tensor([[0.0, 0.0, 0.0], [float(d), 0.0, 0.0]], requires_grad=True)
        pairs = block.pairs(positions, torch.zeros(2, dtype=torch.long))
        e = block(torch.zeros(2, SPEC.irreps.dim), positions, species, pairs).sum()
        (g,) = torch.autograd.grad(e, positions)
        energies.append(e.item())
        forces.append(-g[1, 0].item())
    energies, forces = torch.tensor(energies), torch.tensor(forces)
    step = (distances[1] - distances[0]).item()
    beyond = distances > r_g
    # Beyond r_g the atoms do not interact: constant energy, zero force.
    assert torch.allclose(energies[beyond], energies[beyond][0], atol=1e-14, rtol=0)
    assert forces[beyond].abs().max() == 0
    # Inside, they do (so the test could fail), and the energy has no jump anywhere.
    assert forces[:20].abs().max() > 1e-5
    assert (energies.diff().abs() <= 1.01 * step * forces.abs().max() + 1e-14).all()
    # The force fades continuously: zero at r_g itself, shrinking as r_g is approached (the envelope's
    # force goes like (r_g - r)^2), and changing slowly between samples.
    inside = forces[~beyond].abs()
    assert distances[~beyond][-1] == r_g and inside[-1] < 1e-12
    assert inside[-2] < inside[-3] < inside[-4] < 0.01 * forces.abs().max()
    assert forces.diff().abs().max() < 0.1 * forces.abs().max()


def test_config_rejects_bad_values_with_named_problem():
    with pytest.raises(ValueError, match="heads"):
        GGNDConfig(channels=10, heads=4)
    with pytest.raises(ValueError, match="local_cutoff"):
        GGNDConfig(variant="local", local_cutoff=-1.0)
    # Without a radius the config is valid (an adapter fills in the host's cutoff), a bare block is not.
    with pytest.raises(ValueError, match="local_cutoff"):
        GGNDBlock(FeatureSpec({"scalars": "4x0e"}, num_species=2), GGNDConfig(variant="local"))
    with pytest.raises(ValueError, match="solver"):
        GGNDConfig(solver="midpoint")
    with pytest.raises(ValueError, match="unknown GGND option"):
        GGNDConfig.from_dict({"channel": 4})


def test_feature_spec_names_the_field_that_does_not_fit():
    spec = FeatureSpec({"scalars": "4x0e", "vectors": "2x1o"}, num_species=2)
    assert spec.invariant_indices() == [0, 1, 2, 3]
    assert "equivariant" in spec.describe()
    with pytest.raises(KeyError, match="vectors"):
        spec.concatenate({"scalars": torch.zeros(3, 4)}, 3)
    with pytest.raises(ValueError, match="'vectors' should have shape \\(3, 6\\)"):
        spec.concatenate({"scalars": torch.zeros(3, 4), "vectors": torch.zeros(3, 3)}, 3)


def test_periodic_without_radius_is_refused():
    block = make_block()
    positions, _, cell, pbc = periodic_system()
    with pytest.raises(ValueError, match="r_g"):
        block.pairs(positions, torch.zeros(len(positions), dtype=torch.long), cell=cell, pbc=pbc)


def test_tensor_filter_paths_respect_parity_and_degree():
    from ggnd_plugin.block import filter_paths

    for lmax in (1, 2):
        for l_in, l_f, l_out in filter_paths(lmax):
            assert (l_in + l_f + l_out) % 2 == 0 and abs(l_in - l_f) <= l_out <= l_in + l_f <= 2 * lmax
    assert (1, 1, 1) not in filter_paths(1)  # would produce a pseudo-vector (1e)
    assert math.isclose(len(filter_paths(1)), 4)


def test_forward_exports_with_dynamic_atom_and_partner_counts():
    """torch.export with symbolic N and M: no value-dependent shapes or specialisation in forward."""
    from torch.export import Dim, export

    from ggnd_plugin.block import PairTable

    block = make_block(lmax=2)

    class BlockOnTables(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, host, positions, species, senders, mask):
            return self.inner(host, positions, species, PairTable(senders, mask))

    def inputs(n_atoms, seed):
        positions, species = random_molecule(n_atoms, seed)
        batch = torch.zeros(n_atoms, dtype=torch.long)
        pairs = complete_graph_pairs(batch)
        return (toy_host_features(positions, species, batch), positions, species, pairs.senders, pairs.mask)

    n, m = Dim("n_atoms", min=2, max=4096), Dim("partners", min=2, max=4096)
    exported = export(
        BlockOnTables(block),
        inputs(7, seed=1),
        dynamic_shapes=({0: n}, {0: n}, {0: n}, {0: n, 1: m}, {0: n, 1: m}),
    )
    other = inputs(11, seed=2)  # a size the export never saw
    assert torch.allclose(exported.module()(*other), BlockOnTables(block)(*other), atol=1e-12, rtol=0)


def test_bad_inputs_are_refused_with_the_command_line_messages():
    """The block uses the package's shared checks (ggnd_plugin.validation), so a library user sees the
    same one-line problems as `ggnd` prints, before any pair is computed."""
    from ggnd_plugin.errors import GGNDError

    block = make_block()
    positions, species = random_molecule(5, seed=8)
    batch = torch.zeros(5, dtype=torch.long)
    host = toy_host_features(positions, species, batch)
    pairs = block.pairs(positions, batch)
    broken = positions.clone()
    broken[3, 1] = float("nan")
    with pytest.raises(GGNDError, match="positions are not finite \\(first at atom 3\\)"):
        block(host, broken, species, pairs, batch=batch)
    with pytest.raises(GGNDError, match="species indices must lie in 0..2, got 0..7"):
        block(host, positions, torch.tensor([0, 1, 7, 2, 0]), pairs, batch=batch)
    bad_host = host.clone()
    bad_host[0, 0] = float("inf")
    with pytest.raises(GGNDError, match="host features are not finite"):
        block(bad_host, positions, species, pairs, batch=batch)
    with pytest.raises(ValueError, match="holds no atoms"):  # GGNDError is a ValueError
        block.pairs(positions[:0], batch[:0])
