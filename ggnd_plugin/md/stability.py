"""Many-replica MD stability runs on TorchSim (protocol of docs/stability.md, paper section 4.1).

Replicas of a model run in batched TorchSim states with per-system temperatures. The loop is built on
TorchSim's integrator init/step functions (``ts.integrate`` cannot stop one system early): after each
step the instability criterion is evaluated on the device for all replicas at once, and a failed
replica (criterion exceeded, or a non-finite position, momentum, energy or force) is recorded with its
exact failure step and leaves the batch, so no compute is spent on it and it cannot disturb the others.

Every replica carries its own step count, criterion window and (Langevin) noise stream, so its
trajectory does not depend on the batch it runs in. That is what lets the same plan run

* in one batch per model (the default),
* in batches sized by TorchSim's autobatchers (:class:`Batching`: ``BinningAutoBatcher`` bins run one
  after another, or ``InFlightAutoBatcher``, which refills the batch as replicas fail or finish),
* sharded over the ranks of a ``torchrun`` job (:mod:`ggnd_plugin.distributed`),

with the same per-replica results. Checkpoints hold one entry per replica (written atomically every few
hundred steps); ``resume=True`` continues every unfinished replica from its newest entry, whichever
process wrote it, and a stopped single-process run continues bit for bit.

Replicas are seeded from (seed, temperature, replica index) only, never from the model or the rank, so
two models run with the same protocol start from the same frames with the same velocities (a paired
comparison).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ggnd_plugin import provenance
from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError
from ggnd_plugin.safe_io import atomic_torch_save, output_lock, verified_torch_load

ENSEMBLES = ("nve", "nvt-langevin", "nvt-nose-hoover")
CRITERIA = ("auto", "bonds", "rdf")
BOND_RULES = ("reference", "natural")
CHECKPOINT_VERSION = 2  # 2: one entry per replica (1: one batched state per model)


@dataclass
class StabilityProtocol:
    """Everything that defines a stability number; recorded with every result.

    Defaults are the paper's protocol (NVE velocity Verlet, 1 fs, 100 ps, Δ = 0.5 Å on bonds closer
    than 1.8 Å in every reference frame) except ``replicas`` (paper: 5).
    """

    temperatures: tuple[float, ...] = (300.0,)
    replicas: int = 5
    time_ps: float = 100.0
    timestep_fs: float = 1.0
    ensemble: str = "nve"
    friction_per_fs: float = 0.01
    nose_hoover_tau_fs: float = 100.0
    threshold: float | None = None  # None: 0.5 Å (bonds) or 1.0 (RDF)
    criterion: str = "auto"  # auto: bonds for molecules, RDF for periodic systems
    bond_rule: str = "reference"  # reference: < bond_cutoff in every frame; natural: ASE covalent radii
    bond_cutoff: float = 1.8
    seed: int = 0
    record_every_steps: int = 10
    checkpoint_every_steps: int = 500
    rdf_window_ps: float = 1.0
    rdf_every_steps: int = 10
    rdf_bins: int = 100
    rdf_r_max: float | None = None

    @property
    def n_steps(self) -> int:
        return round(self.time_ps * 1000.0 / self.timestep_fs)

    @property
    def dt_ps(self) -> float:
        return self.timestep_fs * 1e-3

    def validate(self) -> None:
        """Refuse an impossible protocol; the value checks are the command line's (same words)."""
        if self.ensemble not in ENSEMBLES:
            raise GGNDError(f"unknown ensemble '{self.ensemble}' (choose from {', '.join(ENSEMBLES)})")
        if self.criterion not in CRITERIA:
            raise GGNDError(f"unknown criterion '{self.criterion}' (choose from {', '.join(CRITERIA)})")
        if self.bond_rule not in BOND_RULES:
            raise GGNDError(f"unknown bond rule '{self.bond_rule}' (choose from {', '.join(BOND_RULES)})")
        if not self.temperatures:
            raise GGNDError("give at least one temperature")
        for temperature in self.temperatures:
            v.check_value(v.positive_float, temperature, "temperatures")
        if len(set(self.temperatures)) != len(self.temperatures):
            raise GGNDError(f"temperatures repeat: {list(self.temperatures)}")
        v.check_value(v.seed, self.seed, "seed")
        for name in (
            "replicas",
            "record_every_steps",
            "checkpoint_every_steps",
            "rdf_every_steps",
            "rdf_bins",
        ):
            v.check_value(v.positive_int, getattr(self, name), name)
        for name in (
            "time_ps",
            "timestep_fs",
            "friction_per_fs",
            "nose_hoover_tau_fs",
            "bond_cutoff",
            "rdf_window_ps",
        ):
            v.check_value(v.positive_float, getattr(self, name), name)
        for name in ("threshold", "rdf_r_max"):
            if getattr(self, name) is not None:
                v.check_value(v.positive_float, getattr(self, name), name)
        if self.n_steps < 1:
            raise GGNDError(f"--time-ps {self.time_ps} is shorter than one {self.timestep_fs} fs step")

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["temperatures"] = [float(t) for t in self.temperatures]
        record["n_steps"] = self.n_steps
        return record


@dataclass
class ReplicaSpec:
    """One replica: its temperature, index, seed (velocities) and start frame."""

    temperature: float
    replica: int
    seed: int
    start_frame: int


@dataclass
class StabilityResult:
    protocol: dict[str, Any]
    rows: list[dict[str, Any]]
    series: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    # how this process ran it (ranks, batching, seconds, replica-steps it computed); not a result
    execution: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# Planning: seeds, start frames, criterion
# ---------------------------------------------------------------------------------------------------


def _temperature_key(temperature: float) -> int:
    return round(temperature * 1000)


def plan_replicas(protocol: StabilityProtocol, start_counts: Mapping[float, int]) -> list[ReplicaSpec]:
    """Replica seeds and start frames, drawn from (seed, temperature) so models get identical plans."""
    plan = []
    for temperature in protocol.temperatures:
        key = _temperature_key(temperature)
        n_frames = start_counts[temperature]
        frame_rng = np.random.default_rng(np.random.SeedSequence(protocol.seed, spawn_key=(key, 2**31)))
        frames = frame_rng.choice(n_frames, size=protocol.replicas, replace=protocol.replicas > n_frames)
        for replica in range(protocol.replicas):
            sequence = np.random.SeedSequence(protocol.seed, spawn_key=(key, replica))
            seed = int(sequence.generate_state(1, np.uint32)[0])
            plan.append(ReplicaSpec(float(temperature), replica, seed, int(frames[replica])))
    return plan


