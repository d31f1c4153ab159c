"""What the host gives the block: its per-atom features, declared as e3nn irreps (:class:`FeatureSpec`).

Like a NequIP module declaring the irreps it reads, the declaration is checked against every tensor the
block receives, so a wrong wiring fails at the first call with a message naming the field.
"""

# No `from __future__ import annotations`: torch.package (nequip-package) cannot load an interned
# dataclass whose annotations are strings.
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ggnd_plugin.e3nn_compat import o3

__all__ = ["FeatureSpec"]


@dataclass(frozen=True)
class FeatureSpec:
    """The host's per-atom features that the block reads, declared with their irreps.

    ``fields`` maps a name to an irreps string, e.g. ``{"node_feats": "32x0e+32x1o"}``: the ``0e``
    parts are invariant (they also feed the fusion readout), the rest are equivariant. The block checks
    every tensor it receives against this declaration and names the field when one does not fit.
    """

    fields: tuple[tuple[str, str], ...]
    num_species: int

    def __init__(self, fields: Mapping[str, str] | tuple[tuple[str, str], ...], num_species: int):
        items = tuple(fields.items()) if isinstance(fields, Mapping) else tuple(fields)
        if not items:
            raise ValueError("FeatureSpec needs at least one host feature field")
        normalised = tuple((str(name), str(o3.Irreps(irreps).simplify())) for name, irreps in items)
        if num_species < 1:
            raise ValueError(f"num_species must be >= 1, got {num_species}")
        object.__setattr__(self, "fields", normalised)
        object.__setattr__(self, "num_species", int(num_species))

    @property
    def irreps(self) -> o3.Irreps:
        """Irreps of all fields concatenated in declaration order."""
        total = o3.Irreps("")
        for _, irreps in self.fields:
            total = total + o3.Irreps(irreps)
        return total

    @property
    def invariant_dim(self) -> int:
        return sum(mul for mul, ir in self.irreps if ir == o3.Irrep("0e"))

    def invariant_indices(self) -> list[int]:
        """Columns of the concatenated tensor that hold ``0e`` scalars."""
        columns: list[int] = []
        for (mul, ir), part in zip(self.irreps, self.irreps.slices(), strict=True):
            if ir == o3.Irrep("0e"):
                columns.extend(range(part.start, part.start + mul))
        return columns

    def field_dims(self) -> tuple[tuple[str, int], ...]:
        """(name, width) of each field, as plain integers (nothing of e3nn left to trace)."""
        # Computed once and kept on the object: parsing irreps on every call costs time, and traced code
        # (torch.compile) then reads plain integers. Specs unpickled from 0.1.0 files compute it here.
        dims = self.__dict__.get("_dims")
        if dims is None:
            dims = tuple((name, o3.Irreps(irreps).dim) for name, irreps in self.fields)
            object.__setattr__(self, "_dims", dims)
        return dims

    def concatenate(self, features: Mapping[str, Tensor] | Tensor, num_atoms: int) -> Tensor:
        """Check the host tensors against the declaration and concatenate them."""
        if isinstance(features, Tensor):
            if len(self.fields) != 1:
                raise ValueError(
                    f"a single tensor was given but the feature spec declares {len(self.fields)} fields "
                    f"{[name for name, _ in self.fields]}; pass a dict"
                )
            features = {self.fields[0][0]: features}
        parts = []
        for (name, irreps), (_, dim) in zip(self.fields, self.field_dims(), strict=True):
            if name not in features:
                raise KeyError(f"host feature '{name}' ({irreps}) is missing; got {sorted(features)}")
            tensor = features[name]
            if tensor.dim() != 2 or tensor.shape[0] != num_atoms or tensor.shape[1] != dim:
                raise ValueError(
                    f"host feature '{name}' should have shape ({num_atoms}, {dim}) for irreps {irreps}, "
                    f"got {tuple(tensor.shape)}"
                )
            parts.append(tensor)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def describe(self) -> str:
        lines = [f"{self.num_species} species"]
        for name, irreps in self.fields:
            kinds = [
                f"{mul}x{ir} ({'invariant' if ir == o3.Irrep('0e') else 'equivariant'})"
                for mul, ir in o3.Irreps(irreps)
            ]
            lines.append(f"{name}: " + ", ".join(kinds))
        return "\n".join(lines)
