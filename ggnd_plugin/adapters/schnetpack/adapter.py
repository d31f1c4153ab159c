"""SchNetPack 2.2 adapter: GGND as one more output module of a ``NeuralNetworkPotential``.

SchNetPack models are whole pickled modules (``best_model`` from ``spktrain``); the GGND module
(:class:`~ggnd_plugin.adapters.schnetpack.output_module.GGNDEnergy`) is inserted before the ``Forces``
module, so the upgraded model is still a ``NeuralNetworkPotential`` that ``torch.load``,
``schnetpack.utils.load_model`` and ``SpkCalculator`` load as before (with ggnd-plugin installed).

Two things a SchNetPack model file does not record, and where this adapter finds them:

* **Units.** A model predicts in the units of its training data (``data.property_units`` in the
  spktrain config, else the ASE database's own units; SchNetPack's rMD17 recipes use kcal/mol). This
  adapter's API (``predict``, the TorchSim model) speaks eV, Å, eV/Å; the ASE calculator is
  SchNetPack's ``SpkCalculator`` told the model's energy unit.
* **Elements.** PaiNN and SchNet embed any atomic number below 100, but the GGND block embeds only
  the elements it was built for.

Both are taken, in order, from the GGND module (once attached), from values recorded on the model
(:meth:`SchNetPackAdapter.set_elements`, :meth:`SchNetPackAdapter.set_units`, or the environment
variables ``GGND_SCHNETPACK_ELEMENTS="H,C,N,O"`` / ``GGND_SCHNETPACK_UNITS="kcal/mol,Ang"`` read by
:meth:`load`), or from the spktrain run that wrote the file (``config.yaml`` beside ``best_model``
and the ASE database it names). Elements that cannot be found are an error naming these ways;
units that cannot be found default to eV and Å with a warning.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ggnd_plugin.adapters.base import HostAdapter, Prediction
from ggnd_plugin.adapters.host_trainer import FitRequest, TrainerCommand
from ggnd_plugin.adapters.pickled_classes import torch_file_classes
from ggnd_plugin.adapters.schnetpack.output_module import (
    SCALAR_KEY,
    VECTOR_KEY,
    default_dtype,
    derivative_modules,
    ggnd_modules,
    insert_ggnd,
    representation_layout,
)
from ggnd_plugin.adapters.schnetpack.spktrain_run import run_metadata
from ggnd_plugin.adapters.schnetpack.training import (
    TRAINER,
    check_fit_arguments,
    fit_command,
    fit_outputs,
    spktrain_environment,
)
from ggnd_plugin.block import FeatureSpec, GGNDConfig
from ggnd_plugin.errors import GGNDError

if TYPE_CHECKING:
    from ase import Atoms

ELEMENTS_ENV = "GGND_SCHNETPACK_ELEMENTS"
UNITS_ENV = "GGND_SCHNETPACK_UNITS"
DEFAULT_UNITS = ("eV", "Ang")


class SchNetPackAdapter(HostAdapter):
    name = "schnetpack"
    distribution = "schnetpack"
    module = "schnetpack"
    # Files are recognised by content (spktrain writes ``best_model`` without a suffix); ``.pt`` is only
    # the suffix that names written by ggnd-plugin itself (``ggnd demo``) get.
    file_suffixes: tuple[str, ...] = (".pt",)

    # ---- recognising models -------------------------------------------------------------------------
    def recognises_model(self, model: Any) -> bool:
        return any(cls.__module__.startswith("schnetpack.model") for cls in type(model).__mro__)

    def recognises_file(self, path: Path) -> bool:
        """A torch.save zip whose pickle names a SchNetPack model or task class (nothing is unpickled)."""
        return _holds_schnetpack_model(Path(path))

    # ---- model lifecycle ----------------------------------------------------------------------------
    def load(self, path: Path, device: str = "cpu") -> nn.Module:
        self.require()
        from schnetpack.utils import load_model

        path = Path(path)
        if not path.is_file():
            raise GGNDError(f"{path}: no such file")
        if not _holds_schnetpack_model(path):
            raise GGNDError(
                f"{path}: not a SchNetPack model file (expected a torch.save'd NeuralNetworkPotential "
                "such as spktrain's best_model; Lightning checkpoints under checkpoints/ hold only weights)"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                loaded = load_model(str(path), device=device)
        except Exception as error:
            raise GGNDError(
                f"{path}: SchNetPack could not load it ({type(error).__name__}: {error})"
            ) from error
        model = getattr(loaded, "model", loaded) if not self.recognises_model(loaded) else loaded
        if not self.recognises_model(model):
            raise GGNDError(f"{path}: holds a {type(loaded).__name__}, not a SchNetPack model")
        self._record_metadata(model, path)
        return model

    def save(self, model: nn.Module, path: Path) -> Path:
        """``torch.save`` of the whole model, as spktrain writes ``best_model`` (atomically)."""
        from ggnd_plugin.safe_io import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(model, tmp)
        return path

    def feature_spec(self, model: nn.Module) -> FeatureSpec:
        blocks = self.ggnd_blocks(model)
        if blocks:
            return blocks[0].spec
        n_atom_basis, vectors = representation_layout(model)
        fields = {SCALAR_KEY: f"{n_atom_basis}x0e"}
        if vectors:
            fields[VECTOR_KEY] = f"{n_atom_basis}x1o"
        # The species count is that of the element list when known; the host itself embeds Z < 100.
        known = _recorded_elements(model)
        return FeatureSpec(fields, num_species=len(known) if known else 1)

    def attach(self, model: nn.Module, config: GGNDConfig) -> nn.Module:
        """A copy of ``model`` with a zero-initialised GGND module before its ``Forces`` module."""
        if self.ggnd_blocks(model):
            raise GGNDError("the SchNetPack model already has a GGND module")
        elements = self.atomic_numbers(model)
        energy_unit, length_unit = self.units(model)
        upgraded = copy.deepcopy(model)
        insert_ggnd(upgraded, elements, config, energy_unit=energy_unit, length_unit=length_unit)
        return upgraded

    def ggnd_blocks(self, model: nn.Module) -> list[nn.Module]:
        return [module.block for module in ggnd_modules(model)]

    # ---- training from scratch: spktrain in a subprocess --------------------------------------------
    # PaiNN (config=None) or PaiNN + GGND: the extxyz files become one ASE database in the work folder
    # with a split file that keeps the given train/valid partition, and spktrain runs
    # experiment=painn_3bpa or ggnd_painn_3bpa (see fit_command); fit() loads its best_model.
    trainer = TRAINER

    def check_fit(self, request: FitRequest) -> None:
        check_fit_arguments(request.train, request.valid, request.epochs, request.size)

    def fit_outputs(self, request: FitRequest) -> tuple[str, ...]:
        return fit_outputs(request.config)

    def prepare_fit(self, request: FitRequest) -> TrainerCommand:
        argv, model_path = fit_command(request)
        work_dir = request.work_dir
        return TrainerCommand(argv, model_path, cwd=work_dir, env=spktrain_environment(work_dir))

    # ---- what the model knows -----------------------------------------------------------------------
    @staticmethod
    def set_elements(model: nn.Module, atomic_numbers: Sequence[int]) -> nn.Module:
        """Record the elements a plain SchNetPack model was trained on (kept when it is saved)."""
        numbers = sorted({int(z) for z in atomic_numbers})
        if not numbers or not all(1 <= z < 100 for z in numbers):
            raise GGNDError(f"atomic numbers must lie in 1..99 (SchNetPack's embedding), got {numbers}")
        model.ggnd_atomic_numbers = numbers
        return model

    @staticmethod
    def set_units(model: nn.Module, energy: str, length: str = "Ang") -> nn.Module:
        """Record the units the model predicts in (SchNetPack unit names, e.g. ``"kcal/mol"``)."""
        from schnetpack.units import convert_units

        for unit, target in ((energy, "eV"), (length, "Angstrom")):
            try:
                convert_units(unit, target)
            except Exception as error:
                raise GGNDError(
                    f"unknown or mismatched unit {unit!r} (SchNetPack cannot convert it to {target})"
                ) from error
        model.ggnd_units = (energy, length)
        return model

    def atomic_numbers(self, model: nn.Module) -> list[int]:
        modules = ggnd_modules(model)
        if modules:
            return sorted(modules[0].atomic_numbers)
        known = _recorded_elements(model)
        if known:
            return known
        raise GGNDError(
            "this SchNetPack model does not record the elements it was trained on, and no spktrain "
            "config.yaml with a readable data.datapath was found beside the model file. Tell it with "
            f"{ELEMENTS_ENV}=H,C,N,O (read by `ggnd` when it loads the file) or, in Python, "
            "SchNetPackAdapter.set_elements(model, [1, 6, 7, 8])"
        )

    def units(self, model: nn.Module) -> tuple[str, str]:
        """(energy unit, length unit) of the model's predictions, as SchNetPack names them."""
        for module in ggnd_modules(model):
            if module.energy_unit and module.length_unit:
                return module.energy_unit, module.length_unit
        recorded = getattr(model, "ggnd_units", None)
        if recorded:
            return tuple(recorded)
        warnings.warn(
            "the SchNetPack model does not record its units; assuming eV and Å. Record them with "
            f"SchNetPackAdapter.set_units(model, 'kcal/mol', 'Ang') or {UNITS_ENV}=kcal/mol,Ang",
            stacklevel=2,
        )
        return DEFAULT_UNITS

    def conversion(self, model: nn.Module) -> tuple[float, float]:
        """Factors (model energy -> eV, model length -> Å)."""
        from schnetpack.units import convert_units

        energy_unit, length_unit = self.units(model)
        return float(convert_units(energy_unit, "eV")), float(convert_units(length_unit, "Angstrom"))

    def cutoff(self, model: nn.Module) -> float:
        return float(_model_cutoff(model)) * self.conversion(model)[1]

    def atomic_energies(self, model: nn.Module) -> dict[int, float] | None:
        """Per-element offsets that the model's ``AddOffsets`` postprocessor adds (eV)."""
        from schnetpack.transform import AddOffsets

        keys = output_keys(model)
        offsets = [
            m
            for m in getattr(model, "postprocessors", [])
            if isinstance(m, AddOffsets) and m._property == keys[0] and m.is_extensive
        ]
        if not offsets:
            return None
        try:
            elements = self.atomic_numbers(model)
        except GGNDError:
            return None
        to_ev = self.conversion(model)[0]
        energies = dict.fromkeys(elements, 0.0)
        for module in offsets:
            for z in elements:
                if module.add_atomrefs:
                    energies[z] += float(module.atomref[z])
                if module.add_mean:
                    energies[z] += float(module.mean.reshape(-1)[0])
        return {z: e * to_ev for z, e in energies.items()}

    # ---- predictions --------------------------------------------------------------------------------
    def predict(self, model: nn.Module, structures: Sequence[Atoms], training: bool = False) -> Prediction:
        """Energies (eV) and forces (eV/Å) from the model's own forward and ``Forces`` module."""
        from schnetpack.interfaces import AtomsConverter
        from schnetpack.transform import MatScipyNeighborList

        structures = list(structures)
        if not structures:
            raise GGNDError("predict() needs at least one structure")
        energy_key, force_key = output_keys(model)
        to_ev, to_angstrom = self.conversion(model)
        reference = next(model.parameters())
        converter = AtomsConverter(
            neighbor_list=MatScipyNeighborList(cutoff=_model_cutoff(model)),
            device=reference.device,
            dtype=reference.dtype,
        )
        inputs = converter([_in_model_length(atoms, to_angstrom) for atoms in structures])
        with _derivatives_for(model, training), default_dtype(reference.dtype), torch.enable_grad():
            results = model(inputs)
        if force_key not in results:
            raise GGNDError(f"the SchNetPack model returned no '{force_key}' (outputs: {sorted(results)})")
        energy = results[energy_key].reshape(-1) * to_ev
        forces = results[force_key] * (to_ev / to_angstrom)
        if not training:
            energy, forces = energy.detach(), forces.detach()
        return Prediction(energy=energy, forces=forces)

    def ase_calculator(self, model: nn.Module, device: str = "cpu"):
        """SchNetPack's own ``SpkCalculator`` on a copy of ``model``, told the model's units.

        A copy, because SpkCalculator switches the model to eval mode and casts it in place.
        SpkCalculator passes positions in Å unchanged, so models trained in other length units get a
        small calculator that converts them.
        """
        from schnetpack.transform import MatScipyNeighborList

        from ggnd_plugin.adapters.schnetpack.calculator import DtypeSafeSpkCalculator, predict_calculator

        energy_key, force_key = output_keys(model)
        energy_unit, length_unit = self.units(model)
        if abs(self.conversion(model)[1] - 1.0) > 1e-12:
            return predict_calculator(self, model)
        return DtypeSafeSpkCalculator(
            model=copy.deepcopy(model),
            neighbor_list=MatScipyNeighborList(cutoff=_model_cutoff(model)),
            energy_key=energy_key,
            force_key=force_key,
            energy_unit=energy_unit,
            position_unit=length_unit,
            device=device,
            dtype=next(model.parameters()).dtype,
        )

    def torchsim_model(self, model: nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float64):
        from ggnd_plugin.adapters.schnetpack.torchsim_model import SchNetPackModel

        to_ev, to_angstrom = self.conversion(model)
        return SchNetPackModel(
            model, energy_to_ev=to_ev, length_to_angstrom=to_angstrom, device=device, dtype=dtype
        )

    # ---- metadata of spktrain runs ------------------------------------------------------------------
    def _record_metadata(self, model: nn.Module, path: Path) -> None:
        """Fill in elements and units from the environment or the spktrain run beside ``path``."""
        if ggnd_modules(model):
            return
        run = run_metadata(path, output_keys(model)[0])
        if os.environ.get(ELEMENTS_ENV):
            self.set_elements(model, _parse_elements(os.environ[ELEMENTS_ENV]))
        elif not getattr(model, "ggnd_atomic_numbers", None) and run.get("atomic_numbers"):
            self.set_elements(model, run["atomic_numbers"])
        if os.environ.get(UNITS_ENV):
            parts = [p.strip() for p in os.environ[UNITS_ENV].split(",")]
            if len(parts) != 2:
                raise GGNDError(f"{UNITS_ENV} must read ENERGY,LENGTH (e.g. kcal/mol,Ang), got {parts}")
            self.set_units(model, *parts)
        elif not getattr(model, "ggnd_units", None) and run.get("energy_unit"):
            self.set_units(model, run["energy_unit"], run.get("length_unit") or "Ang")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def _holds_schnetpack_model(path: Path) -> bool:
    """Whether ``path`` is a torch.save file of a SchNetPack model or task (read without unpickling)."""
    content = torch_file_classes(path)
    root = content.root if content is not None and content.kind == "pickle" else None
    return root is not None and root[0].startswith(("schnetpack.model", "schnetpack.task"))


