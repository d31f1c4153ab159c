"""The GGND block as a SchNetPack output module.

A SchNetPack ``NeuralNetworkPotential`` runs input modules, a representation and output modules in
order on one dict of named tensors. :class:`GGNDEnergy` is one more output module: placed after the
``Atomwise`` module that writes the energy and before the ``Forces`` (or ``Response``) module that
differentiates it, it adds the GGND energy of every system to that energy, so forces and stress stay
``-dE/dx`` and ``dE/dstrain / V`` of the total.

The module is built either by :func:`insert_ggnd` (upgrade of a fitted model) or by hydra from
``spktrain`` configs (``experiment=ggnd_painn_3bpa``, ``+ggnd=painn``), so its constructor takes
plain values: element list, feature width, whether the representation has vector features, and the
GGND options as a mapping.

This file is imported when a SchNetPack model that contains GGND is unpickled; SchNetPack itself is
imported only where needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ggnd_plugin.block import FeatureSpec, GGNDBlock, GGNDConfig, system_energy
from ggnd_plugin.errors import GGNDError
from ggnd_plugin.tracing import is_tracing

# SchNetPack's input keys (schnetpack.properties), spelled out so that this module stays importable
# without importing SchNetPack; tests check them against schnetpack.properties.
Z_KEY = "_atomic_numbers"
R_KEY = "_positions"
IDX_M_KEY = "_idx_m"
N_ATOMS_KEY = "_n_atoms"
CELL_KEY = "_cell"
PBC_KEY = "_pbc"

SCALAR_KEY = "scalar_representation"
VECTOR_KEY = "vector_representation"
MAX_ATOMIC_NUMBER = 118


def _plain(value: Any) -> Any:
    """Hydra passes DictConfig/ListConfig; the block and pickles want plain containers."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # omegaconf comes with SchNetPack; without it nothing is an OmegaConf object
        pass
    return value


