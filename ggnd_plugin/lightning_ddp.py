"""A Lightning callback for GGND models trained with DDP (``nequip-train``, ``spktrain``; docs/scale.md).

DDP keeps replicas of the model in step by averaging gradients; a parameter that some rank never uses,
or a rank that sees a different model, silently breaks that. :class:`GGNDParameterCheck` compares the
GGND block parameters of every rank at the end of training (``all_gather``), fails the run if they
differ, and writes each rank's GGND parameters at the start and the end of training to
``DIRPATH/ggnd_parameters.rankR.pt``, so a test (or a user) can see that the block was trained and that
all ranks agree. Add it to the trainer's callbacks:

* nequip-train: ``trainer.callbacks: [..., {_target_: ggnd_plugin.lightning_ddp.GGNDParameterCheck}]``
* spktrain: ``+callbacks.ggnd_check._target_=ggnd_plugin.lightning_ddp.GGNDParameterCheck``
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback

from ggnd_plugin.block import GGNDBlock


def ggnd_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> a CPU copy of every parameter inside a GGND block of ``module`` (either numerics version).

    Blocks of models loaded from NequIP packages are instances too: packages extern ``ggnd_plugin.block``.
    """
    found = {}
    for prefix, child in module.named_modules():
        if isinstance(child, GGNDBlock):
            for name, parameter in child.named_parameters():
                found[f"{prefix}.{name}"] = parameter.detach().cpu().clone()
    return found


class GGNDParameterCheck(Callback):
    """Fail a DDP run whose ranks end with different GGND parameters; record them per rank.

    Args:
        dirpath: folder for ``ggnd_parameters.rankR.pt`` (default: the trainer's ``default_root_dir``).
        tolerance: largest difference between ranks accepted (0: bit-identical, which DDP gives).
    """

    def __init__(self, dirpath: str | None = None, tolerance: float = 0.0):
        self.dirpath = dirpath
        self.tolerance = float(tolerance)
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = ggnd_parameters(pl_module)
        if not self.start:
            raise RuntimeError("GGNDParameterCheck: the model being trained has no GGND block")

    def on_train_end(self, trainer, pl_module) -> None:
        end = ggnd_parameters(pl_module)
        flat = torch.cat([value.flatten().double() for value in end.values()])
        gathered = pl_module.all_gather(flat.to(pl_module.device)).reshape(-1, flat.numel()).cpu()
        spread = float((gathered - gathered[0]).abs().max())
        change = max(float((end[name] - self.start[name]).abs().max()) for name in end)
        folder = Path(self.dirpath or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "start": self.start,
            "end": end,
            "max_difference_between_ranks": spread,
            "max_change": change,
        }
        torch.save(record, folder / f"ggnd_parameters.rank{trainer.global_rank}.pt")
        if trainer.is_global_zero:
            print(
                f"GGND parameters over {trainer.world_size} rank(s): largest difference between ranks {spread:.3g}, "
                f"largest change in training {change:.3g}"
            )
        if spread > self.tolerance:
            raise RuntimeError(
                f"GGND parameters differ between DDP ranks by up to {spread:.3g} (tolerance {self.tolerance})"
            )
