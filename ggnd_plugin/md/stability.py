"""Many-replica MD stability runs on TorchSim (protocol of docs/stability.md, paper section 4.1).

For each model, every replica at every temperature runs in ONE batched TorchSim state with per-system
temperatures. The loop is built on TorchSim's integrator init/step functions (``ts.integrate`` cannot
stop one system early): after each step the instability criterion is evaluated on the device for all
replicas at once, a failed replica (criterion exceeded, or a non-finite position, momentum, energy or
force) is recorded with its exact failure step and removed from the batch, so no compute is spent on
it and it cannot disturb the others. A checkpoint (state tensors, RNG state, per-replica records) is
written atomically every few hundred steps; ``resume=True`` continues a stopped run bit for bit.

Replicas are seeded from (seed, temperature, replica index) only, never from the model, so two models
run with the same protocol start from the same frames with the same velocities (a paired comparison).
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError
from ggnd_plugin.safe_io import atomic_torch_save, output_lock, verified_torch_load

ENSEMBLES = ("nve", "nvt-langevin", "nvt-nose-hoover")
CRITERIA = ("auto", "bonds", "rdf")
BOND_RULES = ("reference", "natural")
CHECKPOINT_VERSION = 1


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
    versions = {}
    for name in (
        "ggnd-plugin",
        "torch",
        "torch-sim-atomistic",
        "ase",
        "numpy",
        "e3nn",
        "mace-torch",
        "nequip",
        "schnetpack",
    ):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# ---------------------------------------------------------------------------------------------------
# Batched state handling
# ---------------------------------------------------------------------------------------------------

_STATE_TENSORS = (
    "positions",
    "momenta",
    "energy",
    "forces",
    "masses",
    "cell",
    "pbc",
    "atomic_numbers",
    "system_idx",
)
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

    def kT(self, temperatures: torch.Tensor) -> torch.Tensor:
        return temperatures * self.kelvin

    def init(self, sim_state, model, temperatures: torch.Tensor, momenta: torch.Tensor):
        kT = self.kT(temperatures)
        if self.kind == "nvt_nose_hoover":
            return self.init_fn(sim_state, model, kT=kT, dt=self.dt, tau=self.tau, momenta=momenta)
        state = self.init_fn(sim_state, model, kT=kT)
        state.momenta = momenta
        return state

    def step(self, state, model, temperatures: torch.Tensor):
        kT = self.kT(temperatures)
        if self.kind == "nvt_langevin":
            return self.step_fn(state, model, dt=self.dt, kT=kT, gamma=self.gamma)
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


def _state_tensors(state) -> dict[str, Any]:
    tensors = {name: getattr(state, name).detach().cpu().clone() for name in _STATE_TENSORS}
    chain = getattr(state, "chain", None)
    if chain is not None:
        tensors["chain"] = {
            name: (value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value)
            for name in _CHAIN_TENSORS
            for value in [getattr(chain, name)]
        }
    return tensors


def _restore_state(tensors: dict[str, Any], integrator: _Integrator, rng_state: torch.Tensor, device, dtype):
    from torch_sim.integrators.md import MDState, NoseHooverChain
    from torch_sim.integrators.nvt import NVTNoseHooverState

    def to_device(value):
        if not isinstance(value, torch.Tensor):
            return value
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)

    attributes = {name: to_device(tensors[name]) for name in _STATE_TENSORS}
    if "chain" in tensors:
        chain = NoseHooverChain(**{name: to_device(value) for name, value in tensors["chain"].items()})
        state = NVTNoseHooverState(**attributes, chain=chain, _chain_fns=integrator.chain_functions())
    else:
        state = MDState(**attributes)
    generator = torch.Generator(device=device)
    generator.set_state(rng_state)
    state.rng = generator
    return state


# ---------------------------------------------------------------------------------------------------
# The loop for one model
# ---------------------------------------------------------------------------------------------------


class _ModelRun:
    """One model's batched run: state, per-replica records, window accumulators, checkpointing."""

    def __init__(self, name, model, plan, frames_for, monitor, protocol, checkpoint, progress):
        self.name = name
        self.model = model
        self.plan = plan
        self.frames_for = frames_for
        self.monitor = monitor
        self.protocol = protocol
        self.checkpoint = checkpoint
        self.progress = progress
        self.device = model.device
        self.dtype = model.dtype
        self.integrator = _Integrator(protocol, self.device, self.dtype)
        self.n_atoms = len(frames_for(plan[0]))

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        import torch_sim as ts

        atoms = [self.frames_for(spec).copy() for spec in self.plan]
        for item in atoms:
            item.calc = None
        sim_state = ts.io.atoms_to_state(atoms, device=self.device, dtype=self.dtype)
        sim_state.rng = self.protocol.seed  # the Langevin noise stream
        momenta = torch.cat(
            [initial_momenta(a, s.temperature, s.seed) for a, s in zip(atoms, self.plan, strict=True)]
        )
        temperatures = torch.tensor([s.temperature for s in self.plan], device=self.device, dtype=self.dtype)
        self.state = self.integrator.init(
            sim_state, self.model, temperatures, momenta.to(self.device, self.dtype)
        )
        self.step = 0
        self.active = list(range(len(self.plan)))
        self.records = [
            {"failed": False, "failure": None, "failure_step": None, "max_deviation": 0.0} for _ in self.plan
        ]
        self.series = [
            {"time_ps": [], "max_deviation": [], "temperature_K": [], "total_energy_eV": []}
            for _ in self.plan
        ]
        self.monitor.start(len(self.plan), self.device, self.dtype)
        self._reset_window(len(self.plan))
        self.run_max = torch.zeros(len(self.plan), device=self.device, dtype=self.dtype)
        # step 0 is judged too: a start frame that already breaks the criterion scores 0 ps
        self._check(initial=True)

    def restore(self, payload: dict) -> None:
        self.step = payload["step"]
        self.active = list(payload["active"])
        self.records = payload["records"]
        self.series = [{name: values.tolist() for name, values in s.items()} for s in payload["series"]]
        n_active = len(self.active)
        self.monitor.start(n_active, self.device, self.dtype)
        if n_active and not payload["finished"]:
            self.state = _restore_state(
                payload["state"], self.integrator, payload["rng"], self.device, self.dtype
            )
            self.monitor.load_state_dict(payload["monitor"])
            self.run_max = payload["run_max"].to(self.device, self.dtype)
        self._reset_window(n_active)

    def save(self, finished: bool) -> None:
        if self.checkpoint is None:
            return
        payload = {
            "version": CHECKPOINT_VERSION,
            "model": self.name,
            "protocol": self.protocol.to_dict(),
            "plan": [asdict(spec) for spec in self.plan],
            "monitor_description": self.monitor.describe(),
            "step": self.step,
            "finished": finished,
            "active": list(self.active),
            "records": self.records,
            # arrays, not lists: a 100 ps run holds 10^4 points per replica and series, pickled each time
            "series": [
                {name: np.asarray(values, dtype=float) for name, values in s.items()} for s in self.series
            ],
        }
        if self.active and not finished:
            payload["state"] = _state_tensors(self.state)
            payload["rng"] = self.state.rng.get_state()
            payload["monitor"] = self.monitor.state_dict()
            payload["run_max"] = self.run_max.detach().cpu()
        atomic_torch_save(payload, self.checkpoint)

    # -- per step ---------------------------------------------------------------------------------------
    def _reset_window(self, n_active: int) -> None:
        zeros = torch.zeros(n_active, device=self.device, dtype=self.dtype)
        self.window_max = torch.full_like(zeros, float("nan"))
        self.window_temperature = zeros.clone()
        self.window_energy = zeros.clone()
        self.window_count = 0

    def _per_system_finite(self) -> torch.Tensor:
        state = self.state
        n = len(self.active)
        finite = torch.isfinite(state.positions).reshape(n, -1).all(dim=1)
        finite &= torch.isfinite(state.momenta).reshape(n, -1).all(dim=1)
        finite &= torch.isfinite(state.forces).reshape(n, -1).all(dim=1)
        return finite & torch.isfinite(state.energy)

    def _check(self, initial: bool = False) -> None:
        import torch_sim as ts

        state = self.state
        n = len(self.active)
        positions = state.positions.reshape(n, self.n_atoms, 3)
        deviation, decided = self.monitor.update(self.step, positions, state.row_vector_cell)
        finite = self._per_system_finite()
        deviation = torch.where(finite, deviation, torch.full_like(deviation, float("inf")))
        failed = ~finite | (decided & (deviation > self.monitor.threshold))
        self.run_max = torch.fmax(self.run_max, deviation)
        if not initial:
            self.window_max = torch.fmax(self.window_max, deviation)
            kinetic = ts.calc_kinetic_energy(
                masses=state.masses, momenta=state.momenta, system_idx=state.system_idx
            )
            self.window_temperature += state.calc_temperature()
            self.window_energy += state.energy + kinetic
            self.window_count += 1
        if bool(failed.any()):  # the one host sync per step
            self._remove(failed, finite)

    def _flush_window(self, local: list[int] | None = None) -> None:
        if self.window_count == 0:
            return
        local = range(len(self.active)) if local is None else local
        time_ps = self.step * self.protocol.dt_ps
        maxima = self.window_max.detach().cpu().tolist()
        temperatures = (self.window_temperature / self.window_count).detach().cpu().tolist()
        energies = (self.window_energy / self.window_count).detach().cpu().tolist()
        for position in local:
            series = self.series[self.active[position]]
            series["time_ps"].append(time_ps)
            series["max_deviation"].append(maxima[position])
            series["temperature_K"].append(temperatures[position])
            series["total_energy_eV"].append(energies[position])

    def _remove(self, failed: torch.Tensor, finite: torch.Tensor) -> None:
        failed_local = torch.nonzero(failed).flatten().tolist()
        finite_list = finite.tolist()
        run_max = self.run_max.detach().cpu().tolist()
        self._flush_window(failed_local)
        for position in failed_local:
            record = self.records[self.active[position]]
            record.update(
                failed=True,
                failure=self.monitor.kind if finite_list[position] else "non-finite",
                failure_step=self.step,
                max_deviation=run_max[position],
            )
        keep = torch.nonzero(~failed).flatten()
        self.active = [self.active[i] for i in keep.tolist()]
        self.monitor.keep(keep)
        self.run_max = self.run_max[keep]
        self.window_max = self.window_max[keep]
        self.window_temperature = self.window_temperature[keep]
        self.window_energy = self.window_energy[keep]
        if self.active:
            self.state = _keep_systems(self.state, keep)

    def run(self) -> None:
        from tqdm.auto import tqdm

        protocol = self.protocol
        temperatures_all = torch.tensor(
            [s.temperature for s in self.plan], device=self.device, dtype=self.dtype
        )
        temperatures = temperatures_all[torch.tensor(self.active, dtype=torch.long, device=self.device)]
        bar = tqdm(
            total=protocol.n_steps,
            initial=self.step,
            desc=self.name,
            unit="step",
            disable=not self.progress,
            dynamic_ncols=True,
        )
        try:
            while self.step < protocol.n_steps and self.active:
                n_active = len(self.active)
                self.state = self.integrator.step(self.state, self.model, temperatures)
                self.step += 1
                self._check()
                if len(self.active) != n_active:
                    temperatures = temperatures_all[
                        torch.tensor(self.active, dtype=torch.long, device=self.device)
                    ]
                if self.step % protocol.record_every_steps == 0:
                    self._flush_window()
                    self._reset_window(len(self.active))
                    bar.update(protocol.record_every_steps)
                    bar.set_postfix(stable=f"{len(self.active)}/{len(self.plan)}", refresh=False)
                    if self.step % protocol.checkpoint_every_steps == 0:
                        self.save(finished=False)
            self._flush_window()
            for position, value in enumerate(self.run_max.detach().cpu().tolist() if self.active else []):
                self.records[self.active[position]]["max_deviation"] = value
            # The run ends early when every replica has failed: the bar jumps to the end, and its count
            # must say so (the last window's failures came after the last postfix update).
            bar.set_postfix(stable=f"{len(self.active)}/{len(self.plan)}", refresh=False)
            bar.update(max(0, protocol.n_steps - bar.n))
        finally:
            bar.close()
        self.save(finished=True)

    def rows(self) -> list[dict[str, Any]]:
        horizon = self.protocol.time_ps
        rows = []
        for spec, record in zip(self.plan, self.records, strict=True):
            step = record["failure_step"]
            maximum = record["max_deviation"]
            rows.append(
                {
                    "model": self.name,
                    "temperature_K": spec.temperature,
                    "replica": spec.replica,
                    "seed": spec.seed,
                    "start_frame": spec.start_frame,
                    "stability_ps": horizon if step is None else round(step * self.protocol.dt_ps, 9),
                    "failed": bool(record["failed"]),
                    "failure": record["failure"],
                    "failure_step": step,
                    "max_deviation": maximum if math.isfinite(maximum) else None,
                }
            )
        return rows

    def series_arrays(self) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for spec, series in zip(self.plan, self.series, strict=True):
            key = f"{self.name}/{spec.temperature:g}K/{spec.replica}"
            out[key] = {name: np.asarray(values, dtype=float) for name, values in series.items()}
        return out


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
        raise GGNDError(f"{path}: checkpoint version {payload.get('version')} is not {CHECKPOINT_VERSION}")
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
) -> StabilityResult:
    """Run the stability protocol for each TorchSim model; all its replicas in one batched state.

    Args:
        models: name -> ``torch_sim.models.interface.ModelInterface`` (device and dtype taken from it).
        start_frames: ASE Atoms to draw start frames from, or {temperature: frames}.
        reference_frames: ASE Atoms defining bonds and equilibrium lengths (or the reference RDF).
        protocol: the :class:`StabilityProtocol`.
        out_dir: where checkpoints go (``out_dir/checkpoints/<model>.pt``); None: no checkpoints. The
            folder is locked for the run (a second run into it stops at once).
        resume: continue from the checkpoints in ``out_dir`` (finished models are not re-run). Each
            checkpoint is verified (CRC of every record) before it is loaded.
        progress: show a progress bar per model.
        sources: extra provenance (file names) copied into the protocol record.
        overwrite: start again over the checkpoints of an earlier run in ``out_dir``.

    Returns:
        :class:`StabilityResult` with the protocol record, one row per replica and the windowed time
        series (max deviation, temperature, total energy) per replica.
    """
    protocol.validate()
    if not models:
        raise GGNDError("no models to run")
    v.check_frames(reference_frames, "reference frames")
    if out_dir is None:
        return _run_stability(
            models, start_frames, reference_frames, protocol, None, False, progress, sources
        )
    with output_lock(Path(out_dir)):
        if overwrite and not resume:
            for stale in (Path(out_dir) / "checkpoints").glob("*.pt"):
                stale.unlink()
        return _run_stability(
            models, start_frames, reference_frames, protocol, out_dir, resume, progress, sources
        )


