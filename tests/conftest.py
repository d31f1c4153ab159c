"""Shared test fixtures: a tiny equivariant stand-in host and random molecules, in float64."""

from __future__ import annotations

import pytest
import torch

TOY_MUL = 4
TOY_SPECIES = 3
TOY_IRREPS = f"{TOY_MUL}x0e+{TOY_MUL}x1o"


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(autouse=True)
def _e3nn_defaults_restored():
    """Give every test e3nn's global optimisation defaults as they were before it.

    Host code can change them process-wide (nequip's and MACE's scripting switches restore the legacy
    ``jit_script_fx`` flag, which e3nn 0.6 maps onto ``jit_mode="script"``); a MACE model built after
    that is TorchScript-compiled and cannot be deep-copied. Tests of one host must not decide the outcome
    of another's.
    """
    try:
        import e3nn
    except ImportError:
        yield
        return
    saved = dict(e3nn.get_optimization_defaults())
    yield
    legacy = saved.pop("jit_script_fx")
    e3nn.set_optimization_defaults(jit_script_fx=legacy)
    e3nn.set_optimization_defaults(**saved)
    saved["jit_script_fx"] = legacy


def toy_host_features(positions: torch.Tensor, species: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Invariant and equivariant per-atom features, as a local host would give (irreps TOY_IRREPS).

    Scalars: species embedding plus a smooth neighbour density. Vectors: density-weighted sums of
    x_j - x_i. Both are exactly equivariant, so any error in a test comes from the block.
    """
    generator = torch.Generator().manual_seed(1234)
    table = torch.randn(TOY_SPECIES, TOY_MUL, generator=generator, dtype=positions.dtype)
    emb = table[species]
    diff = positions[None, :, :] - positions[:, None, :]
    same = (batch[:, None] == batch[None, :]).to(positions.dtype)
    weight = torch.exp(-(diff * diff).sum(-1) / 4.0) * same
    scalars = emb + 0.1 * weight @ emb
    vectors = torch.einsum("ij,ijk,jc->ick", weight, diff, emb)
    return torch.cat([scalars, vectors.reshape(len(positions), TOY_MUL * 3)], dim=-1)


def random_molecule(n_atoms: int, seed: int, spread: float = 1.6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randn(n_atoms, 3, generator=generator, dtype=torch.float64) * spread
    species = torch.randint(0, TOY_SPECIES, (n_atoms,), generator=generator)
    return positions, species
