"""``ggnd stability``: many-replica MD stability of one or more models (docs/stability.md).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the same command shards the replicas over the ranks, each on its
own device, and rank 0 writes what a single process writes (docs/scale.md).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError, OutputExistsError

HOST_HELP = (
    "host package of the MODELs: auto (detect from each file) or an adapter name (see `ggnd adapters`)"
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stability",
        help="MD stability: many replicas per model in one batched TorchSim run",
        description="Run MD replicas of each model at each temperature, all in one batched TorchSim state, "
        "and record when each replica becomes unstable (max bond deviation > threshold for molecules, RDF "
        "distance for periodic systems). Defaults follow the paper: NVE velocity Verlet, 1 fs, 100 ps, 0.5 Å. "
        "--out must be new or empty unless it holds this command's run (--resume continues it, --overwrite "
        "starts again). Under torchrun the replicas are sharded over the ranks (docs/scale.md).",
    )
    parser.add_argument("models", nargs="+", type=v.MODEL_FILE, metavar="MODEL", help="fitted model files")
    parser.add_argument(
        "--start",
        nargs="+",
        type=v.STRUCTURE_FILE,
        required=True,
        metavar="START",
        help="extxyz to draw start frames from: one file, or one per --temperature (same order)",
    )
    parser.add_argument(
        "--reference",
        type=v.STRUCTURE_FILE,
        required=True,
        help="frames defining bonds and their lengths (or the reference RDF)",
    )
    parser.add_argument(
        "--temperature",
        nargs="+",
        type=v.POSITIVE_FLOAT,
        default=[300.0],
        metavar="K",
        help="temperatures (K); default 300",
    )
    parser.add_argument(
        "--replicas", type=v.POSITIVE_INT, default=5, help="replicas per temperature (paper: 5)"
    )
    parser.add_argument("--time-ps", type=v.POSITIVE_FLOAT, default=100.0, help="horizon (ps); default 100")
    parser.add_argument("--timestep-fs", type=v.POSITIVE_FLOAT, default=1.0, help="time step (fs); default 1")
    parser.add_argument("--ensemble", choices=("nve", "nvt-langevin", "nvt-nose-hoover"), default="nve")
    parser.add_argument(
        "--friction", type=v.POSITIVE_FLOAT, default=0.01, help="Langevin friction (1/fs); default 0.01"
    )
    parser.add_argument(
        "--nose-hoover-tau-fs", type=v.POSITIVE_FLOAT, default=100.0, help="Nose-Hoover relaxation time (fs)"
    )
    parser.add_argument(
        "--threshold",
        type=v.POSITIVE_FLOAT,
        help="instability threshold Δ (default 0.5 Å for bonds, 1.0 for RDF)",
    )
    parser.add_argument(
        "--criterion", choices=("auto", "bonds", "rdf"), default="auto", help="auto: RDF when periodic"
    )
    parser.add_argument(
        "--bonds",
        choices=("reference", "natural"),
        default="reference",
        help="reference: pairs closer than --bond-cutoff in every reference frame; natural: ASE natural cutoffs on frame 0",
    )
    parser.add_argument("--bond-cutoff", type=v.POSITIVE_FLOAT, default=1.8, help="Å; default 1.8")
    parser.add_argument("--rdf-window-ps", type=v.POSITIVE_FLOAT, default=1.0)
    parser.add_argument(
        "--rdf-bins", type=v.POSITIVE_INT, default=100, help="RDF bins up to --rdf-r-max; default 100"
    )
    parser.add_argument(
        "--rdf-r-max", type=v.POSITIVE_FLOAT, help="Å; default min(6, half the smallest cell width)"
    )
    parser.add_argument(
        "--seed", type=v.SEED, default=0, help="seeds start frames, velocities and thermostat noise"
    )
    parser.add_argument("--device", default="cpu", type=v.DEVICE, help="cpu or cuda (or cuda:N)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument(
        "--record-every", type=v.POSITIVE_INT, default=10, metavar="STEPS", help="time-series window (steps)"
    )
    parser.add_argument("--checkpoint-every", type=v.POSITIVE_INT, default=500, metavar="STEPS")
    parser.add_argument(
        "--failure-frames",
        type=v.NON_NEGATIVE_INT,
        default=10,
        metavar="K",
        help="frames each failed replica leaves in OUT/failures before its failing step (0: that step only); "
        "default 10",
    )
    parser.add_argument(
        "--failure-frame-every",
        type=v.POSITIVE_INT,
        default=10,
        metavar="STEPS",
        help="MD steps between those frames; default 10",
    )
    parser.add_argument(
        "--scan-failed",
        action="store_true",
        help="after the run, bond-stretch scans of every model for the bond types that broke (OUT/bond_scans, "
        "a table in summary.md; `ggnd scan`). With --resume it adds them to a finished run",
    )
    parser.add_argument("--out", type=v.OUTPUT_DIR, required=True, help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue the run stopped in --out")
    parser.add_argument("--host", default="auto", type=v.HOST, help=HOST_HELP)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the models' GGND blocks through torch.compile (fused kernels for MD; the first steps "
        "compile, minutes on a small CPU; docs/block.md)",
    )
    parser.add_argument(
        "--autobatch",
        action="store_true",
        help="size batches by memory with TorchSim's InFlightAutoBatcher: waiting replicas join as others fail "
        "or finish (docs/scale.md)",
    )
    parser.add_argument(
        "--max-batch-atoms",
        type=v.POSITIVE_INT,
        metavar="N",
        help="with --autobatch: at most N atoms in a batch (TorchSim's max_memory_scaler on atom counts); "
        "default: measured by TorchSim on CUDA, required on the CPU",
    )
    parser.add_argument(
        "--baseline",
        type=v.TEXT,
        metavar="MODEL",
        help="model the comparison table is made against: a MODEL's name (its file name without suffix)",
    )
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start again over an earlier run in --out, or write into a folder holding other files",
    )
    parser.set_defaults(handler=run)
    v.one_line_errors(parser)


def _device(name: str):
    import torch

    return torch.device(v.check_value(v.device, name, "--device"))


def check_out(args) -> None:
    """--out: a new or empty folder, this command's own run (--resume, --overwrite), never an input."""
    from ggnd_plugin.md.report import OUTPUT_FILES
    from ggnd_plugin.safe_io import check_output_dir, foreign_entries, refuse_input_as_output

    inputs = [("MODEL", path) for path in args.models]
    inputs += [("--start", path) for path in args.start] + [("--reference", args.reference)]
    out = args.out
    checkpoints = out / "checkpoints"
    own = checkpoints.is_dir() and any(checkpoints.glob("*.pt"))
    check_output_dir(out, what="--out", is_own=own or args.resume, overwrite=args.overwrite, inputs=inputs)
    for name in (*OUTPUT_FILES, *(f"checkpoints/{n}.pt" for n in _names(args.models))):
        refuse_input_as_output(out / name, inputs, "--out")
    _refuse_inputs_inside(out / "failures", inputs)
    if args.resume and args.overwrite:
        raise GGNDError("--resume continues a run and --overwrite starts it again: give one of them")
    if args.resume and not own and foreign_entries(out, ()):
        raise OutputExistsError(
            f"--resume: {out} holds no `ggnd stability` run to continue (no checkpoints/)"
        )
    if own and not args.resume and not args.overwrite:
        raise OutputExistsError(
            f"--out {out} holds checkpoints of an earlier run: pass --resume to continue it, --overwrite "
            "to start again, or choose another --out"
        )


