"""What each replica of a model's plan has recorded: status, step, failure, windowed time series.

One :class:`ReplicaRecords` per model and process, indexed by plan entry, whether or not the replica is
in a batch right now; it gives the result rows, the time series and the checkpoint entries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ggnd_plugin.md.checkpoints import is_done
from ggnd_plugin.md.protocol import ReplicaSpec, StabilityProtocol


def fresh_record() -> dict[str, Any]:
    return {"failed": False, "failure": None, "failure_step": None, "max_deviation": 0.0}


def fresh_series() -> dict[str, list]:
    return {"time_ps": [], "max_deviation": [], "temperature_K": [], "total_energy_eV": []}


def row(name: str, spec: ReplicaSpec, record: dict, protocol: StabilityProtocol) -> dict[str, Any]:
    """The result row of one replica (``results.csv``)."""
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


def series_key(name: str, spec: ReplicaSpec) -> str:
    """The key of one replica's time series (``timeseries.npz``)."""
    return f"{name}/{spec.temperature:g}K/{spec.replica}"


class ReplicaRecords:
    """Per plan entry: the record (failure, max deviation), time series, step reached and whether done,
    and a failed replica's last frames (:func:`~ggnd_plugin.md.failure_frames.replica_frames`).

    ``saved`` holds the checkpoint entries of restored replicas that are not back in a batch yet.
    """

    def __init__(self, plan: Sequence[ReplicaSpec], protocol: StabilityProtocol):
        self.plan = plan
        self.protocol = protocol
        self.records = [fresh_record() for _ in plan]
        self.series = [fresh_series() for _ in plan]
        self.steps = np.zeros(len(plan), dtype=np.int64)
        self.done = np.zeros(len(plan), dtype=bool)
        self.frames: dict[int, dict[str, Any]] = {}
        self.saved: dict[int, dict] = {}

    def start(self, indices: Sequence[int]) -> None:
        for index in indices:
            self.records[index], self.series[index] = fresh_record(), fresh_series()
            self.steps[index], self.done[index] = 0, False
            self.frames.pop(index, None)
        self.saved.clear()

    def restore(self, indices: Sequence[int], entries: Mapping[int, dict]) -> None:
        """Continue from checkpoint entries (plan index -> newest entry); missing ones start afresh."""
        self.start(indices)
        for index in indices:
            entry = entries.get(index)
            if entry is None:
                continue
            self.records[index] = dict(entry["record"])
            self.series[index] = {name: np.asarray(v).tolist() for name, v in entry["series"].items()}
            self.steps[index] = entry["step"]
            if is_done(entry):
                self.done[index] = True
                if entry.get("failure_frames") is not None:
                    self.frames[index] = entry["failure_frames"]
            else:
                self.saved[index] = entry

    # -- what a batch reports -----------------------------------------------------------------------
    def append_window(self, index: int, step: int, maximum: float, temperature: float, energy: float) -> None:
        series = self.series[index]
        series["time_ps"].append(step * self.protocol.dt_ps)
        series["max_deviation"].append(maximum)
        series["temperature_K"].append(temperature)
        series["total_energy_eV"].append(energy)

    def fail(
        self, index: int, failure: str, step: int, max_deviation: float, frames: dict | None = None
    ) -> None:
        self.records[index].update(
            failed=True, failure=failure, failure_step=step, max_deviation=max_deviation
        )
        if frames is not None:
            self.frames[index] = frames
        self.steps[index] = step
        self.done[index] = True

    def finish(self, index: int, step: int, max_deviation: float) -> None:
        self.records[index]["max_deviation"] = max_deviation
        self.steps[index] = step
        self.done[index] = True

    # -- results and checkpoint entries ---------------------------------------------------------------
    def entry(self, index: int) -> dict[str, Any] | None:
        """Replica ``index``'s checkpoint entry unless it is in a batch: restored, done, or None (not
        started: it runs from its seed)."""
        if index in self.saved:
            return self.saved[index]
        if not self.done[index]:
            return None
        return {
            "status": "done",
            "step": int(self.steps[index]),
            "record": dict(self.records[index]),
            "series": self._series_arrays(index),
            "failure_frames": self.frames.get(index),
        }

    def active_entry(self, index: int, step: int, batch_state: dict[str, Any]) -> dict[str, Any]:
        """The checkpoint entry of replica ``index``, in a batch at ``step`` with ``batch_state``."""
        return {
            "status": "active",
            "step": step,
            "record": dict(self.records[index]),
            "series": self._series_arrays(index),
            **batch_state,
        }

    def _series_arrays(self, index: int) -> dict[str, np.ndarray]:
        return {name: np.asarray(values, dtype=float) for name, values in self.series[index].items()}

    def rows(self, name: str, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [row(name, self.plan[i], self.records[i], self.protocol) for i in indices]

    def series_arrays(self, name: str, indices: Sequence[int]) -> dict[str, dict[str, np.ndarray]]:
        return {series_key(name, self.plan[i]): self._series_arrays(i) for i in indices}

    def failure_frames(self, name: str, indices: Sequence[int]) -> dict[str, dict[str, Any]]:
        """The frames of the failed replicas among ``indices``, by series key."""
        return {series_key(name, self.plan[i]): self.frames[i] for i in indices if i in self.frames}
