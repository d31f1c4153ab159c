"""Running maxima and recording windows of the replicas in a batch, one row per batch position.

Each replica keeps its criterion maximum over the whole run and, over the current recording window
(``record_every_steps``), the maximum deviation and the sums of temperature and total energy; a
window's means become one point of the replica's time series. The rows follow the batch: appended when
replicas join, sliced when they leave, saved in and restored from checkpoint entries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

_SUMS = ("run_max", "window_max", "window_temperature", "window_energy")


class BatchWindows:
    """``run_max``, ``window_max``, ``window_temperature``, ``window_energy`` (device tensors) and
    ``window_count`` (numpy), one row per replica in the batch."""

    def __init__(self, device, dtype):
        self.device, self.dtype = device, dtype

    def add(self, saved: Sequence[dict | None], first: int) -> None:
        """Rows for replicas joining at position ``first``: their saved accumulators, or fresh ones."""
        accumulators: dict[str, list[float]] = {key: [] for key in _SUMS}
        counts = []
        for entry in saved:
            if entry is None:
                values = {
                    "run_max": 0.0,
                    "window_max": math.nan,
                    "window_temperature": 0.0,
                    "window_energy": 0.0,
                }
                counts.append(0)
            else:
                values = entry
                counts.append(int(values["window_count"]))
            for key in accumulators:
                accumulators[key].append(float(values[key]))
        for key, values in accumulators.items():
            new = torch.tensor(values, device=self.device, dtype=self.dtype)
            setattr(self, key, new if first == 0 else torch.cat([getattr(self, key), new]))
        self.window_count = np.concatenate([self.window_count, counts]) if first else np.asarray(counts)

    def keep(self, keep_t: torch.Tensor, keep: np.ndarray) -> None:
        self.window_count = self.window_count[keep]
        for key in _SUMS:
            setattr(self, key, getattr(self, key)[keep_t])

    def track_maximum(self, deviation: torch.Tensor, rows: torch.Tensor | None) -> None:
        """The run maxima of the batch (or its ``rows``) after a criterion evaluation."""
        if rows is None:
            self.run_max = torch.fmax(self.run_max, deviation)
        else:
            self.run_max[rows] = torch.fmax(self.run_max[rows], deviation)

    def accumulate(self, deviation: torch.Tensor, state) -> None:
        """One step of the whole batch into the current windows."""
        import torch_sim as ts

        self.window_max = torch.fmax(self.window_max, deviation)
        kinetic = ts.calc_kinetic_energy(
            masses=state.masses, momenta=state.momenta, system_idx=state.system_idx
        )
        self.window_temperature += state.calc_temperature()
        self.window_energy += state.energy + kinetic
        self.window_count += 1

    def means(self, positions: np.ndarray) -> tuple[list[int], list[float], list[float], list[float]]:
        """(positions with a non-empty window, their maximum deviations, mean temperatures, mean energies)."""
        positions = [int(p) for p in positions if self.window_count[p] > 0]
        if not positions:
            return [], [], [], []
        index = torch.as_tensor(positions, device=self.device)
        counts = torch.as_tensor(self.window_count[positions], device=self.device, dtype=self.dtype)
        maxima = self.window_max[index].detach().cpu().tolist()
        temperatures = (self.window_temperature[index] / counts).detach().cpu().tolist()
        energies = (self.window_energy[index] / counts).detach().cpu().tolist()
        return positions, maxima, temperatures, energies

    def reset(self, positions: np.ndarray) -> None:
        index = torch.as_tensor(positions, device=self.device)
        self.window_max[index] = float("nan")
        self.window_temperature[index] = 0.0
        self.window_energy[index] = 0.0
        self.window_count[positions] = 0

    def run_maxima(self) -> list[float]:
        return self.run_max.detach().cpu().tolist()

    def saved(self, position: int) -> dict[str, float | int]:
        """The accumulators of the replica at ``position`` (a checkpoint entry's ``accumulators``)."""
        return {
            "run_max": float(self.run_max[position]),
            "window_max": float(self.window_max[position]),
            "window_temperature": float(self.window_temperature[position]),
            "window_energy": float(self.window_energy[position]),
            "window_count": int(self.window_count[position]),
        }
