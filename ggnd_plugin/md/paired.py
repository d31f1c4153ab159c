"""Paired, model-level comparison of stability runs: is a treatment better than its control, per model?

The replica-level tests of :mod:`ggnd_plugin.md.survival` (Fisher, log-rank) treat every replica as
independent. When each arm holds several fitted models, the replicas of one model share everything
that model got right or wrong, and the honest unit of replication is the fitted model. Here each
*pair* is one base model seen through two arms (e.g. upgraded with GGND and fine-tuned, against the
same base fine-tuned without GGND), run from the same start frames and velocity seeds. Per pair the
difference in the failed fraction at one temperature (treatment minus control) is the datum; over
pairs:

* **exact sign-flip test** (paired permutation test): under the null hypothesis the sign of every
  pair's difference is a fair coin, so the two-sided p-value is the fraction of the ``2^n`` sign
  assignments whose mean difference is at least as far from zero as the observed one (exact; with
  ``n`` pairs the smallest attainable p is ``2 / 2^n``, which needs every difference of one sign);
* **Wilcoxon signed-rank test** on the same differences (scipy; zero differences dropped, the
  Wilcoxon convention; exact when no ranks tie);
* **Cochran-Mantel-Haenszel test** on the replica table stratified by pair (arm x failed, one 2x2
  table per pair), with the Mantel-Haenszel common odds ratio: replica-level, but each base model
  compared only with itself;
* the restricted mean survival time per model and its difference per pair.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ggnd_plugin.errors import GGNDError

__all__ = ["cochran_mantel_haenszel", "paired_comparison", "sign_flip_test", "wilcoxon_signed_rank"]

# 2^20 sign assignments are enumerated in about a second; beyond, the exact test is not attempted.
MAX_EXACT_PAIRS = 20


def sign_flip_test(differences: Sequence[float]) -> dict[str, Any]:
    """Two-sided exact sign-flip test of ``mean(differences) == 0``.

    p = #{s in {-1, 1}^n : |sum s_i d_i| >= |sum d_i|} / 2^n (a relative tolerance of 1e-12 counts
    ties of floating-point sums as ties).
    """
    d = np.asarray(differences, dtype=float)
    n = len(d)
    if n == 0:
        raise GGNDError("sign-flip test: no pairs")
    if n > MAX_EXACT_PAIRS:
        raise GGNDError(f"sign-flip test: {n} pairs; the exact test enumerates at most {MAX_EXACT_PAIRS}")
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
    sums = np.abs(signs @ d)
    observed = abs(float(d.sum()))
    extreme = int(np.count_nonzero(sums >= observed - 1e-12 * max(1.0, observed)))
    return {
        "pairs": n,
        "mean_difference": float(d.mean()),
        "p_value": extreme / 2**n,
        "smallest_attainable_p": 2 / 2**n if n else 1.0,
        "positive": int((d > 0).sum()),
        "negative": int((d < 0).sum()),
        "zero": int((d == 0).sum()),
    }


def wilcoxon_signed_rank(differences: Sequence[float]) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon), zero differences dropped first."""
    from scipy import stats

    d = np.asarray(differences, dtype=float)
    nonzero = d[d != 0]
    if len(nonzero) == 0:
        return {"pairs_used": 0, "statistic": None, "p_value": 1.0, "method": "all differences zero"}
    ties = len(np.unique(np.abs(nonzero))) < len(nonzero)
    method = "approx" if ties else "exact"
    result = stats.wilcoxon(nonzero, alternative="two-sided", method=method)
    return {
        "pairs_used": int(len(nonzero)),
        "statistic": float(result.statistic),
        "p_value": float(result.pvalue),
        "method": "exact" if method == "exact" else "normal approximation (tied ranks)",
    }


def cochran_mantel_haenszel(tables: Sequence[Sequence[Sequence[int]]]) -> dict[str, Any]:
    """CMH test of conditional independence over 2x2 tables ``[[a, b], [c, d]]`` (rows: treatment,
    control; columns: failed, survived), with the Mantel-Haenszel common odds ratio.

    chi2 = (|sum a - sum E[a]| - 1/2)^2 / sum Var[a] (continuity corrected; also given without),
    E[a] = (a + b)(a + c) / n, Var[a] = (a + b)(c + d)(a + c)(b + d) / (n^2 (n - 1)); p from chi2 with
    one degree of freedom. OR_MH = sum(a d / n) / sum(b c / n). Strata with n < 2 add nothing.
    """
    from scipy import stats

    observed = expected = variance = 0.0
    odds_numerator = odds_denominator = 0.0
    for table in tables:
        (a, b), (c, d) = (tuple(map(float, row)) for row in table)
        n = a + b + c + d
        if n < 2:
            continue
        observed += a
        expected += (a + b) * (a + c) / n
        variance += (a + b) * (c + d) * (a + c) * (b + d) / (n * n * (n - 1))
        odds_numerator += a * d / n
        odds_denominator += b * c / n
    if variance == 0:
        return {
            "chi2": None,
            "p_value": 1.0,
            "chi2_uncorrected": None,
            "p_uncorrected": 1.0,
            "odds_ratio": None,
        }
    deviation = abs(observed - expected)
    corrected = max(0.0, deviation - 0.5) ** 2 / variance
    uncorrected = deviation**2 / variance
    if odds_denominator > 0:
        odds_ratio = odds_numerator / odds_denominator
    else:
        odds_ratio = math.inf if odds_numerator > 0 else None
    return {
        "chi2": corrected,
        "p_value": float(stats.chi2.sf(corrected, 1)),
        "chi2_uncorrected": uncorrected,
        "p_uncorrected": float(stats.chi2.sf(uncorrected, 1)),
        "odds_ratio": odds_ratio,
    }


