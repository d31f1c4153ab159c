"""Hydra search-path plugin that exposes ggnd-plugin's SchNetPack config groups to ``spktrain``.

Hydra imports every module of the ``hydra_plugins`` namespace package and registers the
``SearchPathPlugin`` subclasses it finds, so with ggnd-plugin installed ``spktrain`` sees the groups in
``ggnd_plugin/adapters/schnetpack_configs`` (``experiment=ggnd_painn_3bpa``, ``+ggnd=painn``, ...)
without any local config files. The path is appended: the user's and SchNetPack's configs keep
precedence. Kept to hydra imports only, because hydra imports it in every hydra application.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

CONFIG_PACKAGE = "pkg://ggnd_plugin.adapters.schnetpack_configs"


class GGNDSchNetPackSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="ggnd-plugin", path=CONFIG_PACKAGE)
