"""A TorchSim model for SchNetPack potentials (SchNetPack has none upstream).

:class:`SchNetPackModel` builds SchNetPack's input dict for a whole batch of systems at once, with
TorchSim's neighbour list, evaluates the model's energy path (input modules, representation, energy
output modules, postprocessors: everything but the Forces/Response module) and takes forces and stress
itself by autograd, through positions and a homogeneous strain of positions and cell. The model is
therefore not modified (no Strain module inserted) and stress is available for any SchNetPack energy
model. Units: the model's own inside, eV, Å, eV/Å and eV/Å^3 outside.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_sim.models.interface import ModelInterface
from torch_sim.neighbors import torchsim_nl

from ggnd_plugin.adapters.schnetpack.output_module import (
    CELL_KEY,
    IDX_M_KEY,
    N_ATOMS_KEY,
    PBC_KEY,
    R_KEY,
    Z_KEY,
    default_dtype,
    derivative_modules,
)
from ggnd_plugin.errors import GGNDError

# SchNetPack's neighbour-list keys (schnetpack.properties).
IDX_I_KEY = "_idx_i"
IDX_J_KEY = "_idx_j"
OFFSETS_KEY = "_offsets"
IDX_KEY = "_idx"


def energy_path(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """The model's energy (its units, per system), without its derivative modules.

    Mirrors ``NeuralNetworkPotential.forward`` module by module and skips Forces/Response, so the
    caller decides what to differentiate.
    """
    skipped = {id(m) for _, m in derivative_modules(model)}
    energy_key = derivative_modules(model)[0][1].energy_key
    for module in model.input_modules:
        inputs = module(inputs)
    inputs = model.representation(inputs)
    for module in model.output_modules:
        if id(module) not in skipped:
            inputs = module(inputs)
    inputs = model.postprocess(inputs)
    return inputs[energy_key].reshape(-1)


def _same_device(actual: torch.device, requested: torch.device) -> bool:
    """``cuda`` (the current CUDA device) is ``cuda:0`` where that is current, and ``cpu:0`` is ``cpu``;
    ``torch.device`` equality says neither."""
    if actual.type != requested.type:
        return False
    if actual.type == "cuda":
        index = requested.index if requested.index is not None else torch.cuda.current_device()
        return actual.index == index
    return True


class SchNetPackModel(ModelInterface):
    """TorchSim ``ModelInterface`` around a SchNetPack ``NeuralNetworkPotential`` (with or without GGND).

    Args:
        model: the SchNetPack model (used as is, parameters shared).
        energy_to_ev, length_to_angstrom: factors from the model's units to eV and Å.
        device, dtype: where and in which precision TorchSim's state lives; the model keeps its own.
        compute_forces, compute_stress: what ``forward`` returns besides the energy.
    """

    def __init__(
        self,
        model: nn.Module,
        energy_to_ev: float = 1.0,
        length_to_angstrom: float = 1.0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float64,
        compute_forces: bool = True,
        compute_stress: bool = False,
    ):
        super().__init__()
        if not derivative_modules(model):
            raise GGNDError("the SchNetPack model has no Forces/Response module, so it defines no energy key")
        self.model = model
        self.energy_to_ev = float(energy_to_ev)
        self.length_to_angstrom = float(length_to_angstrom)
        self.cutoff = float(model.representation.cutoff)
        requested = torch.device(device)
        self._dtype = dtype
        self._compute_forces = compute_forces
        self._compute_stress = compute_stress
        self._memory_scales_with = "n_atoms_x_density"
        reference = next(model.parameters())
        self.model_dtype = reference.dtype
        if not _same_device(reference.device, requested):
            raise GGNDError(f"the SchNetPack model lives on {reference.device}, not on {requested}")
        self._device = reference.device  # concrete: "cuda" asked, "cuda:0" it is

    # TorchSim's validator and integrators switch these; the base class only has getters.
    @property
    def compute_forces(self) -> bool:
        return self._compute_forces

    @compute_forces.setter
    def compute_forces(self, value: bool) -> None:
        self._compute_forces = bool(value)

    @property
    def compute_stress(self) -> bool:
        return self._compute_stress

    @compute_stress.setter
    def compute_stress(self, value: bool) -> None:
        self._compute_stress = bool(value)

    def forward(self, state, **kwargs) -> dict[str, Tensor]:
        n_systems = state.n_systems
        system_idx = state.system_idx
        length = 1.0 / self.length_to_angstrom  # Å -> model length
        positions = (state.positions.detach() * length).to(self.model_dtype)
        cell = (state.row_vector_cell.detach() * length).to(self.model_dtype).reshape(n_systems, 3, 3)
        pbc = state.pbc.reshape(-1, 3).expand(n_systems, 3).bool()
        with torch.no_grad():
            mapping, pair_system, shifts = torchsim_nl(positions, cell, pbc, self.cutoff, system_idx)

        with torch.enable_grad(), default_dtype(self.model_dtype):
            positions.requires_grad_(self._compute_forces)
            strain = torch.zeros(n_systems, 3, 3, dtype=self.model_dtype, device=positions.device)
            strain.requires_grad_(self._compute_stress)
            # A homogeneous deformation x -> x (1 + e) of positions and lattice vectors (rows); its
            # derivative at e = 0 is the virial, as in SchNetPack's own Strain module.
            strained = positions + torch.einsum("ni,nij->nj", positions, strain[system_idx])
            strained_cell = cell + torch.matmul(cell, strain)
            offsets = torch.einsum("pi,pij->pj", shifts.to(self.model_dtype), strained_cell[pair_system])
            inputs = {
                Z_KEY: state.atomic_numbers.long(),
                R_KEY: strained,
                CELL_KEY: strained_cell,
                PBC_KEY: pbc,
                N_ATOMS_KEY: torch.bincount(system_idx, minlength=n_systems),
                IDX_M_KEY: system_idx,
                IDX_KEY: torch.arange(n_systems, device=positions.device),
                IDX_I_KEY: mapping[0],
                IDX_J_KEY: mapping[1],
                OFFSETS_KEY: offsets,
            }
            energy = energy_path(self.model, inputs)
            wanted = [
                t for t, on in ((positions, self._compute_forces), (strain, self._compute_stress)) if on
            ]
            grads = torch.autograd.grad(energy.sum(), wanted, allow_unused=True) if wanted else []

        to_ev = self.energy_to_ev
        out = {"energy": (energy.detach() * to_ev).to(self._dtype)}
        grads = list(grads)
        if self._compute_forces:
            g = grads.pop(0)
            g = torch.zeros_like(positions) if g is None else g
            out["forces"] = (-g.detach() * to_ev / self.length_to_angstrom).to(self._dtype)
        if self._compute_stress:
            g = grads.pop(0)
            g = torch.zeros_like(strain) if g is None else g
            volume = torch.linalg.det(cell).abs()
            # Molecules (no cell) have no stress; report zeros instead of dividing by zero.
            safe = torch.where(volume > 0, volume, torch.ones_like(volume))
            stress = torch.where(volume[:, None, None] > 0, g.detach() / safe[:, None, None], 0.0)
            out["stress"] = (stress * to_ev / self.length_to_angstrom**3).to(self._dtype)
        return out
