"""A complete third-party host for ggnd-plugin, living outside the package.

It plays the part of a package that adds a host without touching ggnd-plugin: a small equivariant
potential (element energies + a learned function of smooth neighbour densities, with scalar and vector
node features), and an adapter registered under the entry-point group ``ggnd_plugin.adapters`` by
the ``toyhost_ggnd-0.1.dist-info`` folder beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from torch import nn

from ggnd_plugin.adapters.base import HostAdapter, Prediction
from ggnd_plugin.block import FeatureSpec, GGNDBlock, GGNDConfig
from ggnd_plugin.errors import GGNDError

FORMAT = "toyhost-model-v1"


class ToyPotential(nn.Module):
    def __init__(self, atomic_numbers=(1, 6, 7, 8), mul: int = 4, width: float = 2.0):
        super().__init__()
        self.atomic_numbers = list(atomic_numbers)
        self.mul, self.width = mul, width
        table = torch.full((119,), -1, dtype=torch.long)
        table[torch.tensor(self.atomic_numbers)] = torch.arange(len(self.atomic_numbers))
        self.register_buffer("species_of", table)
        self.embedding = nn.Embedding(len(self.atomic_numbers), mul)
        self.e0 = nn.Parameter(torch.randn(len(self.atomic_numbers)))
        self.readout = nn.Sequential(nn.Linear(2 * mul, 16), nn.SiLU(), nn.Linear(16, 1))

    @property
    def irreps(self) -> str:
        return f"{self.mul}x0e+{self.mul}x1o"

    def node_features(self, positions, species, batch):
        emb = self.embedding(species)
        diff = positions[None, :, :] - positions[:, None, :]
        same = (batch[:, None] == batch[None, :]).to(positions.dtype)
        weight = torch.exp(-(diff * diff).sum(-1) / self.width**2) * same
        weight = weight - torch.diag(torch.diagonal(weight))
        scalars = emb + weight @ emb
        vectors = torch.einsum("ij,ijk,jc->ick", weight, diff, emb)
        return torch.cat([scalars, vectors.reshape(len(positions), -1)], dim=-1)

    def atom_energy(self, positions, species, batch, features=None):
        features = self.node_features(positions, species, batch) if features is None else features
        scalars = features[:, : self.mul]
        norms = features[:, self.mul :].reshape(-1, self.mul, 3).norm(dim=-1)
        return self.e0[species] + self.readout(torch.cat([scalars, norms], -1)).squeeze(-1)


class ToyWithGGND(nn.Module):
    def __init__(self, host: ToyPotential, config: GGNDConfig):
        super().__init__()
        self.host = host
        self.ggnd = GGNDBlock(FeatureSpec({"node_features": host.irreps}, len(host.atomic_numbers)), config)

    @property
    def atomic_numbers(self):
        return self.host.atomic_numbers

    def atom_energy(self, positions, species, batch):
        features = self.host.node_features(positions, species, batch)
        pairs = self.ggnd.pairs(positions.detach(), batch)
        return self.host.atom_energy(positions, species, batch, features) + self.ggnd(
            features, positions, species, pairs, batch=batch
        )


class ToyCalculator(Calculator):
    implemented_properties = ["energy", "forces"]

    def __init__(self, adapter, model, **kwargs):
        super().__init__(**kwargs)
        self.adapter, self.model = adapter, model

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        prediction = self.adapter.predict(self.model, [self.atoms])
        self.results = {
            "energy": float(prediction.energy[0]),
            "forces": prediction.forces.detach().numpy().astype(np.float64),
        }


class ToyAdapter(HostAdapter):
    name = "toyhost"
    distribution = "toyhost-ggnd"
    module = "toyhost_ggnd"
    file_suffixes = (".toy",)

    def recognises_model(self, model) -> bool:
        return isinstance(model, ToyPotential | ToyWithGGND)

    def recognises_file(self, path: Path) -> bool:
        if Path(path).suffix not in self.file_suffixes:
            return False
        try:
            return torch.load(path, map_location="cpu", weights_only=False).get("format") == FORMAT
        except Exception:
            return False

    def load(self, path, device="cpu"):
        try:
            payload = torch.load(path, map_location=device, weights_only=False)
        except Exception as error:
            raise GGNDError(f"{path}: not a toyhost model file ({error})") from error
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise GGNDError(f"{path}: not a toyhost model file")
        host = ToyPotential(**payload["host"])
        model = host if payload["ggnd"] is None else ToyWithGGND(host, GGNDConfig.from_dict(payload["ggnd"]))
        model.load_state_dict(payload["state_dict"])
        return model

    def save(self, model, path):
        path = Path(path)
        host = model.host if isinstance(model, ToyWithGGND) else model
        torch.save(
            {
                "format": FORMAT,
                "host": {"atomic_numbers": host.atomic_numbers, "mul": host.mul, "width": host.width},
                "ggnd": model.ggnd.config.to_dict() if isinstance(model, ToyWithGGND) else None,
                "state_dict": model.state_dict(),
            },
            path,
        )
        return path

    def feature_spec(self, model):
        host = model.host if isinstance(model, ToyWithGGND) else model
        return FeatureSpec({"node_features": host.irreps}, len(host.atomic_numbers))

    def attach(self, model, config):
        return ToyWithGGND(model, config).to(next(model.parameters()).dtype)

    def ggnd_blocks(self, model):
        return [model.ggnd] if isinstance(model, ToyWithGGND) else []

    def atomic_numbers(self, model):
        return list(model.atomic_numbers)

    def cutoff(self, model):
        return 3.0 * (model.host if isinstance(model, ToyWithGGND) else model).width

    def predict(self, model, structures, training=False):
        dtype = next(model.parameters()).dtype
        positions = torch.cat([torch.as_tensor(a.get_positions(), dtype=dtype) for a in structures])
        numbers = torch.cat([torch.as_tensor(a.get_atomic_numbers()) for a in structures])
        batch = torch.cat([torch.full((len(a),), k, dtype=torch.long) for k, a in enumerate(structures)])
        host = model.host if isinstance(model, ToyWithGGND) else model
        species = host.species_of[numbers]
        with torch.enable_grad():
            positions.requires_grad_(True)
            atom_energy = model.atom_energy(positions, species, batch)
            energy = torch.zeros(len(structures), dtype=dtype).index_add(0, batch, atom_energy)
            (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=training)
        return Prediction(
            energy=energy if training else energy.detach(), forces=-grad if training else -grad.detach()
        )

    def ase_calculator(self, model, device="cpu"):
        return ToyCalculator(self, model)

    def torchsim_model(self, model, device="cpu", dtype=torch.float64):
        raise GGNDError("toyhost has no TorchSim model")