class GGNDEnergy(nn.Module):
    """SchNetPack output module: ``inputs[energy_key] += sum_i E_GGND,i`` per system.

    Args:
        atomic_numbers: elements the block knows, e.g. ``[1, 6, 7, 8]``; species index = position.
        n_atom_basis: F, the width of SchNetPack's ``scalar_representation`` (N, F).
        vector_representation: read PaiNN's ``vector_representation`` (N, 3, F) as ``F x 1o`` too.
        config: GGND options (a :class:`GGNDConfig` or a mapping of its fields).
        energy_key: the energy the ``Forces`` module differentiates.
        energy_unit, length_unit: units of the model's energy and positions (SchNetPack names such as
            ``"kcal/mol"``, ``"eV"``, ``"Ang"``), recorded for tools that convert to eV and Å.
    """

    def __init__(
        self,
        atomic_numbers: Sequence[int],
        n_atom_basis: int,
        vector_representation: bool = False,
        config: GGNDConfig | Mapping[str, Any] | None = None,
        energy_key: str = "energy",
        energy_unit: str | None = None,
        length_unit: str | None = None,
    ):
        super().__init__()
        numbers = [int(z) for z in _plain(atomic_numbers)]
        if not numbers or len(set(numbers)) != len(numbers):
            raise GGNDError(f"GGNDEnergy needs a list of distinct atomic numbers, got {numbers}")
        if not all(1 <= z <= MAX_ATOMIC_NUMBER for z in numbers):
            raise GGNDError(f"GGNDEnergy: atomic numbers must lie in 1..{MAX_ATOMIC_NUMBER}, got {numbers}")
        config = _plain(config)
        if config is None:
            config = GGNDConfig()
        elif not isinstance(config, GGNDConfig):
            try:
                config = GGNDConfig.from_dict(config)
            except ValueError as error:
                raise GGNDError(f"GGNDEnergy: {error}") from error
        fields = {SCALAR_KEY: f"{int(n_atom_basis)}x0e"}
        if vector_representation:
            fields[VECTOR_KEY] = f"{int(n_atom_basis)}x1o"
        self.block = GGNDBlock(FeatureSpec(fields, num_species=len(numbers)), config)
        self.atomic_numbers = numbers
        self.n_atom_basis = int(n_atom_basis)
        self.vector_representation = bool(vector_representation)
        self.energy_key = energy_key
        self.energy_unit = energy_unit
        self.length_unit = length_unit
        table = torch.full((MAX_ATOMIC_NUMBER + 1,), -1, dtype=torch.long)
        table[torch.tensor(numbers)] = torch.arange(len(numbers))
        self.register_buffer("species_of_z", table)
        # SchNetPack collects these from every module; GGND adds no output and needs no extra derivative.
        self.model_outputs: list[str] = []
        self.required_derivatives: list[str] = []

    def host_features(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """SchNetPack's representation in e3nn layout: ``F x 0e`` and, for PaiNN, ``F x 1o``.

        PaiNN stores vectors as (N, 3, F) with components x, y, z; e3nn's ``F x 1o`` is (N, F, 3)
        flattened channel-major with the same x, y, z order, so a transpose is the whole conversion.
        """
        if SCALAR_KEY not in inputs:
            raise GGNDError(f"GGNDEnergy: the representation wrote no '{SCALAR_KEY}'")
        features = {SCALAR_KEY: inputs[SCALAR_KEY]}
        if self.vector_representation:
            if VECTOR_KEY not in inputs:
                raise GGNDError(
                    f"GGNDEnergy was built for vector features but the representation wrote no "
                    f"'{VECTOR_KEY}' (only PaiNN does; use vector_representation=False for SchNet)"
                )
            mu = inputs[VECTOR_KEY]
            features[VECTOR_KEY] = mu.transpose(1, 2).reshape(mu.shape[0], -1)
        return features

    def species(self, numbers: Tensor) -> Tensor:
        species = self.species_of_z[numbers.long().clamp(0, MAX_ATOMIC_NUMBER)]
        if not is_tracing() and bool((species < 0).any()):
            from ase.data import chemical_symbols

            unknown = sorted(set(numbers[species < 0].tolist()))
            raise GGNDError(
                f"the GGND block knows {', '.join(chemical_symbols[z] for z in self.atomic_numbers)} "
                f"but the input contains {', '.join(chemical_symbols[z] for z in unknown)}"
            )
        return species

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.energy_key not in inputs:
            raise GGNDError(
                f"GGNDEnergy: no '{self.energy_key}' in the inputs; it must come after the Atomwise "
                "module that writes the energy"
            )
        positions = inputs[R_KEY]
        batch = inputs[IDX_M_KEY]
        num_systems = inputs[N_ATOMS_KEY].shape[0]
        cell = inputs.get(CELL_KEY)
        pbc = inputs.get(PBC_KEY)
        features = self.host_features(inputs)
        dtype = next(self.block.parameters()).dtype
        features = {name: value.to(dtype) for name, value in features.items()}
        positions = positions.to(dtype)
        if cell is not None:
            cell = cell.reshape(num_systems, 3, 3).to(dtype)
        if pbc is not None:
            pbc = pbc.reshape(-1, 3).bool()
        try:
            pairs = self.block.pairs(positions.detach(), batch, cell=cell, pbc=pbc)
        except ValueError as error:
            raise GGNDError(f"GGNDEnergy: {error}") from error
        atom_energy = self.block(
            features, positions, self.species(inputs[Z_KEY]), pairs, batch=batch, cell=cell
        )
        energy = inputs[self.energy_key]
        inputs[self.energy_key] = energy + system_energy(atom_energy, batch, num_systems).to(energy.dtype)
        return inputs

    def extra_repr(self) -> str:
        return (
            f"atomic_numbers={self.atomic_numbers}, n_atom_basis={self.n_atom_basis}, "
            f"vector_representation={self.vector_representation}, energy_key={self.energy_key!r}"
        )


# --------------------------------------------------------------------------------------------------
# Where the module goes in a NeuralNetworkPotential
# --------------------------------------------------------------------------------------------------
def derivative_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(index, module) of the output modules that differentiate the energy (Forces, Response)."""
    from schnetpack.atomistic import Forces, Response

    return [(i, m) for i, m in enumerate(model.output_modules) if isinstance(m, Forces | Response)]


def insertion_point(model: nn.Module) -> tuple[int, str]:
    """The output-module index before which GGND goes, and the energy key it adds to.

    Refuses models whose energy is averaged over atoms (``aggregation_mode="avg"``): a summed GGND
    energy added to an intensive energy would mean something else per system size.
    """
    from schnetpack.atomistic import Atomwise

    if not hasattr(model, "output_modules") or not hasattr(model, "representation"):
        raise GGNDError(
            f"{type(model).__name__} is not a SchNetPack NeuralNetworkPotential "
            "(input_modules -> representation -> output_modules)"
        )
    derivatives = derivative_modules(model)
    if not derivatives:
        raise GGNDError(
            "the SchNetPack model has no Forces/Response output module: GGND adds energy that must "
            "be differentiated by the host's own derivative module"
        )
    index, forces = derivatives[0]
    energy_key = forces.energy_key
    writers = [
        m
        for m in list(model.output_modules)[:index]
        if isinstance(m, Atomwise) and m.output_key == energy_key
    ]
    if not writers:
        raise GGNDError(f"no Atomwise output module writes '{energy_key}' before the Forces module")
    if writers[-1].aggregation_mode != "sum":
        raise GGNDError(
            f"the Atomwise module writing '{energy_key}' uses aggregation_mode="
            f"{writers[-1].aggregation_mode!r}; GGND adds an extensive energy and needs 'sum'"
        )
    return index, energy_key


def representation_layout(model: nn.Module) -> tuple[int, bool]:
    """(F, has vector features) of the model's representation."""
    from schnetpack.representation import PaiNN, SchNet

    representation = model.representation
    if isinstance(representation, PaiNN):
        return representation.n_atom_basis, True
    if isinstance(representation, SchNet):
        return representation.n_atom_basis, False
    raise GGNDError(
        f"GGND supports SchNetPack's PaiNN and SchNet representations, not {type(representation).__name__}"
    )


def insert_ggnd(
    model: nn.Module,
    atomic_numbers: Sequence[int],
    config: GGNDConfig,
    energy_unit: str | None = None,
    length_unit: str | None = None,
) -> GGNDEnergy:
    """Insert a zero-initialised :class:`GGNDEnergy` into ``model`` (in place) and return it."""
    index, energy_key = insertion_point(model)
    n_atom_basis, vectors = representation_layout(model)
    reference = next(model.parameters())
    module = GGNDEnergy(
        atomic_numbers,
        n_atom_basis,
        vector_representation=vectors,
        config=config,
        energy_key=energy_key,
        energy_unit=energy_unit,
        length_unit=length_unit,
    ).to(device=reference.device, dtype=reference.dtype)
    model.output_modules.insert(index, module)
    model.collect_derivatives()
    model.collect_outputs()
    return module


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Run SchNetPack with the model's dtype as default: PaiNN creates its vector features with
    ``torch.zeros`` in the default dtype, so a float32 model fails under a float64 default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def ggnd_modules(model: nn.Module) -> list[GGNDEnergy]:
    return [m for m in model.modules() if isinstance(m, GGNDEnergy)]
