"""The NequIP adapter: a tiny random NequIP model (float64) on 3BPA frames, with and without GGND."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nequip")

from ase.io import read, write  # noqa: E402

from ggnd_plugin.adapters.nequip import NequIPAdapter  # noqa: E402
from ggnd_plugin.adapters.validate import validate_adapter  # noqa: E402
from ggnd_plugin.block import GGNDConfig  # noqa: E402
from ggnd_plugin.default_data import default_data_path  # noqa: E402
from ggnd_plugin.errors import GGNDError  # noqa: E402
from ggnd_plugin.testing import tiny_nequip  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = REPO / "tests" / "data" / "nequip_ggnd_train.yaml"
FINETUNE_CONFIG = REPO / "tests" / "data" / "nequip_ggnd_finetune.yaml"
BIN = Path(sys.executable).parent
CONFIG = GGNDConfig(channels=8, heads=2, steps=2)


@pytest.fixture(scope="module")
def adapter():
    return NequIPAdapter()


@pytest.fixture(scope="module")
def host():
    return tiny_nequip()


@pytest.fixture(scope="module")
def frames():
    return read(default_data_path("3bpa_300K_train"), ":3")


@pytest.fixture(scope="module")
def upgraded(adapter, host):
    torch.manual_seed(0)
    return adapter.attach(host, CONFIG)


@pytest.fixture(scope="module")
def perturbed(adapter, upgraded):
    """The upgraded model with non-zero GGND weights (readout included), so GGND contributes."""
    model = copy.deepcopy(upgraded)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in adapter.ggnd_parameters(model):
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    return model


def _rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return q * torch.sign(torch.linalg.det(q))


# --------------------------------------------------------------------------------------------------
def test_validate_adapter(adapter, host, frames, tmp_path):
    upgraded = validate_adapter(adapter, host, frames[:2], tmp_path, CONFIG, atol=1e-10)
    assert len(adapter.ggnd_blocks(upgraded)) == 1
    assert adapter.atomic_numbers(host) == [6, 1, 7, 8]
    assert adapter.cutoff(host) == 4.0
    assert adapter.atomic_energies(host)[1] == pytest.approx(-13.6)
    assert str(adapter.feature_spec(host).irreps) == "8x0e+8x1o"


def test_zero_init_reproduces_host_exactly(adapter, host, upgraded, frames):
    before = adapter.predict(host, frames)
    after = adapter.predict(upgraded, frames)
    de = (before.energy - after.energy).abs().max().item()
    df = (before.forces - after.forces).abs().max().item()
    print(f"zero init: max |dE| = {de:.3g} eV, max |dF| = {df:.3g} eV/A")
    assert de == 0.0 and df == 0.0


def test_ggnd_is_inserted_before_the_last_convnet_and_contributes(adapter, host, perturbed, frames):
    from ggnd_plugin.adapters.nequip.builders import energy_network

    names = [name for name, _ in energy_network(perturbed).named_children()]
    assert names.index("ggnd") == names.index("layer1_convnet") - 1
    assert names.index("ggnd_energy_sum") == names.index("total_energy_sum") - 1
    change = (adapter.predict(perturbed, frames).energy - adapter.predict(host, frames).energy).abs()
    assert change.min() > 1e-3  # the block is live once its weights are non-zero


def test_rotation_invariance_and_equivariance(adapter, perturbed, frames):
    atoms = frames[0]
    rotation = _rotation(3)
    rotated = atoms.copy()
    rotated.positions = (torch.as_tensor(atoms.positions) @ rotation.T).numpy()
    reference = adapter.predict(perturbed, [atoms])
    turned = adapter.predict(perturbed, [rotated])
    de = (reference.energy - turned.energy).abs().max().item()
    df = (reference.forces @ rotation.T - turned.forces).abs().max().item()
    print(f"rotation: |dE| = {de:.3g} eV, max |dF| = {df:.3g} eV/A")
    assert de < 1e-9 and df < 1e-9


def test_forces_are_minus_energy_gradient(adapter, perturbed, frames):
    atoms = frames[1]
    forces = adapter.predict(perturbed, [atoms]).forces
    h = 1e-4
    for atom, axis in [(0, 0), (5, 1), (20, 2)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += h
        minus.positions[atom, axis] -= h
        energies = adapter.predict(perturbed, [plus, minus]).energy
        numeric = -(energies[0] - energies[1]).item() / (2 * h)
        assert numeric == pytest.approx(forces[atom, axis].item(), abs=1e-6)


def test_batch_equals_single_frames(adapter, perturbed, frames):
    batch = adapter.predict(perturbed, frames)
    singles = [adapter.predict(perturbed, [atoms]) for atoms in frames]
    assert torch.allclose(batch.energy, torch.cat([s.energy for s in singles]), atol=1e-10)
    assert torch.allclose(batch.forces, torch.cat([s.forces for s in singles]), atol=1e-10)


def test_training_steps_lower_the_loss_and_move_ggnd(adapter, upgraded, frames):
    model = copy.deepcopy(upgraded)
    target_e = torch.tensor([a.get_potential_energy() for a in frames])
    target_f = torch.as_tensor(np.concatenate([a.get_forces() for a in frames]))
    start = [p.detach().clone() for p in adapter.ggnd_parameters(model)]
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        prediction = adapter.predict(model, frames, training=True)
        loss = ((prediction.energy - target_e) / 27).pow(2).mean() + (prediction.forces - target_f).pow(
            2
        ).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    moved = max(
        (p.detach() - s).abs().max().item()
        for p, s in zip(adapter.ggnd_parameters(model), start, strict=True)
    )
    assert moved > 1e-4
    readout = adapter.ggnd_blocks(model)[0].readout_state.weight
    assert readout.abs().max() > 0  # the zero-initialised fusion readout is trained too


def test_save_and_reload_in_a_fresh_process(adapter, perturbed, frames, tmp_path):
    path = adapter.save(perturbed, tmp_path / "ggnd.nequip.zip")
    xyz = tmp_path / "frames.xyz"
    write(xyz, frames[:2])
    script = (
        "import json, sys\n"
        "from ase.io import read\n"
        "from ggnd_plugin.adapters.nequip import NequIPAdapter\n"
        "adapter = NequIPAdapter()\n"
        "calc = adapter.ase_calculator(adapter.load(sys.argv[1]))\n"
        "out = []\n"
        "for atoms in read(sys.argv[2], ':'):\n"
        "    atoms.calc = calc\n"
        "    out.append([atoms.get_potential_energy(), atoms.get_forces().tolist()])\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path), str(xyz)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    reference = adapter.predict(perturbed, frames[:2])
    start = 0
    for index, (energy, forces) in enumerate(reloaded):
        assert energy == pytest.approx(reference.energy[index].item(), abs=1e-9)
        forces = torch.tensor(forces)
        assert (forces - reference.forces[start : start + len(forces)]).abs().max() < 1e-9
        start += len(forces)


def test_attach_save_and_load_leave_e3nn_defaults_alone(adapter, host, tmp_path):
    """nequip's scripting switch restores a legacy flag that moves e3nn's jit_mode to "script";
    other hosts' e3nn modules built afterwards (MACE) then fail to deep-copy or pickle."""
    import e3nn
    from e3nn import o3

    before = dict(e3nn.get_optimization_defaults())
    upgraded = adapter.attach(host, GGNDConfig(channels=4, heads=2, steps=1))
    path = adapter.save(upgraded, tmp_path / "kept.nequip.zip")
    adapter.load(path)
    assert e3nn.get_optimization_defaults() == before
    copy.deepcopy(o3.Linear("2x0e+2x1o", "2x0e+2x1o"))  # a scripted module would raise PickleError


