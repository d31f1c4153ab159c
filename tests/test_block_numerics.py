"""The version-2 block against second implementations: a per-pair loop written from the equations of
docs/block.md with e3nn's own harmonics and Clebsch-Gordan coefficients, the padded-row pair layout,
the version-1 block where the mathematics did not change, and e3nn's spherical harmonics (float64)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TOY_IRREPS, TOY_SPECIES, random_molecule, toy_host_features
from e3nn import o3

from ggnd_plugin.block import (
    EMBEDDING_RADIAL,
    FeatureSpec,
    GGNDBlock,
    GGNDConfig,
    complete_graph_pairs,
    complete_graph_systems,
    filter_paths,
    smooth_cutoff,
    spherical_harmonics,
    system_energy,
    to_channels,
    traceable_complete_graph,
)

SPEC = FeatureSpec({"node_feats": TOY_IRREPS}, num_species=TOY_SPECIES)


def make_block(seed: int = 0, **options) -> GGNDBlock:
    torch.manual_seed(seed)
    block = GGNDBlock(SPEC, GGNDConfig(**{"channels": 8, "heads": 2, **options}))
    with torch.no_grad():  # a trained-looking block: every parameter away from its initial value
        for parameter in block.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return block


# --------------------------------------------------------------------------------------------------
# A second implementation: one pair at a time, straight from the equations
# --------------------------------------------------------------------------------------------------
def reference_state(block: GGNDBlock, host: torch.Tensor, positions: torch.Tensor, species: torch.Tensor):
    """Z(T) of one molecule (complete graph), pair by pair, as docs/block.md writes it: (n, C, C')."""
    config = block.config
    c, lmax, heads = block.channels, block.lmax, block.heads
    n, components = len(positions), (lmax + 1) ** 2
    degree = [l for l in range(lmax + 1) for _ in range(2 * l + 1)]
    eps = 1e-3

    def pair(i, j):
        x = positions[j] - positions[i]
        r = torch.sqrt((x * x).sum() + eps**2)
        sh = o3.spherical_harmonics(list(range(lmax + 1)), x / r, normalize=False, normalization="component")
        rbf = torch.exp(-(((r - block.radial.centers) / block.radial.width) ** 2))
        local = smooth_cutoff(r / config.radial_range, config.envelope_exponent)
        radial = block.pair_radial(rbf).reshape(-1, lmax + 1) if block.radial_outputs else None
        return r, sh, rbf, local, radial

    z = torch.zeros(n, c, components, dtype=positions.dtype)
    if block.uses_host:
        z = z + to_channels(block.host_to_state(host), c, lmax)
    if block.uses_embedding:
        e = block.species_embedding.weight[species]
        first = int(config.tensor_filter)  # the embedding's radial functions follow the filter's
        for i in range(n):
            z[i, :, 0] = z[i, :, 0] + e[i]
            total, count = torch.zeros(c, components, dtype=positions.dtype), 0.0
            for j in range(n):
                r, sh, rbf, local, radial = pair(i, j)
                count = count + local
                for f in range(components):
                    l = degree[f]
                    rho = radial[first : first + EMBEDDING_RADIAL, l]  # (S,)
                    weight = (rho[:, None] * block.embedding_mixing[:, l, :]).sum(0)  # (C,)
                    total[:, f] = total[:, f] + local * weight * e[j] * sh[f]
            z[i] = z[i] + total / count

    def rhs(z):
        if block.gradient_mixing is None:
            mixed = z
        else:
            mixed = torch.stack(
                [z[:, :, a] @ block.gradient_mixing[degree[a]] / math.sqrt(c) for a in range(components)], -1
            )
        norms = [
            torch.sqrt((z[:, :, l * l : (l + 1) ** 2] ** 2).sum(-1) + eps**2) - eps
            for l in range(1, lmax + 1)
        ]
        invariants = torch.cat([z[:, :, 0], *norms], dim=-1)
        rate = torch.zeros_like(z)
        mp = config.variant == "mp"
        for i in range(n):
            geometry = [pair(i, j) for j in range(n)]
            if mp:
                weights = torch.stack([g[3] for g in geometry])
                alpha = (weights / weights.sum())[:, None].expand(n, heads)
            else:
                d = c // heads
                q = block.query(invariants[i]).reshape(heads, d)
                k = block.key(invariants).reshape(n, heads, d)
                decay = torch.nn.functional.softplus(block.attention_decay)
                logits = torch.stack(
                    [
                        (q * k[j]).sum(-1) / math.sqrt(d) + block.attention_radial(g[2]) - decay * g[0]
                        for j, g in enumerate(geometry)
                    ]
                )  # (n, H)
                alpha = torch.softmax(logits, dim=0)
            head = torch.arange(c) // (c // alpha.shape[1])
            for j in range(n):
                values = mixed[j] if mp else mixed[j] - mixed[i]
                rate[i] = rate[i] + alpha[j, head][:, None] * values
            if not config.tensor_filter:
                continue
            paths = filter_paths(lmax)
            fan_in = [sum(1 for p in paths if p[2] == l) for l in range(lmax + 1)]
            gates = torch.tanh(block.filter_gate(invariants[i])).reshape(len(paths), c)
            mean_alpha = alpha.mean(1)
            for index, (l_in, l_f, l_out) in enumerate(paths):
                cg = (
                    o3.wigner_3j(l_in, l_f, l_out, dtype=z.dtype)
                    * math.sqrt(2 * l_out + 1)
                    / math.sqrt(fan_in[l_out])
                )
                out = torch.zeros(c, 2 * l_out + 1, dtype=z.dtype)
                for j, (_, sh, _, local, radial) in enumerate(geometry):
                    values = mixed[j] if mp else mixed[j] - mixed[i]
                    g = values[:, l_in * l_in : (l_in + 1) ** 2]  # (C, 2l_in+1)
                    y = sh[l_f * l_f : (l_f + 1) ** 2]
                    out = out + mean_alpha[j] * local * radial[0, l_f] * torch.einsum(
                        "ca,f,afo->co", g, y, cg
                    )
                rate[i, :, l_out * l_out : (l_out + 1) ** 2] += gates[index][:, None] * out
        return rate

    if config.variant == "mp":
        return z + rhs(z)
    tau = config.step_size
    for _ in range(config.steps):
        if config.solver == "euler":
            z = z + tau * rhs(z)
        else:
            k1 = rhs(z)
            k2 = rhs(z + 0.5 * tau * k1)
            k3 = rhs(z + 0.5 * tau * k2)
            k4 = rhs(z + tau * k3)
            z = z + tau / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="default"),
        pytest.param({"lmax": 2, "solver": "rk4", "steps": 1}, id="rk4-l2"),
        pytest.param({"variant": "mp"}, id="mp"),
        pytest.param({"initial_condition": "host", "tensor_filter": False}, id="host-no-filter"),
        pytest.param({"initial_condition": "embedding", "mix_gradient": False}, id="embedding-no-mixing"),
    ],
)
def test_block_equals_a_pair_by_pair_implementation(options):
    block = make_block(**options)
    positions, species = random_molecule(5, seed=7, spread=1.8)
    batch = torch.zeros(5, dtype=torch.long)
    host = toy_host_features(positions, species, batch)
    with torch.no_grad():
        ours = block.diffuse(host, positions, species, block.pairs(positions, batch), batch)
        reference = reference_state(block, host, positions, species)
    reference = torch.cat(
        [reference[:, :, l * l : (l + 1) ** 2].reshape(5, -1) for l in range(block.lmax + 1)], -1
    )
    assert reference.abs().max() > 0.1
    assert (ours - reference).abs().max() < 1e-10


