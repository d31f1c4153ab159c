"""SchNetPack's ``SpkCalculator``, run with the model's dtype as torch's default dtype.

PaiNN builds its vector features with ``torch.zeros`` in the default dtype; a float32 model (what
spktrain writes) then fails in a process whose default is float64, and the reverse. Everything else is
SchNetPack's calculator unchanged.
"""

from __future__ import annotations

from schnetpack.interfaces import SpkCalculator

from ggnd_plugin.adapters.schnetpack_module import default_dtype


class DtypeSafeSpkCalculator(SpkCalculator):
    def calculate(self, *args, **kwargs):
        with default_dtype(next(self.model.parameters()).dtype):
            return super().calculate(*args, **kwargs)
