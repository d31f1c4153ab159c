"""Training to convergence: each adapter's fit turns `patience` into its host's own early stopping and
plateau learning-rate schedule (the command or config the host's trainer runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ggnd_plugin.adapters.host_trainer import FitRequest
from ggnd_plugin.default_data import default_data_path

TRAIN, VALID = default_data_path("3bpa_300K_train"), default_data_path("3bpa_300K_test")
WORK = Path("fit")  # a config names no work folder; nothing is written


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def test_mace_fit_stops_on_the_validation_loss(tmp_path):
    pytest.importorskip("mace")
    from ggnd_plugin.adapters.mace.training import fit_command

    plain, _ = fit_command(FitRequest(TRAIN, VALID, tmp_path, None, 150, 0, "tiny"))
    assert "--patience" not in plain  # without patience: MACE's defaults, all epochs
    command, _ = fit_command(FitRequest(TRAIN, VALID, tmp_path, None, 150, 0, "tiny", patience=15))
    assert _option(command, "--patience") == "15"
    assert _option(command, "--scheduler_patience") == "5"
    assert _option(command, "--lr_factor") == "0.5"
    assert _option(command, "--max_num_epochs") == "150"


def test_nequip_fit_config_has_early_stopping_and_a_plateau_schedule():
    pytest.importorskip("nequip")
    from ggnd_plugin.adapters.nequip import fit_config
    from ggnd_plugin.errors import GGNDError

    plain = fit_config(FitRequest(TRAIN, VALID, WORK, None, 150, 0, "tiny"))
    assert "lr_scheduler" not in plain["training_module"]
    values = fit_config(FitRequest(TRAIN, VALID, WORK, None, 150, 0, "tiny", patience=15))
    stopping = [c for c in values["trainer"]["callbacks"] if c["_target_"].endswith("EarlyStopping")]
    assert stopping == [
        {
            "_target_": "lightning.pytorch.callbacks.EarlyStopping",
            "monitor": "val0_epoch/weighted_sum",
            "patience": 15,
            "mode": "min",
        }
    ]
    schedule = values["training_module"]["lr_scheduler"]
    assert schedule["scheduler"]["patience"] == 5 and schedule["monitor"] == "val0_epoch/weighted_sum"
    with pytest.raises(GGNDError, match="patience"):
        fit_config(FitRequest(TRAIN, VALID, WORK, None, 150, 0, "tiny", patience=0))


def test_schnetpack_fit_overrides_its_early_stopping(tmp_path):
    pytest.importorskip("schnetpack")
    from ggnd_plugin.adapters.schnetpack import fit_command

    command, _ = fit_command(FitRequest(TRAIN, VALID, tmp_path, None, 150, 0, "tiny", patience=15))
    assert "callbacks.early_stopping.patience=15" in command
    assert "task.scheduler_args.patience=5" in command
