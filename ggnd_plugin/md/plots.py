"""Plots of a stability run: max deviation per replica over time, and Kaplan-Meier survival curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ggnd_plugin.md.protocol import StabilityResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _layout(result: StabilityResult):
    models = list(dict.fromkeys(row["model"] for row in result.rows))
    temperatures = sorted({row["temperature_K"] for row in result.rows})
    return models, temperatures


def plot_max_deviation(result: StabilityResult, path: str | Path) -> Path:
    """One panel per (model, temperature): each replica's windowed max deviation, the threshold, failures."""
    plt = _pyplot()
    models, temperatures = _layout(result)
    monitor = result.protocol["monitor"]
    bonds = monitor["criterion"] == "bonds"
    figure, axes = plt.subplots(
        len(models),
        len(temperatures),
        figsize=(3.4 * len(temperatures) + 0.6, 2.6 * len(models) + 0.6),
        squeeze=False,
        sharex=True,
        sharey=True,
    )
    for row_index, model in enumerate(models):
        for column_index, temperature in enumerate(temperatures):
            axis = axes[row_index][column_index]
            if not any(r["model"] == model and r["temperature_K"] == temperature for r in result.rows):
                axis.text(0.5, 0.5, "not run", ha="center", va="center", transform=axis.transAxes)
            for row in result.rows:
                if row["model"] != model or row["temperature_K"] != temperature:
                    continue
                series = result.series[f"{model}/{temperature:g}K/{row['replica']}"]
                values = np.where(np.isfinite(series["max_deviation"]), series["max_deviation"], np.nan)
                (line,) = axis.plot(series["time_ps"], values, lw=0.8)
                if row["failed"]:
                    failure = (
                        row["max_deviation"] if row["max_deviation"] is not None else monitor["threshold"]
                    )
                    axis.plot([row["stability_ps"]], [failure], "x", color=line.get_color(), ms=6)
            axis.axhline(monitor["threshold"], color="k", ls="--", lw=0.8)
            axis.set_title(f"{model}, {temperature:g} K", fontsize=9)
            if row_index == len(models) - 1:
                axis.set_xlabel("time (ps)")
            if column_index == 0:
                axis.set_ylabel("max bond deviation (Å)" if bonds else "RDF distance")
    top = 2.0 * monitor["threshold"]
    axes[0][0].set_ylim(0, top)
    axes[0][0].set_xlim(0, result.protocol["time_ps"])
    figure.suptitle(
        f"{result.protocol['ensemble'].upper()}, {result.protocol['timestep_fs']} fs; dashed: Δ = "
        f"{monitor['threshold']}{' Å' if bonds else ''}; x: failure",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def plot_survival(result: StabilityResult, path: str | Path) -> Path:
    """Kaplan-Meier survival with pointwise 95 % bands: one panel per temperature, one curve per model.

    Replicas that reach the horizon are censored there, so before the horizon the curve is the fraction
    of replicas still stable; the band is scipy's log-log interval (ggnd_plugin.md.survival).
    """
    from ggnd_plugin.md.survival import CONFIDENCE, kaplan_meier

    plt = _pyplot()
    models, temperatures = _layout(result)
    horizon = result.protocol["time_ps"]
    figure, axes = plt.subplots(
        1, len(temperatures), figsize=(3.4 * len(temperatures) + 0.6, 3.5), squeeze=False
    )
    handles = {}
    for column_index, temperature in enumerate(temperatures):
        axis = axes[0][column_index]
        for model_index, model in enumerate(models):
            rows = [r for r in result.rows if r["model"] == model and r["temperature_K"] == temperature]
            if not rows:  # this model was not run at this temperature: no curve, not a zero line
                continue
            curve = kaplan_meier(
                [r["stability_ps"] for r in rows], [r["failed"] for r in rows], horizon, CONFIDENCE
            )
            time, survival, low, high = curve.steps()
            # One colour per model across panels, whichever models a panel has.
            colour = f"C{model_index % 10}"
            axis.fill_between(time, low, high, color=colour, alpha=0.18, linewidth=0)
            (line,) = axis.plot(time, survival, label=model, color=colour)
            handles.setdefault(model, line)
        axis.set_ylim(-0.03, 1.03)
        axis.set_xlim(0, horizon)
        axis.set_title(f"{temperature:g} K", fontsize=9)
        axis.set_xlabel("time (ps)")
        if column_index == 0:
            axis.set_ylabel("fraction of replicas stable (KM)")
    # Below the panels: inside, it would hide curves that fall to 0 and the bands.
    figure.legend(
        handles=[handles[m] for m in models if m in handles],
        fontsize=8,
        loc="lower center",
        ncol=min(len(handles), 4) or 1,
        frameon=False,
    )
    figure.suptitle(
        f"Kaplan-Meier survival; shaded: pointwise {CONFIDENCE * 100:g} % band (log-log; none before the "
        "first failure)",
        fontsize=9,
    )
    rows_of_legend = math.ceil(len(handles) / 4)
    figure.tight_layout(rect=(0, 0.06 * rows_of_legend, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)
