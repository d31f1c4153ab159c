"""The MACE 0.3.16 adapter: a GGND block added to a MACE model, in MACE's own file format.

:class:`GGNDMACE` wraps a MACE model (``ScaleShiftMACE`` and relatives) and keeps its call
signature and attributes, so ``MACECalculator``, TorchSim's ``MaceModel`` and ``mace_run_train`` use the
upgraded model unchanged. Its forward:

1. keeps a reference to ``data["positions"]`` (MACE's ``prepare_graph`` replaces the entry with
   strained positions when stress is asked for, but forces are derivatives with respect to the original);
2. calls the MACE model with forces and stress off (``compute_displacement`` on when stress or virials are
   wanted, so the strain still enters every distance);
3. adds the GGND energy of the host's node features (all interaction layers concatenated);
4. takes forces, virials and stress of the total with MACE's own ``get_outputs``.

This is the route MACE's long-range extensions use: the extra energy enters before the derivative, so
forces and stress stay conservative (F = -dE/dx).

Files are MACE ``.model`` files: ``torch.save`` of the whole module. An upgraded file holds a
:class:`GGNDMACE`, so loading it needs ``ggnd_plugin`` importable. Files pickled under e3nn <= 0.5 (every
model trained with a stock mace-torch 0.3.x, which pins e3nn 0.4.4) are converted exactly on load: see
:func:`legacy_e3nn_unpickling` and :func:`rebuild_under_current_e3nn`.

Nothing here imports MACE at module level: the registry imports this module to list adapters.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ggnd_plugin.adapters.base import HostAdapter, Prediction
from ggnd_plugin.adapters.pickled_classes import torch_file_classes
from ggnd_plugin.block import FeatureSpec, GGNDBlock, GGNDConfig, system_energy
from ggnd_plugin.errors import GGNDError

if TYPE_CHECKING:
    from ase import Atoms

MODEL_SUFFIX = ".model"
FEATURE_FIELD = "node_feats"
_HOST_MODULE_PREFIX = "mace.modules"
_WRAPPER_GLOBAL = ("ggnd_plugin.adapters.mace", "GGNDMACE")


# --------------------------------------------------------------------------------------------------
# The wrapped model
# --------------------------------------------------------------------------------------------------
class GGNDMACE(nn.Module):
    """A MACE model plus a GGND block, called exactly like the MACE model.

    Attributes that the wrapper does not define itself (``r_max``, ``atomic_numbers``, ``heads``,
    ``num_interactions``, ``atomic_energies_fn``, ``interactions``, ``products``, ...) are the host's:
    reading and assigning them goes to the wrapped model, so MACE's tools see the model they expect.
    """

    # e3nn's jit.compile (what mace_run_train uses for ``*_compiled.model``) must refuse this module:
    # otherwise it would script the host alone and write a compiled file without the GGND term.
    __e3nn_compile_mode__ = "unsupported"

    def __init__(self, host: nn.Module, ggnd: GGNDBlock):
        super().__init__()
        self.host = host
        self.ggnd = ggnd

    # Attribute delegation. Guarded so that pickling and deepcopy (which touch attributes before
    # ``__dict__`` is restored) never recurse.
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if name.startswith("__") or modules is None or modules.get("host") is None:
                raise
            value = getattr(modules["host"], name)
            if inspect.ismethod(value):
                # The host's methods act on the host alone (e.g. a ScriptModule's ``save``): never ours.
                raise AttributeError(f"{type(self).__name__} has no attribute {name!r}") from None
            return value

    def __setattr__(self, name: str, value: Any) -> None:
        modules = self.__dict__.get("_modules")
        host = modules.get("host") if modules is not None else None
        own = (
            name in self.__dict__
            or name in self.__dict__.get("_parameters", {})
            or name in self.__dict__.get("_buffers", {})
            or name in (modules or {})
        )
        if host is not None and not own and not name.startswith("_") and hasattr(host, name):
            # e.g. TorchSim's MaceModel re-assigns ``model.atomic_numbers``: it is the host's buffer.
            setattr(host, name, value)
        else:
            super().__setattr__(name, value)

    def forward(
        self,
        data: dict[str, Tensor],
        training: bool = False,
        compute_force: bool = True,
        compute_virials: bool = False,
        compute_stress: bool = False,
        compute_displacement: bool = False,
        compute_hessian: bool = False,
        compute_edge_forces: bool = False,
        compute_atomic_stresses: bool = False,
        lammps_mliap: bool = False,
    ) -> dict[str, Tensor | None]:
        if compute_edge_forces or compute_atomic_stresses or lammps_mliap:
            raise NotImplementedError(
                "a MACE model with GGND has no per-edge decomposition: edge forces, atomic stresses and "
                "the LAMMPS ML-IAP interface are not available (the GGND energy couples all atom pairs)"
            )
        positions = data["positions"]  # the derivative variable; prepare_graph may replace the entry
        strained = compute_virials or compute_stress or compute_displacement
        out = self.host(
            data,
            training=training,
            compute_force=False,
            compute_virials=False,
            compute_stress=False,
            compute_displacement=strained,
        )
        displacement = out["displacement"]
        batch = data["batch"]
        num_graphs = data["ptr"].numel() - 1
        moved = data["positions"]  # strained positions when a displacement is in play
        cell, pbc = _periodic_cell(data, num_graphs, displacement if strained else None)
        species = data["node_attrs"].argmax(dim=-1)
        pairs = self.ggnd.pairs(moved.detach(), batch, cell=None if cell is None else cell.detach(), pbc=pbc)
        atom_energy = self.ggnd(out[FEATURE_FIELD], moved, species, pairs, batch=batch, cell=cell)
        ggnd_energy = system_energy(atom_energy, batch, num_graphs).to(out["energy"].dtype)
        energy = out["energy"] + ggnd_energy
        forces, virials, stress, hessian, _ = _derivatives(
            energy=energy,
            positions=positions,
            displacement=displacement,
            vectors=None,
            cell=data["cell"],
            training=training,
            compute_force=compute_force,
            compute_virials=compute_virials,
            compute_stress=compute_stress,
            compute_hessian=compute_hessian,
            compute_edge_forces=False,
        )
        result = dict(out)
        result.update(
            energy=energy,
            interaction_energy=out["interaction_energy"] + ggnd_energy,
            node_energy=out["node_energy"] + atom_energy.to(out["node_energy"].dtype),
            forces=forces,
            virials=virials,
            stress=stress,
            hessian=hessian,
        )
        return result


@torch.compiler.disable
def _derivatives(**kwargs: Any) -> tuple:
    """MACE's ``get_outputs``, always run eagerly.

    MACE's compile recipe lets Dynamo trace ``autograd.grad`` into the graph, which is only right when
    the energy and the positions sit in one graph. The GGND block breaks the graph (pair lists have
    data-dependent sizes), so a traced gradient would see the energy as an input unrelated to the
    positions and return zero forces; run eagerly, the derivative follows the real autograd graph.
    """
    from mace.modules.utils import get_outputs

    return get_outputs(**kwargs)


def _periodic_cell(
    data: dict[str, Tensor], num_graphs: int, displacement: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """(cell (n_graphs, 3, 3) with rows as lattice vectors, pbc (n_graphs, 3)), or (None, None).

    Under a strain ``displacement`` the cell is strained as MACE strains it, so stress sees the GGND term.
    """
    pbc = data.get("pbc")
    if pbc is None or not bool(pbc.any()):
        return None, None
    pbc = pbc.reshape(-1, 3)
    if pbc.shape[0] != num_graphs:
        pbc = pbc.expand(num_graphs, 3)
    cell = data["cell"].reshape(-1, 3, 3)
    if displacement is not None:
        symmetric = 0.5 * (displacement + displacement.transpose(-1, -2))
        cell = cell + torch.matmul(cell, symmetric)
    return cell, pbc


# --------------------------------------------------------------------------------------------------
# Building and converting
# --------------------------------------------------------------------------------------------------
def host_of(model: nn.Module) -> nn.Module:
    return model.host if isinstance(model, GGNDMACE) else model


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(iter(model.parameters())).dtype


def host_feature_irreps(host: nn.Module) -> str:
    """Irreps of MACE's ``node_feats``: the outputs of every interaction layer, concatenated.

    The last layer carries scalars only; the equivariant parts come from the layers before it.
    """
    products = getattr(host, "products", None)
    if products is None or len(products) == 0:
        raise GGNDError(
            f"{type(host).__name__} has no 'products' layers: not a MACE model GGND can read features from"
        )
    return "+".join(str(product.linear.irreps_out) for product in products)


def mace_feature_spec(model: nn.Module) -> FeatureSpec:
    host = host_of(model)
    return FeatureSpec({FEATURE_FIELD: host_feature_irreps(host)}, num_species=len(host.atomic_numbers))


def attach_ggnd(model: nn.Module, config: GGNDConfig) -> GGNDMACE:
    """``model`` (not copied) wrapped with a new GGND block whose fusion readout is zero."""
    if isinstance(model, GGNDMACE):
        raise GGNDError("the MACE model already has a GGND block")
    if config.variant == "local" and config.local_cutoff is None:
        config = GGNDConfig.from_dict({**config.to_dict(), "local_cutoff": float(model.r_max)})
    block = GGNDBlock(mace_feature_spec(model), config)
    parameter = next(iter(model.parameters()))
    return GGNDMACE(model, block.to(device=parameter.device, dtype=parameter.dtype))


@contextmanager
def legacy_e3nn_unpickling() -> Iterator[list[str]]:
    """Let e3nn 0.6 unpickle modules that e3nn <= 0.5 pickled; yields the names of those it fixed.

    This is the adapter's one patch of a host internal, applied only inside this context.
    e3nn's ``CodeGenMixin`` pickles its generated TorchScript submodules in ``__getstate__``; e3nn <= 0.5
    stored each as bare ``bytes``, e3nn 0.6 stores ``(kind, bytes)`` and its ``__setstate__`` fails on
    the old form (``ValueError: too many values to unpack``). The old bytes are TorchScript, which 0.6
    still reads as kind ``"torchscript"``, so the state is rewritten to that form before e3nn sees it.
    The loaded object is only good for reading its configuration and weights; MACE's buffers computed
    by e3nn changed between versions, so :func:`rebuild_under_current_e3nn` rebuilds it.
    """
    import e3nn
    from e3nn.util.codegen._mixin import CodeGenMixin

    fixed: list[str] = []
    if tuple(int(part) for part in e3nn.__version__.split(".")[:2]) < (0, 6):
        yield fixed  # the installed e3nn reads the old form itself
        return
    original = CodeGenMixin.__setstate__

    def setstate(self, state):
        codegen = state.get("__codegen__")
        if codegen and any(isinstance(value, bytes) for value in codegen.values()):
            state = dict(state)
            state["__codegen__"] = {
                name: ("torchscript", value) if isinstance(value, bytes) else value
                for name, value in codegen.items()
            }
            fixed.append(type(self).__name__)
        original(self, state)

    CodeGenMixin.__setstate__ = setstate
    try:
        yield fixed
    finally:
        CodeGenMixin.__setstate__ = original


def rebuild_under_current_e3nn(old: nn.Module) -> nn.Module:
    """The same model built by the installed MACE/e3nn, with every weight and buffer of ``old``.

    ``type(old)(**extract_config_mace_model(old))`` then a strict ``load_state_dict`` reproduces the
    old predictions exactly; copying only the weights would not (MACE's U-matrix buffers differ).
    """
    if isinstance(old, GGNDMACE):
        host = rebuild_under_current_e3nn(old.host)
        block = GGNDBlock(old.ggnd.spec, old.ggnd.config).to(dtype=_dtype_of(host))
        block.load_state_dict(old.ggnd.state_dict(), strict=True)
        return GGNDMACE(host, block)
    from mace.tools import torch_tools
    from mace.tools.scripts_utils import extract_config_mace_model

    config = extract_config_mace_model(old)
    if "error" in config:
        raise GGNDError(
            f"cannot convert a {type(old).__name__} pickled under an older e3nn: {config['error']}"
        )
    dtype = _dtype_of(old)
    with torch_tools.default_dtype(dtype):
        new = type(old)(**config)
    new = new.to(dtype)
    try:
        new.load_state_dict(old.state_dict(), strict=True)
    except RuntimeError as error:
        raise GGNDError(
            f"cannot convert a {type(old).__name__} pickled under an older e3nn: its weights do not fit the "
            f"model rebuilt from its own configuration ({error})"
        ) from error
    return new.eval()


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
    if root == _WRAPPER_GLOBAL:
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

        dtype = "float64" if _dtype_of(model) == torch.float64 else "float32"
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

    # ---- training from scratch ----------------------------------------------------------------------
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
        """Train through ``ggnd-mace-train`` (``mace_run_train`` plus GGND) in a subprocess.

        A fit stopped part-way restarts from scratch in the same ``work_dir`` (see
        :mod:`ggnd_plugin.host_fit`); ``work_dir`` must otherwise be new or empty.
        """
        from ggnd_plugin.adapters.mace_train import FIT_LOG, fit_command, fit_outputs, run_fit
        from ggnd_plugin.host_fit import fit_work_dir

        self.require()
        command, model_path = fit_command(
            train, valid, work_dir, config, epochs, seed, size, device, patience=patience
        )
        outputs = fit_outputs(model_path.stem)
        with fit_work_dir(work_dir, "mace", outputs, [train, valid], legacy_marks=[FIT_LOG]):
            run_fit(command, Path(work_dir), epochs, label=Path(work_dir).name)
            return self.load(model_path)