def build_monitor(
    protocol: StabilityProtocol, reference_frames: Sequence, start_example, source: str = "reference"
):
    """The instability monitor the protocol asks for, built from the reference frames."""
    from ggnd_plugin.md.metrics import BondMonitor, RDFMonitor, natural_bonds, reference_bonds, reference_rdf

    if not reference_frames:
        raise GGNDError(f"{source}: holds no frames")
    numbers = reference_frames[0].get_atomic_numbers()
    if len(start_example) != len(numbers) or (start_example.get_atomic_numbers() != numbers).any():
        raise GGNDError(
            f"start frames ({start_example.get_chemical_formula()}) and {source} "
            f"({reference_frames[0].get_chemical_formula()}) are not the same system in the same atom order"
        )
    criterion = protocol.criterion
    if criterion == "auto":
        criterion = "rdf" if start_example.pbc.any() else "bonds"
    if criterion == "rdf":
        reference, r_max = reference_rdf(reference_frames, protocol.rdf_r_max, protocol.rdf_bins, source)
        window = max(
            1, round(protocol.rdf_window_ps * 1000 / protocol.timestep_fs / protocol.rdf_every_steps)
        )
        threshold = 1.0 if protocol.threshold is None else protocol.threshold
        return RDFMonitor(reference, r_max, threshold, protocol.rdf_every_steps, window)
    if start_example.pbc.any():
        raise GGNDError("the bond criterion is for molecules; periodic start frames need --criterion rdf")
    if protocol.bond_rule == "natural":
        pairs, lengths = natural_bonds(reference_frames, source)
    else:
        pairs, lengths = reference_bonds(reference_frames, protocol.bond_cutoff, source)
    threshold = 0.5 if protocol.threshold is None else protocol.threshold
    return BondMonitor(pairs, lengths, threshold)


def package_versions() -> dict[str, str]:
    """The versions a stability record names: the MD stack and every installed host."""
    return provenance.package_versions(("torch", "torch-sim-atomistic", "ase", "numpy", "e3nn"), hosts=True)


# ---------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------

BATCHING_MODES = ("off", "binning", "in-flight")


@dataclass
class Batching:
    """How a model's replicas are grouped into batches; no replica's result depends on it (up to round-off).

    ``mode``:

    * ``"off"``: every replica of a model in one batch (what fits in memory is the user's business).
    * ``"binning"``: TorchSim's ``BinningAutoBatcher`` packs the replicas into bins of at most
      ``max_atoms`` atoms that run one after another; a bin runs until its last replica fails or
      reaches the horizon, so it empties as replicas fail.
    * ``"in-flight"``: TorchSim's ``InFlightAutoBatcher`` keeps a batch of at most ``max_atoms`` atoms
      and refills it from the waiting replicas whenever replicas fail or finish, so the device stays full.

    ``max_atoms`` is TorchSim's ``max_memory_scaler`` with ``memory_scales_with="n_atoms"``: every replica
    is the same system, so its memory is proportional to its atom count. ``None`` lets TorchSim measure
    what the device holds (forward passes of growing batches until CUDA runs out of memory; CUDA only).
    """

    mode: str = "off"
    max_atoms: int | None = None

    def validate(self, n_atoms: int, device: torch.device, ensemble: str) -> None:
        if self.mode not in BATCHING_MODES:
            raise GGNDError(f"unknown batching '{self.mode}' (choose from {', '.join(BATCHING_MODES)})")
        if self.mode == "off":
            return
        if self.max_atoms is None:
            if torch.device(device).type != "cuda":
                raise GGNDError(
                    "autobatching on the CPU needs --max-batch-atoms: TorchSim measures what a device holds "
                    "only on CUDA"
                )
        else:
            v.check_value(v.positive_int, self.max_atoms, "max_batch_atoms")
            if self.max_atoms < n_atoms:
                raise GGNDError(
                    f"--max-batch-atoms {self.max_atoms} is smaller than one replica ({n_atoms} atoms)"
                )
        if self.mode == "in-flight" and ensemble == "nvt-nose-hoover":
            raise GGNDError(
                "in-flight autobatching does not run Nose-Hoover chains (TorchSim joins states with one "
                "global thermostat); use nve or nvt-langevin, or batching 'binning'"
            )


# ---------------------------------------------------------------------------------------------------
# Per-replica state
# ---------------------------------------------------------------------------------------------------

_ATOM_TENSORS = ("positions", "momenta", "forces", "masses", "atomic_numbers")
_SYSTEM_TENSORS = ("energy", "cell")
_CHAIN_TENSORS = ("positions", "momenta", "masses", "tau", "kinetic_energy", "degrees_of_freedom")


def _units():
    from torch_sim.units import MetalUnits

    return float(MetalUnits.time), float(MetalUnits.temperature)


