"""A bonded Morse potential as a TorchSim model: a control for the stability pipeline.

E = sum over the reference bonds of D (1 - exp(-a (r_ij - b_ij)))^2, per system. It is smooth, cheap
and strictly per system, and bonds dissociate once a replica holds enough energy, so replicas really
fail at high temperature. Use it to check a protocol or a machine (tests, docs/stability.md), never as
a model of a molecule: it has no angles, torsions or non-bonded terms.
"""

from __future__ import annotations

import numpy as np
import torch


def bonded_morse_model(
    pairs: np.ndarray,
    lengths: np.ndarray,
    depth_eV: float = 4.0,
    alpha_per_A: float = 2.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
):
    """A ``torch_sim`` ModelInterface for the Morse bonds ``pairs`` (n_bonds, 2) with minima ``lengths``."""
    from torch_sim.models.interface import ModelInterface

    class BondedMorseModel(ModelInterface):
        def __init__(self):
            super().__init__()
            self._device = torch.device(device)
            self._dtype = dtype
            self._compute_forces = True
            self._compute_stress = False
            self.pairs = torch.as_tensor(np.asarray(pairs), dtype=torch.long, device=self._device)
            self.lengths = torch.as_tensor(np.asarray(lengths), dtype=dtype, device=self._device)
            self.calls = 0

        def forward(self, state, **_):
            self.calls += 1
            positions = state.positions.detach().requires_grad_(True)
            # every system is the same molecule, so the batch reshapes without padding
            per_system = positions.view(state.n_systems, -1, 3)
            vectors = per_system[:, self.pairs[:, 1]] - per_system[:, self.pairs[:, 0]]
            stretch = torch.linalg.vector_norm(vectors, dim=-1) - self.lengths
            energy = (depth_eV * (1 - torch.exp(-alpha_per_A * stretch)) ** 2).sum(-1)
            (gradient,) = torch.autograd.grad(energy.sum(), positions)
            return {"energy": energy.detach(), "forces": -gradient}

    return BondedMorseModel()
