"""Hydra search-path plugin that exposes ggnd-plugin's SchNetPack config groups to ``spktrain``.

Hydra imports every module of the ``hydra_plugins`` namespace package and registers the
``SearchPathPlugin`` subclasses it finds, in every hydra application (``nequip-train`` too). The
groups in ``ggnd_plugin/adapters/schnetpack/configs`` (``experiment=ggnd_painn_3bpa``, ``+ggnd=painn``,
...) are added only when the application's primary config comes from SchNetPack (``spktrain``,
``spkpredict``), so other applications do not list them in their help. The path is appended: the
user's and SchNetPack's configs keep precedence. Kept to hydra imports only.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

CONFIG_PACKAGE = "pkg://ggnd_plugin.adapters.schnetpack.configs"
HOST_PACKAGE = "schnetpack"


def primary_config_is_from(search_path: ConfigSearchPath, package: str) -> bool:
    """Whether the application's primary configs (hydra's ``main`` provider) live in ``package``.

    Hydra names a package's configs ``pkg://schnetpack/configs`` for ``@hydra.main`` and
    ``pkg://schnetpack.configs`` for the compose API.
    """
    for element in search_path.get_path():
        if element.provider != "main" or not element.path or not element.path.startswith("pkg://"):
            continue
        module = element.path.removeprefix("pkg://").replace("/", ".")
        if module == package or module.startswith(package + "."):
            return True
    return False


class GGNDSchNetPackSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if primary_config_is_from(search_path, HOST_PACKAGE):
            search_path.append(provider="ggnd-plugin", path=CONFIG_PACKAGE)
