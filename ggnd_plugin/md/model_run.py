"""The replicas of one model in this process: their records, their batch, the progress bar, checkpoints.

:class:`ModelRun` ties the pieces together: :class:`~ggnd_plugin.md.records.ReplicaRecords` (what each
replica has recorded), :class:`~ggnd_plugin.md.replica_batch.ReplicaBatch` (the replicas stepping now),
:class:`~ggnd_plugin.md.batching.BatchScheduler` (which replicas run together) and the checkpoint file
it writes every ``checkpoint_every_steps`` iterations and when stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ggnd_plugin.md.batching import Batching, BatchScheduler
from ggnd_plugin.md.checkpoints import write_checkpoint
from ggnd_plugin.md.failure_frames import FailureFrames
from ggnd_plugin.md.integrators import ProtocolIntegrator
from ggnd_plugin.md.monitors import ReplicaMonitor
from ggnd_plugin.md.protocol import ReplicaSpec, StabilityProtocol
from ggnd_plugin.md.records import ReplicaRecords
from ggnd_plugin.md.replica_batch import ReplicaBatch
from ggnd_plugin.md.shards import StopRequested


class ModelRun:
    """Replicas of one model: batches, per-replica records and windows, checkpointing.

    ``plan`` is the model's whole plan (checkpoints record it); ``indices`` the plan entries this
    process runs (all by default; a rank's shard under torchrun). ``carry`` holds entries of this
    process's checkpoint file that it does not run now: they are written back unchanged, so a
    resume with another number of ranks never drops a replica's progress.
    """

    def __init__(
        self,
        name: str,
        model,
        plan: Sequence[ReplicaSpec],
        frames_for: Callable[[ReplicaSpec], Any],
        monitor,
        protocol: StabilityProtocol,
        checkpoint: Path | None,
        progress: bool,
        batching: Batching | None = None,
        indices: Sequence[int] | None = None,
        carry: Mapping[int, dict] | None = None,
        should_stop: Callable[[], bool] | None = None,
        failure_frames: FailureFrames | None = None,
    ):
        self.name = name
        self.model = model
        self.plan = plan
        self.protocol = protocol
        self.checkpoint = checkpoint
        self.progress = progress
        self.indices = list(range(len(plan))) if indices is None else list(indices)
        self.carry = dict(carry or {})
        self.should_stop = should_stop
        self.failure_frame_settings = failure_frames or FailureFrames()
        self.assignment: dict[int, int] = {}  # plan index -> rank, under torchrun
        self.integrator = ProtocolIntegrator(protocol, model.device, model.dtype)
        self.monitor = ReplicaMonitor(monitor, model.device, model.dtype)
        self.records = ReplicaRecords(plan, protocol)
        n_atoms = len(frames_for(plan[0]))
        self.batch = ReplicaBatch(
            model, self.integrator, self.monitor, self.records, protocol, n_atoms, self.failure_frame_settings
        )
        self.scheduler = BatchScheduler(batching or Batching(), self.batch, frames_for, self._after_step)

    @property
    def series(self) -> list[dict[str, list]]:
        """Each plan entry's windowed time series so far."""
        return self.records.series

    @property
    def step(self) -> int:
        """Iterations of this process (every replica in the batch advances one step per iteration)."""
        return self.batch.step

    @property
    def replica_steps(self) -> int:
        return self.batch.replica_steps

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """A fresh run of this process's replicas (the run itself happens in :meth:`run`)."""
        self.records.start(self.indices)

    def restore(self, entries: Mapping[int, dict]) -> None:
        """Continue from checkpoint entries (plan index -> newest entry); missing ones start afresh."""
        self.records.restore(self.indices, entries)

    @property
    def pending(self) -> list[int]:
        return [i for i in self.indices if not self.records.done[i]]

    def run(self) -> None:
        from tqdm.auto import tqdm

        records = self.records
        pending = self.pending
        restored = [i for i in pending if i in records.saved]
        fresh = [i for i in pending if i not in records.saved]
        n_steps = self.protocol.n_steps
        bar = tqdm(
            total=len(self.indices) * n_steps,
            initial=int(sum(n_steps if records.done[i] else records.steps[i] for i in self.indices)),
            desc=self.name,
            unit="replica-step",
            unit_scale=True,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        self.batch.bar = bar
        try:
            self.scheduler.run(restored, fresh)
            bar.set_postfix(
                failed=f"{sum(records.records[i]['failed'] for i in self.indices)}", refresh=False
            )
        finally:
            bar.close()
        self.save(finished=True)

    def _after_step(self) -> None:
        if self.step % self.protocol.checkpoint_every_steps == 0:
            self.save(finished=False)
        if self.should_stop is not None and self.should_stop():
            self.save(finished=False)
            raise StopRequested(f"stopped by a signal at step {self.step} of model '{self.name}'")

    # -- checkpoints ------------------------------------------------------------------------------------
    def save(self, finished: bool) -> None:
        if self.checkpoint is None:
            return
        positions = {index: position for position, index in enumerate(self.batch.active)}
        entries = dict(self.carry)
        for index in self.indices:
            entry = self.records.entry(index)
            if entry is None and index in positions:
                step, batch_state = self.batch.saved_state(positions[index])
                entry = self.records.active_entry(index, step, batch_state)
            if entry is not None:
                entries[index] = entry
        write_checkpoint(
            self.checkpoint,
            self.name,
            self.protocol,
            self.plan,
            self.monitor.describe(),
            self.step,
            bool(finished and all(self.records.done[i] for i in self.indices)),
            self.indices,
            entries,
            self.failure_frame_settings,
        )

    # -- results ----------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        return self.records.rows(self.name, self.indices)

    def series_arrays(self) -> dict[str, dict[str, np.ndarray]]:
        return self.records.series_arrays(self.name, self.indices)

    def failure_frames(self) -> dict[str, dict[str, Any]]:
        """The last frames of each failed replica, by series key."""
        return self.records.failure_frames(self.name, self.indices)
