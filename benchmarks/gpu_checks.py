"""Correctness on a device: what the GPU pass checks before it measures anything.

Each check runs the same float64 computation on the CPU and on ``device`` (or, for the compiled block,
eagerly and compiled on ``device``) and returns a record: the largest absolute and relative difference
of every quantity (relative to the largest magnitude of the reference) and whether all of them are within
:data:`TOLERANCE`. ``tests/test_gpu_checks.py`` asserts them (marked ``cuda``); ``benchmarks/gpu_pass.py``
runs that test file first and copies the records into its JSON.

With ``device="cpu"`` every check compares the CPU with itself: that is the dry run of ``make test``,
which proves the checks still run, not that a GPU agrees.

The checks:

- :func:`block_device_vs_cpu`: the GGND block alone (numerics version 2) on molecules (every pair, dense
  and chunked) and on periodic cells (finite ``r_g``): energy, forces and stress (``dE/d strain / V``);
- :func:`host_device_vs_cpu`: MACE, NequIP and PaiNN (SchNetPack) with a GGND block, through their TorchSim
  models: molecules (energy, forces) and periodic boxes (energy, forces, stress);
- :func:`compiled_vs_eager`: ``compile_blocks`` (TorchInductor: Triton kernels on CUDA) against the plain
  block on the device, for two batch sizes (``dynamic=True`` must not recompile wrongly);
- :func:`force_training_gradients`: the double backward of force training (``ggnd_plugin.training.loss_of``
  and ``backward``) for each host: every parameter gradient, device against CPU.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

TOLERANCE = 1e-9  # relative, float64
HOSTS = ("mace", "nequip", "schnetpack")
HOST_LABELS = {"mace": "MACE", "nequip": "NequIP", "schnetpack": "PaiNN (SchNetPack)"}
BLOCK_IRREPS = "8x0e+8x1o"
BLOCK_SPECIES = 3


def difference(value, reference) -> dict[str, float]:
    """Largest absolute difference and that over the largest magnitude of ``reference``."""
    value = value.detach().double().cpu()
    reference = reference.detach().double().cpu()
    largest = float(reference.abs().max()) if reference.numel() else 0.0
    worst = float((value - reference).abs().max()) if reference.numel() else 0.0
    if not (math.isfinite(worst) and math.isfinite(largest)):
        return {"max_abs": math.inf, "max_rel": math.inf, "reference_max_abs": largest}
    return {
        "max_abs": worst,
        "max_rel": worst / largest if largest > 0 else worst,
        "reference_max_abs": largest,
    }


def verdict(quantities: dict[str, dict[str, float]], tolerance: float = TOLERANCE) -> dict[str, Any]:
    worst = max(q["max_rel"] for q in quantities.values())
    return {
        "quantities": quantities,
        "max_rel": worst,
        "tolerance_rel": tolerance,
        "passed": worst <= tolerance,
    }


def perturb_ggnd(model, seed: int = 1, std: float = 0.1):
    """Give every GGND block's zero-initialised readouts random weights, so the block changes the outputs
    (an upgraded model predicts exactly what its host did until it is trained)."""
    import torch

    from ggnd_plugin.block import GGNDBlock

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, GGNDBlock):
                for layer in (module.readout_state, module.readout_host):
                    noise = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64)
                    layer.weight.copy_(std * noise)
    return model


# --------------------------------------------------------------------------------------------------
# The block alone
# --------------------------------------------------------------------------------------------------
def _block(config, seed: int = 0):
    import torch

    from ggnd_plugin.block import FeatureSpec, GGNDBlock

    torch.manual_seed(seed)
    spec = FeatureSpec({"node_feats": BLOCK_IRREPS}, num_species=BLOCK_SPECIES)
    block = GGNDBlock(spec, config).double()
    return perturb_ggnd(block, seed=seed + 1, std=1.0).eval()


def molecule_inputs(n_systems: int, n_atoms: int, seed: int = 0) -> dict:
    """``n_systems`` molecule-like blobs of ``n_atoms`` (block_scaling's clusters), float64, with fixed
    random host features and species."""
    import torch
    from block_scaling import molecule_blob

    generator = torch.Generator().manual_seed(seed)
    positions = torch.cat([molecule_blob(n_atoms, generator).double() for _ in range(n_systems)])
    total = n_systems * n_atoms
    return {
        "positions": positions,
        "batch": torch.arange(n_systems).repeat_interleave(n_atoms),
        "species": torch.randint(0, BLOCK_SPECIES, (total,), generator=generator),
        "host": torch.randn(total, 32, generator=generator, dtype=torch.float64),
        "cell": None,
        "pbc": None,
    }


def crystal_inputs(n_systems: int = 2, n_atoms: int = 16, seed: int = 0) -> dict:
    """Periodic triclinic cells (about 7 Å) with random fractional positions, float64."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    base = torch.tensor([[7.0, 0.0, 0.0], [0.6, 7.2, 0.0], [-0.5, 0.4, 6.9]], dtype=torch.float64)
    cells = torch.stack([base * (1 + 0.03 * k) for k in range(n_systems)])
    fractional = torch.rand(n_systems, n_atoms, 3, generator=generator, dtype=torch.float64)
    positions = torch.einsum("sna,sab->snb", fractional, cells).reshape(-1, 3)
    total = n_systems * n_atoms
    return {
        "positions": positions,
        "batch": torch.arange(n_systems).repeat_interleave(n_atoms),
        "species": torch.randint(0, BLOCK_SPECIES, (total,), generator=generator),
        "host": torch.randn(total, 32, generator=generator, dtype=torch.float64),
        "cell": cells,
        "pbc": torch.ones(n_systems, 3, dtype=torch.bool),
    }


def block_outputs(block, inputs: dict, device) -> dict:
    """Energy per system, forces and (periodic inputs) stress = dE/d(strain) / V of ``block`` on ``device``."""
    import torch

    from ggnd_plugin.block import system_energy

    moved = {k: (v.to(device) if v is not None else None) for k, v in inputs.items()}
    block = block.to(device)
    batch = moved["batch"]
    n_systems = int(batch.max()) + 1
    positions = moved["positions"].clone().requires_grad_(True)
    cell = moved["cell"]
    targets = [positions]
    if cell is not None:
        # x' = x (1 + e), cell' = cell (1 + e) with a symmetric strain e per system, at e = 0
        strain = torch.zeros(
            n_systems, 3, 3, dtype=positions.dtype, device=positions.device, requires_grad=True
        )
        deformation = torch.eye(3, dtype=positions.dtype, device=positions.device) + 0.5 * (
            strain + strain.transpose(1, 2)
        )
        strained = torch.einsum("na,nab->nb", positions, deformation[batch])
        cell = torch.bmm(cell, deformation)
        targets.append(strain)
    else:
        strained = positions
    pairs = block.pairs(
        strained.detach(), batch, cell=None if cell is None else cell.detach(), pbc=moved["pbc"]
    )
    atom_energy = block(moved["host"], strained, moved["species"], pairs, batch=batch, cell=cell)
    energy = system_energy(atom_energy, batch, n_systems)
    gradients = torch.autograd.grad(energy.sum(), targets)
    out = {"energy": energy.detach(), "forces": -gradients[0]}
    if cell is not None:
        volume = torch.linalg.det(moved["cell"]).abs()
        out["stress"] = gradients[1] / volume[:, None, None]
    return out


def block_device_vs_cpu(device: str, tiny: bool = False) -> dict[str, Any]:
    """The block on ``device`` against the CPU: molecules dense and chunked, periodic cells with stress."""
    from ggnd_plugin.block import GGNDConfig

    # the dry run (tiny) checks the same paths with a smaller block: building e3nn's layers dominates there
    small = {"channels": 8, "heads": 2, "steps": 2} if tiny else {}
    systems = {
        "molecules, every pair (dense)": ({}, molecule_inputs(2 if tiny else 4, 27)),
        "molecules, every pair (chunked by 16)": ({"chunk_size": 16}, molecule_inputs(2, 27, seed=1)),
        "periodic cells, r_g 4.5 Å": ({"r_g": 4.5}, crystal_inputs(2, 12 if tiny else 16)),
    }
    records = {}
    for name, (options, inputs) in systems.items():
        block = _block(GGNDConfig(**small, **options))
        reference = block_outputs(copy.deepcopy(block), inputs, "cpu")
        on_device = block_outputs(copy.deepcopy(block), inputs, device)
        records[name] = verdict({key: difference(on_device[key], reference[key]) for key in reference})
    return _overall(records, what="GGND block (version 2, default config), float64: device against CPU")


# --------------------------------------------------------------------------------------------------
# Hosts with GGND, through their TorchSim models
# --------------------------------------------------------------------------------------------------
def tiny_host(host: str):
    """The test suite's tiny random host model (float64, H/C/N/O)."""
    from ggnd_plugin import testing

    factories = {
        "mace": testing.tiny_mace,
        "nequip": testing.tiny_nequip,
        "schnetpack": testing.tiny_schnetpack,
    }
    return factories[host]()


def upgraded_host(host: str, r_g: float | None = None, seed: int = 1):
    """A tiny host with a small GGND block attached (readouts perturbed), and its adapter."""
    import torch

    from ggnd_plugin.block import GGNDConfig
    from ggnd_plugin.registry import get

    adapter = get(host)
    torch.manual_seed(seed)
    model = adapter.attach(tiny_host(host), GGNDConfig(channels=8, heads=2, steps=2, r_g=r_g))
    return adapter, perturb_ggnd(model, seed=seed)


def three_bpa_frames(n: int, box: float | None = None) -> list:
    """The first ``n`` frames of the package's 3BPA test set; with ``box``, centred in a periodic cube."""
    from ase.io import read

    from ggnd_plugin.default_data import default_data_path

    frames = read(default_data_path("3bpa_300K_test"), index=f":{n}")
    if box is not None:
        for atoms in frames:
            atoms.set_cell([box, box, box])
            atoms.set_pbc(True)
            atoms.center()
    return frames


def torchsim_outputs(adapter, model, frames, device) -> dict:
    import torch
    import torch_sim as ts

    model = copy.deepcopy(model).to(device)
    ts_model = adapter.torchsim_model(model, device=device, dtype=torch.float64)
    periodic = bool(frames[0].pbc.any())
    if periodic and not ts_model.compute_stress:
        ts_model.compute_stress = True
    state = ts.io.atoms_to_state(frames, torch.device(device), torch.float64)
    out = ts_model(state)
    keys = ("energy", "forces", "stress") if periodic else ("energy", "forces")
    return {key: out[key].detach() for key in keys}


def host_device_vs_cpu(host: str, device: str, tiny: bool = False) -> dict[str, Any]:
    """One host with GGND on ``device`` against the CPU, through ``adapter.torchsim_model``."""
    records = {}
    n = 2 if tiny else 4
    systems = [("molecules (3BPA), every pair", None, None), ("periodic 3BPA boxes, r_g 5 Å", 5.0, 12.0)]
    # the dry run (tiny): periodic boxes only (stress, r_g); its other sections run molecules through hosts
    for name, r_g, box in systems[1:] if tiny else systems:
        adapter, model = upgraded_host(host, r_g=r_g)
        frames = three_bpa_frames(n, box)
        reference = torchsim_outputs(adapter, model, frames, "cpu")
        on_device = torchsim_outputs(adapter, model, frames, device)
        records[name] = verdict({key: difference(on_device[key], reference[key]) for key in reference})
    return _overall(
        records, what=f"{HOST_LABELS[host]} + GGND (tiny, float64) TorchSim model: device against CPU"
    )


# --------------------------------------------------------------------------------------------------
# Compiled block against eager, on the device
# --------------------------------------------------------------------------------------------------
def compiled_vs_eager(device: str, tiny: bool = False) -> dict[str, Any]:
    """``compile_blocks`` (the backend of ``GGND_COMPILE_BACKEND``, else TorchInductor) on ``device``."""
    import os

    import torch

    from ggnd_plugin.block import GGNDConfig
    from ggnd_plugin.block_compile import compile_blocks

    torch._dynamo.reset()
    eager = _block(GGNDConfig()).to(device)
    compiled = copy.deepcopy(eager)
    started = time.perf_counter()
    assert compile_blocks(compiled) == 1
    records = {}
    first_call_s = None
    for n_systems in (3, 1) if not tiny else (2,):
        inputs = molecule_inputs(n_systems, 27, seed=n_systems)
        reference = block_outputs(eager, inputs, device)
        began = time.perf_counter()
        result = block_outputs(compiled, inputs, device)
        first_call_s = first_call_s or time.perf_counter() - began
        records[f"{n_systems} x 27 atoms"] = verdict(
            {k: difference(result[k], reference[k]) for k in reference}
        )
    record = _overall(
        records, what="GGND block float64: compiled (compile_blocks) against eager on the device"
    )
    record["backend"] = os.environ.get("GGND_COMPILE_BACKEND", "inductor")
    record["first_compiled_call_s"] = first_call_s
    record["total_s"] = time.perf_counter() - started
    torch._dynamo.reset()
    return record


# --------------------------------------------------------------------------------------------------
# Force training: the double backward
# --------------------------------------------------------------------------------------------------
def training_gradients(adapter, model, frames, device):
    """Every parameter's gradient of the package's training loss (energy + force terms) on ``device``."""
    import torch

    from ggnd_plugin.training import FinetuneSettings, loss_of

    model = copy.deepcopy(model).to(device).train()
    model.zero_grad(set_to_none=True)
    loss = loss_of(adapter, model, frames, FinetuneSettings(), training=True)
    loss.backward()
    from ggnd_plugin.block import GGNDBlock

    names = [name for name, p in model.named_parameters() if p.grad is not None]
    flat = torch.cat([dict(model.named_parameters())[name].grad.reshape(-1) for name in names])
    in_blocks = {id(p) for m in model.modules() if isinstance(m, GGNDBlock) for p in m.parameters()}
    ggnd = [name for name, p in model.named_parameters() if p.grad is not None and id(p) in in_blocks]
    return loss.detach(), flat.detach(), names, ggnd


def force_training_gradients(host: str, device: str, tiny: bool = False) -> dict[str, Any]:
    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.default_data import default_data_path

    adapter, model = upgraded_host(host)
    frames = read_labelled(default_data_path("3bpa_300K_train"), index=":2" if tiny else ":4")
    loss_cpu, grad_cpu, names_cpu, ggnd_cpu = training_gradients(adapter, model, frames, "cpu")
    loss_dev, grad_dev, names_dev, _ = training_gradients(adapter, model, frames, device)
    ggnd_params = len(ggnd_cpu)
    record = verdict(
        {"loss": difference(loss_dev, loss_cpu), "parameter gradients": difference(grad_dev, grad_cpu)}
    )
    record.update(
        what=f"{HOST_LABELS[host]} + GGND (tiny, float64): gradients of the force-training loss, device against CPU",
        parameters_with_gradient=len(names_cpu),
        ggnd_parameters_with_gradient=ggnd_params,
        same_parameters=names_cpu == names_dev,
    )
    record["passed"] = record["passed"] and names_cpu == names_dev and ggnd_params > 0
    return record


def _overall(records: dict, what: str) -> dict[str, Any]:
    worst = max(r["max_rel"] for r in records.values())
    return {
        "what": what,
        "systems": records,
        "max_rel": worst,
        "tolerance_rel": TOLERANCE,
        "passed": all(r["passed"] for r in records.values()),
    }
