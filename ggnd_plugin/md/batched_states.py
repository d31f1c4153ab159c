"""Batched TorchSim states of replicas: starting them, removing systems, one replica's tensors out and in.

A replica leaves a batch when it fails or finishes and joins one when it starts or resumes, so the
batch is sliced and assembled by system; a checkpoint entry holds one replica's rows of the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ggnd_plugin.md.seeds import initial_momenta

if TYPE_CHECKING:
    from ggnd_plugin.md.integrators import ProtocolIntegrator
    from ggnd_plugin.md.protocol import ReplicaSpec

_ATOM_TENSORS = ("positions", "momenta", "forces", "masses", "atomic_numbers")
_SYSTEM_TENSORS = ("energy", "cell")
_CHAIN_TENSORS = ("positions", "momenta", "masses", "tau", "kinetic_energy", "degrees_of_freedom")


def started_batch(
    frames: Sequence, specs: Sequence[ReplicaSpec], integrator: ProtocolIntegrator, model, device, dtype
):
    """The replicas ``specs`` started from ``frames`` in one batch, forces computed by the integrator's init."""
    import torch_sim as ts

    atoms = [frame.copy() for frame in frames]
    for item in atoms:
        item.calc = None
    sim_state = ts.io.atoms_to_state(atoms, device=device, dtype=dtype)
    momenta = torch.cat(
        [initial_momenta(a, spec.temperature, spec.seed) for a, spec in zip(atoms, specs, strict=True)]
    )
    temperatures = torch.tensor([spec.temperature for spec in specs], device=device, dtype=dtype)
    return integrator.init(sim_state, model, temperatures, momenta.to(device, dtype))


def unstarted_state(frame, spec: ReplicaSpec, device, dtype):
    """A replica not yet started, as TorchSim state with its momenta (forces computed on admission)."""
    import torch_sim as ts
    from torch_sim.integrators.md import MDState

    atoms = frame.copy()
    atoms.calc = None
    state = ts.io.atoms_to_state([atoms], device=device, dtype=dtype)
    momenta = initial_momenta(atoms, spec.temperature, spec.seed).to(device, dtype)
    zeros = torch.zeros(1, device=device, dtype=dtype)
    return MDState.from_state(state, momenta=momenta, energy=zeros, forces=torch.zeros_like(momenta))


def keep_systems(state, keep: torch.Tensor):
    """The state restricted to the systems ``keep``; Nose-Hoover chain variables are sliced too.

    TorchSim treats the chain as a global attribute, so its own slicing would keep every system's
    thermostat; each replica's chain must follow its replica.
    """
    n_before = state.n_systems
    kept = state[keep]
    chain = getattr(state, "chain", None)
    if chain is not None:
        from dataclasses import replace

        updates = {}
        for name in _CHAIN_TENSORS:
            value = getattr(chain, name)
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n_before:
                updates[name] = value[keep].clone()
        kept.chain = replace(chain, **updates)
    return kept


def replica_tensors(state, position: int, n_atoms: int) -> dict[str, Any]:
    """One replica's rows of a batched state, on the CPU (a checkpoint entry)."""
    rows = slice(position * n_atoms, (position + 1) * n_atoms)
    tensors = {name: getattr(state, name)[rows].detach().cpu().clone() for name in _ATOM_TENSORS}
    for name in _SYSTEM_TENSORS:
        tensors[name] = getattr(state, name)[position : position + 1].detach().cpu().clone()
    tensors["pbc"] = state.pbc.detach().cpu().clone()
    chain = getattr(state, "chain", None)
    if chain is not None:
        tensors["chain"] = {}
        for name in _CHAIN_TENSORS:
            value = getattr(chain, name)
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == state.n_systems:
                value = value[position : position + 1]
            tensors["chain"][name] = (
                value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
            )
    return tensors


def batch_from_tensors(replicas: Sequence[dict[str, Any]], integrator: ProtocolIntegrator, device, dtype):
    """A batched state from per-replica tensors (:func:`replica_tensors`), in the given order."""
    from torch_sim.integrators.md import MDState, NoseHooverChain
    from torch_sim.integrators.nvt import NVTNoseHooverState

    def to_device(value):
        if not isinstance(value, torch.Tensor):
            return value
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)

    n_atoms = replicas[0]["positions"].shape[0]
    attributes = {
        name: to_device(torch.cat([r[name] for r in replicas])) for name in (*_ATOM_TENSORS, *_SYSTEM_TENSORS)
    }
    attributes["pbc"] = to_device(replicas[0]["pbc"])
    attributes["system_idx"] = torch.arange(len(replicas), device=device).repeat_interleave(n_atoms)
    if "chain" not in replicas[0]:
        return MDState(**attributes)
    chain = {}
    for name in _CHAIN_TENSORS:
        first = replicas[0]["chain"][name]
        if isinstance(first, torch.Tensor) and first.ndim > 0 and first.shape[0] == 1:
            chain[name] = to_device(torch.cat([r["chain"][name] for r in replicas]))
        else:
            chain[name] = to_device(first)
    return NVTNoseHooverState(
        **attributes, chain=NoseHooverChain(**chain), _chain_fns=integrator.chain_functions()
    )
