"""Training from scratch (``NequIPAdapter.fit``): ``nequip-train`` with the package's config template.

:func:`fit_config` fills in the template ``fit.yaml`` beside this module (data files, seed, epochs, the
model size and, for a GGND model, the builder ``ggnd_plugin.adapters.nequip.GGNDNequIPModel`` and its
``ggnd:`` options); :func:`run_nequip_train` runs ``nequip-train`` on the written file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ggnd_plugin.adapters.host_trainer import FitRequest, HostTrainer, TrainerCommand
from ggnd_plugin.errors import GGNDError

FIT_TEMPLATE = Path(__file__).parent / "fit.yaml"
FIT_CONFIG_NAME = "nequip-fit"
FIT_LOG = "nequip-train.log"
# The checkpoint callback logs one "Epoch N, global step M: ..." line per validation (the template makes
# it verbose); those lines drive fit()'s progress bar.
TRAINER = HostTrainer(
    name="nequip-train",
    log_name=FIT_LOG,
    epoch_line=r"Epoch (\d+), global step \d+: (?:.*?\(best (?P<loss>[0-9.eE+-]+)\))?",
)
# What nequip-train (hydra, Lightning) and fit() write in the work folder; a restarted fit removes them.
FIT_OUTPUTS = ("best*.ckpt", "last*.ckpt", ".hydra", "train.log", f"{FIT_CONFIG_NAME}.yaml", FIT_LOG)
GGND_BUILDER = "ggnd_plugin.adapters.nequip.GGNDNequIPModel"
# Small, fast NequIP models (float64, CPU); the template turns parity off (fewer irreps, faster).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "cutoff_radius": 5.0,
        "train_batch_size": 4,
        "model": {
            "l_max": 1,
            "num_layers": 2,
            "num_features": 8,
            "radial_mlp_depth": 1,
            "radial_mlp_width": 16,
        },
    },
    "small": {
        "cutoff_radius": 5.0,
        "train_batch_size": 5,
        "model": {
            "l_max": 1,
            "num_layers": 3,
            "num_features": 24,
            "radial_mlp_depth": 1,
            "radial_mlp_width": 32,
        },
    },
}


def _elements(*paths: Path) -> list[str]:
    """Chemical symbols found in the given structure files, ordered by atomic number."""
    from ase.data import atomic_numbers
    from ase.io import iread

    symbols: set[str] = set()
    for path in paths:
        try:
            for atoms in iread(str(path), index=":"):
                symbols.update(atoms.get_chemical_symbols())
        except Exception as error:
            raise GGNDError(f"{path}: cannot read structures ({type(error).__name__}: {error})") from error
    if not symbols:
        raise GGNDError(f"no structures in {', '.join(str(p) for p in paths)}")
    return sorted(symbols, key=atomic_numbers.__getitem__)


def fit_config(request: FitRequest) -> dict[str, Any]:
    """The nequip-train config :meth:`NequIPAdapter.fit` runs: the template with the request filled in.

    ``request.patience``: Lightning's early stopping on the validation metric, and a plateau scheduler
    halving the learning rate after ``max(2, patience // 3)`` epochs without improvement.
    """
    import yaml

    from ggnd_plugin.adapters.base import lightning_accelerator

    train, valid, config, epochs = request.train, request.valid, request.config, request.epochs
    seed, size, device, patience = request.seed, request.size, request.device, request.patience

    if size not in SIZES:
        raise GGNDError(f"unknown model size {size!r}; choose from {sorted(SIZES)}")
    if epochs < 1:
        raise GGNDError(f"epochs must be at least 1, got {epochs}")
    for path in (train, valid):
        if not Path(path).exists():
            raise GGNDError(f"{path}: no such file")
    sizes = SIZES[size]
    values = yaml.safe_load(FIT_TEMPLATE.read_text())
    values.update(
        seed=int(seed),
        train_file=str(Path(train).resolve()),
        val_file=str(Path(valid).resolve()),
        cutoff_radius=float(sizes["cutoff_radius"]),
        model_type_names=_elements(train, valid),
        max_epochs=int(epochs),
        train_batch_size=int(sizes["train_batch_size"]),
    )
    values["trainer"]["accelerator"] = lightning_accelerator(device)
    model = values["training_module"]["model"]
    model.update(sizes["model"])
    if config is not None:
        model["_target_"] = GGND_BUILDER
        model["ggnd"] = config.to_dict()
    if patience is not None:
        if patience < 1:
            raise GGNDError(f"patience must be at least 1, got {patience}")
        monitor = "val0_epoch/weighted_sum"
        values["trainer"]["callbacks"].append(
            {
                "_target_": "lightning.pytorch.callbacks.EarlyStopping",
                "monitor": monitor,
                "patience": int(patience),
                "mode": "min",
            }
        )
        values["training_module"]["lr_scheduler"] = {
            "scheduler": {
                "_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau",
                "factor": 0.5,
                "patience": max(2, int(patience) // 3),
            },
            "monitor": monitor,
            "interval": "epoch",
            "frequency": 1,
        }
    return values


def write_fit_config(request: FitRequest) -> Path:
    """Write :func:`fit_config` to ``work_dir/nequip-fit.yaml`` (removing checkpoints of an earlier run)."""
    import yaml

    from ggnd_plugin.safe_io import atomic_write_text

    values = fit_config(request)
    work_dir = Path(request.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # Lightning would write best-v1.ckpt next to an old best.ckpt: start from a clean folder.
    for stale in [*work_dir.glob("best*.ckpt"), *work_dir.glob("last*.ckpt")]:
        stale.unlink()
    path = work_dir / f"{FIT_CONFIG_NAME}.yaml"
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
    return path


def nequip_train_command(config_path: Path, work_dir: Path) -> TrainerCommand:
    """``nequip-train`` on ``config_path``, run in ``work_dir``; the best checkpoint is ``best.ckpt`` there."""
    config_path = Path(config_path).resolve()
    work_dir = Path(work_dir).resolve()
    argv = [
        sys.executable,
        "-m",
        "nequip.scripts.train",
        "-cp",
        str(config_path.parent),
        "-cn",
        config_path.stem,
        f"hydra.run.dir={work_dir}",
    ]
    return TrainerCommand(argv, work_dir / "best.ckpt", cwd=work_dir, header=" ".join(argv))


def run_nequip_train(
    config_path: Path, work_dir: Path, epochs: int | None = None, label: str = "nequip"
) -> None:
    """Run ``nequip-train`` on ``config_path`` in ``work_dir``, its output going to
    ``work_dir/nequip-train.log`` and its epochs to a progress bar (:data:`TRAINER`)."""
    command = nequip_train_command(config_path, work_dir)
    TRAINER.run(command.argv, command.cwd, epochs, label=label, cwd=command.cwd, header=command.header)
