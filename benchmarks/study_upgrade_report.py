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
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import study_upgrade_protocol as study
from study_upgrade_tables import ARMS, SCAN_TYPES, markdown, scan_plot, survival_plot

from ggnd_plugin.bond_scan import REPORT_LENGTHS
from ggnd_plugin.md.paired import paired_comparison, sign_flip_test


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


# Departures of the text, not of the computation: listed so that the page and the run can be compared.
ERRATA = (
    "The protocol's 'Order of the computation' says 'the 16 primary cells'; there are 12 (6 base models x "
    "2 arms), as its 'Compute' section says. A slip of the text: nothing ran differently.",
)


def deviations(out: Path, models: list[dict], jobs: dict[str, dict], commit: str | None) -> list[dict]:
    """Every departure from the protocol, and every event the protocol foresaw (a cap reached, a stopped
    and resumed job), found in the job cache and the logs rather than remembered."""
    found = []
    for m in models:
        if m["status"] != "complete" or not m["reached_cap"]:
            continue
        if m["arm"] == "base":
            what = (
                f"Base model {m['model']} stopped at the {study.BASE_EPOCHS}-epoch cap, not by the "
                f"convergence rule (patience {study.BASE_PATIENCE}); it stays in the study, as the protocol fixes."
            )
        else:
            what = (
                f"Fine-tune {m['model']} reached the {study.FT_CAP}-epoch cap (best epoch {m['best_epoch']}), "
                "not converged by the rule; analysed as it is, and its base model is left out of secondary 4, "
                "as the protocol fixes."
            )
        found.append({"kind": "cap reached (foreseen by the protocol)", "job": m["model"], "what": what})
    elsewhere: dict[tuple[str, bool], list[str]] = {}
    for name, job in sorted(jobs.items()):
        if commit is not None and (job["code_commit"] != commit or job["code_dirty"]):
            elsewhere.setdefault((job["code_commit"], job["code_dirty"]), []).append(name)
        if job.get("device", "cpu") != "cpu":
            found.append({"kind": "machine", "job": name, "what": f"Job {name} ran on {job['device']}."})
    for (code, dirty), names in elsewhere.items():
        state = " with uncommitted changes" if dirty else ""
        what = f"Jobs {', '.join(names)} ran on commit {code[:10]}{state}, not the protocol's."
        found.append({"kind": "code", "job": names, "what": what})
    for log in sorted((out / "logs").glob("cell-*.log")):
        if any(line.startswith("$ ") and "--resume" in line for line in log.read_text().splitlines()):
            found.append(
                {
                    "kind": "stopped and resumed",
                    "job": log.stem,
                    "what": f"MD cell {log.stem[5:]} was stopped (a session ended) and resumed from its "
                    "checkpoint with `ggnd stability --resume`, which gives the uninterrupted run's result "
                    "(tests/test_stability.py, tests/test_autobatch.py).",
                }
            )
    for log in sorted((out / "fits").glob("base-s*/logs/*[0-9].log")):
        found += continued_fits(log)
    found += [{"kind": "erratum", "job": None, "what": text} for text in ERRATA]
    return found


def _log_time(line: str) -> datetime | None:
    try:
        return datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return None


def continued_fits(log: Path) -> list[dict[str, Any]]:
    """The restarts of a MACE fit, from its log: a checkpoint loaded before training starts (MACE also
    loads one at the end of a fit, to evaluate it), with the time of the part before the restart, which
    the job record's time does not include."""
    fit, found = log.parents[1].name, []
    loaded = started = last_epoch = None
    for line in log.read_text().splitlines():
        if "Loading checkpoint" in line:
            loaded = line.rsplit("_epoch-", 1)[-1].split(".")[0]
        elif " Epoch " in line:
            last_epoch = _log_time(line) or last_epoch
        elif "Started training" in line:
            if loaded is not None:
                earlier = ""
                if started is not None and last_epoch is not None:
                    minutes = (last_epoch - started).total_seconds() / 60
                    earlier = (
                        f" The part before the restart took {minutes:.0f} min, not in the cost table's time."
                    )
                what = (
                    f"Base fit {fit} was stopped (a session ended) and continued from MACE's epoch-{loaded} "
                    "checkpoint (`--restart_latest`: weights, optimizer and scheduler restored); the batches "
                    f"after the restart need not be those an uninterrupted fit would have drawn.{earlier}"
                )
                found.append({"kind": "stopped and resumed", "job": fit, "what": what})
            loaded, started = None, _log_time(line)
    return found


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


def counts_endpoint(out: Path, cell: str, temperature: float, seeds) -> dict[str, Any]:
    """Secondary 7: the paired counts of one or two base models, without tests (the protocol: too few
    models for a test; a sign-flip p over two pairs cannot fall below 0.5)."""
    endpoint = paired_endpoint(out, cell, temperature, seeds, "upgrade", "control")
    if endpoint["status"] != "complete":
        return endpoint
    for test in ("sign_flip", "wilcoxon", "cochran_mantel_haenszel"):
        endpoint.pop(test)
    endpoint["rmst"].pop("sign_flip")
    endpoint["tests"] = "none: too few base models, reported as counts (protocol, secondary 7)"
    return endpoint


def kept_mace_epoch(out: Path, arm: str, seed: int) -> int | None:
    """The epoch of the model a base fit kept, counted from 1: MACE saves a checkpoint only when the
    validation loss improves and loads the last one at the end of the fit (its log numbers epochs from 0)."""
    log = out / "fits" / f"{arm}-s{seed}" / "logs" / f"mace_run-{seed}.log"
    if arm != "base" or not log.exists():
        return None
    loads = [line for line in log.read_text().splitlines() if "Loading checkpoint" in line]
    return int(loads[-1].rsplit("_epoch-", 1)[-1].split(".")[0]) + 1 if loads else None


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
                    best_epoch=record.get("best_epoch") or kept_mace_epoch(out, arm, seed),
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


def report(out: Path, data: dict[str, Path], results: Path, images: Path | None = None) -> dict[str, Any]:
    """Write the JSON to ``results``, the tables to ``OUT/tables.md``, the plots to ``images`` (docs/img)."""
    from ggnd_plugin import __version__
    from ggnd_plugin.safe_io import atomic_write_text

    seeds = study.BASE_SEEDS
    state = study.code_state()
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
        endpoints[f"cells_{cell}"] = counts_endpoint(out, cell, temperature, cell_seeds)
    jobs = {path.stem: json.loads(path.read_text()) for path in sorted((out / "jobs").glob("*.json"))}
    payload = {
        "study": "upgrade (issue 19)",
        "protocol": study.PROTOCOL,
        "protocol_commit": protocol_commit(),
        "package_version_reporting": __version__,
        "report_code": {"commit": state["code_commit"], "dirty": state["code_dirty"]},
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
        "deviations": deviations(out, models, jobs, protocol_commit()),
    }
    payload["code_commits"] = [{"commit": c, "dirty": d} for c, d in payload["code_commits"]]
    results.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results, json.dumps(payload, indent=1, default=float))
    atomic_write_text(out / "tables.md", markdown(payload))
    image = images or (study.ROOT / "docs" / "img" if not study.SMOKE else out)
    survival_plot(
        {arm: [r for s in seeds for r in (cell_rows(out, "1200K", arm, s) or [])] for arm in (*ARMS, "base")},
        image / "study_upgrade_survival.png",
    )
    if endpoints["bond_scans"]["status"] == "complete":
        scan_plot(endpoints["bond_scans"], image / "study_upgrade_bond_scans.png")
    study.say(payload["outcome"])
    return payload
