"""Fine-tuning and evaluation of any host model through its adapter.

The loop is host-agnostic: it only needs :meth:`HostAdapter.predict`, which returns energies and
differentiable forces. Energies are compared per atom, so the loss weights mean the same for molecules
of any size; the model's own isolated-atom energies (E0s) are kept, not refitted.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ggnd_plugin.adapters.base import HostAdapter
from ggnd_plugin.errors import GGNDError


@dataclass
class FinetuneSettings:
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 4
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    freeze_host: bool = False
    seed: int = 0
    max_grad_norm: float | None = 10.0


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    valid_loss: float | None
    valid_energy_mae: float | None = None
    valid_forces_mae: float | None = None


@dataclass
class FinetuneResult:
    history: list[EpochRecord] = field(default_factory=list)
    trained_parameters: int = 0
    frozen_parameters: int = 0


def _batches(items: Sequence, size: int, rng: random.Random | None) -> list[list]:
    order = list(range(len(items)))
    if rng is not None:
        rng.shuffle(order)
    return [[items[i] for i in order[start : start + size]] for start in range(0, len(order), size)]


def _targets(structures: Sequence, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    energy = torch.tensor([atoms.info["energy"] for atoms in structures], dtype=dtype, device=device)
    forces = torch.cat(
        [torch.as_tensor(atoms.arrays["forces"], dtype=dtype, device=device) for atoms in structures]
    )
    n_atoms = torch.tensor([len(atoms) for atoms in structures], dtype=dtype, device=device)
    return energy, forces, n_atoms


def loss_of(
    adapter: HostAdapter, model: nn.Module, structures: Sequence, settings: FinetuneSettings, training: bool
):
    prediction = adapter.predict(model, structures, training=training)
    energy, forces, n_atoms = _targets(structures, prediction.energy.device, prediction.energy.dtype)
    energy_term = (((prediction.energy - energy) / n_atoms) ** 2).mean()
    forces_term = ((prediction.forces - forces) ** 2).mean()
    return settings.energy_weight * energy_term + settings.forces_weight * forces_term


def trainable_parameters(adapter: HostAdapter, model: nn.Module, freeze_host: bool) -> list[nn.Parameter]:
    """All parameters, or only the GGND block's when the host is frozen."""
    if not freeze_host:
        return [p for p in model.parameters() if p.requires_grad]
    ggnd = list(adapter.ggnd_parameters(model))
    if not ggnd:
        raise GGNDError("--freeze-host leaves nothing to train: the model has no GGND block")
    ggnd_ids = {id(p) for p in ggnd}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in ggnd_ids)
    return ggnd


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    # Write then rename, so a run stopped while saving never leaves a half-written checkpoint.
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint.pt")


def finetune(
    adapter: HostAdapter,
    model: nn.Module,
    train: Sequence,
    valid: Sequence | None,
    out: Path,
    settings: FinetuneSettings,
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Train ``model`` on ``train`` (energy + force loss), checkpointing every epoch next to ``out``.

    The best model on the validation set (or the last, without one) is saved with the adapter to
    ``out``. With ``resume`` the run continues from the checkpoint and reaches the same result as an
    uninterrupted run with the same settings.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_path(out)
    params = trainable_parameters(adapter, model, settings.freeze_host)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    result = FinetuneResult(
        trained_parameters=sum(p.numel() for p in params),
        frozen_parameters=sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in params),
    )
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    start_epoch, best = 0, math.inf

    if resume:
        if not ckpt.exists():
            raise GGNDError(f"--resume: no checkpoint at {ckpt}")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state["settings"] != asdict(settings):
            raise GGNDError(f"--resume: {ckpt} was written with other settings: {state['settings']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best = state["epoch"], state["best"]
        result.history = [EpochRecord(**record) for record in state["history"]]

    epochs = range(start_epoch, settings.epochs)
    bar = tqdm(
        epochs,
        desc="fine-tuning",
        unit="epoch",
        disable=not progress,
        initial=start_epoch,
        total=settings.epochs,
    )
    for epoch in bar:
        model.train()
        total, count = 0.0, 0
        for batch in _batches(train, settings.batch_size, rng):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(adapter, model, batch, settings, training=True)
            if not torch.isfinite(loss):
                raise GGNDError(f"epoch {epoch + 1}: the loss became {loss.item()}; lower --lr")
            loss.backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
        record = EpochRecord(epoch=epoch + 1, train_loss=total / count, valid_loss=None)
        if valid:
            model.eval()
            metrics = evaluate(adapter, model, valid, settings.batch_size)
            record.valid_loss = validation_loss(adapter, model, valid, settings)
            record.valid_energy_mae = metrics["energy_per_atom_mae"]
            record.valid_forces_mae = metrics["forces_mae"]
        result.history.append(record)
        score = record.valid_loss if record.valid_loss is not None else record.train_loss
        if score < best:
            best = score
            adapter.save(model, out)
        bar.set_postfix(train=f"{record.train_loss:.4g}", valid=f"{record.valid_loss or float('nan'):.4g}")
        _save_checkpoint(
            ckpt,
            {
                "epoch": epoch + 1,
                "best": best,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "python_rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "history": [asdict(r) for r in result.history],
                "settings": asdict(settings),
            },
        )
    return result


def validation_loss(adapter, model, structures, settings: FinetuneSettings) -> float:
    total = 0.0
    for batch in _batches(structures, settings.batch_size, None):
        # Forces need gradients with respect to positions even when no parameter is trained.
        total += loss_of(adapter, model, batch, settings, training=False).item() * len(batch)
    return total / len(structures)


def evaluate(
    adapter: HostAdapter, model: nn.Module, structures: Sequence, batch_size: int = 8
) -> dict[str, Any]:
    """Energy (total and per atom) and force errors against the reference labels (eV, eV/Å)."""
    energy_errors, per_atom_errors, force_errors = [], [], []
    for batch in _batches(structures, batch_size, None):
        prediction = adapter.predict(model, batch, training=False)
        energy, forces, n_atoms = _targets(batch, "cpu", torch.float64)
        e = prediction.energy.detach().cpu().to(torch.float64)
        f = prediction.forces.detach().cpu().to(torch.float64)
        energy_errors.append((e - energy).numpy())
        per_atom_errors.append(((e - energy) / n_atoms).numpy())
        force_errors.append((f - forces).reshape(-1).numpy())
    e_err, pa_err, f_err = (np.concatenate(x) for x in (energy_errors, per_atom_errors, force_errors))
    return {
        "n_frames": len(structures),
        "energy_mae": float(np.abs(e_err).mean()),
        "energy_rmse": float(np.sqrt((e_err**2).mean())),
        "energy_per_atom_mae": float(np.abs(pa_err).mean()),
        "energy_per_atom_rmse": float(np.sqrt((pa_err**2).mean())),
        "forces_mae": float(np.abs(f_err).mean()),
        "forces_rmse": float(np.sqrt((f_err**2).mean())),
    }
