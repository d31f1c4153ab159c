"""A stability run sharded over the ranks of a ``torchrun`` job: who runs which replica, stopping, gathering.

Each rank runs its share of every model's unfinished replicas and writes its own checkpoint files;
rank 0 then reads every rank's files and returns the result a single process would have returned, or
names the replicas that no rank finished (:class:`UnfinishedReplicas`; ``--resume`` runs only those).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ggnd_plugin.errors import GGNDError
from ggnd_plugin.md.checkpoints import is_done, read_checkpoints
from ggnd_plugin.md.protocol import StabilityResult
from ggnd_plugin.md.records import row, series_key


class StopRequested(GGNDError):
    """The process was asked to stop (SIGTERM from torchrun or the scheduler); its checkpoint is saved."""


class UnfinishedReplicas(GGNDError):
    """Replicas that no process finished (a rank died or was stopped); ``--resume`` runs only those."""

    def __init__(self, message: str, replicas: list[dict[str, Any]]):
        super().__init__(message)
        self.replicas = replicas


def assign_ranks(unfinished: Sequence[int], offset: int, world_size: int | None) -> dict[int, int]:
    """Plan index -> rank, round robin from ``offset`` (the replicas assigned for earlier models), so
    every rank gets an equal share over all models."""
    return {i: (offset + k) % (world_size or 1) for k, i in enumerate(unfinished)}


def gather_shards(runs, plan, protocol, checkpoint_dir, ranks, record, execution, everyone):
    """Rank 0: every replica's newest entry over all checkpoint files, as the single-process result
    (failed replicas' frames in ``failures``, their causes not yet named)."""
    rows, series, unfinished, failures = [], {}, [], {}
    for run in runs:
        monitor = run.monitor.base
        entries, _ = read_checkpoints(
            checkpoint_dir, run.name, protocol, plan, monitor, run.failure_frame_settings
        )
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
            rows.append(row(run.name, spec, entry["record"], protocol))
            series[series_key(run.name, spec)] = {
                n: np.asarray(x, dtype=float) for n, x in entry["series"].items()
            }
            if entry.get("failure_frames") is not None:
                failures[series_key(run.name, spec)] = {"frames": entry["failure_frames"]}
    if unfinished:
        holders = sorted({item["rank"] for item in unfinished if item["rank"] is not None})
        reason = "" if everyone else " (a rank died or was stopped before the end)"
        raise UnfinishedReplicas(
            f"{len(unfinished)} of {len(plan) * len(runs)} replicas did not finish{reason}; they were run by "
            f"rank(s) {', '.join(map(str, holders)) or '?'} of {ranks.world_size}. Run the same command with "
            "--resume to finish only those",
            unfinished,
        )
    return StabilityResult(protocol=record, rows=rows, series=series, execution=execution, failures=failures)
