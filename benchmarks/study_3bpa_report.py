"""The report of the pre-registered 3BPA study (docs/study-protocol.md): every endpoint, from the cache.

Imported by ``benchmarks/study_3bpa.py`` (it imports neither that script nor ``paper_3bpa.py``); statistics from ``ggnd_plugin.md.survival`` (scipy).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline_3bpa import stage_cache
from study_protocol import (
    ALPHA,
    CELLS,
    EPOCHS,
    HOSTS,
    MD_SEED,
    PATIENCE,
    PRIMARY,
    PROTOCOL,
    REPLICAS,
    ROOT,
    SEEDS,
    SIZE,
    SMOKE,
    TIME_PS,
    git_commit_of,
)


def _arm(models, fits, cells, host: str, ggnd: bool, cell: str, seeds=SEEDS):
    """Stability times, failure flags and the cells not yet run, of one host's plain or GGND models
    (the given seeds pooled). An arm with a cell missing is never analysed: no endpoint from part of
    its replicas."""
    times, failed, missing = [], [], []
    for model in models:
        if model["host"] == host and model["ggnd"] == ggnd and model["seed"] in seeds:
            record = cells.get((model["name"], cell))
            if record is None:
                missing.append(f"{model['name']} {cell}")
                continue
            times += [row["stability_ps"] for row in record["rows"]]
            failed += [bool(row["failed"]) for row in record["rows"]]
    return times, failed, missing


def _comparison(plain, ggnd) -> dict[str, Any]:
    from ggnd_plugin.md import survival

    if plain[2] or ggnd[2] or not plain[0] or not ggnd[0]:
        return {"status": "not run", "missing_cells": plain[2] + ggnd[2]}
    plain, ggnd = plain[:2], ggnd[:2]
    stats = {
        "plain": survival.group_statistics(*plain, horizon=TIME_PS),
        "ggnd": survival.group_statistics(*ggnd, horizon=TIME_PS),
    }
    failures = {arm: int(sum(data[1])) for arm, data in (("plain", plain), ("ggnd", ggnd))}
    stats["fisher"] = survival.fisher(failures["ggnd"], len(ggnd[1]), failures["plain"], len(plain[1]))
    stats["logrank"] = survival.logrank(ggnd[0], ggnd[1], plain[0], plain[1])
    proportions = [stats[arm]["failure_proportion"]["proportion"] for arm in ("ggnd", "plain")]
    stats["fisher"]["replicas_needed_per_arm"] = survival.replicas_needed_fisher(*proportions)
    rmst_plain, rmst_ggnd = stats["plain"]["rmst"], stats["ggnd"]["rmst"]
    difference = rmst_ggnd["rmst_ps"] - rmst_plain["rmst_ps"]
    se = (rmst_ggnd["se_ps"] ** 2 + rmst_plain["se_ps"] ** 2) ** 0.5
    stats["rmst_difference"] = {
        "ggnd_minus_plain_ps": difference,
        "low": difference - 1.96 * se,
        "high": difference + 1.96 * se,
    }
    return stats


def _outcome(comparison) -> str:
    if "fisher" not in comparison:
        return "not run"
    p = comparison["fisher"]["p_value"]
    plain = comparison["plain"]["failure_proportion"]["proportion"]
    ggnd = comparison["ggnd"]["failure_proportion"]["proportion"]
    if p < ALPHA:
        return "GGND lowers the failure rate" if ggnd < plain else "GGND raises the failure rate"
    return "no significant difference"


def write_report(args, data, models) -> dict[str, Any]:
    from ggnd_plugin.md.stability import package_versions
    from ggnd_plugin.safe_io import atomic_write_text

    fits = {
        m["name"]: stage_cache(args.out, f"fit-{m['name']}").read()
        for m in models
        if stage_cache(args.out, f"fit-{m['name']}").done()
    }
    errors = {
        m["name"]: stage_cache(args.out, f"evaluate-{m['name']}").read()
        for m in models
        if stage_cache(args.out, f"evaluate-{m['name']}").done()
    }
    cells = {}
    for model in models:
        for cell, _, _ in CELLS:
            stage = stage_cache(args.out, f"stability-{model['name']}-{cell}")
            if stage.done():
                cells[(model["name"], cell)] = stage.read()
    endpoints: dict[str, Any] = {"primary": {}, "secondary": {}}
    for host in HOSTS:
        primary = _comparison(
            _arm(models, fits, cells, host, False, PRIMARY), _arm(models, fits, cells, host, True, PRIMARY)
        )
        endpoints["primary"][host] = {
            "cell": PRIMARY,
            "test": "Fisher exact, two-sided, failures within the horizon, seeds pooled",
            "alpha": ALPHA,
            "outcome": _outcome(primary),
            **primary,
        }
        secondary = {}
        for cell, _, _ in CELLS:
            secondary[cell] = _comparison(
                _arm(models, fits, cells, host, False, cell), _arm(models, fits, cells, host, True, cell)
            )
            for seed in SEEDS:
                secondary[f"{cell} seed {seed}"] = _comparison(
                    _arm(models, fits, cells, host, False, cell, (seed,)),
                    _arm(models, fits, cells, host, True, cell, (seed,)),
                )
        endpoints["secondary"][host] = secondary
    p_values = [endpoints["primary"][h].get("fisher", {}).get("p_value") for h in HOSTS]
    if all(p is not None for p in p_values):
        order = sorted(range(len(p_values)), key=lambda k: p_values[k])
        holm, running = [None] * len(p_values), 0.0
        for rank, k in enumerate(order):
            running = max(running, min(1.0, (len(p_values) - rank) * p_values[k]))
            holm[k] = running
        for host, value in zip(HOSTS, holm, strict=True):
            endpoints["primary"][host]["fisher"]["p_holm_over_hosts"] = value
    not_run = [
        f"{m['name']} {cell}" for m in models for cell, _, _ in CELLS if (m["name"], cell) not in cells
    ]
    not_evaluated = [m["name"] for m in models if m["name"] not in errors]
    payload = {
        "status": "complete"
        if not not_run and not not_evaluated
        else f"interim: {len(cells)} of {len(models) * len(CELLS)} cells run; the endpoints of the others "
        "are reported as not run",
        "cells_not_run": not_run,
        "models_not_evaluated": not_evaluated,
        "protocol": PROTOCOL,
        "protocol_commit": git_commit_of(PROTOCOL),
        "smoke": SMOKE,
        "settings": {
            "hosts": list(HOSTS),
            "size": SIZE,
            "seeds": list(SEEDS),
            "epochs_cap": EPOCHS,
            "patience": PATIENCE,
            "replicas": REPLICAS,
            "time_ps": TIME_PS,
            "md_seed": MD_SEED,
            "cells": [{"cell": c, "temperature_K": t, "start_set": s} for c, t, s in CELLS],
            "primary_cell": PRIMARY,
            "ggnd": "GGNDConfig() (version 2 defaults)",
        },
        "models": {
            m["name"]: {
                **m,
                "fit": {k: fits.get(m["name"], {}).get(k) for k in ("seconds", "epochs_run")},
                "errors": errors.get(m["name"]),
            }
            for m in models
        },
        "cells": {f"{name} {cell}": record for (name, cell), record in cells.items()},
        "endpoints": endpoints,
        "start_sets": start_set_deviation(data),
        "versions": package_versions(),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    atomic_write_text(args.results, json.dumps(payload, indent=2, default=str) + "\n")
    figures = args.out / "figures" if SMOKE else ROOT / "docs" / "img"
    plot_survival(models, fits, cells, figures)
    plot_start_sets(payload["start_sets"], figures / "study_3bpa_start_sets.png")
    (args.out / "tables.md").write_text(markdown(payload))
    print(markdown(payload))
    return payload


def plot_survival(models, fits, cells, folder: Path) -> None:
    """Kaplan-Meier curves with 95 % bands, plain against +GGND (seeds pooled), one panel per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ggnd_plugin.md import survival
    from ggnd_plugin.safe_io import atomic_path

    for host in HOSTS:
        figure, axes = plt.subplots(1, len(CELLS), figsize=(4 * len(CELLS), 3.4), sharey=True)
        for axis, (cell, temperature, start) in zip(axes, CELLS, strict=True):
            for ggnd, colour in ((False, "tab:blue"), (True, "tab:red")):
                times, failed, missing = _arm(models, fits, cells, host, ggnd, cell)
                if missing or not times:
                    axis.plot([], [], color=colour, label=f"{host}{' + GGND' if ggnd else ''}: not run")
                    continue
                curve = survival.kaplan_meier(times, failed, horizon=TIME_PS)
                t, s, low, high = curve.steps()
                label = f"{host}{' + GGND' if ggnd else ''} ({sum(failed)}/{len(failed)} failed)"
                axis.plot(t, s, color=colour, label=label)
                axis.fill_between(t, low, high, color=colour, alpha=0.15, linewidth=0)
            axis.set_title(
                f"{cell}: {temperature:g} K, {'xTB 1200 K' if start == 'start_1200K_xtb' else start} starts",
                fontsize=9,
            )
            axis.set_xlabel("time (ps)")
            axis.set_xlim(0, TIME_PS)
            axis.set_ylim(-0.02, 1.02)
            axis.legend(fontsize=7, loc="best")
        axes[0].set_ylabel("surviving replicas (Kaplan-Meier, 95 % band)")
        figure.suptitle(
            f"{host}: {REPLICAS} replicas x {len(SEEDS)} training seeds per arm, NVE 1 fs", fontsize=10
        )
        figure.tight_layout()
        with atomic_path(folder / f"study_3bpa_{host}_survival.png") as tmp:
            figure.savefig(tmp, dpi=110, format="png")
        plt.close(figure)


