"""Exploratory: what one round of the failure loop buys a tiny MACE at 1200 K, with and without GGND.

Not a claim and not pre-registered: one base model, one training seed, one round, 20 replicas per arm.
Everything is the package's own GFN2-xTB 3BPA data, so the failure labels and the training data come
from one method. The loop is that of docs/stability.md ("The loop"):

1. data: ``3bpa_300K_train.xyz`` split into 225 training and 25 validation frames (seed 0); start
   frames ``3bpa_1200K.xyz`` (xTB MD at 1200 K); bonds and lengths from the whole 300 K training file.
2. base: a tiny MACE (``SIZES['tiny']``) fitted through ``ggnd-mace-train`` for ``FIT_EPOCHS`` epochs.
3. round 0, two arms from the base, the same ``TUNE_EPOCHS`` of ``ggnd finetune`` on the training split:
   ``mace`` (``--no-ggnd``) and ``mace+ggnd`` (a GGND block attached first: the demo's small block).
4. stability of both: 1200 K, 20 replicas, NVE, 1 fs, ``TIME_PS`` ps, seed 0 (both arms start from the
   same frames with the same velocities); every failure leaves its frames and a cause.
5. labels: each arm's failure frames labelled with GFN2-xTB (``ggnd_plugin.labelling``).
6. round 1, from each round-0 arm, ``LOOP_EPOCHS`` more epochs: on the training split plus the arm's own
   labelled failures (``+loop``); two controls: the training split alone (``+more``: the extra epochs),
   and the training split plus as many ordinary 1200 K frames (``+hot``: a new GFN2-xTB MD trajectory at
   1200 K, ``ggnd data generate`` with seed 1), since failure frames are also simply hot frames.
7. stability of the six round-1 models under the same protocol and seed (paired with round 0), and
   again with MD seed 1: on seed 0 they re-run the very trajectories whose failures the looped models
   were trained on, so seed 1 is the test on replicas the loop has not seen.
8. report: ``benchmarks/results/failure_loop.json`` and tables: failures and their causes per model,
   the survival statistics the package has (Kaplan-Meier, RMST, Fisher, log-rank) within each run,
   per arm and seed ``+loop`` against ``+more`` and ``+hot`` and ``+hot`` against ``+more``, the bond
   types that broke, energy and force errors on the 300 K test and 1200 K sets.

Every stage is cached in ``--work``; the same command continues a stopped run (fits restart, fine-tuning,
stability and labelling resume). ``--smoke`` runs the whole pipeline at toy size into its own folder
and ``failure_loop_smoke.json``: a check of the machinery, never a result. Run niced:

    nice -n 15 .venv/bin/python benchmarks/failure_loop.py            # hours of one core
    nice -n 15 .venv/bin/python benchmarks/failure_loop.py --smoke    # minutes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "ggnd_plugin" / "default_data" / "3bpa"
TEMPERATURE = 1200.0
REPLICAS = 20
TIME_PS = 2.0
FIT_EPOCHS = 30
TUNE_EPOCHS = 5
LOOP_EPOCHS = 5
VALID_FRAMES = 25
SEED = 0
NEW_SEED = 1  # round 1 again on replicas the loop has not seen
ROUND0 = ("mace", "mace+ggnd")
ROUND1 = ("mace+more", "mace+loop", "mace+ggnd+more", "mace+ggnd+loop")
HOT = ("mace+hot", "mace+ggnd+hot")
SMILES = "Nc1ncccc1OCc1ccccc1"  # 3BPA, as the shipped data was made (generation.json)


def _say(message: str) -> None:
    print(f"[failure_loop {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Stage:
    """A stage whose result is a JSON file in the work folder: computed once, then read back."""

    def __init__(self, work: Path, name: str):
        self.path = work / "stages" / f"{name}.json"

    def done(self) -> bool:
        return self.path.exists()

    def read(self) -> Any:
        return json.loads(self.path.read_text())

    def write(self, value: Any) -> Any:
        from ggnd_plugin.md.report import _json_safe  # non-finite numbers as null: strict JSON
        from ggnd_plugin.safe_io import atomic_write_text

        value = _json_safe(value)
        atomic_write_text(self.path, json.dumps(value, indent=1))
        return value


def sizes(smoke: bool) -> dict[str, Any]:
    if smoke:
        return {
            "replicas": 3,
            "time_ps": 0.05,
            "fit_epochs": 2,
            "tune_epochs": 1,
            "loop_epochs": 1,
            "train": 40,
            "hot_frames": 40,
            "equilibration_ps": 0.1,
        }
    return {
        "replicas": REPLICAS,
        "time_ps": TIME_PS,
        "fit_epochs": FIT_EPOCHS,
        "tune_epochs": TUNE_EPOCHS,
        "loop_epochs": LOOP_EPOCHS,
        "train": None,
        "hot_frames": 200,
        "equilibration_ps": 1.0,
    }


def prepare_data(work: Path, size: dict[str, Any]) -> dict[str, Path]:
    import numpy as np
    from ase.io import read, write

    from ggnd_plugin.safe_io import atomic_path

    folder = work / "data"
    paths = {"train": folder / "train.xyz", "valid": folder / "valid.xyz"}
    if not all(p.exists() for p in paths.values()):
        frames = read(DATA / "3bpa_300K_train.xyz", index=":")
        order = np.random.default_rng(SEED).permutation(len(frames))
        valid = [frames[i] for i in sorted(order[:VALID_FRAMES])]
        train = [frames[i] for i in sorted(order[VALID_FRAMES:])][: size["train"]]
        for name, chosen in (("train", train), ("valid", valid)):
            with atomic_path(paths[name]) as tmp:
                write(tmp, chosen, format="extxyz")
    return {
        **paths,
        "reference": DATA / "3bpa_300K_train.xyz",
        "start": DATA / "3bpa_1200K.xyz",
        "test_300K": DATA / "3bpa_300K_test.xyz",
        "test_1200K": DATA / "3bpa_1200K.xyz",
    }


def fit_base(work: Path, data: dict[str, Path], size: dict[str, Any], adapter) -> Path:
    from ggnd_plugin.safe_io import save_model

    stage = Stage(work, "fit")
    if not stage.done():
        _say(f"fitting the tiny MACE for {size['fit_epochs']} epochs")
        started = time.perf_counter()
        model = adapter.fit(
            data["train"], data["valid"], work / "fit", epochs=size["fit_epochs"], seed=SEED, size="tiny"
        )
        path = save_model(adapter, model, work / "models" / "base.model")
        stage.write({"path": str(path), "seconds": time.perf_counter() - started})
    return Path(stage.read()["path"])


def tune(
    work: Path, name: str, start: Path, train: Path, valid: Path, epochs: int, ggnd: bool, adapter
) -> Path:
    """``ggnd finetune`` of ``start`` (GGND attached first when ``ggnd`` and it has none); resumes."""
    import torch

    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.demo import _ggnd_config
    from ggnd_plugin.training import FinetuneSettings, checkpoint_path, finetune

    target = work / "models" / f"{name}.model"
    stage = Stage(work, f"tune-{name}")
    if stage.done():
        return target
    _say(f"fine-tuning {name}: {epochs} epochs on {train.name}")
    model = adapter.load(start)
    if ggnd and not adapter.ggnd_blocks(model):
        torch.manual_seed(SEED)
        model = adapter.attach(model, _ggnd_config())
    started = time.perf_counter()
    result = finetune(
        adapter,
        model,
        read_labelled(train),
        read_labelled(valid),
        target,
        FinetuneSettings(epochs=epochs, seed=SEED),
        resume=checkpoint_path(target).exists(),
        progress=False,
    )
    stage.write(
        {
            "path": str(target),
            "train": str(train),
            "epochs": epochs,
            "best_epoch": result.best_epoch,
            "seconds": time.perf_counter() - started,
        }
    )
    return target


def stability(
    work: Path, round_name: str, models: dict[str, Path], data, size, adapter, seed: int = SEED
) -> dict[str, Any]:
    """One stability run of ``models`` with MD seed ``seed`` (resumes); its rows, causes and statistics."""
    import torch

    from ggnd_plugin.data import read_structures
    from ggnd_plugin.md import StabilityProtocol, run_stability
    from ggnd_plugin.md.failure_report import cause_counts
    from ggnd_plugin.md.report import statistics, write_results

    stage = Stage(work, f"stability-{round_name}")
    if stage.done():
        return stage.read()
    out = work / "stability" / round_name
    _say(f"stability {round_name}: {', '.join(models)} at {TEMPERATURE:g} K, {size['replicas']} replicas")
    protocol = StabilityProtocol(
        temperatures=(TEMPERATURE,), replicas=size["replicas"], time_ps=size["time_ps"], seed=seed
    )
    loaded = {
        name: adapter.torchsim_model(adapter.load(path), "cpu", torch.float64)
        for name, path in models.items()
    }
    started = time.perf_counter()
    result = run_stability(
        loaded,
        read_structures(data["start"]),
        read_structures(data["reference"]),
        protocol,
        out_dir=out,
        resume=(out / "checkpoints").exists(),
        sources={"start": str(data["start"]), "reference": str(data["reference"])},
    )
    seconds = time.perf_counter() - started
    baseline = next(iter(models))
    write_results(result, out, baseline=baseline)
    return stage.write(
        {
            "models": {name: str(path) for name, path in models.items()},
            "rows": result.rows,
            "causes": cause_counts(result),
            "statistics": statistics(result, baseline),
            "seed": seed,
            "seconds": seconds,
            "replica_steps": result.execution["replica_steps"],
            "out": str(out),
        }
    )


def label(work: Path, name: str, run: dict[str, Any]) -> Path | None:
    """The model's failure frames of a stability run, labelled with GFN2-xTB (resumes)."""
    from ggnd_plugin.labelling import checkpoint_path, label_files

    files = sorted(
        Path(run["out"]) / row["failure_frames"]
        for row in _public_rows(run)
        if row["model"] == name and row.get("failure_frames")
    )
    if not files:
        return None
    target = work / "labels" / f"{name}.xyz"
    stage = Stage(work, f"labels-{name}")
    if not stage.done():
        _say(f"labelling {len(files)} failed replicas' frames of {name} with GFN2-xTB")
        result = label_files(files, target, resume=checkpoint_path(target).exists(), progress=False)
        stage.write({"path": str(target), "files": len(files), "frames": result.frames})
    return target


