"""torch.compile of the block and of host models that contain it (MD and inference: energy and forces).

The fast tests trace with ``backend="aot_eager"`` (TorchDynamo and AOTAutograd, the graph capture that
fails on traced e3nn objects or data-dependent shapes, without generating kernels); the slow ones
generate and run TorchInductor's kernels (minutes of compilation on a small CPU).
"""

from __future__ import annotations

import copy

import pytest
import torch
from ase.io import read
from conftest import TOY_IRREPS, TOY_SPECIES, random_molecule, toy_host_features

from ggnd_plugin.block import FeatureSpec, GGNDBlock, GGNDConfig, system_energy
from ggnd_plugin.block_compile import compile_blocks
from ggnd_plugin.default_data import default_data_path

FRAMES = default_data_path("3bpa_300K_test")
CONFIG = GGNDConfig(channels=8, heads=2, steps=2)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def energy_and_forces(block, positions, species, batch):
    positions = positions.clone().requires_grad_(True)
    pairs = block.pairs(positions.detach(), batch)
    host = toy_host_features(positions, species, batch)
    energy = system_energy(block(host, positions, species, pairs, batch=batch), batch, int(batch.max()) + 1)
    (gradient,) = torch.autograd.grad(energy.sum(), positions)
    return energy.detach(), -gradient


def perturbed_block(version: int = 2, **options) -> GGNDBlock:
    torch.manual_seed(0)
    block = GGNDBlock(
        FeatureSpec({"x": TOY_IRREPS}, TOY_SPECIES),
        GGNDConfig(channels=8, heads=2, version=version, **options),
    )
    with torch.no_grad():
        block.readout_state.weight.normal_()
        block.readout_host.weight.normal_()
    return block.eval()


def molecules():
    parts = [random_molecule(n, seed=40 + n) for n in (7, 7, 5)]
    positions = torch.cat([p for p, _ in parts])
    species = torch.cat([s for _, s in parts])
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor([7, 7, 5]))
    return positions, species, batch


@pytest.mark.parametrize(
    "version,options",
    [(2, {}), (2, {"lmax": 2, "r_g": 4.0}), (1, {})],
    ids=["v2", "v2-l2-rg", "v1"],
)
def test_block_compiles_with_torch_compile(version, options):
    block = perturbed_block(version, **options)
    positions, species, batch = molecules()
    expected = energy_and_forces(block, positions, species, batch)
    compiled = torch.compile(block, backend="aot_eager", dynamic=True)
    for _ in range(2):  # the second call runs the cached graph
        energy, forces = energy_and_forces(compiled, positions, species, batch)
        assert (energy - expected[0]).abs().max() < 1e-10
        assert (forces - expected[1]).abs().max() < 1e-10


def test_compile_blocks_is_used_in_eval_and_skipped_in_training():
    block = perturbed_block()
    positions, species, batch = molecules()
    expected = energy_and_forces(block, positions, species, batch)
    assert compile_blocks(block, backend="aot_eager") == 1
    calls = []
    compiled = block._compiled_energy
    block._compiled_energy = lambda *args: calls.append(1) or compiled(*args)
    energy, forces = energy_and_forces(block, positions, species, batch)
    assert calls and (forces - expected[1]).abs().max() < 1e-10
    # Training differentiates forces again (double backward): the plain path runs.
    block.train()
    calls.clear()
    p = positions.clone().requires_grad_(True)
    host = toy_host_features(p, species, batch)
    e = block(host, p, species, block.pairs(p.detach(), batch), batch=batch).sum()
    (g,) = torch.autograd.grad(e, p, create_graph=True)
    (w,) = torch.autograd.grad((g**2).sum(), block.readout_state.weight)
    assert not calls and torch.isfinite(w).all()
    assert "_compiled_energy" not in copy.deepcopy(block).__dict__  # copies compile their own


