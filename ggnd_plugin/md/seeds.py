"""Replica seeds: the plan's start frames and velocity seeds, the velocities, the Langevin noise streams.

Everything is drawn from (seed, temperature, replica index) only, never from the model, the batch or
the rank, so two models run with the same protocol start from the same frames with the same velocities
(a paired comparison), and a replica's trajectory does not depend on where it runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ggnd_plugin.md.integrators import metal_units
from ggnd_plugin.md.protocol import ReplicaSpec, StabilityProtocol


def _temperature_key(temperature: float) -> int:
    return round(temperature * 1000)


def plan_replicas(protocol: StabilityProtocol, start_counts: Mapping[float, int]) -> list[ReplicaSpec]:
    """Replica seeds and start frames, drawn from (seed, temperature) so models get identical plans."""
    plan = []
    for temperature in protocol.temperatures:
        key = _temperature_key(temperature)
        n_frames = start_counts[temperature]
        frame_rng = np.random.default_rng(np.random.SeedSequence(protocol.seed, spawn_key=(key, 2**31)))
        frames = frame_rng.choice(n_frames, size=protocol.replicas, replace=protocol.replicas > n_frames)
        for replica in range(protocol.replicas):
            sequence = np.random.SeedSequence(protocol.seed, spawn_key=(key, replica))
            seed = int(sequence.generate_state(1, np.uint32)[0])
            plan.append(ReplicaSpec(float(temperature), replica, seed, int(frames[replica])))
    return plan


def initial_momenta(atoms, temperature: float, seed: int) -> torch.Tensor:
    """Maxwell-Boltzmann momenta at ``temperature`` (zero total momentum) from the replica's own seed.

    Drawn in float64 on the CPU with a per-replica generator, so a replica's start does not depend on
    the batch it runs in, the device or the dtype.
    """
    from torch_sim.integrators.md import initialize_momenta

    _, kelvin = metal_units()
    positions = torch.as_tensor(atoms.get_positions(), dtype=torch.float64)
    masses = torch.as_tensor(atoms.get_masses(), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    kT = torch.tensor(temperature * kelvin, dtype=torch.float64)
    return initialize_momenta(positions, masses, torch.zeros(len(atoms), dtype=torch.long), kT, generator)


def noise_seed(replica_seed: int) -> int:
    """The seed of a replica's Langevin noise stream: derived from, and independent of, its velocity seed."""
    return int(np.random.SeedSequence(replica_seed, spawn_key=(1,)).generate_state(1, np.uint32)[0])
