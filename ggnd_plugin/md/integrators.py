"""The protocol's integrators on TorchSim: NVE, Langevin with one noise stream per replica, Nose-Hoover.

TorchSim's init/step functions run a batch of replicas with per-system temperatures; only the Langevin
O-step is ours (:func:`langevin_step`), so that a replica's noise does not depend on its batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ggnd_plugin.md.protocol import StabilityProtocol

# how each ensemble is integrated, in words (the result's protocol record)
DESCRIPTIONS = {
    "nve": "velocity Verlet (torch_sim nve_step)",
    "nvt-langevin": "Langevin BAOAB (torch_sim B and A steps, one noise stream per replica)",
    "nvt-nose-hoover": "Nose-Hoover chain, length 3 (torch_sim nvt_nose_hoover_step)",
}


def metal_units() -> tuple[float, float]:
    """(one picosecond, one kelvin) in TorchSim's metal units: its time unit and eV."""
    from torch_sim.units import MetalUnits

    return float(MetalUnits.time), float(MetalUnits.temperature)


def langevin_step(state, model, dt, kT, gamma, generators):
    """TorchSim's BAOAB Langevin step (``nvt_langevin_step``) with one noise stream per replica.

    TorchSim draws the O-step noise of the whole batch from one generator, so a replica's noise would
    depend on which replicas share its batch (and its rank); here replica k's noise comes from its own
    generator, in the same formula: p <- c1 p + sqrt(kT (1 - c1^2) m) R.
    """
    from torch_sim.integrators.md import momentum_step, position_step

    state = momentum_step(state, dt / 2)
    state = position_step(state, dt / 2)
    c1 = torch.exp(-gamma * dt)
    c2 = torch.sqrt(kT[state.system_idx] * (1 - torch.square(c1))).unsqueeze(-1)
    n_atoms = state.n_atoms // state.n_systems
    noise = torch.cat(
        [torch.randn((n_atoms, 3), generator=g, device=state.device, dtype=state.dtype) for g in generators]
    )
    state.set_constrained_momenta(
        c1.unsqueeze(-1) * state.momenta + c2 * torch.sqrt(state.masses).unsqueeze(-1) * noise
    )
    state = position_step(state, dt / 2)
    output = model(state)
    state.energy = output["energy"]
    state.forces = output["forces"]
    state.store_model_extras(output)
    return momentum_step(state, dt / 2)


class ProtocolIntegrator:
    """TorchSim init/step functions with this protocol's units and per-system temperatures."""

    def __init__(self, protocol: StabilityProtocol, device, dtype):
        import torch_sim as ts

        time_unit, kelvin = metal_units()
        self.protocol = protocol
        self.kind = {
            "nve": ts.Integrator.nve,
            "nvt-langevin": ts.Integrator.nvt_langevin,
            "nvt-nose-hoover": ts.Integrator.nvt_nose_hoover,
        }[protocol.ensemble]
        self.init_fn, self.step_fn = ts.INTEGRATOR_REGISTRY[self.kind]
        self.dt = torch.tensor(protocol.dt_ps * time_unit, device=device, dtype=dtype)
        self.gamma = torch.tensor(protocol.friction_per_fs * 1000.0 / time_unit, device=device, dtype=dtype)
        self.tau = torch.tensor(protocol.nose_hoover_tau_fs * 1e-3 * time_unit, device=device, dtype=dtype)
        self.kelvin = kelvin
        self.stochastic = self.kind == "nvt_langevin"

    def kT(self, temperatures: torch.Tensor) -> torch.Tensor:
        return temperatures * self.kelvin

    def init(self, sim_state, model, temperatures: torch.Tensor, momenta: torch.Tensor):
        kT = self.kT(temperatures)
        if self.kind == "nvt_nose_hoover":
            return self.init_fn(sim_state, model, kT=kT, dt=self.dt, tau=self.tau, momenta=momenta)
        state = self.init_fn(sim_state, model, kT=kT)
        state.momenta = momenta
        return state

    def step(self, state, model, temperatures: torch.Tensor, generators=()):
        kT = self.kT(temperatures)
        if self.stochastic:
            return langevin_step(state, model, self.dt, kT, self.gamma, generators)
        return self.step_fn(state, model, dt=self.dt, kT=kT)

    def chain_functions(self):
        from torch_sim.integrators.md import construct_nose_hoover_chain

        # the same arguments nvt_nose_hoover_init uses with its defaults (chain of 3, 3 substeps, SY 3)
        return construct_nose_hoover_chain(self.dt, 3, 3, 3, self.tau)
