"""Adapters are found through the entry-point group ``ggnd_plugin.adapters``, the starter training
configs they ship (``ggnd config``) through ``ggnd_plugin.starter_configs``.

A third package adds a host by declaring entry points in those groups; nothing in ggnd-plugin changes.
Listing names reads only the installed distributions' metadata.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ggnd_plugin.errors import GGNDError

if TYPE_CHECKING:
    from ggnd_plugin.adapters.base import HostAdapter
    from ggnd_plugin.adapters.starter_config import StarterConfig

GROUP = "ggnd_plugin.adapters"
STARTER_CONFIG_GROUP = "ggnd_plugin.starter_configs"


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


def get(name: str) -> HostAdapter:
    """The adapter registered under ``name``, instantiated."""
    from ggnd_plugin.adapters.base import HostAdapter

    points = entry_points()
    if name not in points:
        raise GGNDError(
            f"no adapter named '{name}'; registered adapters: {', '.join(sorted(points)) or 'none'}"
        )
    try:
        adapter_class = points[name].load()
    except Exception as error:  # a broken third-party adapter must not hide the others
        raise GGNDError(f"adapter '{name}' ({points[name].value}) failed to load: {error}") from error
    adapter = adapter_class()
    if not isinstance(adapter, HostAdapter):
        raise GGNDError(f"adapter '{name}' ({points[name].value}) is not a ggnd_plugin HostAdapter")
    return adapter


def list_adapters() -> list[dict[str, Any]]:
    """One record per registered adapter: name, host, version, usable and why not."""
    records = []
    for name, point in sorted(entry_points().items()):
        try:
            records.append(get(name).describe())
        except GGNDError as error:
            records.append(
                {"name": name, "host": point.value, "version": None, "usable": False, "reason": str(error)}
            )
    return records


def usable_adapters() -> list[HostAdapter]:
    adapters = []
    for name in sorted(entry_points()):
        try:
            adapter = get(name)
        except GGNDError:
            continue
        if adapter.availability()[0]:
            adapters.append(adapter)
    return adapters


def detect_model(model: Any) -> HostAdapter:
    """The adapter whose host built ``model``."""
    for adapter in usable_adapters():
        if adapter.recognises_model(model):
            return adapter
    raise GGNDError(
        f"no installed host adapter recognises a {type(model).__module__}.{type(model).__name__} model "
        f"(usable adapters: {', '.join(a.name for a in usable_adapters()) or 'none'})"
    )


def detect_file(path: str | Path) -> HostAdapter:
    """The adapter that can load the model file ``path``."""
    path = Path(path)
    if not path.exists():
        raise GGNDError(f"{path}: no such file")
    matches = [adapter for adapter in usable_adapters() if adapter.recognises_file(path)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise GGNDError(
            f"{path}: not a model file of any known host "
            f"(usable adapters: {', '.join(a.name for a in usable_adapters()) or 'none'}); "
            "pass --host to choose one"
        )
    raise GGNDError(
        f"{path}: several hosts claim this file ({', '.join(a.name for a in matches)}); pass --host"
    )


def resolve(host: str | None, path: str | Path | None = None) -> HostAdapter:
    """``--host auto|NAME`` as the command line means it."""
    if host and host != "auto":
        adapter = get(host)
        adapter.require()
        return adapter
    if path is None:
        raise GGNDError("--host auto needs a model file to look at")
    return detect_file(path)


# --------------------------------------------------------------------------------------------------
# Starter training configs (`ggnd config NAME`)
# --------------------------------------------------------------------------------------------------
def starter_config_names() -> list[str]:
    """Names of the registered starter configs (no module is imported)."""
    return sorted({ep.name for ep in importlib.metadata.entry_points(group=STARTER_CONFIG_GROUP)})


def starter_config(name: str) -> StarterConfig:
    """The starter config registered under ``name``."""
    from ggnd_plugin.adapters.starter_config import StarterConfig

    points = {ep.name: ep for ep in importlib.metadata.entry_points(group=STARTER_CONFIG_GROUP)}
    if name not in points:
        raise GGNDError(
            f"no starter config named '{name}'; registered: {', '.join(sorted(points)) or 'none'}"
        )
    try:
        config = points[name].load()
    except Exception as error:  # a broken third-party entry must not hide the others
        raise GGNDError(f"starter config '{name}' ({points[name].value}) failed to load: {error}") from error
    if not isinstance(config, StarterConfig):
        raise GGNDError(f"starter config '{name}' ({points[name].value}) is not a ggnd_plugin StarterConfig")
    return config


def starter_configs() -> dict[str, StarterConfig]:
    """Every registered starter config that loads, by name."""
    configs = {}
    for name in starter_config_names():
        try:
            configs[name] = starter_config(name)
        except GGNDError:
            continue
    return configs
