"""Reference data made by this project and shipped inside the package (see README.md here).

``list_default_data()`` names the files, ``default_data_path(name)`` gives the path of one, and
``default_data_info(dataset)`` returns how a dataset was made (settings, versions, statistics)::

    from ggnd_plugin.default_data import default_data_path
    from ggnd_plugin.data import read_labelled

    train = read_labelled(default_data_path("3bpa_300K_train"))

The 3BPA set is GFN2-xTB, not the DFT of the published 3BPA benchmark: use it for demos and tests of
the workflow, and compare numbers only with models trained on the same data.
"""

from __future__ import annotations

import json
from pathlib import Path

from ggnd_plugin.errors import GGNDError

DATA_DIR = Path(__file__).resolve().parent


def _datasets() -> list[Path]:
    return sorted(p for p in DATA_DIR.iterdir() if p.is_dir() and (p / "generation.json").exists())


def list_default_data() -> list[str]:
    """Names of the shipped files (``<dataset>_<T>K[_train|_test]``), e.g. ``3bpa_300K_train``."""
    return sorted(path.stem for dataset in _datasets() for path in dataset.glob("*.xyz"))


def list_default_datasets() -> list[str]:
    """Names of the shipped datasets (directories), e.g. ``3bpa``."""
    return [dataset.name for dataset in _datasets()]


def default_data_path(name: str) -> Path:
    """The path of a shipped file (``3bpa_600K``) or dataset directory (``3bpa``)."""
    for dataset in _datasets():
        if name == dataset.name:
            return dataset
        candidate = dataset / f"{name.removesuffix('.xyz')}.xyz"
        if candidate.exists():
            return candidate
    raise GGNDError(
        f"no default data named {name!r}; shipped: {', '.join(list_default_datasets() + list_default_data())}"
    )


def default_data_info(dataset: str) -> dict:
    """The generation record of a dataset: settings, command, package versions, per-file statistics."""
    path = default_data_path(dataset)
    if not path.is_dir():
        raise GGNDError(
            f"{dataset!r} is a file; default_data_info takes a dataset name ({', '.join(list_default_datasets())})"
        )
    return json.loads((path / "generation.json").read_text())


__all__ = ["DATA_DIR", "default_data_info", "default_data_path", "list_default_data", "list_default_datasets"]
