"""The GGND block: geometric graph neural diffusion over all atom pairs of each system.

:class:`GGNDBlock` computes, for each system,

* the pair geometry once per call: distances, spherical harmonics ``Y(x_ij)``, radial basis,
  envelopes, the attention's radial bias and the filter's radial functions ``R(|x_ij|)``
  (:meth:`GGNDBlock._geometry`, functions in :mod:`~ggnd_plugin.block.geometry`);
* the initial state ``Z(0)`` = per-irrep linear map of the host features + the atom's species
  embedding + the embedding ``phi_E(X, H)`` of its neighbourhood, averaged over a smooth partner count;
* the diffusion ``dz_i/dt = sum_j alpha_ij [G_ij + F_ij(G_ij)]`` with the equivariant gradient
  ``G_ij = W (z_j - z_i)`` (paper eq. 2), right-stochastic attention ``alpha`` (softmax over j per
  head, from invariants only) and the tensor filter ``F_ij`` (Clebsch-Gordan products of the gradient
  with ``Y(x_ij)`` weighted by ``R_l(|x_ij|)``, gated per atom by invariants of ``z_i``, paper eq. 3),
  integrated from 0 to T with K explicit steps (the pair sums: :mod:`~ggnd_plugin.block.pair_sums`);
* the fusion readout ``E_i = W_l l_i + W_z z_i,00(T)``, both weights starting at zero, which is added
  to the host's own per-atom energy.

docs/block.md states the same equations with every decision the paper leaves open and why the block is
written this way (size safety, cost). Nothing in :meth:`GGNDBlock.forward` depends on tensor values for
its shapes; the pair tables (:mod:`~ggnd_plugin.block.pairs`) are built outside, like a host's
neighbour list. This is numerics **version 2**; blocks of files trained with 0.1.0 run
:mod:`ggnd_plugin.block.version1`.
"""

# No `from __future__ import annotations`: torch.package (nequip-package) cannot load an interned
# dataclass whose annotations are strings.
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ggnd_plugin.block import version1
from ggnd_plugin.block.config import GGNDConfig
from ggnd_plugin.block.features import FeatureSpec
from ggnd_plugin.block.geometry import (
    DISTANCE_EPS,
    RadialBasis,
    degree_of_component,
    filter_couplings,
    filter_paths,
    from_channels,
    smooth_cutoff,
    spherical_harmonics,
    state_irreps,
    to_channels,
)
from ggnd_plugin.block.layouts import (
    Layout,
    RowGeometry,
    RowLayout,
    StageOperators,
    StageProjection,
    SystemLayout,
)
from ggnd_plugin.block.pair_sums import attention_weights, stage_pair_sums
from ggnd_plugin.block.pairs import PairTable, SystemPairs, check_batch, complete_graph_systems, radius_pairs
from ggnd_plugin.e3nn_compat import o3
from ggnd_plugin.tracing import is_tracing
from ggnd_plugin.validation import validate_block_inputs

__all__ = ["GGNDBlock", "system_energy"]

# Learned radial functions per degree in the embedding phi_E (mixed per channel).
EMBEDDING_RADIAL = 4
# State widths C (lmax+1)^2 up to which the gradient's channel mixing is one dense product per stage
# (cheaper in calls than a product per component; beyond, the wasted multiplications cost more).
DENSE_MIXING_LIMIT = 256


@dataclass
class _StageInputs:
    """What one solver stage hands the pair sums: ``W z`` per row and the rows' projections."""

    mixed: Tensor  # (B, R, C, C')
    projection: StageProjection


