"""SchNetPack 2.2 adapter: GGND as one more output module of a ``NeuralNetworkPotential``.

SchNetPack models are whole pickled modules (``best_model`` from ``spktrain``); the GGND module
(:class:`~ggnd_plugin.adapters.schnetpack_module.GGNDEnergy`) is inserted before the ``Forces``
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
from ggnd_plugin.adapters.pickled_classes import torch_file_classes
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
        """Train PaiNN (``config=None``) or PaiNN + GGND from scratch with SchNetPack's ``spktrain``.

        The extxyz files become one ASE database in ``work_dir`` (training frames first) with a split
        file that keeps exactly the given train/valid partition; spktrain runs
        ``experiment=painn_3bpa`` or ``experiment=ggnd_painn_3bpa`` in a subprocess (see
        :func:`fit_command`), its output going to ``work_dir/spktrain.log``. Returns its ``best_model``.
        A fit stopped part-way restarts from scratch in the same ``work_dir`` (see
        :mod:`ggnd_plugin.host_fit`); ``work_dir`` must otherwise be new or empty.
        """
        from ggnd_plugin.host_fit import fit_work_dir

        self.require()
        work_dir = Path(work_dir).absolute()
        check_fit_arguments(train, valid, epochs, size)
        with fit_work_dir(
            work_dir, "schnetpack", fit_outputs(config), [train, valid], legacy_marks=[FIT_LOG]
        ):
            command, model_path = fit_command(
                train, valid, work_dir, config, epochs, seed, size, device, patience=patience
            )
            run_fit(command, work_dir, epochs, label=work_dir.name)
            if not model_path.is_file():
                raise GGNDError(f"spktrain finished but wrote no {model_path}; see {work_dir / FIT_LOG}")
            return self.load(model_path)

    def feature_spec(self, model: nn.Module) -> FeatureSpec:
        from ggnd_plugin.adapters.schnetpack_module import SCALAR_KEY, VECTOR_KEY, representation_layout

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
        from ggnd_plugin.adapters.schnetpack_module import insert_ggnd

        if self.ggnd_blocks(model):
            raise GGNDError("the SchNetPack model already has a GGND module")
        elements = self.atomic_numbers(model)
        energy_unit, length_unit = self.units(model)
        upgraded = copy.deepcopy(model)
        insert_ggnd(upgraded, elements, config, energy_unit=energy_unit, length_unit=length_unit)
        return upgraded

    def ggnd_blocks(self, model: nn.Module) -> list[nn.Module]:
        from ggnd_plugin.adapters.schnetpack_module import ggnd_modules

        return [module.block for module in ggnd_modules(model)]

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
        from ggnd_plugin.adapters.schnetpack_module import ggnd_modules

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
        from ggnd_plugin.adapters.schnetpack_module import ggnd_modules

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

        from ggnd_plugin.adapters.schnetpack_module import default_dtype

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

        from ggnd_plugin.adapters.schnetpack_ase import DtypeSafeSpkCalculator

        energy_key, force_key = output_keys(model)
        energy_unit, length_unit = self.units(model)
        if abs(self.conversion(model)[1] - 1.0) > 1e-12:
            return _predict_calculator(self, model)
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
        from ggnd_plugin.adapters.schnetpack_torchsim import SchNetPackModel

        to_ev, to_angstrom = self.conversion(model)
        return SchNetPackModel(
            model, energy_to_ev=to_ev, length_to_angstrom=to_angstrom, device=device, dtype=dtype
        )

    # ---- metadata of spktrain runs ------------------------------------------------------------------
    def _record_metadata(self, model: nn.Module, path: Path) -> None:
        """Fill in elements and units from the environment or the spktrain run beside ``path``."""
        from ggnd_plugin.adapters.schnetpack_module import ggnd_modules

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
# SchNetPackAdapter.fit: spktrain in a subprocess
# --------------------------------------------------------------------------------------------------
FIT_LOG = "spktrain.log"


def fit_outputs(config: GGNDConfig | None) -> tuple[str, ...]:
    """What spktrain and fit() write in the work folder ("data" is an empty folder spktrain's hydra
    config creates); a restarted fit removes them (the run of the other model kind stays)."""
    return (f"runs/{_run_id(config)}", "data.db", "split.npz", "data", FIT_LOG)


def _run_id(config: GGNDConfig | None) -> str:
    return "painn" if config is None else "ggnd_painn"


# Small, fast PaiNN models for ``ggnd demo`` (all with the 5 Å cutoff of the 3BPA experiments).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"n_atom_basis": 16, "n_interactions": 2, "batch_size": 4, "lr": 1e-3},
    "small": {"n_atom_basis": 32, "n_interactions": 3, "batch_size": 5, "lr": 1e-3},
}
# One line per validation from the checkpoint callback (made verbose by fit_command):
# "Epoch 3, global step 36: 'val_loss' reached 0.51 (best 0.51), ..." or "... was not in top 1".
_EPOCH_LINE = r"^Epoch (\d+), global step \d+: 'val_loss' (?:reached (?P<loss>[0-9.eE+-]+))?"


def _spktrain_executable() -> list[str]:
    """spktrain (``schnetpack.cli:train``) run through :func:`ggnd_plugin.host_fit.main`, which makes
    its ``torch.save`` of ``best_model`` atomic."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "spktrain"
    script = str(beside) if beside.is_file() else shutil.which("spktrain")
    if not script:
        raise GGNDError(
            "cannot find SchNetPack's `spktrain` command (is schnetpack installed in this environment?)"
        )
    return [sys.executable, "-m", "ggnd_plugin.host_fit", "schnetpack.cli:train", script]


