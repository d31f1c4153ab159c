"""SchNetPack adapter: GGND as an output module of tiny PaiNN and SchNet potentials, on 3BPA frames."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("schnetpack")

import schnetpack as spk  # noqa: E402
from ase.io import read  # noqa: E402

from ggnd_plugin.adapters.schnetpack import SchNetPackAdapter, run_metadata  # noqa: E402
from ggnd_plugin.adapters.schnetpack import output_module as schnetpack_module  # noqa: E402
from ggnd_plugin.adapters.validate import validate_adapter  # noqa: E402
from ggnd_plugin.block import GGNDConfig  # noqa: E402
from ggnd_plugin.data import read_labelled  # noqa: E402
from ggnd_plugin.default_data import default_data_path  # noqa: E402
from ggnd_plugin.errors import GGNDError  # noqa: E402
from ggnd_plugin.testing import tiny_schnetpack  # noqa: E402

TRAIN = default_data_path("3bpa_300K_train")
TEST = default_data_path("3bpa_300K_test")
PYTHON = sys.executable
CUTOFF = 4.0
ELEMENTS = [1, 6, 7, 8]
CONFIG = GGNDConfig(channels=8, heads=2, steps=2)
KINDS = ["painn", "schnet"]


def perturb(adapter, model, seed=1, scale=0.3):
    """Give the GGND readouts non-zero weights so that GGND changes energies and forces."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in adapter.ggnd_blocks(model):
            for linear in (block.readout_state, block.readout_host):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) * scale)
    return model


@pytest.fixture(scope="module")
def frames():
    return read_labelled(TEST, ":3")


@pytest.fixture
def adapter():
    return SchNetPackAdapter()


def upgraded(adapter, kind, config=CONFIG):
    torch.manual_seed(3)
    return perturb(adapter, adapter.attach(tiny_schnetpack(kind), config))


def rotation(seed=5):
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed)))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


def test_input_keys_are_schnetpack_properties():
    from ggnd_plugin.adapters.schnetpack import torchsim_model as schnetpack_torchsim

    p = spk.properties
    assert (schnetpack_module.Z_KEY, schnetpack_module.R_KEY) == (p.Z, p.R)
    assert (schnetpack_module.IDX_M_KEY, schnetpack_module.N_ATOMS_KEY) == (p.idx_m, p.n_atoms)
    assert (schnetpack_module.CELL_KEY, schnetpack_module.PBC_KEY) == (p.cell, p.pbc)
    assert (schnetpack_torchsim.IDX_I_KEY, schnetpack_torchsim.IDX_J_KEY) == (p.idx_i, p.idx_j)
    assert (schnetpack_torchsim.OFFSETS_KEY, schnetpack_torchsim.IDX_KEY) == (p.offsets, p.idx)


@pytest.mark.parametrize("kind", KINDS)
def test_validate_adapter_and_exact_zero_init(adapter, frames, tmp_path, kind):
    model = tiny_schnetpack(kind)
    before = adapter.predict(model, frames)
    up = validate_adapter(adapter, model, frames, tmp_path, CONFIG, atol=1e-9)
    after = adapter.predict(up, frames)
    de = (before.energy - after.energy).abs().max().item()
    df = (before.forces - after.forces).abs().max().item()
    print(f"{kind}: zero-init max |dE| = {de:.3g} eV, max |dF| = {df:.3g} eV/Å")
    assert de == 0.0 and df == 0.0
    # The block sits between the energy and the Forces module, and the model still knows what it outputs.
    names = [type(m).__name__ for m in up.output_modules]
    assert names == ["Atomwise", "GGNDEnergy", "Forces"]
    assert set(up.model_outputs) == {"energy", "forces"}
    assert adapter.ggnd_blocks(model) == []  # attach() copied, the plain model is untouched
    spec = adapter.feature_spec(up)
    assert dict(spec.fields)["scalar_representation"] == "8x0e"
    assert ("vector_representation" in dict(spec.fields)) == (kind == "painn")
    assert adapter.cutoff(up) == pytest.approx(CUTOFF)


