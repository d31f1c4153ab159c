"""The MACE adapter: a tiny random ScaleShiftMACE (float64) on 3BPA frames, with and without GGND."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mace")

from ase import Atoms  # noqa: E402
from ase.io import read, write  # noqa: E402

from ggnd_plugin import testing  # noqa: E402
from ggnd_plugin.adapters.mace import GGNDMACE, MACEAdapter, sniff_model_file  # noqa: E402
from ggnd_plugin.adapters.validate import validate_adapter  # noqa: E402
from ggnd_plugin.block import GGNDConfig  # noqa: E402
from ggnd_plugin.default_data import default_data_path  # noqa: E402
from ggnd_plugin.errors import GGNDError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data"
E3NN044_MODEL = FIXTURES / "mace_e3nn044.model"
E3NN044_PREDICTIONS = FIXTURES / "mace_e3nn044_predictions.json"
ELEMENTS = list(testing.ELEMENTS)
CONFIG = GGNDConfig(channels=8, heads=2, steps=2)
PERIODIC_CONFIG = GGNDConfig(channels=8, heads=2, steps=2, r_g=5.0)


def perturbed(model: GGNDMACE, seed: int = 1) -> GGNDMACE:
    """A copy whose GGND fusion readout is non-zero, so the block changes energies and forces."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (model.ggnd.readout_state, model.ggnd.readout_host):
            layer.weight.copy_(0.3 * torch.randn(layer.weight.shape, generator=generator))
    return model


