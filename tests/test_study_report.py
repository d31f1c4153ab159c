"""The pre-registered study's report (benchmarks/study_3bpa_report.py) and its published results.

The endpoint arithmetic is checked against scipy on synthetic cells; an arm with a cell missing must
never be analysed; and the primary endpoint in benchmarks/results/study_3bpa.json must follow from the
per-replica rows stored beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from scipy.stats import fisher_exact

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import study_3bpa_report as report  # noqa: E402
from study_protocol import CELLS, PRIMARY, TIME_PS, study_models  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "study_3bpa.json"


def _cell(failures: int, replicas: int = 20, fail_at: float = 1.0) -> dict:
    rows = [
        {"stability_ps": fail_at + 0.1 * k if k < failures else TIME_PS, "failed": k < failures}
        for k in range(replicas)
    ]
    return {"rows": rows}


def _arms(cells, host, cell=PRIMARY, seeds=(0, 1)):
    models = study_models()
    return (
        report._arm(models, {}, cells, host, False, cell, seeds),
        report._arm(models, {}, cells, host, True, cell, seeds),
    )


def test_an_arm_with_a_missing_cell_is_reported_not_run_and_never_analysed():
    cells = {
        ("mace-s0", PRIMARY): _cell(18),
        ("mace-s1", PRIMARY): _cell(16),
        ("mace+ggnd-s0", PRIMARY): _cell(2),  # mace+ggnd-s1 not run yet
    }
    comparison = report._comparison(*_arms(cells, "mace"))
    assert comparison == {"status": "not run", "missing_cells": [f"mace+ggnd-s1 {PRIMARY}"]}
    assert report._outcome(comparison) == "not run"
    # The seed that is complete on both sides is analysed on its own.
    alone = report._comparison(*_arms(cells, "mace", seeds=(0,)))
    assert alone["fisher"]["p_value"] == pytest.approx(fisher_exact([[2, 18], [18, 2]])[1])


@pytest.mark.parametrize(
    ("plain", "ggnd", "outcome"),
    [
        ((18, 16), (9, 14), "GGND lowers the failure rate"),
        ((2, 3), (12, 15), "GGND raises the failure rate"),
        ((10, 10), (9, 11), "no significant difference"),
    ],
)
def test_pooled_seeds_fisher_rmst_and_outcome_agree_with_scipy_and_the_areas(plain, ggnd, outcome):
    cells = {}
    for seed in (0, 1):
        cells[(f"nequip-s{seed}", PRIMARY)] = _cell(plain[seed], fail_at=0.5)
        cells[(f"nequip+ggnd-s{seed}", PRIMARY)] = _cell(ggnd[seed], fail_at=2.0)
    comparison = report._comparison(*_arms(cells, "nequip"))
    a, b = sum(ggnd), sum(plain)
    expected = fisher_exact([[a, 40 - a], [b, 40 - b]])[1]
    assert comparison["fisher"]["p_value"] == pytest.approx(expected, rel=1e-12)
    assert comparison["plain"]["failed"] == b and comparison["ggnd"]["failed"] == a
    assert report._outcome(comparison) == outcome
    # RMST without censoring before the horizon is the mean of min(t, horizon): the area under the curve.
    for arm, counts, fail_at in (("plain", plain, 0.5), ("ggnd", ggnd, 2.0)):
        times = [fail_at + 0.1 * k if k < n else TIME_PS for n in counts for k in range(20)]
        assert comparison[arm]["rmst"]["rmst_ps"] == pytest.approx(sum(times) / len(times), rel=1e-9)
    difference = comparison["rmst_difference"]["ggnd_minus_plain_ps"]
    assert difference == pytest.approx(
        comparison["ggnd"]["rmst"]["rmst_ps"] - comparison["plain"]["rmst"]["rmst_ps"]
    )


def test_the_published_primary_endpoint_follows_from_its_own_replica_rows():
    payload = json.loads(RESULTS.read_text())
    assert payload["status"] == "complete" and not payload["cells_not_run"]
    assert len(payload["cells"]) == len(study_models()) * len(CELLS)
    for record in payload["cells"].values():
        assert len(record["rows"]) == 20
    for host, primary in payload["endpoints"]["primary"].items():
        failed = {}
        for ggnd in (False, True):
            rows = [
                row
                for seed in (0, 1)
                for row in payload["cells"][f"{host}{'+ggnd' if ggnd else ''}-s{seed} {PRIMARY}"]["rows"]
            ]
            assert len(rows) == 40
            failed[ggnd] = sum(bool(row["failed"]) for row in rows)
        assert (primary["plain"]["failed"], primary["ggnd"]["failed"]) == (failed[False], failed[True])
        p = fisher_exact([[failed[True], 40 - failed[True]], [failed[False], 40 - failed[False]]])[1]
        assert primary["fisher"]["p_value"] == pytest.approx(p, rel=1e-12)
        assert primary["outcome"] == report._outcome(primary)
