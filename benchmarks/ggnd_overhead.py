"""What a GGND block costs a host model: the paper's table 5 (training time, MD time, memory) as ratios.

For one host, a plain model and the same model with GGND (two model files the host's adapter loads),
measured side by side in one run:

- **training step**: the package's common training step (``ggnd_plugin.training.loss_of``: energy and
  force loss, forward and backward) on the same batch of training frames; the two models alternate,
  the median over repeats is kept after one warm-up each. Per epoch = step x batches per epoch;
- **MD step**: batched NVE velocity Verlet in TorchSim (``ggnd_plugin.md.run_stability``, the stability
  runner) of ``--replicas`` replicas at 300 K; the difference of two run lengths removes set-up;
- **peak memory** of one training step and of one force call on the MD batch: on CUDA the rise of
  ``torch.cuda.max_memory_allocated``; on CPU, in a fresh subprocess started with
  ``MALLOC_MMAP_THRESHOLD_=131072`` (the working-set method of ``block_scaling.py``), the rise of the
  resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` once the model and
  data are loaded) above the resident set at that moment. It is the first call, so it includes the
  host code's first-call allocations, the same for both models.

    python benchmarks/ggnd_overhead.py --host mace BASE.model GGND.model --frames train.xyz \
        --json overhead.json

``benchmarks/paper_3bpa.py`` calls :func:`measure_pair` for every host (its ``overhead`` stage).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
PINNED_MMAP_THRESHOLD = 131072


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_high_water_mark() -> int:
    """Reset VmHWM to the current resident set (Linux >= 4.0); return that resident set."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_bytes("VmRSS")


def _load(host: str, path: str, device: str, dtype: str):
    import torch

    from ggnd_plugin.registry import get

    adapter = get(host)
    model = adapter.load(Path(path), device)
    if host != "schnetpack":  # PaiNN keeps the float32 it was trained in; its adapter casts I/O
        model = model.to(getattr(torch, dtype))
    return adapter, model


def train_step_seconds(adapters, models, batch, device: str, repeats: int) -> list[float]:
    """Median seconds of loss + backward per model, the models alternating within each repeat."""
    from ggnd_plugin.training import FinetuneSettings, loss_of

    settings = FinetuneSettings()
    times: list[list[float]] = [[] for _ in models]
    for repeat in range(repeats + 1):  # the first round is the warm-up
        for k, (adapter, model) in enumerate(zip(adapters, models, strict=True)):
            model.train()
            model.zero_grad(set_to_none=True)
            _sync(device)
            began = time.perf_counter()
            loss_of(adapter, model, batch, settings, training=True).backward()
            _sync(device)
            if repeat:
                times[k].append(time.perf_counter() - began)
    return [statistics.median(t) for t in times]


def md_step_seconds(
    adapters,
    models,
    start,
    reference,
    device: str,
    dtype: str,
    replicas: int,
    steps: int,
    compiled=None,
    ts_models=None,
):
    """Seconds per batched MD step (all replicas) per model, from the difference of two run lengths.

    ``compiled[k]`` True: model k's GGND blocks run compiled (``compile_blocks`` on the TorchSim model;
    compilation happens in the warm-up run, before either measured run). ``ts_models``: TorchSim models
    already built (and compiled) to run instead, so one compilation serves several measurements.
    """
    import torch

    from ggnd_plugin.block_compile import compile_blocks
    from ggnd_plugin.md.stability import StabilityProtocol, run_stability

    torch_dtype = getattr(torch, dtype)
    if ts_models is None:
        ts_models = [a.torchsim_model(m, device, torch_dtype) for a, m in zip(adapters, models, strict=True)]
        for ts_model, flag in zip(ts_models, compiled or [False] * len(ts_models), strict=True):
            if flag:
                compile_blocks(ts_model)

    # CPU seconds of this process on the CPU (the runs are single-threaded: other jobs on a shared machine
    # do not count), wall seconds on a GPU.
    clock = time.perf_counter if str(device).startswith("cuda") else time.process_time

    def run(ts_model, n_steps):
        protocol = StabilityProtocol(
            temperatures=(300.0,),
            replicas=replicas,
            time_ps=n_steps * 1e-3,
            threshold=100.0,
            seed=1,
        )
        _sync(device)
        began = clock()
        run_stability({"m": ts_model}, start, reference, protocol, progress=False)
        _sync(device)
        return clock() - began

    for ts in ts_models:  # first calls (lazy set-up, compilation) stay out of both measured runs
        run(ts, 2)
    short = [run(ts, 2) for ts in ts_models]
    long = [run(ts, 2 + steps) for ts in ts_models]
    return [(b - a) / steps for a, b in zip(short, long, strict=True)]