def _refuse_inputs_inside(folder: Path, inputs) -> None:
    """The run rewrites OUT/failures (and removes its stale files): no input may live there."""
    for what, path in inputs:
        if folder.resolve() in Path(path).resolve().parents:
            raise GGNDError(
                f"{what} {path} is inside {folder}, which this run rewrites; copy it elsewhere first"
            )


def _names(paths: list[Path]) -> list[str]:
    names = []
    for path in paths:
        name = path.stem
        while name in names:
            name = f"{name}_{len(names)}"
        names.append(name)
    return names


def load_models(paths: list[Path], host: str, device, dtype, start_frames, compile: bool = False) -> dict:
    """name -> TorchSim model for each model file, through the host adapters.

    ``compile``: the GGND blocks inside each TorchSim model (the copy that runs) use compiled kernels.
    """
    from ggnd_plugin.registry import resolve

    models = {}
    for name, path in zip(_names(paths), paths, strict=True):
        adapter = resolve(host, path)
        try:
            model = adapter.load(path, device=str(device))
        except GGNDError:
            raise
        except Exception as error:
            raise GGNDError(
                f"{path}: cannot be loaded as a {adapter.name} model ({type(error).__name__}: {error})"
            ) from error
        adapter.check_structures(model, start_frames, f"start frames for {path.name}")
        models[name] = adapter.torchsim_model(model, device=str(device), dtype=dtype)
        if compile:
            from ggnd_plugin.block_compile import compile_blocks

            if not compile_blocks(models[name]):
                print(f"{path.name}: no version-2 GGND block to compile (runs as it is)")
    return models


