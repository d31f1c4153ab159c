"""``ggnd stability`` and ``ggnd finetune`` across processes, GPUs and nodes with ``torch.distributed``.

torchrun (or ``srun`` with torchrun's variables) starts one process per device and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`from_environment` joins the
job through that ``env://`` rendezvous: gloo on the CPU, nccl on CUDA (each rank on ``cuda:LOCAL_RANK``).

The ranks share nothing but a few small collectives: rank 0 checks and locks the output folder and
tells the others whether to go on (:meth:`Ranks.agree`), every rank runs its shard of the replicas and
writes its own checkpoint file, and a barrier at the end tells rank 0 that all checkpoints are final;
rank 0 then reads every rank's checkpoint (so ``--out`` must be on a file system all ranks see) and
writes the results. Results travel through the checkpoints rather than through collectives so that a
rank that dies leaves its progress behind: rank 0 reports its replicas as unfinished and ``--resume``
runs only those, with any number of ranks.

Control messages use a gloo process group even when the MD runs on nccl: a CPU barrier with a long
timeout (ranks finish their shards hours apart in a large study) that fails at once, instead of hanging,
when a peer process is gone.

``ggnd finetune`` uses the same rendezvous and wraps the model in ``DistributedDataParallel``
(:mod:`ggnd_plugin.training`).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from ggnd_plugin.errors import GGNDError

# Ranks of a large study finish their shards at different times; the end barrier must outwait that.
CONTROL_TIMEOUT = timedelta(days=7)
_STOP = {"requested": False}


def launched() -> bool:
    """True inside a torchrun job of more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


@dataclass
class Ranks:
    """This process's place in the job, and the collectives the stability run needs."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    control: object = field(default=None, repr=False)  # the gloo group for control messages

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, check) -> None:
        """Run ``check()`` on rank 0 and raise its :class:`GGNDError` on every rank (nothing on success)."""
        import torch.distributed as dist

        message = [None]
        if self.rank == 0:
            try:
                check()
            except GGNDError as error:
                message[0] = str(error)
        dist.broadcast_object_list(message, src=0, group=self.control)
        if message[0] is not None:
            raise GGNDError(message[0])

    def barrier(self) -> bool:
        """Wait for every rank; False (at once) when a peer process is gone."""
        import torch.distributed as dist

        try:
            dist.barrier(group=self.control)
        except Exception:  # gloo: "Connection closed by peer" and similar, whatever the wording
            return False
        return True

    def should_stop(self) -> bool:
        return _STOP["requested"]

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _on_stop(signum, frame) -> None:
    # torchrun sends SIGTERM to every rank when one fails, and SLURM when the job is cancelled: finish
    # the current step, save the checkpoint, let rank 0 report what is unfinished.
    _STOP["requested"] = True


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for ``cuda``; the CPU stays the CPU."""
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise GGNDError(
            f"--device {device} under torchrun: give --device cuda, and each rank uses cuda:LOCAL_RANK"
        )
    if local_rank >= torch.cuda.device_count():
        raise GGNDError(
            f"rank with LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
            "start at most one process per GPU (torchrun --nproc-per-node)"
        )
    return torch.device("cuda", local_rank)


def from_environment(device: torch.device, stop_on_sigterm: bool = True) -> Ranks | None:
    """Join the torchrun job described by the environment; None when this is a single process.

    ``stop_on_sigterm``: SIGTERM (torchrun stopping the job because a rank failed, or a cancelled
    scheduler job) sets a flag that :meth:`Ranks.should_stop` reports, so the stability loop can save
    its checkpoint first; without it SIGTERM ends the process as usual.
    """
    if not launched():
        return None
    import torch.distributed as dist

    missing = [n for n in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if n not in os.environ]
    if missing:
        raise GGNDError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: start the job with torchrun (or srun with "
            "torchrun's variables), see docs/scale.md"
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    device = rank_device(device, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, init_method="env://", device_id=device if backend == "nccl" else None
        )
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    if stop_on_sigterm:
        signal.signal(signal.SIGTERM, _on_stop)
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, backend, device, control)