def initial_momenta(atoms, temperature: float, seed: int) -> torch.Tensor:
    """Maxwell-Boltzmann momenta at ``temperature`` (zero total momentum) from the replica's own seed.

    Drawn in float64 on the CPU with a per-replica generator, so a replica's start does not depend on
    the batch it runs in, the device or the dtype.
    """
    from torch_sim.integrators.md import initialize_momenta

    _, kelvin = _units()
    positions = torch.as_tensor(atoms.get_positions(), dtype=torch.float64)
    masses = torch.as_tensor(atoms.get_masses(), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    kT = torch.tensor(temperature * kelvin, dtype=torch.float64)
    return initialize_momenta(positions, masses, torch.zeros(len(atoms), dtype=torch.long), kT, generator)


def noise_seed(replica_seed: int) -> int:
    """The seed of a replica's Langevin noise stream: derived from, and independent of, its velocity seed."""
    return int(np.random.SeedSequence(replica_seed, spawn_key=(1,)).generate_state(1, np.uint32)[0])


def _langevin_step(state, model, dt, kT, gamma, generators):
    """TorchSim's BAOAB Langevin step (``nvt_langevin_step``) with one noise stream per replica.

    TorchSim draws the O-step noise of the whole batch from one generator, so a replica's noise would
    depend on which replicas share its batch (and its rank); here replica k's noise comes from its own
    generator, in the same formula: p <- c1 p + sqrt(kT (1 - c1^2) m) R.
    """
    from torch_sim.integrators.md import momentum_step, position_step

    state = momentum_step(state, dt / 2)
    state = position_step(state, dt / 2)
    c1 = torch.exp(-gamma * dt)
    c2 = torch.sqrt(kT[state.system_idx] * (1 - torch.square(c1))).unsqueeze(-1)
    n_atoms = state.n_atoms // state.n_systems
    noise = torch.cat(
        [torch.randn((n_atoms, 3), generator=g, device=state.device, dtype=state.dtype) for g in generators]
    )
    state.set_constrained_momenta(
        c1.unsqueeze(-1) * state.momenta + c2 * torch.sqrt(state.masses).unsqueeze(-1) * noise
    )
    state = position_step(state, dt / 2)
    output = model(state)
    state.energy = output["energy"]
    state.forces = output["forces"]
    state.store_model_extras(output)
    return momentum_step(state, dt / 2)


class _Integrator:
    """TorchSim init/step functions with this protocol's units and per-system temperatures."""

    def __init__(self, protocol: StabilityProtocol, device, dtype):
        import torch_sim as ts

        time_unit, kelvin = _units()
        self.protocol = protocol
        self.kind = {
            "nve": ts.Integrator.nve,
            "nvt-langevin": ts.Integrator.nvt_langevin,
            "nvt-nose-hoover": ts.Integrator.nvt_nose_hoover,
        }[protocol.ensemble]
        self.init_fn, self.step_fn = ts.INTEGRATOR_REGISTRY[self.kind]
        self.dt = torch.tensor(protocol.dt_ps * time_unit, device=device, dtype=dtype)
        self.gamma = torch.tensor(protocol.friction_per_fs * 1000.0 / time_unit, device=device, dtype=dtype)
        self.tau = torch.tensor(protocol.nose_hoover_tau_fs * 1e-3 * time_unit, device=device, dtype=dtype)
        self.kelvin = kelvin
        self.stochastic = self.kind == "nvt_langevin"

    def kT(self, temperatures: torch.Tensor) -> torch.Tensor:
        return temperatures * self.kelvin

    def init(self, sim_state, model, temperatures: torch.Tensor, momenta: torch.Tensor):
        kT = self.kT(temperatures)
        if self.kind == "nvt_nose_hoover":
            return self.init_fn(sim_state, model, kT=kT, dt=self.dt, tau=self.tau, momenta=momenta)
        state = self.init_fn(sim_state, model, kT=kT)
        state.momenta = momenta
        return state

    def step(self, state, model, temperatures: torch.Tensor, generators=()):
        kT = self.kT(temperatures)
        if self.stochastic:
            return _langevin_step(state, model, self.dt, kT, self.gamma, generators)
        return self.step_fn(state, model, dt=self.dt, kT=kT)

    def chain_functions(self):
        from torch_sim.integrators.md import construct_nose_hoover_chain

        # the same arguments nvt_nose_hoover_init uses with its defaults (chain of 3, 3 substeps, SY 3)
        return construct_nose_hoover_chain(self.dt, 3, 3, 3, self.tau)


def _keep_systems(state, keep: torch.Tensor):
    """The state restricted to the systems ``keep``; Nose-Hoover chain variables are sliced too.

    TorchSim treats the chain as a global attribute, so its own slicing would keep every system's
    thermostat; each replica's chain must follow its replica.
    """
    n_before = state.n_systems
    kept = state[keep]
    chain = getattr(state, "chain", None)
    if chain is not None:
        from dataclasses import replace

        updates = {}
        for name in _CHAIN_TENSORS:
            value = getattr(chain, name)
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == n_before:
                updates[name] = value[keep].clone()
        kept.chain = replace(chain, **updates)
    return kept


def _replica_tensors(state, position: int, n_atoms: int) -> dict[str, Any]:
    """One replica's rows of a batched state, on the CPU (a checkpoint entry)."""
    rows = slice(position * n_atoms, (position + 1) * n_atoms)
    tensors = {name: getattr(state, name)[rows].detach().cpu().clone() for name in _ATOM_TENSORS}
    for name in _SYSTEM_TENSORS:
        tensors[name] = getattr(state, name)[position : position + 1].detach().cpu().clone()
    tensors["pbc"] = state.pbc.detach().cpu().clone()
    chain = getattr(state, "chain", None)
    if chain is not None:
        tensors["chain"] = {}
        for name in _CHAIN_TENSORS:
            value = getattr(chain, name)
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == state.n_systems:
                value = value[position : position + 1]
            tensors["chain"][name] = (
                value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value
            )
    return tensors


def _batch_from_tensors(replicas: Sequence[dict[str, Any]], integrator: _Integrator, device, dtype):
    """A batched state from per-replica tensors (:func:`_replica_tensors`), in the given order."""
    from torch_sim.integrators.md import MDState, NoseHooverChain
    from torch_sim.integrators.nvt import NVTNoseHooverState

    def to_device(value):
        if not isinstance(value, torch.Tensor):
            return value
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)

    n_atoms = replicas[0]["positions"].shape[0]
    attributes = {
        name: to_device(torch.cat([r[name] for r in replicas])) for name in (*_ATOM_TENSORS, *_SYSTEM_TENSORS)
    }
    attributes["pbc"] = to_device(replicas[0]["pbc"])
    attributes["system_idx"] = torch.arange(len(replicas), device=device).repeat_interleave(n_atoms)
    if "chain" not in replicas[0]:
        return MDState(**attributes)
    chain = {}
    for name in _CHAIN_TENSORS:
        first = replicas[0]["chain"][name]
        if isinstance(first, torch.Tensor) and first.ndim > 0 and first.shape[0] == 1:
            chain[name] = to_device(torch.cat([r["chain"][name] for r in replicas]))
        else:
            chain[name] = to_device(first)
    return NVTNoseHooverState(
        **attributes, chain=NoseHooverChain(**chain), _chain_fns=integrator.chain_functions()
    )


class _ReplicaMonitor:
    """The protocol's criterion with one step count per replica (a replica may join a batch late).

    Bonds need no memory. The RDF criterion keeps each replica's window of sampled g(r) and its sample
    count; a replica is sampled when its own step is a multiple of the sampling interval. When every
    replica of the batch is at the same step this is exactly :class:`~ggnd_plugin.md.metrics.RDFMonitor`.
    """

    def __init__(self, base, device, dtype):
        self.base = base
        self.kind = base.kind
        self.threshold = base.threshold
        self.device, self.dtype = device, dtype
        base.start(0, device, dtype)
        self.rdf = base.kind == "rdf"
        if self.rdf:
            self.buffer = torch.zeros(0, base.window_samples, base.n_bins, device=device, dtype=dtype)
            self.samples = np.zeros(0, dtype=np.int64)

    def describe(self) -> dict:
        return self.base.describe()

    def append(self, saved: Sequence[dict | None]) -> None:
        if not self.rdf or not saved:
            return
        shape = (self.base.window_samples, self.base.n_bins)
        rows = [
            torch.zeros(shape, device=self.device, dtype=self.dtype)
            if s is None
            else s["buffer"].to(self.device, self.dtype)
            for s in saved
        ]
        self.buffer = torch.cat([self.buffer, torch.stack(rows)])
        counts = [0 if s is None else int(s["samples"]) for s in saved]
        self.samples = np.concatenate([self.samples, np.asarray(counts, dtype=np.int64)])

    def keep(self, keep: torch.Tensor, keep_np: np.ndarray) -> None:
        if self.rdf:
            self.buffer = self.buffer[keep]
            self.samples = self.samples[keep_np]

    def saved(self, position: int) -> dict | None:
        if not self.rdf:
            return None
        return {
            "buffer": self.buffer[position].detach().cpu().clone(),
            "samples": int(self.samples[position]),
        }

    def update(self, steps: np.ndarray, positions: torch.Tensor, cell: torch.Tensor, rows: np.ndarray | None):
        """(deviation, decided) for the replicas ``rows`` of the batch (all when None) at their ``steps``."""
        from ggnd_plugin.md.metrics import rdf

        if not self.rdf:
            return self.base.update(0, positions, cell)
        base = self.base
        n = positions.shape[0]
        nothing = torch.full((n,), float("nan"), device=positions.device, dtype=positions.dtype)
        undecided = torch.zeros(n, dtype=torch.bool, device=positions.device)
        index = np.arange(len(self.samples)) if rows is None else np.asarray(rows)
        sampled = steps % base.every == 0
        if not sampled.any():
            return nothing, undecided
        target = index[sampled]
        slots = torch.as_tensor(self.samples[target] % base.window_samples, device=self.buffer.device)
        if sampled.all():
            values = rdf(positions, cell, base.r_max, base.n_bins)
        else:
            local = torch.as_tensor(np.nonzero(sampled)[0], device=positions.device)
            values = rdf(positions[local], cell[local], base.r_max, base.n_bins)
        self.buffer[torch.as_tensor(target, device=self.buffer.device), slots] = values
        self.samples[target] += 1
        decided = sampled & (self.samples[index] >= base.window_samples)
        if not decided.any():
            return nothing, undecided
        width = base.r_max / base.n_bins
        mean = self.buffer[torch.as_tensor(index, device=self.buffer.device)].mean(dim=1)
        distance = (mean - base.reference).abs().sum(dim=-1) * width
        decided_t = torch.as_tensor(decided, device=positions.device)
        return torch.where(decided_t, distance, nothing), decided_t