def _accepts_baseline(function) -> bool:
    return "baseline" in inspect.signature(function).parameters


def _report_unfinished(error, out: Path) -> None:
    """unfinished.json and a table of the replicas no rank finished (rank 0 of a torchrun job)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from ggnd_plugin.safe_io import atomic_write_text

    atomic_write_text(
        out / UNFINISHED_FILE,
        json.dumps({"message": str(error), "replicas": error.replicas}, indent=2) + "\n",
    )
    table = Table(title=f"Unfinished replicas ({out / UNFINISHED_FILE})")
    for column in ("model", "T (K)", "replica", "rank", "steps done"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for item in error.replicas:
        table.add_row(
            item["model"],
            f"{item['temperature_K']:g}",
            str(item["replica"]),
            str(item["rank"]),
            f"{item['step']}/{item['of_steps']}",
        )
    Console(stderr=True).print(table)


UNFINISHED_FILE = "unfinished.json"


def _scan_failing_bonds(args, result, structure, device) -> None:
    """Bond scans of the bond types that broke, appended to summary.md (molecules only)."""
    from ggnd_plugin.md.failure_scans import failing_bond_types, scan_failing_bonds
    from ggnd_plugin.registry import resolve
    from ggnd_plugin.safe_io import atomic_write_text

    types = failing_bond_types(result)
    if not types or structure.pbc.any():
        return
    host_models = {}
    for name, path in zip(_names(args.models), args.models, strict=True):
        adapter = resolve(args.host, path)
        host_models[name] = (adapter, adapter.load(path, device=str(device)))
    lines = scan_failing_bonds(
        host_models, structure, types, args.out, plots=not args.no_plots, progress=not args.no_progress
    )
    if lines:
        summary = args.out / "summary.md"
        atomic_write_text(summary, summary.read_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n")


def run(args) -> int:
    import torch

    from ggnd_plugin import distributed
    from ggnd_plugin.data import read_structures
    from ggnd_plugin.md.report import print_summary, write_results
    from ggnd_plugin.md.stability import (
        Batching,
        FailureFrames,
        StabilityProtocol,
        UnfinishedReplicas,
        run_stability,
    )
    from ggnd_plugin.safe_io import output_lock

    temperatures = tuple(args.temperature)
    if len(args.start) not in (1, len(temperatures)):
        raise GGNDError(
            f"--start takes one file or one per temperature ({len(temperatures)}), not {len(args.start)}"
        )
    protocol = StabilityProtocol(
        temperatures=temperatures,
        replicas=args.replicas,
        time_ps=args.time_ps,
        timestep_fs=args.timestep_fs,
        ensemble=args.ensemble,
        friction_per_fs=args.friction,
        nose_hoover_tau_fs=args.nose_hoover_tau_fs,
        threshold=args.threshold,
        criterion=args.criterion,
        bond_rule=args.bonds,
        bond_cutoff=args.bond_cutoff,
        seed=args.seed,
        record_every_steps=args.record_every,
        checkpoint_every_steps=args.checkpoint_every,
        rdf_window_ps=args.rdf_window_ps,
        rdf_r_max=args.rdf_r_max,
        rdf_bins=args.rdf_bins,
    )
    protocol.validate()
    failure_frames = FailureFrames(args.failure_frames, args.failure_frame_every)
    if args.max_batch_atoms is not None and not args.autobatch:
        raise GGNDError("--max-batch-atoms sizes the batches of --autobatch: give --autobatch too")
    names = _names(args.models)
    if args.baseline is not None and args.baseline not in names:
        raise GGNDError(
            f"--baseline {args.baseline}: not one of the models of this run ({', '.join(names)}); "
            "a model's name is its file name without suffix"
        )
    batching = Batching("in-flight" if args.autobatch else "off", args.max_batch_atoms)
    device = _device(args.device)
    if args.autobatch and args.max_batch_atoms is None and device.type != "cuda":
        raise GGNDError(
            "--autobatch on the CPU needs --max-batch-atoms: TorchSim measures what a device holds only on CUDA"
        )
    ranks = distributed.from_environment(device)
    try:
        main = ranks is None or ranks.is_main
        if ranks is None:
            check_out(args)
        else:
            device = ranks.device
            ranks.agree(lambda: check_out(args))
        if len(args.start) == 1:
            start_frames = read_structures(args.start[0])
            all_start = start_frames
        else:
            start_frames = {
                t: read_structures(path) for t, path in zip(temperatures, args.start, strict=True)
            }
            all_start = [atoms for frames in start_frames.values() for atoms in frames]
        reference = read_structures(args.reference)
        dtype = getattr(torch, args.dtype)
        models = load_models(args.models, args.host, device, dtype, all_start, compile=args.compile)
        sources = {
            "start": ", ".join(str(p) for p in args.start),
            "reference": f"{args.reference} ({len(reference)} frames)",
            "model_files": {name: str(path) for name, path in zip(models, args.models, strict=True)},
        }
        with contextlib.ExitStack() as stack:

            def lock_and_check():
                stack.enter_context(output_lock(args.out))
                check_out(args)  # again, now that no other run can change the folder

            if ranks is None:
                lock_and_check()
            else:
                ranks.agree(lock_and_check)
            try:
                result = run_stability(
                    models,
                    start_frames,
                    reference,
                    protocol,
                    out_dir=args.out,
                    resume=args.resume,
                    progress=not args.no_progress and main,
                    sources=sources,
                    overwrite=args.overwrite,
                    batching=batching,
                    ranks=ranks,
                    failure_frames=failure_frames,
                )
            except UnfinishedReplicas as error:
                _report_unfinished(error, args.out)
                raise
            if not main:
                return 0
            report = {"baseline": args.baseline} if args.baseline is not None else {}
            if report and not _accepts_baseline(write_results):
                report = {}  # the installed report functions predate --baseline
            paths = write_results(result, args.out, plots=not args.no_plots, **report)
            for stale in (args.out / "bond_scans").glob("scan*"):  # this --out's earlier scans
                stale.unlink()
            if args.scan_failed:
                _scan_failing_bonds(args, result, reference[0], device)
            (args.out / UNFINISHED_FILE).unlink(missing_ok=True)
    finally:
        if ranks is not None:
            ranks.close()
    print_summary(result, **(report if _accepts_baseline(print_summary) else {}))
    ranks_note = f" ({ranks.world_size} ranks)" if ranks is not None else ""
    files = sorted(name for name in paths if "/" not in name)
    frames = [name for name in paths if name.endswith(".extxyz")]
    if frames:
        files.append(f"failures/ ({len(frames)} failed replicas' frames)")
    print(f"results in {args.out}{ranks_note}: " + ", ".join(files))
    return 0
