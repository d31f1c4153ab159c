"""Pre-registered study 2 (docs/study2-protocol.md): upgrading fitted MACE models with GGND, paired.

Everything the protocol fixes is a constant here; nothing of it is a command-line option. Every step
is a job cached in ``--out`` (``jobs/<name>.json``, written when the job finishes, with the commit of
the code that ran it), so the same command resumes where it stopped; the long steps resume inside
themselves too (MACE's checkpoints, ``ggnd finetune --resume``, ``ggnd stability --resume``). Jobs run
through the package's own commands (``ggnd upgrade / finetune / stability / evaluate / scan``,
``ggnd data generate / reorder``, MACE's trainer), as a user would, ``--jobs`` at a time with one thread
each, in the protocol's order: start frames, base fits, fine-tunes, primary cells, evaluations and
scans, the base models' cells, the 600 K and 300 K cells.

    .venv/bin/python benchmarks/study_upgrade.py --jobs 2            # run or resume the study
    .venv/bin/python benchmarks/study_upgrade.py --stages report     # the report from the cache

``GGND_STUDY_SMOKE=1`` runs the same pipeline at toy size into its own ``--out`` (never the study).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline_3bpa import prepare_data, set_option  # noqa: E402
from study_upgrade_protocol import (  # noqa: E402
    BASE_EPOCHS,
    BASE_PATIENCE,
    BASE_SEEDS,
    CELLS,
    DFT,
    EVALUATION_SETS,
    FT_BATCH,
    FT_CAP,
    FT_LR,
    FT_PATIENCE,
    FT_SEED,
    MD_SEED,
    REPLICAS,
    SIZE,
    SMILES,
    SMOKE,
    SPLIT_SEED,
    START_FRAMES,
    START_SEEDS,
    START_SPACING_FS,
    TIME_PS,
    UPGRADE_SEED,
    VALID_FRAMES,
    code_state,
    finished,
    job_file,
    model_path,
    say,
)


def ggnd(*args) -> list[str]:
    return [sys.executable, "-m", "ggnd_plugin.cli", *map(str, args)]


def run(command: list[str], log: Path) -> None:
    """Run a step's command with one thread; its output goes to ``log``; a failure stops the study."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"step failed ({done.returncode}): {' '.join(command)}\n" + "\n".join(tail))


# --------------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str
    priority: int
    action: Any  # callable(out, data) -> dict
    after: tuple[str, ...] = ()
    record: dict = field(default_factory=dict)


def start_frames(out: Path, data: dict[str, Path], seed: int) -> dict:
    folder = out / "data" / f"start_s{seed}"
    command = ggnd(
        "data", "generate", "--smiles", SMILES, "--name", "start", "--temperature", "1200",
        "--frames", START_FRAMES, "--spacing-fs", START_SPACING_FS, "--equilibration-ps", 1,
        "--timestep-fs", 0.5, "--friction", 0.01, "--seed", seed, "--no-progress", "-o", folder,
    )  # fmt: skip
    if (folder / ".checkpoint").exists():
        command.append("--resume")
    run(command, out / "logs" / f"start-s{seed}.log")
    reordered = out / "data" / f"start_s{seed}_dft_order.xyz"
    reordered.unlink(missing_ok=True)
    run(
        ggnd("data", "reorder", folder / "start_1200K.xyz", "--like", data["train"], "-o", reordered),
        out / "logs" / f"start-s{seed}.log",
    )
    return {"frames": str(reordered)}


def merged_start_frames(out: Path) -> Path:
    """The 20 start frames of the primary cell, trajectories in seed order (positions only)."""
    from ase.io import read, write

    from ggnd_plugin.safe_io import atomic_path

    path = out / "data" / "start_1200K.xyz"
    if not path.exists():
        frames = []
        for seed in START_SEEDS:
            frames += read(finished(out, f"start-s{seed}")["frames"], ":")
        for atoms in frames:
            atoms.calc = None
        with atomic_path(path) as tmp:
            write(tmp, frames, format="extxyz")
    return path


def fit_base(out: Path, data: dict[str, Path], seed: int) -> dict:
    from ggnd_plugin.adapters.host_trainer import FitRequest
    from ggnd_plugin.adapters.mace.training import fit_command, run_fit

    work = out / "fits" / f"base-s{seed}"
    request = FitRequest(
        data["train"], data["valid"], work, None, BASE_EPOCHS, seed, SIZE, "cpu", BASE_PATIENCE
    )
    command, path = fit_command(request)
    e0s = json.loads(Path(data["e0s"]).read_text())
    command = set_option(command, "E0s", "{" + ", ".join(f"{z}: {e}" for z, e in e0s.items()) + "}")
    command.append("--restart_latest")  # MACE's own checkpoints: a stopped fit continues
    os.environ["OMP_NUM_THREADS"] = "1"
    started = time.perf_counter()
    run_fit(command, work, BASE_EPOCHS, label=f"base-s{seed}")
    target = model_path(out, "base", seed)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(Path(path).read_bytes())
    epochs = mace_epochs(work)
    return {
        "path": str(target),
        "seconds": time.perf_counter() - started,
        "epochs_run": epochs,
        "reached_cap": epochs is not None and epochs >= BASE_EPOCHS,
    }


