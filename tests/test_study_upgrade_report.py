"""Study 2's report (benchmarks/study_upgrade_report.py) on a synthetic job cache.

The cache is built the way benchmarks/study_upgrade.py writes it (job records, per-cell results.json,
logs); the endpoints must follow from the rows by hand-worked arithmetic (6 base models all lower: exact
sign-flip p = 2/64), an endpoint with a cell missing must be "not run", and the deviations must be found
in the cache and logs: caps reached, a resumed MD cell, a MACE fit continued from its checkpoint, a job
on another commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import study_upgrade_protocol as study  # noqa: E402
import study_upgrade_report as report  # noqa: E402
import study_upgrade_tables as tables  # noqa: E402

# failures out of 20 per base seed: the upgrade arm lower than the control for every base model
FAILED = {"upgrade": (2, 4, 1, 6, 3, 5), "control": (9, 8, 7, 12, 10, 6), "base": (10, 10, 10, 10, 10, 10)}


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def _job(out: Path, name: str, commit: str, **fields) -> None:
    record = {"job": name, "code_commit": commit, "code_dirty": False, "device": "cpu", **fields}
    _write(study.job_file(out, name), record)


def _cell(out: Path, commit: str, arm: str, seed: int, failures: int, cell: str = "1200K") -> None:
    folder = out / "cells" / cell / f"{arm}-s{seed}"
    rows = [
        {
            "model": f"{arm}-s{seed}",
            "temperature_K": float(cell.rstrip("K")),
            "replica": k,
            "start_frame": (7 * k) % 20,
            "seed": 1000 + k,
            "stability_ps": 0.5 + 0.25 * k if k < failures else study.TIME_PS,
            "failed": k < failures,
        }
        for k in range(study.REPLICAS)
    ]
    _write(folder / "results.json", {"replicas": rows})
    _job(out, f"cell-{cell}-{arm}-s{seed}", commit, results=str(folder / "results.json"), seconds=60.0)


@pytest.fixture
def cache(tmp_path):
    commit = report.protocol_commit()
    assert commit, "the protocol's commit must be found in this repository's history"
    out = tmp_path / "study"
    for k, seed in enumerate(study.BASE_SEEDS):
        _job(out, f"base-s{seed}", commit, epochs_run=150, reached_cap=True, seconds=1.0)
        for arm in ("upgrade", "control"):
            capped = (arm, seed) == ("control", 14)
            _job(
                out,
                f"{arm}-s{seed}",
                commit,
                epochs_run=60 if capped else 30,
                best_epoch=20,
                reached_cap=capped,
            )
        for arm in FAILED:
            _cell(out, commit, arm, seed, FAILED[arm][k])
    # one cell stopped and resumed; one base fit continued from MACE's checkpoint; one job on other code
    log = out / "logs" / "cell-1200K-upgrade-s10.log"
    log.parent.mkdir(parents=True)
    log.write_text("\n$ ggnd stability m --out c\n\n$ ggnd stability m --out c --resume\n")
    mace = out / "fits" / "base-s11" / "logs" / "mace_run-11.log"
    mace.parent.mkdir(parents=True)
    mace.write_text(
        "2026-12-07 01:29:06.107 INFO: Started training, reporting errors on validation set\n"
        "2026-12-07 01:29:36.126 INFO: Epoch 0: head: Default, loss=5.98\n"
        "2026-12-07 01:48:10.080 INFO: Epoch 82: head: Default, loss=0.0232\n"
        "2026-12-07 02:08:50.599 INFO: Loading checkpoint: c/mace_run-11_epoch-82.pt\n"
        "2026-12-07 02:08:50.608 INFO: Started training, reporting errors on validation set\n"
        "2026-12-07 02:53:26.311 INFO: Training complete\n"
        "2026-12-07 02:53:26.311 INFO: Loading checkpoint: c/mace_run-11_epoch-146.pt\n"
    )
    _job(out, "start-s1", "0" * 40, frames="f.xyz")
    return out


def test_primary_endpoint_follows_from_the_rows(cache):
    primary = report.paired_endpoint(cache, "1200K", 1200.0, study.BASE_SEEDS, "upgrade", "control")
    assert primary["status"] == "complete"
    differences = [(u - c) / 20 for u, c in zip(FAILED["upgrade"], FAILED["control"], strict=True)]
    assert [p["difference"] for p in primary["pairs"]] == pytest.approx(differences)
    flip = primary["sign_flip"]
    # all six lower: only the observed signs and their mirror are as extreme, 2 of 2**6 assignments
    assert flip["p_value"] == pytest.approx(2 / 64)
    assert (flip["negative"], flip["zero"], flip["positive"]) == (6, 0, 0)
    assert report.outcome_sentence(primary).startswith("Upgrading with GGND lowers the 1200 K failure rate")
    # base s15: upgrade 5 vs control 6; the base model itself 10 of 20
    assert primary["pairs"][-1]["control_failed"] == 6


def test_an_endpoint_with_a_missing_cell_is_not_run(cache):
    (cache / "jobs" / "cell-1200K-control-s13.json").unlink()
    primary = report.paired_endpoint(cache, "1200K", 1200.0, study.BASE_SEEDS, "upgrade", "control")
    assert primary == {"status": "not run", "missing_cells": ["1200K/control-s13"]}
    assert report.outcome_sentence(primary) == "not run"


def test_deviations_are_found_in_the_cache_and_logs(cache):
    jobs = {path.stem: json.loads(path.read_text()) for path in (cache / "jobs").glob("*.json")}
    found = report.deviations(cache, report.models_table(cache), jobs, report.protocol_commit())
    kinds = [(d["kind"], str(d["job"])) for d in found]
    caps = [job for kind, job in kinds if kind.startswith("cap reached")]
    assert sorted(caps) == sorted([f"base-s{s}" for s in study.BASE_SEEDS] + ["control-s14"])
    resumed = sorted(job for kind, job in kinds if kind == "stopped and resumed")
    assert resumed == ["base-s11", "cell-1200K-upgrade-s10"]
    (continued,) = [d["what"] for d in found if d["job"] == "base-s11" and d["kind"] == "stopped and resumed"]
    assert "epoch-82 checkpoint" in continued  # not the end-of-fit load of epoch 146
    assert "before the restart took 19 min" in continued  # 01:29:06 to 01:48:10
    # the model the fit kept: MACE's last checkpoint, epoch 146 counted from 0
    (base,) = [m for m in report.models_table(cache) if m["model"] == "base-s11"]
    assert base["best_epoch"] == 147
    assert ("code", "['start-s1']") in kinds
    assert any(kind == "erratum" for kind, _ in kinds)


def test_report_writes_every_endpoint_and_no_absolute_path(cache, tmp_path):
    results, images = tmp_path / "study_upgrade.json", tmp_path / "img"
    images.mkdir()
    payload = report.report(cache, {}, results, images)
    assert payload["status"] == "partial"  # no evaluations, scans, 600 K or 300 K cells in this cache
    endpoints = payload["endpoints"]
    assert endpoints["primary"]["status"] == "complete"
    # secondary 4 leaves out base s14 (its control arm reached the cap)
    assert [p["control"] for p in endpoints["without_capped_finetunes"]["pairs"]] == [
        f"control-s{s}" for s in study.BASE_SEEDS if s != 14
    ]
    assert endpoints["errors"]["status"] == endpoints["bond_scans"]["status"] == "not run"
    assert endpoints["control_vs_base"]["failed_fraction"]["treatment_mean"] == pytest.approx(
        sum(FAILED["control"]) / 120
    )
    text = results.read_text()
    assert str(cache) not in text and json.loads(text)["report_code"]["commit"]
    assert (images / "study_upgrade_survival.png").stat().st_size > 0
    tables = (cache / "tables.md").read_text()
    assert "| s10 | 2/20 | 9/20 | -0.35 | 10/20 |" in tables


def test_secondary_7_is_counts_without_a_test(cache):
    commit = report.protocol_commit()
    for seed, (upgrade, control) in zip((10, 11), ((3, 5), (0, 0)), strict=True):
        _cell(cache, commit, "upgrade", seed, upgrade, cell="600K")
        _cell(cache, commit, "control", seed, control, cell="600K")
    endpoint = report.counts_endpoint(cache, "600K", 600.0, (10, 11))
    assert endpoint["status"] == "complete" and "none" in endpoint["tests"]
    # two pairs: a sign-flip p could not fall below 0.5, so the protocol reports counts only
    assert not {"sign_flip", "wilcoxon", "cochran_mantel_haenszel"} & set(endpoint)
    assert "sign_flip" not in endpoint["rmst"]
    assert [p["difference"] for p in endpoint["pairs"]] == pytest.approx([-0.1, 0.0])
    assert endpoint["failed_fraction"]["mean_difference"] == pytest.approx(-0.05)
    # replica k fails at 0.5 + 0.25 k ps: RMST of s10's upgrade = (0.5 + 0.75 + 1.0 + 17 x 10) / 20
    assert endpoint["pairs"][0]["treatment_rmst_ps"] == pytest.approx((0.5 + 0.75 + 1.0 + 170) / 20)
    line = tables.counts_line("Secondary 7, 600K", endpoint)
    assert "s10 upgrade 3/20 vs control 5/20 failed (difference -0.10" in line and "p =" not in line
    assert tables.counts_line("x", report.counts_endpoint(cache, "300K", 300.0, (10,))).endswith(
        "not run (300K/upgrade-s10, 300K/control-s10)."
    )
