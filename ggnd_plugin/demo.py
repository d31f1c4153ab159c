"""The main job: fit, upgrade with GGND, evaluate, run batched stability, compare (``ggnd demo``).

Stages, each cached in the output folder so a stopped demo picks up where it stopped:

1. data: the package's own 3BPA data (GFN2-xTB labels, made by ``ggnd data generate``);
2. ``baseline``: the host model fitted at 300 K through the host's own training command;
3. ``ggnd-scratch``: the same architecture with a GGND block, trained the same way;
4. ``ggnd-upgrade``: the fitted baseline upgraded with GGND (predictions unchanged) and fine-tuned;
5. energy and force errors of the three models at 300, 600 and 1200 K;
6. batched replica stability (TorchSim) of the three models at 600 and 1200 K;
7. one comparison table, printed and written with the plots into ``report.md``.

The output folder must be new or empty, or hold a demo run with the same host and settings (which is
continued); ``overwrite`` removes an earlier demo's files (and only those) and starts again. Every
file is written atomically and the folder is locked while the demo runs.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ggnd_plugin.errors import GGNDError, OutputExistsError
from ggnd_plugin.safe_io import atomic_path, atomic_write_text, check_output_dir, output_lock, save_model

MODELS = ("baseline", "ggnd-scratch", "ggnd-upgrade")
TEST_TEMPERATURES = (300, 600, 1200)
# The shipped 3BPA files (ggnd_plugin/default_data/3bpa): the 300 K run is split into train and test.
DATA_FILES = {
    "train": "3bpa_300K_train",
    "test_300K": "3bpa_300K_test",
    "test_600K": "3bpa_600K",
    "test_1200K": "3bpa_1200K",
}


@dataclass
class DemoSettings:
    """Sizes of a demo run; ``quick`` is the toy version the tests run."""

    size: str = "small"
    train_frames: int | None = 100  # None: all 250; 100 keeps the demo under 20 minutes on 2 cores
    valid_fraction: float = 0.1
    test_frames: int | None = None
    fit_epochs: int = 25
    finetune_epochs: int = 8
    finetune_lr: float = 2e-3
    stability_temperatures: tuple[float, ...] = (600.0, 1200.0)
    replicas: int = 4
    time_ps: float = 1.0
    seed: int = 0

    @classmethod
    def quick(cls) -> DemoSettings:
        return cls(
            size="tiny",
            train_frames=40,
            test_frames=10,
            fit_epochs=2,
            finetune_epochs=1,
            replicas=2,
            time_ps=0.1,
        )


def _ggnd_config():
    from ggnd_plugin.block import GGNDConfig

    # Smaller than the block's defaults (16 channels, 4 heads, 3 steps): on CPU those double a small
    # MACE's training step, this costs about +45 % (measured on 5 x 27-atom batches).
    return GGNDConfig(channels=8, lmax=1, heads=2, steps=2, horizon=1.0)


class _Stage:
    """A stage whose result is a JSON file in the output folder: computed once, then read back."""

    def __init__(self, out: Path, name: str):
        self.path = out / "stages" / f"{name}.json"

    def done(self) -> bool:
        return self.path.exists()

    def read(self) -> Any:
        return json.loads(self.path.read_text())

    def write(self, value: Any) -> Any:
        atomic_write_text(self.path, json.dumps(value, indent=2))
        return value


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold cyan]demo[/] {message}")


def prepare_data(out: Path, settings: DemoSettings) -> dict[str, Path]:
    """Train/valid split of the 300 K set and the test sets, as extxyz files in ``out/data``."""
    from ase.io import write

    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.default_data import default_data_path

    folder = out / "data"
    paths = {"train": folder / "train.xyz", "valid": folder / "valid.xyz"}
    paths.update({f"test_{t}K": folder / f"test_{t}K.xyz" for t in TEST_TEMPERATURES})
    if all(path.exists() for path in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    frames = read_labelled(default_data_path(DATA_FILES["train"]))
    random.Random(settings.seed).shuffle(frames)
    if settings.train_frames:
        frames = frames[: settings.train_frames]
    n_valid = max(2, round(settings.valid_fraction * len(frames)))
    parts = {"valid": frames[:n_valid], "train": frames[n_valid:]}
    for t in TEST_TEMPERATURES:
        test = read_labelled(default_data_path(DATA_FILES[f"test_{t}K"]))
        parts[f"test_{t}K"] = test[: settings.test_frames] if settings.test_frames else test
    for name, part in parts.items():
        with atomic_path(paths[name]) as tmp:
            write(tmp, part, format="extxyz")
    return paths


# What a demo writes in its output folder (removed by ``overwrite``, nothing else is).
OWN_ENTRIES = ("stages", "data", "models", "stability", "report.md", "report.json")
RUN_RECORD = "stages/demo.json"


def check_demo_output(out: Path, host: str, settings: DemoSettings, overwrite: bool) -> None:
    """The folder is new, empty, or a demo run with the same host and settings (else ``overwrite``)."""
    record_path = out / RUN_RECORD
    own = record_path.exists() or (out / "stages").is_dir()
    check_output_dir(out, what="--out", is_own=own, overwrite=overwrite)
    if own and not overwrite and record_path.exists():
        record = json.loads(record_path.read_text())
        wanted = json.loads(json.dumps({"host": host, "settings": asdict(settings)}))
        changed = [
            f"{key}: {record.get(key)} -> {wanted[key]}" for key in wanted if record.get(key) != wanted[key]
        ]
        if changed:
            raise OutputExistsError(
                f"--out {out} holds a demo run with other settings ({'; '.join(changed)}); choose another "
                "--out or pass --overwrite to start again"
            )


def run_demo(
    out: Path, host: str = "mace", settings: DemoSettings | None = None, overwrite: bool = False
) -> dict[str, Any]:
    from ggnd_plugin.registry import get

    settings = settings or DemoSettings()
    out = Path(out)
    adapter = get(host)
    adapter.require()
    if not adapter.file_suffixes:
        raise GGNDError(f"the {host} adapter names no model file suffix; the demo cannot name its models")
    check_demo_output(out, host, settings, overwrite)
    with output_lock(out):
        check_demo_output(out, host, settings, overwrite)
        if overwrite:
            for name in OWN_ENTRIES:
                path = out / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        atomic_write_text(
            out / RUN_RECORD, json.dumps({"host": host, "settings": asdict(settings)}, indent=2)
        )
        return _run_demo(out, host, adapter, settings)


def _run_demo(out: Path, host: str, adapter, settings: DemoSettings) -> dict[str, Any]:
    from ggnd_plugin.training import FinetuneSettings, evaluate, finetune

    started = time.perf_counter()
    timings: dict[str, float] = {}

    _say(f"host {host} ({adapter.version()}), settings {asdict(settings)}")
    data = prepare_data(out, settings)

    def timed(name, fn):
        t0 = time.perf_counter()
        value = fn()
        timings[name] = time.perf_counter() - t0
        return value

    # 2-4: three models -----------------------------------------------------------------------------
    model_files: dict[str, str] = {}
    for name, config in (("baseline", None), ("ggnd-scratch", _ggnd_config())):
        stage = _Stage(out, f"fit-{name}")
        if not stage.done():
            _say(f"fitting {name} through {host}'s own training command")
            work = out / "models" / name
            model = timed(
                f"fit {name}",
                lambda work=work, config=config: adapter.fit(
                    data["train"],
                    data["valid"],
                    work,
                    config=config,
                    epochs=settings.fit_epochs,
                    seed=settings.seed,
                    size=settings.size,
                ),
            )
            path = save_model(adapter, model, work / f"{name}{adapter.file_suffixes[0]}")
            stage.write({"path": str(path), "seconds": timings[f"fit {name}"]})
        model_files[name] = stage.read()["path"]

    stage = _Stage(out, "fit-ggnd-upgrade")
    if not stage.done():
        import torch

        from ggnd_plugin.data import read_labelled

        _say("upgrading the fitted baseline with GGND and fine-tuning it")
        torch.manual_seed(settings.seed)
        upgraded = adapter.attach(adapter.load(Path(model_files["baseline"])), _ggnd_config())
        target = out / "models" / "ggnd-upgrade" / f"ggnd-upgrade{adapter.file_suffixes[0]}"
        tune = FinetuneSettings(epochs=settings.finetune_epochs, lr=settings.finetune_lr, seed=settings.seed)
        timed(
            "fit ggnd-upgrade",
            lambda: finetune(
                adapter,
                upgraded,
                read_labelled(data["train"]),
                read_labelled(data["valid"]),
                target,
                tune,
                resume=(target.parent / (target.name + ".checkpoint.pt")).exists(),
            ),
        )
        stage.write({"path": str(target), "seconds": timings["fit ggnd-upgrade"]})
    model_files["ggnd-upgrade"] = stage.read()["path"]

    # 5: accuracy -------------------------------------------------------------------------------------
    stage = _Stage(out, "evaluate")
    if not stage.done():
        from ggnd_plugin.data import read_labelled

        _say("evaluating energy and force errors at 300, 600 and 1200 K")
        metrics: dict[str, dict[str, Any]] = {}
        for name, path in model_files.items():
            model = adapter.load(Path(path))
            model.eval()
            metrics[name] = {
                f"{t}K": evaluate(adapter, model, read_labelled(data[f"test_{t}K"]))
                for t in TEST_TEMPERATURES
            }
        stage.write(metrics)
    metrics = stage.read()

    # 6: stability ------------------------------------------------------------------------------------
    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.md import StabilityProtocol, run_stability
    from ggnd_plugin.md.report import summarise, write_results

    stability_dir = out / "stability"
    stage = _Stage(out, "stability")
    if not stage.done():
        _say(
            f"batched stability: {len(model_files)} models x {len(settings.stability_temperatures)} temperatures x "
            f"{settings.replicas} replicas, {settings.time_ps} ps NVE"
        )
        import torch

        models = {
            name: adapter.torchsim_model(adapter.load(Path(path)), "cpu", torch.float64)
            for name, path in model_files.items()
        }
        protocol = StabilityProtocol(
            temperatures=tuple(settings.stability_temperatures),
            replicas=settings.replicas,
            time_ps=settings.time_ps,
            seed=settings.seed,
        )
        starts = {t: read_labelled(data[f"test_{int(t)}K"]) for t in settings.stability_temperatures}
        result = timed(
            "stability",
            lambda: run_stability(
                models,
                starts,
                read_labelled(data["train"]),
                protocol,
                out_dir=stability_dir,
                resume=(stability_dir / "checkpoints").exists(),
                sources={
                    "start": {str(t): str(data[f"test_{int(t)}K"]) for t in starts},
                    "reference": str(data["train"]),
                },
            ),
        )
        write_results(result, stability_dir)
        stage.write({"summary": summarise(result), "protocol": result.protocol})
    stability = stage.read()

    summary = {
        "host": host,
        "settings": asdict(settings),
        "models": model_files,
        "metrics": metrics,
        "stability": stability,
        "timings_s": timings,
        "wall_s": time.perf_counter() - started,
    }
    write_report(out, summary)
    return summary


def comparison_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    stability = {(row["model"], float(row["temperature_K"])): row for row in summary["stability"]["summary"]}
    rows = []
    for name in MODELS:
        row = {"model": name}
        for t in TEST_TEMPERATURES:
            m = summary["metrics"][name][f"{t}K"]
            row[f"E MAE {t} K (meV/atom)"] = f"{m['energy_per_atom_mae'] * 1e3:.1f}"
            row[f"F MAE {t} K (meV/Å)"] = f"{m['forces_mae'] * 1e3:.0f}"
        for t in summary["settings"]["stability_temperatures"]:
            s = stability[(name, float(t))]
            row[f"stability {t:g} K (ps)"] = f"{s['mean_ps']:.2f} ± {s['std_ps']:.2f}"
        rows.append(row)
    return rows


def write_report(out: Path, summary: dict[str, Any]) -> Path:
    from rich.console import Console
    from rich.table import Table

    from ggnd_plugin.md.report import protocol_line

    rows = comparison_rows(summary)
    columns = list(rows[0])
    # The terminal table groups the temperatures into one cell per quantity, so it fits 80 columns.
    temperatures = " / ".join(str(t) for t in TEST_TEMPERATURES)
    stability_temperatures = " / ".join(f"{t:g}" for t in summary["settings"]["stability_temperatures"])
    table = Table(title=f"GGND demo ({summary['host']}, 3BPA, GFN2-xTB labels)")
    table.add_column("model", no_wrap=True)
    table.add_column(f"E MAE {temperatures} K\n(meV/atom)", justify="right")
    table.add_column(f"F MAE {temperatures} K\n(meV/Å)", justify="right")
    table.add_column(f"stability {stability_temperatures} K\n(ps, mean ± std)", justify="right")
    for row in rows:
        cells = {k: v for k, v in row.items() if k != "model"}
        table.add_row(
            row["model"],
            " / ".join(v for k, v in cells.items() if k.startswith("E MAE")),
            " / ".join(v for k, v in cells.items() if k.startswith("F MAE")),
            "\n".join(v for k, v in cells.items() if k.startswith("stability")),
        )
    Console().print(table)

    protocol = protocol_line(summary["stability"]["protocol"])
    lines = [
        f"# GGND demo: {summary['host']} on 3BPA",
        "",
        f"Data: ggnd-plugin's own 3BPA set (GFN2-xTB, `ggnd data generate`), trained at 300 K "
        f"({summary['settings']['train_frames'] or 'all'} frames), tested at 300, 600 and 1200 K.",
        "Models: `baseline` (the host alone, its own training command), `ggnd-scratch` (same architecture "
        "with a GGND block, trained the same way), `ggnd-upgrade` (the fitted baseline upgraded with GGND, "
        "then fine-tuned with `ggnd finetune`).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(row.values()) + " |" for row in rows),
        "",
        f"Stability protocol: {protocol}",
        "",
        "![survival](stability/survival.png)",
        "",
        "![max bond deviation](stability/max_bond_deviation.png)",
        "",
        f"Wall time {summary['wall_s'] / 60:.1f} min; stages: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in summary["timings_s"].items()),
        "",
    ]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2, default=str))
    _say(f"report written to {path}")
    return path