# ---------------------------------------------------------------------------------------------------
# Checkpoint entries
# ---------------------------------------------------------------------------------------------------


def _is_done(entry: dict | None) -> bool:
    return entry is not None and entry.get("status") == "done"


def _progress(entry: dict | None) -> float:
    """How far an entry got: done beats any step count, a newer step beats an older one."""
    if entry is None:
        return -1.0
    return math.inf if _is_done(entry) else float(entry["step"])


def checkpoint_name(model: str, rank: int | None = None, world_size: int | None = None) -> str:
    """``MODEL.pt`` for a single process, ``MODEL.rankR-of-N.pt`` for rank R of an N-rank job."""
    if rank is None or not world_size or world_size == 1:
        return f"{model}.pt"
    return f"{model}.rank{rank}-of-{world_size}.pt"


def checkpoint_files(checkpoint_dir: Path, model: str) -> list[Path]:
    """Every checkpoint of ``model`` in ``checkpoint_dir``: the single-process one and those of ranks."""
    import re

    pattern = re.compile(re.escape(model) + r"\.rank\d+-of-\d+\.pt")
    files = [checkpoint_dir / f"{model}.pt"] if (checkpoint_dir / f"{model}.pt").is_file() else []
    if checkpoint_dir.is_dir():
        files += sorted(p for p in checkpoint_dir.iterdir() if pattern.fullmatch(p.name))
    return files


def _read_checkpoints(
    checkpoint_dir: Path, name: str, protocol: StabilityProtocol, plan, monitor
) -> tuple[dict[int, dict], dict[Path, dict]]:
    """The newest entry of every replica of ``name`` over all its checkpoint files, and each file's entries."""
    merged: dict[int, dict] = {}
    by_file: dict[Path, dict] = {}
    for path in checkpoint_files(checkpoint_dir, name):
        payload = verified_torch_load(path, f"stability checkpoint of model '{name}'")
        _check_checkpoint(payload, name, protocol, plan, monitor, path)
        by_file[path] = payload["entries"]
        for index, entry in payload["entries"].items():
            if _progress(entry) > _progress(merged.get(index)):
                merged[index] = entry
    return merged, by_file


def _fresh_record() -> dict[str, Any]:
    return {"failed": False, "failure": None, "failure_step": None, "max_deviation": 0.0}


def _fresh_series() -> dict[str, list]:
    return {"time_ps": [], "max_deviation": [], "temperature_K": [], "total_energy_eV": []}


def _row(name: str, spec: ReplicaSpec, record: dict, protocol: StabilityProtocol) -> dict[str, Any]:
    step = record["failure_step"]
    maximum = record["max_deviation"]
    return {
        "model": name,
        "temperature_K": spec.temperature,
        "replica": spec.replica,
        "seed": spec.seed,
        "start_frame": spec.start_frame,
        "stability_ps": protocol.time_ps if step is None else round(step * protocol.dt_ps, 9),
        "failed": bool(record["failed"]),
        "failure": record["failure"],
        "failure_step": step,
        "max_deviation": maximum if math.isfinite(maximum) else None,
    }


def _series_key(name: str, spec: ReplicaSpec) -> str:
    return f"{name}/{spec.temperature:g}K/{spec.replica}"


class StopRequested(GGNDError):
    """The process was asked to stop (SIGTERM from torchrun or the scheduler); its checkpoint is saved."""


class UnfinishedReplicas(GGNDError):
    """Replicas that no process finished (a rank died or was stopped); ``--resume`` runs only those."""

    def __init__(self, message: str, replicas: list[dict[str, Any]]):
        super().__init__(message)
        self.replicas = replicas


# ---------------------------------------------------------------------------------------------------
# The loop for one model
# ---------------------------------------------------------------------------------------------------