def memory_in_this_process(
    host: str, path: str, frames: str, batch_size: int, phase: str, device: str, dtype: str
):
    """Peak bytes of one training step (``phase="train"``) or one force call (``"md"``) here."""
    import torch

    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.training import FinetuneSettings, loss_of

    adapter, model = _load(host, path, device, dtype)
    batch = read_labelled(Path(frames))[:batch_size]
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _reset_high_water_mark()
    if phase == "train":
        model.train()
        loss_of(adapter, model, batch, FinetuneSettings(), training=True).backward()
    else:
        model.eval()
        prediction = adapter.predict(model, batch, training=False)
        if not torch.isfinite(prediction.forces).all():
            raise SystemExit("non-finite forces")
    if cuda:
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - baseline)
    return int(_status_bytes("VmHWM") - baseline)


def peak_memory_bytes(
    host: str, path: str, frames: str, batch_size: int, phase: str, device: str, dtype: str
) -> int:
    """:func:`memory_in_this_process` in a fresh subprocess (CPU: with the pinned mmap threshold)."""
    spec = json.dumps(
        {"host": host, "path": str(path), "frames": str(frames), "batch_size": batch_size, "phase": phase}
    )
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(PINNED_MMAP_THRESHOLD))
    command = [sys.executable, __file__, "--memory-worker", spec, "--device", device, "--dtype", dtype]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {path} failed:\n{result.stderr[-2000:]}")
    return int(json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"])


def measure_pair(
    host: str,
    baseline: str,
    ggnd: str,
    frames: str,
    *,
    device: str = "cpu",
    dtype: str = "float64",
    batch_size: int = 5,
    n_train: int | None = None,
    repeats: int = 5,
    replicas: int = 15,
    md_steps: int = 20,
) -> dict[str, Any]:
    """Training step, MD step and peak memory of ``baseline`` and ``ggnd`` (model files), and ratios."""
    import torch

    from ggnd_plugin.data import read_labelled

    structures = read_labelled(Path(frames))
    batch = structures[:batch_size]
    loaded = [_load(host, p, device, dtype) for p in (baseline, ggnd)]
    adapters, models = [a for a, _ in loaded], [m for _, m in loaded]
    n_params = [sum(p.numel() for p in m.parameters()) for m in models]
    train = train_step_seconds(adapters, models, batch, device, repeats)
    for model in models:
        model.zero_grad(set_to_none=True)
        model.eval()
    md = md_step_seconds(
        adapters, models, structures[:replicas], structures, device, dtype, replicas, md_steps
    )
    memory = {
        phase: [
            peak_memory_bytes(
                host, p, frames, batch_size if phase == "train" else replicas, phase, device, dtype
            )
            for p in (baseline, ggnd)
        ]
        for phase in ("train", "md")
    }
    batches_per_epoch = -(-(n_train or len(structures)) // batch_size)
    record = {
        "host": host,
        "models": {"baseline": str(baseline), "ggnd": str(ggnd)},
        "parameters": {"baseline": n_params[0], "ggnd": n_params[1]},
        "device": device,
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "train_batch_size": batch_size,
        "batches_per_epoch": batches_per_epoch,
        "train_step_s": {"baseline": train[0], "ggnd": train[1]},
        "train_epoch_s_estimate": {
            "baseline": train[0] * batches_per_epoch,
            "ggnd": train[1] * batches_per_epoch,
        },
        "md_replicas": replicas,
        "md_step_s": {"baseline": md[0], "ggnd": md[1]},
        "train_peak_bytes": {"baseline": memory["train"][0], "ggnd": memory["train"][1]},
        "md_peak_bytes": {"baseline": memory["md"][0], "ggnd": memory["md"][1]},
        "memory_method": "torch.cuda.max_memory_allocated rise"
        if device.startswith("cuda")
        else "VmHWM rise over the first call in a fresh process, MALLOC_MMAP_THRESHOLD_=131072",
    }
    record["ratios"] = {
        "train_time": train[1] / train[0],
        "md_time": md[1] / md[0],
        "train_memory": _ratio(memory["train"]),
        "md_memory": _ratio(memory["md"]),
    }
    return record


# --------------------------------------------------------------------------------------------------
# Version 1 against version 2: the MD-step overhead of the default block on small 3BPA hosts
# --------------------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FRAMES = ROOT / "ggnd_plugin" / "default_data" / "3bpa" / "3bpa_300K_train.xyz"
HOSTS = ("mace", "nequip", "schnetpack")


def small_host_model(host: str):
    """A random host model of the size the adapters' ``fit(size="small")`` trains (float64, 3BPA's H/C/N/O).

    The weights do not change the cost of a step, so the benchmark needs no training.
    """
    from ggnd_plugin import testing

    if host == "mace":
        from ggnd_plugin.adapters.mace.training import SIZES

        size = SIZES["small"]
        return testing.tiny_mace(
            r_max=size["r_max"],
            num_bessel=8,
            max_ell=3,
            num_interactions=size["num_interactions"],
            hidden_irreps=size["hidden_irreps"],
            MLP_irreps=size["MLP_irreps"],
            avg_num_neighbors=10.0,
            correlation=size["correlation"],
        )
    if host == "nequip":
        from ggnd_plugin.adapters.nequip import SIZES

        size = SIZES["small"]
        return testing.tiny_nequip(r_max=size["cutoff_radius"], **size["model"])
    from ggnd_plugin.adapters.schnetpack import SIZES

    size = SIZES["small"]
    model = testing.tiny_schnetpack(
        "painn",
        n_atom_basis=size["n_atom_basis"],
        n_interactions=size["n_interactions"],
        n_rbf=20,
        cutoff=5.0,
    )
    return model.eval()


def md_overhead_by_version(
    host: str,
    replicas: int,
    *,
    frames: Path = PACKAGE_FRAMES,
    steps: int = 20,
    rounds: int = 3,
    compiled: bool = False,
    device: str = "cpu",
) -> dict[str, Any]:
    """MD step of the host alone, with a version-1 and with a version-2 default block (and, with
    ``compiled``, the version-2 block compiled): medians over ``rounds`` interleaved measurements."""
    import torch

    from ggnd_plugin.block import GGNDConfig
    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.registry import get

    adapter = get(host)
    base = small_host_model(host)
    models = {"host": base}
    for version in (1, 2):
        torch.manual_seed(1)
        upgraded = adapter.attach(base, GGNDConfig(version=version))
        for block in adapter.ggnd_blocks(upgraded):  # a trained-looking readout; the cost is the same
            with torch.no_grad():
                block.readout_state.weight.normal_(std=0.01)
        models[f"v{version}"] = upgraded
    names = list(models)
    flags = [False] * len(names)
    if compiled:
        names.append("v2 compiled")
        models["v2 compiled"] = models["v2"]
        flags.append(True)
    structures = read_labelled(Path(frames))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        seconds = md_step_seconds(
            [adapter] * len(names),
            [models[name] for name in names],
            structures[:replicas],
            structures,
            device,
            "float64",
            replicas,
            steps,
            compiled=flags,
        )
        for name, value in zip(names, seconds, strict=True):
            samples[name].append(value)
    median = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "host": host,
        "replicas": replicas,
        "dtype": "float64",
        "md_steps": steps,
        "rounds": rounds,
        "md_step_s": median,
        "md_step_s_all": samples,
        "ratio_to_host": {name: median[name] / median["host"] for name in names if name != "host"},
        "block": "GGNDConfig(version=1) and GGNDConfig() (version 2): 16 channels, lmax 1, 4 heads, 3 steps",
    }


def print_version_table(records: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    names = [name for name in records[0]["md_step_s"] if name != "host"]
    table = Table(title="MD step (float64, CPU), host + GGND / host: version 1 vs version 2, side by side")
    for column in ("host", "replicas", "host ms", *[f"{name} ms (ratio)" for name in names]):
        table.add_column(column, justify="right")
    for r in records:
        cells = [f"{r['md_step_s'][n] * 1e3:.1f} (x{r['ratio_to_host'][n]:.2f})" for n in names]
        table.add_row(r["host"], str(r["replicas"]), f"{r['md_step_s']['host'] * 1e3:.1f}", *cells)
    Console(width=160).print(table)


def _ratio(pair: list[int]) -> float | None:
    return pair[1] / pair[0] if pair[0] > 0 else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", help="BASELINE GGND model files")
    p.add_argument("--host", default="mace")
    p.add_argument("--frames", help="labelled extxyz: training batch, MD start frames")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--replicas", type=int, default=15)
    p.add_argument("--md-steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--by-version",
        action="store_true",
        help="MD-step overhead of the version-1 and version-2 default blocks on small random hosts "
        "(--hosts, --replicas-list), on the package's 3BPA frames; no model files needed",
    )
    p.add_argument("--hosts", nargs="+", default=list(HOSTS), choices=HOSTS)
    p.add_argument("--replicas-list", type=int, nargs="+", default=[1, 16])
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurements per model (median)")
    p.add_argument("--compiled", action="store_true", help="also the version-2 block compiled")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    args = p.parse_args(argv)
    if args.memory_worker:
        spec = json.loads(args.memory_worker)
        peak = memory_in_this_process(
            spec["host"],
            spec["path"],
            spec["frames"],
            spec["batch_size"],
            spec["phase"],
            args.device,
            args.dtype,
        )
        print(json.dumps({"peak_bytes": peak}))
        return 0
    if args.by_version:
        return _main_by_version(args, p)
    if len(args.models) != 2 or not args.frames:
        p.error("give two model files (baseline, then with GGND) and --frames")
    if args.json:
        from ggnd_plugin.errors import GGNDError
        from ggnd_plugin.safe_io import check_output_file

        inputs = [("model", m) for m in args.models] + [("--frames", args.frames)]
        try:
            check_output_file(args.json, what="--json", overwrite=args.overwrite, inputs=inputs)
        except GGNDError as error:
            p.error(str(error))
    record = measure_pair(
        args.host,
        args.models[0],
        args.models[1],
        args.frames,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        repeats=args.repeats,
        replicas=args.replicas,
        md_steps=args.md_steps,
    )
    print_table([record])
    if args.json:
        from ggnd_plugin.safe_io import atomic_write_text

        atomic_write_text(args.json, json.dumps(record, indent=2))
    return 0


def _main_by_version(args, parser) -> int:
    import platform

    import torch

    from ggnd_plugin.safe_io import atomic_write_text, check_output_file

    if args.json:
        try:
            check_output_file(args.json, what="--json", overwrite=args.overwrite, inputs=[])
        except Exception as error:
            parser.error(str(error))
    torch.set_num_threads(1)
    records = []
    for host in args.hosts:
        for replicas in args.replicas_list:
            print(f"{host}: {replicas} replicas ...", file=sys.stderr, flush=True)
            records.append(
                md_overhead_by_version(
                    host, replicas, steps=args.md_steps, rounds=args.rounds, compiled=args.compiled
                )
            )
            print_version_table(records[-1:])
    print_version_table(records)
    if args.json:
        result = {
            "records": records,
            "machine": {
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "torch_threads": 1,
                "load_average_at_end": os.getloadavg(),
            },
            "method": "ggnd_plugin.md.run_stability, NVE 1 fs, 300 K, float64; seconds per step from the "
            "difference of a 2-step and a (2 + md_steps)-step run; models interleaved; median of rounds",
        }
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def print_table(records: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="GGND overhead: host + GGND / host, measured side by side")
    for column in ("host", "train step (s)", "MD step (s)", "train peak (MiB)", "MD peak (MiB)"):
        table.add_column(column, justify="left" if column == "host" else "right")

    def pair(values, scale=1.0, fmt="{:.3f}"):
        return f"{fmt.format(values['baseline'] / scale)} → {fmt.format(values['ggnd'] / scale)}"

    for r in records:
        ratios = r["ratios"]

        def with_ratio(text, key, ratios=ratios):
            value = ratios[key]
            return text + (f" (x{value:.2f})" if value is not None else " (x —)")

        table.add_row(
            r["host"],
            with_ratio(pair(r["train_step_s"]), "train_time"),
            with_ratio(pair(r["md_step_s"]), "md_time"),
            with_ratio(pair(r["train_peak_bytes"], 2**20, "{:.0f}"), "train_memory"),
            with_ratio(pair(r["md_peak_bytes"], 2**20, "{:.0f}"), "md_memory"),
        )
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
