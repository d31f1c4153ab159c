"""The MACE 0.3.16 adapter: a GGND block added to a MACE model, in MACE's own file format.

The model is :class:`~ggnd_plugin.adapters.mace.wrapper.GGNDMACE` (MACE's model wrapped, called like
it). Files are MACE ``.model`` files: ``torch.save`` of the whole module, recognised from the classes
their pickle names before anything is unpickled. Files pickled under e3nn <= 0.5 (every model trained
with a stock mace-torch 0.3.x, which pins e3nn 0.4.4) are converted exactly on load
(:mod:`ggnd_plugin.adapters.mace.legacy_e3nn`).

Nothing here imports MACE at module level: the registry imports this module to list adapters.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ggnd_plugin.adapters.base import HostAdapter, Prediction
from ggnd_plugin.adapters.host_trainer import FitRequest, TrainerCommand
from ggnd_plugin.adapters.mace.legacy_e3nn import legacy_e3nn_unpickling, rebuild_under_current_e3nn
from ggnd_plugin.adapters.mace.training import TRAINER, check_size, fit_command, fit_outputs, model_name
from ggnd_plugin.adapters.mace.wrapper import GGNDMACE, attach_ggnd, dtype_of, mace_feature_spec
from ggnd_plugin.adapters.pickled_classes import torch_file_classes
from ggnd_plugin.block import FeatureSpec, GGNDConfig
from ggnd_plugin.errors import GGNDError

if TYPE_CHECKING:
    from ase import Atoms

MODEL_SUFFIX = ".model"
_HOST_MODULE_PREFIX = "mace.modules"
# How a saved GGNDMACE is named: by its module today, by the package in files of 0.1.0 and 0.2.0.
_WRAPPER_GLOBALS = {(GGNDMACE.__module__, GGNDMACE.__qualname__), ("ggnd_plugin.adapters.mace", "GGNDMACE")}


# --------------------------------------------------------------------------------------------------
# Recognising files without unpickling them
# --------------------------------------------------------------------------------------------------
def sniff_model_file(path: Path) -> str | None:
    """ "plain" for a MACE model file, "ggnd" for one with GGND, "torchscript" for a compiled MACE
    model, None for anything else."""
    content = torch_file_classes(path)
    if content is None:
        return None
    if content.kind == "torchscript":
        named = any(module.startswith("__torch__.mace") for module, _ in content.globals)
        return "torchscript" if named else None
    root = content.root  # the first class the pickle references is the saved object's own
    if root is None:
        return None
    if root in _WRAPPER_GLOBALS:
        return "ggnd"
    if root[0].startswith(_HOST_MODULE_PREFIX):
        return "plain"
    return None


# --------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------
class MACEAdapter(HostAdapter):
    name = "mace"
    distribution = "mace-torch"
    module = "mace"
    file_suffixes = (MODEL_SUFFIX,)

    # ---- recognising models -------------------------------------------------------------------------
    def recognises_model(self, model: Any) -> bool:
        if isinstance(model, GGNDMACE):
            return True
        return (
            isinstance(model, nn.Module)
            and type(model).__module__.startswith(_HOST_MODULE_PREFIX)
            and all(hasattr(model, name) for name in ("r_max", "atomic_numbers", "interactions", "products"))
        )

    def recognises_file(self, path: Path) -> bool:
        return sniff_model_file(Path(path)) in ("plain", "ggnd")

    # ---- model lifecycle ----------------------------------------------------------------------------
    def load(self, path: Path, device: str = "cpu") -> nn.Module:
        """Load a MACE ``.model`` file (plain or with GGND); files from e3nn <= 0.5 are converted exactly.

        Like MACE itself this unpickles the file: load only files you trust.
        """
        self.require()
        path = Path(path)
        if not path.exists():
            raise GGNDError(f"{path}: no such file")
        kind = sniff_model_file(path)
        if kind == "torchscript":
            raise GGNDError(
                f"{path}: a TorchScript-compiled MACE model (*_compiled.model) cannot be upgraded or trained; "
                "use the plain .model file that mace_run_train wrote next to it"
            )
        if kind is None:
            raise GGNDError(
                f"{path}: not a MACE model file (expected a whole MACE model saved with torch.save, as "
                "mace_run_train writes *.model files)"
            )
        import mace  # noqa: F401  (sets MACE's torch.load environment before unpickling)

        try:
            with legacy_e3nn_unpickling() as legacy, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.load(path, map_location=device, weights_only=False)
        except ModuleNotFoundError as error:
            raise GGNDError(f"{path}: needs the Python module '{error.name}' to load") from error
        except Exception as error:
            raise GGNDError(
                f"{path}: could not be loaded as a MACE model ({type(error).__name__}: {error})"
            ) from error
        if not self.recognises_model(model):
            raise GGNDError(
                f"{path}: holds a {type(model).__module__}.{type(model).__name__}, not a MACE model"
            )
        if legacy:
            model = rebuild_under_current_e3nn(model)
        return model.to(device).eval()

    def save(self, model: nn.Module, path: Path) -> Path:
        """``torch.save`` of the whole model, as mace_run_train writes ``.model`` files (a CPU copy)."""
        if not self.recognises_model(model):
            raise GGNDError(f"cannot save a {type(model).__name__} as a MACE model file")
        from ggnd_plugin.safe_io import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(copy.deepcopy(model).cpu(), tmp)
        return path

    def feature_spec(self, model: nn.Module) -> FeatureSpec:
        return mace_feature_spec(model)

    def attach(self, model: nn.Module, config: GGNDConfig) -> nn.Module:
        if isinstance(model, GGNDMACE):
            raise GGNDError("the MACE model already has a GGND block")
        return attach_ggnd(copy.deepcopy(model), config)

    def ggnd_blocks(self, model: nn.Module) -> list[nn.Module]:
        return [model.ggnd] if isinstance(model, GGNDMACE) else []

    # ---- what the model knows -----------------------------------------------------------------------
    def atomic_numbers(self, model: nn.Module) -> list[int]:
        return [int(z) for z in model.atomic_numbers]

    def cutoff(self, model: nn.Module) -> float:
        return float(model.r_max)

    def head(self, model: nn.Module) -> str:
        """The head predictions use: the only one, else one named 'default', else the last (as MACE does)."""
        heads = list(getattr(model, "heads", None) or ["Default"])
        if len(heads) == 1:
            return heads[0]
        named = [head for head in heads if head.lower() == "default"]
        return named[0] if named else heads[-1]

    def atomic_energies(self, model: nn.Module) -> dict[int, float] | None:
        table = getattr(model, "atomic_energies_fn", None)
        energies = getattr(table, "atomic_energies", None)
        if energies is None:
            return None
        energies = energies.detach().cpu()
        if energies.dim() == 2:
            heads = list(getattr(model, "heads", None) or ["Default"])
            energies = energies[heads.index(self.head(model))]
        return dict(zip(self.atomic_numbers(model), energies.tolist(), strict=True))

    # ---- predictions --------------------------------------------------------------------------------
    def to_batch(self, model: nn.Module, structures: Sequence[Atoms]) -> dict[str, Tensor]:
        """A batched MACE input dict built with MACE's own data tools, as MACECalculator builds it."""
        from mace import data as mace_data
        from mace.tools import torch_geometric, torch_tools, utils

        parameter = next(iter(model.parameters()))
        z_table = utils.AtomicNumberTable(self.atomic_numbers(model))
        heads = list(getattr(model, "heads", None) or ["Default"])
        labels_ignored = mace_data.KeySpecification(info_keys={}, arrays_keys={})
        with torch_tools.default_dtype(parameter.dtype):
            graphs = [
                mace_data.AtomicData.from_config(
                    mace_data.config_from_atoms(
                        atoms, key_specification=labels_ignored, head_name=self.head(model)
                    ),
                    z_table=z_table,
                    cutoff=self.cutoff(model),
                    heads=heads,
                )
                for atoms in structures
            ]
        batch = torch_geometric.Batch.from_data_list(graphs).to(parameter.device)
        return batch.to_dict()

    def predict(self, model: nn.Module, structures: Sequence[Atoms], training: bool = False) -> Prediction:
        self.check_structures(model, structures)
        data = self.to_batch(model, structures)
        # MACE's ``training`` flag builds the force graph with create_graph, so a force loss trains.
        out = model(data, training=training, compute_force=True)
        energy, forces = out["energy"].reshape(-1), out["forces"]
        if not training:
            energy, forces = energy.detach(), forces.detach()
        return Prediction(energy=energy, forces=forces)

    def ase_calculator(self, model: nn.Module, device: str = "cpu"):
        """MACE's own ``MACECalculator`` on a copy (it freezes and may cast the model it is given)."""
        from mace.calculators import MACECalculator

        dtype = "float64" if dtype_of(model) == torch.float64 else "float32"
        return MACECalculator(models=[copy.deepcopy(model).eval()], device=device, default_dtype=dtype)

    def torchsim_model(self, model: nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float64):
        """TorchSim's ``MaceModel`` (MACE's own TorchSim wrapper) on a copy of ``model``."""
        from torch_sim.models.mace import MaceModel

        return MaceModel(
            model=copy.deepcopy(model).eval(),
            device=torch.device(device),
            dtype=dtype,
            compute_forces=True,
            compute_stress=True,
        )

    # ---- training from scratch: ggnd-mace-train (mace_run_train plus GGND) in a subprocess ----------
    trainer = TRAINER

    def check_fit(self, request: FitRequest) -> None:
        check_size(request.size)

    def fit_outputs(self, request: FitRequest) -> list[str]:
        return fit_outputs(model_name(request.config))

    def prepare_fit(self, request: FitRequest) -> TrainerCommand:
        argv, model_path = fit_command(request)
        return TrainerCommand(argv, model_path)
