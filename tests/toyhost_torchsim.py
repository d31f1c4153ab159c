"""A TorchSim model for the third-party toy host (tests/thirdparty/toyhost_ggnd), for MD in the tests.

The toy host itself has no TorchSim model (its adapter says so); :func:`use_toy_torchsim` gives its
adapter one for a test, so ``ggnd stability`` runs toy models end to end in well under a second per
step batch. Energies and forces are the toy model's own (``atom_energy`` summed per system, forces by
autograd), the same numbers as ``ToyAdapter.predict``.
"""

from __future__ import annotations

import torch


def toy_torchsim_model(model, device="cpu", dtype=torch.float64):
    from torch_sim.models.interface import ModelInterface

    class ToyTorchSim(ModelInterface):
        def __init__(self):
            super().__init__()
            self.model = model.to(dtype)
            self._device = torch.device(device)
            self._dtype = dtype
            self._compute_forces = True
            self._compute_stress = False
            host = getattr(model, "host", model)
            self.species_of = host.species_of

        def forward(self, state, **_):
            positions = state.positions.detach().requires_grad_(True)
            species = self.species_of[state.atomic_numbers]
            with torch.enable_grad():
                atom_energy = self.model.atom_energy(positions, species, state.system_idx)
                energy = torch.zeros(state.n_systems, dtype=positions.dtype).index_add(
                    0, state.system_idx, atom_energy
                )
                (gradient,) = torch.autograd.grad(energy.sum(), positions)
            return {"energy": energy.detach(), "forces": -gradient}

    return ToyTorchSim()


def use_toy_torchsim(monkeypatch) -> None:
    """Give the toy adapter a TorchSim model for the rest of the test."""
    import toyhost_ggnd

    monkeypatch.setattr(
        toyhost_ggnd.ToyAdapter,
        "torchsim_model",
        lambda self, model, device="cpu", dtype=torch.float64: toy_torchsim_model(model, device, dtype),
    )