def plot_start_sets(start_sets: dict[str, Any], path: Path) -> None:
    """Histograms of each start set's largest bond deviation from the training means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ggnd_plugin.safe_io import atomic_path

    labels = {
        "test_300K": "test_300K (300 K starts)",
        "test_600K": "test_600K (600 K, 1200 K-A starts)",
        "start_1200K_xtb": "xTB 1200 K MD (1200 K-B starts)",
    }
    figure, axis = plt.subplots(figsize=(6, 3.4))
    top = max(max(record["values_A"]) for record in start_sets.values())
    for name, record in start_sets.items():
        axis.hist(
            record["values_A"],
            bins=40,
            range=(0, top),
            density=True,
            histtype="step",
            label=f"{labels[name]}, median {record['median_A']:.3f} Å",
        )
    axis.set_xlabel("largest bond deviation of a start frame (Å); failure at 0.5 Å")
    axis.set_ylabel("density")
    axis.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)


def _pct(record) -> str:
    proportion = record["failure_proportion"]
    return f"{record['failed']}/{record['replicas']} ({100 * proportion['low']:.0f}-{100 * proportion['high']:.0f} %)"


def markdown(payload: dict[str, Any]) -> str:
    """The results tables of docs/results.md: the primary endpoint, then every cell, then the errors."""
    lines = []
    if payload["status"] != "complete":
        lines += [f"**Status: {payload['status']}.**", ""]
    lines += [
        "### Primary endpoint: failures within 10 ps at 1200 K from the xTB 1200 K frames (seeds pooled)",
        "",
    ]
    lines += [
        "| host | plain failed (95 % Wilson) | +GGND failed (95 % Wilson) | Fisher p (two-sided) | Holm over hosts | replicas per arm needed | outcome |",
        "|---|---|---|---|---|---|---|",
    ]
    for host, record in payload["endpoints"]["primary"].items():
        if "fisher" not in record:
            lines.append(f"| {host} | not run | | | | | |")
            continue
        fisher = record["fisher"]
        needed = fisher.get("replicas_needed_per_arm")
        lines.append(
            f"| {host} | {_pct(record['plain'])} | {_pct(record['ggnd'])} | {fisher['p_value']:.3g} | "
            f"{fisher.get('p_holm_over_hosts', float('nan')):.3g} | {needed if needed else '—'} | {record['outcome']} |"
        )
    lines += ["", "### Secondary endpoints: every cell, seeds pooled and per seed", ""]
    lines += [
        "| host | cell | plain failed | +GGND failed | Fisher p | log-rank p | hazard ratio | RMST plain (ps) | RMST +GGND (ps) | ΔRMST (95 % CI) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for host, cells in payload["endpoints"]["secondary"].items():
        for cell, record in cells.items():
            if "fisher" not in record:
                lines.append(f"| {host} | {cell} | not run | | | | | | | |")
                continue
            logrank = record["logrank"]
            difference = record["rmst_difference"]
            p_logrank = "—" if logrank["p_value"] is None else f"{logrank['p_value']:.3g}"
            hazard = "—" if logrank["hazard_ratio"] is None else f"{logrank['hazard_ratio']:.2f}"
            lines.append(
                f"| {host} | {cell} | {_pct(record['plain'])} | {_pct(record['ggnd'])} | {record['fisher']['p_value']:.3g} | "
                f"{p_logrank} | {hazard} | {record['plain']['rmst']['rmst_ps']:.2f} | {record['ggnd']['rmst']['rmst_ps']:.2f} | "
                f"{difference['ggnd_minus_plain_ps']:+.2f} ({difference['low']:+.2f} to {difference['high']:+.2f}) |"
            )
    lines += ["", "### Errors (meV/atom for energy, meV/Å for forces) and training", ""]
    lines += [
        "| model | epochs | fit (min) | E 300 K | F 300 K | E 600 K | F 600 K | E valid | F valid |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, model in payload["models"].items():
        errors = model.get("errors") or {}
        cells = []
        for split in ("test_300K", "test_600K", "valid"):
            metrics = errors.get(split)
            cells += (
                ["—", "—"]
                if not metrics
                else [f"{1e3 * metrics['energy_per_atom_mae']:.2f}", f"{1e3 * metrics['forces_mae']:.1f}"]
            )
        fit = model["fit"]
        minutes = "—" if fit.get("seconds") is None else f"{fit['seconds'] / 60:.0f}"
        lines.append(f"| `{name}` | {fit.get('epochs_run') or '—'} | {minutes} | " + " | ".join(cells) + " |")
    lines += ["", "### Start sets: largest bond deviation of a start frame from the training means (Å)", ""]
    lines += ["| start set | frames | median | 90th percentile | max |", "|---|---|---|---|---|"]
    for name, record in payload["start_sets"].items():
        lines.append(
            f"| {name} | {record['frames']} | {record['median_A']:.3f} | {record['p90_A']:.3f} | {record['max_A']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def start_set_deviation(data) -> dict[str, Any]:
    """Max bond deviation (the stability criterion's quantity) of each start set's frames, against the
    bonds and lengths of the training set: how far from equilibrium the replicas start."""
    import numpy as np

    from ggnd_plugin.data import read_labelled, read_structures
    from ggnd_plugin.md.metrics import reference_bonds

    pairs, lengths = reference_bonds(read_labelled(data["train"]), 1.8, "train")
    pairs, lengths = np.asarray(pairs), np.asarray(lengths)
    out = {}
    for name in ("test_300K", "test_600K", "start_1200K_xtb"):
        frames = read_structures(data[name])
        positions = np.stack([f.positions for f in frames])
        distances = np.linalg.norm(positions[:, pairs[:, 0]] - positions[:, pairs[:, 1]], axis=-1)
        deviation = np.abs(distances - lengths).max(axis=1)
        out[name] = {
            "frames": len(frames),
            "median_A": float(np.median(deviation)),
            "p90_A": float(np.quantile(deviation, 0.9)),
            "max_A": float(deviation.max()),
            "values_A": deviation.round(4).tolist(),
        }
    return out


__all__ = ["write_report", "ROOT", "Path"]