# --------------------------------------------------------------------------------------------------
# Layouts and pieces
# --------------------------------------------------------------------------------------------------
def test_spherical_harmonics_are_e3nn_s():
    vectors = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    vectors[0] = 0.0
    for lmax in (0, 1, 2, 3):
        expected = o3.spherical_harmonics(
            list(range(lmax + 1)), vectors, normalize=False, normalization="component"
        )
        assert (spherical_harmonics(vectors, lmax) - expected).abs().max() < 1e-12


@pytest.mark.parametrize("options", [{}, {"lmax": 2, "solver": "rk4"}, {"variant": "mp"}])
def test_square_blocks_equal_padded_rows_for_mixed_sizes(options):
    """Three layouts of the complete graph of a batch (sizes 6, 1, 9, 4: padding in every form) agree:
    square blocks per system, padded rows of partners, one block over all atoms with pairs across
    systems masked (the form traced models use). Forces, and their derivative (training), too."""
    block = make_block(**options)
    molecules = [random_molecule(n, seed=30 + n) for n in (6, 1, 9, 4)]
    positions = torch.cat([p for p, _ in molecules]).requires_grad_(True)
    species = torch.cat([s for _, s in molecules])
    batch = torch.cat([torch.full((len(p),), k, dtype=torch.long) for k, (p, _) in enumerate(molecules)])
    host = toy_host_features(positions, species, batch)
    results = []
    for pairs in (
        complete_graph_systems(batch),
        complete_graph_pairs(batch),
        traceable_complete_graph(batch),
    ):
        energy = system_energy(block(host, positions, species, pairs, batch=batch), batch, 4)
        (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=True)
        (second,) = torch.autograd.grad((grad**2).sum(), block.readout_state.weight)
        results.append((energy, grad, second))
    for energy, grad, second in results[1:]:
        assert (energy - results[0][0]).abs().max() < 1e-11
        assert (grad - results[0][1]).abs().max() < 1e-11
        assert (second - results[0][2]).abs().max() < 1e-9 * results[0][2].abs().max()