class _ModelRun:
    """Replicas of one model: batches, per-replica records and windows, checkpointing.

    ``plan`` is the model's whole plan (checkpoints record it); ``indices`` the plan entries this
    process runs (all by default; a rank's shard under torchrun). ``carry`` holds entries of this
    process's checkpoint file that it does not run now: they are written back unchanged, so a
    resume with another number of ranks never drops a replica's progress.
    """

    def __init__(
        self,
        name,
        model,
        plan,
        frames_for,
        monitor,
        protocol,
        checkpoint,
        progress,
        batching: Batching | None = None,
        indices: Sequence[int] | None = None,
        carry: Mapping[int, dict] | None = None,
        should_stop=None,
    ):
        self.name = name
        self.model = model
        self.plan = plan
        self.frames_for = frames_for
        self.protocol = protocol
        self.checkpoint = checkpoint
        self.progress = progress
        self.batching = batching or Batching()
        self.indices = list(range(len(plan))) if indices is None else list(indices)
        self.carry = dict(carry or {})
        self.should_stop = should_stop
        self.device = model.device
        self.dtype = model.dtype
        self.integrator = _Integrator(protocol, self.device, self.dtype)
        self.n_atoms = len(frames_for(plan[0]))
        self.monitor = _ReplicaMonitor(monitor, self.device, self.dtype)
        self.step = 0  # iterations of this process (every active replica advances one step per iteration)
        self.replica_steps = 0
        self.records = [_fresh_record() for _ in plan]
        self.series = [_fresh_series() for _ in plan]
        self.steps = np.zeros(len(plan), dtype=np.int64)
        self.done = np.zeros(len(plan), dtype=bool)
        self.saved: dict[int, dict] = {}  # restored entries of replicas not yet back in a batch
        self.generators: dict[int, torch.Generator] = {}
        self.active: list[int] = []
        self.state = None
        self._bar = None

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        """A fresh run of this process's replicas (the run itself happens in :meth:`run`)."""
        for index in self.indices:
            self.records[index], self.series[index] = _fresh_record(), _fresh_series()
            self.steps[index], self.done[index] = 0, False
        self.saved.clear()

    def restore(self, entries: Mapping[int, dict]) -> None:
        """Continue from checkpoint entries (plan index -> newest entry); missing ones start afresh."""
        self.start()
        for index in self.indices:
            entry = entries.get(index)
            if entry is None:
                continue
            self.records[index] = dict(entry["record"])
            self.series[index] = {name: np.asarray(v).tolist() for name, v in entry["series"].items()}
            self.steps[index] = entry["step"]
            if _is_done(entry):
                self.done[index] = True
            else:
                self.saved[index] = entry

    @property
    def pending(self) -> list[int]:
        return [i for i in self.indices if not self.done[i]]

    def run(self) -> None:
        from tqdm.auto import tqdm

        pending = self.pending
        restored = [i for i in pending if i in self.saved]
        fresh = [i for i in pending if i not in self.saved]
        n_steps = self.protocol.n_steps
        self._bar = tqdm(
            total=len(self.indices) * n_steps,
            initial=int(sum(n_steps if self.done[i] else self.steps[i] for i in self.indices)),
            desc=self.name,
            unit="replica-step",
            unit_scale=True,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            if self.batching.mode == "in-flight":
                if pending:
                    self._run_in_flight(restored + fresh)
            else:
                groups = []
                for members in (restored, fresh):
                    if members:
                        groups += self._bins(members) if self.batching.mode == "binning" else [members]
                for group in groups:
                    self._run_group(group)
            self._bar.set_postfix(
                failed=f"{sum(self.records[i]['failed'] for i in self.indices)}", refresh=False
            )
        finally:
            self._bar.close()
        self.save(finished=True)

    # -- batches ----------------------------------------------------------------------------------------
    def _placeholder(self, index: int):
        """A replica not yet started, as TorchSim state with its momenta (forces computed on admission)."""
        import torch_sim as ts
        from torch_sim.integrators.md import MDState

        spec = self.plan[index]
        atoms = self.frames_for(spec).copy()
        atoms.calc = None
        state = ts.io.atoms_to_state([atoms], device=self.device, dtype=self.dtype)
        momenta = initial_momenta(atoms, spec.temperature, spec.seed).to(self.device, self.dtype)
        zeros = torch.zeros(1, device=self.device, dtype=self.dtype)
        return MDState.from_state(state, momenta=momenta, energy=zeros, forces=torch.zeros_like(momenta))

    def _single_states(self, order: Sequence[int]):
        for index in order:
            if index in self.saved:
                yield _batch_from_tensors(
                    [self.saved[index]["state"]], self.integrator, self.device, self.dtype
                )
            else:
                yield self._placeholder(index)

    def _bins(self, members: list[int]) -> list[list[int]]:
        import torch_sim as ts
        from torch_sim.autobatching import BinningAutoBatcher

        batcher = BinningAutoBatcher(
            self.model, memory_scales_with="n_atoms", max_memory_scaler=self.batching.max_atoms
        )
        batcher.load_states(ts.concatenate_states(list(self._single_states(members))))
        return [[members[k] for k in sorted(bin_)] for bin_ in batcher.index_bins]

    def _run_group(self, group: list[int]) -> None:
        """One fixed batch, run until every replica in it has failed or reached the horizon."""
        import torch_sim as ts

        if group[0] in self.saved:
            state = _batch_from_tensors(
                [self.saved[i]["state"] for i in group], self.integrator, self.device, self.dtype
            )
            leaving = self._activate(group, state)
        else:
            atoms = [self.frames_for(self.plan[i]).copy() for i in group]
            for item in atoms:
                item.calc = None
            sim_state = ts.io.atoms_to_state(atoms, device=self.device, dtype=self.dtype)
            momenta = torch.cat(
                [
                    initial_momenta(a, self.plan[i].temperature, self.plan[i].seed)
                    for a, i in zip(atoms, group, strict=True)
                ]
            )
            temperatures = torch.tensor(
                [self.plan[i].temperature for i in group], device=self.device, dtype=self.dtype
            )
            state = self.integrator.init(
                sim_state, self.model, temperatures, momenta.to(self.device, self.dtype)
            )
            leaving = self._activate(group, state, evaluated=True)
        if leaving.any():
            self._drop(leaving)
        while self.active:
            leaving = self._advance()
            if leaving.any():
                self._drop(leaving)
            self._after_step()

    def _run_in_flight(self, order: list[int]) -> None:
        from torch_sim.autobatching import InFlightAutoBatcher

        batcher = InFlightAutoBatcher(
            self.model, memory_scales_with="n_atoms", max_memory_scaler=self.batching.max_atoms
        )
        batcher.load_states(self._single_states(order))
        state, _ = batcher.next_batch(None, None)
        leaving = self._activate([order[k] for k in batcher.current_idx], state)
        while True:
            while leaving.any():
                keep = ~leaving
                state, _ = batcher.next_batch(self.state, torch.as_tensor(leaving, device=self.device))
                self._keep_arrays(keep)
                if state is None:
                    self.state = None
                    return
                kept = len(self.active)
                newcomers = [order[k] for k in batcher.current_idx[kept:]]
                # the bookkeeping here follows the batcher's order (kept systems, then new ones); a
                # TorchSim version that reorders would silently mix up replicas
                if [order[k] for k in batcher.current_idx[:kept]] != self.active:
                    raise RuntimeError("TorchSim's InFlightAutoBatcher reordered the batch")
                leaving = self._activate(newcomers, state)
            if not self.active:
                return
            leaving = self._advance()
            self._after_step()

    def _activate(self, members: list[int], state, evaluated: bool = False) -> np.ndarray:
        """Append ``members`` (the last systems of ``state``) to the batch; returns the replicas that fail
        their start check, as a mask over the whole batch.

        Restored members bring their windows and noise streams; new ones start them, get their forces
        (unless ``evaluated``: the integrator's init computed them) and are checked at step 0.
        """
        first = len(self.active)
        n = first + len(members)
        if state.n_atoms != n * self.n_atoms:  # per-replica rows are sliced by position below
            raise RuntimeError(f"batch of {state.n_systems} systems holds {state.n_atoms} atoms")
        self.state = state
        fresh = [p for p, i in enumerate(members, start=first) if i not in self.saved]
        if fresh and not evaluated:
            rows = torch.as_tensor(fresh, device=self.device)
            output = self.model(state[rows])
            atoms = torch.isin(state.system_idx, rows)
            state.energy[rows] = output["energy"].detach().to(state.energy.dtype)
            state.forces[atoms] = output["forces"].detach().to(state.forces.dtype)
        saved = [self.saved.pop(i, None) for i in members]
        self.monitor.append([None if s is None else s["monitor"] for s in saved])
        accumulators = {"run_max": [], "window_max": [], "window_temperature": [], "window_energy": []}
        counts = []
        for index, entry in zip(members, saved, strict=True):
            if entry is None:
                values = {
                    "run_max": 0.0,
                    "window_max": math.nan,
                    "window_temperature": 0.0,
                    "window_energy": 0.0,
                }
                counts.append(0)
            else:
                values = entry["accumulators"]
                counts.append(int(values["window_count"]))
            for key in accumulators:
                accumulators[key].append(float(values[key]))
            if self.integrator.stochastic:
                generator = torch.Generator(device=self.device)
                if entry is None:
                    generator.manual_seed(noise_seed(self.plan[index].seed))
                else:
                    generator.set_state(entry["rng"])
                self.generators[index] = generator
        for key, values in accumulators.items():
            new = torch.tensor(values, device=self.device, dtype=self.dtype)
            setattr(self, key, new if first == 0 else torch.cat([getattr(self, key), new]))
        self.window_count = np.concatenate([self.window_count, counts]) if first else np.asarray(counts)
        self.active = self.active + list(members)
        self.active_steps = self.steps[self.active].copy()
        self._temperatures()
        leaving = np.zeros(n, dtype=bool)
        if fresh:
            failed, finite = self._check(np.asarray(fresh), initial=True)
            failed = failed.cpu().numpy()
            if failed.any():
                where = np.asarray(fresh)[failed]
                self._fail(where, finite.cpu().numpy()[failed])
                leaving[where] = True
        return leaving

    def _temperatures(self) -> None:
        self.temperatures = torch.tensor(
            [self.plan[i].temperature for i in self.active], device=self.device, dtype=self.dtype
        )

    def _keep_arrays(self, keep: np.ndarray) -> None:
        keep_t = torch.as_tensor(np.nonzero(keep)[0], device=self.device)
        for index in np.asarray(self.active)[~keep]:
            self.generators.pop(int(index), None)
        self.active = [i for i, k in zip(self.active, keep, strict=True) if k]
        self.active_steps = self.active_steps[keep]
        self.window_count = self.window_count[keep]
        for key in ("run_max", "window_max", "window_temperature", "window_energy"):
            setattr(self, key, getattr(self, key)[keep_t])
        self.monitor.keep(keep_t, keep)
        self._temperatures()

    def _drop(self, leaving: np.ndarray) -> None:
        keep = ~leaving
        if keep.any():
            self.state = _keep_systems(self.state, torch.as_tensor(np.nonzero(keep)[0], device=self.device))
        else:
            self.state = None
        self._keep_arrays(keep)

    # -- per step ---------------------------------------------------------------------------------------
    def _per_system_finite(self, rows: torch.Tensor | None) -> torch.Tensor:
        state = self.state
        n = state.n_systems

        def per_system(tensor):
            values = torch.isfinite(tensor).reshape(n, -1).all(dim=1)
            return values if rows is None else values[rows]

        finite = per_system(state.positions) & per_system(state.momenta) & per_system(state.forces)
        energy = torch.isfinite(state.energy)
        return finite & (energy if rows is None else energy[rows])

    def _check(self, rows: np.ndarray | None = None, initial: bool = False):
        """Criterion and finiteness for the batch (or its ``rows``): (failed, finite) on the device."""
        import torch_sim as ts

        state = self.state
        n = len(self.active)
        positions = state.positions.reshape(n, self.n_atoms, 3)
        cell = state.row_vector_cell
        rows_t = None if rows is None else torch.as_tensor(rows, device=self.device)
        if rows_t is not None:
            positions, cell = positions[rows_t], cell[rows_t]
        steps = self.active_steps if rows is None else self.active_steps[rows]
        deviation, decided = self.monitor.update(steps, positions, cell, rows)
        finite = self._per_system_finite(rows_t)
        deviation = torch.where(finite, deviation, torch.full_like(deviation, float("inf")))
        failed = ~finite | (decided & (deviation > self.monitor.threshold))
        if rows_t is None:
            self.run_max = torch.fmax(self.run_max, deviation)
        else:
            self.run_max[rows_t] = torch.fmax(self.run_max[rows_t], deviation)
        if not initial:  # only whole-batch checks accumulate windows
            self.window_max = torch.fmax(self.window_max, deviation)
            kinetic = ts.calc_kinetic_energy(
                masses=state.masses, momenta=state.momenta, system_idx=state.system_idx
            )
            self.window_temperature += state.calc_temperature()
            self.window_energy += state.energy + kinetic
            self.window_count += 1
        return failed, finite

    def _flush(self, positions: np.ndarray) -> None:
        """Append the current window of the replicas at ``positions`` to their time series."""
        positions = [int(p) for p in positions if self.window_count[p] > 0]
        if not positions:
            return
        index = torch.as_tensor(positions, device=self.device)
        counts = torch.as_tensor(self.window_count[positions], device=self.device, dtype=self.dtype)
        maxima = self.window_max[index].detach().cpu().tolist()
        temperatures = (self.window_temperature[index] / counts).detach().cpu().tolist()
        energies = (self.window_energy[index] / counts).detach().cpu().tolist()
        for k, position in enumerate(positions):
            series = self.series[self.active[position]]
            series["time_ps"].append(int(self.active_steps[position]) * self.protocol.dt_ps)
            series["max_deviation"].append(maxima[k])
            series["temperature_K"].append(temperatures[k])
            series["total_energy_eV"].append(energies[k])

    def _reset_windows(self, positions: np.ndarray) -> None:
        index = torch.as_tensor(positions, device=self.device)
        self.window_max[index] = float("nan")
        self.window_temperature[index] = 0.0
        self.window_energy[index] = 0.0
        self.window_count[positions] = 0

    def _fail(self, positions: np.ndarray, finite: np.ndarray) -> None:
        self._flush(positions)
        run_max = self.run_max.detach().cpu().tolist()
        for position, is_finite in zip(positions, finite, strict=True):
            index = self.active[int(position)]
            self.records[index].update(
                failed=True,
                failure=self.monitor.kind if is_finite else "non-finite",
                failure_step=int(self.active_steps[position]),
                max_deviation=run_max[int(position)],
            )
            self.steps[index] = self.active_steps[position]
            self.done[index] = True
            self._bar.update(self.protocol.n_steps - int(self.active_steps[position]))

    def _finish(self, positions: np.ndarray) -> None:
        self._flush(positions)
        run_max = self.run_max.detach().cpu().tolist()
        for position in positions:
            index = self.active[int(position)]
            self.records[index]["max_deviation"] = run_max[int(position)]
            self.steps[index] = self.active_steps[position]
            self.done[index] = True

    def _advance(self) -> np.ndarray:
        """One step of every replica in the batch; returns the mask of those that leave it."""
        generators = [self.generators[i] for i in self.active] if self.integrator.stochastic else ()
        self.state = self.integrator.step(self.state, self.model, self.temperatures, generators)
        n = len(self.active)
        self.step += 1
        self.replica_steps += n
        self.active_steps += 1
        self._bar.update(n)
        failed, finite = self._check()
        leaving = np.zeros(n, dtype=bool)
        if bool(failed.any()):  # the one host sync per step
            failed_np = failed.cpu().numpy()
            where = np.nonzero(failed_np)[0]
            self._fail(where, finite.cpu().numpy()[where])
            leaving |= failed_np
        due = (self.active_steps % self.protocol.record_every_steps == 0) & ~leaving
        if due.any():
            where = np.nonzero(due)[0]
            self._flush(where)
            self._reset_windows(where)
        finished = (self.active_steps >= self.protocol.n_steps) & ~leaving
        if finished.any():
            self._finish(np.nonzero(finished)[0])
            leaving |= finished
        self.steps[self.active] = self.active_steps
        return leaving

    def _after_step(self) -> None:
        if self.step % self.protocol.checkpoint_every_steps == 0:
            self.save(finished=False)
        if self.should_stop is not None and self.should_stop():
            self.save(finished=False)
            raise StopRequested(f"stopped by a signal at step {self.step} of model '{self.name}'")

    # -- checkpoints ------------------------------------------------------------------------------------
    def _entry(self, index: int, positions: Mapping[int, int]) -> dict | None:
        if index in self.saved:
            return self.saved[index]
        series = {name: np.asarray(values, dtype=float) for name, values in self.series[index].items()}
        if self.done[index]:
            return {
                "status": "done",
                "step": int(self.steps[index]),
                "record": dict(self.records[index]),
                "series": series,
            }
        position = positions.get(index)
        if position is None:
            return None  # not started: runs from its seed
        generator = self.generators.get(index)
        return {
            "status": "active",
            "step": int(self.active_steps[position]),
            "record": dict(self.records[index]),
            "series": series,
            "state": _replica_tensors(self.state, position, self.n_atoms),
            "rng": None if generator is None else generator.get_state(),
            "monitor": self.monitor.saved(position),
            "accumulators": {
                "run_max": float(self.run_max[position]),
                "window_max": float(self.window_max[position]),
                "window_temperature": float(self.window_temperature[position]),
                "window_energy": float(self.window_energy[position]),
                "window_count": int(self.window_count[position]),
            },
        }

    def save(self, finished: bool) -> None:
        if self.checkpoint is None:
            return
        positions = {index: position for position, index in enumerate(self.active)}
        entries = dict(self.carry)
        for index in self.indices:
            entry = self._entry(index, positions)
            if entry is not None:
                entries[index] = entry
        payload = {
            "version": CHECKPOINT_VERSION,
            "model": self.name,
            "protocol": self.protocol.to_dict(),
            "plan": [asdict(spec) for spec in self.plan],
            "monitor_description": self.monitor.describe(),
            "step": self.step,
            "finished": bool(finished and all(self.done[i] for i in self.indices)),
            "owned": list(self.indices),
            "entries": entries,
        }
        atomic_torch_save(payload, self.checkpoint)

    # -- results ----------------------------------------------------------------------------------------
    def rows(self) -> list[dict[str, Any]]:
        return [_row(self.name, self.plan[i], self.records[i], self.protocol) for i in self.indices]

    def series_arrays(self) -> dict[str, dict[str, np.ndarray]]:
        return {
            _series_key(self.name, self.plan[i]): {
                name: np.asarray(values, dtype=float) for name, values in self.series[i].items()
            }
            for i in self.indices
        }


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------


def _frames_by_temperature(start_frames, temperatures) -> dict[float, list]:
    if isinstance(start_frames, Mapping):
        missing = [t for t in temperatures if t not in start_frames]
        if missing:
            raise GGNDError(f"no start frames given for temperature(s) {missing}")
        for temperature in temperatures:
            v.check_frames(start_frames[temperature], f"start frames for {temperature:g} K")
        return {t: list(start_frames[t]) for t in temperatures}
    v.check_frames(start_frames, "start frames")
    return {t: list(start_frames) for t in temperatures}


def _check_checkpoint(
    payload: dict, name: str, protocol: StabilityProtocol, plan, monitor, path: Path
) -> None:
    if not isinstance(payload, dict) or not {"model", "protocol", "plan", "finished"} <= set(payload):
        raise GGNDError(f"{path}: not a stability checkpoint of ggnd-plugin; it was not loaded")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise GGNDError(
            f"{path}: checkpoint version {payload.get('version')} is not {CHECKPOINT_VERSION} (written by "
            "another ggnd-plugin version); start again with --overwrite or choose another --out"
        )
    if payload["model"] != name:
        raise GGNDError(f"{path}: checkpoint belongs to model '{payload['model']}', not '{name}'")
    saved = payload["protocol"]
    now = protocol.to_dict()
    changed = [key for key in now if saved.get(key) != now[key]]
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)} -> {now[key]}" for key in changed)
        raise GGNDError(f"{path}: cannot resume with a different protocol ({details})")
    if payload["plan"] != [asdict(spec) for spec in plan]:
        raise GGNDError(
            f"{path}: cannot resume: the start frames or replica seeds differ from the stopped run"
        )
    if payload["monitor_description"] != monitor.describe():
        raise GGNDError(f"{path}: cannot resume: the reference (bonds or RDF) differs from the stopped run")