@pytest.mark.parametrize("kind", KINDS)
def test_rotation_invariance_and_equivariance(adapter, frames, kind):
    model = upgraded(adapter, kind)
    host = adapter.predict(tiny_schnetpack(kind), frames)
    prediction = adapter.predict(model, frames)
    assert (prediction.energy - host.energy).abs().min() > 1e-3, "GGND should change the energy here"
    rot = rotation()
    rotated = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.positions = atoms.positions @ rot.numpy().T
        rotated.append(atoms)
    turned = adapter.predict(model, rotated)
    de = (turned.energy - prediction.energy).abs().max().item()
    df = (turned.forces - prediction.forces @ rot.T).abs().max().item()
    print(f"{kind}: rotation |dE| = {de:.3g} eV, |R F - F(R x)| = {df:.3g} eV/Å")
    assert de < 1e-9 and df < 1e-9


@pytest.mark.parametrize("kind", KINDS)
def test_forces_are_minus_energy_gradient(adapter, frames, kind):
    model = upgraded(adapter, kind)
    atoms = frames[0].copy()
    forces = adapter.predict(model, [atoms]).forces
    h = 1e-4
    worst = 0.0
    for index, axis in [(0, 0), (5, 1), (13, 2), (26, 0)]:
        energies = []
        for sign in (1, -1):
            shifted = atoms.copy()
            shifted.positions[index, axis] += sign * h
            energies.append(adapter.predict(model, [shifted]).energy.item())
        numeric = -(energies[0] - energies[1]) / (2 * h)
        worst = max(worst, abs(numeric - forces[index, axis].item()))
    print(f"{kind}: finite-difference force error {worst:.3g} eV/Å")
    assert worst < 1e-6


