"""How a model's replicas are grouped into batches (:class:`Batching`), and running them in those groups.

No replica's result depends on its batch (each carries its own steps, windows and noise stream), so
the grouping only decides how full the device is: one batch per model, TorchSim's
``BinningAutoBatcher`` bins one after another, or its ``InFlightAutoBatcher`` refilling the batch as
replicas fail or finish.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError
from ggnd_plugin.md.batched_states import batch_from_tensors, started_batch, unstarted_state

if TYPE_CHECKING:
    from ggnd_plugin.md.protocol import ReplicaSpec
    from ggnd_plugin.md.replica_batch import ReplicaBatch

BATCHING_MODES = ("off", "binning", "in-flight")


@dataclass
class Batching:
    """How a model's replicas are grouped into batches; no replica's result depends on it (up to round-off).

    ``mode``:

    * ``"off"``: every replica of a model in one batch (what fits in memory is the user's business).
    * ``"binning"``: TorchSim's ``BinningAutoBatcher`` packs the replicas into bins of at most
      ``max_atoms`` atoms that run one after another; a bin runs until its last replica fails or
      reaches the horizon, so it empties as replicas fail.
    * ``"in-flight"``: TorchSim's ``InFlightAutoBatcher`` keeps a batch of at most ``max_atoms`` atoms
      and refills it from the waiting replicas whenever replicas fail or finish, so the device stays full.

    ``max_atoms`` is TorchSim's ``max_memory_scaler`` with ``memory_scales_with="n_atoms"``: every replica
    is the same system, so its memory is proportional to its atom count. ``None`` lets TorchSim measure
    what the device holds (forward passes of growing batches until CUDA runs out of memory; CUDA only).
    """

    mode: str = "off"
    max_atoms: int | None = None

    def validate(self, n_atoms: int, device: torch.device, ensemble: str) -> None:
        if self.mode not in BATCHING_MODES:
            raise GGNDError(f"unknown batching '{self.mode}' (choose from {', '.join(BATCHING_MODES)})")
        if self.mode == "off":
            return
        if self.max_atoms is None:
            if torch.device(device).type != "cuda":
                raise GGNDError(
                    "autobatching on the CPU needs --max-batch-atoms: TorchSim measures what a device holds "
                    "only on CUDA"
                )
        else:
            v.check_value(v.positive_int, self.max_atoms, "max_batch_atoms")
            if self.max_atoms < n_atoms:
                raise GGNDError(
                    f"--max-batch-atoms {self.max_atoms} is smaller than one replica ({n_atoms} atoms)"
                )
        if self.mode == "in-flight" and ensemble == "nvt-nose-hoover":
            raise GGNDError(
                "in-flight autobatching does not run Nose-Hoover chains (TorchSim joins states with one "
                "global thermostat); use nve or nvt-langevin, or batching 'binning'"
            )


class BatchScheduler:
    """Runs replicas through a model's :class:`ReplicaBatch` in the groups ``batching`` makes.

    ``after_step`` is called after every step of the batch (checkpoints, stop requests).
    """

    def __init__(
        self,
        batching: Batching,
        batch: ReplicaBatch,
        frames_for: Callable[[ReplicaSpec], object],
        after_step: Callable[[], None],
    ):
        self.batching = batching
        self.batch = batch
        self.frames_for = frames_for
        self.after_step = after_step
        self.model = batch.model
        self.plan = batch.plan
        self.integrator = batch.integrator
        self.device, self.dtype = batch.device, batch.dtype

    @property
    def saved(self) -> dict[int, dict]:
        """Checkpoint entries of restored replicas not yet back in a batch."""
        return self.batch.records.saved

    def run(self, restored: list[int], fresh: list[int]) -> None:
        """Run the ``restored`` replicas (they continue from their entries) and the ``fresh`` ones."""
        if self.batching.mode == "in-flight":
            if restored or fresh:
                self._run_in_flight(restored + fresh)
            return
        groups = []
        for members in (restored, fresh):
            if members:
                groups += self._bins(members) if self.batching.mode == "binning" else [members]
        for group in groups:
            self._run_group(group)

    def _single_states(self, order: Sequence[int]):
        for index in order:
            if index in self.saved:
                yield batch_from_tensors(
                    [self.saved[index]["state"]], self.integrator, self.device, self.dtype
                )
            else:
                spec = self.plan[index]
                yield unstarted_state(self.frames_for(spec), spec, self.device, self.dtype)

    def _bins(self, members: list[int]) -> list[list[int]]:
        import torch_sim as ts
        from torch_sim.autobatching import BinningAutoBatcher

        batcher = BinningAutoBatcher(
            self.model, memory_scales_with="n_atoms", max_memory_scaler=self.batching.max_atoms
        )
        batcher.load_states(ts.concatenate_states(list(self._single_states(members))))
        return [[members[k] for k in sorted(bin_)] for bin_ in batcher.index_bins]

    def _run_group(self, group: list[int]) -> None:
        """One fixed batch, run until every replica in it has failed or reached the horizon."""
        batch = self.batch
        if group[0] in self.saved:
            state = batch_from_tensors(
                [self.saved[i]["state"] for i in group], self.integrator, self.device, self.dtype
            )
            leaving = batch.activate(group, state)
        else:
            specs = [self.plan[i] for i in group]
            frames = [self.frames_for(spec) for spec in specs]
            state = started_batch(frames, specs, self.integrator, self.model, self.device, self.dtype)
            leaving = batch.activate(group, state, evaluated=True)
        if leaving.any():
            batch.drop(leaving)
        while batch.active:
            leaving = batch.advance()
            if leaving.any():
                batch.drop(leaving)
            self.after_step()

    def _run_in_flight(self, order: list[int]) -> None:
        from torch_sim.autobatching import InFlightAutoBatcher

        batch = self.batch
        batcher = InFlightAutoBatcher(
            self.model, memory_scales_with="n_atoms", max_memory_scaler=self.batching.max_atoms
        )
        batcher.load_states(self._single_states(order))
        state, _ = batcher.next_batch(None, None)
        leaving = batch.activate([order[k] for k in batcher.current_idx], state)
        while True:
            while leaving.any():
                keep = ~leaving
                state, _ = batcher.next_batch(batch.state, torch.as_tensor(leaving, device=self.device))
                batch.keep(keep)
                if state is None:
                    batch.state = None
                    return
                kept = len(batch.active)
                newcomers = [order[k] for k in batcher.current_idx[kept:]]
                # the bookkeeping here follows the batcher's order (kept systems, then new ones); a
                # TorchSim version that reorders would silently mix up replicas
                if [order[k] for k in batcher.current_idx[:kept]] != batch.active:
                    raise RuntimeError("TorchSim's InFlightAutoBatcher reordered the batch")
                leaving = batch.activate(newcomers, state)
            if not batch.active:
                return
            leaving = batch.advance()
            self.after_step()
