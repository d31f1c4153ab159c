"""Size safety: at random initialisation the version-2 block's features, attention and forces stay of
the same size from a 27-atom molecule to a 3000-atom cluster and a periodic cell with r_g = 10 Å.

The bound (docs/block.md, "Size safety"): the RMS of Z(T) and the RMS force agree within a factor of 3
across every case. Features are averages (the embedding over a smooth partner count, the diffusion over
right-stochastic attention), so they do not grow; forces shrink somewhat from small molecules (every atom
on the surface) to large clusters (interior atoms feel balanced pulls), which the factor allows.
Version 1 fails the same measurement (its features grow several-fold by N = 300).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ggnd_plugin.block import FeatureSpec, GGNDBlock, GGNDConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from block_scaling import molecule_blob  # noqa: E402  (the clusters the benchmark measures)

HOST_IRREPS = "16x0e+16x1o"
SPEC = FeatureSpec({"node_feats": HOST_IRREPS}, num_species=3)
BOUND = 3.0
SIZES = {torch.float64: (27, 100, 300, 1000), torch.float32: (27, 100, 300, 1000, 3000)}
CHUNKED_FROM = 2000  # atoms; larger systems are evaluated in row blocks (memory linear in N)


def make_block(version: int = 2, **options) -> GGNDBlock:
    torch.manual_seed(0)
    block = GGNDBlock(SPEC, GGNDConfig(version=version, **options)).double()
    with torch.no_grad():  # the readout starts at zero; random weights make the forces visible
        block.readout_state.weight.normal_()
        block.readout_host.weight.normal_()
    return block


def cluster(n: int):
    generator = torch.Generator().manual_seed(n)
    positions = molecule_blob(n, generator).double()
    species = torch.randint(0, 3, (n,), generator=generator)
    host = torch.randn(n, SPEC.irreps.dim, generator=generator, dtype=torch.float64)
    return positions, species, host, None, None


def periodic_cell():
    """216 atoms on a jittered cubic lattice (2.1 Å, 12.6 Å box): about 450 partners within 10 Å."""
    generator = torch.Generator().manual_seed(216)
    axis = torch.arange(6, dtype=torch.float64) * 2.1
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    positions = grid + (torch.rand(216, 3, generator=generator, dtype=torch.float64) - 0.5) * 0.6
    species = torch.randint(0, 3, (216,), generator=generator)
    host = torch.randn(216, SPEC.irreps.dim, generator=generator, dtype=torch.float64)
    cell = (12.6 * torch.eye(3, dtype=torch.float64))[None]
    return positions, species, host, cell, torch.ones(1, 3, dtype=torch.bool)


def measure(block: GGNDBlock, case, dtype):
    """(RMS of Z(T), RMS force, forces) of one system."""
    positions, species, host, cell, pbc = case
    block = block.to(dtype)
    positions, host = positions.to(dtype), host.to(dtype)
    cell = None if cell is None else cell.to(dtype)
    batch = torch.zeros(len(positions), dtype=torch.long)
    pairs = block.pairs(positions, batch, cell=cell, pbc=pbc)
    moving = positions.clone().requires_grad_(True)
    energy = block(host, moving, species, pairs, batch=batch, cell=cell).sum()
    (gradient,) = torch.autograd.grad(energy, moving)
    with torch.no_grad():
        state = block.diffuse(host, positions, species, pairs, batch, cell)
    return state.pow(2).mean().sqrt().item(), gradient.pow(2).mean().sqrt().item(), -gradient.double()


@pytest.fixture(scope="module")
def results():
    dense = make_block()
    chunked = make_block(chunk_size=256)
    periodic = make_block(r_g=10.0)
    for block in (chunked, periodic):
        block.load_state_dict(dense.state_dict())
    out = {}
    for dtype, sizes in SIZES.items():
        for n in sizes:
            block = chunked if n >= CHUNKED_FROM else dense
            out[dtype, n] = measure(block, cluster(n), dtype)
        out[dtype, "periodic"] = measure(periodic, periodic_cell(), dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_features_and_forces_keep_their_size_from_27_to_3000_atoms(results, dtype):
    cases = [key for key in results if key[0] == dtype]
    features = [results[key][0] for key in cases]
    forces = [results[key][1] for key in cases]
    print({key[1]: (round(f, 3), round(g, 3)) for key, f, g in zip(cases, features, forces, strict=True)})
    assert min(forces) > 1e-3  # the forces are there to be compared
    assert max(features) / min(features) < BOUND
    assert max(forces) / min(forces) < BOUND
    # Nothing grows with the system: the largest system is no larger than the smallest.
    largest = max(SIZES[dtype])
    assert results[dtype, largest][0] <= 1.2 * results[dtype, 27][0]
    assert results[dtype, largest][1] <= 1.2 * results[dtype, 27][1]


@pytest.mark.parametrize("case", [27, 1000, "periodic"])
def test_float32_forces_agree_with_float64(results, case):
    reference = results[torch.float64, case][2]
    single = results[torch.float32, case][2]
    assert (single - reference).norm() / reference.norm() < 1e-4


def test_attention_is_spread_over_many_partners_at_1000_atoms():
    block = make_block().float()
    positions, species, host, _, _ = cluster(1000)
    positions, host = positions.float(), host.float()
    batch = torch.zeros(1000, dtype=torch.long)
    with torch.no_grad():
        alpha, _ = block.attention(host, positions, species, block.pairs(positions, batch), batch)
    effective = 1.0 / alpha.pow(2).sum(-1)  # the number of partners a row effectively averages over
    assert alpha.max() < 0.75  # no row is one-hot, in any head
    assert effective.min() > 2 and effective.median() > 20


def test_version_1_fails_the_same_measurement():
    """The measurement can fail: version 1's all-pairs embedding sums grow with the partner count."""
    block = make_block(version=1)
    small = measure(block, cluster(27), torch.float64)
    large = measure(block, cluster(300), torch.float64)
    assert large[0] / small[0] > BOUND