def test_training_lowers_the_loss_and_moves_ggnd(adapter, frames):
    from ggnd_plugin.training import FinetuneSettings, loss_of

    torch.manual_seed(3)
    fitted_mean = float(np.mean([atoms.info["energy"] / len(atoms) for atoms in frames]))
    model = adapter.attach(tiny_schnetpack("painn", mean_per_atom=fitted_mean), CONFIG)
    model.train()
    settings = FinetuneSettings(forces_weight=10.0)
    ggnd = list(adapter.ggnd_parameters(model))
    start = [p.detach().clone() for p in ggnd]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_of(adapter, model, frames, settings, training=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = loss_of(adapter, model, frames, settings, training=False).item()
    print(f"loss {losses[0]:.4g} -> {final:.4g}")
    assert final < 0.92 * losses[0]
    moved = max((p.detach() - s).abs().max().item() for p, s in zip(ggnd, start, strict=True))
    assert moved > 1e-4
    readout = adapter.ggnd_blocks(model)[0].readout_state.weight
    assert readout.abs().max() > 0


FRESH_PROCESS = """
import json, sys, torch
from ase.io import read
from schnetpack.interfaces import SpkCalculator
from schnetpack.transform import MatScipyNeighborList
from schnetpack.utils import load_model
from ggnd_plugin.adapters.schnetpack import SchNetPackAdapter
frames = read(sys.argv[1], ":3")
adapter = SchNetPackAdapter()
for path in sys.argv[2:]:
    prediction = adapter.predict(adapter.load(path), frames)
    host = load_model(path)  # SchNetPack's own loader and calculator, as for any best_model
    atoms = frames[0].copy()
    atoms.calc = SpkCalculator(host, neighbor_list=MatScipyNeighborList(cutoff=4.0), energy_unit="eV",
                               dtype=torch.float64)
    print(json.dumps({"energy": prediction.energy.tolist(), "forces": prediction.forces.tolist(),
                      "spk_energy": atoms.get_potential_energy(), "spk_forces": atoms.get_forces().tolist(),
                      "type": type(host).__name__}))
"""


def test_save_and_reload_in_a_fresh_process(adapter, frames, tmp_path):
    paths, expected = [], []
    for kind in KINDS:
        model = upgraded(adapter, kind)
        paths.append(adapter.save(model, tmp_path / kind / "best_model"))
        assert adapter.recognises_file(paths[-1])
        expected.append(adapter.predict(model, frames))
    result = subprocess.run(
        [PYTHON, "-c", FRESH_PROCESS, str(TEST), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for line, want in zip(result.stdout.strip().splitlines()[-len(paths) :], expected, strict=True):
        got = json.loads(line)
        assert got["type"] == "NeuralNetworkPotential"
        assert np.abs(np.array(got["energy"]) - want.energy.numpy()).max() < 1e-12
        assert np.abs(np.array(got["forces"]) - want.forces.numpy()).max() < 1e-12
        assert abs(got["spk_energy"] - want.energy[0].item()) < 1e-9
        assert np.abs(np.array(got["spk_forces"]) - want.forces[:27].numpy()).max() < 1e-9


def test_ase_molecular_dynamics_stays_finite(adapter, frames):
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    model = upgraded(adapter, "painn")
    atoms = frames[0].copy()
    atoms.calc = adapter.ase_calculator(model)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    energies = []
    start = time.perf_counter()
    for _ in range(20):
        dynamics.run(1)
        energies.append(atoms.get_total_energy())
    print(f"20 ASE MD steps: {(time.perf_counter() - start) / 20 * 1e3:.1f} ms/step")
    assert np.isfinite(atoms.positions).all() and np.isfinite(energies).all()
    assert np.ptp(energies) < 0.5  # NVE at 0.5 fs conserves the total energy of a smooth potential


@pytest.mark.parametrize("kind", KINDS)
def test_torchsim_agrees_with_ase(adapter, frames, kind):
    import torch_sim as ts

    model = upgraded(adapter, kind)
    ts_model = adapter.torchsim_model(model)
    state = ts.io.atoms_to_state(frames, torch.device("cpu"), torch.float64)
    out = ts_model(state)
    calculator = adapter.ase_calculator(model)
    start = 0
    for index, atoms in enumerate(frames):
        atoms = atoms.copy()
        atoms.calc = calculator
        assert abs(out["energy"][index].item() - atoms.get_potential_energy()) < 1e-9
        reference = torch.as_tensor(atoms.get_forces())
        assert (out["forces"][start : start + len(atoms)] - reference).abs().max() < 1e-9
        start += len(atoms)
    assert not out["energy"].requires_grad and not out["forces"].requires_grad


def _all_carbon(state):
    state.atomic_numbers = torch.full_like(state.atomic_numbers, 6)
    return state


def test_torchsim_validate_model_outputs(adapter):
    from torch_sim.models.interface import validate_model_outputs

    plain = adapter.torchsim_model(tiny_schnetpack("painn"))
    validate_model_outputs(plain, torch.device("cpu"), torch.float64, check_detached=True)
    # The validator's crystals are periodic: the block then needs a finite global radius r_g.
    periodic = upgraded(adapter, "painn", GGNDConfig(channels=8, heads=2, steps=2, r_g=4.5))
    ts_model = adapter.torchsim_model(periodic)
    validate_model_outputs(
        ts_model, torch.device("cpu"), torch.float64, check_detached=True, state_modifier=_all_carbon
    )


def test_torchsim_model_takes_a_device_with_or_without_its_index(adapter):
    """A CPU model lives on "cpu:0", as a model on a one-GPU machine's "cuda" lives on "cuda:0" (torch.device
    equality says neither); another device type is refused, naming both."""
    model = tiny_schnetpack("painn")
    assert adapter.torchsim_model(model, device="cpu:0").device == torch.device("cpu")
    with pytest.raises(GGNDError, match="lives on cpu, not on meta"):
        adapter.torchsim_model(model, device="meta")


def test_torchsim_stress_is_the_strain_derivative(adapter):
    """stress = (1/V) dE/d(strain), checked by finite differences of a strained periodic cell."""
    import torch_sim as ts
    from ase.build import bulk

    model = upgraded(adapter, "painn", GGNDConfig(channels=8, heads=2, steps=2, r_g=4.5))
    ts_model = adapter.torchsim_model(model)
    ts_model.compute_stress = True
    crystal = bulk("C", "diamond", a=3.6, cubic=True)
    crystal.rattle(0.05, seed=1)
    stress = ts_model(ts.io.atoms_to_state([crystal], "cpu", torch.float64))["stress"][0]
    h, volume = 1e-5, crystal.get_volume()
    worst = 0.0
    for i, j in [(0, 0), (1, 2), (2, 1), (2, 2)]:
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * h
            deformed = crystal.copy()
            deformed.set_cell(crystal.cell.array @ strain, scale_atoms=True)
            energies.append(ts_model(ts.io.atoms_to_state([deformed], "cpu", torch.float64))["energy"].item())
        numeric = (energies[0] - energies[1]) / (2 * h) / volume
        worst = max(worst, abs(numeric - stress[i, j].item()))
    print(f"stress finite-difference error {worst:.3g} eV/Å^3")
    assert worst < 1e-7


def test_units_are_converted_like_spkcalculator(adapter, frames, tmp_path):
    """A kcal/mol model: predict() and TorchSim give eV, matching SpkCalculator's own conversion."""
    import torch_sim as ts
    from schnetpack.interfaces import SpkCalculator
    from schnetpack.transform import MatScipyNeighborList

    model = tiny_schnetpack("schnet")
    raw = adapter.predict(model, frames[:1])  # recorded as eV: the raw numbers
    adapter.set_units(model, "kcal/mol", "Ang")
    converted = adapter.predict(model, frames[:1])
    kcal = 4.184e3 / 6.02214076e23 / 1.602176634e-19
    assert converted.energy.item() == pytest.approx(raw.energy.item() * kcal, rel=1e-6)
    atoms = frames[0].copy()
    atoms.calc = SpkCalculator(
        adapter.save(model, tmp_path / "model").as_posix(),
        neighbor_list=MatScipyNeighborList(cutoff=CUTOFF),
        dtype=torch.float64,
    )  # its default energy unit is kcal/mol
    assert atoms.get_potential_energy() == pytest.approx(converted.energy.item(), abs=1e-9)
    ts_out = adapter.torchsim_model(model)(ts.io.atoms_to_state(frames[:1], "cpu", torch.float64))
    assert ts_out["energy"].item() == pytest.approx(converted.energy.item(), abs=1e-9)
    assert (ts_out["forces"] - converted.forces).abs().max() < 1e-9


def test_float32_model_under_a_float64_default(adapter, frames):
    """spktrain writes float32 models; predict, ASE and TorchSim run them whatever torch's default."""
    import torch_sim as ts

    assert torch.get_default_dtype() == torch.float64
    torch.manual_seed(3)
    model = perturb(adapter, adapter.attach(tiny_schnetpack("painn", dtype=torch.float32), CONFIG))
    prediction = adapter.predict(model, frames[:2])
    atoms = frames[0].copy()
    atoms.calc = adapter.ase_calculator(model)
    assert atoms.get_potential_energy() == pytest.approx(prediction.energy[0].item(), abs=1e-3)
    assert np.abs(atoms.get_forces() - prediction.forces[:27].numpy()).max() < 1e-4
    out = adapter.torchsim_model(model)(ts.io.atoms_to_state(frames[:2], "cpu", torch.float64))
    assert out["energy"].dtype == torch.float64
    assert (out["forces"] - prediction.forces.double()).abs().max() < 1e-4


def test_clear_errors(adapter, frames, tmp_path):
    model = tiny_schnetpack("painn")
    del model.ggnd_atomic_numbers
    with pytest.raises(GGNDError, match="GGND_SCHNETPACK_ELEMENTS"):
        adapter.attach(model, CONFIG)
    # A GGND model refuses elements it was not built for, naming them.
    up = adapter.attach(SchNetPackAdapter.set_elements(tiny_schnetpack("painn"), [1, 6, 8]), CONFIG)
    with pytest.raises(GGNDError, match="contains N"):
        adapter.predict(up, frames[:1])
    with pytest.raises(GGNDError, match="contains N"):
        adapter.check_structures(up, frames[:1], "test_300K.xyz")
    # Periodic input without a global radius.
    from ase.build import bulk

    with pytest.raises(GGNDError, match="r_g"):
        adapter.predict(up, [bulk("C", "diamond", a=3.6)])
    # Files that are not SchNetPack models.
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, other)
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    assert not adapter.recognises_file(other) and not adapter.recognises_file(text)
    with pytest.raises(GGNDError, match="not a SchNetPack model file"):
        adapter.load(other)
    with pytest.raises(GGNDError, match="already has a GGND"):
        adapter.attach(up, CONFIG)


def test_elements_from_environment(adapter, tmp_path, monkeypatch):
    model = tiny_schnetpack("painn")
    del model.ggnd_atomic_numbers, model.ggnd_units
    path = adapter.save(model, tmp_path / "best_model")
    monkeypatch.setenv("GGND_SCHNETPACK_ELEMENTS", "H, C,N,8")
    monkeypatch.setenv("GGND_SCHNETPACK_UNITS", "kcal/mol,Ang")
    loaded = adapter.load(path)
    assert adapter.atomic_numbers(loaded) == [1, 6, 7, 8]
    assert adapter.units(loaded) == ("kcal/mol", "Ang")


# --------------------------------------------------------------------------------------------------
# spktrain with the config groups found through the hydra search-path plugin
# --------------------------------------------------------------------------------------------------
TINY = [
    "data.num_train=6",
    "data.num_val=2",
    "data.num_test=2",
    "data.batch_size=3",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "model.representation.n_atom_basis=8",
    "model.representation.n_interactions=1",
    "logger=csv",
    "callbacks.early_stopping.patience=1",
    "+seed=0",
]


def _spktrain(cwd: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [str(Path(PYTHON).parent / "spktrain"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _compose(*overrides: str):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module("schnetpack.configs", version_base="1.2"):
        return compose("train", overrides=list(overrides))


def test_config_groups_compose_with_schnetpack_experiments():
    """Hydra finds our groups through the plugin; `+ggnd=painn` adds GGND to an upstream experiment."""
    from hydra.core.plugins import Plugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    plugins = [p.__name__ for p in Plugins.instance().discover(SearchPathPlugin)]
    assert "GGNDSchNetPackSearchPath" in plugins
    config = _compose("experiment=rmd17", "+ggnd=painn", "globals.ggnd_atomic_numbers=[1,6,8]")
    targets = [m["_target_"] for m in config.model.output_modules]
    assert targets == [
        "schnetpack.atomistic.Atomwise",
        "ggnd_plugin.adapters.schnetpack.GGNDEnergy",
        "schnetpack.atomistic.Forces",
    ]
    ggnd = config.model.output_modules[1]
    assert (
        ggnd.vector_representation
        and ggnd.energy_unit == "kcal/mol"
        and list(ggnd.atomic_numbers) == [1, 6, 8]
    )
    from omegaconf.errors import OmegaConfBaseException

    with pytest.raises(OmegaConfBaseException, match="ggnd_atomic_numbers"):
        list(_compose("experiment=rmd17", "+ggnd=painn").model.output_modules[1].atomic_numbers)
    schnet = _compose("experiment=ggnd_schnet_3bpa", "data.datapath=/nonexistent.db")
    assert schnet.model.representation._target_ == "schnetpack.representation.SchNet"
    assert not schnet.model.output_modules[1].vector_representation


def test_hydra_instantiates_the_ggnd_model():
    """The composed ggnd_painn_3bpa model is a NeuralNetworkPotential the adapter recognises."""
    import hydra

    config = _compose(
        "experiment=ggnd_painn_3bpa",
        "data.datapath=/nonexistent.db",
        "model.representation.n_atom_basis=8",
        "model.representation.n_interactions=1",
        "globals.ggnd.channels=4",
        "globals.ggnd.heads=2",
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = hydra.utils.instantiate(config.model)
    finally:
        torch.set_default_dtype(previous)
    adapter = SchNetPackAdapter()
    assert adapter.recognises_model(model) and len(adapter.ggnd_blocks(model)) == 1
    assert adapter.atomic_numbers(model) == ELEMENTS and adapter.units(model) == ("eV", "Ang")
    assert adapter.ggnd_blocks(model)[0].config.channels == 4
    assert set(model.required_derivatives) == {"_positions"}


@pytest.fixture
def database(tmp_path, capsys):
    from ggnd_plugin.adapters.schnetpack.database import main

    db = tmp_path / "3bpa.db"
    assert main([str(TRAIN), str(db), "--index", ":10"]) == 0
    assert "wrote 10 frames" in capsys.readouterr().out
    assert main([str(TRAIN), str(db)]) == 2  # refuses to overwrite silently
    from ase.db import connect

    with connect(db) as connection:
        assert len(connection) == 10
        assert connection.metadata["_property_unit_dict"] == {"energy": "eV", "forces": "eV/Ang"}
        row = connection.get(3)
    reference = read_labelled(TRAIN, "2")[0]
    assert row.data["energy"][0] == reference.info["energy"]
    assert np.array_equal(row.data["forces"], reference.arrays["forces"])
    assert np.array_equal(row.positions, reference.positions)
    return db


@pytest.mark.slow
def test_spktrain_ggnd_experiment_end_to_end(adapter, database, tmp_path):
    start = time.perf_counter()
    result = _spktrain(
        tmp_path,
        "experiment=ggnd_painn_3bpa",
        f"data.datapath={database}",
        "globals.ggnd.channels=4",
        "globals.ggnd.heads=2",
        "run.id=ggnd",
        *TINY,
    )
    elapsed = time.perf_counter() - start
    print(f"spktrain experiment=ggnd_painn_3bpa, 1 epoch on 6 frames: {elapsed:.1f} s")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    best = tmp_path / "runs" / "ggnd" / "best_model"
    assert adapter.recognises_file(best)
    model = adapter.load(best)
    assert adapter.ggnd_blocks(model)
    assert adapter.atomic_numbers(model) == ELEMENTS and adapter.units(model) == ("eV", "Ang")
    assert run_metadata(best)["atomic_numbers"] == ELEMENTS
    frames = read_labelled(TRAIN, ":2")
    prediction = adapter.predict(model, frames)
    assert torch.isfinite(prediction.energy).all() and torch.isfinite(prediction.forces).all()
    # SchNetPack's own calculator on the file agrees (float32 model; SpkCalculator casts the float64
    # AddOffsets mean to float32: float32 rounding of a total energy).
    from schnetpack.interfaces import SpkCalculator
    from schnetpack.transform import MatScipyNeighborList

    atoms = frames[1].copy()
    atoms.calc = SpkCalculator(str(best), neighbor_list=MatScipyNeighborList(cutoff=5.0), energy_unit="eV")
    with schnetpack_module.default_dtype(torch.float32):
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    assert abs(energy - prediction.energy[1].item()) < 5e-3
    assert np.abs(forces - prediction.forces[27:].numpy()).max() < 1e-4


@pytest.mark.slow
def test_spktrain_plain_model_then_ggnd_upgrade_cli(adapter, database, tmp_path):
    result = _spktrain(tmp_path, "experiment=painn_3bpa", f"data.datapath={database}", "run.id=plain", *TINY)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    best = tmp_path / "runs" / "plain" / "best_model"
    out = tmp_path / "upgraded_model"
    cli = subprocess.run(
        [str(Path(PYTHON).parent / "ggnd"), "upgrade", str(best), "-o", str(out), "--host", "schnetpack"],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stdout + cli.stderr
    plain, up = adapter.load(best), adapter.load(out)
    # Elements and units came from the run's config.yaml and database, and are kept in the upgrade.
    assert adapter.atomic_numbers(plain) == ELEMENTS and adapter.units(plain) == ("eV", "Ang")
    assert adapter.ggnd_blocks(up) and adapter.atomic_numbers(up) == ELEMENTS
    frames = read(TEST, ":2")
    a, b = adapter.predict(plain, frames), adapter.predict(up, frames)
    assert (a.energy - b.energy).abs().max() == 0 and (a.forces - b.forces).abs().max() == 0
