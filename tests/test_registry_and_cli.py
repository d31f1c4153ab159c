"""Entry-point discovery, the adapter contract and the host-agnostic CLI, through a third-party host.

``tests/thirdparty`` holds a package that registers an adapter in ``ggnd_plugin.adapters`` from its
own dist-info, as an installed third-party package would: nothing in ggnd_plugin names it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ggnd_plugin import registry
from ggnd_plugin.adapters.validate import AdapterContractError, validate_adapter
from ggnd_plugin.cli import main
from ggnd_plugin.data import read_labelled
from ggnd_plugin.default_data import default_data_path
from ggnd_plugin.errors import GGNDError

THIRDPARTY = Path(__file__).parent / "thirdparty"


@pytest.fixture
def toyhost(monkeypatch):
    monkeypatch.syspath_prepend(str(THIRDPARTY))
    import toyhost_ggnd

    return toyhost_ggnd


@pytest.fixture
def frames():
    return read_labelled(default_data_path("3bpa_300K_train"), index=":12")


@pytest.fixture
def toy_model_file(toyhost, frames, tmp_path):
    """A 'fitted' toy model: its element energies put the energies in the right range, as E0s do."""
    torch.manual_seed(0)
    model = toyhost.ToyPotential()
    with torch.no_grad():
        model.e0.fill_(float(np.mean([a.info["energy"] / len(a) for a in frames])))
    return toyhost.ToyAdapter().save(model, tmp_path / "fitted.toy")


def test_third_party_adapter_is_discovered_and_listed(toyhost, capsys):
    names = {record["name"]: record for record in registry.list_adapters()}
    assert names["toyhost"]["usable"] and names["toyhost"]["version"] == "0.1"
    assert names["toyhost"]["host"] == "toyhost-ggnd"
    assert isinstance(registry.get("toyhost"), toyhost.ToyAdapter)
    assert main(["adapters", "--json"]) == 0
    listed = {record["name"] for record in json.loads(capsys.readouterr().out)}
    assert {"toyhost", "mace", "nequip", "schnetpack"} <= listed


def test_adapters_command_in_a_fresh_process_sees_the_third_party_host():
    env = {"PYTHONPATH": str(THIRDPARTY), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "ggnd_plugin.cli", "adapters", "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    records = {r["name"]: r for r in json.loads(out.stdout)}
    assert records["toyhost"]["usable"] is True


def test_import_does_not_load_hosts():
    code = "import sys, ggnd_plugin, ggnd_plugin.registry, ggnd_plugin.cli; print([m for m in ('mace','nequip','schnetpack','torch_sim') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_toy_adapter_honours_the_contract(toyhost, frames, tmp_path):
    torch.manual_seed(0)
    model = toyhost.ToyPotential()
    upgraded = validate_adapter(toyhost.ToyAdapter(), model, frames[:3], tmp_path)
    assert len(toyhost.ToyAdapter().ggnd_blocks(upgraded)) == 1


def _toy_torchsim_model(model, leak: bool = False):
    """A TorchSim model of the toy host. ``leak=True`` computes the batch as one system: the systems of
    the batch interact, the bug the contract check must catch. The toy host has no periodic images."""
    from torch_sim.models.interface import ModelInterface

    class ToyTorchSimModel(ModelInterface):
        def __init__(self):
            super().__init__()
            self.model = model
            self._device, self._dtype = torch.device("cpu"), torch.float64
            self._compute_forces, self._compute_stress = True, False

        def forward(self, state, **kwargs):
            host = getattr(self.model, "host", self.model)
            dtype = next(self.model.parameters()).dtype
            batch = state.system_idx
            with torch.enable_grad():
                positions = state.positions.detach().to(dtype).requires_grad_(True)
                species = host.species_of[state.atomic_numbers]
                atom_energy = self.model.atom_energy(
                    positions, species, torch.zeros_like(batch) if leak else batch
                )
                energy = torch.zeros(state.n_systems, dtype=dtype).index_add(0, batch, atom_energy)
                (grad,) = torch.autograd.grad(energy.sum(), positions)
            return {"energy": energy.detach().double(), "forces": -grad.detach().double()}

    return ToyTorchSimModel()


def test_a_broken_adapter_is_refused_with_what_it_broke(toyhost, frames, tmp_path):
    class ChangesPredictions(toyhost.ToyAdapter):
        def attach(self, model, config):
            upgraded = super().attach(model, config)
            with torch.no_grad():
                for parameter in upgraded.ggnd.parameters():
                    parameter.add_(0.1)
            return upgraded

    class LeaksAcrossTheBatch(toyhost.ToyAdapter):
        def torchsim_model(self, model, device="cpu", dtype=torch.float64):
            return _toy_torchsim_model(model, leak=True)

    class IgnoresPeriodicImages(toyhost.ToyAdapter):
        def torchsim_model(self, model, device="cpu", dtype=torch.float64):
            return _toy_torchsim_model(model)

    torch.manual_seed(0)
    model = toyhost.ToyPotential()
    with pytest.raises(AdapterContractError, match=r"toyhost: attach\(\) at zero init changed predictions"):
        validate_adapter(ChangesPredictions(), model, frames[:3], tmp_path)
    with pytest.raises(
        AdapterContractError, match="toyhost: the TorchSim model gives frame 0 other energies"
    ):
        validate_adapter(LeaksAcrossTheBatch(), model, frames[:3], tmp_path)
    # Batches and predict() agree; TorchSim's own validator then moves an atom by a lattice vector.
    with pytest.raises(AdapterContractError, match="validate_model_outputs refused.*lattice"):
        validate_adapter(IgnoresPeriodicImages(), model, frames[:3], tmp_path)


def test_unknown_host_and_unknown_file_are_named(toyhost, tmp_path):
    with pytest.raises(GGNDError, match="no adapter named 'nope'"):
        registry.get("nope")
    garbage = tmp_path / "weights.bin"
    garbage.write_bytes(b"not a model")
    with pytest.raises(GGNDError, match="weights.bin: not a model file of any known host"):
        registry.detect_file(garbage)
    assert main(["upgrade", str(garbage), "-o", str(tmp_path / "x.toy")]) == 2


def test_upgrade_evaluate_and_finetune_from_the_command_line(toy_model_file, frames, tmp_path, capsys):
    from ase.io import write

    data = tmp_path / "train.xyz"
    write(data, frames[:8])
    upgraded = tmp_path / "upgraded.toy"
    assert main(["upgrade", str(toy_model_file), "-o", str(upgraded), "--host", "auto"]) == 0
    assert main(["upgrade", str(upgraded), "-o", str(tmp_path / "again.toy")]) == 2  # already has GGND

    before, after = tmp_path / "before.json", tmp_path / "after.json"
    assert main(["evaluate", str(toy_model_file), "--data", str(data), "--json", str(before)]) == 0
    assert main(["evaluate", str(upgraded), "--data", str(data), "--json", str(after)]) == 0
    m0, m1 = json.loads(before.read_text()), json.loads(after.read_text())
    assert m0["n_frames"] == 8
    assert {"energy_mae", "energy_rmse", "forces_mae", "forces_rmse"} <= set(m0)
    # Upgrading changes no prediction.
    for key in ("energy_mae", "forces_mae", "forces_rmse"):
        assert m1[key] == pytest.approx(m0[key], abs=1e-12)
    # The metrics are the ones a second implementation gives.
    adapter = registry.get("toyhost")
    model = adapter.load(toy_model_file)
    prediction = adapter.predict(model, frames[:8])
    reference = np.array([a.info["energy"] for a in frames[:8]])
    assert m0["energy_mae"] == pytest.approx(np.abs(prediction.energy.numpy() - reference).mean(), rel=1e-12)

    tuned = tmp_path / "tuned.toy"
    code = main(
        [
            "finetune",
            str(upgraded),
            "--train",
            str(data),
            "-o",
            str(tuned),
            "--epochs",
            "3",
            "--lr",
            "0.01",
            "--freeze-host",
        ]
    )
    assert code == 0
    tuned_model = adapter.load(tuned)
    block = adapter.ggnd_blocks(tuned_model)[0]
    assert block.readout_state.weight.abs().max() > 0, "GGND readout did not train"
    # --freeze-host: the host is untouched.
    host_before = adapter.load(upgraded).host.state_dict()
    for key, value in tuned_model.host.state_dict().items():
        assert torch.equal(value, host_before[key]), key
    history = torch.load(str(tuned) + ".checkpoint.pt", weights_only=False)["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_finetune_resume_equals_uninterrupted(toy_model_file, frames, tmp_path):
    from ase.io import write

    data = tmp_path / "train.xyz"
    write(data, frames[:6])
    common = ["--train", str(data), "--lr", "0.005", "--batch-size", "2", "--seed", "3"]
    full = tmp_path / "full.toy"
    assert main(["finetune", str(toy_model_file), "-o", str(full), "--epochs", "3", *common]) == 0
    # Simulate a run stopped after epoch 2: rewind the checkpoint, then resume.
    stopped = tmp_path / "stopped.toy"
    assert main(["finetune", str(toy_model_file), "-o", str(stopped), "--epochs", "2", *common]) == 0
    state = torch.load(str(stopped) + ".checkpoint.pt", weights_only=False)
    state["settings"]["epochs"] = 3
    torch.save(state, str(stopped) + ".checkpoint.pt")
    assert (
        main(["finetune", str(toy_model_file), "-o", str(stopped), "--epochs", "3", "--resume", *common]) == 0
    )
    a = torch.load(str(full) + ".checkpoint.pt", weights_only=False)
    b = torch.load(str(stopped) + ".checkpoint.pt", weights_only=False)
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.parametrize(
    "problem,expected",
    [
        ("no_forces", "frame 1 has no forces"),
        ("no_energy", "frame 0 has no energy"),
        ("nan", "frame 2 has non-finite positions"),
        ("element", "frame 1 contains S"),
    ],
)
def test_bad_data_stops_with_one_line_naming_file_and_frame(
    toy_model_file, frames, tmp_path, capsys, problem, expected
):
    from ase.io import write

    bad = [a.copy() for a in frames[:3]]
    for a, original in zip(bad, frames[:3], strict=True):
        a.info["energy"] = original.info["energy"]
        a.arrays["forces"] = original.arrays["forces"].copy()
    if problem == "no_forces":
        del bad[1].arrays["forces"]
        write(tmp_path / "bad.xyz", bad[:1])  # ASE writes a frame's columns from frame 0: write separately
        with open(tmp_path / "bad.xyz", "a") as handle:
            write(handle, bad[1], format="extxyz")
    else:
        if problem == "no_energy":
            del bad[0].info["energy"]
        elif problem == "nan":
            positions = bad[2].get_positions()
            positions[4, 1] = np.nan
            bad[2].set_positions(positions)
        elif problem == "element":
            numbers = bad[1].get_atomic_numbers()
            numbers[0] = 16
            bad[1].set_atomic_numbers(numbers)
        write(tmp_path / "bad.xyz", bad)
    code = main(["evaluate", str(toy_model_file), "--data", str(tmp_path / "bad.xyz")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "bad.xyz" in err and expected in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_model_file_is_named(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "none.model"), "--data", "x.xyz"]) == 2
    assert "none.model: no such file" in capsys.readouterr().err