def periodic_cell(seed: int = 3) -> Atoms:
    """A small periodic H/C/N/O cell: images within the cutoffs of both MACE and GGND."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3) * 2.1
    positions = grid + 0.25 * rng.standard_normal(grid.shape)
    numbers = np.array([6, 1, 7, 8, 1, 6, 8, 1])
    return Atoms(numbers=numbers, positions=positions, cell=np.diag([4.2, 4.3, 4.1]) + 0.2, pbc=True)


def random_rotation(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


@pytest.fixture(scope="module")
def adapter():
    return MACEAdapter()


@pytest.fixture(scope="module")
def host():
    return testing.tiny_mace()


@pytest.fixture(scope="module")
def frames():
    from ggnd_plugin.data import read_labelled

    return read_labelled(default_data_path("3bpa_300K_test"), index=":3")


@pytest.fixture(scope="module")
def upgraded(adapter, host):
    torch.manual_seed(0)
    return adapter.attach(host, CONFIG)


def _outputs(model, adapter, structures, **flags):
    data = adapter.to_batch(model, structures)
    out = model(data, **flags)
    return {key: value.detach() for key, value in out.items() if isinstance(value, torch.Tensor)}


# ------------------------------------------------------------------------------------------------
# Contract and exactness of the upgrade
# ------------------------------------------------------------------------------------------------
def test_validate_adapter(adapter, host, frames, tmp_path):
    torch.manual_seed(0)
    upgraded = validate_adapter(adapter, host, frames[:2], tmp_path, CONFIG, atol=1e-10)
    assert isinstance(upgraded, GGNDMACE)
    assert adapter.feature_spec(host).fields == (("node_feats", "8x0e+8x1o+8x0e"),)
    assert adapter.cutoff(upgraded) == 4.0
    assert adapter.atomic_numbers(upgraded) == ELEMENTS
    assert adapter.atomic_energies(upgraded) == {1: -13.6, 6: -1029.5, 7: -1485.0, 8: -2042.0}
    # MACE's own attributes stay reachable through the wrapper
    assert int(upgraded.num_interactions) == 2 and upgraded.heads == ["Default"]
    assert upgraded.atomic_energies_fn is upgraded.host.atomic_energies_fn


def test_ablation_variants_attach_and_the_local_one_uses_the_mace_cutoff(adapter, host, frames):
    """Paper table 3's variants: 'local' diffuses within MACE's r_max (filled in), 'mp' is one layer."""
    from ggnd_plugin.block import GGNDConfig as Config

    local = adapter.attach(host, Config(channels=8, heads=2, steps=2, variant="local"))
    assert local.ggnd.config.local_cutoff == pytest.approx(float(host.r_max))
    assert local.ggnd.config.pair_radius == pytest.approx(float(host.r_max))
    explicit = adapter.attach(host, Config(channels=8, heads=2, steps=2, variant="local", local_cutoff=3.0))
    assert explicit.ggnd.config.local_cutoff == 3.0
    for model in (local, adapter.attach(host, Config(channels=8, heads=2, steps=2, variant="mp"))):
        before, after = _outputs(host, adapter, frames), _outputs(model, adapter, frames)
        for key in ("energy", "forces"):
            assert torch.equal(before[key], after[key])  # zero-initialised fusion: the host, exactly


def test_zero_init_reproduces_host_exactly(adapter, host, upgraded, frames):
    molecule = (_outputs(host, adapter, frames), _outputs(upgraded, adapter, frames))
    cell = [periodic_cell()]
    periodic_upgraded = adapter.attach(host, PERIODIC_CONFIG)
    crystal = (
        _outputs(host, adapter, cell, compute_stress=True),
        _outputs(periodic_upgraded, adapter, cell, compute_stress=True),
    )
    for before, after in (molecule, crystal):
        de = (before["energy"] - after["energy"]).abs().max().item()
        df = (before["forces"] - after["forces"]).abs().max().item()
        assert de == 0.0 and df == 0.0, (de, df)
    ds = (crystal[0]["stress"] - crystal[1]["stress"]).abs().max().item()
    assert ds == 0.0 and crystal[0]["stress"].abs().max() > 0
    print(f"zero-init upgrade: max |dE| = {de:.3g} eV, max |dF| = {df:.3g} eV/Å, max |dstress| = {ds:.3g}")


# ------------------------------------------------------------------------------------------------
# Physics of the upgraded model with a non-zero GGND term
# ------------------------------------------------------------------------------------------------
def test_rotation_invariance_and_equivariance(adapter, host, upgraded, frames):
    model = perturbed(upgraded)
    reference = adapter.predict(model, frames)
    plain = adapter.predict(host, frames)
    assert (reference.energy - plain.energy).abs().min() > 1e-3, "the GGND term should change energies"
    rotation = random_rotation(7)
    rotated = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.positions = atoms.positions @ rotation.T + np.array([0.3, -1.2, 2.0])
        rotated.append(atoms)
    moved = adapter.predict(model, rotated)
    de = (moved.energy - reference.energy).abs().max().item()
    df = (moved.forces - reference.forces @ torch.as_tensor(rotation).T).abs().max().item()
    print(f"rotation + translation: max |dE| = {de:.3g} eV, max |dF| = {df:.3g} eV/Å")
    assert de < 1e-9 and df < 1e-9


def test_forces_match_finite_differences(adapter, upgraded, frames):
    model = perturbed(upgraded)
    atoms = frames[0].copy()
    forces = adapter.predict(model, [atoms]).forces
    h = 1e-4
    for atom, axis in ((0, 0), (5, 1), (13, 2), (26, 0)):
        energies = []
        for sign in (1, -1):
            shifted = atoms.copy()
            shifted.positions[atom, axis] += sign * h
            energies.append(_outputs(model, adapter, [shifted], compute_force=False)["energy"].item())
        numeric = -(energies[0] - energies[1]) / (2 * h)
        assert abs(numeric - forces[atom, axis].item()) < 1e-6, (atom, axis, numeric, forces[atom, axis])


def test_periodic_stress_matches_finite_strain(adapter, host):
    """Stress flows through the strained cell of the GGND pair table: compare with dE/dstrain / V."""
    model = perturbed(adapter.attach(host, PERIODIC_CONFIG))
    atoms = periodic_cell()
    stress = _outputs(model, adapter, [atoms], compute_stress=True)["stress"][0]
    volume = atoms.get_volume()
    h = 1e-5
    for i, j in ((0, 0), (1, 2), (2, 2)):
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * h / (2 if i != j else 1)
            strain[j, i] += sign * h / 2 if i != j else 0.0
            strained = atoms.copy()
            strained.set_cell(atoms.cell[:] @ strain, scale_atoms=True)
            energies.append(_outputs(model, adapter, [strained], compute_force=False)["energy"].item())
        numeric = (energies[0] - energies[1]) / (2 * h) / volume
        assert abs(numeric - stress[i, j].item()) < 1e-7, (i, j, numeric, stress[i, j].item())


def test_training_steps_lower_the_loss_and_train_ggnd(adapter, upgraded, frames):
    model = copy.deepcopy(upgraded).train()
    initial = {name: p.detach().clone() for name, p in model.ggnd.named_parameters()}
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    energy = torch.tensor([a.info["energy"] for a in frames])
    forces = torch.cat([torch.as_tensor(a.arrays["forces"]) for a in frames])

    def loss_value():
        prediction = adapter.predict(model, frames, training=True)
        assert prediction.forces.requires_grad, "training=True must keep forces differentiable"
        return ((prediction.energy - energy) / 27).pow(2).mean() + (prediction.forces - forces).pow(2).mean()

    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = loss_value()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    changed = [name for name, p in model.ggnd.named_parameters() if not torch.equal(p, initial[name])]
    assert "readout_state.weight" in changed and "readout_host.weight" in changed, changed


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
RELOAD_SCRIPT = """
import json, sys
from ase.io import read
from ggnd_plugin.adapters.mace import MACEAdapter
adapter = MACEAdapter()
model = adapter.load(sys.argv[1])
prediction = adapter.predict(model, read(sys.argv[2], ":"))
print(json.dumps({"type": type(model).__name__, "energy": prediction.energy.tolist(),
                  "forces": prediction.forces.tolist()}))
