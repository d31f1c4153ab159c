"""The report of study 2 (docs/study2-protocol.md): every pre-registered endpoint from the job cache.

An endpoint is computed only when every cell it needs has run; otherwise it is listed as not run. The
JSON holds the protocol's commit, the code commit of every job, per model its training seed, epochs and
convergence, per cell the per-replica rows, and every endpoint; tables go to ``OUT/tables.md`` and the
plots to ``docs/img/study_upgrade_*.png``.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import study_upgrade_protocol as study

from ggnd_plugin.bond_scan import REPORT_LENGTHS
from ggnd_plugin.md.paired import paired_comparison, sign_flip_test
from ggnd_plugin.md.survival import kaplan_meier

ARMS = ("upgrade", "control")
SCAN_TYPES = ("C-H", "H-N", "C-C", "C-N", "C-O")


def relative(value, out: Path):
    """Paths in job records as the repository names them (``build/...``), never a machine's absolute path."""
    if isinstance(value, dict):
        return {k: relative(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [relative(v, out) for v in value]
    if isinstance(value, str) and value.startswith(str(out)):
        return "OUT" + value[len(str(out)) :]
    return value


def protocol_commit() -> str | None:
    done = subprocess.run(
        ["git", "log", "-1", "--format=%H", "--", study.PROTOCOL],
        cwd=study.ROOT,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip() or None


def cell_rows(out: Path, cell: str, arm: str, seed: int) -> list[dict] | None:
    record = study.finished(out, f"cell-{cell}-{arm}-s{seed}")
    if record is None:
        return None
    return json.loads(Path(record["results"]).read_text())["replicas"]


def paired_endpoint(out: Path, cell: str, temperature: float, seeds, treatment: str, control: str):
    rows, missing = [], []
    for seed in seeds:
        for arm in (treatment, control):
            found = cell_rows(out, cell, arm, seed)
            if found is None:
                missing.append(f"{cell}/{arm}-s{seed}")
            else:
                rows += found
    if missing:
        return {"status": "not run", "missing_cells": missing}
    pairs = [(f"{treatment}-s{s}", f"{control}-s{s}") for s in seeds]
    return {"status": "complete", **paired_comparison(rows, pairs, temperature, study.TIME_PS)}


def models_table(out: Path) -> list[dict[str, Any]]:
    models = []
    for seed in study.BASE_SEEDS:
        for arm in ("base", *ARMS):
            record = study.finished(out, f"{arm}-s{seed}")
            entry = {"model": f"{arm}-s{seed}", "arm": arm, "base_seed": seed, "status": "not run"}
            if record is not None:
                entry.update(
                    status="complete",
                    training_seed=seed if arm == "base" else study.FT_SEED,
                    epochs_run=record.get("epochs_run"),
                    best_epoch=record.get("best_epoch"),
                    reached_cap=record.get("reached_cap"),
                    met_convergence_rule=not record.get("reached_cap"),
                    seconds=record.get("seconds"),
                    code_commit=record["code_commit"],
                    code_dirty=record["code_dirty"],
                )
            models.append(entry)
    return models


def cells_table(out: Path) -> list[dict[str, Any]]:
    cells = []
    for cell, temperature, start, seeds, arms in study.CELLS:
        for seed in seeds:
            for arm in arms:
                record = study.finished(out, f"cell-{cell}-{arm}-s{seed}")
                entry = {
                    "cell": cell,
                    "temperature_K": temperature,
                    "start_frames": start,
                    "model": f"{arm}-s{seed}",
                }
                if record is None:
                    cells.append({**entry, "status": "not run"})
                    continue
                rows = json.loads(Path(record["results"]).read_text())["replicas"]
                keep = ("replica", "start_frame", "seed", "stability_ps", "failed", "failure")
                cells.append(
                    {
                        **entry,
                        "status": "complete",
                        "code_commit": record["code_commit"],
                        "code_dirty": record["code_dirty"],
                        "seconds": record["seconds"],
                        "failed": sum(r["failed"] for r in rows),
                        "replicas": [{k: r.get(k) for k in keep} for r in rows],
                    }
                )
    return cells


def errors_endpoint(out: Path) -> dict[str, Any]:
    per_model, missing = {}, []
    for seed in study.BASE_SEEDS:
        for arm in ("base", *ARMS):
            record = study.finished(out, f"evaluate-{arm}-s{seed}")
            if record is None:
                missing.append(f"{arm}-s{seed}")
                continue
            per_model[f"{arm}-s{seed}"] = {
                name: {
                    "energy_per_atom_mae_meV": m["energy_per_atom_mae"] * 1e3,
                    "forces_mae_meV_per_A": m["forces_mae"] * 1e3,
                }
                for name, m in record["metrics"].items()
            }
    if missing:
        return {"status": "not run", "missing": missing, "per_model": per_model}
    summary = {}
    for name in study.EVALUATION_SETS:
        for quantity in ("energy_per_atom_mae_meV", "forces_mae_meV_per_A"):
            values = {
                arm: [per_model[f"{arm}-s{s}"][name][quantity] for s in study.BASE_SEEDS]
                for arm in ("base", *ARMS)
            }
            differences = [u - c for u, c in zip(values["upgrade"], values["control"], strict=True)]
            summary[f"{name}/{quantity}"] = {
                **{f"{arm}_mean": float(np.mean(v)) for arm, v in values.items()},
                "mean_difference_upgrade_minus_control": float(np.mean(differences)),
                "sign_flip": sign_flip_test(differences),
            }
    return {"status": "complete", "per_model": per_model, "summary": summary}


def scans_endpoint(out: Path) -> dict[str, Any]:
    per_model, missing = {}, []
    for seed in study.BASE_SEEDS:
        for arm in ("base", *ARMS):
            record = study.finished(out, f"scan-{arm}-s{seed}")
            if record is None:
                missing.append(f"{arm}-s{seed}")
                continue
            scan = json.loads(Path(record["scan"]).read_text())
            per_model[f"{arm}-s{seed}"] = {row["bond_type"]: row for row in scan["table"]}
    if missing:
        return {"status": "not run", "missing": missing}
    summary = {}
    for bond_type in SCAN_TYPES:
        for length in REPORT_LENGTHS:
            key = f"E_{length:g}"
            values = {
                arm: [per_model[f"{arm}-s{s}"][bond_type][key] for s in study.BASE_SEEDS]
                for arm in ("base", *ARMS)
            }
            differences = [u - c for u, c in zip(values["upgrade"], values["control"], strict=True)]
            summary[f"{bond_type}@{length:g}"] = {
                **{f"{arm}_mean_eV": float(np.mean(v)) for arm, v in values.items()},
                "mean_difference_eV": float(np.mean(differences)),
                "sign_flip": sign_flip_test(differences),
            }
    return {"status": "complete", "per_model": per_model, "summary": summary}


def outcome_sentence(primary: dict[str, Any]) -> str:
    if primary["status"] != "complete":
        return "not run"
    flip = primary["sign_flip"]
    fraction = primary["failed_fraction"]
    if flip["p_value"] < 0.05 and flip["mean_difference"] < 0:
        head = "Upgrading with GGND lowers the 1200 K failure rate of these fitted MACE models"
    elif flip["p_value"] < 0.05 and flip["mean_difference"] > 0:
        head = "Upgrading with GGND raises the 1200 K failure rate of these fitted MACE models"
    else:
        head = "No significant difference between upgrading with GGND and fine-tuning without it"
    return (
        f"{head}: mean failed fraction {fraction['treatment_mean']:.3f} (upgrade) against "
        f"{fraction['control_mean']:.3f} (control), mean paired difference {flip['mean_difference']:+.3f}, "
        f"{flip['negative']} base models lower, {flip['zero']} equal, {flip['positive']} higher, exact sign-flip "
        f"p = {flip['p_value']:.3g} over {flip['pairs']} base models."
    )


def survival_plot(out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for index, arm in enumerate(("upgrade", "control", "base")):
        rows = [r for s in study.BASE_SEEDS for r in (cell_rows(out, "1200K", arm, s) or [])]
        if not rows:
            continue
        curve = kaplan_meier([r["stability_ps"] for r in rows], [r["failed"] for r in rows], study.TIME_PS)
        ax.step(
            curve.time, curve.survival, where="post", color=f"C{index}", label=f"{arm} ({len(rows)} replicas)"
        )
        ax.fill_between(curve.time, curve.low, curve.high, step="post", color=f"C{index}", alpha=0.15)
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("fraction of replicas still stable")
    ax.set_title("study 2: 1200 K, replicas of all base models pooled")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(payload: dict[str, Any]) -> str:
    lines = [f"**Outcome.** {payload['outcome']}", ""]
    primary = payload["endpoints"]["primary"]
    if primary["status"] == "complete":
        lines += [
            "| base model | upgrade failed | control failed | difference | RMST upgrade (ps) | RMST control (ps) |",
            "|---|---|---|---|---|---|",
        ]
        for pair in primary["pairs"]:
            lines.append(
                f"| {pair['treatment'].split('-')[-1]} | {pair['treatment_failed']}/{pair['replicas']} | "
                f"{pair['control_failed']}/{pair['replicas']} | {pair['difference']:+.2f} | "
                f"{pair['treatment_rmst_ps']:.2f} | {pair['control_rmst_ps']:.2f} |"
            )
        w, c = primary["wilcoxon"], primary["cochran_mantel_haenszel"]
        lines += [
            "",
            f"Sign-flip p = {primary['sign_flip']['p_value']:.4g}; Wilcoxon p = {w['p_value']:.4g} ({w['method']}); "
            f"CMH p = {c['p_value']:.4g}, MH odds ratio {c['odds_ratio'] if c['odds_ratio'] is None else round(c['odds_ratio'], 3)}; "
            f"RMST difference {primary['rmst']['mean_difference_ps']:+.2f} ps (sign-flip p = {primary['rmst']['sign_flip']['p_value']:.4g}).",
        ]
    return "\n".join(lines) + "\n"


def report(out: Path, data: dict[str, Path], results: Path) -> dict[str, Any]:
    from ggnd_plugin import __version__
    from ggnd_plugin.safe_io import atomic_write_text

    seeds = study.BASE_SEEDS
    models = models_table(out)
    converged = [
        s
        for s in seeds
        if all(not m.get("reached_cap") for m in models if m["base_seed"] == s and m["arm"] in ARMS)
    ]
    endpoints = {
        "primary": paired_endpoint(out, "1200K", 1200.0, seeds, "upgrade", "control"),
        "without_capped_finetunes": paired_endpoint(out, "1200K", 1200.0, converged, "upgrade", "control")
        if converged
        else {"status": "no base model left"},
        "errors": errors_endpoint(out),
        "bond_scans": scans_endpoint(out),
        "control_vs_base": paired_endpoint(out, "1200K", 1200.0, seeds, "control", "base"),
        "upgrade_vs_base": paired_endpoint(out, "1200K", 1200.0, seeds, "upgrade", "base"),
    }
    for cell, temperature, _, cell_seeds, _ in study.CELLS[2:]:
        endpoints[f"cells_{cell}"] = paired_endpoint(out, cell, temperature, cell_seeds, "upgrade", "control")
    jobs = {path.stem: json.loads(path.read_text()) for path in sorted((out / "jobs").glob("*.json"))}
    payload = {
        "study": "upgrade (issue 19)",
        "protocol": study.PROTOCOL,
        "protocol_commit": protocol_commit(),
        "package_version_reporting": __version__,
        "code_commits": sorted({(j["code_commit"], j["code_dirty"]) for j in jobs.values()}),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "status": "complete" if all(e.get("status") != "not run" for e in endpoints.values()) else "partial",
        "settings": {
            "base_seeds": list(seeds),
            "base_epochs": study.BASE_EPOCHS,
            "base_patience": study.BASE_PATIENCE,
            "finetune_patience": study.FT_PATIENCE,
            "finetune_cap": study.FT_CAP,
            "finetune_lr": study.FT_LR,
            "finetune_batch": study.FT_BATCH,
            "replicas": study.REPLICAS,
            "time_ps": study.TIME_PS,
            "md_seed": study.MD_SEED,
            "start_seeds": list(study.START_SEEDS),
        },  # fmt: skip
        "outcome": outcome_sentence(endpoints["primary"]),
        "models": models,
        "cells": cells_table(out),
        "endpoints": endpoints,
        "out": "OUT: the study's cache folder (build/study_upgrade by default)",
        "jobs": {
            name: relative({k: v for k, v in job.items() if k != "history"}, out)
            for name, job in jobs.items()
        },
        "deviations": [],
    }
    payload["code_commits"] = [{"commit": c, "dirty": d} for c, d in payload["code_commits"]]
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results, json.dumps(payload, indent=1, default=float))
    atomic_write_text(out / "tables.md", markdown(payload))
    image = study.ROOT / "docs" / "img" if not study.SMOKE else out
    survival_plot(out, image / "study_upgrade_survival.png")
    study.say(payload["outcome"])
    return payload
