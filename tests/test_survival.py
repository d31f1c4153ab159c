"""Survival statistics of stability runs (ggnd_plugin.md.survival) and their place in the reports.

References: hand computations written out below, the 6-MP leukaemia trial (Freireich et al. 1963), whose
Kaplan-Meier table and log-rank test are worked in Kleinbaum & Klein, "Survival Analysis" (ch. 2), and
exact power of Fisher's test by enumerating every 2x2 table.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ggnd_plugin.errors import GGNDError
from ggnd_plugin.md import survival
from ggnd_plugin.md.stability import StabilityProtocol, StabilityResult

Z = 1.959963984540054  # two-sided 95 %

# 6-MP arm (+: censored) and placebo arm, weeks of remission.
MP_TIMES = [6, 6, 6, 6, 7, 9, 10, 10, 11, 13, 16, 17, 19, 20, 22, 23, 25, 32, 32, 34, 35]
MP_FAILED = [1, 1, 1, 0, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]
PLACEBO = [1, 1, 2, 2, 3, 4, 4, 5, 5, 8, 8, 8, 8, 11, 11, 12, 12, 15, 17, 22, 23]


# -------------------------------------------------------------------------------------------------
# One group
# -------------------------------------------------------------------------------------------------


def test_kaplan_meier_6mp_matches_the_published_table_and_the_log_log_band_by_hand():
    curve = survival.kaplan_meier(MP_TIMES, MP_FAILED, horizon=35)
    # Kleinbaum & Klein, ch. 2: S(t) at the failure times.
    published = {6: 0.857, 7: 0.807, 10: 0.753, 13: 0.690, 16: 0.627, 22: 0.538, 23: 0.448}
    for t, s in published.items():
        assert curve.at(t) == pytest.approx(s, abs=5e-4)
    assert curve.at(5.9) == 1.0 and curve.at(35) == pytest.approx(0.448, abs=5e-4)
    # Risk table counted by hand: (time, at risk, failures).
    table = [(6, 21, 3), (7, 17, 1), (10, 15, 1), (13, 12, 1), (16, 11, 1), (22, 7, 1), (23, 6, 1)]
    times, at_risk, events = survival.risk_table(MP_TIMES, MP_FAILED)
    assert [(int(t), int(n), int(d)) for t, n, d in zip(times, at_risk, events, strict=True)] == table
    s, greenwood = 1.0, 0.0
    published_se = [0.0764, 0.0869, 0.0963, 0.1068, 0.1141, 0.1282, 0.1346]  # Greenwood, as R's survfit
    for (t, n, d), se in zip(table, published_se, strict=True):
        s *= 1 - d / n
        greenwood += d / (n * (n - d))
        assert s * math.sqrt(greenwood) == pytest.approx(se, abs=5e-5)
        # log-log interval: S^exp(±z se_theta), se_theta = sqrt(sum d/(n(n-d))) / |log S|
        spread = Z * math.sqrt(greenwood) / abs(math.log(s))
        index = list(curve.time).index(t)
        assert curve.low[index] == pytest.approx(s ** math.exp(spread), rel=1e-9)
        assert curve.high[index] == pytest.approx(s ** math.exp(-spread), rel=1e-9)


def test_kaplan_meier_small_example_by_hand_ties_failure_at_zero_and_the_drawn_staircase():
    # 1, 2, 2+, 3, 5+: S = 4/5, then 3/4 of that (the censored 2 is still at risk), then 1/2.
    curve = survival.kaplan_meier([1, 2, 2, 3, 5], [1, 1, 0, 1, 0], horizon=5)
    assert curve.time.tolist() == [0, 1, 2, 3, 5]
    assert curve.survival == pytest.approx([1, 0.8, 0.6, 0.3, 0.3])
    time, value, low, high = curve.steps()
    assert time.tolist() == [0, 1, 1, 2, 2, 3, 3, 5, 5]
    assert np.interp(1.5, time, value) == pytest.approx(0.8) and np.interp(4.0, time, value) == pytest.approx(
        0.3
    )
    assert (low <= value).all() and (value <= high).all()
    # A failure at the horizon and censorings there: the failure comes first (3 at risk, 1 fails).
    tied = survival.kaplan_meier([1, 5, 5, 5], [1, 1, 0, 0], horizon=5)
    assert tied.survival.tolist() == pytest.approx([1, 0.75, 0.5])
    # A replica that starts beyond the threshold fails at 0: the curve starts below 1.
    at_zero = survival.kaplan_meier([0, 2, 2], [1, 0, 0], horizon=2)
    assert at_zero.time.tolist() == [0, 2] and at_zero.survival == pytest.approx([2 / 3, 2 / 3])
    # Nothing failed: no spread to show, the band is the point.
    none = survival.kaplan_meier([2, 2, 2], [0, 0, 0], horizon=2)
    assert none.survival.tolist() == none.low.tolist() == none.high.tolist() == [1, 1]


def test_wilson_interval_equals_the_formula():
    for failures, replicas in ((6, 15), (0, 15), (15, 15), (1, 4), (3, 20)):
        p = failures / replicas
        centre = (p + Z**2 / (2 * replicas)) / (1 + Z**2 / replicas)
        half = Z / (1 + Z**2 / replicas) * math.sqrt(p * (1 - p) / replicas + Z**2 / (4 * replicas**2))
        interval = survival.failure_proportion(failures, replicas)
        assert interval["proportion"] == p
        assert interval["low"] == pytest.approx(max(0.0, centre - half), abs=1e-12)
        assert interval["high"] == pytest.approx(min(1.0, centre + half), abs=1e-12)
    assert survival.failure_proportion(6, 15)["low"] == pytest.approx(0.1982, abs=1e-4)
    with pytest.raises(GGNDError, match="7 failures of 5 replicas"):
        survival.failure_proportion(7, 5)


def test_rmst_by_hand_and_equal_to_the_sample_mean_without_censoring_before_the_horizon():
    # 1, 2, 2+, 3, 5+ to 5: area 1*1 + 0.8*1 + 0.6*1 + 0.3*2 = 3.0. Areas after each failure:
    # A(1) = 2.0, A(2) = 1.2, A(3) = 0.6 -> var = 4/(5*4) + 1.44/(4*3) + 0.36/(2*1) = 0.5.
    rmst = survival.restricted_mean([1, 2, 2, 3, 5], [1, 1, 0, 1, 0], horizon=5)
    assert rmst["rmst_ps"] == pytest.approx(3.0)
    assert rmst["se_ps"] == pytest.approx(math.sqrt(0.5))
    assert (rmst["low"], rmst["high"]) == pytest.approx((3 - Z * math.sqrt(0.5), 3 + Z * math.sqrt(0.5)))
    # 6-MP to 35 weeks: the area of the published curve, step by step.
    area = 6 + 0.857143 + 3 * 0.806723 + 3 * 0.752941 + 3 * 0.690196 + 6 * 0.627451 + 0.537815 + 12 * 0.448179
    assert survival.restricted_mean(MP_TIMES, MP_FAILED, 35)["rmst_ps"] == pytest.approx(area, abs=1e-5)
    # Censored only at the horizon (as every stability run): RMST is the mean of min(T, horizon) and its
    # variance the population variance over n, the known reduction of the formula for complete data.
    times = np.minimum(np.random.default_rng(0).exponential(2.0, 12), 3.0)
    rmst = survival.restricted_mean(times, times < 3.0, 3.0)
    assert rmst["rmst_ps"] == pytest.approx(times.mean(), rel=1e-12)
    assert rmst["se_ps"] == pytest.approx(times.std() / math.sqrt(len(times)), rel=1e-12)
    # Every replica failed: the last term has n = d and adds nothing (the curve is 0 after it).
    all_failed = survival.restricted_mean([1.0, 2.0], [1, 1], 4.0)
    assert all_failed["rmst_ps"] == pytest.approx(1.5)
    assert all_failed["se_ps"] == pytest.approx(math.sqrt((0.5**2) * 1 / (2 * 1)))
    assert all_failed["low"] >= 0


# -------------------------------------------------------------------------------------------------
# Two groups
# -------------------------------------------------------------------------------------------------


def test_logrank_6mp_against_placebo_matches_the_textbook():
    # Kleinbaum & Klein: O1 = 9, E1 = 19.25, Var = 6.2570, log-rank chi-square 16.79 (1 df).
    rank = survival.logrank(MP_TIMES, MP_FAILED, PLACEBO, [1] * 21)
    assert rank["observed"] == 9 and rank["expected"] == pytest.approx(19.25, abs=5e-3)
    assert rank["variance"] == pytest.approx(6.2570, abs=5e-4)
    assert rank["statistic"] ** 2 == pytest.approx(16.79, abs=5e-3)
    # scipy's statistic is the same tallies' z: (O - E) / sqrt(V)
    assert rank["statistic"] == pytest.approx((9 - rank["expected"]) / math.sqrt(rank["variance"]), rel=1e-12)
    assert rank["p_value"] == pytest.approx(math.erfc(math.sqrt(16.793) / math.sqrt(2)), rel=2e-3)
    assert rank["hazard_ratio"] == pytest.approx(math.exp((9 - 19.2505) / 6.25696), rel=1e-4)
    swapped = survival.logrank(PLACEBO, [1] * 21, MP_TIMES, MP_FAILED)
    assert swapped["p_value"] == pytest.approx(rank["p_value"], rel=1e-12)
    assert swapped["hazard_ratio"] == pytest.approx(1 / rank["hazard_ratio"], rel=1e-12)


def test_fisher_exact_on_known_tables():
    # 6 of 15 failed against 0 of 15: the only tables as extreme are 0 and 6 failures in the first row,
    # each of hypergeometric probability C(15,6)/C(30,6).
    fisher = survival.fisher(6, 15, 0, 15)
    assert fisher["p_value"] == pytest.approx(2 * math.comb(15, 6) / math.comb(30, 6), rel=1e-12)
    assert fisher["p_value"] == pytest.approx(0.016858, abs=1e-6)
    assert fisher["odds_ratio"] is None  # infinite
    # Lady tasting tea, 3 of 4 right: two-sided p = (1 + 16 + 16 + 1) / 70.
    assert survival.fisher(3, 4, 1, 4)["p_value"] == pytest.approx(34 / 70, rel=1e-12)
    assert survival.fisher(0, 5, 0, 5)["p_value"] == 1.0


def _fisher_power(n: int, p1: float, p2: float, alpha: float = 0.05) -> float:
    """Exact power of the two-sided Fisher test: every table, weighted by its binomial probability."""
    from scipy import stats

    power = 0.0
    for x1 in range(n + 1):
        for x2 in range(n + 1):
            if stats.fisher_exact([[x1, n - x1], [x2, n - x2]]).pvalue <= alpha:
                power += stats.binom.pmf(x1, n, p1) * stats.binom.pmf(x2, n, p2)
    return power


def test_replicas_needed_for_fisher_formula_and_exact_power():
    # 0.6 against 0.4: 96.9 per group by the normal approximation, 106.7 with the continuity correction.
    z_b = 0.8416212335729143
    n = (Z * math.sqrt(2 * 0.25) + z_b * math.sqrt(0.48)) ** 2 / 0.04
    assert n == pytest.approx(96.92, abs=0.01)
    assert (
        survival.replicas_needed_fisher(0.6, 0.4)
        == 107
        == math.ceil(n / 4 * (1 + math.sqrt(1 + 4 / (n * 0.2))) ** 2)
    )
    assert survival.replicas_needed_fisher(0.4, 0.6) == 107
    # Exact: the Fisher test really has 80 % power there, and not with 3 replicas fewer.
    needed = survival.replicas_needed_fisher(0.7, 0.2)
    assert needed == 19
    assert 0.8 <= _fisher_power(needed, 0.7, 0.2) < 0.9
    assert _fisher_power(needed - 3, 0.7, 0.2) < 0.8
    # One group without failures (the study's case): conservative, exact power ~0.95 at 20 per group.
    assert survival.replicas_needed_fisher(0.4, 0.0) == 20
    assert _fisher_power(20, 0.4, 0.0) > 0.8
    assert survival.replicas_needed_fisher(0.3, 0.3) is None


def test_replicas_needed_for_logrank_schoenfeld():
    # Hazard ratio 0.5, two-sided 0.05, 80 %: 4 (1.960 + 0.842)^2 / ln(2)^2 = 65.3 failures in all.
    assert survival.events_needed_logrank(0.5) == pytest.approx(65.35, abs=0.01)
    assert survival.events_needed_logrank(2.0) == pytest.approx(survival.events_needed_logrank(0.5))
    # 30 % of the replicas fail within the horizon: 65.35 / 0.3 = 218 replicas, 109 per model.
    assert survival.replicas_needed_logrank(0.5, 0.3) == 109
    assert survival.replicas_needed_logrank(1.0, 0.3) is None
    assert survival.replicas_needed_logrank(None, 0.3) is None


def test_compare_the_study_hypothesis_and_the_degenerate_cases():
    horizon = 2.0
    baseline = np.r_[[0.3, 0.5, 0.8, 1.0, 1.2, 1.9], np.full(9, horizon)]
    ggnd = np.full(15, horizon)
    entry = survival.compare(ggnd, ggnd < horizon, baseline, baseline < horizon, horizon)
    assert (entry["failed"], entry["baseline_failed"]) == (0, 6)
    assert entry["fisher"]["p_value"] == pytest.approx(0.016858, abs=1e-6)
    assert entry["fisher"]["replicas_needed"] == 20
    assert entry["logrank"]["hazard_ratio"] < 1 and entry["logrank"]["p_value"] < 0.05
    # RMST: 2 for GGND; the baseline loses (2 - t) for each failure at t.
    lost = sum(horizon - t for t in baseline[:6]) / 15
    assert entry["rmst_difference"]["difference_ps"] == pytest.approx(lost)
    assert entry["rmst_difference"]["se_ps"] == pytest.approx(baseline.std() / math.sqrt(15))
    # Nothing failed anywhere: Fisher p = 1, no log-rank test, nothing to detect.
    same = survival.compare(ggnd, ggnd < horizon, ggnd, ggnd < horizon, horizon)
    assert same["fisher"]["p_value"] == 1.0 and same["fisher"]["replicas_needed"] is None
    assert same["logrank"]["p_value"] is None and same["logrank"]["replicas_needed"] is None
    # Identical failures: p = 1, hazard ratio 1, nothing to detect.
    equal = survival.compare(baseline, baseline < horizon, baseline, baseline < horizon, horizon)
    assert equal["logrank"]["p_value"] == pytest.approx(1.0) and equal["logrank"]["hazard_ratio"] == 1.0
    assert equal["logrank"]["replicas_needed"] is None and equal["fisher"]["replicas_needed"] is None


# -------------------------------------------------------------------------------------------------
# In the reports
# -------------------------------------------------------------------------------------------------


def _result(failures: dict[tuple[str, float], list[float]], replicas: int = 15, horizon: float = 2.0):
    protocol = StabilityProtocol(temperatures=(600.0, 1200.0), replicas=replicas, time_ps=horizon).to_dict()
    protocol.update(
        monitor={"criterion": "bonds", "threshold": 0.5, "n_bonds": 28},
        start="test_300K",
        versions={},
        device="cpu",
        dtype="float64",
    )
    rows, series = [], {}
    for (model, temperature), times in failures.items():
        for replica in range(replicas):
            failed = replica < len(times)
            t = times[replica] if failed else horizon
            rows.append(
                {
                    "model": model,
                    "temperature_K": temperature,
                    "replica": replica,
                    "seed": replica,
                    "start_frame": replica,
                    "stability_ps": t,
                    "failed": failed,
                    "failure": "bonds" if failed else None,
                    "failure_step": round(t * 1000) if failed else None,
                    "max_deviation": 0.6 if failed else 0.3,
                }
            )
            series[f"{model}/{temperature:g}K/{replica}"] = {
                "time_ps": np.linspace(0, t, 4),
                "max_deviation": np.linspace(0, 0.6 if failed else 0.3, 4),
            }
    return StabilityResult(protocol, rows, series)


STUDY = {
    ("mace", 600.0): [],
    ("mace", 1200.0): [0.3, 0.5, 0.8, 1.0, 1.2, 1.9],
    ("mace-ggnd", 600.0): [1.5],
    ("mace-ggnd", 1200.0): [],
}


def test_results_json_summary_and_printed_tables_hold_the_statistics(tmp_path, capsys):
    from ggnd_plugin.md.report import print_summary, write_results

    result = _result(STUDY)
    paths = write_results(result, tmp_path, False)  # the old positional call still works
    stats = json.loads(paths["results.json"].read_text())["statistics"]
    assert stats["baseline"] == "mace" and stats["horizon_ps"] == 2.0  # None: the first model
    groups = {(g["model"], g["temperature_K"]): g for g in stats["groups"]}
    hot = groups[("mace", 1200.0)]
    assert hot["failed"] == 6 and hot["failure_proportion"]["low"] == pytest.approx(0.1982, abs=1e-4)
    assert hot["rmst"]["rmst_ps"] == pytest.approx(2 - sum(2 - t for t in STUDY[("mace", 1200.0)]) / 15)
    assert hot["kaplan_meier"]["survival"][-1] == pytest.approx(0.6)
    (cold, warm) = sorted(stats["comparisons"], key=lambda c: c["temperature_K"])
    assert warm["model"] == "mace-ggnd" and warm["fisher"]["p_value"] == pytest.approx(0.016858, abs=1e-6)
    assert warm["fisher"]["replicas_needed"] == 20 and cold["fisher"]["p_value"] == 1.0
    summary = paths["summary.md"].read_text()
    assert "| mace | 1200 | 6/15 | 0.40 (0.20 to 0.64) | 1.580 (1.271 to 1.889) |" in summary
    assert (
        "| mace-ggnd | 1200 | 0/15 | 6/15 | 0.017 | 20 | 0.11 | 0.007 | 16 | +0.420 (0.111 to 0.729) |"
        in summary
    )
    assert "Against baseline **mace**" in summary

    print_summary(result, baseline="mace-ggnd")
    printed = capsys.readouterr().out
    assert "Against baseline mace-ggnd" in printed
    line = next(
        line
        for line in printed.splitlines()
        if line.startswith("mace ") and " 1200 " in line and "6/15" in line and "0/15" in line
    )
    assert line.split()[4:10] == ["0.017", "20", "9.21", "0.007", "16", "-0.420±0.309"]
    assert max(len(line) for line in printed.splitlines()) <= 80


def test_baseline_choice_one_model_and_unknown_names(tmp_path):
    from ggnd_plugin.md.report import statistics, write_results

    result = _result(STUDY)
    assert statistics(result, "mace-ggnd")["comparisons"][0]["model"] == "mace"
    alone = _result({("mace", 600.0): [1.0]})
    assert statistics(alone)["baseline"] is None and statistics(alone)["comparisons"] == []
    assert (
        "## Comparison" not in write_results(alone, tmp_path / "alone", plots=False)["summary.md"].read_text()
    )
    with pytest.raises(GGNDError, match=r"^unknown baseline 'gnn' \(models in this run: mace, mace-ggnd\)$"):
        write_results(result, tmp_path / "bad", baseline="gnn")
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_survival_plot_draws_the_kaplan_meier_band(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from ggnd_plugin.md.report import write_results

    captured = []
    original = plt.Figure.savefig

    def keep(figure, *args, **kwargs):
        captured.append(figure)
        return original(figure, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    paths = write_results(_result(STUDY), tmp_path)
    assert paths["survival.png"].stat().st_size > 5000
    figure = next(f for f in captured if "Kaplan-Meier" in f._suptitle.get_text())
    _, axis1200 = figure.axes
    lines = {line.get_label(): line for line in axis1200.get_lines()}
    time, alive = lines["mace"].get_data()
    assert np.interp(0.4, time, alive) == pytest.approx(14 / 15) and alive[-1] == pytest.approx(0.6)
    band = survival.kaplan_meier(STUDY[("mace", 1200.0)] + [2.0] * 9, [True] * 6 + [False] * 9, horizon=2.0)
    polygon = axis1200.collections[0].get_paths()[0].vertices
    assert polygon[:, 1].min() == pytest.approx(band.low.min())
    assert polygon[:, 1].max() == pytest.approx(1.0)