"""


def test_save_and_reload_in_a_fresh_process(adapter, upgraded, frames, tmp_path):
    model = perturbed(upgraded)
    path = adapter.save(model, tmp_path / "upgraded.model")
    assert sniff_model_file(path) == "ggnd" and adapter.recognises_file(path)
    write(tmp_path / "frames.xyz", frames)
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(path), str(tmp_path / "frames.xyz")],
        capture_output=True,
        text=True,
        check=True,
    )
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    here = adapter.predict(model, read(tmp_path / "frames.xyz", ":"))
    assert reloaded["type"] == "GGNDMACE"
    assert np.abs(np.array(reloaded["energy"]) - here.energy.numpy()).max() < 1e-10
    assert np.abs(np.array(reloaded["forces"]) - here.forces.numpy()).max() < 1e-10


def test_host_files_are_recognised_and_upgraded_by_the_cli(adapter, host, frames, tmp_path):
    from ggnd_plugin.cli import main
    from ggnd_plugin.registry import detect_file

    torch.save(host, tmp_path / "host.model")  # exactly what mace_run_train writes
    assert sniff_model_file(tmp_path / "host.model") == "plain"
    assert detect_file(tmp_path / "host.model").name == "mace"
    assert main(["upgrade", str(tmp_path / "host.model"), "-o", str(tmp_path / "up.model")]) == 0
    upgraded = adapter.load(tmp_path / "up.model")
    assert adapter.ggnd_blocks(upgraded)
    before, after = adapter.predict(host, frames), adapter.predict(upgraded, frames)
    assert torch.equal(before.energy, after.energy) and torch.equal(before.forces, after.forces)


def test_foreign_and_broken_files_give_clear_errors(adapter, host, tmp_path):
    from e3nn.util import jit

    from ggnd_plugin.registry import detect_file

    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a model" * 10)
    other = tmp_path / "other.model"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 3)), other)
    weights = tmp_path / "weights.model"
    torch.save(host.state_dict(), weights)
    compiled = tmp_path / "host_compiled.model"
    torch.jit.save(jit.compile(copy.deepcopy(host)), compiled)
    for path, message in (
        (garbage, "not a MACE model file"),
        (other, "not a MACE model file"),
        (weights, "not a MACE model file"),
        (compiled, "TorchScript-compiled"),
        (tmp_path / "missing.model", "no such file"),
    ):
        with pytest.raises(GGNDError, match=message):
            adapter.load(path)
        assert not adapter.recognises_file(path)
    with pytest.raises(GGNDError, match="not a model file of any known host"):
        detect_file(garbage)


def test_legacy_e3nn_file_converts_exactly(adapter):
    """A model pickled under e3nn 0.4.4 (tests/data/make_e3nn044_mace.py) predicts what it did there."""
    if not E3NN044_MODEL.exists():
        pytest.fail(f"fixture {E3NN044_MODEL} is missing; regenerate it with tests/data/make_e3nn044_mace.py")
    import e3nn
    from mace.tools.scripts_utils import extract_config_mace_model

    stored = json.loads(E3NN044_PREDICTIONS.read_text())
    assert stored["versions"]["e3nn"] == "0.4.4" and e3nn.__version__.startswith("0.6")
    with pytest.raises(ValueError):  # the reason for the conversion: e3nn 0.6 cannot unpickle it
        torch.load(E3NN044_MODEL, weights_only=False)
    model = adapter.load(E3NN044_MODEL)
    assert extract_config_mace_model(model)["atomic_numbers"].tolist() == stored["atomic_numbers"]
    frames = read(default_data_path(stored["frames"]["file"]), stored["frames"]["index"])
    prediction = adapter.predict(model, frames)
    de = np.abs(prediction.energy.numpy() - np.array(stored["energy"])).max()
    df = np.abs(prediction.forces.numpy() - np.concatenate(stored["forces"])).max()
    print(f"e3nn 0.4.4 -> 0.6 conversion: max |dE| = {de:.3g} eV, max |dF| = {df:.3g} eV/Å")
    assert de < 1e-10 and df < 1e-10
    # and the converted model upgrades like any other
    upgraded = adapter.attach(model, CONFIG)
    assert torch.equal(adapter.predict(upgraded, frames).energy, prediction.energy)


# ------------------------------------------------------------------------------------------------
# MACE's own calculator and TorchSim wrapper
# ------------------------------------------------------------------------------------------------
def test_ase_md_with_mace_calculator_stays_finite(adapter, upgraded, frames):
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet
    from mace.calculators import MACECalculator

    model = perturbed(upgraded)
    calculator = adapter.ase_calculator(model)
    assert isinstance(calculator, MACECalculator)
    assert all(p.requires_grad for p in model.parameters()), (
        "the calculator must not freeze the caller's model"
    )
    atoms = frames[0].copy()
    atoms.calc = calculator
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    energies = []
    dynamics.attach(lambda: energies.append(atoms.get_total_energy()), interval=1)
    dynamics.run(20)
    assert len(energies) == 21 and np.isfinite(energies).all() and np.isfinite(atoms.positions).all()
    assert np.ptp(energies) < 0.1, "NVE total energy should be conserved over 20 short steps"


def test_torchsim_and_ase_agree(adapter, upgraded, frames):
    import torch_sim as ts

    model = perturbed(upgraded)
    torchsim = adapter.torchsim_model(model)
    state = ts.io.atoms_to_state(frames, torch.device("cpu"), torch.float64)
    out = torchsim(state)
    calculator = adapter.ase_calculator(model)
    start = 0
    for index, atoms in enumerate(frames):
        atoms = atoms.copy()
        atoms.calc = calculator
        assert abs(out["energy"][index].item() - atoms.get_potential_energy()) < 1e-9
        stop = start + len(atoms)
        assert np.abs(out["forces"][start:stop].numpy() - atoms.get_forces()).max() < 1e-9
        start = stop


def test_torchsim_validate_model_outputs(adapter, host):
    from torch_sim.models.interface import validate_model_outputs

    model = perturbed(adapter.attach(host, PERIODIC_CONFIG))
    torchsim = adapter.torchsim_model(model)

    def known_elements(state):  # the validator's Si, Mg, Fe, ... become elements the model knows
        state.atomic_numbers = torch.tensor(
            [
                int(z) if int(z) in ELEMENTS else ELEMENTS[int(z) % len(ELEMENTS)]
                for z in state.atomic_numbers
            ],
            device=state.device,
        )
        return state

    validate_model_outputs(torchsim, torch.device("cpu"), torch.float64, state_modifier=known_elements)


# ------------------------------------------------------------------------------------------------
# Training through mace_run_train
# ------------------------------------------------------------------------------------------------
def test_optimizer_patch_targets_still_exist(monkeypatch):
    from mace.cli import run_train

    from ggnd_plugin.adapters.mace.training import check_patch_targets

    check_patch_targets()  # mace-torch as installed
    monkeypatch.delattr(run_train, "get_params_options")
    with pytest.raises(GGNDError, match="no longer uses 'get_params_options'"):
        check_patch_targets()


def test_optimizer_groups_include_ggnd(adapter, upgraded):
    """MACE's own groups leave the block out; the patched groups hold every GGND parameter once."""
    from mace.tools import build_default_arg_parser
    from mace.tools.scripts_utils import get_params_options

    from ggnd_plugin.adapters.mace.training import with_ggnd_group

    args = build_default_arg_parser().parse_args(["--name", "x", "--train_file", "x.xyz", "--lr", "0.02"])
    options = get_params_options(args, upgraded)
    in_mace_groups = {id(p) for group in options["params"] for p in group["params"]}
    ggnd_ids = {id(p) for p in upgraded.ggnd.parameters()}
    assert not ggnd_ids & in_mace_groups, "MACE's own optimizer groups now include GGND: revisit the patch"
    patched = with_ggnd_group(get_params_options(args, upgraded), args, upgraded, lr_factor=0.5)
    group = next(g for g in patched["params"] if g["name"] == "ggnd")
    assert {id(p) for p in group["params"]} == ggnd_ids and group["lr"] == pytest.approx(0.01)
    optimizer = torch.optim.Adam(**patched)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(upgraded.parameters()))


