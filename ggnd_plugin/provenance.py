"""The package versions a result records, so that a number can be traced to the code that made it.

Each kind of result names the packages that decide it (a stability run: the MD stack and the hosts; a
generated dataset: the labelling stack); the hosts are those of the adapter registry, so a host added
by a third package is recorded like the built-in ones.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence


def installed_host_distributions() -> list[str]:
    """The distributions of the registered hosts that are installed, in adapter-name order."""
    from ggnd_plugin.registry import list_adapters

    # an adapter that fails to load has no version, and its "host" is not a distribution
    return [record["host"] for record in list_adapters() if record["version"] is not None]


def package_versions(
    packages: Sequence[str], hosts: bool = False, missing: str | None = None
) -> dict[str, str]:
    """Distribution -> installed version: ggnd-plugin, then ``packages``, then (``hosts``) every
    installed host. A package that is not installed reads ``missing``, or is left out when None."""
    names = ["ggnd-plugin", *packages, *(installed_host_distributions() if hosts else ())]
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if missing is not None:
                versions[name] = missing
    return versions
