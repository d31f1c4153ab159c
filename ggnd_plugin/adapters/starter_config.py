"""A starter training config that an adapter's distribution ships (``ggnd config NAME``).

Each is registered in the entry-point group ``ggnd_plugin.starter_configs`` as a :class:`StarterConfig`
object in a module that imports nothing heavy (our hosts' packages), so ``ggnd config`` lists and prints
them without importing torch or a host; :mod:`ggnd_plugin.registry` reads the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

__all__ = ["StarterConfig"]


@dataclass(frozen=True)
class StarterConfig:
    """A training config with a GGND block for a host's own training command.

    Attributes:
        summary: one line for ``ggnd config --help``: which command reads it, and what it trains.
        file: the YAML file, a path inside ``package`` (``configs/mace_train.yaml``).
        package: the package that ships the file.
    """

    summary: str
    file: str
    package: str = "ggnd_plugin"

    def text(self) -> str:
        return resources.files(self.package).joinpath(*self.file.split("/")).read_text(encoding="utf-8")