def output_keys(model: nn.Module) -> tuple[str, str]:
    """(energy key, forces key) from the model's Forces/Response module."""
    if not hasattr(model, "output_modules"):
        raise GGNDError(f"{type(model).__name__} is not a SchNetPack NeuralNetworkPotential")
    modules = derivative_modules(model)
    if not modules:
        raise GGNDError("the SchNetPack model has no Forces/Response output module, so it predicts no forces")
    module = modules[0][1]
    force_key = getattr(module, "force_key", None) or module.map_properties.get("forces", "forces")
    return module.energy_key, force_key


def _model_cutoff(model: nn.Module) -> float:
    representation = getattr(model, "representation", None)
    cutoff = getattr(representation, "cutoff", None)
    if cutoff is None:
        raise GGNDError(f"cannot find the cutoff of the {type(representation).__name__} representation")
    return float(cutoff)


def _recorded_elements(model: nn.Module) -> list[int] | None:
    numbers = getattr(model, "ggnd_atomic_numbers", None)
    return sorted(int(z) for z in numbers) if numbers else None


def _parse_elements(text: str) -> list[int]:
    from ase.data import atomic_numbers

    numbers = []
    for item in (part.strip() for part in text.replace(" ", ",").split(",")):
        if not item:
            continue
        if item.isdigit():
            numbers.append(int(item))
        elif item in atomic_numbers:
            numbers.append(atomic_numbers[item])
        else:
            raise GGNDError(f"{ELEMENTS_ENV}: {item!r} is neither an element symbol nor an atomic number")
    return numbers


def _in_model_length(atoms: Atoms, to_angstrom: float) -> Atoms:
    if abs(to_angstrom - 1.0) <= 1e-12:
        return atoms
    scaled = atoms.copy()
    scaled.set_cell(np.asarray(atoms.get_cell()) / to_angstrom, scale_atoms=False)
    scaled.set_positions(atoms.get_positions() / to_angstrom)
    return scaled


@contextmanager
def _derivatives_for(model: nn.Module, training: bool):
    """Full postprocessing, and a differentiable force graph exactly when ``training``.

    SchNetPack's Forces module keeps the graph (``create_graph``) when it is in training mode; that
    flag, not the mode of the whole model, is what a differentiable force loss needs.
    """
    modules = [m for _, m in derivative_modules(model)]
    saved = [m.training for m in modules], getattr(model, "do_postprocessing", True)
    try:
        for m in modules:
            m.training = training
        model.do_postprocessing = True
        yield
    finally:
        for m, flag in zip(modules, saved[0], strict=True):
            m.training = flag
        model.do_postprocessing = saved[1]