def test_ggnd_options_parse_into_a_config(tmp_path):
    from ggnd_plugin.adapters.mace.training import build_parser, split_ggnd_arguments

    base = ["--name", "x", "--train_file", "t.xyz"]
    file = tmp_path / "ggnd.yaml"
    file.write_text("channels: 12\nheads: 3\nsteps: 4\n")
    args = build_parser().parse_args(
        [*base, "--ggnd_config", str(file), "--ggnd_steps", "2", "--ggnd_r_g", "9"]
    )
    args, config, _ = split_ggnd_arguments(args)
    assert (config.channels, config.heads, config.steps, config.r_g) == (12, 3, 2, 9.0)
    assert not any(key.startswith("ggnd") for key in vars(args))
    _, config, _ = split_ggnd_arguments(build_parser().parse_args(base))
    assert config is None
    with pytest.raises(GGNDError, match="without --ggnd"):
        split_ggnd_arguments(build_parser().parse_args([*base, "--ggnd_channels", "4"]))
    with pytest.raises(GGNDError, match="heads"):
        split_ggnd_arguments(build_parser().parse_args([*base, "--ggnd", "--ggnd_channels", "5"]))


def test_fit_command_parses_back_with_device_and_variant(tmp_path):
    """The command MACEAdapter.fit runs is accepted by ggnd-mace-train's own parser, options intact."""
    from ggnd_plugin.adapters.host_trainer import FitRequest
    from ggnd_plugin.adapters.mace.training import build_parser, fit_command, split_ggnd_arguments

    config = GGNDConfig(channels=8, heads=2, steps=2, variant="mp")
    train, valid, work = tmp_path / "t.xyz", tmp_path / "v.xyz", tmp_path / "run"
    command, model_path = fit_command(FitRequest(train, valid, work, config, 7, 3, "tiny", device="cuda"))
    assert command[1:3] == ["-m", "ggnd_plugin.adapters.mace.training"]
    args, parsed, _ = split_ggnd_arguments(build_parser().parse_args(command[3:]))
    assert (args.device, args.max_num_epochs, args.seed) == ("cuda", 7, 3)
    assert parsed == config and model_path == tmp_path / "run" / "mace-ggnd.model"
    plain, plain_path = fit_command(FitRequest(train, valid, work, None, 7, 3, "tiny"))
    args, parsed, _ = split_ggnd_arguments(build_parser().parse_args(plain[3:]))
    assert parsed is None and args.device == "cpu" and plain_path.name == "mace.model"