def _model_rows(rows: Sequence[Mapping[str, Any]], model: str, temperature: float) -> list[Mapping]:
    chosen = [r for r in rows if r["model"] == model and float(r["temperature_K"]) == float(temperature)]
    if not chosen:
        models = sorted({r["model"] for r in rows})
        raise GGNDError(
            f"no replicas of model '{model}' at {temperature:g} K (models: {', '.join(models)}; "
            f"temperatures: {', '.join(f'{t:g}' for t in sorted({float(r['temperature_K']) for r in rows}))} K)"
        )
    return sorted(chosen, key=lambda r: r["replica"])


def paired_comparison(
    rows: Sequence[Mapping[str, Any]],
    pairs: Sequence[tuple[str, str]],
    temperature: float,
    horizon: float,
) -> dict[str, Any]:
    """Compare treatment and control models pair by pair at one temperature.

    ``rows``: replica rows as in a stability run's results.json (``model``, ``temperature_K``,
    ``replica``, ``start_frame``, ``seed``, ``stability_ps``, ``failed``). ``pairs``: (treatment,
    control) model names, one pair per base model. The two models of a pair must have run the same
    replicas (same start frames and velocity seeds), which is checked: otherwise the pair is not paired.
    """
    from ggnd_plugin.md.survival import restricted_mean

    if not pairs:
        raise GGNDError("no pairs to compare")
    names = [name for pair in pairs for name in pair]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise GGNDError(f"a model may appear in one pair only: {', '.join(repeated)}")
    per_pair, tables = [], []
    for treatment, control in pairs:
        t_rows = _model_rows(rows, treatment, temperature)
        c_rows = _model_rows(rows, control, temperature)
        t_plan = [(r["replica"], r.get("start_frame"), r.get("seed")) for r in t_rows]
        c_plan = [(r["replica"], r.get("start_frame"), r.get("seed")) for r in c_rows]
        if t_plan != c_plan:
            raise GGNDError(
                f"'{treatment}' and '{control}' did not run the same replicas (start frames and seeds) at "
                f"{temperature:g} K: run them with one protocol so they are paired"
            )
        entry = {"treatment": treatment, "control": control, "replicas": len(t_rows)}
        for arm, arm_rows in (("treatment", t_rows), ("control", c_rows)):
            times = [float(r["stability_ps"]) for r in arm_rows]
            failed = [bool(r["failed"]) for r in arm_rows]
            entry[f"{arm}_failed"] = int(sum(failed))
            entry[f"{arm}_failed_fraction"] = sum(failed) / len(failed)
            entry[f"{arm}_rmst_ps"] = restricted_mean(times, failed, horizon)["rmst_ps"]
        entry["difference"] = entry["treatment_failed_fraction"] - entry["control_failed_fraction"]
        entry["rmst_difference_ps"] = entry["treatment_rmst_ps"] - entry["control_rmst_ps"]
        per_pair.append(entry)
        n = len(t_rows)
        tables.append(
            [
                [entry["treatment_failed"], n - entry["treatment_failed"]],
                [entry["control_failed"], n - entry["control_failed"]],
            ]
        )
    differences = [entry["difference"] for entry in per_pair]
    rmst_differences = [entry["rmst_difference_ps"] for entry in per_pair]
    return {
        "temperature_K": float(temperature),
        "horizon_ps": float(horizon),
        "pairs": per_pair,
        "failed_fraction": {
            "treatment_mean": float(np.mean([e["treatment_failed_fraction"] for e in per_pair])),
            "control_mean": float(np.mean([e["control_failed_fraction"] for e in per_pair])),
            "mean_difference": float(np.mean(differences)),
        },
        "sign_flip": sign_flip_test(differences),
        "wilcoxon": wilcoxon_signed_rank(differences),
        "cochran_mantel_haenszel": cochran_mantel_haenszel(tables),
        "rmst": {
            "treatment_mean_ps": float(np.mean([e["treatment_rmst_ps"] for e in per_pair])),
            "control_mean_ps": float(np.mean([e["control_rmst_ps"] for e in per_pair])),
            "mean_difference_ps": float(np.mean(rmst_differences)),
            "sign_flip": sign_flip_test(rmst_differences),
        },
    }
