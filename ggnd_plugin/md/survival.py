"""Survival statistics of a stability run (docs/stability.md, "Statistics").

A replica's stability time is right-censored survival data: a replica that fails has its failure time,
one that reaches the horizon only tells us it survived that long. Per model and temperature this module
gives the Kaplan-Meier curve with pointwise 95 % bands, the failed fraction with a Wilson interval and
the restricted mean survival time (RMST) to the horizon; between a model and a baseline, Fisher's exact
test on failures and the log-rank test, each with the replicas per model it would need to detect the
observed difference.

The estimators and tests are scipy's (``ecdf`` on ``CensoredData``, ``logrank``, ``fisher_exact``,
``binomtest(...).proportion_ci``). What scipy does not provide is here, each a textbook formula:
the RMST and its variance (Klein & Moeschberger 2003, section 4.5), the log-rank hazard ratio (Peto's
one-step estimate from the log-rank tallies), and the sample sizes (Fleiss-Tytun-Ury for Fisher's
test, Schoenfeld 1983 for the log-rank test).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ggnd_plugin.errors import GGNDError

CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.80


def _stats():
    # scipy is imported on use: `ggnd --help` and the plain report path stay light.
    from scipy import stats

    return stats


def _censored(times: Sequence[float], failed: Sequence[bool]):
    times = np.asarray(times, dtype=float)
    failed = np.asarray(failed, dtype=bool)
    return _stats().CensoredData(uncensored=times[failed], right=times[~failed])


def _check_group(times: Sequence[float], failed: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    times = np.asarray(times, dtype=float)
    failed = np.asarray(failed, dtype=bool)
    if times.ndim != 1 or times.shape != failed.shape:
        raise GGNDError(f"survival data: {times.shape} times but {failed.shape} failure flags")
    if len(times) == 0:
        raise GGNDError("survival data: no replicas")
    if not np.isfinite(times).all() or (times < 0).any():
        raise GGNDError("survival data: stability times must be finite and non-negative")
    return times, failed


# ---------------------------------------------------------------------------------------------------
# One group: Kaplan-Meier, failed fraction, RMST
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KaplanMeier:
    """A right-continuous step curve: ``survival[k]`` holds on [time[k], time[k+1]).

    ``time`` starts at 0 (survival 1 before any failure) and ends at the horizon when one is given.
    ``low``/``high`` are pointwise bands (scipy's log-log Greenwood interval). Where that interval is
    undefined (survival exactly 1, before any failure, or exactly 0) the band is the point itself: the
    estimate has no spread there, and the Wilson interval of the failed fraction is the uncertainty to
    quote.
    """

    time: np.ndarray
    survival: np.ndarray
    low: np.ndarray
    high: np.ndarray
    confidence: float

    def at(self, t: float) -> float:
        return float(self.survival[np.searchsorted(self.time, t, side="right") - 1])

    def steps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Vertices of the drawn staircase (each step twice), so linear interpolation is the curve."""
        time = np.repeat(self.time, 2)[1:]
        index = np.repeat(np.arange(len(self.time)), 2)[:-1]
        return time, self.survival[index], self.low[index], self.high[index]

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_ps": self.time.tolist(),
            "survival": self.survival.tolist(),
            "low": self.low.tolist(),
            "high": self.high.tolist(),
        }


def kaplan_meier(
    times: Sequence[float],
    failed: Sequence[bool],
    horizon: float | None = None,
    confidence: float = CONFIDENCE,
) -> KaplanMeier:
    """Kaplan-Meier survival (scipy.stats.ecdf) with pointwise log-log confidence bands."""
    times, failed = _check_group(times, failed)
    result = _stats().ecdf(_censored(times, failed))
    with warnings.catch_warnings():
        # scipy warns where log-log is undefined (S = 0 or 1); KaplanMeier documents the fallback.
        warnings.simplefilter("ignore", RuntimeWarning)
        band = result.sf.confidence_interval(confidence, method="log-log")
    time = result.sf.quantiles
    survival = result.sf.probabilities
    low = np.where(np.isfinite(band.low.probabilities), band.low.probabilities, survival)
    high = np.where(np.isfinite(band.high.probabilities), band.high.probabilities, survival)
    # A failure at t = 0 (a replica that starts beyond the threshold) is already a first quantile at 0.
    if time[0] > 0:
        time, survival = np.r_[0.0, time], np.r_[1.0, survival]
        low, high = np.r_[1.0, low], np.r_[1.0, high]
    if horizon is not None and time[-1] < horizon:
        time = np.r_[time, horizon]
        survival, low, high = np.r_[survival, survival[-1]], np.r_[low, low[-1]], np.r_[high, high[-1]]
    return KaplanMeier(time, survival, low, high, confidence)


