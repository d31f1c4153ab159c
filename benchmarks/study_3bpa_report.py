"""The report of the pre-registered 3BPA study (docs/study-protocol.md): every endpoint, from the cache.

Imported by ``benchmarks/study_3bpa.py``; statistics from ``ggnd_plugin.md.survival`` (scipy).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from study_3bpa import (
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
    _stage,
    git_commit_of,
)


def _arm(models, fits, cells, host: str, ggnd: bool, cell: str, seeds=SEEDS):
    """Stability times and failure flags of one host's plain or GGND models (the given seeds pooled)."""
    times, failed = [], []
    for model in models:
        if model["host"] == host and model["ggnd"] == ggnd and model["seed"] in seeds:
            record = cells.get((model["name"], cell))
            if record is None:
                continue
            times += [row["stability_ps"] for row in record["rows"]]
            failed += [bool(row["failed"]) for row in record["rows"]]
    return times, failed


def _comparison(plain, ggnd) -> dict[str, Any] | None:
    from ggnd_plugin.md import survival

    if not plain[0] or not ggnd[0]:
        return None
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
    if comparison is None:
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
        m["name"]: _stage(args.out, f"fit-{m['name']}").read()
        for m in models
        if _stage(args.out, f"fit-{m['name']}").done()
    }
    errors = {
        m["name"]: _stage(args.out, f"evaluate-{m['name']}").read()
        for m in models
        if _stage(args.out, f"evaluate-{m['name']}").done()
    }
    cells = {}
    for model in models:
        for cell, _, _ in CELLS:
            stage = _stage(args.out, f"stability-{model['name']}-{cell}")
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
            **(primary or {}),
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
    payload = {
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
    return payload


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