class GGNDBlock(nn.Module):
    """Equivariant global diffusion over atom pairs, with a zero-initialised fusion readout.

    ``forward`` returns the block's per-atom energy contribution ``W_l l_i + W_z z_i,00(T)``; a host
    adds it to its own per-atom (or total) energy before taking forces, so forces stay conservative.
    At construction both readout weights are zero: the host's predictions are unchanged until trained.

    The numerics follow ``config.version``: 2 (the default) is this class's own code; a block whose
    config says 1 (built so, or loaded from a file of ggnd-plugin 0.1.0) holds 0.1.0's modules and
    runs :mod:`ggnd_plugin.block.version1`. One class holds both because files name the class and
    unpickling builds it before reading the version (see that module).
    """

    def __init__(self, spec: FeatureSpec, config: GGNDConfig | None = None):
        super().__init__()
        config = config or GGNDConfig()
        self.spec, self.config = spec, config
        if config.version == 1:
            version1.build(self, spec, config)
            return
        if config.variant == "local" and config.local_cutoff is None:
            raise ValueError(
                "GGNDConfig variant 'local' needs local_cutoff (the host's cutoff radius, in Å) to build a block"
            )
        c, lmax, heads = config.channels, config.lmax, config.heads
        # Plain integers for everything forward reads: e3nn's Irreps objects stay out of traced code.
        self.channels, self.lmax, self.heads = c, lmax, heads
        self.head_dim = c // heads
        self.components = (lmax + 1) ** 2
        self.state_dim = c * self.components
        self.pair_radius = config.pair_radius
        self.span = config.pair_radius if config.pair_radius is not None else config.radial_range
        self.irreps_state = state_irreps(c, lmax)
        self.irreps_host = spec.irreps
        self.radial = RadialBasis(
            config.num_radial, config.radial_range, config.pair_radius, config.envelope_exponent
        )
        self.register_buffer("component_degree", torch.tensor(degree_of_component(lmax)), persistent=False)
        # degree_sum[a, l - 1] = 1 where component a has degree l >= 1: per-degree norms by one product
        degree_sum = torch.tensor(degree_of_component(lmax))[:, None] == torch.arange(1, lmax + 1)[None, :]
        self.register_buffer("degree_sum", degree_sum.to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("component_eye", torch.eye(self.components), persistent=False)
        num_invariants = c * (lmax + 1)
        hidden = max(16, c)

        # Initial condition Z(0).
        self.uses_host = config.initial_condition in ("host", "both")
        self.uses_embedding = config.initial_condition in ("embedding", "both")
        if self.uses_host:
            self.host_to_state = o3.Linear(self.irreps_host, self.irreps_state)
        if self.uses_embedding:
            self.species_embedding = nn.Embedding(spec.num_species, c)
            # R^E_l,c(r) = sum_s W[s, l, c] rho_s,l(r): a few learned radial functions per degree (from
            # pair_radial), mixed per channel, so the neighbourhood sum is one batched product of a small
            # pair kernel with the partners' species embedding.
            self.embedding_mixing = nn.Parameter(torch.randn(EMBEDDING_RADIAL, lmax + 1, c))

        # Diffusion operators. W of the gradient: one C x C matrix per degree, initialised and normalised
        # as e3nn's o3.Linear (weights N(0, 1), divided by sqrt(C) in use).
        self.gradient_mixing = nn.Parameter(torch.randn(lmax + 1, c, c)) if config.mix_gradient else None
        self.query = nn.Linear(num_invariants, heads * self.head_dim)
        self.key = nn.Linear(num_invariants, heads * self.head_dim, bias=False)
        self.attention_radial = nn.Linear(config.num_radial, heads)
        # A learned preference for near partners, logit -= gamma_h r_ij with gamma_h = softplus(.) >= 0,
        # starting between 1/4 and 1 per Å across heads: every pair is attended, but the attention (and
        # the forces it carries) concentrates on a neighbourhood of fixed size however large the system.
        decay = torch.logspace(math.log10(0.2), math.log10(0.6), heads) if heads > 1 else torch.tensor([0.35])
        self.attention_decay = nn.Parameter(torch.log(torch.expm1(decay)))
        self.tensor_filter = config.tensor_filter
        if config.tensor_filter:
            paths = filter_paths(lmax)
            self.num_paths = len(paths)
            # R_lf(|x_ij|): one radial function per filter degree (from pair_radial), shared by the
            # channels; the per-atom gates make the filter channel- and path-specific.
            self.filter_gate = nn.Linear(num_invariants, self.num_paths * c)
            coupling, expand, collect = filter_couplings(lmax)
            dtype = torch.get_default_dtype()
            self.register_buffer("filter_coupling", coupling.to(dtype), persistent=False)
            self.register_buffer("filter_expand", expand.to(dtype), persistent=False)
            self.register_buffer("filter_collect", collect.to(dtype), persistent=False)

        # The radial functions of the geometry: R_l of the filter, then rho_s,l of the embedding, one MLP
        # of the Gaussian basis (evaluated once per pair and call).
        self.radial_outputs = (lmax + 1) * (
            int(config.tensor_filter) + EMBEDDING_RADIAL * int(self.uses_embedding)
        )
        if self.radial_outputs:
            self.pair_radial = nn.Sequential(
                nn.Linear(config.num_radial, hidden), nn.SiLU(), nn.Linear(hidden, self.radial_outputs)
            )
        expand = torch.tensor(degree_of_component(lmax))[None, :] == torch.arange(lmax + 1)[:, None]
        self.register_buffer("degree_expand", expand.to(torch.get_default_dtype()), persistent=False)

        # Fusion readout E_i = W_l l_i + W_z z_i,00(T), both starting at zero.
        self.register_buffer(
            "host_invariant_columns", torch.tensor(spec.invariant_indices(), dtype=torch.long)
        )
        self.has_host_invariants = bool(spec.invariant_dim)
        self.readout_host = nn.Linear(max(spec.invariant_dim, 1), 1, bias=False)
        self.readout_state = nn.Linear(c, 1, bias=False)
        nn.init.zeros_(self.readout_host.weight)
        nn.init.zeros_(self.readout_state.weight)
        # In every state dict, so a saved block says which numerics it needs (see _load_from_state_dict).
        self.register_buffer("numerics_version", torch.tensor(2, dtype=torch.long))

    # ---- public API --------------------------------------------------------------------------------
    def pairs(
        self, positions: Tensor, batch: Tensor, cell: Tensor | None = None, pbc: Tensor | None = None
    ) -> "SystemPairs | PairTable":
        """The pair table this block's configuration asks for (call outside the traced forward)."""
        if self.config.version == 1:
            return version1.pairs(self, positions, batch, cell, pbc)
        check_batch(positions, batch)
        radius = self.config.pair_radius
        if radius is None:
            if pbc is not None and bool(pbc.any()):
                raise ValueError(
                    "periodic systems need a finite global radius: set GGNDConfig.r_g (e.g. 10.0 Å)"
                )
            return complete_graph_systems(batch)
        return radius_pairs(positions, batch, radius, cell=cell, pbc=pbc)

    def forward(
        self,
        host_features: Mapping[str, Tensor] | Tensor,
        positions: Tensor,
        species: Tensor,
        pairs: "SystemPairs | PairTable",
        batch: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Per-atom energy contribution (n_atoms,). ``cell`` (n_systems, 3, 3) needs ``batch``."""
        if self.config.version == 1:
            return version1.energy(self, host_features, positions, species, pairs, batch, cell)
        compiled = self.__dict__.get("_compiled_energy")
        if compiled is not None and not self.training:
            return compiled(host_features, positions, species, pairs, batch, cell)
        return self._energy(host_features, positions, species, pairs, batch, cell)

    def _energy(self, host_features, positions, species, pairs, batch, cell) -> Tensor:
        host = self.spec.concatenate(host_features, positions.shape[0])
        layout, z = self._diffuse(host, positions, species, pairs, batch, cell)
        scalars = layout.atoms(z[..., 0])  # z_i,00(T): (n_atoms, C)
        energy = self.readout_state(scalars).squeeze(-1)
        if self.has_host_invariants:
            energy = energy + self.readout_host(host[:, self.host_invariant_columns]).squeeze(-1)
        return energy

    def compile_energy(self, dynamic: bool = True, **options) -> None:
        """Use a ``torch.compile``d forward in eval mode (see :mod:`ggnd_plugin.block_compile`)."""
        if self.config.version == 1:
            raise ValueError("version-1 blocks (files of ggnd-plugin 0.1.0) run uncompiled")
        self._compiled_energy = torch.compile(self._energy, dynamic=dynamic, **options)

    def __getstate__(self) -> dict[str, Any]:
        # A compiled forward is bound to this object and cannot be pickled: copies compile their own.
        state = dict(self.__dict__)
        state.pop("_compiled_energy", None)
        return state

    def diffuse(
        self,
        host: Tensor,
        positions: Tensor,
        species: Tensor,
        pairs: "SystemPairs | PairTable",
        batch: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Z(T) as a flat e3nn tensor ``(n_atoms, D)`` with irreps ``self.irreps_state``."""
        if self.config.version == 1:
            return version1.diffuse(self, host, positions, species, pairs, batch, cell)
        layout, z = self._diffuse(host, positions, species, pairs, batch, cell)
        return from_channels(layout.atoms(z), self.lmax)

    def initial_state(
        self,
        host: Tensor,
        positions: Tensor,
        species: Tensor,
        pairs: "SystemPairs | PairTable",
        batch: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Z(0) as a flat e3nn tensor ``(n_atoms, D)``."""
        if self.config.version == 1:
            cell_per_atom = version1.cell_per_atom_of(pairs, batch, cell)
            return version1.initial_state(self, host, positions, species, pairs, cell_per_atom)
        self._check_inputs(host, positions, species, batch)
        layout = self._layout(positions, pairs, batch, cell)
        geometry = self._geometry(layout, 0, layout.num_rows) if self._whole(layout) else None
        z = self._initial_state(host, species, layout, geometry)
        return from_channels(layout.atoms(z), self.lmax)

    def attention(
        self,
        host_features: Mapping[str, Tensor] | Tensor,
        positions: Tensor,
        species: Tensor,
        pairs: "SystemPairs | PairTable",
        batch: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The attention of the first stage, alpha_ij at Z(0), to see what the block attends to.

        Returns ``(alpha, partners)``: ``alpha`` ``(n_atoms, heads, M)`` over each atom's ``M`` partner
        slots (rows sum to one), and ``partners`` ``(n_atoms, M)`` the atom index of each slot (padding
        slots have weight zero). Not for the ``mp`` variant, which has no attention.
        """
        if self.config.variant == "mp":
            raise ValueError("the 'mp' variant has no attention")
        if self.config.version == 1:
            raise ValueError("version-1 blocks (files of ggnd-plugin 0.1.0) do not report their attention")
        host = self.spec.concatenate(host_features, positions.shape[0])
        self._check_inputs(host, positions, species, batch)
        layout = self._layout(positions, pairs, batch, cell)
        geometry = self._geometry(layout, 0, layout.num_rows)
        invariants = self._invariants(self._initial_state(host, species, layout, geometry))
        query = self.query(invariants).unflatten(-1, (self.heads, self.head_dim)) * self.head_dim**-0.5
        key = self.key(invariants).unflatten(-1, (self.heads, self.head_dim))
        alpha = attention_weights(geometry, query, layout.partners(key, 0, layout.num_rows))
        if isinstance(layout, SystemLayout):
            partners = pairs.atoms[:, None, :].expand(-1, layout.num_rows, -1)
            return layout.atoms(alpha.transpose(1, 2)), layout.atoms(partners)
        return alpha[:, :, 0], pairs.senders

    # ---- the integration ---------------------------------------------------------------------------
    def _check_inputs(self, host, positions, species, batch) -> None:
        """The library's shared checks (empty input, non-finite positions or host features, species out
        of range, shapes), with the command line's messages; skipped under tracing and compilation."""
        validate_block_inputs(
            positions,
            species,
            batch,
            num_species=self.spec.num_species if self.uses_embedding else None,
            host=host,
            enabled=not is_tracing(),
        )

    def _layout(self, positions, pairs, batch, cell) -> Layout:
        if isinstance(pairs, SystemPairs):
            return SystemLayout(pairs, positions)
        cell_per_atom = None
        if pairs.cell_shifts is not None:
            if cell is None or batch is None:
                raise ValueError("a periodic pair table needs cell and batch")
            cell_per_atom = cell.reshape(-1, 3, 3)[batch]
        return RowLayout(pairs, positions, cell_per_atom)

    def _whole(self, layout: Layout) -> bool:
        """All rows at once (geometry computed once per call), unless chunking would split them."""
        return self.config.chunk_size is None or self.config.chunk_size >= layout.num_rows

    def _diffuse(self, host, positions, species, pairs, batch, cell):
        self._check_inputs(host, positions, species, batch)
        layout = self._layout(positions, pairs, batch, cell)
        # The geometry of all pairs is computed once and reused by every stage; chunked evaluation
        # instead recomputes each block's geometry where it is needed (memory linear in N).
        geometry = self._geometry(layout, 0, layout.num_rows) if self._whole(layout) else None
        z = self._initial_state(host, species, layout, geometry)
        ops = self._operators()
        if self.config.variant == "mp":
            return layout, z + self._rhs(z, layout, geometry, ops)
        tau = self.config.step_size
        for _ in range(self.config.steps):
            if self.config.solver == "euler":
                z = z + tau * self._rhs(z, layout, geometry, ops)
            else:
                k1 = self._rhs(z, layout, geometry, ops)
                k2 = self._rhs(z + 0.5 * tau * k1, layout, geometry, ops)
                k3 = self._rhs(z + 0.5 * tau * k2, layout, geometry, ops)
                k4 = self._rhs(z + tau * k3, layout, geometry, ops)
                z = z + tau / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        return layout, z

    # ---- geometry ----------------------------------------------------------------------------------
    def _geometry(self, layout: Layout, start: int, stop: int, need_embedding: bool = True) -> RowGeometry:
        vectors, present = layout.pair_vectors(start, stop)  # (B, R, M, 3), (B, R, M)
        r = torch.sqrt((vectors * vectors).sum(-1) + DISTANCE_EPS**2)
        # x / sqrt(r^2 + eps^2) is a unit vector away from r = 0 and smooth at r = 0, where the
        # harmonics of degree >= 1 (homogeneous polynomials) vanish.
        sh = spherical_harmonics(vectors / r[..., None], self.lmax)  # (B, R, M, C')
        rbf = self.radial(r)  # (B, R, M, K)
        present = present.to(r.dtype)
        exponent = self.config.envelope_exponent
        presence = (
            present if self.pair_radius is None else present * smooth_cutoff(r / self.pair_radius, exponent)
        )
        local = presence if self.pair_radius is not None else present * smooth_cutoff(r / self.span, exponent)
        attention_bias = filter_kernel = embedding_kernel = None
        if self.config.variant != "mp":
            decay = torch.nn.functional.softplus(self.attention_decay)
            attention_bias = (self.attention_radial(rbf) - r[..., None] * decay).permute(0, 3, 1, 2)
            if self.pair_radius is None:  # presence is 0 or 1: absent pairs get logit -inf
                attention_bias = attention_bias + torch.log(present)[:, None]
        if self.radial_outputs:
            # (B, R, M, F + S, L+1) -> per component (B, R, M, F + S, C'), times the local envelope
            radial = self.pair_radial(rbf).unflatten(-1, (-1, self.lmax + 1)) @ self.degree_expand
            kernel = (radial * (local[..., None] * sh)[..., None, :]).permute(0, 1, 3, 4, 2)
            if self.tensor_filter:
                filter_kernel, kernel = kernel[:, :, 0], kernel[:, :, 1:]  # (B, R, C', M)
            if need_embedding and self.uses_embedding:
                embedding_kernel = kernel.reshape(kernel.shape[0], -1, kernel.shape[-1])  # (B, R*S*C', M)
        return RowGeometry(
            presence=presence[:, None],
            log_presence=torch.log(presence.detach())[:, None],
            enveloped=self.pair_radius is not None,
            local=local,
            count=local.sum(-1),
            attention_bias=attention_bias,
            filter_kernel=filter_kernel,
            embedding_kernel=embedding_kernel,
        )

    # ---- Z(0) --------------------------------------------------------------------------------------
    def _initial_state(
        self, host: Tensor, species: Tensor, layout: Layout, geometry: RowGeometry | None
    ) -> Tensor:
        """(B, R, C, C') in the layout's rows."""
        z = None
        if self.uses_host:
            z = layout.rows(to_channels(self.host_to_state(host), self.channels, self.lmax))
        if self.uses_embedding:
            embedded = layout.rows(self.species_embedding(species))  # (B, R, C)
            own = torch.nn.functional.pad(embedded[..., None], (0, self.components - 1))
            own = own + self._over_rows(layout, geometry, self._embedding_rows, embedded, embedding=True)
            z = own if z is None else z + own
        return z

    def _embedding_rows(
        self, geometry: RowGeometry, layout: Layout, start: int, stop: int, embedded: Tensor
    ) -> Tensor:
        """(1/n_i) sum_j local_ij R^E_l(r_ij) e(h_j) Y_l(x_ij) for rows ``start:stop``: (B, R, C, C')."""
        blocks, rows = geometry.count.shape
        # (B, R*S*C', M) @ (B, M, C)
        summed = torch.bmm(geometry.embedding_kernel, layout.partners(embedded, start, stop))
        summed = summed.reshape(blocks, rows, EMBEDDING_RADIAL, self.components, self.channels)
        weights = self.embedding_mixing[:, self.component_degree, :]  # (S, C', C)
        pair = (summed * weights).sum(2).transpose(-1, -2)  # (B, R, C, C')
        return pair / geometry.count[..., None, None]

    # ---- dZ/dt -------------------------------------------------------------------------------------
    def _operators(self) -> StageOperators:
        mixing = None
        if self.gradient_mixing is not None:
            per_component = self.gradient_mixing[self.component_degree] * self.channels**-0.5  # (C', C, C)
            if self.state_dim <= DENSE_MIXING_LIMIT:
                # W[(c, a), (d, b)] = W_l(a)[c, d] delta_ab: one product per stage on flattened rows
                mixing = torch.einsum("acd,ab->cadb", per_component, self.component_eye)
                mixing = mixing.reshape(self.state_dim, self.state_dim)
            else:
                mixing = per_component
        weights, biases = [], []
        query_width = gate_width = 0
        if self.config.variant != "mp":
            scale = self.head_dim**-0.5  # the attention's 1/sqrt(d), folded into the query
            weights += [self.query.weight * scale, self.key.weight]
            biases += [self.query.bias * scale, self.key.weight.new_zeros(self.key.weight.shape[0])]
            query_width = self.query.weight.shape[0]
        if self.tensor_filter:
            weights.append(self.filter_gate.weight)
            biases.append(self.filter_gate.bias)
            gate_width = self.filter_gate.weight.shape[0]
        if not weights:  # mp without the filter: nothing to project
            empty = self.readout_state.weight.new_zeros(0, self.channels * (self.lmax + 1))
            return StageOperators(mixing, empty, empty.new_zeros(0), 0, 0, self.heads)
        return StageOperators(
            mixing, torch.cat(weights), torch.cat(biases), query_width, gate_width, self.heads
        )

    def _rhs(self, z: Tensor, layout: Layout, geometry: RowGeometry | None, ops: StageOperators) -> Tensor:
        """dZ/dt for every row (or the message of the ``mp`` variant): (B, R, C, C')."""
        stage = _StageInputs(self._mix(z, ops), ops.project(self._invariants(z)))
        rate, filtered = self._over_rows(layout, geometry, self._stage_rows, stage, embedding=False)
        if self.tensor_filter:
            # filtered[b, r, c, f * C' + a] = sum_j abar_ij R_l(f) Y_f (W z)_j,c,a [- row sum (W z)_i,c,a]
            gates = torch.tanh(stage.projection.gate).unflatten(-1, (self.num_paths, self.channels))
            outputs = filtered @ self.filter_coupling  # (B, R, C, P_out)
            gated = outputs * (gates.transpose(-1, -2) @ self.filter_expand)
            rate = rate + gated @ self.filter_collect
        return rate

    def _mix(self, z: Tensor, ops: StageOperators) -> Tensor:
        if ops.mixing is None:
            return z
        if ops.mixing.dim() == 2:
            return (z.flatten(-2) @ ops.mixing).unflatten(-1, (self.channels, self.components))
        return torch.einsum("brca,acd->brda", z, ops.mixing)

    def _invariants(self, z: Tensor) -> Tensor:
        """Per channel: the scalars, then the norms of the degree >= 1 parts (smooth at zero), degree-major."""
        if self.lmax == 0:
            return z[..., 0]
        squares = (z * z) @ self.degree_sum  # (B, R, C, L)
        norms = torch.sqrt(squares + DISTANCE_EPS**2) - DISTANCE_EPS
        return torch.cat([z[..., 0], norms.transpose(-1, -2).flatten(-2)], dim=-1)

    def _stage_rows(
        self, geometry: RowGeometry, layout: Layout, start: int, stop: int, stage: "_StageInputs"
    ) -> tuple[Tensor, Tensor | None]:
        """The pair sums of one stage for rows ``start:stop`` (:func:`stage_pair_sums`)."""
        query, key = stage.projection.query, stage.projection.key
        return stage_pair_sums(
            geometry,
            mixed_partners=layout.partners(stage.mixed, start, stop),
            mixed_rows=layout.take(stage.mixed, start, stop),
            query_rows=None if query is None else layout.take(query, start, stop),
            key_partners=None if key is None else layout.partners(key, start, stop),
        )

    # ---- chunking ----------------------------------------------------------------------------------
    def _over_rows(self, layout: Layout, geometry: RowGeometry | None, rows_of, inputs, embedding: bool):
        """``rows_of(geometry, layout, start, stop, inputs)`` over all rows, or chunk by chunk.

        With the geometry of all pairs given, one call covers every row. Otherwise (``chunk_size``) the
        rows are processed in chunks whose geometry is computed inside the chunk (with the embedding's
        kernel when ``embedding``) and recomputed in the backward pass (``torch.utils.checkpoint``), so
        no tensor of all pairs is ever kept. ``rows_of`` returns a tensor or a tuple (joined per item).
        """
        if geometry is not None:
            return rows_of(geometry, layout, 0, layout.num_rows, inputs)
        chunk = self.config.chunk_size
        outputs = []
        for start in range(0, layout.num_rows, chunk):
            stop = min(start + chunk, layout.num_rows)
            if torch.is_grad_enabled():
                outputs.append(
                    checkpoint(
                        self._chunk, layout, rows_of, start, stop, inputs, embedding, use_reentrant=False
                    )
                )
            else:
                outputs.append(self._chunk(layout, rows_of, start, stop, inputs, embedding))
        if isinstance(outputs[0], tuple):
            return tuple(
                None if parts[0] is None else layout.join(list(parts)) for parts in zip(*outputs, strict=True)
            )
        return layout.join(outputs)

    def _chunk(self, layout: Layout, rows_of, start: int, stop: int, inputs, embedding: bool):
        geometry = self._geometry(layout, start, stop, need_embedding=embedding)
        return rows_of(geometry, layout, start, stop, inputs)

    # ---- loading -----------------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        saved = state_dict.get(prefix + "numerics_version")
        saved_version = 1 if saved is None else int(saved)
        if saved_version != self.config.version:
            raise RuntimeError(
                f"the weights at '{prefix or '<root>'}' are those of a version-{saved_version} GGND block, "
                f"but this block was built as version {self.config.version}: build it from the config saved "
                f"with the weights (GGND option version: {saved_version})"
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"state={self.irreps_state}, host={self.irreps_host}, config={self.config}"


def system_energy(atom_energy: Tensor, batch: Tensor, num_systems: int) -> Tensor:
    """Sum per-atom energies into per-system energies (no data-dependent shapes)."""
    out = atom_energy.new_zeros(num_systems)
    return out.index_add(0, batch, atom_energy)
