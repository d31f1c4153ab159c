"""ASE calculators for SchNetPack models (imported once SchNetPack is).

:class:`DtypeSafeSpkCalculator` is SchNetPack's ``SpkCalculator``, run with the model's dtype as
torch's default dtype: PaiNN builds its vector features with ``torch.zeros`` in the default dtype, so a
float32 model (what spktrain writes) fails in a process whose default is float64, and the reverse.
Everything else is SchNetPack's calculator unchanged. :func:`predict_calculator` serves models trained
in length units other than Å, which ``SpkCalculator`` would feed positions in Å.
"""

from __future__ import annotations

import numpy as np
from schnetpack.interfaces import SpkCalculator

from ggnd_plugin.adapters.schnetpack.output_module import default_dtype


class DtypeSafeSpkCalculator(SpkCalculator):
    def calculate(self, *args, **kwargs):
        with default_dtype(next(self.model.parameters()).dtype):
            return super().calculate(*args, **kwargs)


def predict_calculator(adapter, model):
    """An ASE calculator over :meth:`SchNetPackAdapter.predict` (for models not trained in Å)."""
    from ase.calculators.calculator import Calculator, all_changes

    class PredictCalculator(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            prediction = adapter.predict(model, [self.atoms])
            self.results = {
                "energy": float(prediction.energy[0]),
                "forces": prediction.forces.detach().cpu().numpy().astype(np.float64),
            }

    return PredictCalculator()