def _public_rows(run: dict[str, Any]) -> list[dict[str, Any]]:
    return json.loads((Path(run["out"]) / "results.json").read_text())["replicas"]


def with_failures(work: Path, name: str, train: Path, labels: Path | None) -> Path:
    """The training split plus ``name``'s labelled failures, as one extxyz (``cat`` would do the same)."""
    from ggnd_plugin.safe_io import atomic_write_text

    target = work / "data" / f"train+{name}_failures.xyz"
    if not target.exists():
        text = train.read_text() + ("" if labels is None else labels.read_text())
        atomic_write_text(target, text)
    return target


def hot_frames(work: Path, size: dict[str, Any]) -> Path:
    """A new GFN2-xTB MD trajectory of 3BPA at 1200 K (seed 1), made as the shipped one (resumes)."""
    from ase.io import read

    from ggnd_plugin.reference import GenerationSettings, generate

    settings = GenerationSettings(
        smiles=SMILES,
        temperatures_K=(TEMPERATURE,),
        frames=(size["hot_frames"],),
        name="hot",
        seed=1,
        spacing_fs=50.0,
        timestep_fs=1.0,
        equilibration_ps=size["equilibration_ps"],
    )
    folder = work / "hot"
    if not (folder / "generation.json").exists():
        _say(f"generating {size['hot_frames']} GFN2-xTB frames at 1200 K (seed 1) for the +hot control")
        generate(settings, folder, resume=(folder / ".checkpoint").exists(), show_progress=False)
    path = folder / f"hot_{TEMPERATURE:g}K.xyz"
    shipped = read(DATA / "3bpa_1200K.xyz", index="0").numbers.tolist()
    if read(path, index="0").numbers.tolist() != shipped:
        raise SystemExit(f"{path}: atoms not in the shipped data's order (another RDKit?)")
    return path


