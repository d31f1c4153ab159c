"""The adapter contract: what ggnd-plugin needs to know about a host package.

An adapter connects one host (MACE, NequIP, SchNetPack, or a third package) to the GGND block and to
the tooling (upgrade, fine-tuning, evaluation, MD). It is a class registered in the entry-point group
``ggnd_plugin.adapters``::

    [project.entry-points."ggnd_plugin.adapters"]
    myhost = "myhost_ggnd.adapter:MyHostAdapter"

Adapters import their host lazily (inside methods), so listing adapters never imports a host.
:func:`ggnd_plugin.adapters.validate_adapter` (:mod:`ggnd_plugin.adapters.validate`) checks an adapter
against this contract on a real model; a third-party adapter calls it in its own tests, as TorchSim's
``validate_model_outputs`` does for models (docs/adapters.md).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ggnd_plugin.adapters.host_trainer import FitRequest, HostTrainer, TrainerCommand
from ggnd_plugin.block import FeatureSpec, GGNDConfig
from ggnd_plugin.errors import GGNDError

if TYPE_CHECKING:
    from ase import Atoms
    from ase.calculators.calculator import Calculator


@dataclass
class Prediction:
    """Energies (n_systems,) in eV and forces (n_atoms, 3) in eV/Å for a list of structures."""

    energy: Tensor
    forces: Tensor


class HostAdapter(ABC):
    """One host package, seen from ggnd-plugin.

    Class attributes:
        name: short name used on the command line (``--host NAME``) and in the entry point.
        distribution: the host's PyPI distribution, for version reporting (``mace-torch``).
        module: the host's import name (``mace``).
        file_suffixes: model file suffixes this host writes (used by auto-detection).
    """

    name: str = ""
    distribution: str = ""
    module: str = ""
    file_suffixes: tuple[str, ...] = ()

    # ---- availability -------------------------------------------------------------------------------
    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    def availability(self) -> tuple[bool, str]:
        """(usable, reason). Must not import the host (a spec lookup is enough)."""
        if importlib.util.find_spec(self.module) is None:
            return False, f"{self.distribution} is not installed (pip install 'ggnd-plugin[{self.name}]')"
        return True, "ok"

    def require(self) -> None:
        usable, reason = self.availability()
        if not usable:
            raise GGNDError(f"host '{self.name}' is not usable: {reason}")

    # ---- recognising models -------------------------------------------------------------------------
    @abstractmethod
    def recognises_model(self, model: Any) -> bool:
        """True for this host's model objects (plain or with GGND attached)."""

    def recognises_file(self, path: Path) -> bool:
        """True for this host's model files. The default looks at the suffix only."""
        return Path(path).suffix in self.file_suffixes

    # ---- model lifecycle ----------------------------------------------------------------------------
    @abstractmethod
    def load(self, path: Path, device: str = "cpu") -> nn.Module:
        """Load a model file written by the host or by :meth:`save` (GGND attached or not)."""

    @abstractmethod
    def save(self, model: nn.Module, path: Path) -> Path:
        """Write a file that the host's own tools (and :meth:`load`) can load."""

    @abstractmethod
    def feature_spec(self, model: nn.Module) -> FeatureSpec:
        """The host node features the GGND block reads, with their irreps."""

    @abstractmethod
    def attach(self, model: nn.Module, config: GGNDConfig) -> nn.Module:
        """Return the model with a GGND block whose fusion readout starts at zero.

        The result predicts exactly what ``model`` predicted until it is trained.
        """

    @abstractmethod
    def ggnd_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The GGND blocks inside ``model`` (empty for a plain host model)."""

    def ggnd_parameters(self, model: nn.Module) -> Iterator[nn.Parameter]:
        for block in self.ggnd_blocks(model):
            yield from block.parameters()

    # ---- training from scratch (optional) -----------------------------------------------------------
    # The host's own training command; None: this adapter cannot train models from scratch. An adapter
    # that sets it overrides :meth:`check_fit`, :meth:`fit_outputs` and :meth:`prepare_fit`.
    trainer: ClassVar[HostTrainer | None] = None

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
        """Train a model from scratch through the host's own training command (optional).

        ``config=None`` trains the plain host model; with a config, the same architecture with a GGND
        block. ``size`` is ``"tiny"`` (tests, quick demo) or ``"small"`` (the demo). ``device`` is
        ``"cpu"`` or ``"cuda"`` (the host trainer's accelerator). ``patience``: train until the
        validation loss has not improved for this many epochs (at most ``epochs``), with the learning
        rate halved after ``max(2, patience // 3)`` epochs without improvement; None trains ``epochs``
        epochs with the host's defaults. Used by ``ggnd demo`` and ``benchmarks/paper_3bpa.py``.

        The steps are every host's: refuse bad arguments before touching ``work_dir``
        (:meth:`check_fit`); hold ``work_dir``, removing the outputs of an earlier attempt
        (:meth:`fit_outputs`, :func:`ggnd_plugin.host_fit.fit_work_dir`: a fit stopped part-way
        restarts from scratch there, and ``work_dir`` must otherwise be new or empty); write the host's
        training inputs and build its command (:meth:`prepare_fit`); run it with a log and a progress
        bar (:attr:`trainer`); load the model file it wrote (:meth:`load`).
        """
        from ggnd_plugin.host_fit import fit_work_dir

        trainer = self.trainer
        if trainer is None:
            raise GGNDError(f"the {self.name} adapter cannot train models from scratch")
        self.require()
        request = FitRequest(
            train=Path(train),
            valid=Path(valid),
            work_dir=Path(work_dir).absolute(),
            config=config,
            epochs=epochs,
            seed=seed,
            size=size,
            device=device,
            patience=patience,
        )
        self.check_fit(request)
        outputs = self.fit_outputs(request)
        inputs = [train, valid]
        with fit_work_dir(request.work_dir, self.name, outputs, inputs, legacy_marks=[trainer.log_name]):
            command = self.prepare_fit(request)
            trainer.run(
                command.argv,
                request.work_dir,
                epochs,
                label=request.work_dir.name,
                cwd=command.cwd,
                env=command.env,
                header=command.header,
            )
            if not command.model_path.is_file():
                raise GGNDError(
                    f"{trainer.name} finished but wrote no {command.model_path}; "
                    f"see {request.work_dir / trainer.log_name}"
                )
            return self.load(command.model_path)

    def check_fit(self, request: FitRequest) -> None:
        """Raise :class:`GGNDError` for fit arguments the host cannot train with (nothing is written)."""
        return None

    def fit_outputs(self, request: FitRequest) -> Sequence[str]:
        """Names or glob patterns, relative to the work folder, of everything the host's trainer (and
        :meth:`prepare_fit`) writes there: what a restarted fit removes first."""
        return ()

    def prepare_fit(self, request: FitRequest) -> TrainerCommand:
        """Write the host's training inputs (config, data, ...) into the work folder and return the
        command that trains the model."""
        raise GGNDError(f"the {self.name} adapter cannot train models from scratch")

    # ---- what the model knows -----------------------------------------------------------------------
    @abstractmethod
    def atomic_numbers(self, model: nn.Module) -> list[int]:
        """Elements the model was built for."""

    @abstractmethod
    def cutoff(self, model: nn.Module) -> float:
        """The host's local cutoff radius (Å)."""

    def atomic_energies(self, model: nn.Module) -> dict[int, float] | None:
        """Isolated-atom energies (E0s) by atomic number, where the host keeps them."""
        return None

    # ---- predictions --------------------------------------------------------------------------------
    @abstractmethod
    def predict(self, model: nn.Module, structures: Sequence[Atoms], training: bool = False) -> Prediction:
        """Energies and forces for a batch of structures.

        With ``training=True`` the result stays differentiable with respect to the parameters
        (forces built with ``create_graph``), so a loss on both can be minimised.
        """

    @abstractmethod
    def ase_calculator(self, model: nn.Module, device: str = "cpu") -> Calculator:
        """An ASE calculator that uses ``model`` (preferably the host's own calculator class)."""

    @abstractmethod
    def torchsim_model(self, model: nn.Module, device: str = "cpu", dtype: torch.dtype = torch.float64):
        """A ``torch_sim.models.interface.ModelInterface`` that uses ``model``."""

    # ---- input checks shared by all hosts -----------------------------------------------------------
    def check_structures(self, model: nn.Module, structures: Sequence[Atoms], source: str = "input") -> None:
        """Refuse structures the model cannot describe, naming the frame and the problem.

        The checks and messages are :func:`ggnd_plugin.validation.check_frames`, the ones the command
        line gives for a file.
        """
        from ggnd_plugin.validation import check_frames

        check_frames(structures, source, self.atomic_numbers(model), f"{self.name} model")

    def __init_subclass__(cls, **kwargs):
        """Every adapter's ``predict`` checks its structures first, third-party adapters included.

        A NaN position or an unknown element then stops with the CLI's one-line message instead of a
        traceback from inside the host (or a silent NaN energy).
        """
        super().__init_subclass__(**kwargs)
        predict = cls.__dict__.get("predict")
        if predict is None or getattr(predict, "_checks_structures", False):
            return

        @functools.wraps(predict)
        def checked_predict(self, model, structures, training: bool = False, **options):
            self.check_structures(model, structures, "structures")
            return predict(self, model, structures, training=training, **options)

        checked_predict._checks_structures = True  # type: ignore[attr-defined]
        cls.predict = checked_predict

    def describe(self) -> dict[str, Any]:
        usable, reason = self.availability()
        return {
            "name": self.name,
            "host": self.distribution,
            "version": self.version(),
            "usable": usable,
            "reason": reason,
        }


# Shared by the adapters whose hosts train with Lightning (nequip-train, spktrain).
def lightning_accelerator(device: str) -> str:
    """Lightning's accelerator name for a torch device string (``cpu``, ``cuda``, ``cuda:0``)."""
    kind = str(device).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise GGNDError(f"device must be cpu or cuda, got {device!r}")
    return "gpu" if kind == "cuda" else "cpu"
