"""Writing a NequIP model held in memory as a ``.nequip.zip`` package (``NequIPAdapter.save``).

The same layout ``nequip-package build`` writes from a checkpoint, for models that exist only in memory
(``ggnd upgrade``); GGND's graph modules are interned with the model code
(:func:`ggnd_plugin.adapters.nequip.builders.register_for_packaging`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ggnd_plugin.errors import GGNDError

# Attribute on a model loaded from a package: the package's example frame, kept for re-saving it.
EXAMPLE_DATA_ATTRIBUTE = "_ggnd_example_data"


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

    stored = getattr(model, EXAMPLE_DATA_ATTRIBUTE, None)
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

    from ggnd_plugin.adapters.nequip.builders import ggnd_modules, register_for_packaging

    register_for_packaging()
    data = example_data(model)
    stored = model.__dict__.pop(EXAMPLE_DATA_ATTRIBUTE, None)
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
            setattr(model, EXAMPLE_DATA_ATTRIBUTE, stored)
    return path
