"""The adapter contract checked on a real model: :func:`validate_adapter`, for our adapters and third-party ones.

Each check that fails raises :class:`AdapterContractError` naming the adapter and what it got wrong
(a real exception, so the checks also run under ``python -O``). docs/adapters.md describes the
contract and how a third-party adapter's tests call this.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ggnd_plugin.adapters.base import HostAdapter, Prediction
from ggnd_plugin.block import FeatureSpec, GGNDConfig
from ggnd_plugin.errors import GGNDError

if TYPE_CHECKING:
    from ase import Atoms

__all__ = ["AdapterContractError", "validate_adapter"]


class AdapterContractError(GGNDError):
    """A host adapter does not honour the contract of :class:`~ggnd_plugin.adapters.base.HostAdapter`."""


def validate_adapter(
    adapter: HostAdapter,
    model: nn.Module,
    structures: Sequence[Atoms],
    tmp_path: Path,
    config: GGNDConfig | None = None,
    atol: float = 1e-6,
) -> nn.Module:
    """Check that ``adapter`` honours the contract on ``model`` (a plain host model); return it upgraded.

    ``structures`` are a few molecules of the model's elements; ``tmp_path`` a folder for the saved
    file; ``config`` the block attached (default: a small one); ``atol`` the tolerance of every
    comparison (an ASE energy also passes within 1e-9 of its size). Checks, in order:

    1. the adapter recognises the model, gives a :class:`FeatureSpec` and finds no GGND block in it;
    2. ``attach`` changes no prediction (the fusion readout starts at zero), and the upgraded model is
       recognised and has GGND blocks with parameters;
    3. ``save`` writes a file the adapter recognises, and ``load`` gives it back predicting the same;
    4. the ASE calculator agrees with ``predict`` on every structure;
    5. the TorchSim model (what ``ggnd stability`` runs), with the GGND block made to contribute: one
       batch of ``structures`` gives each system what it gives that system alone (systems of a batch
       must not interact) and agrees with ``predict``; and TorchSim's own
       ``torch_sim.models.interface.validate_model_outputs`` accepts it. That validator runs crystals:
       a block for molecules only (``r_g=None``) is checked there as its periodic twin, the same
       options with ``r_g`` at the host's cutoff, and the validator's elements are mapped onto the
       model's. An adapter whose ``torchsim_model`` raises :class:`GGNDError` (it offers none, so MD
       stability runs cannot use it) skips step 5 with a warning.

    Raises :class:`AdapterContractError` at the first failed check.
    """
    config = config or GGNDConfig(channels=8, heads=2)
    _require(adapter.recognises_model(model), f"{adapter.name}: does not recognise its own model")
    spec = adapter.feature_spec(model)
    _require(isinstance(spec, FeatureSpec), f"{adapter.name}: feature_spec must return a FeatureSpec")
    _require(not adapter.ggnd_blocks(model), f"{adapter.name}: plain model reports GGND blocks")

    before = adapter.predict(model, structures)
    upgraded = adapter.attach(model, config)
    after = adapter.predict(upgraded, structures)
    _require(adapter.recognises_model(upgraded), f"{adapter.name}: does not recognise the upgraded model")
    _require(adapter.ggnd_blocks(upgraded), f"{adapter.name}: attach() added no GGND block")
    _require(any(True for _ in adapter.ggnd_parameters(upgraded)), f"{adapter.name}: GGND has no parameters")
    _require_close(before, after, atol, f"{adapter.name}: attach() at zero init changed predictions")

    path = adapter.save(
        upgraded, tmp_path / f"upgraded{adapter.file_suffixes[0] if adapter.file_suffixes else ''}"
    )
    _require(adapter.recognises_file(path), f"{adapter.name}: does not recognise its own saved file {path}")
    reloaded = adapter.load(path)
    _require_close(
        after, adapter.predict(reloaded, structures), atol, f"{adapter.name}: save/load changed predictions"
    )

    calculator = adapter.ase_calculator(upgraded)
    for index, atoms in enumerate(structures):
        atoms = atoms.copy()
        atoms.calc = calculator
        energy = atoms.get_potential_energy()
        forces = torch.as_tensor(atoms.get_forces())
        _require(
            abs(energy - after.energy[index].item()) < max(atol, 1e-9 * abs(energy)),
            f"{adapter.name}: ASE energy differs from predict() on frame {index}",
        )
        start = sum(len(a) for a in structures[:index])
        ref = after.forces[start : start + len(atoms)].detach().cpu().to(forces.dtype)
        _require((forces - ref).abs().max() < atol, f"{adapter.name}: ASE forces differ on frame {index}")

    _check_torchsim_model(adapter, model, upgraded, structures, atol)
    return upgraded


# --------------------------------------------------------------------------------------------------
# The TorchSim model
# --------------------------------------------------------------------------------------------------
def _check_torchsim_model(
    adapter: HostAdapter, model: nn.Module, upgraded: nn.Module, structures: Sequence[Atoms], atol: float
) -> None:
    import torch_sim as ts
    from torch_sim.models.interface import validate_model_outputs

    device = next(iter(upgraded.parameters())).device
    contributing = _ggnd_contributing(adapter, upgraded)
    try:
        torchsim_model = adapter.torchsim_model(contributing, device=str(device))
    except GGNDError as error:
        warnings.warn(
            f"{adapter.name}: the adapter offers no TorchSim model ({error}); its TorchSim checks were skipped",
            stacklevel=3,
        )
        return

    def run(frames) -> Prediction:
        out = torchsim_model(ts.io.atoms_to_state(list(frames), device, torch.float64))
        return Prediction(energy=out["energy"].detach().reshape(-1), forces=out["forces"].detach())

    batch = run(structures)
    start = 0
    for index, atoms in enumerate(structures):
        stop = start + len(atoms)
        in_batch = Prediction(energy=batch.energy[index : index + 1], forces=batch.forces[start:stop])
        _require_close(
            run([atoms]),
            in_batch,
            atol,
            f"{adapter.name}: the TorchSim model gives frame {index} other energies or forces in a batch "
            "than alone (the systems of a batch must not interact)",
        )
        start = stop
    _require_close(
        adapter.predict(contributing, structures),
        batch,
        atol,
        f"{adapter.name}: the TorchSim model disagrees with predict()",
    )

    periodic = _periodic_twin(adapter, model, upgraded, contributing)
    try:
        validate_model_outputs(
            adapter.torchsim_model(periodic, device=str(device)),
            device,
            torch.float64,
            state_modifier=_onto_elements(adapter.atomic_numbers(upgraded)),
        )
    except (ValueError, AssertionError, GGNDError) as error:
        raise AdapterContractError(
            f"{adapter.name}: TorchSim's validate_model_outputs refused the TorchSim model: {error}"
        ) from error


def _ggnd_contributing(adapter: HostAdapter, model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose GGND parameters that start at zero (the fusion readout) are small random
    values, so the block's own term is part of what is compared."""
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in adapter.ggnd_parameters(model):
            if not bool(parameter.any()):
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.copy_(0.1 * noise.to(parameter.dtype))
    return model