def with_extra(work: Path, name: str, train: Path, extra: Path, count: int) -> Path:
    """The training split plus the first ``count`` frames of ``extra``."""
    from ase.io import read, write

    from ggnd_plugin.safe_io import atomic_path

    target = work / "data" / f"train+{name}.xyz"
    if not target.exists():
        frames = read(extra, index=f":{count}")
        with atomic_path(target) as tmp:
            write(tmp, [*read(train, index=":"), *frames], format="extxyz")
    return target


def errors(work: Path, models: dict[str, Path], data, adapter) -> dict[str, Any]:
    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.training import evaluate

    stage = Stage(work, "errors")
    if stage.done() and set(stage.read()) == set(models):
        return stage.read()
    _say("energy and force errors on the 300 K test and 1200 K sets")
    sets = {name: read_labelled(data[name]) for name in ("test_300K", "test_1200K")}
    table = {}
    for name, path in models.items():
        model = adapter.load(path)
        model.eval()
        table[name] = {set_name: evaluate(adapter, model, frames) for set_name, frames in sets.items()}
    return stage.write(table)


def code_commit() -> str:
    """The commit of the code that made the results, with ``+dirty`` when the work tree differs from it."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(("git", *args), cwd=ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def without_machine_paths(value: Any, work: Path) -> Any:
    """Paths in the report relative to the repository (or to the work folder, as ``WORK/...``)."""
    prefixes = ((str(ROOT) + os.sep, ""), (str(work.resolve()) + os.sep, "WORK/"))
    if isinstance(value, dict):
        return {key: without_machine_paths(item, work) for key, item in value.items()}
    if isinstance(value, list):
        return [without_machine_paths(item, work) for item in value]
    if isinstance(value, str):
        for prefix, replacement in sorted(prefixes, key=lambda p: len(p[0])):
            if prefix in value:
                value = value.replace(prefix, replacement)
    return value


def comparisons(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per arm, on the replicas of one MD seed: loop against more, loop against hot, hot against more."""
    from ggnd_plugin.md.survival import run_statistics

    rows = [row for run in runs for row in run["rows"]]
    horizon = runs[0]["statistics"]["horizon_ps"]
    result = {}
    for arm in ROUND0:
        for treatment, control in (("loop", "more"), ("loop", "hot"), ("hot", "more")):
            names = (f"{arm}+{treatment}", f"{arm}+{control}")
            chosen = [row for row in rows if row["model"] in names]
            stats = run_statistics(chosen, horizon, names[1])
            result[f"{names[0]} vs {names[1]}"] = stats["comparisons"][0]
    return result