def mace_epochs(work: Path) -> int | None:
    """Epochs MACE ran: the last 'Epoch N' of its log (it stops early on --patience)."""
    import re

    numbers = [int(m) for log in work.glob("**/*.log") for m in re.findall(r"Epoch (\d+):", log.read_text())]
    return max(numbers) + 1 if numbers else None


def finetune(out: Path, data: dict[str, Path], arm: str, seed: int) -> dict:
    import torch

    base = model_path(out, "base", seed)
    target = model_path(out, arm, seed)
    log = out / "logs" / f"{arm}-s{seed}.log"
    source = base
    if arm == "upgrade":
        source = out / "models" / f"upgrade0-s{seed}.model"
        if not source.exists():
            run(ggnd("upgrade", base, "-o", source, "--seed", UPGRADE_SEED), log)
    options = [
        "--train", data["train"], "--valid", data["valid"], "--epochs", FT_CAP, "--patience", FT_PATIENCE,
        "--monitor", "forces", "--lr", FT_LR, "--batch-size", FT_BATCH, "--seed", FT_SEED, "--resume",
    ]  # fmt: skip
    if arm == "control":
        options.append("--no-ggnd")
    started = time.perf_counter()
    run(ggnd("finetune", source, "-o", target, *options), log)
    state = torch.load(
        target.with_name(target.name + ".checkpoint.pt"), map_location="cpu", weights_only=False
    )
    history = state["history"]
    return {
        "path": str(target),
        "seconds": time.perf_counter() - started,
        "epochs_run": len(history),
        "best_epoch": state.get("best_epoch"),
        "stopped_early": bool(state.get("stopped_early")),
        "reached_cap": not state.get("stopped_early") and len(history) >= FT_CAP,
        "history": history,
    }


def stability_cell(
    out: Path, data: dict[str, Path], cell: str, temperature: float, start: str, arm: str, seed: int
):
    folder = out / "cells" / cell / f"{arm}-s{seed}"
    frames = merged_start_frames(out) if start == "start_1200K" else data[start]
    command = ggnd(
        "stability", model_path(out, arm, seed), "--start", frames, "--reference", data["train"],
        "--temperature", temperature, "--replicas", REPLICAS, "--time-ps", TIME_PS, "--seed", MD_SEED,
        "--ensemble", "nve", "--threshold", 0.5, "--bond-cutoff", 1.8, "--no-progress", "--out", folder,
    )  # fmt: skip
    if (folder / "checkpoints").is_dir():
        command.append("--resume")
    started = time.perf_counter()
    run(command, out / "logs" / f"cell-{cell}-{arm}-s{seed}.log")
    return {"results": str(folder / "results.json"), "seconds": time.perf_counter() - started}


def evaluate(out: Path, data: dict[str, Path], arm: str, seed: int) -> dict:
    metrics = {}
    for name in EVALUATION_SETS:
        target = out / "evaluations" / f"{arm}-s{seed}-{name}.json"
        if not target.exists():
            run(
                ggnd("evaluate", model_path(out, arm, seed), "--data", data[name], "--json", target),
                out / "logs" / f"evaluate-{arm}-s{seed}.log",
            )
        metrics[name] = json.loads(target.read_text())
    return {"metrics": metrics}


def scan_structure(out: Path, data: dict[str, Path]) -> Path:
    """The training frame whose criterion bonds are closest to their mean training lengths."""
    import numpy as np
    from ase.io import write

    from ggnd_plugin.data import read_structures
    from ggnd_plugin.md.metrics import reference_bonds
    from ggnd_plugin.safe_io import atomic_path

    path = out / "data" / "scan_structure.xyz"
    if not path.exists():
        frames = read_structures(data["train"])
        pairs, lengths = reference_bonds(frames, 1.8)
        deviation = [np.abs(f.get_all_distances()[pairs[:, 0], pairs[:, 1]] - lengths).max() for f in frames]
        best = frames[int(np.argmin(deviation))]
        best.info["study_frame_index"] = int(np.argmin(deviation))
        best.info["largest_bond_deviation_A"] = float(np.min(deviation))
        with atomic_path(path) as tmp:
            write(tmp, [best], format="extxyz")
    return path