@pytest.mark.slow
def test_ggnd_mace_train_end_to_end(adapter, tmp_path):
    frames = read(default_data_path("3bpa_300K_train"), ":8")
    write(tmp_path / "train.xyz", frames[:6])
    write(tmp_path / "valid.xyz", frames[6:])
    command = [
        str(Path(sys.executable).parent / "ggnd-mace-train"),
        "--name", "tiny", "--seed", "1",
        "--train_file", str(tmp_path / "train.xyz"), "--valid_file", str(tmp_path / "valid.xyz"),
        "--work_dir", str(tmp_path / "run"),
        "--energy_key", "energy", "--forces_key", "forces", "--E0s", "average",
        "--model", "MACE", "--hidden_irreps", "8x0e+8x1o", "--r_max", "4.0", "--num_interactions", "2",
        "--max_L", "1", "--correlation", "2", "--MLP_irreps", "4x0e",
        "--batch_size", "3", "--max_num_epochs", "2", "--device", "cpu", "--default_dtype", "float64",
        "--ggnd", "--ggnd_channels", "8", "--ggnd_heads", "2", "--ggnd_steps", "2",
    ]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    print(f"ggnd-mace-train (6 frames, 2 epochs): {time.perf_counter() - started:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "GGND block added" in log and "Param group 5: lr" in log  # MACE's 5 groups + ours
    model = adapter.load(tmp_path / "run" / "tiny.model")
    block = adapter.ggnd_blocks(model)[0]
    assert block.readout_state.weight.abs().max() > 0 and block.readout_host.weight.abs().max() > 0
    # MACE's TorchScript export must not write a compiled model that silently lacks the GGND term
    assert not (tmp_path / "run" / "tiny_compiled.model").exists()
    prediction = adapter.predict(model, frames[6:])
    assert torch.isfinite(prediction.energy).all() and torch.isfinite(prediction.forces).all()
