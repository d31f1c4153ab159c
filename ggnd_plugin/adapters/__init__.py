"""Host adapters. Each module imports its host lazily; see :mod:`ggnd_plugin.adapters.base`."""

from ggnd_plugin.adapters.base import HostAdapter, Prediction, validate_adapter

__all__ = ["HostAdapter", "Prediction", "validate_adapter"]