def _upgraded(host: str):
    from ggnd_plugin import testing

    if host == "mace":
        from ggnd_plugin.adapters.mace import MACEAdapter

        adapter, plain = MACEAdapter(), testing.tiny_mace()
    else:
        from ggnd_plugin.adapters.schnetpack import SchNetPackAdapter

        adapter, plain = SchNetPackAdapter(), testing.tiny_schnetpack("painn")
    torch.manual_seed(2)
    model = adapter.attach(plain, CONFIG)
    for block in adapter.ggnd_blocks(model):
        with torch.no_grad():
            block.readout_state.weight.normal_()
    return adapter, plain, model


def test_schnetpack_model_with_ggnd_compiles():
    pytest.importorskip("schnetpack")
    adapter, plain, model = _upgraded("schnetpack")
    frames = read(FRAMES, ":2")
    expected = adapter.predict(model, frames)
    got = adapter.predict(torch.compile(model, backend="aot_eager"), frames)
    assert (got.energy - expected.energy).abs().max() < 1e-9
    assert (got.forces - expected.forces).abs().max() < 1e-9
    assert (expected.forces - adapter.predict(plain, frames).forces).abs().max() > 1e-4  # GGND is in there


@pytest.mark.slow
def test_mace_model_with_ggnd_compiles_in_torchsim():
    """MACE's own TorchSim model with ``compile_mode`` (MACE's compile recipe) around a GGND model."""
    pytest.importorskip("mace")
    import torch_sim as ts
    from torch_sim.models.mace import MaceModel

    adapter, _, model = _upgraded("mace")
    frames = read(FRAMES, ":2")
    state = ts.io.atoms_to_state(frames, device=torch.device("cpu"), dtype=torch.float64)
    eager = adapter.torchsim_model(model)(state)
    compiled = MaceModel(
        model=copy.deepcopy(model), device=torch.device("cpu"), dtype=torch.float64, compile_mode="default"
    )
    got = compiled(state)
    assert (got["energy"] - eager["energy"]).abs().max() < 1e-9
    assert (got["forces"] - eager["forces"]).abs().max() < 1e-9


@pytest.mark.slow
def test_inductor_kernels_match_the_plain_block():
    block = perturbed_block()
    positions, species, batch = molecules()
    expected = energy_and_forces(block, positions, species, batch)
    compile_blocks(block)
    energy, forces = energy_and_forces(block, positions, species, batch)
    assert (energy - expected[0]).abs().max() < 1e-9
    assert (forces - expected[1]).abs().max() < 1e-9


def test_ggnd_stability_compile_runs_the_same_md(tmp_path, monkeypatch):
    """`ggnd stability --compile` compiles the blocks of the models it runs (traced with aot_eager here,
    Inductor by default) and gives the trajectory of the plain run."""
    import numpy as np

    pytest.importorskip("mace")
    from ggnd_plugin.cli import main

    adapter, _, model = _upgraded("mace")
    path = adapter.save(model, tmp_path / "mace-ggnd.model")
    frames = str(FRAMES)
    monkeypatch.setenv("GGND_COMPILE_BACKEND", "aot_eager")
    from torch._dynamo.utils import counters

    runs = {}
    for flag in ([], ["--compile"]):
        counters.clear()
        out = tmp_path / ("compiled" if flag else "plain")
        argv = ["stability", str(path), "--start", frames, "--reference", frames, "--replicas", "2"]
        argv += [
            "--time-ps",
            "0.005",
            "--record-every",
            "1",
            "--out",
            str(out),
            "--no-plots",
            "--no-progress",
        ]
        assert main(argv + flag) == 0
        runs[bool(flag)] = np.load(out / "timeseries.npz")
        assert (counters["stats"]["unique_graphs"] > 0) == bool(flag)  # the blocks ran compiled
    assert sorted(runs[True].files) == sorted(runs[False].files)
    for key in runs[False].files:
        assert np.allclose(runs[True][key], runs[False][key], rtol=1e-9, atol=1e-9), key