def _periodic_twin(
    adapter: HostAdapter, model: nn.Module, upgraded: nn.Module, contributing: nn.Module
) -> nn.Module:
    """``contributing`` when its blocks pair atoms within a radius (periodic systems work), else the
    host model with the same block options and ``r_g`` at the host's cutoff, made to contribute."""
    blocks = adapter.ggnd_blocks(upgraded)
    if all(block.config.pair_radius is not None for block in blocks):
        return contributing
    cutoff = float(adapter.cutoff(model))
    options = blocks[0].config.to_dict()
    options["r_g"] = options["r_g"] or cutoff
    if options["variant"] == "local":
        options["local_cutoff"] = options["local_cutoff"] or cutoff
    return _ggnd_contributing(adapter, adapter.attach(model, GGNDConfig.from_dict(options)))


def _onto_elements(known: Sequence[int]) -> Callable:
    """TorchSim's ``state_modifier``: the validator's elements (Si, Mg, Fe, C, H) become ones the model
    knows, so a model built for a few elements can be validated."""
    known = sorted(int(z) for z in known)

    def modify(state):
        numbers = [z if z in known else known[z % len(known)] for z in state.atomic_numbers.tolist()]
        state.atomic_numbers = torch.tensor(numbers, dtype=state.atomic_numbers.dtype, device=state.device)
        return state

    return modify


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
def _require(condition, message: str) -> None:
    if not condition:
        raise AdapterContractError(message)


def _require_close(a: Prediction, b: Prediction, atol: float, message: str) -> None:
    energy_a, energy_b = a.energy.detach().cpu().double(), b.energy.detach().cpu().double()
    forces_a, forces_b = a.forces.detach().cpu().double(), b.forces.detach().cpu().double()
    if energy_a.shape != energy_b.shape or forces_a.shape != forces_b.shape:
        raise AdapterContractError(
            f"{message} (energies {tuple(energy_a.shape)} and {tuple(energy_b.shape)}, forces "
            f"{tuple(forces_a.shape)} and {tuple(forces_b.shape)})"
        )
    de = (energy_a - energy_b).abs().max().item()
    df = (forces_a - forces_b).abs().max().item()
    if not (de <= atol and df <= atol):
        raise AdapterContractError(f"{message} (max |dE| = {de:.3g} eV, max |dF| = {df:.3g} eV/Å)")