def broken_bonds(run: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per model, the failures by the element pairs of the bonds that broke (fragmentation, bond stretch)."""
    from ase.data import chemical_symbols

    record = json.loads((Path(run["out"]) / "results.json").read_text())
    numbers = None
    counts: dict[str, dict[str, int]] = {}
    for key, cause in record["failures"].items():
        model = key.split("/")[0]
        if numbers is None:
            from ase.io import read

            numbers = read(
                Path(run["out"])
                / "failures"
                / model
                / key.split("/")[1]
                / f"replica_{key.split('/')[2]}.extxyz"
            ).numbers
        pairs = cause["values"].get("broken_bonds") or (
            [cause["atoms"]] if cause["cause"] == "bond-stretch" else []
        )
        names = sorted({"-".join(sorted(chemical_symbols[numbers[a]] for a in pair)) for pair in pairs}) or [
            cause["cause"]
        ]
        label = "+".join(names)
        counts.setdefault(model, {})
        counts[model][label] = counts[model].get(label, 0) + 1
    return counts


def _p(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def summary_tables(report: dict[str, Any]) -> str:
    from ggnd_plugin.md.failures import CAUSES

    lines = [
        "| run | MD seed | model | failed | " + " | ".join(CAUSES) + " | RMST ps (95 % CI) | vs | Fisher p | "
        "log-rank p | F MAE 300 K | F MAE 1200 K |",
        "|---|---:|---|---:|" + "---:|" * len(CAUSES) + "---:|---|---:|---:|---:|---:|",
    ]
    for round_name in ("round0", "round1", "round1_seed1", "round1_hot", "round1_hot_seed1"):
        run = report[round_name]
        where = f"{round_name.removesuffix('_seed1')} | {run['seed']}"
        groups = {g["model"]: g for g in run["statistics"]["groups"]}
        comparisons = {c["model"]: c for c in run["statistics"]["comparisons"]}
        for counts in run["causes"]:
            model = counts["model"]
            rmst = groups[model]["rmst"]
            against = comparisons.get(model)
            fisher = "—" if against is None else _p(against["fisher"]["p_value"])
            logrank = "—" if against is None else _p(against["logrank"]["p_value"])
            errors = report["errors"][model]
            lines.append(
                f"| {where} | {model} | {counts['failed']}/{counts['replicas']} | "
                + " | ".join(str(counts[c]) for c in CAUSES)
                + f" | {rmst['rmst_ps']:.3f} ({rmst['low']:.3f} to {rmst['high']:.3f}) | "
                f"{run['statistics']['baseline'] if against else '—'} | {fisher} | "
                f"{logrank} | "
                f"{errors['test_300K']['forces_mae']:.3f} | {errors['test_1200K']['forces_mae']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="toy sizes, to check the machinery")
    parser.add_argument("--work", type=Path, help="stage cache (default build/failure_loop[_smoke])")
    parser.add_argument("--results", type=Path, help="JSON to write (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    suffix = "_smoke" if args.smoke else ""
    work = args.work or ROOT / "build" / f"failure_loop{suffix}"
    results = args.results or ROOT / "benchmarks" / "results" / f"failure_loop{suffix}.json"
    size = sizes(args.smoke)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from ggnd_plugin.registry import get
    from ggnd_plugin.safe_io import atomic_write_text, output_lock

    adapter = get("mace")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with output_lock(work):
        data = prepare_data(work, size)
        base = fit_base(work, data, size, adapter)
        round0 = {
            "mace": tune(
                work, "mace", base, data["train"], data["valid"], size["tune_epochs"], False, adapter
            ),
            "mace+ggnd": tune(
                work, "mace+ggnd", base, data["train"], data["valid"], size["tune_epochs"], True, adapter
            ),
        }
        run0 = stability(work, "round0", round0, data, size, adapter)
        round1 = {}
        for name in ROUND0:
            labels = label(work, name, run0)
            plus = with_failures(work, name, data["train"], labels)
            ggnd = "ggnd" in name
            for arm, train in (("more", data["train"]), ("loop", plus)):
                round1[f"{name}+{arm}"] = tune(
                    work,
                    f"{name}+{arm}",
                    round0[name],
                    train,
                    data["valid"],
                    size["loop_epochs"],
                    ggnd,
                    adapter,
                )
        run1 = stability(work, "round1", round1, data, size, adapter)
        # the same models on new replicas: round 1 on seed 0 re-runs the very trajectories whose failures
        # the looped models were trained on
        fresh = stability(work, "round1-seed1", round1, data, size, adapter, seed=NEW_SEED)
        hot = hot_frames(work, size)
        hot_models = {}
        for name in ROUND0:
            count = Stage(work, f"labels-{name}").read()["frames"]
            train = with_extra(work, f"{name}_hot", data["train"], hot, count)
            hot_models[f"{name}+hot"] = tune(
                work,
                f"{name}+hot",
                round0[name],
                train,
                data["valid"],
                size["loop_epochs"],
                "ggnd" in name,
                adapter,
            )
        run_hot = stability(work, "round1-hot", hot_models, data, size, adapter)
        fresh_hot = stability(work, "round1-hot-seed1", hot_models, data, size, adapter, seed=NEW_SEED)
        table = errors(work, {**round0, **round1, **hot_models}, data, adapter)
    labels = {
        name: Stage(work, f"labels-{name}").read() for name in ROUND0 if Stage(work, f"labels-{name}").done()
    }
    report = {
        "what": "exploratory, not a claim: one tiny MACE, one seed, one round of the failure loop "
        "(docs/stability.md); benchmarks/failure_loop.py",
        "settings": {
            **size,
            "temperature_K": TEMPERATURE,
            "seed": SEED,
            "valid_frames": VALID_FRAMES,
            "mace_size": "tiny",
            "ensemble": "nve",
            "timestep_fs": 1.0,
            "start": "3bpa_1200K.xyz (GFN2-xTB MD at 1200 K)",
            "labels": "GFN2-xTB (tblite), the method of the training data",
        },
        "fit": Stage(work, "fit").read(),
        "tuning": {name: Stage(work, f"tune-{name}").read() for name in (*ROUND0, *ROUND1, *HOT)},
        "hot_frames": str(hot),
        "labels": labels,
        "round0": run0,
        "round1": run1,
        "round1_seed1": fresh,
        "round1_hot": run_hot,
        "round1_hot_seed1": fresh_hot,
        "errors": table,
        "comparisons": {"seed0": comparisons([run1, run_hot]), "seed1": comparisons([fresh, fresh_hot])},
        "broken_bonds": {
            name: broken_bonds(run)
            for name, run in (
                ("round0", run0),
                ("round1", run1),
                ("round1_seed1", fresh),
                ("round1_hot", run_hot),
                ("round1_hot_seed1", fresh_hot),
            )
        },
        "this_call_seconds": time.perf_counter() - started,
        "code_commit": code_commit(),
    }
    report["stage_seconds"] = (
        report["fit"]["seconds"]
        + sum(t["seconds"] for t in report["tuning"].values())
        + run0["seconds"]
        + sum(run["seconds"] for run in (run1, fresh, run_hot, fresh_hot))
    )
    tables = summary_tables(report)
    for seed, entries in report["comparisons"].items():
        for what, entry in entries.items():
            tables += (
                f"\n{seed}: {what}: failed {entry['failed']}/{entry['replicas']} against "
                f"{entry['baseline_failed']}/{entry['baseline_replicas']}, Fisher p "
                f"{entry['fisher']['p_value']:.3g}, log-rank p {entry['logrank']['p_value']:.3g}, ΔRMST "
                f"{entry['rmst_difference']['difference_ps']:+.3f} ps"
            )
    for round_name, models in report["broken_bonds"].items():
        for model, counts in models.items():
            tables += f"\n{round_name} {model}: " + ", ".join(f"{n} {c}" for n, c in sorted(counts.items()))
    report["table_markdown"] = tables
    report = without_machine_paths(report, work)
    atomic_write_text(results, json.dumps(report, indent=1) + "\n")
    print(tables)
    print(f"-> {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
