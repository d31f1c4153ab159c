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

The run is built from these modules of :mod:`ggnd_plugin.md`: ``protocol`` (what defines the number),
``seeds`` (the plan), ``integrators``, ``batched_states``, ``monitors``, ``windows`` and
``replica_batch`` (a batch of replicas stepping), ``records`` (what each replica recorded),
``batching`` (which replicas run together), ``checkpoints``, ``model_run`` (one model's replicas in
this process) and ``shards`` (ranks of a torchrun job). The names that other code imports from here
are re-exported.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ggnd_plugin import provenance
from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError
from ggnd_plugin.md.batching import BATCHING_MODES, Batching
from ggnd_plugin.md.checkpoints import (
    CHECKPOINT_VERSION,
    checkpoint_files,
    checkpoint_name,
    is_done,
    read_checkpoints,
)
from ggnd_plugin.md.failure_frames import FailureFrames
from ggnd_plugin.md.failures import FailureContext, name_causes
from ggnd_plugin.md.integrators import DESCRIPTIONS
from ggnd_plugin.md.model_run import ModelRun
from ggnd_plugin.md.monitors import build_monitor
from ggnd_plugin.md.protocol import (
    BOND_RULES,
    CRITERIA,
    ENSEMBLES,
    ReplicaSpec,
    StabilityProtocol,
    StabilityResult,
)
from ggnd_plugin.md.seeds import initial_momenta, noise_seed, plan_replicas
from ggnd_plugin.md.shards import StopRequested, UnfinishedReplicas, assign_ranks, gather_shards
from ggnd_plugin.safe_io import output_lock

_ModelRun = ModelRun  # the name the tests build single runs with

__all__ = [
    "BATCHING_MODES",
    "BOND_RULES",
    "CHECKPOINT_VERSION",
    "CRITERIA",
    "ENSEMBLES",
    "Batching",
    "FailureFrames",
    "ReplicaSpec",
    "StabilityProtocol",
    "StabilityResult",
    "StopRequested",
    "UnfinishedReplicas",
    "build_monitor",
    "checkpoint_files",
    "checkpoint_name",
    "initial_momenta",
    "noise_seed",
    "package_versions",
    "plan_replicas",
    "run_stability",
]


def package_versions() -> dict[str, str]:
    """The versions a stability record names: the MD stack and every installed host."""
    return provenance.package_versions(("torch", "torch-sim-atomistic", "ase", "numpy", "e3nn"), hosts=True)


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
    failure_frames: FailureFrames | None = None,
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
        failure_frames: how many frames before a failure each replica keeps, and how far apart
            (:class:`FailureFrames`; default 10 frames, one every 10 steps). Not part of the protocol
            (no stability number depends on it), but a resume must use the same.

    Returns:
        :class:`StabilityResult` with the protocol record, one row per replica (a failed one with its
        ``cause``, ``cause_atoms`` and ``cause_detail``: :mod:`ggnd_plugin.md.failures`), the windowed
        time series (max deviation, temperature, total energy) per replica, and each failed replica's
        last frames and cause in ``failures``.

    Raises:
        UnfinishedReplicas: (rank 0) some replicas were not finished because a rank died or was stopped.
    """
    protocol.validate()
    if not models:
        raise GGNDError("no models to run")
    v.check_frames(reference_frames, "reference frames")
    batching = batching or Batching()
    failure_frames = failure_frames or FailureFrames()
    failure_frames.validate()
    if ranks is not None and ranks.world_size > 1 and out_dir is None:
        raise GGNDError("a run sharded over ranks needs out_dir: the ranks exchange results through it")
    if out_dir is None:
        return _run_stability(
            models,
            start_frames,
            reference_frames,
            protocol,
            None,
            False,
            progress,
            sources,
            batching,
            None,
            failure_frames,
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
            failure_frames,
        )


def _run_stability(
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
    failure_frames,
):
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
    runs: list[ModelRun] = []
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
            entries, by_file = read_checkpoints(checkpoint_dir, name, protocol, plan, monitor, failure_frames)
            carry = dict(by_file.get(own, {}))
        unfinished = [i for i in range(len(plan)) if not is_done(entries.get(i))]
        assignment = assign_ranks(unfinished, offset, world_size)
        offset += len(unfinished)
        indices = (
            list(range(len(plan))) if ranks is None else [i for i in unfinished if assignment[i] == rank]
        )
        carry = {i: e for i, e in carry.items() if i not in indices}
        run = ModelRun(
            name,
            model,
            plan,
            frames_for,
            monitor,
            protocol,
            own,
            progress,
            batching,
            indices,
            carry,
            stop,
            failure_frames,
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
        "integrator": DESCRIPTIONS[protocol.ensemble],
        "n_atoms": len(first_start),
        "formula": first_start.get_chemical_formula(),
        "device": str(sample.device.type if ranks is not None else sample.device),
        "dtype": str(sample.dtype).replace("torch.", ""),
        "versions": package_versions(),
        "failure_frames": failure_frames.to_dict(),
        **dict(sources or {}),
    }
    execution = {
        "ranks": 1 if ranks is None else ranks.world_size,
        "batching": batching.mode,
        "max_batch_atoms": batching.max_atoms,
        "seconds": time.perf_counter() - started,
        "replica_steps": sum(run.replica_steps for run in runs),
    }
    context = FailureContext.from_monitor(runs[0].monitor.base)
    if ranks is None:
        rows = [row for run in runs for row in run.rows()]
        series = {key: value for run in runs for key, value in run.series_arrays().items()}
        failures = {key: {"frames": f} for run in runs for key, f in run.failure_frames().items()}
        result = StabilityResult(
            protocol=record, rows=rows, series=series, execution=execution, failures=failures
        )
        name_causes(result, context)
        return result

    everyone = stopped is None and ranks.barrier()
    if ranks.rank != 0:
        if stopped is not None:
            raise stopped
        return None
    result = gather_shards(runs, plan, protocol, checkpoint_dir, ranks, record, execution, everyone)
    name_causes(result, context)
    return result
