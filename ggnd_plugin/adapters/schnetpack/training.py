"""Training from scratch (``SchNetPackAdapter.fit``): ``spktrain`` in a subprocess.

The extxyz files become one ASE database in the work folder (training frames first) with a split file
that keeps exactly the given train/valid partition; ``spktrain`` then runs this package's experiment
``painn_3bpa`` or ``ggnd_painn_3bpa`` (``configs/experiment``) with the model size and options as
overrides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ggnd_plugin.adapters.host_trainer import FitRequest, HostTrainer
from ggnd_plugin.block import GGNDConfig
from ggnd_plugin.errors import GGNDError

FIT_LOG = "spktrain.log"


def fit_outputs(config: GGNDConfig | None) -> tuple[str, ...]:
    """What spktrain and fit() write in the work folder ("data" is an empty folder spktrain's hydra
    config creates); a restarted fit removes them (the run of the other model kind stays)."""
    return (f"runs/{_run_id(config)}", "data.db", "split.npz", "data", FIT_LOG)


def _run_id(config: GGNDConfig | None) -> str:
    return "painn" if config is None else "ggnd_painn"


# Small, fast PaiNN models for ``ggnd demo`` (all with the 5 Å cutoff of the 3BPA experiments).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"n_atom_basis": 16, "n_interactions": 2, "batch_size": 4, "lr": 1e-3},
    "small": {"n_atom_basis": 32, "n_interactions": 3, "batch_size": 5, "lr": 1e-3},
}
# One line per validation from the checkpoint callback (made verbose by fit_command):
# "Epoch 3, global step 36: 'val_loss' reached 0.51 (best 0.51), ..." or "... was not in top 1".
_EPOCH_LINE = r"^Epoch (\d+), global step \d+: 'val_loss' (?:reached (?P<loss>[0-9.eE+-]+))?"
TRAINER = HostTrainer(name="spktrain", log_name=FIT_LOG, epoch_line=_EPOCH_LINE, tail_lines=20)


def _spktrain_executable() -> list[str]:
    """spktrain (``schnetpack.cli:train``) run through :func:`ggnd_plugin.host_fit.main`, which makes
    its ``torch.save`` of ``best_model`` atomic."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "spktrain"
    script = str(beside) if beside.is_file() else shutil.which("spktrain")
    if not script:
        raise GGNDError(
            "cannot find SchNetPack's `spktrain` command (is schnetpack installed in this environment?)"
        )
    return [sys.executable, "-m", "ggnd_plugin.host_fit", "schnetpack.cli:train", script]


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_fit_arguments(train: Path, valid: Path, epochs: int, size: str) -> None:
    if size not in SIZES:
        raise GGNDError(f"unknown model size {size!r}; choose from {sorted(SIZES)}")
    if epochs < 1:
        raise GGNDError(f"epochs must be at least 1, got {epochs}")
    for path in (train, valid):
        if not Path(path).is_file():
            raise GGNDError(f"{Path(path).absolute()}: no such file")


def fit_command(request: FitRequest) -> tuple[list[str], Path]:
    """Write the database and split for ``spktrain``; return its command line and the model it writes.

    The run is ``work_dir/runs/<painn|ggnd_painn>`` (replaced if it exists: spktrain would otherwise
    resume it). ``epochs`` is ``trainer.max_epochs``; the test stage spktrain runs after training uses
    the validation frames. ``patience``: SchNetPack's early stopping on the validation loss and its
    plateau scheduler after ``max(2, patience // 3)`` epochs (no cool-down).
    """
    import shutil

    import numpy as np

    from ggnd_plugin.adapters.base import lightning_accelerator
    from ggnd_plugin.adapters.schnetpack.database import extxyz_to_spk_db
    from ggnd_plugin.data import read_labelled

    config, epochs, size, device, patience = (
        request.config,
        request.epochs,
        request.size,
        request.device,
        request.patience,
    )
    check_fit_arguments(request.train, request.valid, epochs, size)
    train, valid = Path(request.train).absolute(), Path(request.valid).absolute()
    work_dir = Path(request.work_dir).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    database, split = work_dir / "data.db", work_dir / "split.npz"
    n_train = len(read_labelled(train))
    n_valid = extxyz_to_spk_db([train, valid], database, overwrite=True) - n_train
    if n_train < 1 or n_valid < 1:
        raise GGNDError(f"fit needs training and validation frames, got {n_train} and {n_valid}")
    train_idx, valid_idx = np.arange(n_train), np.arange(n_train, n_train + n_valid)
    np.savez(split, train_idx=train_idx, val_idx=valid_idx, test_idx=valid_idx)
    elements = sorted({int(z) for atoms in read_labelled(train) for z in atoms.numbers})

    run_id = _run_id(config)
    run_dir = work_dir / "runs" / run_id
    if run_dir.exists():
        shutil.rmtree(run_dir)
    options = SIZES[size]
    overrides = {
        "experiment": "painn_3bpa" if config is None else "ggnd_painn_3bpa",
        "run.path": str(work_dir / "runs"),
        "run.id": run_id,
        "data.datapath": str(database),
        "+data.split_file": str(split),
        "data.num_train": n_train,
        "data.num_val": n_valid,
        "data.num_test": n_valid,
        "data.batch_size": options["batch_size"],
        "data.num_workers": 0,
        "globals.cutoff": 5.0,
        "globals.lr": options["lr"],
        "model.representation.n_atom_basis": options["n_atom_basis"],
        "model.representation.n_interactions": options["n_interactions"],
        "trainer.max_epochs": epochs,
        "trainer.accelerator": lightning_accelerator(device),
        "trainer.enable_model_summary": False,
        "+trainer.enable_progress_bar": False,
        "callbacks.model_checkpoint.verbose": True,
        "logger": "csv",
        "print_config": False,
        "++seed": request.seed,
    }
    if patience is not None:
        overrides["callbacks.early_stopping.patience"] = int(patience)
        overrides["task.scheduler_args.patience"] = max(2, int(patience) // 3)
        overrides["task.scheduler_args.cooldown"] = 0
    if config is not None:
        overrides["globals.ggnd_atomic_numbers"] = "[" + ",".join(str(z) for z in elements) + "]"
        for key, value in config.to_dict().items():
            overrides[f"++globals.ggnd.{key}"] = _hydra_value(value)
    command = _spktrain_executable() + [f"{key}={_hydra_value(value)}" for key, value in overrides.items()]
    return command, run_dir / "best_model"


def spktrain_environment(work_dir: Path) -> dict[str, str]:
    """spktrain's environment (only its own): ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` because spktrain
    reloads its own Lightning checkpoint, which pickles the model, for its test stage (see
    docs/hosts/schnetpack.md); ``PWD`` because hydra searches ``${oc.env:PWD}/configs``, and that must
    not be the caller's folder."""
    return dict(os.environ, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", HYDRA_FULL_ERROR="1", PWD=str(work_dir))


def run_fit(command: list[str], work_dir: Path, epochs: int | None = None, label: str = "schnetpack") -> None:
    """Run ``spktrain`` in ``work_dir``, its output going to ``work_dir/spktrain.log`` and its epochs to a
    progress bar (:data:`TRAINER`)."""
    work_dir = Path(work_dir)
    TRAINER.run(command, work_dir, epochs, label=label, cwd=work_dir, env=spktrain_environment(work_dir))
