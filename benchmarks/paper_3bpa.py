"""Reproduce the GGND paper's 3BPA study (tables 1, 3 and 5) on the real DFT 3BPA data.

For each host (MACE, NequIP, PaiNN through SchNetPack), the story of ``ggnd demo`` on the DFT data with
the paper's stability protocol:

1. ``data``: train_300K split into train / validation (seeded); test_300K and test_600K as labelled tests;
2. ``fit``: the host alone (``<host>``) and the same architecture with a GGND block
   (``<host>+ggnd-scratch``), fitted on the 300 K training split through the host's own training command
   (``ggnd-mace-train``, ``nequip-train``, ``spktrain``: each adapter's ``fit``); for MACE also the
   paper's ablation (table 3): ``mace+ggnd-local`` (diffusion restricted to the MACE cutoff) and
   ``mace+ggnd-mp`` (one fully connected message-passing layer instead of the diffusion);
3. ``<host>+ggnd-upgrade``: the fitted host model upgraded with GGND (predictions unchanged) and
   fine-tuned with ``ggnd_plugin.training.finetune``;
4. ``evaluate``: energy and force MAE on test_300K and test_600K (``ggnd_plugin.training.evaluate``);
5. ``stability``: ``ggnd_plugin.md.run_stability`` (NVE velocity Verlet, 1 fs, Δ = 0.5 Å on the 28 bonds)
   at 300, 600 and 1200 K (the upgrade, control and ablation models at ``--side-temperatures`` if
   given); one batched TorchSim state per model and temperature, in parallel processes with
   ``--parallel``. There is no 1200 K set, so 1200 K replicas start from test_600K frames with
   velocities drawn at 1200 K;
6. ``overhead``: table 5 per host, the plain and the GGND-from-scratch model measured side by side
   (``benchmarks/ggnd_overhead.py``: training step, MD step, peak memory);
7. ``report``: ``benchmarks/results/paper_3bpa.json`` (one record per model and test, plus settings,
   hardware and wall times) and the plots.

Every stage is cached in ``--out`` (default ``build/paper_3bpa``), so the same command resumes.
Validation is the only thing looked at while fitting; the test sets are used for reporting only.

    # the all-host CPU study in docs/results.md and benchmarks/results/paper_3bpa.json (pass B)
    python benchmarks/paper_3bpa.py --out build/paper_3bpa_cpu_all --size small --train-frames 200 \
        --test-frames 100 --epochs 25 --ggnd-channels 8 --ggnd-heads 2 --ggnd-steps 2 \
        --finetune-epochs 5 --finetune-batch-size 5 --replicas 5 --time-ps 10 \
        --temperatures 300 600 1200 --side-temperatures 1200 --parallel --jobs 2 --md-threads 1
    python benchmarks/paper_3bpa.py --smoke          # tiny end-to-end check on CPU, all hosts
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline_3bpa import LABELLED_TESTS, prepare_data, set_option, stage_cache  # noqa: E402
from pipeline_3bpa import say as _say  # noqa: E402

from ggnd_plugin.safe_io import atomic_write_text  # noqa: E402

HOSTS = ("mace", "nequip", "schnetpack")
HOST_LABEL = {"mace": "MACE", "nequip": "NequIP", "schnetpack": "PaiNN (SchNetPack)"}
# kind -> GGND variant (None: the host alone)
KINDS = {
    "baseline": None,
    "ggnd-scratch": "diffusion",
    "ggnd-upgrade": "diffusion",
    "ggnd-local": "local",
    "ggnd-mp": "mp",
    "finetuned": None,  # control: the fitted host fine-tuned like the upgrade, without GGND
}
ABLATION_KINDS = ("ggnd-local", "ggnd-mp")
TEMPERATURES = (300.0, 600.0, 1200.0)
# Paper table 1, E in eV, F in eV/Å, S in ps; (host, ggnd, test). The paper has no PaiNN column.
PAPER = {
    ("mace", False, "300K"): (0.113, 0.165, 100.0),
    ("mace", False, "600K"): (0.161, 0.335, 100.0),
    ("mace", False, "1200K"): (0.271, 0.770, 1.965),
    ("mace", True, "300K"): (0.010, 0.022, 100.0),
    ("mace", True, "600K"): (0.023, 0.044, 100.0),
    ("mace", True, "1200K"): (0.109, 0.111, 29.218),
    ("nequip", False, "300K"): (0.165, 0.113, 100.0),
    ("nequip", False, "600K"): (0.335, 0.161, 98.271),
    ("nequip", False, "1200K"): (0.770, 0.271, 0.018),
    ("nequip", True, "300K"): (0.094, 0.104, 100.0),
    ("nequip", True, "600K"): (0.122, 0.153, 100.0),
    ("nequip", True, "1200K"): (0.477, 0.269, 17.052),
}
# Paper table 3 (an ablation on VisNet, not MACE): (variant, test) -> E, F, S.
PAPER_ABLATION = {
    ("baseline", "300K"): (0.002, 0.006, 100.0),
    ("baseline", "600K"): (1.405, 0.997, 25.358),
    ("baseline", "1200K"): (3.464, 1.404, 0.004),
    ("local", "300K"): (0.013, 0.058, 100.0),
    ("local", "600K"): (0.982, 0.998, 39.075),
    ("local", "1200K"): (3.049, 1.406, 0.291),
    ("mp", "300K"): (0.015, 0.072, 98.827),
    ("mp", "600K"): (0.643, 0.661, 69.292),
    ("mp", "1200K"): (1.908, 0.882, 2.892),
    ("diffusion", "300K"): (0.002, 0.006, 100.0),
    ("diffusion", "600K"): (0.022, 0.041, 100.0),
    ("diffusion", "1200K"): (0.583, 0.304, 11.209),
}
# Paper table 5 (VisNet, RTX 3090): host+GGND / host.
PAPER_OVERHEAD = {"train_time": 1.2654, "md_time": 1.1557, "train_memory": 1.1528, "md_memory": 1.1487}


def model_name(host: str, kind: str) -> str:
    return host if kind == "baseline" else f"{host}+{kind}"


def parse_model(name: str) -> tuple[str, str]:
    host, _, kind = name.partition("+")
    return host, kind or "baseline"


def model_names(args) -> list[str]:
    names = []
    for host in args.hosts:
        kinds = ["baseline", "ggnd-scratch", "ggnd-upgrade"]
        if args.controls:
            kinds.append("finetuned")
        if host == "mace" and args.ablation:
            kinds += list(ABLATION_KINDS)
        names += [model_name(host, kind) for kind in kinds]
    return names


def selected_models(args) -> list[str]:
    """The models evaluated, run and reported: all of :func:`model_names`, or those of ``--models``."""
    names = model_names(args)
    if not args.models:
        return names
    unknown = sorted(set(args.models) - set(names))
    if unknown:
        raise SystemExit(f"--models: {unknown} are not models of this run; choose from {names}")
    return [name for name in names if name in args.models]


def default_data() -> Path:
    return Path(os.environ.get("GGND_3BPA_DATA", ROOT.parent / "shared" / "data" / "3bpa"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=default_data(), help="folder with the 3BPA DFT files")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "paper_3bpa", help="stage cache")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "paper_3bpa.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--seed", type=int, default=0)
    # data
    p.add_argument("--train-frames", type=int, default=None, help="use this many of the 500 (default all)")
    p.add_argument("--valid-fraction", type=float, default=0.1)
    p.add_argument("--test-frames", type=int, default=None, help="random subset of each test set")
    p.add_argument("--hosts", nargs="+", default=list(HOSTS), choices=HOSTS)
    p.add_argument(
        "--no-ablation", dest="ablation", action="store_false", help="skip MACE's local and mp variants"
    )
    p.add_argument(
        "--no-controls",
        dest="controls",
        action="store_false",
        help="skip <host>+finetuned (the fitted host fine-tuned like the upgrade, without GGND)",
    )
    p.add_argument(
        "--models", nargs="+", default=None, help="evaluate / run / report only these (all are fitted)"
    )
    p.add_argument("--epochs", type=int, default=100, help="training epochs of every fit")
    # MACE (defaults: fit_command's 'medium' size, batch size 5)
    p.add_argument("--size", default="medium", help="MACE size: ggnd_plugin.adapters.mace.training.SIZES key")
    p.add_argument("--hidden-irreps", default=None, help="MACE: override the size's hidden irreps")
    p.add_argument("--batch-size", type=int, default=None, help="MACE: override the size's batch size")
    # NequIP and PaiNN: the adapters' sizes (nequip.SIZES, schnetpack.SIZES)
    p.add_argument("--nequip-size", default="small")
    p.add_argument("--schnetpack-size", default="small")
    # GGND
    p.add_argument("--ggnd-channels", type=int, default=16)
    p.add_argument("--ggnd-heads", type=int, default=4)
    p.add_argument("--ggnd-steps", type=int, default=3)
    p.add_argument("--ggnd-lmax", type=int, default=1)
    p.add_argument("--ggnd-horizon", type=float, default=1.0)
    p.add_argument(
        "--ggnd-drop-interaction",
        action="store_true",
        help="MACE: GGND models fitted from scratch get one MACE interaction fewer than the plain model "
        "(the paper removed one message-passing layer 'for a fair comparison')",
    )
    p.add_argument("--finetune-epochs", type=int, default=30)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--finetune-batch-size", type=int, default=5)
    # stability
    p.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES))
    p.add_argument(
        "--side-temperatures",
        type=float,
        nargs="+",
        default=None,
        help="temperatures of the upgrade, control and ablation models (default: --temperatures)",
    )
    p.add_argument("--replicas", type=int, default=5)
    p.add_argument("--time-ps", type=float, default=10.0, help="horizon (the paper: 100 ps)")
    p.add_argument("--md-dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--parallel", action="store_true", help="fit / run MD of independent models concurrently")
    p.add_argument("--jobs", type=int, default=3, help="with --parallel: MD processes at a time")
    p.add_argument("--md-threads", type=int, default=None, help="torch threads of each stability run")
    p.add_argument(
        "--stages", default="all", help="comma list of fit,evaluate,stability,overhead,report or all"
    )
    p.add_argument("--overhead-md-steps", type=int, default=20)
    p.add_argument("--stability-model", default=None, help=argparse.SUPPRESS)  # worker of --parallel
    p.add_argument(
        "--smoke", action="store_true", help="tiny CPU run: 24 frames, tiny models, 2 epochs, 0.02 ps"
    )
    p.add_argument(
        "--study",
        action="store_true",
        help="the pre-registered study of docs/study-protocol.md (benchmarks/study_3bpa.py): its settings "
        "are fixed there; --out (default build/study_3bpa), --results (default "
        "benchmarks/results/study_3bpa.json), --jobs, --device and --stages apply",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --results if it exists (it is refused otherwise, unless it lies in the --out cache)",
    )
    args = p.parse_args(argv)
    if args.study:
        if args.out == ROOT / "build" / "paper_3bpa":
            args.out = ROOT / "build" / "study_3bpa"
        if args.results == ROOT / "benchmarks" / "results" / "paper_3bpa.json":
            args.results = ROOT / "benchmarks" / "results" / "study_3bpa.json"
    if args.ggnd_drop_interaction and set(args.hosts) != {"mace"}:
        p.error("--ggnd-drop-interaction is implemented for MACE only: run it with --hosts mace")
    if args.smoke:
        args.train_frames, args.test_frames, args.size, args.epochs = 24, 6, "tiny", 2
        args.nequip_size = args.schnetpack_size = "tiny"
        args.finetune_epochs, args.replicas, args.time_ps = 1, 5, 0.02
        args.overhead_md_steps = 3
        args.ggnd_channels, args.ggnd_heads, args.ggnd_steps = 8, 2, 2
        if args.out == ROOT / "build" / "paper_3bpa":
            args.out = ROOT / "build" / "paper_3bpa_smoke"
        if args.results == ROOT / "benchmarks" / "results" / "paper_3bpa.json":
            args.results = args.out / "paper_3bpa.json"
    reports = args.stages == "all" or "report" in args.stages.split(",")
    in_cache = args.results.resolve().is_relative_to(args.out.resolve())
    if reports and args.results.exists() and not in_cache and not args.overwrite and not args.stability_model:
        # Checked before the hours of fitting and MD, not when the results are written.
        p.error(f"{args.results} already exists; pass --overwrite to replace it (or choose --results)")
    return args


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
def ggnd_config(args, variant: str = "diffusion"):
    from ggnd_plugin.block import GGNDConfig

    # The local variant (paper table 3, dagger) diffuses within the host's own cutoff: the MACE adapter
    # fills local_cutoff in from the model's r_max.
    return GGNDConfig(
        channels=args.ggnd_channels,
        lmax=args.ggnd_lmax,
        heads=args.ggnd_heads,
        steps=args.ggnd_steps,
        horizon=args.ggnd_horizon,
        variant=variant,
    )


def config_of(args, name: str):
    variant = KINDS[parse_model(name)[1]]
    return None if variant is None else ggnd_config(args, variant)


def fit_mace(args, data, name: str, config) -> dict[str, Any]:
    """MACEAdapter.fit's command (fit_command + run_fit), with this run's device, E0s and size."""
    from ggnd_plugin.adapters.host_trainer import FitRequest
    from ggnd_plugin.adapters.mace.training import fit_command, run_fit

    work = args.out / "models" / name
    command, model_path = fit_command(
        FitRequest(data["train"], data["valid"], work, config, args.epochs, args.seed, args.size, args.device)
    )
    e0s = json.loads(data["e0s"].read_text())
    command = set_option(command, "default_dtype", args.dtype)
    command = set_option(command, "E0s", "{" + ", ".join(f"{z}: {e}" for z, e in e0s.items()) + "}")
    if args.hidden_irreps:
        command = set_option(command, "hidden_irreps", args.hidden_irreps)
    if args.batch_size:
        command = set_option(command, "batch_size", args.batch_size)
        command = set_option(command, "valid_batch_size", args.batch_size)
    if args.ggnd_drop_interaction and config is not None:
        interactions = int(command[command.index("--num_interactions") + 1])
        if interactions < 2:
            raise SystemExit(f"--ggnd-drop-interaction: MACE size {args.size!r} has only one interaction")
        command = set_option(command, "num_interactions", interactions - 1)
    # MACE's own checkpoints make a fit stopped by a time limit resume where it stopped.
    command.append("--restart_latest")
    t0 = time.perf_counter()
    run_fit(command, work, args.epochs, label=name)
    seconds = time.perf_counter() - t0
    return {"path": str(model_path), "seconds": seconds, "epochs": args.epochs, "command": command[2:]}


def fit_other_host(args, data, name: str, config) -> dict[str, Any]:
    """NequIPAdapter.fit / SchNetPackAdapter.fit (nequip-train, spktrain) with this run's size and device.

    These hosts take their per-element energy offsets from the training data (NequIP's statistics
    manager, SchNetPack's RemoveOffsets), not from the isolated-atom energies MACE is given.
    """
    from ggnd_plugin.registry import get

    host, _ = parse_model(name)
    adapter = get(host)
    work = args.out / "models" / name
    size = args.nequip_size if host == "nequip" else args.schnetpack_size
    t0 = time.perf_counter()
    model = adapter.fit(
        data["train"], data["valid"], work, config, args.epochs, args.seed, size, device=args.device
    )
    seconds = time.perf_counter() - t0
    path = adapter.save(model.cpu(), work / f"{name.replace('+', '_')}{adapter.file_suffixes[0]}")
    return {"path": str(path), "seconds": seconds, "epochs": args.epochs, "size": size}


def finetune_upgrade(args, data, name: str, baseline_path: str) -> dict[str, Any]:
    """``<host>+ggnd-upgrade``: attach GGND to the fitted host and fine-tune; ``<host>+finetuned``: the same
    fine-tuning without GGND, so the upgrade's gain can be told apart from that of more training."""
    import torch

    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.registry import get
    from ggnd_plugin.training import FinetuneSettings, finetune

    host, _ = parse_model(name)
    adapter = get(host)
    torch.manual_seed(args.seed)
    upgraded = adapter.load(Path(baseline_path), args.device)
    if parse_model(name)[1] == "ggnd-upgrade":
        upgraded = adapter.attach(upgraded, ggnd_config(args))
    target = args.out / "models" / name / f"{name.replace('+', '_')}{adapter.file_suffixes[0]}"
    settings = FinetuneSettings(
        epochs=args.finetune_epochs, lr=args.finetune_lr, batch_size=args.finetune_batch_size, seed=args.seed
    )
    t0 = time.perf_counter()
    result = finetune(
        adapter,
        upgraded,
        read_labelled(data["train"]),
        read_labelled(data["valid"]),
        target,
        settings,
        resume=(target.parent / (target.name + ".checkpoint.pt")).exists(),
    )
    return {
        "path": str(target),
        "seconds": time.perf_counter() - t0,
        "epochs": args.finetune_epochs,
        "settings": asdict(settings),
        "history": [asdict(r) for r in result.history],
    }


def stage_fit(args, data) -> dict[str, str]:
    names = model_names(args)
    stages = {name: stage_cache(args.out, f"fit-{name}") for name in names}

    def scratch(name):
        if not stages[name].done():
            host, _ = parse_model(name)
            _say(f"fitting {name} through {host}'s own training command on {args.device}")
            fit = fit_mace if host == "mace" else fit_other_host
            stages[name].write(fit(args, data, name, config_of(args, name)))
        return stages[name].read()

    def baseline_then_upgrade(host):
        base = scratch(host)
        for kind, what in (
            ("ggnd-upgrade", "upgrading the fitted {} model with GGND and fine-tuning it"),
            ("finetuned", "fine-tuning the fitted {} model without GGND (control)"),
        ):
            name = model_name(host, kind)
            if name in stages and not stages[name].done():
                _say(what.format(host))
                stages[name].write(finetune_upgrade(args, data, name, base["path"]))

    derived = ("baseline", "ggnd-upgrade", "finetuned")
    jobs = [(baseline_then_upgrade, (host,)) for host in args.hosts]
    jobs += [(scratch, (name,)) for name in names if parse_model(name)[1] not in derived]
    if args.parallel:
        with ThreadPoolExecutor(2) as pool:
            for future in [pool.submit(fn, *fn_args) for fn, fn_args in jobs]:
                future.result()
    else:
        for fn, fn_args in jobs:
            fn(*fn_args)
    return {name: stages[name].read()["path"] for name in selected_models(args)}


def stage_evaluate(args, data, files) -> dict[str, Any]:
    """Errors of each model on the labelled tests and the validation split; one cached stage per model."""
    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.registry import get
    from ggnd_plugin.training import evaluate

    tests = None
    for name, path in files.items():
        stage = stage_cache(args.out, f"evaluate-{name}")
        if stage.done():
            continue
        if tests is None:
            tests = {t: read_labelled(data[f"test_{t}"]) for t in LABELLED_TESTS}
            tests["valid"] = read_labelled(data["valid"])
        _say(f"evaluating {name} on " + ", ".join(f"{t} ({len(f)} frames)" for t, f in tests.items()))
        adapter = get(parse_model(name)[0])
        model = adapter.load(Path(path), args.device)
        t0 = time.perf_counter()
        metrics = {t: evaluate(adapter, model, frames, batch_size=16) for t, frames in tests.items()}
        stage.write({**metrics, "seconds": time.perf_counter() - t0})
    return {name: stage_cache(args.out, f"evaluate-{name}").read() for name in files}


def protocol_of(args, temperature: float):
    from ggnd_plugin.md import StabilityProtocol

    return StabilityProtocol(
        temperatures=(temperature,), replicas=args.replicas, time_ps=args.time_ps, seed=args.seed
    )


# The paper's table 1 rows: these models run at every ``--temperatures``; the upgrade, its control and
# the ablation variants at ``--side-temperatures`` (default: the same).
MAIN_KINDS = ("baseline", "ggnd-scratch")


def temperatures_of(args, name: str) -> list[float]:
    if parse_model(name)[1] in MAIN_KINDS or args.side_temperatures is None:
        return list(args.temperatures)
    return list(args.side_temperatures)


def start_set(temperature: float) -> str:
    """The labelled set MD replicas start from. No 1200 K set exists: 1200 K replicas start from 600 K
    frames, with velocities drawn at 1200 K."""
    return "test_300K" if temperature <= 300.0 else "test_600K"


def _stability_stage(args, name: str, temperature: float):
    return stage_cache(args.out, f"stability-{name}-{temperature:g}K")


def stability_one(args, data, name: str, path: str, temperature: float) -> dict[str, Any]:
    """run_stability for one model at one temperature into out/stability/<name>/<T>K; a cached stage.

    One stage per (model, temperature) so a stopped study resumes at that grain and a temperature can
    be added to a finished study without rerunning the others.
    """
    stage = _stability_stage(args, name, temperature)
    if stage.done():
        return stage.read()
    import torch

    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.md import run_stability
    from ggnd_plugin.md.report import summarise, write_results
    from ggnd_plugin.registry import get

    if args.md_threads:
        torch.set_num_threads(args.md_threads)
    adapter = get(parse_model(name)[0])
    dtype = getattr(torch, args.md_dtype)
    model = adapter.torchsim_model(adapter.load(Path(path), args.device), args.device, dtype)
    start_file = data[start_set(temperature)]
    out = args.out / "stability" / name.replace("+", "_") / f"{temperature:g}K"
    t0 = time.perf_counter()
    result = run_stability(
        {name: model},
        {temperature: read_labelled(start_file)},
        read_labelled(data["train"]),
        protocol_of(args, temperature),
        out_dir=out,
        resume=(out / "checkpoints").exists(),
        sources={"start": {f"{temperature:g}": str(start_file)}, "reference": str(data["train"])},
    )
    seconds = time.perf_counter() - t0
    write_results(result, out)
    return stage.write(
        {"summary": summarise(result), "protocol": result.protocol, "seconds": seconds, "dir": str(out)}
    )


def stage_stability(args, data, files) -> dict[str, Any]:
    names = list(files)
    jobs = [(name, t) for name in names for t in temperatures_of(args, name)]
    todo = [(name, t) for name, t in jobs if not _stability_stage(args, name, t).done()]
    t0 = time.perf_counter()
    if args.parallel and len(todo) > 1:
        _say(
            f"stability of {len(todo)} (model, temperature) pairs, {args.jobs} processes at a time "
            f"(logs in {args.out}/stability)"
        )
        (args.out / "stability").mkdir(parents=True, exist_ok=True)
        waiting, running, failed = list(todo), [], []
        while waiting or running:
            while waiting and len(running) < args.jobs:
                name, t = waiting.pop(0)
                log = open(args.out / "stability" / f"{name.replace('+', '_')}-{t:g}K.log", "w")
                argv = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    *sys.argv[1:],
                    "--stability-model",
                    f"{name}@{t:g}",
                ]
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
                running.append((f"{name} at {t:g} K", proc, log))
            time.sleep(1.0)
            for item in list(running):
                label, proc, log = item
                if proc.poll() is not None:
                    running.remove(item)
                    log.close()
                    _say(f"stability of {label}: {'done' if proc.returncode == 0 else 'FAILED'}")
                    if proc.returncode != 0:
                        failed.append(label)
        if failed:
            raise SystemExit(f"stability failed for {failed}; see the logs in {args.out}/stability")
    else:
        for name, t in todo:
            _say(
                f"stability of {name} at {t:g} K: {args.replicas} replicas, {args.time_ps} ps NVE, "
                "one batched TorchSim state"
            )
            stability_one(args, data, name, files[name], t)
    results = {}
    for name in names:
        stages = {f"{t:g}K": _stability_stage(args, name, t).read() for t in temperatures_of(args, name)}
        results[name] = {
            "summary": [row for stage in stages.values() for row in stage["summary"]],
            "protocols": {t: stage["protocol"] for t, stage in stages.items()},
            "seconds": sum(stage["seconds"] for stage in stages.values()),
            "dirs": [stage["dir"] for stage in stages.values()],
        }
    for host in args.hosts:
        combine_plots(args, host, {n: r for n, r in results.items() if parse_model(n)[0] == host})
    return {"models": results, "seconds_this_call": time.perf_counter() - t0}