def run_stability(
    models: Mapping[str, Any],
    start_frames,
    reference_frames: Sequence,
    protocol: StabilityProtocol,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    sources: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    batching: Batching | None = None,
    ranks=None,
) -> StabilityResult | None:
    """Run the stability protocol for each TorchSim model.

    Args:
        models: name -> ``torch_sim.models.interface.ModelInterface`` (device and dtype taken from it).
        start_frames: ASE Atoms to draw start frames from, or {temperature: frames}.
        reference_frames: ASE Atoms defining bonds and equilibrium lengths (or the reference RDF).
        protocol: the :class:`StabilityProtocol`.
        out_dir: where checkpoints go (``out_dir/checkpoints/<model>.pt``, one file per rank under
            torchrun); None: no checkpoints. The folder is locked for the run (a second run into it
            stops at once).
        resume: continue from the checkpoints in ``out_dir``: finished replicas are not re-run, the
            others continue from their newest entry. Each checkpoint is verified (CRC of every record)
            before it is loaded.
        progress: show a progress bar per model.
        sources: extra provenance (file names) copied into the protocol record.
        overwrite: start again over the checkpoints of an earlier run in ``out_dir``.
        batching: how replicas are grouped into batches (:class:`Batching`; default: one batch per model).
        ranks: a :class:`ggnd_plugin.distributed.Ranks` of a torchrun job: this process runs its
            shard of every model's replicas, and rank 0 gathers every rank's checkpoints into the result
            (other ranks return None). Needs ``out_dir`` on a file system all ranks share.

    Returns:
        :class:`StabilityResult` with the protocol record, one row per replica and the windowed time
        series (max deviation, temperature, total energy) per replica.

    Raises:
        UnfinishedReplicas: (rank 0) some replicas were not finished because a rank died or was stopped.
    """
    protocol.validate()
    if not models:
        raise GGNDError("no models to run")
    v.check_frames(reference_frames, "reference frames")
    batching = batching or Batching()
    if ranks is not None and ranks.world_size > 1 and out_dir is None:
        raise GGNDError("a run sharded over ranks needs out_dir: the ranks exchange results through it")
    if out_dir is None:
        return _run_stability(
            models, start_frames, reference_frames, protocol, None, False, progress, sources, batching, None
        )
    main = ranks is None or ranks.rank == 0
    lock = output_lock(Path(out_dir)) if main else contextlib.nullcontext()
    with lock:
        if overwrite and not resume and main:
            for stale in (Path(out_dir) / "checkpoints").glob("*.pt"):
                stale.unlink()
        return _run_stability(
            models,
            start_frames,
            reference_frames,
            protocol,
            out_dir,
            resume,
            progress,
            sources,
            batching,
            ranks,
        )