def failure_proportion(failures: int, replicas: int, confidence: float = CONFIDENCE) -> dict[str, float]:
    """Failed fraction with its Wilson score interval (scipy.stats.binomtest, method 'wilson')."""
    if replicas < 1 or not 0 <= failures <= replicas:
        raise GGNDError(f"failure proportion: {failures} failures of {replicas} replicas")
    interval = _stats().binomtest(failures, replicas).proportion_ci(confidence, method="wilson")
    return {"proportion": failures / replicas, "low": float(interval.low), "high": float(interval.high)}


def risk_table(times: Sequence[float], failed: Sequence[bool]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct failure times, replicas at risk just before each, and failures at each.

    A replica censored at a failure time is still at risk there (failures come first at ties), the
    convention of scipy's ecdf and logrank.
    """
    times, failed = _check_group(times, failed)
    event_times, events = np.unique(times[failed], return_counts=True)
    at_risk = (times[None, :] >= event_times[:, None]).sum(axis=1)
    return event_times, at_risk, events


def restricted_mean(
    times: Sequence[float], failed: Sequence[bool], horizon: float, confidence: float = CONFIDENCE
) -> dict[str, float]:
    """RMST: the area under the Kaplan-Meier curve from 0 to the horizon, with its standard error.

    Var = sum over failure times t_i <= horizon of A_i^2 d_i / (n_i (n_i - d_i)), A_i the area under the
    curve from t_i to the horizon (the Greenwood-type variance of Klein & Moeschberger 2003, section
    4.5). A term with n_i = d_i has A_i = 0 (the curve is 0 after it) and adds nothing. Interval:
    RMST ± z se, clipped to [0, horizon].
    """
    times, failed = _check_group(times, failed)
    if not horizon > 0:
        raise GGNDError(f"restricted mean: the horizon must be positive, got {horizon}")
    curve = kaplan_meier(times, failed, horizon, confidence)
    inside = curve.time <= horizon
    knots = np.r_[curve.time[inside], horizon]
    area_after = np.cumsum((np.diff(knots) * curve.survival[inside])[::-1])[::-1]  # ∫_{knot}^{horizon} S
    rmst = float(area_after[0])
    event_times, at_risk, events = risk_table(times, failed)
    keep = event_times <= horizon
    event_times, at_risk, events = event_times[keep], at_risk[keep], events[keep]
    remaining = area_after[np.searchsorted(knots[:-1], event_times)]
    open_risk = at_risk > events
    variance = float(
        np.sum(
            remaining[open_risk] ** 2
            * events[open_risk]
            / (at_risk[open_risk] * (at_risk - events)[open_risk])
        )
    )
    se = math.sqrt(variance)
    z = _stats().norm.ppf(0.5 + confidence / 2)
    return {
        "rmst_ps": rmst,
        "se_ps": se,
        "low": float(max(0.0, rmst - z * se)),
        "high": float(min(horizon, rmst + z * se)),
        "horizon_ps": float(horizon),
    }


def group_statistics(
    times: Sequence[float], failed: Sequence[bool], horizon: float, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """Everything the report gives for one model at one temperature."""
    times, failed = _check_group(times, failed)
    return {
        "replicas": len(times),
        "failed": int(failed.sum()),
        "failure_proportion": failure_proportion(int(failed.sum()), len(times), confidence),
        "rmst": restricted_mean(times, failed, horizon, confidence),
        "kaplan_meier": kaplan_meier(times, failed, horizon, confidence).to_dict(),
    }


# ---------------------------------------------------------------------------------------------------
# Two groups: tests and replicas needed
# ---------------------------------------------------------------------------------------------------


def logrank(
    times: Sequence[float],
    failed: Sequence[bool],
    baseline_times: Sequence[float],
    baseline_failed: Sequence[bool],
) -> dict[str, Any]:
    """Two-sided log-rank test (scipy.stats.logrank) and Peto's hazard ratio, model against baseline.

    Hazard ratio = exp((O - E) / V) with O the model's failures, E their expectation under equal hazards
    and V the hypergeometric variance, all summed over the pooled failure times: the log-rank test's own
    tallies (its statistic is (O - E) / sqrt(V)). Unlike O/E ratios it stays finite when one group has no
    failures; it is nearest the truth for hazard ratios near 1 and shrinks large effects towards 1.
    With no failures in either group there is nothing to test: p and the hazard ratio are None.
    """
    times, failed = _check_group(times, failed)
    baseline_times, baseline_failed = _check_group(baseline_times, baseline_failed)
    all_times = np.r_[times, baseline_times]
    all_failed = np.r_[failed, baseline_failed]
    event_times, at_risk, events = risk_table(all_times, all_failed)
    at_risk_model = (times[None, :] >= event_times[:, None]).sum(axis=1)
    observed = float(np.sum(failed))
    expected = float(np.sum(events * at_risk_model / at_risk))
    several = at_risk > 1  # one replica at risk: the hypergeometric term is 0 (and 0/0 below)
    variance = float(
        np.sum(
            events[several]
            * (at_risk_model / at_risk)[several]
            * (1 - at_risk_model / at_risk)[several]
            * (at_risk - events)[several]
            / (at_risk[several] - 1)
        )
    )
    record: dict[str, Any] = {
        "observed": observed,
        "expected": expected,
        "variance": variance,
        "statistic": None,
        "p_value": None,
        "hazard_ratio": None,
    }
    if variance > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            test = _stats().logrank(
                _censored(times, failed), _censored(baseline_times, baseline_failed), alternative="two-sided"
            )
        record["statistic"] = float(test.statistic)
        record["p_value"] = float(test.pvalue)
        record["hazard_ratio"] = math.exp((observed - expected) / variance)
    return record


def fisher(failures: int, replicas: int, baseline_failures: int, baseline_replicas: int) -> dict[str, Any]:
    """Two-sided Fisher exact test (scipy.stats.fisher_exact) on failed/survived, model against baseline."""
    table = [[failures, replicas - failures], [baseline_failures, baseline_replicas - baseline_failures]]
    if min(min(row) for row in table) < 0:
        raise GGNDError(f"Fisher test: impossible counts {table}")
    test = _stats().fisher_exact(table, alternative="two-sided")
    odds = float(test.statistic)
    return {"p_value": float(test.pvalue), "odds_ratio": odds if math.isfinite(odds) else None}


def replicas_needed_fisher(
    proportion: float, baseline_proportion: float, alpha: float = ALPHA, power: float = POWER
) -> int | None:
    """Replicas per model for Fisher's test (two-sided) to detect these failure proportions.

    The normal approximation with pooled variance under the null, n = (z_a sqrt(2 p q) + z_b sqrt(p1 q1
    + p2 q2))^2 / (p1 - p2)^2, and the Fleiss-Tytun-Ury (1980) continuity correction that brings it to
    Fisher's exact test: n' = n/4 (1 + sqrt(1 + 4 / (n |p1 - p2|)))^2. None when the proportions are
    equal (no difference to detect).
    """
    p1, p2 = float(proportion), float(baseline_proportion)
    if p1 == p2:
        return None
    z_a = _stats().norm.ppf(1 - alpha / 2)
    z_b = _stats().norm.ppf(power)
    mean = (p1 + p2) / 2
    delta = abs(p1 - p2)
    n = (z_a * math.sqrt(2 * mean * (1 - mean)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2
    n /= delta**2
    corrected = n / 4 * (1 + math.sqrt(1 + 4 / (n * delta))) ** 2
    return math.ceil(corrected - 1e-9)  # 1e-9: a product that lands a hair above an integer is that integer


def events_needed_logrank(hazard_ratio: float, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """Schoenfeld (1983): failures in both groups together, for equal groups: 4 (z_a + z_b)^2 / ln(HR)^2."""
    if hazard_ratio is None or not math.isfinite(hazard_ratio) or hazard_ratio <= 0 or hazard_ratio == 1:
        return None
    z = _stats().norm.ppf(1 - alpha / 2) + _stats().norm.ppf(power)
    return 4 * z**2 / math.log(hazard_ratio) ** 2


def replicas_needed_logrank(
    hazard_ratio: float | None, failed_fraction: float, alpha: float = ALPHA, power: float = POWER
) -> int | None:
    """Replicas per model for the log-rank test: Schoenfeld's failures over 2 x the pooled failed fraction.

    ``failed_fraction`` is the fraction of all replicas (both models) that failed within the horizon:
    the study is assumed to keep the horizon, so that fraction of the replicas yields failures. None
    when the hazard ratio is 1 or unknown, or nothing failed.
    """
    events = events_needed_logrank(hazard_ratio, alpha, power)
    if events is None or not failed_fraction > 0:
        return None
    return math.ceil(events / (2 * failed_fraction) - 1e-9)


def compare(
    times: Sequence[float],
    failed: Sequence[bool],
    baseline_times: Sequence[float],
    baseline_failed: Sequence[bool],
    horizon: float,
    confidence: float = CONFIDENCE,
    alpha: float = ALPHA,
    power: float = POWER,
) -> dict[str, Any]:
    """Model against baseline at one temperature: Fisher, log-rank, RMST difference, replicas needed."""
    times, failed = _check_group(times, failed)
    baseline_times, baseline_failed = _check_group(baseline_times, baseline_failed)
    n, n0 = len(times), len(baseline_times)
    k, k0 = int(failed.sum()), int(baseline_failed.sum())
    rank = logrank(times, failed, baseline_times, baseline_failed)
    rmst = restricted_mean(times, failed, horizon, confidence)
    rmst0 = restricted_mean(baseline_times, baseline_failed, horizon, confidence)
    difference = rmst["rmst_ps"] - rmst0["rmst_ps"]
    se = math.hypot(rmst["se_ps"], rmst0["se_ps"])  # independent groups
    z = _stats().norm.ppf(0.5 + confidence / 2)
    return {
        "replicas": n,
        "failed": k,
        "baseline_replicas": n0,
        "baseline_failed": k0,
        "fisher": {
            **fisher(k, n, k0, n0),
            "replicas_needed": replicas_needed_fisher(k / n, k0 / n0, alpha, power),
        },
        "logrank": {
            **rank,
            "replicas_needed": replicas_needed_logrank(
                rank["hazard_ratio"], (k + k0) / (n + n0), alpha, power
            ),
        },
        "rmst_difference": {
            "difference_ps": difference,
            "se_ps": se,
            "low": float(difference - z * se),
            "high": float(difference + z * se),
        },
    }


# ---------------------------------------------------------------------------------------------------
# A whole run
# ---------------------------------------------------------------------------------------------------

METHODS = {
    "kaplan_meier": "scipy.stats.ecdf on right-censored data (replicas that reach the horizon are censored "
    "there); pointwise log-log Greenwood bands; where undefined (survival 1 or 0) the band is the point",
    "failure_proportion": "failed within the horizon / replicas; Wilson score interval "
    "(scipy.stats.binomtest(...).proportion_ci(method='wilson'))",
    "rmst": "area under the Kaplan-Meier curve from 0 to the horizon; variance sum A_i^2 d_i / (n_i (n_i - "
    "d_i)) over failure times (Klein & Moeschberger 4.5); interval RMST ± z se clipped to [0, horizon]",
    "fisher": "scipy.stats.fisher_exact, two-sided, on (failed, survived) of model and baseline",
    "logrank": "scipy.stats.logrank, two-sided; hazard ratio exp((O - E) / V), Peto's estimate from the "
    "log-rank tallies (model against baseline)",
    "rmst_difference": "RMST(model) - RMST(baseline), se = sqrt(se^2 + se_baseline^2)",
    "replicas_needed": "replicas per model (equal groups) for the given power at two-sided alpha if the "
    "observed difference were the true one. Fisher: normal approximation for two proportions with the "
    "Fleiss-Tytun-Ury continuity correction. Log-rank: Schoenfeld's failures 4 (z_a + z_b)^2 / ln(HR)^2 "
    "divided by 2 x the pooled failed fraction. None: no difference observed (or nothing failed)",
}


def _groups(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, float], tuple[np.ndarray, np.ndarray]]:
    grouped: dict[tuple[str, float], tuple[list, list]] = {}
    for row in rows:
        times, failed = grouped.setdefault((row["model"], float(row["temperature_K"])), ([], []))
        times.append(row["stability_ps"])
        failed.append(bool(row["failed"]))
    return {key: (np.asarray(t, dtype=float), np.asarray(f, dtype=bool)) for key, (t, f) in grouped.items()}


def resolve_baseline(rows: Sequence[Mapping[str, Any]], baseline: str | None) -> str | None:
    """The named baseline, checked; None picks the first model of the run (None if it has one model)."""
    models = list(dict.fromkeys(row["model"] for row in rows))
    if baseline is None:
        return models[0] if len(models) > 1 else None
    if baseline not in models:
        raise GGNDError(f"unknown baseline '{baseline}' (models in this run: {', '.join(models)})")
    return baseline


def run_statistics(
    rows: Sequence[Mapping[str, Any]],
    horizon: float,
    baseline: str | None = None,
    confidence: float = CONFIDENCE,
    alpha: float = ALPHA,
    power: float = POWER,
) -> dict[str, Any]:
    """The ``statistics`` block of results.json: per (model, temperature) groups, comparisons, methods."""
    baseline = resolve_baseline(rows, baseline)
    groups = _groups(rows)
    record: dict[str, Any] = {
        "confidence_level": confidence,
        "alpha": alpha,
        "power": power,
        "horizon_ps": float(horizon),
        "baseline": baseline,
        "groups": [],
        "comparisons": [],
        "methods": METHODS,
    }
    for (model, temperature), (times, failed) in groups.items():
        record["groups"].append(
            {
                "model": model,
                "temperature_K": temperature,
                **group_statistics(times, failed, horizon, confidence),
            }
        )
    if baseline is not None:
        for (model, temperature), (times, failed) in groups.items():
            reference = groups.get((baseline, temperature))
            if model == baseline or reference is None:
                continue
            record["comparisons"].append(
                {
                    "model": model,
                    "baseline": baseline,
                    "temperature_K": temperature,
                    **compare(times, failed, *reference, horizon, confidence, alpha, power),
                }
            )
    return record