@pytest.mark.parametrize("mix_gradient", [False, True])
def test_pure_diffusion_is_version_1_s(mix_gradient):
    """Host features only, no tensor filter: the diffusion dz_i = sum_j alpha_ij W (z_j - z_i) is the same
    mathematics in both versions. With version 1's weights copied over (and the version-2 distance
    preference switched off) the version-1 block is the oracle."""
    options = dict(
        channels=8, heads=2, initial_condition="host", tensor_filter=False, mix_gradient=mix_gradient
    )
    torch.manual_seed(3)
    old = GGNDBlock(SPEC, GGNDConfig(version=1, **options))
    new = GGNDBlock(SPEC, GGNDConfig(version=2, **options))
    with torch.no_grad():
        for parameter in old.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
        for name in ("host_to_state", "query", "key", "attention_radial", "readout_state", "readout_host"):
            getattr(new, name).load_state_dict(getattr(old, name).state_dict())
        new.attention_decay.fill_(-1e4)  # softplus -> 0: no distance preference
        if mix_gradient:
            # o3.Linear keeps one C x C matrix per degree, flattened in the order of the irreps.
            new.gradient_mixing.copy_(old.gradient_mixing.weight.reshape(2, 8, 8))
    positions, species = random_molecule(8, seed=11)
    batch = torch.zeros(8, dtype=torch.long)
    host = toy_host_features(positions, species, batch)
    outputs = []
    for block in (old, new):
        p = positions.clone().requires_grad_(True)
        energy = block(host, p, species, block.pairs(p, batch), batch=batch).sum()
        outputs.append((energy, torch.autograd.grad(energy, p)[0]))
    assert outputs[0][1].abs().max() > 1e-3
    assert abs(outputs[0][0] - outputs[1][0]) < 1e-10
    assert (outputs[0][1] - outputs[1][1]).abs().max() < 1e-10


@pytest.mark.parametrize("advantage", [250.0, 10.0])
def test_weighted_softmax_is_exact_in_float32_at_the_edge_of_r_g(advantage):
    """One pair sits at the edge of r_g (envelope weight about 5e-7) with a raw logit ``advantage``
    above the others'. Its attention is w e^advantage / (w e^advantage + others): it takes the row at
    250, almost nothing at 10. The shift by max(logit + log w) keeps float32 on float64's numbers."""
    block = make_block(r_g=3.0, initial_condition="embedding", tensor_filter=False)
    with torch.no_grad():
        block.attention_radial.weight.zero_()
        block.attention_radial.bias.zero_()
        block.attention_radial.weight[:, -1] = advantage  # the Gaussian centred on r_g
        block.attention_decay.fill_(-1e4)
        block.query.weight.zero_()
        block.query.bias.zero_()
    positions = torch.tensor([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [0.0, 1.2, 0.0], [0.0, 0.0, 2.995]])
    species = torch.tensor([0, 1, 2, 0])
    batch = torch.zeros(4, dtype=torch.long)
    host = torch.zeros(4, SPEC.irreps.dim)
    alphas = {}
    for dtype in (torch.float64, torch.float32):
        b = block.to(dtype)
        pairs = b.pairs(positions.to(dtype), batch)
        with torch.no_grad():
            alpha, partners = b.attention(host.to(dtype), positions.to(dtype), species, pairs, batch)
        alphas[dtype] = alpha.double()
    edge = (partners[0] == 3).nonzero().item()
    edge_weight = alphas[torch.float64][0, :, edge]
    assert (edge_weight > 0.999).all() if advantage > 100 else (edge_weight < 0.01).all()
    assert torch.isfinite(alphas[torch.float32]).all()
    assert (alphas[torch.float32].sum(-1) - 1).abs().max() < 1e-5
    assert (alphas[torch.float32] - alphas[torch.float64]).abs().max() < 1e-5


def test_distance_preference_starts_positive_and_stays_non_negative():
    block = GGNDBlock(SPEC, GGNDConfig(channels=8, heads=4))
    decay = torch.nn.functional.softplus(block.attention_decay)
    assert torch.allclose(decay, torch.logspace(math.log10(0.2), math.log10(0.6), 4, dtype=decay.dtype))
    with torch.no_grad():
        block.attention_decay.fill_(-50.0)
    assert (torch.nn.functional.softplus(block.attention_decay) >= 0).all()