def test_bad_files_give_clear_errors(adapter, host, tmp_path):
    with pytest.raises(GGNDError, match="no such file"):
        adapter.load(tmp_path / "missing.nequip.zip")
    (tmp_path / "m.nequip.pt2").write_text("")
    with pytest.raises(GGNDError, match="inference-only"):
        adapter.load(tmp_path / "m.nequip.pt2")
    with pytest.raises(GGNDError, match=".nequip.zip"):
        adapter.save(host, tmp_path / "model.pt")
    with pytest.raises(GGNDError, match="already has a GGND block"):
        adapter.attach(adapter.attach(host, CONFIG), CONFIG)


def test_unknown_element_is_refused(adapter, host, frames):
    atoms = frames[0].copy()
    atoms.numbers[0] = 16
    with pytest.raises(GGNDError, match="S"):
        adapter.predict(host, [atoms])


def test_ase_md_stays_finite(adapter, perturbed, frames):
    from ase import units
    from ase.md.verlet import VelocityVerlet

    atoms = frames[0].copy()
    atoms.calc = adapter.ase_calculator(perturbed)
    dynamics = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    dynamics.run(20)
    assert np.isfinite(atoms.positions).all()
    assert np.isfinite(atoms.get_forces()).all()
    assert np.isfinite(atoms.get_potential_energy())


