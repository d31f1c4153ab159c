"""Many-replica MD stability runs on TorchSim (protocol of docs/stability.md, paper section 4.1).

Replicas of a model run in batched TorchSim states with per-system temperatures. The loop is built on
TorchSim's integrator init/step functions (``ts.integrate`` cannot stop one system early): after each
step the instability criterion is evaluated on the device for all replicas at once, and a failed
replica (criterion exceeded, or a non-finite position, momentum, energy or force) is recorded with its
exact failure step and leaves the batch, so no compute is spent on it and it cannot disturb the others.

Every replica carries its own step count, criterion window and (Langevin) noise stream, so its
trajectory does not depend on the batch it runs in. That is what lets the same plan run

* in one batch per model (the default),
* in batches sized by TorchSim's autobatchers (:class:`Batching`: ``BinningAutoBatcher`` bins run one
  after another, or ``InFlightAutoBatcher``, which refills the batch as replicas fail or finish),
* sharded over the ranks of a ``torchrun`` job (:mod:`ggnd_plugin.distributed`),

with the same per-replica results. Checkpoints hold one entry per replica (written atomically every few
hundred steps); ``resume=True`` continues every unfinished replica from its newest entry, whichever
process wrote it, and a stopped single-process run continues bit for bit.

Replicas are seeded from (seed, temperature, replica index) only, never from the model or the rank, so
two models run with the same protocol start from the same frames with the same velocities (a paired
comparison).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ggnd_plugin import provenance
from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError
from ggnd_plugin.md.batched_states import (
    batch_from_tensors,
    keep_systems,
    replica_tensors,
    started_batch,
    unstarted_state,
)
from ggnd_plugin.md.checkpoints import (
    CHECKPOINT_VERSION,
    checkpoint_files,
    checkpoint_name,
    is_done,
    read_checkpoints,
    write_checkpoint,
)
from ggnd_plugin.md.integrators import DESCRIPTIONS, ProtocolIntegrator
from ggnd_plugin.md.monitors import ReplicaMonitor, build_monitor
from ggnd_plugin.md.protocol import (
    BOND_RULES,
    CRITERIA,
    ENSEMBLES,
    ReplicaSpec,
    StabilityProtocol,
    StabilityResult,
)
from ggnd_plugin.md.seeds import initial_momenta, noise_seed, plan_replicas
from ggnd_plugin.safe_io import output_lock

__all__ = [
    "BATCHING_MODES",
    "BOND_RULES",
    "CHECKPOINT_VERSION",
    "CRITERIA",
    "ENSEMBLES",
    "Batching",
    "ReplicaSpec",
    "StabilityProtocol",
    "StabilityResult",
    "StopRequested",
    "UnfinishedReplicas",
    "build_monitor",
    "checkpoint_files",
    "checkpoint_name",
    "initial_momenta",
    "noise_seed",
    "package_versions",
    "plan_replicas",
    "run_stability",
]


def package_versions() -> dict[str, str]:
    """The versions a stability record names: the MD stack and every installed host."""
    return provenance.package_versions(("torch", "torch-sim-atomistic", "ase", "numpy", "e3nn"), hosts=True)


# ---------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# Per-replica records
# ---------------------------------------------------------------------------------------------------


def _fresh_record() -> dict[str, Any]:
    return {"failed": False, "failure": None, "failure_step": None, "max_deviation": 0.0}


def _fresh_series() -> dict[str, list]:
    return {"time_ps": [], "max_deviation": [], "temperature_K": [], "total_energy_eV": []}


def _row(name: str, spec: ReplicaSpec, record: dict, protocol: StabilityProtocol) -> dict[str, Any]:
    step = record["failure_step"]
    maximum = record["max_deviation"]
    return {
        "model": name,
        "temperature_K": spec.temperature,
        "replica": spec.replica,
        "seed": spec.seed,
        "start_frame": spec.start_frame,
        "stability_ps": protocol.time_ps if step is None else round(step * protocol.dt_ps, 9),
        "failed": bool(record["failed"]),
        "failure": record["failure"],
        "failure_step": step,
        "max_deviation": maximum if math.isfinite(maximum) else None,
    }


def _series_key(name: str, spec: ReplicaSpec) -> str:
    return f"{name}/{spec.temperature:g}K/{spec.replica}"


class StopRequested(GGNDError):
    """The process was asked to stop (SIGTERM from torchrun or the scheduler); its checkpoint is saved."""


class UnfinishedReplicas(GGNDError):
    """Replicas that no process finished (a rank died or was stopped); ``--resume`` runs only those."""

    def __init__(self, message: str, replicas: list[dict[str, Any]]):
        super().__init__(message)
        self.replicas = replicas


# ---------------------------------------------------------------------------------------------------
# The loop for one model
# ---------------------------------------------------------------------------------------------------


class _ModelRun:
    """Replicas of one model: batches, per-replica records and windows, checkpointing.

    ``plan`` is the model's whole plan (checkpoints record it); ``indices`` the plan entries this
    process runs (all by default; a rank's shard under torchrun). ``carry`` holds entries of this
    process's checkpoint file that it does not run now: they are written back unchanged, so a
    resume with another number of ranks never drops a replica's progress.
    """

    def __init__(
        self,
        name,
        model,
        plan,
        frames_for,
        monitor,
        protocol,
        checkpoint,
        progress,
        batching: Batching | None = None,
        indices: Sequence[int] | None = None,
        carry: Mapping[int, dict] | None = None,
        should_stop=None,
    ):
        self.name = name
        self.model = model
        self.plan = plan
        self.frames_for = frames_for
        self.protocol = protocol
        self.checkpoint = checkpoint
        self.progress = progress
        self.batching = batching or Batching()
        self.indices = list(range(len(plan))) if indices is None else list(indices)
        self.carry = dict(carry or {})
        self.should_stop = should_stop
        self.device = model.device
        self.dtype = model.dtype
        self.integrator = ProtocolIntegrator(protocol, self.device, self.dtype)
        self.n_atoms = len(frames_for(plan[0]))
        self.monitor = ReplicaMonitor(monitor, self.device, self.dtype)
        self.step = 0  # iterations of this process (every active replica advances one step per iteration)
        self.replica_steps = 0
        self.records = [_fresh_record() for _ in plan]
        self.series = [_fresh_series() for _ in plan]
        self.steps = np.zeros(len(plan), dtype=np.int64)
        self.done = np.zeros(len(plan), dtype=bool)
        self.saved: dict[int, dict] = {}  # restored entries of replicas not yet back in a batch
        self.generators: dict[int, torch.Generator] = {}
        self.active: list[int] = []
        self.state = None
        self._bar = None

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """A fresh run of this process's replicas (the run itself happens in :meth:`run`)."""
        for index in self.indices:
            self.records[index], self.series[index] = _fresh_record(), _fresh_series()
            self.steps[index], self.done[index] = 0, False
        self.saved.clear()

    def restore(self, entries: Mapping[int, dict]) -> None:
        """Continue from checkpoint entries (plan index -> newest entry); missing ones start afresh."""
        self.start()
        for index in self.indices:
            entry = entries.get(index)
            if entry is None:
                continue
            self.records[index] = dict(entry["record"])
            self.series[index] = {name: np.asarray(v).tolist() for name, v in entry["series"].items()}
            self.steps[index] = entry["step"]
            if is_done(entry):
                self.done[index] = True
            else:
                self.saved[index] = entry

    @property
    def pending(self) -> list[int]:
        return [i for i in self.indices if not self.done[i]]

    def run(self) -> None:
        from tqdm.auto import tqdm

        pending = self.pending
        restored = [i for i in pending if i in self.saved]
        fresh = [i for i in pending if i not in self.saved]
        n_steps = self.protocol.n_steps
        self._bar = tqdm(
            total=len(self.indices) * n_steps,
            initial=int(sum(n_steps if self.done[i] else self.steps[i] for i in self.indices)),
            desc=self.name,
            unit="replica-step",
            unit_scale=True,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            if self.batching.mode == "in-flight":
                if pending:
                    self._run_in_flight(restored + fresh)
            else:
                groups = []
                for members in (restored, fresh):
                    if members:
                        groups += self._bins(members) if self.batching.mode == "binning" else [members]
                for group in groups:
                    self._run_group(group)
            self._bar.set_postfix(
                failed=f"{sum(self.records[i]['failed'] for i in self.indices)}", refresh=False
            )
        finally:
            self._bar.close()
        self.save(finished=True)

    # -- batches ----------------------------------------------------------------------------------------
    def _placeholder(self, index: int):
        """A replica not yet started, as TorchSim state with its momenta (forces computed on admission)."""
        spec = self.plan[index]
        return unstarted_state(self.frames_for(spec), spec, self.device, self.dtype)

    def _single_states(self, order: Sequence[int]):
        for index in order:
            if index in self.saved:
                yield batch_from_tensors(
                    [self.saved[index]["state"]], self.integrator, self.device, self.dtype
                )
            else:
                yield self._placeholder(index)

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
        if group[0] in self.saved:
            state = batch_from_tensors(
                [self.saved[i]["state"] for i in group], self.integrator, self.device, self.dtype
            )
            leaving = self._activate(group, state)
        else:
            specs = [self.plan[i] for i in group]
            frames = [self.frames_for(spec) for spec in specs]
            state = started_batch(frames, specs, self.integrator, self.model, self.device, self.dtype)
            leaving = self._activate(group, state, evaluated=True)
        if leaving.any():
            self._drop(leaving)
        while self.active:
            leaving = self._advance()
            if leaving.any():
                self._drop(leaving)
            self._after_step()

    def _run_in_flight(self, order: list[int]) -> None:
        from torch_sim.autobatching import InFlightAutoBatcher

        batcher = InFlightAutoBatcher(
            self.model, memory_scales_with="n_atoms", max_memory_scaler=self.batching.max_atoms
        )
        batcher.load_states(self._single_states(order))
        state, _ = batcher.next_batch(None, None)
        leaving = self._activate([order[k] for k in batcher.current_idx], state)
        while True:
            while leaving.any():
                keep = ~leaving
                state, _ = batcher.next_batch(self.state, torch.as_tensor(leaving, device=self.device))
                self._keep_arrays(keep)
                if state is None:
                    self.state = None
                    return
                kept = len(self.active)
                newcomers = [order[k] for k in batcher.current_idx[kept:]]
                # the bookkeeping here follows the batcher's order (kept systems, then new ones); a
                # TorchSim version that reorders would silently mix up replicas
                if [order[k] for k in batcher.current_idx[:kept]] != self.active:
                    raise RuntimeError("TorchSim's InFlightAutoBatcher reordered the batch")
                leaving = self._activate(newcomers, state)
            if not self.active:
                return
            leaving = self._advance()
            self._after_step()

    def _activate(self, members: list[int], state, evaluated: bool = False) -> np.ndarray:
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
        fresh = [p for p, i in enumerate(members, start=first) if i not in self.saved]
        if fresh and not evaluated:
            rows = torch.as_tensor(fresh, device=self.device)
            output = self.model(state[rows])
            atoms = torch.isin(state.system_idx, rows)
            state.energy[rows] = output["energy"].detach().to(state.energy.dtype)
            state.forces[atoms] = output["forces"].detach().to(state.forces.dtype)
        saved = [self.saved.pop(i, None) for i in members]
        self.monitor.append([None if s is None else s["monitor"] for s in saved])
        accumulators = {"run_max": [], "window_max": [], "window_temperature": [], "window_energy": []}
        counts = []
        for index, entry in zip(members, saved, strict=True):
            if entry is None:
                values = {
                    "run_max": 0.0,
                    "window_max": math.nan,
                    "window_temperature": 0.0,
                    "window_energy": 0.0,
                }
                counts.append(0)
            else:
                values = entry["accumulators"]
                counts.append(int(values["window_count"]))
            for key in accumulators:
                accumulators[key].append(float(values[key]))
            if self.integrator.stochastic:
                generator = torch.Generator(device=self.device)
                if entry is None:
                    generator.manual_seed(noise_seed(self.plan[index].seed))
                else:
                    generator.set_state(entry["rng"])
                self.generators[index] = generator
        for key, values in accumulators.items():
            new = torch.tensor(values, device=self.device, dtype=self.dtype)
            setattr(self, key, new if first == 0 else torch.cat([getattr(self, key), new]))
        self.window_count = np.concatenate([self.window_count, counts]) if first else np.asarray(counts)
        self.active = self.active + list(members)
        self.active_steps = self.steps[self.active].copy()
        self._temperatures()
        leaving = np.zeros(n, dtype=bool)
        if fresh:
            failed, finite = self._check(np.asarray(fresh), initial=True)
            failed = failed.cpu().numpy()
            if failed.any():
                where = np.asarray(fresh)[failed]
                self._fail(where, finite.cpu().numpy()[failed])
                leaving[where] = True
        return leaving

    def _temperatures(self) -> None:
        self.temperatures = torch.tensor(
            [self.plan[i].temperature for i in self.active], device=self.device, dtype=self.dtype
        )

    def _keep_arrays(self, keep: np.ndarray) -> None:
        keep_t = torch.as_tensor(np.nonzero(keep)[0], device=self.device)
        for index in np.asarray(self.active)[~keep]:
            self.generators.pop(int(index), None)
        self.active = [i for i, k in zip(self.active, keep, strict=True) if k]
        self.active_steps = self.active_steps[keep]
        self.window_count = self.window_count[keep]
        for key in ("run_max", "window_max", "window_temperature", "window_energy"):
            setattr(self, key, getattr(self, key)[keep_t])
        self.monitor.keep(keep_t, keep)
        self._temperatures()

    def _drop(self, leaving: np.ndarray) -> None:
        keep = ~leaving
        if keep.any():
            self.state = keep_systems(self.state, torch.as_tensor(np.nonzero(keep)[0], device=self.device))
        else:
            self.state = None
        self._keep_arrays(keep)

    # -- per step ---------------------------------------------------------------------------------------
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
        import torch_sim as ts

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
        if rows_t is None:
            self.run_max = torch.fmax(self.run_max, deviation)
        else:
            self.run_max[rows_t] = torch.fmax(self.run_max[rows_t], deviation)
        if not initial:  # only whole-batch checks accumulate windows
            self.window_max = torch.fmax(self.window_max, deviation)
            kinetic = ts.calc_kinetic_energy(
                masses=state.masses, momenta=state.momenta, system_idx=state.system_idx
            )
            self.window_temperature += state.calc_temperature()
            self.window_energy += state.energy + kinetic
            self.window_count += 1
        return failed, finite

    def _flush(self, positions: np.ndarray) -> None:
        """Append the current window of the replicas at ``positions`` to their time series."""
        positions = [int(p) for p in positions if self.window_count[p] > 0]
        if not positions:
            return
        index = torch.as_tensor(positions, device=self.device)
        counts = torch.as_tensor(self.window_count[positions], device=self.device, dtype=self.dtype)
        maxima = self.window_max[index].detach().cpu().tolist()
        temperatures = (self.window_temperature[index] / counts).detach().cpu().tolist()
        energies = (self.window_energy[index] / counts).detach().cpu().tolist()
        for k, position in enumerate(positions):
            series = self.series[self.active[position]]
            series["time_ps"].append(int(self.active_steps[position]) * self.protocol.dt_ps)
            series["max_deviation"].append(maxima[k])
            series["temperature_K"].append(temperatures[k])
            series["total_energy_eV"].append(energies[k])

    def _reset_windows(self, positions: np.ndarray) -> None:
        index = torch.as_tensor(positions, device=self.device)
        self.window_max[index] = float("nan")
        self.window_temperature[index] = 0.0
        self.window_energy[index] = 0.0
        self.window_count[positions] = 0

    def _fail(self, positions: np.ndarray, finite: np.ndarray) -> None:
        self._flush(positions)
        run_max = self.run_max.detach().cpu().tolist()
        for position, is_finite in zip(positions, finite, strict=True):
            index = self.active[int(position)]
            self.records[index].update(
                failed=True,
                failure=self.monitor.kind if is_finite else "non-finite",
                failure_step=int(self.active_steps[position]),
                max_deviation=run_max[int(position)],
            )
            self.steps[index] = self.active_steps[position]
            self.done[index] = True
            self._bar.update(self.protocol.n_steps - int(self.active_steps[position]))

    def _finish(self, positions: np.ndarray) -> None:
        self._flush(positions)
        run_max = self.run_max.detach().cpu().tolist()
        for position in positions:
            index = self.active[int(position)]
            self.records[index]["max_deviation"] = run_max[int(position)]
            self.steps[index] = self.active_steps[position]
            self.done[index] = True

    def _advance(self) -> np.ndarray:
        """One step of every replica in the batch; returns the mask of those that leave it."""
        generators = [self.generators[i] for i in self.active] if self.integrator.stochastic else ()
        self.state = self.integrator.step(self.state, self.model, self.temperatures, generators)
        n = len(self.active)
        self.step += 1
        self.replica_steps += n
        self.active_steps += 1
        self._bar.update(n)
        failed, finite = self._check()
        leaving = np.zeros(n, dtype=bool)
        if bool(failed.any()):  # the one host sync per step
            failed_np = failed.cpu().numpy()
            where = np.nonzero(failed_np)[0]
            self._fail(where, finite.cpu().numpy()[where])
            leaving |= failed_np
        due = (self.active_steps % self.protocol.record_every_steps == 0) & ~leaving
        if due.any():
            where = np.nonzero(due)[0]
            self._flush(where)
            self._reset_windows(where)
        finished = (self.active_steps >= self.protocol.n_steps) & ~leaving
        if finished.any():
            self._finish(np.nonzero(finished)[0])
            leaving |= finished
        self.steps[self.active] = self.active_steps
        return leaving

    def _after_step(self) -> None:
        if self.step % self.protocol.checkpoint_every_steps == 0:
            self.save(finished=False)
        if self.should_stop is not None and self.should_stop():
            self.save(finished=False)
            raise StopRequested(f"stopped by a signal at step {self.step} of model '{self.name}'")

    # -- checkpoints ------------------------------------------------------------------------------------
    def _entry(self, index: int, positions: Mapping[int, int]) -> dict | None:
        if index in self.saved:
            return self.saved[index]
        series = {name: np.asarray(values, dtype=float) for name, values in self.series[index].items()}
        if self.done[index]:
            return {
                "status": "done",
                "step": int(self.steps[index]),
                "record": dict(self.records[index]),
                "series": series,
            }
        position = positions.get(index)
        if position is None:
            return None  # not started: runs from its seed
        generator = self.generators.get(index)
        return {
            "status": "active",
            "step": int(self.active_steps[position]),
            "record": dict(self.records[index]),
            "series": series,
            "state": replica_tensors(self.state, position, self.n_atoms),
            "rng": None if generator is None else generator.get_state(),
            "monitor": self.monitor.saved(position),
            "accumulators": {
                "run_max": float(self.run_max[position]),
                "window_max": float(self.window_max[position]),
                "window_temperature": float(self.window_temperature[position]),
                "window_energy": float(self.window_energy[position]),
                "window_count": int(self.window_count[position]),
            },
        }

    def save(self, finished: bool) -> None:
        if self.checkpoint is None:
            return
        positions = {index: position for position, index in enumerate(self.active)}
        entries = dict(self.carry)
        for index in self.indices:
            entry = self._entry(index, positions)
            if entry is not None:
                entries[index] = entry
        write_checkpoint(
            self.checkpoint,
            self.name,
            self.protocol,
            self.plan,
            self.monitor.describe(),
            self.step,
            bool(finished and all(self.done[i] for i in self.indices)),
            self.indices,
            entries,
        )

    # -- results ----------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        return [_row(self.name, self.plan[i], self.records[i], self.protocol) for i in self.indices]

    def series_arrays(self) -> dict[str, dict[str, np.ndarray]]:
        return {
            _series_key(self.name, self.plan[i]): {
                name: np.asarray(values, dtype=float) for name, values in self.series[i].items()
            }
            for i in self.indices
        }


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------


def _frames_by_temperature(start_frames, temperatures) -> dict[float, list]:
    if isinstance(start_frames, Mapping):
        missing = [t for t in temperatures if t not in start_frames]
        if missing:
            raise GGNDError(f"no start frames given for temperature(s) {missing}")
        for temperature in temperatures:
            v.check_frames(start_frames[temperature], f"start frames for {temperature:g} K")
        return {t: list(start_frames[t]) for t in temperatures}
    v.check_frames(start_frames, "start frames")
    return {t: list(start_frames) for t in temperatures}


def run_stability(
    models: Mapping[str, Any],
    start_frames,
    reference_frames: Sequence,
    protocol: StabilityProtocol,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    sources: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    batching: Batching | None = None,
    ranks=None,
) -> StabilityResult | None:
    """Run the stability protocol for each TorchSim model.

    Args:
        models: name -> ``torch_sim.models.interface.ModelInterface`` (device and dtype taken from it).
        start_frames: ASE Atoms to draw start frames from, or {temperature: frames}.
        reference_frames: ASE Atoms defining bonds and equilibrium lengths (or the reference RDF).
        protocol: the :class:`StabilityProtocol`.
        out_dir: where checkpoints go (``out_dir/checkpoints/<model>.pt``, one file per rank under
            torchrun); None: no checkpoints. The folder is locked for the run (a second run into it
            stops at once).
        resume: continue from the checkpoints in ``out_dir``: finished replicas are not re-run, the
            others continue from their newest entry. Each checkpoint is verified (CRC of every record)
            before it is loaded.
        progress: show a progress bar per model.
        sources: extra provenance (file names) copied into the protocol record.
        overwrite: start again over the checkpoints of an earlier run in ``out_dir``.
        batching: how replicas are grouped into batches (:class:`Batching`; default: one batch per model).
        ranks: a :class:`ggnd_plugin.distributed.Ranks` of a torchrun job: this process runs its
            shard of every model's replicas, and rank 0 gathers every rank's checkpoints into the result
            (other ranks return None). Needs ``out_dir`` on a file system all ranks share.

    Returns:
        :class:`StabilityResult` with the protocol record, one row per replica and the windowed time
        series (max deviation, temperature, total energy) per replica.

    Raises:
        UnfinishedReplicas: (rank 0) some replicas were not finished because a rank died or was stopped.
    """
    protocol.validate()
    if not models:
        raise GGNDError("no models to run")
    v.check_frames(reference_frames, "reference frames")
    batching = batching or Batching()
    if ranks is not None and ranks.world_size > 1 and out_dir is None:
        raise GGNDError("a run sharded over ranks needs out_dir: the ranks exchange results through it")
    if out_dir is None:
        return _run_stability(
            models, start_frames, reference_frames, protocol, None, False, progress, sources, batching, None
        )
    main = ranks is None or ranks.rank == 0
    lock = output_lock(Path(out_dir)) if main else contextlib.nullcontext()
    with lock:
        if overwrite and not resume and main:
            for stale in (Path(out_dir) / "checkpoints").glob("*.pt"):
                stale.unlink()
        return _run_stability(
            models,
            start_frames,
            reference_frames,
            protocol,
            out_dir,
            resume,
            progress,
            sources,
            batching,
            ranks,
        )


def _run_stability(
    models, start_frames, reference_frames, protocol, out_dir, resume, progress, sources, batching, ranks
):
    by_temperature = _frames_by_temperature(start_frames, protocol.temperatures)
    first_start = next(iter(by_temperature.values()))[0]
    for temperature, frames in by_temperature.items():
        for index, atoms in enumerate(frames):
            if (
                len(atoms) != len(first_start)
                or (atoms.get_atomic_numbers() != first_start.get_atomic_numbers()).any()
            ):
                raise GGNDError(
                    f"start frame {index} for {temperature:g} K ({atoms.get_chemical_formula()}) is not the same "
                    f"system in the same atom order as the first start frame ({first_start.get_chemical_formula()})"
                )
    plan = plan_replicas(protocol, {t: len(f) for t, f in by_temperature.items()})
    sample = next(iter(models.values()))
    batching.validate(len(first_start), sample.device, protocol.ensemble)

    def frames_for(spec: ReplicaSpec):
        return by_temperature[spec.temperature][spec.start_frame]

    checkpoint_dir = Path(out_dir) / "checkpoints" if out_dir is not None else None

    def refuse_an_earlier_run():
        if (
            checkpoint_dir is not None
            and not resume
            and checkpoint_dir.exists()
            and any(checkpoint_dir.glob("*.pt"))
        ):
            raise GGNDError(
                f"{out_dir} holds checkpoints of an earlier run: pass --resume to continue it or choose another --out"
            )

    if ranks is None:
        refuse_an_earlier_run()
    else:
        ranks.agree(refuse_an_earlier_run)  # decided by rank 0 before any rank writes
    rank, world_size = (None, None) if ranks is None else (ranks.rank, ranks.world_size)
    stop = None if ranks is None else ranks.should_stop

    started = time.perf_counter()
    runs: list[_ModelRun] = []
    monitor_record = None
    offset = 0
    stopped = None
    for name, model in models.items():
        monitor = build_monitor(protocol, reference_frames, first_start)
        monitor_record = monitor.describe()
        own = checkpoint_dir / checkpoint_name(name, rank, world_size) if checkpoint_dir is not None else None
        entries: dict[int, dict] = {}
        carry: dict[int, dict] = {}
        if resume and checkpoint_dir is not None:
            entries, by_file = read_checkpoints(checkpoint_dir, name, protocol, plan, monitor)
            carry = dict(by_file.get(own, {}))
        unfinished = [i for i in range(len(plan)) if not is_done(entries.get(i))]
        assignment = {i: (offset + k) % (world_size or 1) for k, i in enumerate(unfinished)}
        offset += len(unfinished)
        indices = (
            list(range(len(plan))) if ranks is None else [i for i in unfinished if assignment[i] == rank]
        )
        carry = {i: e for i, e in carry.items() if i not in indices}
        run = _ModelRun(
            name, model, plan, frames_for, monitor, protocol, own, progress, batching, indices, carry, stop
        )
        run.assignment = assignment
        run.restore(entries)
        runs.append(run)
        if stopped is not None or not run.pending:
            continue
        try:
            run.run()
        except StopRequested as error:
            if ranks is None:
                raise
            stopped = error

    record = {
        **protocol.to_dict(),
        "monitor": monitor_record,
        "integrator": DESCRIPTIONS[protocol.ensemble],
        "n_atoms": len(first_start),
        "formula": first_start.get_chemical_formula(),
        "device": str(sample.device.type if ranks is not None else sample.device),
        "dtype": str(sample.dtype).replace("torch.", ""),
        "versions": package_versions(),
        **dict(sources or {}),
    }
    execution = {
        "ranks": 1 if ranks is None else ranks.world_size,
        "batching": batching.mode,
        "max_batch_atoms": batching.max_atoms,
        "seconds": time.perf_counter() - started,
        "replica_steps": sum(run.replica_steps for run in runs),
    }
    if ranks is None:
        rows = [row for run in runs for row in run.rows()]
        series = {key: value for run in runs for key, value in run.series_arrays().items()}
        return StabilityResult(protocol=record, rows=rows, series=series, execution=execution)

    everyone = stopped is None and ranks.barrier()
    if ranks.rank != 0:
        if stopped is not None:
            raise stopped
        return None
    return _gather(runs, plan, protocol, checkpoint_dir, ranks, record, execution, everyone)


def _gather(runs, plan, protocol, checkpoint_dir, ranks, record, execution, everyone):
    """Rank 0: every replica's newest entry over all checkpoint files, as the single-process result."""
    rows, series, unfinished = [], {}, []
    for run in runs:
        monitor = run.monitor.base
        entries, _ = read_checkpoints(checkpoint_dir, run.name, protocol, plan, monitor)
        for k, spec in enumerate(plan):
            entry = entries.get(k)
            if not is_done(entry):
                unfinished.append(
                    {
                        "model": run.name,
                        "temperature_K": spec.temperature,
                        "replica": spec.replica,
                        "rank": run.assignment.get(k),
                        "step": 0 if entry is None else int(entry["step"]),
                        "of_steps": protocol.n_steps,
                    }
                )
                continue
            rows.append(_row(run.name, spec, entry["record"], protocol))
            series[_series_key(run.name, spec)] = {
                n: np.asarray(x, dtype=float) for n, x in entry["series"].items()
            }
    if unfinished:
        holders = sorted({item["rank"] for item in unfinished if item["rank"] is not None})
        reason = "" if everyone else " (a rank died or was stopped before the end)"
        raise UnfinishedReplicas(
            f"{len(unfinished)} of {len(plan) * len(runs)} replicas did not finish{reason}; they were run by "
            f"rank(s) {', '.join(map(str, holders)) or '?'} of {ranks.world_size}. Run the same command with "
            "--resume to finish only those",
            unfinished,
        )
    return StabilityResult(protocol=record, rows=rows, series=series, execution=execution)
