"""Writing a stability run: results.json, results.csv, summary.md, timeseries.npz and the plots."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ggnd_plugin.md.stability import StabilityResult

CSV_COLUMNS = (
    "model",
    "temperature_K",
    "replica",
    "seed",
    "start_frame",
    "stability_ps",
    "failed",
    "failure",
    "failure_step",
)


def deviation_column(protocol: dict[str, Any]) -> str:
    """Bond runs report Å (``max_deviation_A``); RDF runs the dimensionless RDF distance."""
    return "max_deviation_A" if protocol["monitor"]["criterion"] == "bonds" else "max_rdf_distance"


def public_rows(result: StabilityResult) -> list[dict[str, Any]]:
    column = deviation_column(result.protocol)
    rows = []
    for row in result.rows:
        row = dict(row)
        row[column] = row.pop("max_deviation")
        rows.append(row)
    return rows


def summarise(result: StabilityResult) -> list[dict[str, Any]]:
    """Mean ± std (population) of stability per model and temperature, and the fraction that failed."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in result.rows:
        groups[(row["model"], row["temperature_K"])].append(row)
    summary = []
    for (model, temperature), rows in groups.items():
        times = np.array([row["stability_ps"] for row in rows])
        summary.append(
            {
                "model": model,
                "temperature_K": temperature,
                "replicas": len(rows),
                "mean_ps": float(times.mean()),
                "std_ps": float(times.std()),
                "min_ps": float(times.min()),
                "failed": sum(row["failed"] for row in rows),
            }
        )
    return summary


def protocol_line(protocol: dict[str, Any]) -> str:
    """The protocol in one sentence, to stand next to every reported number."""
    monitor = protocol["monitor"]
    if monitor["criterion"] == "bonds":
        rule = (
            f"bonds < {protocol['bond_cutoff']} Å in every reference frame"
            if protocol["bond_rule"] == "reference"
            else "bonds from ASE natural cutoffs"
        )
        criterion = f"max bond deviation > {monitor['threshold']} Å ({monitor['n_bonds']} {rule})"
    else:
        criterion = f"∫|Δg(r)|dr > {monitor['threshold']} (RDF to {monitor['r_max_A']:.2f} Å, {protocol['rdf_window_ps']} ps window)"
    ensemble = protocol["ensemble"].upper()
    if protocol["ensemble"] == "nvt-langevin":
        ensemble += f" (friction {protocol['friction_per_fs']} /fs)"
    elif protocol["ensemble"] == "nvt-nose-hoover":
        ensemble += f" (tau {protocol['nose_hoover_tau_fs']} fs)"
    start = protocol.get("start") or "the start frames"
    return (
        f"{ensemble}, {protocol['timestep_fs']} fs step, {protocol['time_ps']} ps horizon, "
        f"{protocol['replicas']} replicas per temperature from {start} (seed {protocol['seed']}), "
        f"unstable when {criterion}"
    )


def summary_markdown(result: StabilityResult) -> str:
    lines = [
        "# MD stability",
        "",
        f"Protocol: {protocol_line(result.protocol)}.",
        "",
        "Stability = time of the first unstable step (ps); a replica that never fails scores the horizon. "
        "Mean ± standard deviation over replicas.",
        "",
        "| model | T (K) | stability (ps) | min (ps) | failed |",
        "|---|---:|---:|---:|---:|",
    ]
    for entry in summarise(result):
        lines.append(
            f"| {entry['model']} | {entry['temperature_K']:g} | {entry['mean_ps']:.3f} ± {entry['std_ps']:.3f} | "
            f"{entry['min_ps']:.3f} | {entry['failed']}/{entry['replicas']} |"
        )
    versions = ", ".join(f"{k} {v}" for k, v in result.protocol.get("versions", {}).items())
    lines += ["", f"Device {result.protocol.get('device')}, {result.protocol.get('dtype')}; {versions}.", ""]
    return "\n".join(lines)


def print_summary(result: StabilityResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="MD stability (ps)", caption=protocol_line(result.protocol))
    for column, justify in (
        ("model", "left"),
        ("T (K)", "right"),
        ("mean ± std", "right"),
        ("min", "right"),
        ("failed", "right"),
    ):
        table.add_column(column, justify=justify)
    for entry in summarise(result):
        table.add_row(
            entry["model"],
            f"{entry['temperature_K']:g}",
            f"{entry['mean_ps']:.3f} ± {entry['std_ps']:.3f}",
            f"{entry['min_ps']:.3f}",
            f"{entry['failed']}/{entry['replicas']}",
        )
    Console().print(table)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


OUTPUT_FILES = (
    "results.json",
    "results.csv",
    "summary.md",
    "timeseries.npz",
    "max_bond_deviation.png",
    "survival.png",
)


def write_results(result: StabilityResult, out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write every output file of a run into ``out_dir``; returns their paths by name.

    Each file is written atomically (a temporary file renamed into place), so a run killed while
    writing leaves the previous complete file or the new one.
    """
    from ggnd_plugin.safe_io import atomic_path, atomic_write_text

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = public_rows(result)
    paths = {name: out_dir / name for name in ("results.json", "results.csv", "summary.md", "timeseries.npz")}
    atomic_write_text(
        paths["results.json"],
        json.dumps(
            _json_safe({"protocol": result.protocol, "summary": summarise(result), "replicas": rows}),
            indent=2,
        ),
    )
    column = deviation_column(result.protocol)
    with atomic_path(paths["results.csv"]) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*CSV_COLUMNS, column])
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if row[key] is None else row[key]) for key in writer.fieldnames})
    atomic_write_text(paths["summary.md"], summary_markdown(result))
    arrays = {
        f"{key}/{name}": values for key, series in result.series.items() for name, values in series.items()
    }
    with atomic_path(paths["timeseries.npz"]) as tmp:
        np.savez_compressed(tmp, **arrays)
    if plots:
        from ggnd_plugin.md.plots import plot_max_deviation, plot_survival

        for name, plot in (("max_bond_deviation.png", plot_max_deviation), ("survival.png", plot_survival)):
            with atomic_path(out_dir / name) as tmp:
                plot(result, tmp)
            paths[name] = out_dir / name
    return paths


def load_timeseries(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """timeseries.npz back as {"model/TK/replica": {"time_ps": ..., "max_deviation": ..., ...}}."""
    series: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    with np.load(path) as data:
        for key in data.files:
            replica, name = key.rsplit("/", 1)
            series[replica][name] = data[key]
    return dict(series)