def test_torchsim_agrees_with_ase_and_validates(adapter, perturbed, frames):
    import torch_sim as ts
    from ase.build import bulk
    from torch_sim.models.interface import validate_model_outputs

    model = adapter.torchsim_model(perturbed)
    state = ts.io.atoms_to_state(frames[:2], device=torch.device("cpu"), dtype=torch.float64)
    out = model(state)
    calculator = adapter.ase_calculator(perturbed)
    for index, atoms in enumerate(frames[:2]):
        atoms = atoms.copy()
        atoms.calc = calculator
        assert out["energy"][index].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-9)
        forces = out["forces"][index * 27 : (index + 1) * 27]
        assert (forces - torch.as_tensor(atoms.get_forces())).abs().max() < 1e-9

    def only_known_elements(state):
        # validate_model_outputs builds Si/Fe test systems; give them elements the model knows.
        numbers = torch.tensor([6, 1, 7, 8], device=state.atomic_numbers.device)
        state.atomic_numbers = numbers[torch.arange(state.n_atoms, device=numbers.device) % 4]
        return state

    # TorchSim's checks use crystals: periodic GGND needs a pair radius r_g (image pairs within it).
    periodic = adapter.attach(tiny_nequip(), GGNDConfig(channels=8, heads=2, steps=2, r_g=5.0))
    with torch.no_grad():
        for parameter in adapter.ggnd_parameters(periodic):
            parameter.add_(0.1)
    validate_model_outputs(
        adapter.torchsim_model(periodic),
        torch.device("cpu"),
        torch.float64,
        state_modifier=only_known_elements,
    )
    with pytest.raises(ValueError, match="r_g"):
        model(ts.io.atoms_to_state(bulk("C", "diamond", a=3.57), torch.device("cpu"), torch.float64))


