"""Writing a stability run: results.json, results.csv, summary.md, timeseries.npz, the plots and the
failed replicas' frames (:mod:`ggnd_plugin.md.failure_report`)."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ggnd_plugin.md import failure_report, survival
from ggnd_plugin.md.protocol import StabilityResult

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
    "cause",
    "cause_atoms",
    "cause_detail",
    "failure_frames",
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
        for key in ("cause", "cause_atoms", "cause_detail"):
            row.setdefault(key, None)
        kept = failure_report.has_frames(result, row)
        row["failure_frames"] = failure_report.frames_file(row) if kept else None
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


def statistics(result: StabilityResult, baseline: str | None = None) -> dict[str, Any]:
    """The survival statistics of a run (``results.json`` key ``statistics``; docs/stability.md).

    ``baseline`` names the model the others are compared with; None takes the first model of the run
    when it has two or more, and a run of one model gets no comparison. An unknown name is refused.
    """
    return survival.run_statistics(result.rows, result.protocol["time_ps"], baseline)


def _p(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def _interval(low: float, high: float, digits: int = 3) -> str:
    return f"{low:.{digits}f} to {high:.{digits}f}"


GROUP_COLUMNS = ("model", "T (K)", "failed", "failed fraction (95 % Wilson)", "RMST ps (95 % CI)")
COMPARISON_COLUMNS = (
    "model",
    "T (K)",
    "failed",
    "baseline failed",
    "Fisher p",
    "replicas (Fisher)",
    "hazard ratio",
    "log-rank p",
    "replicas (log-rank)",
    "ΔRMST ps (95 % CI)",
)


def group_table(stats: dict[str, Any]) -> list[tuple[str, ...]]:
    """Rows of the per model and temperature table: failures, Wilson interval, RMST with its interval."""
    rows = []
    for group in stats["groups"]:
        fraction, rmst = group["failure_proportion"], group["rmst"]
        rows.append(
            (
                group["model"],
                f"{group['temperature_K']:g}",
                f"{group['failed']}/{group['replicas']}",
                f"{fraction['proportion']:.2f} ({_interval(fraction['low'], fraction['high'], 2)})",
                f"{rmst['rmst_ps']:.3f} ({_interval(rmst['low'], rmst['high'])})",
            )
        )
    return rows


# The printed table must fit 80 columns (pipes, CI logs): short headers, ΔRMST as ± its half-width.
COMPARISON_COLUMNS_SHORT = (
    "model",
    "T (K)",
    "failed",
    "base",
    "Fisher\np",
    "n",
    "HR",
    "log-rank\np",
    "n",
    "ΔRMST\nps",
)


def comparison_table(stats: dict[str, Any], short: bool = False) -> list[tuple[str, ...]]:
    """Rows of the table against the baseline: Fisher and log-rank p, replicas needed, hazard ratio, ΔRMST."""
    rows = []
    for entry in stats["comparisons"]:
        fisher, rank, difference = entry["fisher"], entry["logrank"], entry["rmst_difference"]
        needed = [
            "—" if test["replicas_needed"] is None else str(test["replicas_needed"])
            for test in (fisher, rank)
        ]
        rows.append(
            (
                entry["model"],
                f"{entry['temperature_K']:g}",
                f"{entry['failed']}/{entry['replicas']}",
                f"{entry['baseline_failed']}/{entry['baseline_replicas']}",
                _p(fisher["p_value"]),
                needed[0],
                "—" if rank["hazard_ratio"] is None else f"{rank['hazard_ratio']:.2f}",
                _p(rank["p_value"]),
                needed[1],
                f"{difference['difference_ps']:+.3f}±{(difference['high'] - difference['low']) / 2:.3f}"
                if short
                else f"{difference['difference_ps']:+.3f} ({_interval(difference['low'], difference['high'])})",
            )
        )
    return rows


def _comparison_note(stats: dict[str, Any], short: bool = False) -> str:
    confidence = _percent(stats["confidence_level"])
    names = (
        f"base: failed of baseline {stats['baseline']}; HR: hazard ratio; n: replicas needed; "
        f"ΔRMST: RMST(model) - RMST(baseline) ± its {confidence} half-width. "
        if short
        else f"Against baseline **{stats['baseline']}**. "
    )
    return (
        names + "Tests two-sided. Hazard ratio: the model's failure hazard over the baseline's (Peto's "
        "estimate from the log-rank test; > 1: fails sooner). Replicas needed: per model, for "
        f"{_percent(stats['power'])} power at α = {stats['alpha']:g} if the observed difference were the true "
        "one (Fisher: normal approximation with continuity correction; log-rank: Schoenfeld, same horizon); "
        "—: no difference observed or nothing failed."
    )


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g} %"


def _markdown_table(columns: tuple[str, ...], rows: list[tuple[str, ...]], right_from: int = 1) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" if i < right_from else "---:" for i in range(len(columns))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def summary_markdown(
    result: StabilityResult,
    baseline: str | None = None,
    stats: dict[str, Any] | None = None,
    plots: bool = False,
) -> str:
    if stats is None:
        stats = statistics(result, baseline)
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
    lines += [
        "",
        "## Survival statistics",
        "",
        f"Replicas that reach the {stats['horizon_ps']:g} ps horizon are censored there. Failed fraction with "
        f"its {_percent(stats['confidence_level'])} Wilson interval; RMST: restricted mean survival time, the "
        f"area under the Kaplan-Meier curve up to the horizon, with its {_percent(stats['confidence_level'])} interval "
        "(docs/stability.md, Statistics).",
        "",
        *_markdown_table(GROUP_COLUMNS, group_table(stats)),
    ]
    if stats["comparisons"]:
        lines += [
            "",
            "## Comparison",
            "",
            _comparison_note(stats),
            "",
            *_markdown_table(COMPARISON_COLUMNS, comparison_table(stats)),
        ]
    lines += failure_report.markdown_lines(result, plots)
    versions = ", ".join(f"{k} {v}" for k, v in result.protocol.get("versions", {}).items())
    lines += ["", f"Device {result.protocol.get('device')}, {result.protocol.get('dtype')}; {versions}.", ""]
    return "\n".join(lines)


def print_summary(result: StabilityResult, baseline: str | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    stats = statistics(result, baseline)
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
    console = Console()
    console.print(table)
    # Two-line headers keep these tables within 80 columns (pipes, CI logs) for model names up to ~12
    # characters; numbers are never folded or cut, a longer model name folds onto a second line.
    group_columns = ("model", "T (K)", "failed", "failed fraction\n(95 % Wilson)", "RMST ps\n(95 % CI)")
    tables = [("Survival statistics (censored at the horizon)", group_columns, group_table(stats))]
    if stats["comparisons"]:
        rows = comparison_table(stats, short=True)
        tables.append((f"Against baseline {stats['baseline']}", COMPARISON_COLUMNS_SHORT, rows))
    longest = max(len(row[0]) for _, _, rows in tables for row in rows)
    for title, columns, rows in tables:
        table = Table(title=escape(title), box=None, pad_edge=False)
        table.add_column(escape(columns[0]), overflow="fold", min_width=min(longest, 20))
        for column in columns[1:]:
            table.add_column(escape(column), justify="right", no_wrap=True)
        for row in rows:
            table.add_row(*(escape(cell) for cell in row))
        console.print(table)
    if stats["comparisons"]:
        console.print(escape(_comparison_note(stats, short=True)))
    failure_report.print_causes(result, console)


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


def write_results(
    result: StabilityResult, out_dir: str | Path, plots: bool = True, *, baseline: str | None = None
) -> dict[str, Path]:
    """Write every output file of a run into ``out_dir``; returns their paths by name.

    ``baseline``: the model the comparison table is made against (see ``statistics``); an unknown name is
    refused before anything is written. Each file is written atomically (a temporary file renamed into
    place), so a run killed while writing leaves the previous complete file or the new one.
    """
    from ggnd_plugin.safe_io import atomic_path, atomic_write_text

    stats = statistics(result, baseline)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = public_rows(result)
    paths = {name: out_dir / name for name in ("results.json", "results.csv", "summary.md", "timeseries.npz")}
    atomic_write_text(
        paths["results.json"],
        json.dumps(
            _json_safe(
                {
                    "protocol": result.protocol,
                    "summary": summarise(result),
                    "statistics": stats,
                    "replicas": rows,
                    **failure_report.json_record(result),
                }
            ),
            indent=2,
        ),
    )
    column = deviation_column(result.protocol)
    with atomic_path(paths["results.csv"]) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*CSV_COLUMNS, column])
        writer.writeheader()
        for row in rows:
            values = {**row, "cause_atoms": " ".join(map(str, row["cause_atoms"] or [])) or None}
            writer.writerow({key: ("" if values[key] is None else values[key]) for key in writer.fieldnames})
    atomic_write_text(paths["summary.md"], summary_markdown(result, stats=stats, plots=plots))
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
    paths.update(failure_report.write_failures(result, out_dir, plots))
    return paths


def load_timeseries(path: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """timeseries.npz back as {"model/TK/replica": {"time_ps": ..., "max_deviation": ..., ...}}."""
    series: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
    with np.load(path) as data:
        for key in data.files:
            replica, name = key.rsplit("/", 1)
            series[replica][name] = data[key]
    return dict(series)