def scan(out: Path, data: dict[str, Path], arm: str, seed: int) -> dict:
    folder = out / "scans" / f"{arm}-s{seed}"
    if not (folder / "scan.json").exists():
        command = ggnd(
            "scan", model_path(out, arm, seed), "--structure", scan_structure(out, data), "--types",
            "C-H", "H-N", "C-C", "C-N", "C-O", "--no-plots", "--no-progress", "--overwrite", "--out", folder,
        )  # fmt: skip
        run(command, out / "logs" / f"scan-{arm}-s{seed}.log")
    return {"scan": str(folder / "scan.json")}


def jobs(out: Path, data: dict[str, Path]) -> list[Job]:
    """Every job of the study, with its priority (lower runs first) and the jobs it waits for."""
    listed = [Job(f"start-s{s}", 0, partial(start_frames, seed=s)) for s in START_SEEDS]
    for k, seed in enumerate(BASE_SEEDS):
        listed.append(Job(f"base-s{seed}", 10 + k, partial(fit_base, seed=seed)))
        for arm in ("upgrade", "control"):
            listed.append(
                Job(f"{arm}-s{seed}", 100 + k, partial(finetune, arm=arm, seed=seed), (f"base-s{seed}",))
            )
    starts = tuple(f"start-s{s}" for s in START_SEEDS)
    for index, (cell, temperature, start, seeds, arms) in enumerate(CELLS):
        # the primary cells first; then evaluations and scans (300s); then the secondary cells
        priority = 200 if index == 0 else 400 + index
        for seed in seeds:
            for arm in arms:
                needs = (f"{arm}-s{seed}",) + (starts if start == "start_1200K" else ())
                action = partial(
                    stability_cell, cell=cell, temperature=temperature, start=start, arm=arm, seed=seed
                )
                listed.append(Job(f"cell-{cell}-{arm}-s{seed}", priority, action, needs))
    for seed in BASE_SEEDS:
        for arm in ("base", "upgrade", "control"):
            model = (f"{arm}-s{seed}",)
            listed.append(Job(f"evaluate-{arm}-s{seed}", 300, partial(evaluate, arm=arm, seed=seed), model))
            listed.append(Job(f"scan-{arm}-s{seed}", 310, partial(scan, arm=arm, seed=seed), model))
    return listed


def run_jobs(out: Path, data: dict[str, Path], workers: int) -> None:
    todo = {job.name: job for job in jobs(out, data) if finished(out, job.name) is None}
    done = {job.name for job in jobs(out, data)} - set(todo)
    lock = threading.Lock()
    say(f"{len(done)} jobs done, {len(todo)} to run with {workers} worker(s)")

    def execute(job: Job) -> str:
        state = code_state()
        started = time.strftime("%Y-%m-%dT%H:%M:%S")
        say(f"start {job.name}")
        result = job.action(out, data)
        record = {
            "job": job.name,
            "started": started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **state,
            **result,
        }
        from ggnd_plugin.safe_io import atomic_write_text

        with lock:
            job_file(out, job.name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(job_file(out, job.name), json.dumps(record, indent=1))
        say(f"done  {job.name}")
        return job.name

    with ThreadPoolExecutor(workers) as pool:
        running = {}
        while todo or running:
            ready = sorted(
                (j for j in todo.values() if set(j.after) <= done and j.name not in running),
                key=lambda j: (j.priority, j.name),
            )
            while ready and len(running) < workers:
                job = ready.pop(0)
                running[job.name] = pool.submit(execute, job)
                del todo[job.name]
            if not running:
                raise RuntimeError(f"jobs wait for each other: {sorted(todo)}")
            finished_now, _ = wait(running.values(), return_when=FIRST_COMPLETED)
            for future in finished_now:
                name = future.result()  # a failed job stops the study with its error
                done.add(name)
                running.pop(name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "build" / ("study_upgrade_smoke" if SMOKE else "study_upgrade")
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--stages", nargs="+", default=["run", "report"], choices=("run", "report"))
    parser.add_argument(
        "--results", type=Path, default=ROOT / "benchmarks" / "results" / "study_upgrade.json"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    split = argparse.Namespace(
        out=args.out, data=DFT, seed=SPLIT_SEED, train_frames=None, test_frames=None,
        valid_fraction=VALID_FRAMES / 500,
    )  # fmt: skip
    if SMOKE:
        split.train_frames, split.test_frames, split.valid_fraction = 24, 6, 0.25
    data = {name: Path(path) for name, path in prepare_data(split).items()}
    if "run" in args.stages:
        run_jobs(args.out, data, args.jobs)
    if "report" in args.stages:
        from study_upgrade_report import report

        report(args.out, data, args.results if not SMOKE else args.out / "study_upgrade.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