def combine_plots(args, host: str, results) -> None:
    """Survival and max-bond-deviation plots of one host's models together (the package's plots)."""
    from ggnd_plugin.md.plots import plot_max_deviation, plot_survival
    from ggnd_plugin.md.report import load_timeseries
    from ggnd_plugin.md.stability import StabilityResult

    rows, series, protocol = [], {}, None
    for folder in (Path(d) for name in results for d in results[name]["dirs"]):
        record = json.loads((folder / "results.json").read_text())
        protocol = protocol or record["protocol"]
        for row in record["replicas"]:
            row = dict(row)
            row["max_deviation"] = row.pop("max_deviation_A", None)
            rows.append(row)
        series.update(load_timeseries(folder / "timeseries.npz"))
    combined = StabilityResult(protocol=protocol, rows=rows, series=series)
    folder = args.out / "stability"
    plot_survival(combined, folder / f"paper_3bpa_{host}_survival.png")
    plot_max_deviation(combined, folder / f"paper_3bpa_{host}_max_bond_deviation.png")


def stage_overhead(args, data, files) -> dict[str, Any]:
    """Table 5 per host: ``<host>`` against ``<host>+ggnd-scratch``, side by side in one process."""
    from ggnd_overhead import measure_pair, print_table

    records = {}
    for host in args.hosts:
        stage = stage_cache(args.out, f"overhead-{host}")
        if not stage.done():
            _say(
                f"overhead of GGND on {host}: training step, MD step, peak memory (plain and GGND alternating)"
            )
            stage.write(
                measure_pair(
                    host,
                    files[host],
                    files[model_name(host, "ggnd-scratch")],
                    str(data["train"]),
                    device=args.device,
                    dtype=args.md_dtype,
                    batch_size=args.batch_size or 5,
                    replicas=args.replicas * len(args.temperatures),
                    md_steps=args.overhead_md_steps,
                )
            )
        records[host] = stage.read()
    print_table(list(records.values()))
    return records


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------
def hardware(device: str) -> dict[str, Any]:
    import torch

    info = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(args, files, fits, metrics, stability, overhead) -> dict[str, Any]:
    from ggnd_plugin.md.stability import package_versions

    names = list(files)
    records = []
    by_model_t = {}
    for name in names:
        for row in stability["models"][name]["summary"]:
            by_model_t[(name, float(row["temperature_K"]))] = row
    for name in names:
        host, kind = parse_model(name)
        for t in ("300K", "600K", "1200K"):
            m = metrics[name].get(t)
            s = by_model_t.get((name, float(t[:-1])))
            ggnd = KINDS[kind] is not None
            paper = PAPER.get((host, ggnd, t)) if kind in ("baseline", "ggnd-scratch") else None
            records.append(
                {
                    "model": name,
                    "host": host,
                    "ggnd": ggnd,
                    "kind": kind,
                    "variant": KINDS[kind],
                    "test": t,
                    "energy_mae": m["energy_mae"] if m else None,
                    "energy_per_atom_mae": m["energy_per_atom_mae"] if m else None,
                    "forces_mae": m["forces_mae"] if m else None,
                    "n_test_frames": m["n_frames"] if m else None,
                    "stability_ps_mean": s["mean_ps"] if s else None,
                    "stability_ps_std": s["std_ps"] if s else None,
                    "stability_ps_min": s["min_ps"] if s else None,
                    "failed": s["failed"] if s else None,
                    "replicas": s["replicas"] if s else None,
                    "horizon_ps": stability["models"][name]["protocols"][t]["time_ps"] if s else None,
                    "start_frames": start_set(float(t[:-1])),
                    "paper": dict(zip(("energy_mae", "forces_mae", "stability_ps"), paper, strict=True))
                    if paper
                    else None,
                }
            )
    protocol = dict(next(iter(stability["models"][names[0]]["protocols"].values())))
    protocol["temperatures"] = sorted({t for name in names for t in temperatures_of(args, name)})
    payload = {
        "settings": {
            "data": str(args.data),
            "seed": args.seed,
            "train_frames": sum(1 for _ in open(args.out / "data" / "train.xyz") if _.strip().isdigit()),
            "valid_frames": sum(1 for _ in open(args.out / "data" / "valid.xyz") if _.strip().isdigit()),
            "hosts": list(args.hosts),
            "epochs": args.epochs,
            "mace": {"size": args.size, "hidden_irreps": args.hidden_irreps, "batch_size": args.batch_size},
            "nequip_size": args.nequip_size,
            "schnetpack_size": args.schnetpack_size,
            "dtype": args.dtype,
            "ggnd": ggnd_config(args).to_dict(),
            "ggnd_drop_interaction": args.ggnd_drop_interaction,
            "finetune": {
                "epochs": args.finetune_epochs,
                "lr": args.finetune_lr,
                "batch_size": args.finetune_batch_size,
            },
            "fit_commands": {name: fits[name].get("command") for name in names if "command" in fits[name]},
            "stability_protocol": {
                k: protocol.get(k)
                for k in ("ensemble", "timestep_fs", "time_ps", "replicas", "temperatures", "seed", "monitor")
            },
            "stability_temperatures": {name: temperatures_of(args, name) for name in names},
            "md_dtype": args.md_dtype,
            "argv": sys.argv[1:],
        },
        "hardware": hardware(args.device),
        "versions": package_versions(),
        "wall_s": {
            **{f"fit {name}": fits[name]["seconds"] for name in names},
            **{f"evaluate {name}": metrics[name].get("seconds") for name in names},
            **{f"stability {name}": stability["models"][name]["seconds"] for name in names},
        },
        "fit_s_per_epoch": {
            name: fits[name]["seconds"] / max(1, fits[name].get("epochs") or 1) for name in names
        },
        "validation": {name: metrics[name]["valid"] for name in names},
        "finetune_history": {
            name: fits[name].get("history") for name in names if parse_model(name)[1] == "ggnd-upgrade"
        },
        "overhead": overhead,
        "paper_table1": [
            {"host": h, "ggnd": g, "test": t, "energy_mae": e, "forces_mae": f, "stability_ps": s}
            for (h, g, t), (e, f, s) in PAPER.items()
        ],
        "paper_table3_visnet": [
            {"variant": v, "test": t, "energy_mae": e, "forces_mae": f, "stability_ps": s}
            for (v, t), (e, f, s) in PAPER_ABLATION.items()
        ],
        "paper_table5_visnet_ratios": PAPER_OVERHEAD,
        "records": records,
    }
    atomic_write_text(args.results, json.dumps(payload, indent=2, default=str))
    return payload