def _hydra_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_fit_arguments(train: Path, valid: Path, epochs: int, size: str) -> None:
    if size not in SIZES:
        raise GGNDError(f"unknown model size {size!r}; choose from {sorted(SIZES)}")
    if epochs < 1:
        raise GGNDError(f"epochs must be at least 1, got {epochs}")
    for path in (train, valid):
        if not Path(path).is_file():
            raise GGNDError(f"{Path(path).absolute()}: no such file")


def fit_command(
    train: Path,
    valid: Path,
    work_dir: Path,
    config: GGNDConfig | None,
    epochs: int,
    seed: int,
    size: str,
    device: str = "cpu",
    patience: int | None = None,
) -> tuple[list[str], Path]:
    """Write the database and split for ``spktrain``; return its command line and the model it writes.

    The run is ``work_dir/runs/<painn|ggnd_painn>`` (replaced if it exists: spktrain would otherwise
    resume it). ``epochs`` is ``trainer.max_epochs``; the test stage spktrain runs after training uses
    the validation frames. ``patience``: SchNetPack's early stopping on the validation loss and its
    plateau scheduler after ``max(2, patience // 3)`` epochs (no cool-down).
    """
    import shutil

    import numpy as np

    from ggnd_plugin.adapters.base import lightning_accelerator
    from ggnd_plugin.adapters.schnetpack_data import extxyz_to_spk_db
    from ggnd_plugin.data import read_labelled

    check_fit_arguments(train, valid, epochs, size)
    train, valid, work_dir = Path(train).absolute(), Path(valid).absolute(), Path(work_dir).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    database, split = work_dir / "data.db", work_dir / "split.npz"
    n_train = len(read_labelled(train))
    n_valid = extxyz_to_spk_db([train, valid], database, overwrite=True) - n_train
    if n_train < 1 or n_valid < 1:
        raise GGNDError(f"fit needs training and validation frames, got {n_train} and {n_valid}")
    train_idx, valid_idx = np.arange(n_train), np.arange(n_train, n_train + n_valid)
    np.savez(split, train_idx=train_idx, val_idx=valid_idx, test_idx=valid_idx)
    elements = sorted({int(z) for atoms in read_labelled(train) for z in atoms.numbers})

    run_id = _run_id(config)
    run_dir = work_dir / "runs" / run_id
    if run_dir.exists():
        shutil.rmtree(run_dir)
    options = SIZES[size]
    overrides = {
        "experiment": "painn_3bpa" if config is None else "ggnd_painn_3bpa",
        "run.path": str(work_dir / "runs"),
        "run.id": run_id,
        "data.datapath": str(database),
        "+data.split_file": str(split),
        "data.num_train": n_train,
        "data.num_val": n_valid,
        "data.num_test": n_valid,
        "data.batch_size": options["batch_size"],
        "data.num_workers": 0,
        "globals.cutoff": 5.0,
        "globals.lr": options["lr"],
        "model.representation.n_atom_basis": options["n_atom_basis"],
        "model.representation.n_interactions": options["n_interactions"],
        "trainer.max_epochs": epochs,
        "trainer.accelerator": lightning_accelerator(device),
        "trainer.enable_model_summary": False,
        "+trainer.enable_progress_bar": False,
        "callbacks.model_checkpoint.verbose": True,
        "logger": "csv",
        "print_config": False,
        "++seed": seed,
    }
    if patience is not None:
        overrides["callbacks.early_stopping.patience"] = int(patience)
        overrides["task.scheduler_args.patience"] = max(2, int(patience) // 3)
        overrides["task.scheduler_args.cooldown"] = 0
    if config is not None:
        overrides["globals.ggnd_atomic_numbers"] = "[" + ",".join(str(z) for z in elements) + "]"
        for key, value in config.to_dict().items():
            overrides[f"++globals.ggnd.{key}"] = _hydra_value(value)
    command = _spktrain_executable() + [f"{key}={_hydra_value(value)}" for key, value in overrides.items()]
    return command, run_dir / "best_model"


def run_fit(command: list[str], work_dir: Path, epochs: int | None = None, label: str = "schnetpack") -> None:
    """Run ``spktrain`` in ``work_dir``, its output going to ``work_dir/spktrain.log``.

    The checkpoint callback's line per validated epoch drives a progress bar. The subprocess (only)
    gets ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``: spktrain reloads its own Lightning checkpoint, which
    pickles the model, for its test stage (see docs/hosts/schnetpack.md).
    """
    from ggnd_plugin.host_fit import run_trainer

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    log = work_dir / FIT_LOG
    env = dict(
        os.environ,
        TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1",
        HYDRA_FULL_ERROR="1",
        PWD=str(work_dir),  # hydra searches ${oc.env:PWD}/configs; not the caller's folder
    )
    run_trainer(
        command,
        log,
        trainer="spktrain",
        label=label,
        epochs=epochs,
        epoch_line=_EPOCH_LINE,
        cwd=work_dir,
        env=env,
        tail_lines=20,
    )


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
    from ggnd_plugin.adapters.schnetpack_module import derivative_modules

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
    from ggnd_plugin.adapters.schnetpack_module import derivative_modules

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


def run_metadata(model_path: Path, energy_key: str = "energy") -> dict[str, Any]:
    """Elements and units of the spktrain run that wrote ``model_path`` (its ``config.yaml``).

    Units: ``data.property_units[energy_key]`` and ``data.distance_unit``, else the units stored in
    the ASE database; elements: every element in that database. Missing pieces are left out.
    """
    config_path = Path(model_path).parent / "config.yaml"
    if not config_path.is_file():
        return {}
    try:
        from omegaconf import OmegaConf

        config = OmegaConf.load(config_path)
    except Exception:
        return {}

    def select(key: str):
        try:
            value = OmegaConf.select(config, key, throw_on_resolution_failure=True)
        except Exception:  # interpolations to hydra's runtime values cannot be resolved afterwards
            return None
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value

    result: dict[str, Any] = {"source": str(config_path)}
    units = select("data.property_units") or {}
    if units.get(energy_key):
        result["energy_unit"] = units[energy_key]
    if select("data.distance_unit"):
        result["length_unit"] = select("data.distance_unit")
    datapath = select("data.datapath")
    if datapath and Path(datapath).is_file():
        from ase.db import connect

        with connect(datapath) as database:
            metadata = database.metadata
            elements = set()
            for row in database.select(include_data=False, columns=["id", "numbers"]):
                elements.update(int(z) for z in row.numbers)
        result["atomic_numbers"] = sorted(elements)
        result.setdefault("energy_unit", metadata.get("_property_unit_dict", {}).get(energy_key))
        result.setdefault("length_unit", metadata.get("_distance_unit"))
    return {key: value for key, value in result.items() if value}


def _predict_calculator(adapter: SchNetPackAdapter, model: nn.Module):
    """An ASE calculator over :meth:`SchNetPackAdapter.predict` (for models not trained in Å)."""
    from ase.calculators.calculator import Calculator, all_changes

    class PredictCalculator(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            prediction = adapter.predict(model, [self.atoms])
            self.results = {
                "energy": float(prediction.energy[0]),
                "forces": prediction.forces.detach().cpu().numpy().astype(np.float64),
            }

    return PredictCalculator()