def _run_stability(
    models, start_frames, reference_frames, protocol, out_dir, resume, progress, sources, batching, ranks
):
    import time

    by_temperature = _frames_by_temperature(start_frames, protocol.temperatures)
    first_start = next(iter(by_temperature.values()))[0]
    for temperature, frames in by_temperature.items():
        for index, atoms in enumerate(frames):
            if (
                len(atoms) != len(first_start)
                or (atoms.get_atomic_numbers() != first_start.get_atomic_numbers()).any()
            ):
                raise GGNDError(
                    f"start frame {index} for {temperature:g} K ({atoms.get_chemical_formula()}) is not the same "
                    f"system in the same atom order as the first start frame ({first_start.get_chemical_formula()})"
                )
    plan = plan_replicas(protocol, {t: len(f) for t, f in by_temperature.items()})
    sample = next(iter(models.values()))
    batching.validate(len(first_start), sample.device, protocol.ensemble)

    def frames_for(spec: ReplicaSpec):
        return by_temperature[spec.temperature][spec.start_frame]

    checkpoint_dir = Path(out_dir) / "checkpoints" if out_dir is not None else None

    def refuse_an_earlier_run():
        if (
            checkpoint_dir is not None
            and not resume
            and checkpoint_dir.exists()
            and any(checkpoint_dir.glob("*.pt"))
        ):
            raise GGNDError(
                f"{out_dir} holds checkpoints of an earlier run: pass --resume to continue it or choose another --out"
            )

    if ranks is None:
        refuse_an_earlier_run()
    else:
        ranks.agree(refuse_an_earlier_run)  # decided by rank 0 before any rank writes
    rank, world_size = (None, None) if ranks is None else (ranks.rank, ranks.world_size)
    stop = None if ranks is None else ranks.should_stop

    started = time.perf_counter()
    runs: list[_ModelRun] = []
    monitor_record = None
    offset = 0
    stopped = None
    for name, model in models.items():
        monitor = build_monitor(protocol, reference_frames, first_start)
        monitor_record = monitor.describe()
        own = checkpoint_dir / checkpoint_name(name, rank, world_size) if checkpoint_dir is not None else None
        entries: dict[int, dict] = {}
        carry: dict[int, dict] = {}
        if resume and checkpoint_dir is not None:
            entries, by_file = _read_checkpoints(checkpoint_dir, name, protocol, plan, monitor)
            carry = dict(by_file.get(own, {}))
        unfinished = [i for i in range(len(plan)) if not _is_done(entries.get(i))]
        assignment = {i: (offset + k) % (world_size or 1) for k, i in enumerate(unfinished)}
        offset += len(unfinished)
        indices = (
            list(range(len(plan))) if ranks is None else [i for i in unfinished if assignment[i] == rank]
        )
        carry = {i: e for i, e in carry.items() if i not in indices}
        run = _ModelRun(
            name, model, plan, frames_for, monitor, protocol, own, progress, batching, indices, carry, stop
        )
        run.assignment = assignment
        run.restore(entries)
        runs.append(run)
        if stopped is not None or not run.pending:
            continue
        try:
            run.run()
        except StopRequested as error:
            if ranks is None:
                raise
            stopped = error

    record = {
        **protocol.to_dict(),
        "monitor": monitor_record,
        "integrator": {
            "nve": "velocity Verlet (torch_sim nve_step)",
            "nvt-langevin": "Langevin BAOAB (torch_sim B and A steps, one noise stream per replica)",
            "nvt-nose-hoover": "Nose-Hoover chain, length 3 (torch_sim nvt_nose_hoover_step)",
        }[protocol.ensemble],
        "n_atoms": len(first_start),
        "formula": first_start.get_chemical_formula(),
        "device": str(sample.device.type if ranks is not None else sample.device),
        "dtype": str(sample.dtype).replace("torch.", ""),
        "versions": package_versions(),
        **dict(sources or {}),
    }
    execution = {
        "ranks": 1 if ranks is None else ranks.world_size,
        "batching": batching.mode,
        "max_batch_atoms": batching.max_atoms,
        "seconds": time.perf_counter() - started,
        "replica_steps": sum(run.replica_steps for run in runs),
    }
    if ranks is None:
        rows = [row for run in runs for row in run.rows()]
        series = {key: value for run in runs for key, value in run.series_arrays().items()}
        return StabilityResult(protocol=record, rows=rows, series=series, execution=execution)

    everyone = stopped is None and ranks.barrier()
    if ranks.rank != 0:
        if stopped is not None:
            raise stopped
        return None
    return _gather(runs, plan, protocol, checkpoint_dir, ranks, record, execution, everyone)


