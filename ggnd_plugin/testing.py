"""Small random host models for tests, benchmarks and third-party adapter tests.

Each factory builds a host's own model class with random weights for 3BPA's elements (H, C, N, O), the
same model for the same arguments, so tests, benchmarks, the install checks and the scripts that write
test fixtures share one definition. The hosts are imported inside the functions: importing this module
imports none of them.

The defaults are the tiny models of the test suite (float64, cutoff 4 Å, 8 features, 2 layers), with
energy offsets on the scale of the DFT 3BPA set (the fixtures in ``tests/data`` were written with
them); every keyword the host's constructor takes can be overridden, e.g. the sizes a benchmark needs.
"""

from __future__ import annotations

from typing import Any

ELEMENTS = (1, 6, 7, 8)
# Isolated-atom energies (eV) of H, C, N, O on the DFT 3BPA scale: the tiny models' energy offsets.
ATOMIC_ENERGIES = {1: -13.6, 6: -1029.5, 7: -1485.0, 8: -2042.0}
_SYMBOLS = {1: "H", 6: "C", 7: "N", 8: "O"}


def tiny_mace(seed: int = 0, dtype=None, **options: Any):
    """A random MACE ``ScaleShiftMACE`` in eval mode, built with ``dtype`` (default float64) as MACE's
    default dtype (MACE computes some buffers in it). ``options`` override the constructor's keywords;
    ``hidden_irreps`` and ``MLP_irreps`` may be strings, ``atomic_energies`` a sequence in the order of
    ``atomic_numbers``."""
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules
    from mace.tools import torch_tools

    interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    settings: dict[str, Any] = {
        "r_max": 4.0,
        "num_bessel": 4,
        "num_polynomial_cutoff": 5,
        "max_ell": 1,
        "interaction_cls": interaction,
        "interaction_cls_first": interaction,
        "num_interactions": 2,
        "hidden_irreps": "8x0e+8x1o",
        "MLP_irreps": "4x0e",
        "atomic_energies": [ATOMIC_ENERGIES[z] for z in ELEMENTS],
        "avg_num_neighbors": 8.0,
        "atomic_numbers": list(ELEMENTS),
        "correlation": 2,
        "gate": torch.nn.functional.silu,
        "atomic_inter_scale": 0.5,
        "atomic_inter_shift": 0.0,
        **options,
    }
    settings["num_elements"] = len(settings["atomic_numbers"])
    settings["hidden_irreps"] = o3.Irreps(settings["hidden_irreps"])
    settings["MLP_irreps"] = o3.Irreps(settings["MLP_irreps"])
    settings["atomic_energies"] = np.asarray(settings["atomic_energies"], dtype=float)
    with torch_tools.default_dtype(dtype or torch.float64):
        torch.manual_seed(seed)
        model = modules.ScaleShiftMACE(**settings)
    return model.eval()


def tiny_nequip(seed: int = 0, **options: Any):
    """A random ``NequIPGNNModel`` in eval mode (float64). ``options`` override the constructor's
    keywords, e.g. ``num_layers`` or ``r_max``."""
    from nequip.model import NequIPGNNModel
    from nequip.utils.global_state import set_global_state

    set_global_state()
    settings: dict[str, Any] = {
        "model_dtype": "float64",
        "type_names": ["C", "H", "N", "O"],
        "r_max": 4.0,
        "num_layers": 2,
        "l_max": 1,
        "parity": False,
        "num_features": 8,
        "radial_mlp_width": 16,
        "avg_num_neighbors": 10.0,
        "per_type_energy_shifts": {_SYMBOLS[z]: e for z, e in ATOMIC_ENERGIES.items()},
        "per_type_energy_scales": 0.5,
        **options,
    }
    return NequIPGNNModel(seed=seed, **settings).eval()


def tiny_schnetpack(
    kind: str = "painn",
    dtype=None,
    seed: int = 0,
    *,
    n_atom_basis: int = 8,
    n_interactions: int = 2,
    n_rbf: int = 6,
    cutoff: float = 4.0,
    mean_per_atom: float = -654.0,
):
    """A random SchNetPack ``NeuralNetworkPotential`` (``kind`` "painn" or "schnet") with the
    postprocessing ``spktrain`` saves (float64 cast, the mean energy per atom added), its elements and
    units recorded as the SchNetPack adapter reads them, in ``dtype`` (default float64)."""
    import schnetpack as spk
    import torch

    from ggnd_plugin.adapters.schnetpack import SchNetPackAdapter

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # SchNetPack's GaussianRBF builds torch.FloatTensor
    try:
        torch.manual_seed(seed)
        common = dict(
            n_atom_basis=n_atom_basis,
            n_interactions=n_interactions,
            radial_basis=spk.nn.GaussianRBF(n_rbf=n_rbf, cutoff=cutoff),
            cutoff_fn=spk.nn.CosineCutoff(cutoff),
        )
        representations = {"painn": spk.representation.PaiNN, "schnet": spk.representation.SchNet}
        model = spk.model.NeuralNetworkPotential(
            representation=representations[kind](**common),
            input_modules=[spk.atomistic.PairwiseDistances()],
            output_modules=[
                spk.atomistic.Atomwise(n_in=n_atom_basis, output_key="energy", aggregation_mode="sum"),
                spk.atomistic.Forces(energy_key="energy", force_key="forces"),
            ],
            postprocessors=[
                spk.transform.CastTo64(),
                spk.transform.AddOffsets(
                    "energy", add_mean=True, property_mean=torch.tensor([mean_per_atom])
                ),
            ],
        )
    finally:
        torch.set_default_dtype(previous)
    model = model.to(dtype or torch.float64)
    SchNetPackAdapter.set_elements(model, list(ELEMENTS))
    SchNetPackAdapter.set_units(model, "eV", "Ang")
    return model


__all__ = ["ATOMIC_ENERGIES", "ELEMENTS", "tiny_mace", "tiny_nequip", "tiny_schnetpack"]
