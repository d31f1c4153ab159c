"""GGND inside NequIP 0.19 models: insertion, a model builder and an upgrade target for ``nequip-train``.

This module imports nequip at top level, so it is imported only once nequip is (by the builders that
configs name, by the adapter); the ``nequip.extension`` entry point stays a light module because nequip
imports it from the middle of its own ``__init__``. The graph modules themselves are in
:mod:`ggnd_plugin.adapters.nequip.graph_modules`.

Where the block goes. ``NequIPGNNModel`` is ``SequentialGraphNetwork(type_embed, ..., layer0_convnet, ...,
layerL_convnet, per_atom_energy_readout, per_type_energy_scale_shift, total_energy_sum)`` wrapped in
``ForceStressOutput``. The last convnet outputs scalars only, so the equivariant node features are
read just before it: :class:`GGNDAtomicEnergy` is inserted there and writes the block's per-atom energy
to its own field (``ggnd_atomic_energy``); :class:`AddGGNDEnergy`, inserted before ``total_energy_sum``,
adds that field to NequIP's per-atom energy (in eV, after NequIP's per-type scale and shift). Both are
declared graph modules, so ``insert`` checks their irreps, and both run inside ``ForceStressOutput``:
forces and stress come from NequIP's own autograd of the total energy through the (strain-displaced)
positions the block reads, so they stay conservative.

Pairs. The block needs its pair table inside the model's forward. Eager runs use
:func:`ggnd_plugin.block.complete_graph_pairs` (one row per atom, as wide as its system).
Under ``nequip-compile`` (``make_fx`` with symbolic sizes, which refuses data-dependent shapes) the
table is the dense ``(n_atoms, n_atoms)`` square masked to same-system pairs: for one frame (the ``ase``
target) that is exactly the complete graph, for a batch it costs ``(sum n)^2`` instead of ``sum n^2``
but needs no value-dependent size. Pairs within a finite radius (``r_g``, periodic systems) come from
TorchSim's neighbour list and work in eager mode only.

Packaging. ``nequip-package`` interns ``e3nn``, ``nequip`` and the modules named by ``nequip.extension``
entry points; :func:`register_for_packaging` adds this module and :mod:`ggnd_plugin.block` to that set
(and marks TorchSim, yaml and sympy, which that code imports, as external).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Any

import torch
from nequip.data import AtomicDataDict
from nequip.model import model_builder
from nequip.utils.compile import conditional_torchscript_mode

from ggnd_plugin.adapters.nequip.graph_modules import AddGGNDEnergy, GGNDAtomicEnergy
from ggnd_plugin.block import GGNDConfig

GGND_MODULE_NAME = "ggnd"
GGND_ADD_NAME = "ggnd_energy_sum"

# Interned: the module of the graph modules, and its name in packages written by 0.1.0 and 0.2.0 (a
# model loaded from such a package keeps its own copy, which re-saving it packages again).
PACKAGED_MODULES = ("ggnd_plugin.adapters.nequip.graph_modules", "ggnd_plugin.adapters.nequip_modules")
# ggnd_plugin.block is external (loading the package needs ggnd-plugin installed) because interned
# dataclasses defined under `from __future__ import annotations` fail to load from a torch.package;
# block_v1 holds the class of version-1 blocks, which re-saving a 0.1.0 model pickles by name.
EXTERNAL_MODULES = ("ggnd_plugin.block", "ggnd_plugin.block_v1", "torch_sim", "yaml", "sympy")


def register_for_packaging() -> None:
    """Make ``nequip-package`` (and :func:`write_package`) carry GGND's code inside the package.

    Runs when this module is imported, which every model builder here and ``ModelFromCheckpoint``
    of a GGND checkpoint do before ``nequip-package`` sets up its exporter. Skipped inside a loaded
    package (where ``__name__`` is the importer's mangled name).
    """
    if __name__.startswith("<"):
        return
    # import_module, not an import statement: torch.package scans import statements of interned code.
    package_utils = importlib.import_module("nequip.scripts._package_utils")
    package_utils._INTERNAL_MODULES.update(PACKAGED_MODULES)
    # Imported by the interned code but installed wherever it runs (TorchSim for periodic pairs, yaml
    # for config files, sympy through e3nn.o3): external, i.e. taken from the environment at load time.
    package_utils._EXTERNAL_MODULES.update(
        name for name in EXTERNAL_MODULES if name not in package_utils._MOCK_MODULES
    )


# --------------------------------------------------------------------------------------------------
# Finding the insertion points in a built model
# --------------------------------------------------------------------------------------------------
def energy_network(graph_model: torch.nn.Module) -> torch.nn.Module:
    """The ``SequentialGraphNetwork`` that computes the energy inside a NequIP ``GraphModel``."""
    inner = getattr(graph_model, "model", graph_model)
    inner = getattr(inner, "func", inner)  # ForceStressOutput wraps the energy network
    if not hasattr(inner, "insert") or "total_energy_sum" not in dict(inner.named_children()):
        raise ValueError(
            f"expected a NequIP GraphModel around ForceStressOutput(SequentialGraphNetwork(... "
            f"total_energy_sum)), found {type(inner).__name__}; GGND supports NequIPGNNModel-like models"
        )
    return inner


def ggnd_modules(model: torch.nn.Module) -> list[GGNDAtomicEnergy]:
    # By class name, so modules loaded from a nequip package (another importer's class) count too.
    return [m for m in model.modules() if type(m).__name__ == "GGNDAtomicEnergy"]


def last_convnet(network: torch.nn.Module) -> str:
    names = [name for name, _ in network.named_children()]
    convnets = [name for name in names if name.endswith("_convnet")]
    if not convnets:
        raise ValueError(f"no convnet layer (a module named '*_convnet') in the model; modules: {names}")
    return convnets[-1]


def host_feature_irreps(network: torch.nn.Module) -> str:
    """Irreps of the node features GGND reads: the input of the last convnet."""
    irreps = dict(network.named_children())[last_convnet(network)].irreps_in
    return str(irreps["node_features"])


def insert_ggnd(
    model: torch.nn.Module, config: GGNDConfig | dict | None, type_names: list[str] | None = None
) -> torch.nn.Module:
    """Insert GGND into a NequIP model in place; the fusion readout starts at zero (predictions unchanged).

    ``model`` is a ``GraphModel`` or the ``ForceStressOutput`` a model builder returns; ``type_names``
    defaults to the GraphModel's.
    """
    config = _ggnd_config(config)
    type_names = type_names or list(getattr(model, "type_names", []) or [])
    if not type_names:
        raise ValueError("the NequIP model has no type_names; pass them to insert_ggnd")
    network = energy_network(model)
    names = [name for name, _ in network.named_children()]
    if GGND_MODULE_NAME in names:
        raise ValueError("the model already has a GGND block")
    last = last_convnet(network)
    features_in = dict(network[names.index(last) - 1].irreps_out)
    dtype = next(iter(network.parameters())).dtype
    # e3nn modules built outside nequip's builders would be TorchScript-compiled, which torch.package
    # (nequip-package) cannot pickle; nequip builds its own modules with scripting off too.
    with e3nn_defaults_kept(), _default_dtype(dtype), conditional_torchscript_mode(False):
        ggnd = GGNDAtomicEnergy(config, num_types=len(type_names), irreps_in=features_in)
        network.insert(GGND_MODULE_NAME, ggnd, before=last)  # also passes the new field on
        total = dict(network.named_children())["total_energy_sum"]
        network.insert(
            GGND_ADD_NAME, AddGGNDEnergy(irreps_in=dict(total.irreps_in)), before="total_energy_sum"
        )
    # GraphModel passes only declared input fields to the network; periodic pairs need pbc.
    if hasattr(model, "model_input_fields"):
        if AtomicDataDict.PBC_KEY not in model.model_input_fields:
            model.model_input_fields.append(AtomicDataDict.PBC_KEY)
    else:  # a builder's bare model: the GraphModel wrapped around it declares its irreps_in
        model.irreps_in.setdefault(AtomicDataDict.PBC_KEY, None)
    return model


@contextlib.contextmanager
def e3nn_defaults_kept():
    """Restore e3nn's global optimisation defaults on exit.

    nequip's ``conditional_torchscript_mode`` restores ``jit_script_fx`` only, and e3nn 0.6 maps that
    legacy flag onto ``jit_mode``: after it, e3nn modules built anywhere in the process (a MACE model,
    say) are TorchScript-compiled and can no longer be deep-copied or pickled.
    """
    import e3nn

    saved = dict(e3nn.get_optimization_defaults())
    try:
        yield
    finally:
        legacy = saved.pop("jit_script_fx")
        e3nn.set_optimization_defaults(jit_script_fx=legacy)  # may move jit_mode; set it back next
        e3nn.set_optimization_defaults(**saved)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _ggnd_config(ggnd: Any) -> GGNDConfig:
    if ggnd is None:
        return GGNDConfig()
    if isinstance(ggnd, GGNDConfig):
        return ggnd
    return GGNDConfig.from_dict(dict(ggnd))


# --------------------------------------------------------------------------------------------------
# Config targets for nequip-train
# --------------------------------------------------------------------------------------------------
def _get_method(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


@model_builder
def GGNDNequIPModel(
    ggnd: dict | None = None, host_builder: str = "nequip.model.NequIPGNNModel", **kwargs
) -> torch.nn.Module:
    """A NequIP model with a GGND block, for ``nequip-train`` configs.

    All NequIP options (``r_max``, ``num_layers``, ``l_max``, ``num_features``, ``avg_num_neighbors``,
    ``per_type_energy_shifts``, ...) go to ``host_builder`` (default ``nequip.model.NequIPGNNModel``;
    ``nequip.model.PresetNequIPGNNModel`` takes ``preset``); ``ggnd`` holds the GGND options
    (:class:`ggnd_plugin.block.GGNDConfig` fields)::

        model:
          _target_: ggnd_plugin.adapters.nequip.GGNDNequIPModel
          seed: 0
          model_dtype: float64
          type_names: [C, H, N, O]
          r_max: 5.0
          ggnd: {channels: 16, heads: 4, steps: 3}
    """
    model = _get_method(host_builder)(**kwargs)  # nested builder: returns the bare module
    return insert_ggnd(model, ggnd, type_names=list(kwargs["type_names"]))


def GGNDUpgrade(model: Any, ggnd: dict | None = None, seed: int = 0) -> torch.nn.Module:
    """A fitted NequIP model with a GGND block attached, for fine-tuning with ``nequip-train``.

    ``model`` is the config of a model loader (a dict, since ``_target_`` is not resolved recursively)
    or a model object::

        model:
          _target_: ggnd_plugin.adapters.nequip.GGNDUpgrade
          model:
            _target_: nequip.model.ModelFromCheckpoint   # or nequip.model.ModelFromPackage
            checkpoint_path: /abs/path/to/best.ckpt
          ggnd: {channels: 16, heads: 4}

    The fusion readout starts at zero, so the first validation reproduces the fitted model exactly.
    """
    if not isinstance(model, torch.nn.Module):
        model = dict(model)
        target = model.pop("_target_", None)
        if target is None:
            raise ValueError(
                "GGNDUpgrade: `model` needs a `_target_` (e.g. nequip.model.ModelFromCheckpoint)"
            )
        model = _get_method(target)(**model)
    graph_models = list(model.values()) if isinstance(model, torch.nn.ModuleDict) else [model]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for graph_model in graph_models:
            insert_ggnd(graph_model, ggnd)
    return model


register_for_packaging()