def _gather(runs, plan, protocol, checkpoint_dir, ranks, record, execution, everyone):
    """Rank 0: every replica's newest entry over all checkpoint files, as the single-process result."""
    rows, series, unfinished = [], {}, []
    for run in runs:
        monitor = run.monitor.base
        entries, _ = _read_checkpoints(checkpoint_dir, run.name, protocol, plan, monitor)
        for k, spec in enumerate(plan):
            entry = entries.get(k)
            if not _is_done(entry):
                unfinished.append(
                    {
                        "model": run.name,
                        "temperature_K": spec.temperature,
                        "replica": spec.replica,
                        "rank": run.assignment.get(k),
                        "step": 0 if entry is None else int(entry["step"]),
                        "of_steps": protocol.n_steps,
                    }
                )
                continue
            rows.append(_row(run.name, spec, entry["record"], protocol))
            series[_series_key(run.name, spec)] = {
                n: np.asarray(x, dtype=float) for n, x in entry["series"].items()
            }
    if unfinished:
        holders = sorted({item["rank"] for item in unfinished if item["rank"] is not None})
        reason = "" if everyone else " (a rank died or was stopped before the end)"
        raise UnfinishedReplicas(
            f"{len(unfinished)} of {len(plan) * len(runs)} replicas did not finish{reason}; they were run by "
            f"rank(s) {', '.join(map(str, holders)) or '?'} of {ranks.world_size}. Run the same command with "
            "--resume to finish only those",
            unfinished,
        )
    return StabilityResult(protocol=record, rows=rows, series=series, execution=execution)
