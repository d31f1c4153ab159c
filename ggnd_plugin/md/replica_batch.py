"""The replicas of a model that run together in one batched TorchSim state, one step at a time.

Every replica in the batch carries its own step count, criterion window and (Langevin) noise stream,
so its trajectory does not depend on which replicas share its batch or when it joined. After each step
the criterion is evaluated on the device for the whole batch; a replica that fails (criterion
exceeded, or a non-finite position, momentum, energy or force) or reaches the horizon is recorded in
the model's :class:`~ggnd_plugin.md.records.ReplicaRecords` and leaves the batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ggnd_plugin.md.batched_states import keep_systems, replica_tensors
from ggnd_plugin.md.failure_frames import FailureFrames, FrameRing, replica_frames
from ggnd_plugin.md.seeds import noise_seed
from ggnd_plugin.md.windows import BatchWindows

if TYPE_CHECKING:
    from ggnd_plugin.md.integrators import ProtocolIntegrator
    from ggnd_plugin.md.monitors import ReplicaMonitor
    from ggnd_plugin.md.protocol import StabilityProtocol
    from ggnd_plugin.md.records import ReplicaRecords


class ReplicaBatch:
    """The batch: ``state``, the plan indices of its systems in order (``active``), their steps
    (``active_steps``), temperatures, noise streams and windows.

    ``bar`` (a tqdm bar, set by the run) counts replica-steps, a failed replica's remaining ones included.
    """

    def __init__(
        self,
        model,
        integrator: ProtocolIntegrator,
        monitor: ReplicaMonitor,
        records: ReplicaRecords,
        protocol: StabilityProtocol,
        n_atoms: int,
        failure_frames: FailureFrames | None = None,
    ):
        self.model = model
        self.integrator = integrator
        self.monitor = monitor
        self.records = records
        self.plan = records.plan
        self.protocol = protocol
        self.n_atoms = n_atoms
        self.device = model.device
        self.dtype = model.dtype
        self.windows = BatchWindows(self.device, self.dtype)
        self.ring = FrameRing(failure_frames or FailureFrames(), n_atoms, self.device, self.dtype)
        self.step = 0  # iterations of this process (every active replica advances one step per iteration)
        self.replica_steps = 0
        self.generators: dict[int, torch.Generator] = {}
        self.active: list[int] = []
        self.state = None
        self.bar = None

    # -- joining and leaving ----------------------------------------------------------------------
    def activate(self, members: list[int], state, evaluated: bool = False) -> np.ndarray:
        """Append ``members`` (the last systems of ``state``) to the batch; returns the replicas that fail
        their start check, as a mask over the whole batch.

        Restored members bring their windows and noise streams; new ones start them, get their forces
        (unless ``evaluated``: the integrator's init computed them) and are checked at step 0.
        """
        first = len(self.active)
        n = first + len(members)
        if state.n_atoms != n * self.n_atoms:  # per-replica rows are sliced by position below
            raise RuntimeError(f"batch of {state.n_systems} systems holds {state.n_atoms} atoms")
        self.state = state
        fresh = [p for p, i in enumerate(members, start=first) if i not in self.records.saved]
        if fresh and not evaluated:
            rows = torch.as_tensor(fresh, device=self.device)
            output = self.model(state[rows])
            atoms = torch.isin(state.system_idx, rows)
            state.energy[rows] = output["energy"].detach().to(state.energy.dtype)
            state.forces[atoms] = output["forces"].detach().to(state.forces.dtype)
        saved = [self.records.saved.pop(i, None) for i in members]
        self.monitor.append([None if s is None else s["monitor"] for s in saved])
        self.windows.add([None if s is None else s["accumulators"] for s in saved], first)
        self.ring.add([None if s is None else s.get("frames") for s in saved])
        if self.integrator.stochastic:
            for index, entry in zip(members, saved, strict=True):
                generator = torch.Generator(device=self.device)
                if entry is None:
                    generator.manual_seed(noise_seed(self.plan[index].seed))
                else:
                    generator.set_state(entry["rng"])
                self.generators[index] = generator
        self.active = self.active + list(members)
        self.active_steps = self.records.steps[self.active].copy()
        self._temperatures()
        leaving = np.zeros(n, dtype=bool)
        if fresh:
            failed, finite = self._check(np.asarray(fresh), initial=True)
            failed = failed.cpu().numpy()
            if failed.any():
                where = np.asarray(fresh)[failed]
                self._fail(where, finite.cpu().numpy()[failed])
                leaving[where] = True
            # step 0 is the start frame: the first frame a failure can show
            self.ring.record(state, self.active_steps[fresh], np.asarray(fresh))
        return leaving

    def _temperatures(self) -> None:
        self.temperatures = torch.tensor(
            [self.plan[i].temperature for i in self.active], device=self.device, dtype=self.dtype
        )

    def keep(self, keep: np.ndarray) -> None:
        """Keep the bookkeeping of the replicas ``keep`` (a mask); the state is the caller's."""
        keep_t = torch.as_tensor(np.nonzero(keep)[0], device=self.device)
        for index in np.asarray(self.active)[~keep]:
            self.generators.pop(int(index), None)
        self.active = [i for i, k in zip(self.active, keep, strict=True) if k]
        self.active_steps = self.active_steps[keep]
        self.windows.keep(keep_t, keep)
        self.monitor.keep(keep_t, keep)
        self.ring.keep(keep_t, keep)
        self._temperatures()

    def drop(self, leaving: np.ndarray) -> None:
        """Remove the replicas ``leaving`` (a mask) from the state and the bookkeeping."""
        keep = ~leaving
        if keep.any():
            self.state = keep_systems(self.state, torch.as_tensor(np.nonzero(keep)[0], device=self.device))
        else:
            self.state = None
        self.keep(keep)

    # -- per step ---------------------------------------------------------------------------------
    def advance(self) -> np.ndarray:
        """One step of every replica in the batch; returns the mask of those that leave it."""
        generators = [self.generators[i] for i in self.active] if self.integrator.stochastic else ()
        self.state = self.integrator.step(self.state, self.model, self.temperatures, generators)
        n = len(self.active)
        self.step += 1
        self.replica_steps += n
        self.active_steps += 1
        self.bar.update(n)
        failed, finite = self._check()
        leaving = np.zeros(n, dtype=bool)
        if bool(failed.any()):  # the one host sync per step
            failed_np = failed.cpu().numpy()
            where = np.nonzero(failed_np)[0]
            self._fail(where, finite.cpu().numpy()[where])
            leaving |= failed_np
        # after the failures took their frames: a ring holds only steps before its replica's failure
        self.ring.record(self.state, self.active_steps)
        due = (self.active_steps % self.protocol.record_every_steps == 0) & ~leaving
        if due.any():
            where = np.nonzero(due)[0]
            self._flush(where)
            self.windows.reset(where)
        finished = (self.active_steps >= self.protocol.n_steps) & ~leaving
        if finished.any():
            self._finish(np.nonzero(finished)[0])
            leaving |= finished
        self.records.steps[self.active] = self.active_steps
        return leaving

    def _per_system_finite(self, rows: torch.Tensor | None) -> torch.Tensor:
        state = self.state
        n = state.n_systems

        def per_system(tensor):
            values = torch.isfinite(tensor).reshape(n, -1).all(dim=1)
            return values if rows is None else values[rows]

        finite = per_system(state.positions) & per_system(state.momenta) & per_system(state.forces)
        energy = torch.isfinite(state.energy)
        return finite & (energy if rows is None else energy[rows])

    def _check(self, rows: np.ndarray | None = None, initial: bool = False):
        """Criterion and finiteness for the batch (or its ``rows``): (failed, finite) on the device."""
        state = self.state
        n = len(self.active)
        positions = state.positions.reshape(n, self.n_atoms, 3)
        cell = state.row_vector_cell
        rows_t = None if rows is None else torch.as_tensor(rows, device=self.device)
        if rows_t is not None:
            positions, cell = positions[rows_t], cell[rows_t]
        steps = self.active_steps if rows is None else self.active_steps[rows]
        deviation, decided = self.monitor.update(steps, positions, cell, rows)
        finite = self._per_system_finite(rows_t)
        deviation = torch.where(finite, deviation, torch.full_like(deviation, float("inf")))
        failed = ~finite | (decided & (deviation > self.monitor.threshold))
        self.windows.track_maximum(deviation, rows_t)
        if not initial:  # only whole-batch checks accumulate windows
            self.windows.accumulate(deviation, state)
        return failed, finite

    # -- into the records -------------------------------------------------------------------------
    def _flush(self, positions: np.ndarray) -> None:
        """Append the current window of the replicas at ``positions`` to their time series."""
        positions, maxima, temperatures, energies = self.windows.means(positions)
        for k, position in enumerate(positions):
            self.records.append_window(
                self.active[position],
                int(self.active_steps[position]),
                maxima[k],
                temperatures[k],
                energies[k],
            )

    def _fail(self, positions: np.ndarray, finite: np.ndarray) -> None:
        self._flush(positions)
        run_max = self.windows.run_maxima()
        for position, is_finite in zip(positions, finite, strict=True):
            step = int(self.active_steps[position])
            failure = self.monitor.kind if is_finite else "non-finite"
            frames = replica_frames(self.ring, self.state, int(position), step, self.n_atoms)
            self.records.fail(self.active[int(position)], failure, step, run_max[int(position)], frames)
            self.bar.update(self.protocol.n_steps - step)

    def _finish(self, positions: np.ndarray) -> None:
        self._flush(positions)
        run_max = self.windows.run_maxima()
        for position in positions:
            step = int(self.active_steps[position])
            self.records.finish(self.active[int(position)], step, run_max[int(position)])

    # -- checkpoints ------------------------------------------------------------------------------
    def saved_state(self, position: int) -> tuple[int, dict[str, Any]]:
        """(step, what a checkpoint entry keeps of the replica at ``position``: state, noise, windows)."""
        generator = self.generators.get(self.active[position])
        return int(self.active_steps[position]), {
            "state": replica_tensors(self.state, position, self.n_atoms),
            "rng": None if generator is None else generator.get_state(),
            "monitor": self.monitor.saved(position),
            "accumulators": self.windows.saved(position),
            "frames": self.ring.saved(position),
        }
