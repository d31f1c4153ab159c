"""A MACE model plus a GGND block, called exactly like the MACE model (MACE 0.3.16).

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

A saved upgraded model is a pickled :class:`GGNDMACE`, so loading it needs ``ggnd_plugin`` importable.
Files of ggnd-plugin 0.1.0 and 0.2.0 name the class ``ggnd_plugin.adapters.mace.GGNDMACE`` (the package
exports it). Nothing here imports MACE at module level.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ggnd_plugin.block import FeatureSpec, GGNDBlock, GGNDConfig, system_energy
from ggnd_plugin.errors import GGNDError

FEATURE_FIELD = "node_feats"


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
# Building
# --------------------------------------------------------------------------------------------------
def host_of(model: nn.Module) -> nn.Module:
    return model.host if isinstance(model, GGNDMACE) else model


def dtype_of(model: nn.Module) -> torch.dtype:
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