def _run_stability(models, start_frames, reference_frames, protocol, out_dir, resume, progress, sources):
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

    def frames_for(spec: ReplicaSpec):
        return by_temperature[spec.temperature][spec.start_frame]

    checkpoint_dir = Path(out_dir) / "checkpoints" if out_dir is not None else None
    if (
        checkpoint_dir is not None
        and not resume
        and checkpoint_dir.exists()
        and any(checkpoint_dir.glob("*.pt"))
    ):
        raise GGNDError(
            f"{out_dir} holds checkpoints of an earlier run: pass --resume to continue it or choose another --out"
        )

    rows: list[dict[str, Any]] = []
    series: dict[str, dict[str, np.ndarray]] = {}
    monitor_record = None
    for name, model in models.items():
        monitor = build_monitor(protocol, reference_frames, first_start)
        monitor_record = monitor.describe()
        path = checkpoint_dir / f"{name}.pt" if checkpoint_dir is not None else None
        run = _ModelRun(name, model, plan, frames_for, monitor, protocol, path, progress)
        if resume and path is not None and path.exists():
            payload = verified_torch_load(path, f"stability checkpoint of model '{name}'")
            _check_checkpoint(payload, name, protocol, plan, monitor, path)
            run.restore(payload)
            if not payload["finished"]:
                run.run()
        else:
            run.start()
            run.run()
        rows.extend(run.rows())
        series.update(run.series_arrays())

    sample = next(iter(models.values()))
    record = {
        **protocol.to_dict(),
        "monitor": monitor_record,
        "integrator": {
            "nve": "velocity Verlet (torch_sim nve_step)",
            "nvt-langevin": "Langevin BAOAB (torch_sim nvt_langevin_step)",
            "nvt-nose-hoover": "Nose-Hoover chain, length 3 (torch_sim nvt_nose_hoover_step)",
        }[protocol.ensemble],
        "n_atoms": len(first_start),
        "formula": first_start.get_chemical_formula(),
        "device": str(sample.device),
        "dtype": str(sample.dtype).replace("torch.", ""),
        "versions": package_versions(),
        **dict(sources or {}),
    }
    return StabilityResult(protocol=record, rows=rows, series=series)
