"""The last frames of every replica, kept on the batched state, and what a failed replica leaves behind.

A replica that fails is known to the step; to say *where* and *why* it failed the run keeps, per
replica, its last ``count`` frames sampled every ``every_steps`` of its own steps (positions, momenta,
forces, energy) in a ring buffer shaped (replicas in the batch, count, atoms, 3) on the batch's device.
The buffer's rows follow the batch exactly like the criterion windows (appended when replicas join,
sliced when they leave, saved in checkpoint entries), and a replica samples at its own step count, so
its frames do not depend on its batch, its rank or a resume. When a replica fails, its ring (oldest
first) and the failing step's own state are copied to the CPU once; nothing is copied per step.

Defaults (:class:`FailureFrames`): 10 frames, one every 10 steps, that is the last 100 fs before the
failure at the 1 fs step. The ways 3BPA fails develop over tens of fs (a hydrogen leaving its carbon
at ~0.1 Å/fs crosses the 0.5 Å threshold in ~5 fs; two atoms driven together close within one or two
X-H vibrations of ~10 fs), so 100 fs show the approach, and frames 10 fs apart are not copies of one
another when they are labelled and trained on. Memory: 3 x count x atoms x 3 numbers per replica (19 kB
for 3BPA in float64), and no cost per step beyond writing one slot on sampled steps.

These settings do not change any stability number, so they are not part of the protocol; a
checkpoint records them and a resume must use the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError

_VECTORS = ("positions", "momenta", "forces")


@dataclass(frozen=True)
class FailureFrames:
    """How many frames before a failure each replica keeps (``count``; 0: only the failing step's own
    frame) and how far apart they are (``every_steps``, in the replica's own MD steps)."""

    count: int = 10
    every_steps: int = 10

    def validate(self) -> None:
        v.check_value(v.non_negative_int, self.count, "failure_frames")
        v.check_value(v.positive_int, self.every_steps, "failure_frame_every")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def check_same_settings(saved: dict | None, settings: FailureFrames, where: str) -> None:
    """A resume keeps the failure-frame settings of the stopped run (a checkpoint without them predates
    failure frames: anything goes, replicas in flight then keep only frames sampled after the resume)."""
    if saved is None or saved == settings.to_dict():
        return
    raise GGNDError(
        f"{where}: cannot resume with other failure-frame settings (--failure-frames {saved['count']} -> "
        f"{settings.count}, --failure-frame-every {saved['every_steps']} -> {settings.every_steps})"
    )


class FrameRing:
    """The last ``count`` sampled frames of each replica in a batch, one row per batch position.

    ``positions``, ``momenta``, ``forces`` (rows, count, atoms, 3) and ``energy`` (rows, count) live on
    the device; ``steps`` (rows, count; -1: empty slot) and ``samples`` (frames sampled so far per row)
    on the host, where the batch keeps its step counts.
    """

    def __init__(self, settings: FailureFrames, n_atoms: int, device, dtype):
        self.count, self.every = settings.count, settings.every_steps
        self.n_atoms = n_atoms
        self.device, self.dtype = device, dtype
        shape = (0, self.count, n_atoms, 3)
        for name in _VECTORS:
            setattr(self, name, torch.zeros(shape, device=device, dtype=dtype))
        self.energy = torch.zeros(0, self.count, device=device, dtype=dtype)
        self.steps = np.zeros((0, self.count), dtype=np.int64)
        self.samples = np.zeros(0, dtype=np.int64)

    @property
    def enabled(self) -> bool:
        return self.count > 0

    def add(self, saved: Sequence[dict | None]) -> None:
        """Rows for replicas joining the batch: their saved rings (checkpoint entries), or empty ones."""
        if not self.enabled or not saved:
            return
        rows: dict[str, list] = {name: [] for name in (*_VECTORS, "energy")}
        steps, samples = [], []
        for entry in saved:
            if entry is None:
                for name in _VECTORS:
                    rows[name].append(torch.zeros(self.count, self.n_atoms, 3))
                rows["energy"].append(torch.zeros(self.count))
                steps.append(np.full(self.count, -1, dtype=np.int64))
                samples.append(0)
                continue
            for name in (*_VECTORS, "energy"):
                rows[name].append(torch.as_tensor(entry[name]))
            steps.append(np.asarray(entry["steps"], dtype=np.int64))
            samples.append(int(entry["samples"]))
        for name, values in rows.items():
            new = torch.stack(values).to(self.device, self.dtype)
            setattr(self, name, torch.cat([getattr(self, name), new]))
        self.steps = np.concatenate([self.steps, np.stack(steps)])
        self.samples = np.concatenate([self.samples, np.asarray(samples, dtype=np.int64)])

    def keep(self, keep_t: torch.Tensor, keep: np.ndarray) -> None:
        if not self.enabled:
            return
        for name in (*_VECTORS, "energy"):
            setattr(self, name, getattr(self, name)[keep_t])
        self.steps, self.samples = self.steps[keep], self.samples[keep]

    def record(self, state, steps: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Sample the batch positions ``rows`` (all when None) whose own step ``steps`` is due."""
        if not self.enabled:
            return
        rows = np.arange(len(self.samples)) if rows is None else np.asarray(rows)
        due = np.asarray(steps) % self.every == 0
        if not due.any():
            return
        target = rows[due]
        slots = self.samples[target] % self.count
        index = torch.as_tensor(target, device=self.device)
        slot = torch.as_tensor(slots, device=self.device)
        n = state.n_systems
        for name in _VECTORS:
            getattr(self, name)[index, slot] = getattr(state, name).reshape(n, self.n_atoms, 3)[index]
        self.energy[index, slot] = state.energy[index]
        self.steps[target, slots] = np.asarray(steps)[due]
        self.samples[target] += 1

    def saved(self, position: int) -> dict[str, Any] | None:
        """Row ``position`` for a checkpoint entry (CPU tensors)."""
        if not self.enabled:
            return None
        record: dict[str, Any] = {
            name: getattr(self, name)[position].detach().cpu().clone() for name in (*_VECTORS, "energy")
        }
        record["steps"] = self.steps[position].copy()
        record["samples"] = int(self.samples[position])
        return record

    def history(self, position: int) -> list[int]:
        """The slots of row ``position`` that hold frames, oldest first."""
        if not self.enabled:
            return []
        sampled = int(self.samples[position])
        if sampled <= self.count:
            return list(range(sampled))
        start = sampled % self.count
        return [(start + k) % self.count for k in range(self.count)]


def replica_frames(ring: FrameRing, state, position: int, step: int, n_atoms: int) -> dict[str, Any]:
    """What a replica failing at ``step`` leaves: its ring (oldest first) and the failing state, as numpy.

    Keys: ``steps`` (frames,), ``positions``, ``momenta``, ``forces`` (frames, atoms, 3), ``energy``
    (frames,), ``numbers``, ``masses`` (the run's, amu), ``cell`` (3, 3, rows as lattice vectors), ``pbc``; the last frame is the
    failing step's.
    """
    rows = slice(position * n_atoms, (position + 1) * n_atoms)

    def numpy(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().to("cpu", torch.float64).numpy().copy()

    slots = ring.history(position)
    frames: dict[str, Any] = {}
    for name in _VECTORS:
        failing = numpy(getattr(state, name)[rows])[None]
        kept = numpy(getattr(ring, name)[position, slots]) if slots else np.zeros((0, n_atoms, 3))
        frames[name] = np.concatenate([kept, failing])
    failing_energy = numpy(state.energy[position : position + 1])
    kept_energy = numpy(ring.energy[position, slots]) if slots else np.zeros(0)
    frames["energy"] = np.concatenate([kept_energy, failing_energy])
    kept_steps = ring.steps[position, slots] if slots else np.zeros(0, dtype=np.int64)
    frames["steps"] = np.concatenate([kept_steps, [step]]).astype(np.int64)
    frames["numbers"] = state.atomic_numbers[rows].detach().cpu().numpy().astype(np.int64)
    frames["masses"] = numpy(state.masses[rows])  # the run's, which may not be ASE's defaults (deuterium)
    frames["cell"] = numpy(state.row_vector_cell[position])
    frames["pbc"] = np.broadcast_to(state.pbc.detach().cpu().numpy(), (3,)).astype(bool).copy()
    return frames
