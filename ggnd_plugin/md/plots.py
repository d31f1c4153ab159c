"""Plots of a stability run: max deviation per replica over time, and survival curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ggnd_plugin.md.stability import StabilityResult


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


def survival_curve(
    times_ps: np.ndarray, horizon: float, n_points: int = 400
) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of replicas still stable at each time (a replica failing at t counts as stable before t)."""
    grid = np.linspace(0.0, horizon, n_points)
    times = np.asarray(times_ps, dtype=float)
    return grid, (times[None, :] > grid[:, None]).mean(axis=1) if len(times) else np.zeros_like(grid)


def plot_survival(result: StabilityResult, path: str | Path) -> Path:
    """One panel per temperature, one curve per model."""
    plt = _pyplot()
    models, temperatures = _layout(result)
    horizon = result.protocol["time_ps"]
    figure, axes = plt.subplots(
        1, len(temperatures), figsize=(3.4 * len(temperatures) + 0.6, 3.0), squeeze=False
    )
    handles = {}
    for column_index, temperature in enumerate(temperatures):
        axis = axes[0][column_index]
        for model_index, model in enumerate(models):
            times = [
                r["stability_ps"] if r["failed"] else np.inf
                for r in result.rows
                if r["model"] == model and r["temperature_K"] == temperature
            ]
            if not times:  # this model was not run at this temperature: no curve, not a zero line
                continue
            grid, alive = survival_curve(np.array(times), horizon)
            # One colour per model across panels, whichever models a panel has.
            (line,) = axis.step(grid, alive, where="post", label=model, color=f"C{model_index % 10}")
            handles.setdefault(model, line)
        axis.set_ylim(-0.03, 1.03)
        axis.set_xlim(0, horizon)
        axis.set_title(f"{temperature:g} K", fontsize=9)
        axis.set_xlabel("time (ps)")
        if column_index == 0:
            axis.set_ylabel("fraction of replicas stable")
    axes[0][-1].legend(handles=[handles[m] for m in models if m in handles], fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)
