"""The NequIP 0.19 adapter, and the names ``nequip-train`` configs use.

Configs name ``ggnd_plugin.adapters.nequip.GGNDNequIPModel`` (a NequIP model with a GGND block) and
``ggnd_plugin.adapters.nequip.GGNDUpgrade`` (a fitted model from ``ModelFromCheckpoint`` or
``ModelFromPackage`` with a GGND block attached); both are defined in
:mod:`ggnd_plugin.adapters.nequip_build` and looked up lazily here, so importing this module (as the
adapter registry does) does not import nequip.

Files: ``.ckpt`` checkpoints from ``nequip-train`` and ``.nequip.zip`` packages load; :meth:`save`
writes a ``.nequip.zip`` package that ``nequip-compile``, ``NequIPCalculator.from_package`` and
``ModelFromPackage`` read. ``.nequip.pt2`` files (``nequip-compile`` output) are inference-only.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ggnd_plugin.adapters.base import HostAdapter, Prediction
from ggnd_plugin.block import FeatureSpec, GGNDConfig
from ggnd_plugin.errors import GGNDError

if TYPE_CHECKING:
    from ase import Atoms

PACKAGE_SUFFIX = ".nequip.zip"
CHECKPOINT_SUFFIX = ".ckpt"
COMPILED_SUFFIX = ".nequip.pt2"
_EXAMPLE_DATA = "_ggnd_example_data"  # attribute holding a package's example frame, kept for re-saving

_LAZY = {"GGNDNequIPModel", "GGNDUpgrade", "insert_ggnd"}


def __getattr__(name: str):
    if name in _LAZY:
        from ggnd_plugin.adapters import nequip_build

        return getattr(nequip_build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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

        import ggnd_plugin.adapters.nequip_build  # noqa: F401  (packaging registration for GGND models)
        from ggnd_plugin.adapters.nequip_build import e3nn_defaults_kept

        with e3nn_defaults_kept():
            model = load_saved_model(str(path), model_key="sole_model")
        if str(path).endswith(PACKAGE_SUFFIX):
            from nequip.model.saved_models.package import data_dict_from_package

            setattr(model, _EXAMPLE_DATA, data_dict_from_package(str(path)))
        return model.to(device).eval()

    def save(self, model: nn.Module, path: Path) -> Path:
        path = Path(path)
        if not str(path).endswith(PACKAGE_SUFFIX):
            raise GGNDError(
                f"{path}: NequIP models are saved as packages; the file name must end in {PACKAGE_SUFFIX}"
            )
        from ggnd_plugin.adapters.nequip_build import e3nn_defaults_kept
        from ggnd_plugin.safe_io import atomic_path

        with e3nn_defaults_kept(), atomic_path(path) as tmp:
            write_package(model, tmp)
        return path

    def feature_spec(self, model: nn.Module) -> FeatureSpec:
        from ggnd_plugin.adapters.nequip_build import energy_network, host_feature_irreps

        network = energy_network(model)
        return FeatureSpec({"node_features": host_feature_irreps(network)}, num_species=len(model.type_names))

    def attach(self, model: nn.Module, config: GGNDConfig) -> nn.Module:
        from ggnd_plugin.adapters.nequip_build import insert_ggnd

        if self.ggnd_blocks(model):
            raise GGNDError("the NequIP model already has a GGND block")
        upgraded = copy.deepcopy(model)
        try:
            return insert_ggnd(upgraded, config)
        except ValueError as error:
            raise GGNDError(f"cannot attach GGND to this NequIP model: {error}") from error

    def ggnd_blocks(self, model: nn.Module) -> list[nn.Module]:
        from ggnd_plugin.adapters.nequip_build import ggnd_modules

        return [module.block for module in ggnd_modules(model)]

    def fit(
        self,
        train: Path,
        valid: Path,
        work_dir: Path,
        config: GGNDConfig | None = None,
        epochs: int = 50,
        seed: int = 0,
        size: str = "small",
        device: str = "cpu",
        patience: int | None = None,
    ) -> nn.Module:
        """Train through ``nequip-train`` in a subprocess; return the best checkpoint, loaded.

        The config is the package's template (``nequip_configs/fit.yaml``) filled in and written to
        ``work_dir/nequip-fit.yaml``; the log goes to ``work_dir/nequip-train.log``. A fit stopped
        part-way restarts from scratch in the same ``work_dir`` (see :mod:`ggnd_plugin.host_fit`);
        ``work_dir`` must otherwise be new or empty.
        """
        from ggnd_plugin.host_fit import fit_work_dir

        self.require()
        work_dir = Path(work_dir).resolve()
        fit_config(train, valid, config, epochs, seed, size, device, patience)  # bad arguments: first
        with fit_work_dir(work_dir, "nequip", FIT_OUTPUTS, [train, valid], legacy_marks=[FIT_LOG]):
            config_path = write_fit_config(
                train, valid, work_dir, config, epochs, seed, size, device, patience=patience
            )
            run_nequip_train(config_path, work_dir, epochs, label=work_dir.name)
            best = work_dir / "best.ckpt"
            if not best.exists():
                raise GGNDError(f"nequip-train finished but wrote no {best}; see {work_dir / FIT_LOG}")
            return self.load(best)

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
        from ggnd_plugin.adapters.nequip_build import energy_network

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


# --------------------------------------------------------------------------------------------------
# Training from scratch (NequIPAdapter.fit): nequip-train with the package's config template
# --------------------------------------------------------------------------------------------------
FIT_TEMPLATE = Path(__file__).parent / "nequip_configs" / "fit.yaml"
FIT_CONFIG_NAME = "nequip-fit"
FIT_LOG = "nequip-train.log"
# What nequip-train (hydra, Lightning) and fit() write in the work folder; a restarted fit removes them.
FIT_OUTPUTS = ("best*.ckpt", "last*.ckpt", ".hydra", "train.log", f"{FIT_CONFIG_NAME}.yaml", FIT_LOG)
GGND_BUILDER = "ggnd_plugin.adapters.nequip.GGNDNequIPModel"
# Small, fast NequIP models (float64, CPU); the template turns parity off (fewer irreps, faster).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "cutoff_radius": 5.0,
        "train_batch_size": 4,
        "model": {
            "l_max": 1,
            "num_layers": 2,
            "num_features": 8,
            "radial_mlp_depth": 1,
            "radial_mlp_width": 16,
        },
    },
    "small": {
        "cutoff_radius": 5.0,
        "train_batch_size": 5,
        "model": {
            "l_max": 1,
            "num_layers": 3,
            "num_features": 24,
            "radial_mlp_depth": 1,
            "radial_mlp_width": 32,
        },
    },
}


def _elements(*paths: Path) -> list[str]:
    """Chemical symbols found in the given structure files, ordered by atomic number."""
    from ase.data import atomic_numbers
    from ase.io import iread

    symbols: set[str] = set()
    for path in paths:
        try:
            for atoms in iread(str(path), index=":"):
                symbols.update(atoms.get_chemical_symbols())
        except Exception as error:
            raise GGNDError(f"{path}: cannot read structures ({type(error).__name__}: {error})") from error
    if not symbols:
        raise GGNDError(f"no structures in {', '.join(str(p) for p in paths)}")
    return sorted(symbols, key=atomic_numbers.__getitem__)


def fit_config(
    train: Path,
    valid: Path,
    config: GGNDConfig | None,
    epochs: int,
    seed: int,
    size: str,
    device: str = "cpu",
    patience: int | None = None,
) -> dict[str, Any]:
    """The nequip-train config :meth:`NequIPAdapter.fit` runs: the template with these values filled in.

    ``patience``: Lightning's early stopping on the validation metric, and a plateau scheduler halving
    the learning rate after ``max(2, patience // 3)`` epochs without improvement.
    """
    import yaml

    from ggnd_plugin.adapters.base import lightning_accelerator

    if size not in SIZES:
        raise GGNDError(f"unknown model size {size!r}; choose from {sorted(SIZES)}")
    if epochs < 1:
        raise GGNDError(f"epochs must be at least 1, got {epochs}")
    for path in (train, valid):
        if not Path(path).exists():
            raise GGNDError(f"{path}: no such file")
    sizes = SIZES[size]
    values = yaml.safe_load(FIT_TEMPLATE.read_text())
    values.update(
        seed=int(seed),
        train_file=str(Path(train).resolve()),
        val_file=str(Path(valid).resolve()),
        cutoff_radius=float(sizes["cutoff_radius"]),
        model_type_names=_elements(train, valid),
        max_epochs=int(epochs),
        train_batch_size=int(sizes["train_batch_size"]),
    )
    values["trainer"]["accelerator"] = lightning_accelerator(device)
    model = values["training_module"]["model"]
    model.update(sizes["model"])
    if config is not None:
        model["_target_"] = GGND_BUILDER
        model["ggnd"] = config.to_dict()
    if patience is not None:
        if patience < 1:
            raise GGNDError(f"patience must be at least 1, got {patience}")
        monitor = "val0_epoch/weighted_sum"
        values["trainer"]["callbacks"].append(
            {
                "_target_": "lightning.pytorch.callbacks.EarlyStopping",
                "monitor": monitor,
                "patience": int(patience),
                "mode": "min",
            }
        )
        values["training_module"]["lr_scheduler"] = {
            "scheduler": {
                "_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau",
                "factor": 0.5,
                "patience": max(2, int(patience) // 3),
            },
            "monitor": monitor,
            "interval": "epoch",
            "frequency": 1,
        }
    return values


def write_fit_config(
    train: Path,
    valid: Path,
    work_dir: Path,
    config: GGNDConfig | None,
    epochs: int,
    seed: int,
    size: str,
    device: str = "cpu",
    patience: int | None = None,
) -> Path:
    """Write :func:`fit_config` to ``work_dir/nequip-fit.yaml`` (removing checkpoints of an earlier run)."""
    import yaml

    from ggnd_plugin.safe_io import atomic_write_text

    values = fit_config(train, valid, config, epochs, seed, size, device, patience)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # Lightning would write best-v1.ckpt next to an old best.ckpt: start from a clean folder.
    for stale in [*work_dir.glob("best*.ckpt"), *work_dir.glob("last*.ckpt")]:
        stale.unlink()
    path = work_dir / f"{FIT_CONFIG_NAME}.yaml"
    atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
    return path


def run_nequip_train(
    config_path: Path, work_dir: Path, epochs: int | None = None, label: str = "nequip"
) -> None:
    """Run ``nequip-train`` on ``config_path`` in ``work_dir``, its output going to ``work_dir/nequip-train.log``.

    The checkpoint callback logs one ``Epoch N, global step M: ...`` line per validation; those lines
    drive a progress bar.
    """
    import sys

    from ggnd_plugin.host_fit import run_trainer

    config_path = Path(config_path).resolve()
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    log = work_dir / FIT_LOG
    command = [
        sys.executable,
        "-m",
        "nequip.scripts.train",
        "-cp",
        str(config_path.parent),
        "-cn",
        config_path.stem,
        f"hydra.run.dir={work_dir}",
    ]
    run_trainer(
        command,
        log,
        trainer="nequip-train",
        label=label,
        epochs=epochs,
        epoch_line=r"Epoch (\d+), global step \d+: (?:.*?\(best (?P<loss>[0-9.eE+-]+)\))?",
        cwd=work_dir,
        header=" ".join(command),
    )


# --------------------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------------------
def _source_importer(model: nn.Module):
    """The torch.package importer a model was loaded from, or None for models built in this process."""
    from torch.package import PackageImporter

    for module in model.modules():
        loader = getattr(type(module).forward, "__globals__", {}).get("__loader__")
        if isinstance(loader, PackageImporter):
            return loader
    return None


def example_data(model: nn.Module) -> dict:
    """A frame for ``nequip-compile`` to trace: the package's own, or a small synthetic molecule."""
    from nequip.data import AtomicDataDict
    from nequip.data.transforms import NeighborListTransform

    stored = getattr(model, _EXAMPLE_DATA, None)
    if stored is not None:
        return stored
    num_types = len(model.type_names)
    n = max(8, num_types)
    generator = torch.Generator().manual_seed(0)
    grid = torch.stack(torch.meshgrid(*[torch.arange(3.0)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n]
    positions = 1.5 * grid + 0.1 * torch.randn(n, 3, generator=generator, dtype=grid.dtype)
    cutoff = float(model.metadata["r_max"])
    data = {
        AtomicDataDict.POSITIONS_KEY: positions.to(torch.float64),
        AtomicDataDict.ATOM_TYPE_KEY: torch.arange(n) % num_types,
        AtomicDataDict.CELL_KEY: (100.0 * torch.eye(3, dtype=torch.float64))[None],
        AtomicDataDict.PBC_KEY: torch.zeros(1, 3, dtype=torch.bool),
    }
    data = NeighborListTransform(r_max=cutoff)(data)
    return AtomicDataDict.with_batch_(data)


def write_package(model: nn.Module, path: Path) -> Path:
    """Write ``model`` as a ``.nequip.zip`` package (the eager model; ``compile`` falls back to it).

    The same layout ``nequip-package build`` writes from a checkpoint, for models that exist only in
    memory (``ggnd upgrade``). GGND's graph modules are interned with the model code.
    """
    import yaml
    from nequip.model.saved_models.package import _suppress_package_importer_exporter_warnings
    from nequip.scripts import _package_utils
    from nequip.scripts.package import _CURRENT_NEQUIP_PACKAGE_VERSION
    from nequip.utils.versions import get_current_code_versions
    from nequip.utils.versions.version_utils import get_version_safe
    from torch.package import PackageExporter, sys_importer

    from ggnd_plugin.adapters.nequip_build import ggnd_modules, register_for_packaging

    register_for_packaging()
    data = example_data(model)
    stored = model.__dict__.pop(_EXAMPLE_DATA, None)
    source = _source_importer(model)
    importers = (source, sys_importer) if source is not None else (sys_importer,)
    metadata = {
        "versions": get_current_code_versions(verbose=False),
        "external_modules": {name: get_version_safe(name) for name in _package_utils._EXTERNAL_MODULES},
        "package_version_id": _CURRENT_NEQUIP_PACKAGE_VERSION,
        "available_models": ["eager"],
        "atom_types": dict(enumerate(model.type_names)),
    }
    config = {
        "written_by": "ggnd_plugin.adapters.nequip.write_package",
        "type_names": list(model.type_names),
        "r_max": float(model.metadata["r_max"]),
        "ggnd": [module.block.config.to_dict() for module in ggnd_modules(model)],
    }
    was_training = model.training
    try:
        with (
            _suppress_package_importer_exporter_warnings(),
            PackageExporter(str(path), importer=importers) as exp,
        ):
            exp.mock([f"{name}.**" for name in _package_utils._MOCK_MODULES])
            exp.extern([f"{name}.**" for name in _package_utils._EXTERNAL_MODULES])
            exp.intern([f"{name}.**" for name in _package_utils._INTERNAL_MODULES])
            exp.save_pickle("model", "example_data.pkl", data, dependencies=True)
            exp.save_text("model", "config.yaml", yaml.safe_dump(config))
            exp.save_text("model", "package_metadata.txt", yaml.safe_dump(metadata))
            exp.save_pickle(
                "model",
                "eager_model.pkl",
                nn.ModuleDict({"sole_model": model.cpu().eval()}),
                dependencies=True,
            )
    except Exception as error:
        raise GGNDError(
            f"{path}: could not write the NequIP package ({type(error).__name__}: {error})"
        ) from error
    finally:
        model.train(was_training)
        if stored is not None:
            setattr(model, _EXAMPLE_DATA, stored)
    return path