# --------------------------------------------------------------------------------------------------
# NequIP's own tools: nequip-train, the upgrade target, nequip-package, nequip-compile
# --------------------------------------------------------------------------------------------------
def _run(command: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    print(f"{Path(command[0]).name}: {time.perf_counter() - started:.1f} s")
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
    return result


def _nequip_train(config: Path, work: Path, run: str, *overrides: str) -> Path:
    _run(
        [
            str(BIN / "nequip-train"),
            "-cp",
            str(config.parent),
            "-cn",
            config.stem,
            f"hydra.run.dir={work / run}",
            *overrides,
        ],
        cwd=work,
    )
    return work / run / "best.ckpt"


@pytest.fixture(scope="module")
def train_work(tmp_path_factory):
    """Ten 3BPA frames for training and two for testing."""
    work = tmp_path_factory.mktemp("nequip_train")
    frames = read(default_data_path("3bpa_300K_train"), ":12")
    write(work / "train.xyz", frames[:10])
    write(work / "test.xyz", frames[10:])
    return work


@pytest.fixture(scope="module")
def ggnd_checkpoint(train_work):
    """One epoch of nequip-train with the GGND model builder."""
    data = [f"train_file={train_work / 'train.xyz'}", f"test_file={train_work / 'test.xyz'}"]
    return _nequip_train(TRAIN_CONFIG, train_work, "ggnd", *data)


@pytest.mark.slow
def test_nequip_train_with_the_ggnd_builder(adapter, ggnd_checkpoint, frames):
    model = adapter.load(ggnd_checkpoint)
    blocks = adapter.ggnd_blocks(model)
    assert len(blocks) == 1
    assert blocks[0].readout_state.weight.abs().max() > 0  # nequip-train trained the GGND readout
    prediction = adapter.predict(model, frames[:1])
    assert torch.isfinite(prediction.energy).all() and torch.isfinite(prediction.forces).all()


@pytest.mark.slow
def test_upgrade_target_fine_tune_and_package(adapter, train_work, frames):
    from ggnd_plugin.adapters.nequip import GGNDUpgrade

    data = [f"train_file={train_work / 'train.xyz'}", f"test_file={train_work / 'test.xyz'}"]
    plain = _nequip_train(
        TRAIN_CONFIG,
        train_work,
        "plain",
        *data,
        "training_module.model._target_=nequip.model.NequIPGNNModel",
        "~training_module.model.ggnd",
    )
    host = adapter.load(plain)
    assert not adapter.ggnd_blocks(host)
    upgraded = GGNDUpgrade(
        model={"_target_": "nequip.model.ModelFromCheckpoint", "checkpoint_path": str(plain)},
        ggnd={"channels": 8},
    )["sole_model"]
    before, after = adapter.predict(host, frames), adapter.predict(upgraded, frames)
    de = (before.energy - after.energy).abs().max().item()
    df = (before.forces - after.forces).abs().max().item()
    print(f"GGNDUpgrade of a nequip-train checkpoint: |dE| = {de:.3g} eV, |dF| = {df:.3g} eV/A")
    assert de == 0.0 and df == 0.0

    finetuned = _nequip_train(
        FINETUNE_CONFIG,
        train_work,
        "finetune",
        f"checkpoint={plain}",
        f"train_file={train_work / 'train.xyz'}",
    )
    package = train_work / "finetuned.nequip.zip"
    _run([str(BIN / "nequip-package"), "build", str(finetuned), str(package)], cwd=train_work)
    from_checkpoint = adapter.predict(adapter.load(finetuned), frames)
    from_package = adapter.predict(adapter.load(package), frames)
    assert len(adapter.ggnd_blocks(adapter.load(package))) == 1
    assert (from_checkpoint.energy - from_package.energy).abs().max() < 1e-10
    assert (from_checkpoint.forces - from_package.forces).abs().max() < 1e-10


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize(
    "target",
    [
        "ase",
        pytest.param(
            "batch",
            marks=pytest.mark.xfail(
                reason="nequip-compile --target batch of a GGND model aborted once here with 'double free or "
                "corruption' after inductor code generation (torch 2.13, CPU); the plain NequIP model compiles",
                strict=False,
            ),
        ),
    ],
)
def test_nequip_compile_aotinductor(adapter, upgraded, frames, target, tmp_path):
    """nequip-compile (AOTInductor) of a package written by the adapter; about 10 min per target here."""
    from nequip.integrations.ase import NequIPCalculator

    model = copy.deepcopy(upgraded)
    with torch.no_grad():
        for parameter in adapter.ggnd_parameters(model):
            parameter.add_(0.05)
    package = adapter.save(model, tmp_path / "model.nequip.zip")
    compiled = tmp_path / f"model_{target}.nequip.pt2"
    command = [str(BIN / "nequip-compile"), str(package), str(compiled), "--mode", "aotinductor"]
    _run([*command, "--device", "cpu", "--target", target], cwd=tmp_path, timeout=3000)
    reference = adapter.predict(model, frames[:2])
    if target == "ase":
        calculator = NequIPCalculator.from_compiled_model(
            str(compiled), chemical_species_to_atom_type_map=True
        )
        for index, atoms in enumerate(frames[:2]):
            atoms = atoms.copy()
            atoms.calc = calculator
            assert atoms.get_potential_energy() == pytest.approx(reference.energy[index].item(), abs=1e-8)
            forces = torch.as_tensor(atoms.get_forces())
            assert (forces - reference.forces[27 * index : 27 * (index + 1)]).abs().max() < 1e-8
    else:
        import torch_sim as ts
        from nequip.integrations.torchsim import NequIPTorchSimCalc

        calc = NequIPTorchSimCalc.from_compiled_model(str(compiled), chemical_species_to_atom_type_map=True)
        out = calc(ts.io.atoms_to_state(frames[:2], torch.device("cpu"), torch.float64))
        assert (out["energy"] - reference.energy).abs().max() < 1e-8
        assert (out["forces"] - reference.forces).abs().max() < 1e-8
