"""Elements and units of the ``spktrain`` run that wrote a SchNetPack model file.

A SchNetPack model file records neither; ``SchNetPackAdapter.load`` reads them from the run beside it
(``config.yaml`` and the ASE database it names) when the model itself does not say.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