def print_table(payload) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="3BPA (ours) — E MAE (eV), F MAE (eV/Å), stability (ps, mean ± std / horizon)")
    for col in ("model", "test", "E MAE", "F MAE", "stability", "failed", "paper E / F / S"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in payload["records"]:
        paper = r["paper"]
        table.add_row(
            r["model"],
            r["test"],
            "—" if r["energy_mae"] is None else f"{r['energy_mae']:.4f}",
            "—" if r["forces_mae"] is None else f"{r['forces_mae']:.4f}",
            "not run"
            if r["stability_ps_mean"] is None
            else f"{r['stability_ps_mean']:.3f} ± {r['stability_ps_std']:.3f} / {r['horizon_ps']:g}",
            "" if r["failed"] is None else f"{r['failed']}/{r['replicas']}",
            f"{paper['energy_mae']} / {paper['forces_mae']} / {paper['stability_ps']}" if paper else "",
        )
    Console().print(table)


def _cell(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _stability_cell(record) -> str:
    if record is None or record["stability_ps_mean"] is None:
        return "not run"
    return (
        f"{record['stability_ps_mean']:.3f} ± {record['stability_ps_std']:.3f} "
        f"({record['failed']}/{record['replicas']} failed) / {record['horizon_ps']:g} ps"
    )


def markdown_tables(payload) -> str:
    """The tables of docs/results.md from a results JSON: table 1 per host, table 3, table 5."""
    records = {(r["model"], r["test"]): r for r in payload["records"]}
    hosts = payload["settings"]["hosts"]
    lines = []
    for host in hosts:
        kinds = [
            k
            for k in ("baseline", "ggnd-scratch", "ggnd-upgrade", "finetuned")
            if any(m == model_name(host, k) for m, _ in records)
        ]
        if not kinds:
            continue
        paper = host in ("mace", "nequip")
        header = "| test | metric |"
        if paper:
            header += f" paper {HOST_LABEL[host]} | paper +GGND |"
        header += "".join(f" ours `{model_name(host, k)}` |" for k in kinds)
        lines += [f"### {HOST_LABEL[host]}", "", header, "|" + "---|" * (header.count("|") - 1)]
        for test in ("300K", "600K", "1200K"):
            for metric, key in (("E (eV)", "energy_mae"), ("F (eV/Å)", "forces_mae"), ("S (ps)", None)):
                row = f"| {test} | {metric} |"
                if paper:
                    for ggnd in (False, True):
                        e, f, s = PAPER[(host, ggnd, test)]
                        row += f" {e if key == 'energy_mae' else f if key == 'forces_mae' else s} |"
                for kind in kinds:
                    r = records.get((model_name(host, kind), test))
                    row += f" {_stability_cell(r) if key is None else _cell(r and r[key])} |"
                lines.append(row)
        lines.append("")
    if "mace" in hosts and any(model_name("mace", k) in {m for m, _ in records} for k in ABLATION_KINDS):
        lines += [
            "### Ablation (paper table 3; the paper's is on VisNet, ours on MACE)",
            "",
            "| model | variant | E 300 K | F 300 K | E 600 K | F 600 K | S 1200 K | paper (VisNet) F 600 K, S 1200 K |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for kind, variant in (
            ("baseline", "baseline"),
            ("ggnd-local", "local"),
            ("ggnd-mp", "mp"),
            ("ggnd-scratch", "diffusion"),
        ):
            name = model_name("mace", kind)
            r300, r600, r1200 = (records.get((name, t)) for t in ("300K", "600K", "1200K"))
            if r300 is None:
                continue
            paper600, paper1200 = PAPER_ABLATION[(variant, "600K")], PAPER_ABLATION[(variant, "1200K")]
            lines.append(
                f"| `{name}` | {variant} | {_cell(r300['energy_mae'])} | {_cell(r300['forces_mae'])} | "
                f"{_cell(r600['energy_mae'])} | {_cell(r600['forces_mae'])} | {_stability_cell(r1200)} | "
                f"{paper600[1]}, {paper1200[2]} |"
            )
        lines.append("")
    overhead = payload.get("overhead") or {}
    if overhead:
        lines += [
            "### Overhead (paper table 5: VisNet on an RTX 3090)",
            "",
            "| host | train step (s) | MD step (s) | train peak (MiB) | MD peak (MiB) | ratios train / MD time, train / MD memory |",
            "|---|---|---|---|---|---|",
        ]
        for host, o in overhead.items():
            ratio = o["ratios"]

            def pair(values, scale=1.0, digits=3):
                return f"{values['baseline'] / scale:.{digits}f} → {values['ggnd'] / scale:.{digits}f}"

            lines.append(
                f"| {HOST_LABEL[host]} | {pair(o['train_step_s'])} | {pair(o['md_step_s'])} | "
                f"{pair(o['train_peak_bytes'], 2**20, 0)} | {pair(o['md_peak_bytes'], 2**20, 0)} | "
                f"{ratio['train_time']:.2f} / {ratio['md_time']:.2f}, "
                f"{_cell(ratio['train_memory'], 2)} / {_cell(ratio['md_memory'], 2)} |"
            )
        p5 = PAPER_OVERHEAD
        lines.append(
            f"| paper (VisNet) | | | | | {p5['train_time']:.2f} / {p5['md_time']:.2f}, "
            f"{p5['train_memory']:.2f} / {p5['md_memory']:.2f} |"
        )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.study:
        from study_3bpa import run

        return run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    from ggnd_plugin.registry import get

    for host in args.hosts:
        get(host).require()
    data = prepare_data(args)
    if args.stability_model:  # a worker of --parallel
        name, _, temperature = args.stability_model.partition("@")
        path = stage_cache(args.out, f"fit-{name}").read()["path"]
        stability_one(args, data, name, path, float(temperature))
        return 0
    stages = set(
        ("fit", "evaluate", "stability", "overhead", "report")
        if args.stages == "all"
        else args.stages.split(",")
    )
    started = time.perf_counter()
    files = stage_fit(args, data)  # cached after the first call
    metrics = stage_evaluate(args, data, files) if "evaluate" in stages else None
    stability = stage_stability(args, data, files) if "stability" in stages else None
    overhead = stage_overhead(args, data, files) if "overhead" in stages else None
    if metrics is None or stability is None or "report" not in stages:
        _say(f"stages {sorted(stages)} done in {time.perf_counter() - started:.0f} s")
        return 0
    fits = {name: stage_cache(args.out, f"fit-{name}").read() for name in files}
    payload = write_json(args, files, fits, metrics, stability, overhead)
    print_table(payload)
    atomic_write_text(args.out / "tables.md", markdown_tables(payload))
    _say(
        f"results in {args.results}; markdown tables in {args.out / 'tables.md'}; plots in {args.out / 'stability'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
