"""NequIPAdapter.fit: training from scratch through nequip-train, and ``ggnd demo --host nequip --quick``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("nequip")

from ase.io import read, write  # noqa: E402

from ggnd_plugin.adapters.host_trainer import FitRequest  # noqa: E402
from ggnd_plugin.adapters.nequip import SIZES, NequIPAdapter  # noqa: E402
from ggnd_plugin.adapters.nequip import fit_config as nequip_fit_config  # noqa: E402
from ggnd_plugin.block import GGNDConfig  # noqa: E402
from ggnd_plugin.default_data import default_data_path
from ggnd_plugin.errors import GGNDError  # noqa: E402

DATA = default_data_path("3bpa_300K_train")
CONFIG = GGNDConfig(channels=8, heads=2, steps=2)
MODELS = ("baseline", "ggnd-scratch", "ggnd-upgrade")


@pytest.fixture(scope="module")
def adapter():
    return NequIPAdapter()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """20 frames: 16 to train, 4 to validate, and 3 held-out frames."""
    folder = tmp_path_factory.mktemp("nequip_fit_data")
    frames = read(DATA, ":23")
    paths = {name: folder / f"{name}.xyz" for name in ("train", "valid", "test")}
    write(paths["train"], frames[:16])
    write(paths["valid"], frames[16:20])
    write(paths["test"], frames[20:])
    return paths


def test_fit_config_fills_the_template(data, tmp_path):
    def fit_config(train, valid, config, **values):
        return nequip_fit_config(FitRequest(train, valid, tmp_path, config, **values))

    plain = fit_config(data["train"], data["valid"], None, epochs=3, seed=7, size="tiny")
    assert plain["max_epochs"] == 3 and plain["seed"] == 7
    assert plain["model_type_names"] == ["H", "C", "N", "O"]
    assert plain["train_file"] == str(data["train"].resolve())
    model = plain["training_module"]["model"]
    assert model["_target_"] == "nequip.model.NequIPGNNModel" and "ggnd" not in model
    assert model["model_dtype"] == "float64" and model["num_features"] == 8
    ggnd = fit_config(data["train"], data["valid"], CONFIG, epochs=3, seed=7, size="small")
    model = ggnd["training_module"]["model"]
    assert model["_target_"] == "ggnd_plugin.adapters.nequip.GGNDNequIPModel"
    assert GGNDConfig.from_dict(model["ggnd"]) == CONFIG
    assert model["num_features"] == SIZES["small"]["model"]["num_features"]
    assert plain["trainer"]["accelerator"] == "cpu"
    on_gpu = fit_config(data["train"], data["valid"], None, epochs=3, seed=7, size="tiny", device="cuda:0")
    assert on_gpu["trainer"]["accelerator"] == "gpu"
    with pytest.raises(GGNDError, match="device must be cpu or cuda"):
        fit_config(data["train"], data["valid"], None, epochs=3, seed=7, size="tiny", device="tpu")


def test_fit_refuses_bad_arguments(adapter, data, tmp_path):
    with pytest.raises(GGNDError, match="unknown model size"):
        adapter.fit(data["train"], data["valid"], tmp_path, size="huge")
    with pytest.raises(GGNDError, match="no such file"):
        adapter.fit(tmp_path / "missing.xyz", data["valid"], tmp_path, size="tiny")


def test_failed_training_reports_the_log_tail(adapter, data, tmp_path, monkeypatch):
    from ggnd_plugin.adapters.nequip import training as nequip_training

    template = nequip_training.FIT_TEMPLATE.read_text()
    broken = tmp_path / "fit.yaml"
    broken.write_text(template.replace("ASEDataModule", "NoSuchDataModule"))
    monkeypatch.setattr(nequip_training, "FIT_TEMPLATE", broken)
    with pytest.raises(GGNDError, match=r"nequip-train failed(.|\n)*NoSuchDataModule"):
        adapter.fit(data["train"], data["valid"], tmp_path / "work", epochs=1, size="tiny")


@pytest.mark.parametrize("config", [None, CONFIG], ids=["plain", "ggnd"])
def test_fit_tiny_model(adapter, data, config, tmp_path):
    started = time.perf_counter()
    model = adapter.fit(data["train"], data["valid"], tmp_path / "work", config=config, epochs=2, size="tiny")
    print(
        f"fit ({'ggnd' if config else 'plain'}, tiny, 16 frames, 2 epochs): {time.perf_counter() - started:.1f} s"
    )
    assert adapter.recognises_model(model)
    assert len(adapter.ggnd_blocks(model)) == (0 if config is None else 1)
    assert sorted(adapter.atomic_numbers(model)) == [1, 6, 7, 8]
    assert adapter.cutoff(model) == SIZES["tiny"]["cutoff_radius"]
    assert next(iter(model.parameters())).dtype == torch.float64
    log = (tmp_path / "work" / "nequip-train.log").read_text()
    assert "Epoch 1, global step" in log  # both epochs ran
    held_out = read(data["test"], ":")
    prediction = adapter.predict(model, held_out)
    assert prediction.energy.shape == (len(held_out),)
    assert torch.isfinite(prediction.energy).all() and torch.isfinite(prediction.forces).all()
    # The energy scale is learnt: within 1 eV/atom of the reference (per-type shifts from the data).
    reference = torch.tensor([atoms.get_potential_energy() for atoms in held_out], dtype=torch.float64)
    assert ((prediction.energy - reference).abs() / len(held_out[0])).max() < 1.0
    if config is not None:
        assert adapter.ggnd_blocks(model)[0].readout_state.weight.abs().max() > 0  # GGND was trained
        path = adapter.save(model, tmp_path / "ggnd.nequip.zip")
        reloaded = adapter.load(path)
        again = adapter.predict(reloaded, held_out)
        torch.testing.assert_close(again.energy, prediction.energy)


@pytest.mark.slow
def test_demo_quick_with_nequip(tmp_path):
    out = tmp_path / "demo"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "ggnd_plugin.cli", "demo", "--host", "nequip", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(f"ggnd demo --host nequip --quick: {time.perf_counter() - started:.0f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    summary = json.loads((out / "report.json").read_text())
    assert summary["host"] == "nequip"
    for name in MODELS:
        assert f"| {name} |" in report
        for temperature in ("300K", "600K", "1200K"):
            assert math.isfinite(summary["metrics"][name][temperature]["forces_mae"])
    adapter = NequIPAdapter()
    models = {name: adapter.load(Path(path)) for name, path in summary["models"].items()}
    assert adapter.ggnd_blocks(models["baseline"]) == []
    assert len(adapter.ggnd_blocks(models["ggnd-scratch"])) == 1
    assert len(adapter.ggnd_blocks(models["ggnd-upgrade"])) == 1
