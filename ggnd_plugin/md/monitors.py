"""The protocol's instability monitor, and its per-replica form for batches that replicas join late.

:mod:`ggnd_plugin.md.metrics` holds the criteria (bond deviation, RDF distance); :func:`build_monitor`
chooses and builds the one the protocol asks for, and :class:`ReplicaMonitor` runs it with one step
count and one RDF window per replica.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ggnd_plugin.errors import GGNDError
from ggnd_plugin.md.protocol import StabilityProtocol


def build_monitor(
    protocol: StabilityProtocol, reference_frames: Sequence, start_example, source: str = "reference"
):
    """The instability monitor the protocol asks for, built from the reference frames."""
    from ggnd_plugin.md.metrics import BondMonitor, RDFMonitor, natural_bonds, reference_bonds, reference_rdf

    if not reference_frames:
        raise GGNDError(f"{source}: holds no frames")
    numbers = reference_frames[0].get_atomic_numbers()
    if len(start_example) != len(numbers) or (start_example.get_atomic_numbers() != numbers).any():
        raise GGNDError(
            f"start frames ({start_example.get_chemical_formula()}) and {source} "
            f"({reference_frames[0].get_chemical_formula()}) are not the same system in the same atom order"
        )
    criterion = protocol.criterion
    if criterion == "auto":
        criterion = "rdf" if start_example.pbc.any() else "bonds"
    if criterion == "rdf":
        reference, r_max = reference_rdf(reference_frames, protocol.rdf_r_max, protocol.rdf_bins, source)
        window = max(
            1, round(protocol.rdf_window_ps * 1000 / protocol.timestep_fs / protocol.rdf_every_steps)
        )
        threshold = 1.0 if protocol.threshold is None else protocol.threshold
        return RDFMonitor(reference, r_max, threshold, protocol.rdf_every_steps, window)
    if start_example.pbc.any():
        raise GGNDError("the bond criterion is for molecules; periodic start frames need --criterion rdf")
    if protocol.bond_rule == "natural":
        pairs, lengths = natural_bonds(reference_frames, source)
    else:
        pairs, lengths = reference_bonds(reference_frames, protocol.bond_cutoff, source)
    threshold = 0.5 if protocol.threshold is None else protocol.threshold
    return BondMonitor(pairs, lengths, threshold)


class ReplicaMonitor:
    """The protocol's criterion with one step count per replica (a replica may join a batch late).

    Bonds need no memory. The RDF criterion keeps each replica's window of sampled g(r) and its sample
    count; a replica is sampled when its own step is a multiple of the sampling interval. When every
    replica of the batch is at the same step this is exactly :class:`~ggnd_plugin.md.metrics.RDFMonitor`.
    """

    def __init__(self, base, device, dtype):
        self.base = base
        self.kind = base.kind
        self.threshold = base.threshold
        self.device, self.dtype = device, dtype
        base.start(0, device, dtype)
        self.rdf = base.kind == "rdf"
        if self.rdf:
            self.buffer = torch.zeros(0, base.window_samples, base.n_bins, device=device, dtype=dtype)
            self.samples = np.zeros(0, dtype=np.int64)

    def describe(self) -> dict:
        return self.base.describe()

    def append(self, saved: Sequence[dict | None]) -> None:
        if not self.rdf or not saved:
            return
        shape = (self.base.window_samples, self.base.n_bins)
        rows = [
            torch.zeros(shape, device=self.device, dtype=self.dtype)
            if s is None
            else s["buffer"].to(self.device, self.dtype)
            for s in saved
        ]
        self.buffer = torch.cat([self.buffer, torch.stack(rows)])
        counts = [0 if s is None else int(s["samples"]) for s in saved]
        self.samples = np.concatenate([self.samples, np.asarray(counts, dtype=np.int64)])

    def keep(self, keep: torch.Tensor, keep_np: np.ndarray) -> None:
        if self.rdf:
            self.buffer = self.buffer[keep]
            self.samples = self.samples[keep_np]

    def saved(self, position: int) -> dict | None:
        if not self.rdf:
            return None
        return {
            "buffer": self.buffer[position].detach().cpu().clone(),
            "samples": int(self.samples[position]),
        }

    def update(self, steps: np.ndarray, positions: torch.Tensor, cell: torch.Tensor, rows: np.ndarray | None):
        """(deviation, decided) for the replicas ``rows`` of the batch (all when None) at their ``steps``."""
        from ggnd_plugin.md.metrics import rdf

        if not self.rdf:
            return self.base.update(0, positions, cell)
        base = self.base
        n = positions.shape[0]
        nothing = torch.full((n,), float("nan"), device=positions.device, dtype=positions.dtype)
        undecided = torch.zeros(n, dtype=torch.bool, device=positions.device)
        index = np.arange(len(self.samples)) if rows is None else np.asarray(rows)
        sampled = steps % base.every == 0
        if not sampled.any():
            return nothing, undecided
        target = index[sampled]
        slots = torch.as_tensor(self.samples[target] % base.window_samples, device=self.buffer.device)
        if sampled.all():
            values = rdf(positions, cell, base.r_max, base.n_bins)
        else:
            local = torch.as_tensor(np.nonzero(sampled)[0], device=positions.device)
            values = rdf(positions[local], cell[local], base.r_max, base.n_bins)
        self.buffer[torch.as_tensor(target, device=self.buffer.device), slots] = values
        self.samples[target] += 1
        decided = sampled & (self.samples[index] >= base.window_samples)
        if not decided.any():
            return nothing, undecided
        width = base.r_max / base.n_bins
        mean = self.buffer[torch.as_tensor(index, device=self.buffer.device)].mean(dim=1)
        distance = (mean - base.reference).abs().sum(dim=-1) * width
        decided_t = torch.as_tensor(decided, device=positions.device)
        return torch.where(decided_t, distance, nothing), decided_t
