"""The NequIP 0.19 adapter.

Files: ``.ckpt`` checkpoints from ``nequip-train`` and ``.nequip.zip`` packages load; :meth:`save`
writes a ``.nequip.zip`` package (:mod:`ggnd_plugin.adapters.nequip.package_writer`) that
``nequip-compile``, ``NequIPCalculator.from_package`` and ``ModelFromPackage`` read. ``.nequip.pt2``
files (``nequip-compile`` output) are inference-only. GGND enters a NequIP model as graph modules
(:mod:`~ggnd_plugin.adapters.nequip.builders`); :meth:`fit` runs ``nequip-train``
(:mod:`~ggnd_plugin.adapters.nequip.training`).

Nothing here imports nequip at module level: the registry imports this module to list adapters.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ggnd_plugin.adapters.base import HostAdapter, Prediction
from ggnd_plugin.adapters.host_trainer import FitRequest, TrainerCommand
from ggnd_plugin.adapters.nequip.package_writer import EXAMPLE_DATA_ATTRIBUTE, write_package
from ggnd_plugin.adapters.nequip.training import (
    FIT_OUTPUTS,
    TRAINER,
    fit_config,
    nequip_train_command,
    write_fit_config,
)
from ggnd_plugin.block import FeatureSpec, GGNDConfig
from ggnd_plugin.errors import GGNDError

if TYPE_CHECKING:
    from ase import Atoms

PACKAGE_SUFFIX = ".nequip.zip"
CHECKPOINT_SUFFIX = ".ckpt"
COMPILED_SUFFIX = ".nequip.pt2"


def _ensure_global_state() -> None:
    from nequip.utils.global_state import global_state_initialized, set_global_state

    if not global_state_initialized():
        set_global_state()


class NequIPAdapter(HostAdapter):
    name = "nequip"
    distribution = "nequip"
    module = "nequip"
    file_suffixes = (PACKAGE_SUFFIX, CHECKPOINT_SUFFIX, COMPILED_SUFFIX)

    # ---- recognising models -------------------------------------------------------------------------
    def recognises_model(self, model: Any) -> bool:
        # An attribute test, not isinstance: models loaded from a package have the package's classes.
        return isinstance(model, nn.Module) and bool(getattr(model, "is_graph_model", False))

    def recognises_file(self, path: Path) -> bool:
        return str(path).endswith(self.file_suffixes)

    # ---- model lifecycle ----------------------------------------------------------------------------
    def load(self, path: Path, device: str = "cpu") -> nn.Module:
        self.require()
        path = Path(path)
        if not path.exists():
            raise GGNDError(f"{path}: no such file")
        if str(path).endswith(COMPILED_SUFFIX):
            raise GGNDError(
                f"{path}: a nequip-compile output is inference-only; load the .ckpt or .nequip.zip it was "
                "compiled from (use NequIPCalculator.from_compiled_model to run it)"
            )
        if not str(path).endswith((PACKAGE_SUFFIX, CHECKPOINT_SUFFIX)):
            raise GGNDError(
                f"{path}: NequIP models are {PACKAGE_SUFFIX} packages or {CHECKPOINT_SUFFIX} files"
            )
        _ensure_global_state()
        from nequip.model.saved_models.load_utils import load_saved_model

        import ggnd_plugin.adapters.nequip.builders  # noqa: F401  (packaging registration for GGND models)
        from ggnd_plugin.adapters.nequip.builders import e3nn_defaults_kept

        with e3nn_defaults_kept():
            model = load_saved_model(str(path), model_key="sole_model")
        if str(path).endswith(PACKAGE_SUFFIX):
            from nequip.model.saved_models.package import data_dict_from_package

            setattr(model, EXAMPLE_DATA_ATTRIBUTE, data_dict_from_package(str(path)))
        return model.to(device).eval()

    def save(self, model: nn.Module, path: Path) -> Path:
        path = Path(path)
        if not str(path).endswith(PACKAGE_SUFFIX):
            raise GGNDError(
                f"{path}: NequIP models are saved as packages; the file name must end in {PACKAGE_SUFFIX}"
            )
        from ggnd_plugin.adapters.nequip.builders import e3nn_defaults_kept
        from ggnd_plugin.safe_io import atomic_path

        with e3nn_defaults_kept(), atomic_path(path) as tmp:
            write_package(model, tmp)
        return path

    def feature_spec(self, model: nn.Module) -> FeatureSpec:
        from ggnd_plugin.adapters.nequip.builders import energy_network, host_feature_irreps

        network = energy_network(model)
        return FeatureSpec({"node_features": host_feature_irreps(network)}, num_species=len(model.type_names))

    def attach(self, model: nn.Module, config: GGNDConfig) -> nn.Module:
        from ggnd_plugin.adapters.nequip.builders import insert_ggnd

        if self.ggnd_blocks(model):
            raise GGNDError("the NequIP model already has a GGND block")
        upgraded = copy.deepcopy(model)
        try:
            return insert_ggnd(upgraded, config)
        except ValueError as error:
            raise GGNDError(f"cannot attach GGND to this NequIP model: {error}") from error

    def ggnd_blocks(self, model: nn.Module) -> list[nn.Module]:
        from ggnd_plugin.adapters.nequip.builders import ggnd_modules

        return [module.block for module in ggnd_modules(model)]

    # ---- training from scratch: nequip-train with the package's config template ---------------------
    # The template (nequip/fit.yaml) filled in and written to work_dir/nequip-fit.yaml; the best
    # checkpoint is what fit() loads.
    trainer = TRAINER

    def check_fit(self, request: FitRequest) -> None:
        fit_config(request)  # builds the config, raising on what it cannot fill in

    def fit_outputs(self, request: FitRequest) -> tuple[str, ...]:
        return FIT_OUTPUTS

    def prepare_fit(self, request: FitRequest) -> TrainerCommand:
        config_path = write_fit_config(request)
        return nequip_train_command(config_path, request.work_dir)

    # ---- what the model knows -----------------------------------------------------------------------
    def type_names(self, model: nn.Module) -> list[str]:
        return list(model.type_names)

    def atomic_numbers(self, model: nn.Module) -> list[int]:
        from ase.data import atomic_numbers

        unknown = [name for name in model.type_names if name not in atomic_numbers]
        if unknown:
            raise GGNDError(
                f"NequIP type names {unknown} are not chemical symbols; ggnd-plugin maps structures to NequIP "
                "types by element"
            )
        return [atomic_numbers[name] for name in model.type_names]

    def cutoff(self, model: nn.Module) -> float:
        return float(model.metadata["r_max"])

    def atomic_energies(self, model: nn.Module) -> dict[int, float] | None:
        from ggnd_plugin.adapters.nequip.builders import energy_network

        scale_shift = dict(energy_network(model).named_children()).get("per_type_energy_scale_shift")
        shifts = getattr(scale_shift, "shifts", None)
        if shifts is None or not getattr(scale_shift, "has_shifts", True):
            return None
        shifts = shifts.detach().reshape(-1)
        if shifts.numel() == 1:
            shifts = shifts.expand(len(model.type_names))
        return dict(zip(self.atomic_numbers(model), shifts.tolist(), strict=True))

    # ---- predictions --------------------------------------------------------------------------------
    def transforms(self, model: nn.Module) -> list:
        """NequIP's own data transforms for this model: element -> type, neighbour list."""
        from nequip.integrations.utils import basic_transforms

        self.atomic_numbers(model)  # type names must be chemical symbols
        species = {name: name for name in model.type_names}
        return basic_transforms(model.metadata, self.cutoff(model), list(model.type_names), species)

    def to_data(self, model: nn.Module, structures: Sequence[Atoms]) -> dict:
        """A batched ``AtomicDataDict`` of ``structures`` built with nequip's own tools."""
        from nequip.data import AtomicDataDict, from_ase

        transforms = self.transforms(model)
        frames = []
        for atoms in structures:
            # Only the geometry: labels in atoms.info/arrays are not model inputs.
            data = from_ase(atoms, exclude_keys=["energy", "forces", "stress", "free_energy", "energies"])
            for transform in transforms:
                data = transform(data)
            frames.append(data)
        return AtomicDataDict.batched_from_list(frames)

    def predict(self, model: nn.Module, structures: Sequence[Atoms], training: bool = False) -> Prediction:
        from nequip.data import AtomicDataDict

        self.check_structures(model, structures)
        device = next(iter(model.parameters())).device
        data = AtomicDataDict.to_(self.to_data(model, structures), device)
        was_training = model.training
        model.train(training)  # ForceStressOutput builds a differentiable force graph in train mode only
        try:
            out = model(data)
        finally:
            model.train(was_training)
        energy = out[AtomicDataDict.TOTAL_ENERGY_KEY].reshape(-1)
        forces = out[AtomicDataDict.FORCE_KEY]
        if not training:
            energy, forces = energy.detach(), forces.detach()
        return Prediction(energy=energy, forces=forces)

    def ase_calculator(self, model: nn.Module, device: str = "cpu"):
        from nequip.integrations.ase import NequIPCalculator

        return NequIPCalculator(model.eval(), device=device, transforms=self.transforms(model))

    def torchsim_model(self, model: nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float64):
        from nequip.integrations.torchsim import NequIPTorchSimCalc

        if dtype != torch.float64:
            raise GGNDError("NequIP's TorchSim wrapper runs in float64 (NequIP positions are float64)")
        return NequIPTorchSimCalc(model.eval(), device=device, transforms=self.transforms(model))
