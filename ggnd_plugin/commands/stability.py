"""``ggnd stability``: many-replica MD stability of one or more models (docs/stability.md)."""

from __future__ import annotations

from pathlib import Path

from ggnd_plugin.errors import GGNDError

HOST_HELP = (
    "host package of the MODELs: auto (detect from each file) or an adapter name (see `ggnd adapters`)"
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "stability",
        help="MD stability: many replicas per model in one batched TorchSim run",
        description="Run MD replicas of each model at each temperature, all in one batched TorchSim state, "
        "and record when each replica becomes unstable (max bond deviation > threshold for molecules, RDF "
        "distance for periodic systems). Defaults follow the paper: NVE velocity Verlet, 1 fs, 100 ps, 0.5 Å.",
    )
    parser.add_argument("models", nargs="+", type=Path, metavar="MODEL", help="fitted model files")
    parser.add_argument(
        "--start",
        nargs="+",
        type=Path,
        required=True,
        metavar="START",
        help="extxyz to draw start frames from: one file, or one per --temperature (same order)",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        required=True,
        help="frames defining bonds and their lengths (or the reference RDF)",
    )
    parser.add_argument(
        "--temperature",
        nargs="+",
        type=float,
        default=[300.0],
        metavar="K",
        help="temperatures (K); default 300",
    )
    parser.add_argument("--replicas", type=int, default=5, help="replicas per temperature (paper: 5)")
    parser.add_argument("--time-ps", type=float, default=100.0, help="horizon (ps); default 100")
    parser.add_argument("--timestep-fs", type=float, default=1.0, help="time step (fs); default 1")
    parser.add_argument("--ensemble", choices=("nve", "nvt-langevin", "nvt-nose-hoover"), default="nve")
    parser.add_argument("--friction", type=float, default=0.01, help="Langevin friction (1/fs); default 0.01")
    parser.add_argument(
        "--nose-hoover-tau-fs", type=float, default=100.0, help="Nose-Hoover relaxation time (fs)"
    )
    parser.add_argument(
        "--threshold", type=float, help="instability threshold Δ (default 0.5 Å for bonds, 1.0 for RDF)"
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
    parser.add_argument("--bond-cutoff", type=float, default=1.8, help="Å; default 1.8")
    parser.add_argument("--rdf-window-ps", type=float, default=1.0)
    parser.add_argument("--rdf-bins", type=int, default=100, help="RDF bins up to --rdf-r-max; default 100")
    parser.add_argument("--rdf-r-max", type=float, help="Å; default min(6, half the smallest cell width)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds start frames, velocities and thermostat noise"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument(
        "--record-every", type=int, default=10, metavar="STEPS", help="time-series window (steps)"
    )
    parser.add_argument("--checkpoint-every", type=int, default=500, metavar="STEPS")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--resume", action="store_true", help="continue the run stopped in --out")
    parser.add_argument("--host", default="auto", help=HOST_HELP)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(handler=run)


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise GGNDError(f"--device {name}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GGNDError("--device cuda: no CUDA device is available here (use --device cpu)")
    return device


def _names(paths: list[Path]) -> list[str]:
    names = []
    for path in paths:
        name = path.stem
        while name in names:
            name = f"{name}_{len(names)}"
        names.append(name)
    return names


def load_models(paths: list[Path], host: str, device, dtype, start_frames) -> dict:
    """name -> TorchSim model for each model file, through the host adapters."""
    from ggnd_plugin.registry import resolve

    models = {}
    for name, path in zip(_names(paths), paths, strict=True):
        if not path.exists():
            raise GGNDError(f"{path}: no such file")
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
    return models


def run(args) -> int:
    import torch

    from ggnd_plugin.data import read_structures
    from ggnd_plugin.md.report import print_summary, write_results
    from ggnd_plugin.md.stability import StabilityProtocol, run_stability

    temperatures = tuple(args.temperature)
    if len(args.start) not in (1, len(temperatures)):
        raise GGNDError(
            f"--start takes one file or one per temperature ({len(temperatures)}), not {len(args.start)}"
        )
    if len(args.start) == 1:
        start_frames = read_structures(args.start[0])
        all_start = start_frames
    else:
        start_frames = {t: read_structures(path) for t, path in zip(temperatures, args.start, strict=True)}
        all_start = [atoms for frames in start_frames.values() for atoms in frames]
    reference = read_structures(args.reference)
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
    device = _device(args.device)
    dtype = getattr(torch, args.dtype)
    models = load_models(args.models, args.host, device, dtype, all_start)
    sources = {
        "start": ", ".join(str(p) for p in args.start),
        "reference": f"{args.reference} ({len(reference)} frames)",
        "model_files": {name: str(path) for name, path in zip(models, args.models, strict=True)},
    }
    result = run_stability(
        models,
        start_frames,
        reference,
        protocol,
        out_dir=args.out,
        resume=args.resume,
        progress=not args.no_progress,
        sources=sources,
    )
    paths = write_results(result, args.out, plots=not args.no_plots)
    print_summary(result)
    print(f"results in {args.out}: " + ", ".join(sorted(p.name for p in paths.values())))
    return 0
