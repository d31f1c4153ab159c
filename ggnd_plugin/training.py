"""Fine-tuning and evaluation of any host model through its adapter.

The loop is host-agnostic: it only needs :meth:`HostAdapter.predict`, which returns energies and
differentiable forces. Energies are compared per atom, so the loss weights mean the same for molecules
of any size; the model's own isolated-atom energies (E0s) are kept, not refitted.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in PyTorch's ``DistributedDataParallel``
(gloo on the CPU): every rank draws the same global batches from the seed and computes its share of
each, DDP averages the gradients, and the loss of every share is weighted so that the average is the
single-process loss of the whole batch. ``--batch-size`` therefore stays the global batch and the run
follows the single-process run (to round-off, tested). Rank 0 checks, locks and writes OUTPUT and the
checkpoint; every rank resumes from that checkpoint.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ggnd_plugin import validation as v
from ggnd_plugin.adapters.base import HostAdapter
from ggnd_plugin.errors import GGNDError, OutputExistsError
from ggnd_plugin.safe_io import (
    atomic_torch_save,
    output_lock,
    refuse_input_as_output,
    save_model,
    verified_torch_load,
)

MONITORS = ("loss", "forces")
# Settings added after checkpoints were first written, with the value those checkpoints ran with.
_SETTINGS_ADDED = {"patience": None, "monitor": "loss"}


@dataclass
class FinetuneSettings:
    """One fine-tuning run; checked on creation with the checks (and words) of the command line."""

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 4
    energy_weight: float = 1.0
    forces_weight: float = 10.0
    freeze_host: bool = False
    seed: int = 0
    max_grad_norm: float | None = 10.0
    # Stop when the monitored validation error has not improved for this many epochs (None: run all).
    patience: int | None = None
    # What the kept model and patience follow: "loss" (the training loss on the validation set, or on the
    # training set without one) or "forces" (the validation force MAE).
    monitor: str = "loss"

    def __post_init__(self):
        v.check_settings(
            self,
            {
                "epochs": v.positive_int,
                "lr": v.positive_float,
                "batch_size": v.positive_int,
                "energy_weight": v.non_negative_float,
                "forces_weight": v.non_negative_float,
                "seed": v.seed,
            },
        )
        if self.energy_weight == 0 and self.forces_weight == 0:
            raise GGNDError("energy_weight and forces_weight are both 0: the loss would train nothing")
        if self.max_grad_norm is not None:
            v.check_value(v.positive_float, self.max_grad_norm, "max_grad_norm")
        if self.patience is not None:
            v.check_value(v.positive_int, self.patience, "patience")
        if self.monitor not in MONITORS:
            raise GGNDError(f"monitor must be one of {', '.join(MONITORS)}, got {self.monitor!r}")


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
    best_epoch: int = 0  # the epoch whose model was kept
    stopped_early: bool = False  # patience ran out before the epoch cap (converged by the rule)


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


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint.pt")


def check_finetune_output(
    out: Path,
    inputs: Iterable[tuple[str, Any]] = (),
    resume: bool = False,
    overwrite: bool = False,
) -> None:
    """Refuse an output that would destroy something: an input (always), a folder, another file.

    OUTPUT and its checkpoint are this command's own only when the checkpoint exists: ``resume``
    continues them, ``overwrite`` starts again over them. ``resume`` with nothing written yet starts
    the run, so a run killed before its first checkpoint continues with the same command.
    """
    out = Path(out)
    ckpt = checkpoint_path(out)
    inputs = list(inputs)
    refuse_input_as_output(out, inputs, "--output")
    refuse_input_as_output(ckpt, inputs, "--output's checkpoint")
    if resume and overwrite:
        raise GGNDError("--resume continues a run and --overwrite starts it again: give one of them")
    if out.is_dir():
        raise OutputExistsError(f"--output {out} is a folder; give a file name")
    if overwrite:
        return
    if resume:
        if out.exists() and not ckpt.exists():
            raise OutputExistsError(
                f"--resume: {out} exists but has no checkpoint ({ckpt.name}), so it is not a stopped "
                "`ggnd finetune` run; choose another --output or pass --overwrite (without --resume)"
            )
        return
    if ckpt.exists():
        raise OutputExistsError(
            f"--output {out} has the checkpoint of an earlier run ({ckpt.name}); pass --resume to continue "
            "it or --overwrite to start again"
        )
    if out.exists():
        raise OutputExistsError(f"--output {out} already exists; pass --overwrite to replace it")


def finetune(
    adapter: HostAdapter,
    model: nn.Module,
    train: Sequence,
    valid: Sequence | None,
    out: Path,
    settings: FinetuneSettings,
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    inputs: Iterable[tuple[str, Any]] = (),
    ranks=None,
) -> FinetuneResult:
    """Train ``model`` on ``train`` (energy + force loss), checkpointing every epoch next to ``out``.

    The best model on the validation set (or the last, without one) is saved with the adapter to
    ``out``. With ``resume`` the run continues from the checkpoint and reaches the same result, bit for
    bit, as an uninterrupted run with the same settings (a run killed before its first checkpoint
    starts again). ``out`` must not exist unless resuming its run or ``overwrite``; ``inputs``
    ((argument, path) pairs) are never written. Every file is written atomically and the output is
    locked against a second run.

    ``ranks`` (:class:`ggnd_plugin.distributed.Ranks` of a torchrun job): train data-parallel with
    ``DistributedDataParallel``; rank 0 writes, every rank returns the same result.
    """
    import contextlib

    from tqdm.auto import tqdm

    out = Path(out)
    if ranks is None:
        with output_lock(out, folder=False):
            check_finetune_output(out, inputs, resume=resume, overwrite=overwrite)
            return _finetune(adapter, model, train, valid, out, settings, resume, progress, overwrite, tqdm)
    with contextlib.ExitStack() as stack:

        def lock_and_check():
            stack.enter_context(output_lock(out, folder=False))
            check_finetune_output(out, inputs, resume=resume, overwrite=overwrite)

        ranks.agree(lock_and_check)
        return _finetune(
            adapter,
            model,
            train,
            valid,
            out,
            settings,
            resume,
            progress and ranks.is_main,
            overwrite,
            tqdm,
            ranks,
        )


class _Predictor(nn.Module):
    """``adapter.predict`` as a module, so that ``DistributedDataParallel`` sees the forward pass."""

    def __init__(self, adapter: HostAdapter, model: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.model = model

    def forward(self, structures):
        prediction = self.adapter.predict(self.model, structures, training=True)
        return prediction.energy, prediction.forces


def _share_loss(predictor, batch: Sequence, settings: FinetuneSettings, ranks) -> torch.Tensor:
    """This rank's part of the loss of ``batch`` (the global batch), weighted so that DDP's average of
    the ranks' gradients is the gradient of the single-process loss of the whole batch.

    A rank whose share is empty (a last batch smaller than the number of ranks) computes a frame with
    weight 0: DDP needs every rank's backward pass.
    """
    share = list(batch[ranks.rank :: ranks.world_size])
    weight = 1.0
    if not share:
        share, weight = list(batch[:1]), 0.0
    energy, forces = predictor(share)
    e_ref, f_ref, n_atoms = _targets(share, energy.device, energy.dtype)
    total_atoms = sum(len(atoms) for atoms in batch)
    energy_term = (((energy - e_ref) / n_atoms) ** 2).sum() / len(batch)
    forces_term = ((forces - f_ref) ** 2).sum() / (3 * total_atoms)
    loss = settings.energy_weight * energy_term + settings.forces_weight * forces_term
    return loss * (weight * ranks.world_size)


def _check_in_sync(model: nn.Module, ranks) -> None:
    """Every rank ends with the same parameters (DDP's promise); a difference is an error, not a warning."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().flatten().double().cpu() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(ranks.world_size)]
    dist.all_gather(gathered, flat, group=ranks.control)
    spread = max(float((g - gathered[0]).abs().max()) for g in gathered)
    if spread > 0:
        raise GGNDError(f"the {ranks.world_size} ranks ended with different parameters (up to {spread:.3g})")


def _finetune(adapter, model, train, valid, out, settings, resume, progress, overwrite, tqdm, ranks=None):
    v.check_frames(train, "training structures")
    if valid is not None and len(valid) == 0:
        valid = None
    if valid is None and (settings.monitor == "forces" or settings.patience is not None):
        raise GGNDError("--patience and --monitor forces follow the validation set: give --valid")
    ckpt = checkpoint_path(out)
    main = ranks is None or ranks.is_main
    if overwrite and ckpt.exists() and main:
        ckpt.unlink()  # the old run must not be mixed into the new one
    if ranks is not None:
        ranks.barrier()
    params = trainable_parameters(adapter, model, settings.freeze_host)
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    result = FinetuneResult(
        trained_parameters=sum(p.numel() for p in params),
        frozen_parameters=sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in params),
    )
    rng = random.Random(settings.seed)
    torch.manual_seed(settings.seed)
    start_epoch, best = 0, math.inf

    def save_checkpoint(epoch: int) -> None:
        if not main:
            return
        state = {
            "epoch": epoch,
            "best": best,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "python_rng": rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "history": [asdict(r) for r in result.history],
            "settings": asdict(settings),
            "best_epoch": result.best_epoch,
            "stopped_early": result.stopped_early,
        }
        atomic_torch_save(state, ckpt)

    if resume and ckpt.exists():
        state = verified_torch_load(ckpt, "fine-tuning checkpoint")
        if not isinstance(state, dict) or not {"epoch", "model", "settings"} <= set(state):
            raise GGNDError(f"{ckpt}: not a checkpoint of `ggnd finetune`; it was not loaded")
        if {**_SETTINGS_ADDED, **state["settings"]} != asdict(settings):
            raise GGNDError(f"--resume: {ckpt} was written with other settings: {state['settings']}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best = state["epoch"], state["best"]
        result.history = [EpochRecord(**record) for record in state["history"]]
        result.best_epoch = state.get("best_epoch", _best_epoch(result.history, settings))
        result.stopped_early = state.get("stopped_early", False)
    else:
        # Epoch 0: written before OUTPUT can exist, so an OUTPUT without a checkpoint is never ours.
        save_checkpoint(0)
    predictor = None
    if ranks is not None:
        from torch.nn.parallel import DistributedDataParallel

        ranks.barrier()  # the checkpoint every rank resumed from is read before rank 0 replaces it
        predictor = DistributedDataParallel(_Predictor(adapter, model))

    epochs = range(start_epoch, settings.epochs if not result.stopped_early else start_epoch)
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
            if predictor is None:
                loss = loss_of(adapter, model, batch, settings, training=True)
                value = loss.detach()
            else:
                import torch.distributed as dist

                loss = _share_loss(predictor, batch, settings, ranks)
                value = loss.detach().clone()
                dist.all_reduce(value)  # the batch loss, the same number on every rank
                value = value / ranks.world_size
            if not torch.isfinite(value):
                raise GGNDError(f"epoch {epoch + 1}: the loss became {value.item()}; lower --lr")
            loss.backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            total += value.item() * len(batch)
            count += len(batch)
        record = EpochRecord(epoch=epoch + 1, train_loss=total / count, valid_loss=None)
        if valid:
            model.eval()
            metrics = evaluate(adapter, model, valid, settings.batch_size)
            record.valid_loss = validation_loss(adapter, model, valid, settings)
            record.valid_energy_mae = metrics["energy_per_atom_mae"]
            record.valid_forces_mae = metrics["forces_mae"]
        result.history.append(record)
        score = _score(record, settings)
        if score < best:
            best, result.best_epoch = score, epoch + 1
            # Before the checkpoint: a kill between the two repeats this epoch, which saves it again.
            if main:
                save_model(adapter, model, out)
        if settings.patience is not None and epoch + 1 - result.best_epoch >= settings.patience:
            result.stopped_early = epoch + 1 < settings.epochs
        bar.set_postfix(train=f"{record.train_loss:.4g}", valid=f"{record.valid_loss or float('nan'):.4g}")
        save_checkpoint(epoch + 1)
        if ranks is not None:
            ranks.barrier()  # no rank starts the next epoch before rank 0 has written this one
        if result.stopped_early:
            break
    bar.close()
    if ranks is not None:
        _check_in_sync(model, ranks)
    if not out.exists():
        raise GGNDError(
            f"{out}: the run finished (checkpoint {ckpt.name}) but its model file is missing; "
            "pass --overwrite to train again"
        )
    return result


def _score(record: EpochRecord, settings: FinetuneSettings) -> float:
    """What the kept model and patience follow (lower is better)."""
    if settings.monitor == "forces":
        return record.valid_forces_mae
    return record.valid_loss if record.valid_loss is not None else record.train_loss


def _best_epoch(history: Sequence[EpochRecord], settings: FinetuneSettings) -> int:
    """The epoch of the kept model, from the history (checkpoints written before best_epoch was saved)."""
    best, epoch = math.inf, 0
    for record in history:
        if _score(record, settings) < best:
            best, epoch = _score(record, settings), record.epoch
    return epoch


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
