"""The pre-registered 3BPA stability study: docs/study-protocol.md, run by ``paper_3bpa.py --study``.

Everything the protocol fixes is a constant of ``study_protocol.py``; nothing of it is a command-line
option. The stages (each cached in ``--out``, so the same command resumes where it stopped):

1. data: train_300K split 450 / 50 (seed 0), the labelled test sets, the isolated-atom energies, and
   start set B: the package's own GFN2-xTB frames at 1200 K in the DFT set's atom order
   (``ggnd data reorder``, positions only);
2. fit: MACE and NequIP (size ``tiny``), each alone and with the default GGND block, training seeds 0
   and 1, through the host's own training command until the validation loss has not improved for 15
   epochs (at most 150);
3. evaluate: energy and force errors on test_300K, test_600K and the validation split;
4. stability: ``ggnd_plugin.md.run_stability`` per model and cell (1200 K from start set B, the
   primary cell, first; then 1200 K from start set A, 600 K, 300 K): 20 replicas, NVE, 1 fs, 10 ps;
5. report: every pre-registered endpoint into ``--results`` (``benchmarks/results/study_3bpa.json``),
   Kaplan-Meier and start-set plots into ``docs/img/``, tables printed and written as markdown.

Fits and stability cells run in ``--jobs`` worker processes with one thread each.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from pipeline_3bpa import prepare_data, set_option, stage_cache
from study_protocol import (
    CELLS,
    EPOCHS,
    MD_SEED,
    PACKAGE_1200K,
    PATIENCE,
    PRIMARY,
    REPLICAS,
    SIZE,
    SMOKE,
    SPLIT_SEED,
    TIME_PS,
    VALID_FRAMES,
    study_models,
)


def _say(message: str) -> None:
    print(f"[study_3bpa {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _one_thread() -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"  # the host trainers run in subprocesses and inherit it
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def prepare(args) -> dict[str, Path]:
    """The split, the labelled tests, E0s (paper_3bpa.prepare_data with the protocol's settings) and
    start set B in the DFT atom order."""
    from ggnd_plugin.data import match_atom_order, read_structures
    from ggnd_plugin.safe_io import atomic_path

    args.seed, args.train_frames, args.test_frames = SPLIT_SEED, None, None
    args.valid_fraction = VALID_FRAMES / 500
    if SMOKE:
        args.train_frames, args.test_frames, args.valid_fraction = 24, 6, 0.25
    data = prepare_data(args)
    data["start_1200K_xtb"] = args.out / "data" / "start_1200K_xtb.xyz"
    if not data["start_1200K_xtb"].exists():
        from ase.io import write

        reference = read_structures(data["train"], "0")[0]
        frames = match_atom_order(read_structures(PACKAGE_1200K), reference, str(PACKAGE_1200K))
        with atomic_path(data["start_1200K_xtb"]) as tmp:
            write(tmp, frames, format="extxyz")
    return data


# --------------------------------------------------------------------------------------------------
# Workers (one process each, one thread)
# --------------------------------------------------------------------------------------------------
def fit_worker(args, data, model: dict[str, Any]) -> dict[str, Any]:
    stage = stage_cache(args.out, f"fit-{model['name']}")
    if stage.done():
        return stage.read()
    _one_thread()
    from ggnd_plugin.block import GGNDConfig
    from ggnd_plugin.registry import get

    config = GGNDConfig() if model["ggnd"] else None
    work = args.out / "models" / model["name"]
    started = time.perf_counter()
    if model["host"] == "mace":
        from ggnd_plugin.adapters.host_trainer import FitRequest
        from ggnd_plugin.adapters.mace.training import fit_command, run_fit

        request = FitRequest(
            data["train"], data["valid"], work, config, EPOCHS, model["seed"], SIZE, args.device, PATIENCE
        )
        command, path = fit_command(request)
        e0s = json.loads(Path(data["e0s"]).read_text())
        command = set_option(command, "E0s", "{" + ", ".join(f"{z}: {e}" for z, e in e0s.items()) + "}")
        command.append("--restart_latest")  # MACE's own checkpoints: a stopped fit continues
        run_fit(command, work, EPOCHS, label=model["name"])
        epochs = _mace_epochs(work)
    else:
        adapter = get(model["host"])
        fitted = adapter.fit(
            data["train"],
            data["valid"],
            work,
            config,
            EPOCHS,
            model["seed"],
            SIZE,
            args.device,
            patience=PATIENCE,
        )
        path = adapter.save(fitted.cpu(), work / f"{model['name']}{adapter.file_suffixes[0]}")
        epochs = _nequip_epochs(work)
    return stage.write(
        {"path": str(path), "seconds": time.perf_counter() - started, "epochs_run": epochs, **model}
    )


def _mace_epochs(work: Path) -> int | None:
    """Epochs MACE ran: the last 'Epoch N' of its log (it stops early on --patience)."""
    import re

    numbers = [int(m) for log in work.glob("**/*.log") for m in re.findall(r"Epoch (\d+):", log.read_text())]
    return max(numbers) + 1 if numbers else None


def _nequip_epochs(work: Path) -> int | None:
    import re

    log = work / "nequip-train.log"
    numbers = (
        [int(m) for m in re.findall(r"Epoch (\d+), global step", log.read_text())] if log.exists() else []
    )
    return max(numbers) + 1 if numbers else None


def evaluate_worker(args, data, model: dict[str, Any], path: str) -> dict[str, Any]:
    stage = stage_cache(args.out, f"evaluate-{model['name']}")
    if stage.done():
        return stage.read()
    _one_thread()
    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.registry import get
    from ggnd_plugin.training import evaluate

    adapter = get(model["host"])
    loaded = adapter.load(Path(path), args.device)
    metrics = {
        name: evaluate(adapter, loaded, read_labelled(data[name]), batch_size=16)
        for name in ("test_300K", "test_600K", "valid")
    }
    return stage.write(metrics)


def stability_worker(args, data, model: dict[str, Any], path: str, cell: str) -> dict[str, Any]:
    stage = stage_cache(args.out, f"stability-{model['name']}-{cell}")
    if stage.done():
        return stage.read()
    _one_thread()
    import torch

    from ggnd_plugin.data import read_labelled, read_structures
    from ggnd_plugin.md import StabilityProtocol, run_stability
    from ggnd_plugin.md.report import write_results
    from ggnd_plugin.registry import get

    _, temperature, start = next(c for c in CELLS if c[0] == cell)
    adapter = get(model["host"])
    ts_model = adapter.torchsim_model(adapter.load(Path(path), args.device), args.device, torch.float64)
    protocol = StabilityProtocol(
        temperatures=(temperature,), replicas=REPLICAS, time_ps=TIME_PS, seed=MD_SEED
    )
    out = args.out / "stability" / model["name"] / cell
    started = time.perf_counter()
    result = run_stability(
        {model["name"]: ts_model},
        {temperature: read_structures(data[start])},
        read_labelled(data["train"]),
        protocol,
        out_dir=out,
        resume=(out / "checkpoints").exists(),
        progress=False,
        sources={"start": str(data[start]), "reference": str(data["train"])},
    )
    write_results(result, out, plots=False)
    return stage.write(
        {
            "cell": cell,
            "temperature_K": temperature,
            "start_set": start,
            "seconds": time.perf_counter() - started,
            "rows": [
                {k: row[k] for k in ("replica", "seed", "start_frame", "stability_ps", "failed", "failure")}
                for row in result.rows
            ],
        }
    )


# --------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------
def run(args) -> int:
    """All stages; the report at the end (``--stages report`` alone rewrites it from the cache)."""
    _one_thread()
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare(args)
    models = study_models()
    stages = (
        {"fit", "evaluate", "stability", "report"} if args.stages == "all" else set(args.stages.split(","))
    )
    started = time.perf_counter()
    fits: dict[str, dict] = {}
    if stages & {"fit", "evaluate", "stability"}:
        # Jobs go to the workers by priority, not in the order they become ready: every fit first
        # (fits unlock cells), then the primary cell of every model, then the errors, then the
        # secondary cells in the protocol's order. A run cut short by the machine then holds whole
        # endpoints (the primary one first) rather than a little of each.
        # A heap of (rank, submission number, job); the number is unique, so jobs are never compared.
        ready: list[tuple[int, int, str, dict, str | None, str | None]] = []
        cell_names = [c[0] for c in CELLS]
        numbers = itertools.count()

        def add(kind: str, model: dict, path: str | None, cell: str | None) -> None:
            if kind == "stability":
                rank = 1 if cell == PRIMARY else 3 + cell_names.index(cell)
            else:
                rank = {"fit": 0, "evaluate": 2}[kind]
            heapq.heappush(ready, (rank, next(numbers), kind, model, path, cell))

        def queue_after_fit(model: dict, path: str) -> None:
            if "evaluate" in stages:
                add("evaluate", model, path, None)
            if "stability" in stages:
                for cell, _, _ in CELLS:
                    add("stability", model, path, cell)

        workers = {"fit": fit_worker, "evaluate": evaluate_worker, "stability": stability_worker}
        context = get_context("spawn")  # torch and fork do not mix
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            for model in models:
                if "fit" in stages:
                    add("fit", model, None, None)
                else:
                    fits[model["name"]] = stage_cache(args.out, f"fit-{model['name']}").read()
                    queue_after_fit(model, fits[model["name"]]["path"])
            running = {}
            while ready or running:
                while ready and len(running) < args.jobs:
                    _, _, kind, model, path, cell = heapq.heappop(ready)
                    job_args = (args, data, model) + ((path,) if path else ()) + ((cell,) if cell else ())
                    running[pool.submit(workers[kind], *job_args)] = (kind, model, cell)
                future = next(as_completed(list(running)))
                kind, model, cell = running.pop(future)
                result = future.result()
                label = model["name"] + (f" {cell}" if cell else "")
                left = len(ready) + len(running)
                _say(f"{kind} {label} done ({_brief(kind, result)}); {left} jobs left")
                if kind == "fit":
                    fits[model["name"]] = result
                    queue_after_fit(model, result["path"])
    _say(f"stages {sorted(stages)} done in {time.perf_counter() - started:.0f} s")
    if "report" in stages:
        from study_3bpa_report import write_report

        write_report(args, data, models)
    return 0


def _brief(kind: str, result: dict) -> str:
    if kind == "fit":
        return f"{result['seconds'] / 60:.1f} min, {result.get('epochs_run')} epochs"
    if kind == "stability":
        failed = sum(r["failed"] for r in result["rows"])
        return f"{failed}/{len(result['rows'])} failed, {result['seconds'] / 60:.1f} min"
    return "errors on test_300K, test_600K, valid"


if __name__ == "__main__":
    sys.exit("run the study with: python benchmarks/paper_3bpa.py --study (see docs/study-protocol.md)")
