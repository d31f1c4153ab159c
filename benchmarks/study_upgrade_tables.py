"""Tables and plots of study 2's report (docs/study2-protocol.md): they read the report's payload only.

``study_upgrade_report.py`` computes the endpoints and calls these; tables go to ``OUT/tables.md`` (the
text pasted into docs/results.md), plots to ``docs/img/study_upgrade_*.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import study_upgrade_protocol as study

ARMS = ("upgrade", "control")
SCAN_TYPES = ("C-H", "H-N", "C-C", "C-N", "C-O")


def _p(test: dict[str, Any]) -> str:
    return f"{test['p_value']:.3g}"


def _counts(test: dict[str, Any]) -> str:
    return f"{test['negative']} lower / {test['zero']} equal / {test['positive']} higher"


def primary_lines(primary: dict[str, Any], base: dict[str, Any]) -> list[str]:
    base_failed = {}
    if base["status"] == "complete":
        base_failed = {p["control"].split("-")[-1]: p["control_failed"] for p in base["pairs"]}
    lines = [
        "| base model | upgrade failed | control failed | difference | base model itself failed "
        "| RMST upgrade (ps) | RMST control (ps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for pair in primary["pairs"]:
        seed = pair["treatment"].split("-")[-1]
        lines.append(
            f"| {seed} | {pair['treatment_failed']}/{pair['replicas']} | "
            f"{pair['control_failed']}/{pair['replicas']} | {pair['difference']:+.2f} | "
            f"{base_failed.get(seed, 'not run')}{'/' + str(pair['replicas']) if seed in base_failed else ''} | "
            f"{pair['treatment_rmst_ps']:.2f} | {pair['control_rmst_ps']:.2f} |"
        )
    fraction, flip = primary["failed_fraction"], primary["sign_flip"]
    w, c, rmst = primary["wilcoxon"], primary["cochran_mantel_haenszel"], primary["rmst"]
    odds = "undefined" if c["odds_ratio"] is None else f"{c['odds_ratio']:.3g}"
    lines += [
        "",
        f"- Mean failed fraction: upgrade {fraction['treatment_mean']:.3f}, control "
        f"{fraction['control_mean']:.3f}, mean difference {fraction['mean_difference']:+.3f}; "
        f"base models with the upgrade {_counts(flip)}.",
        f"- Primary test, exact two-sided sign-flip over {flip['pairs']} base models: p = {_p(flip)} "
        f"(smallest attainable {flip['smallest_attainable_p']:.3g}).",
        f"- Secondary 1, Wilcoxon signed-rank: p = {_p(w)} ({w['method']}).",
        f"- Secondary 2, Cochran-Mantel-Haenszel over base models: p = {_p(c)}, Mantel-Haenszel odds "
        f"ratio of failing (upgrade against control) {odds}.",
        f"- Secondary 3, restricted mean survival time to {primary['horizon_ps']:g} ps: upgrade "
        f"{rmst['treatment_mean_ps']:.2f} ps, control {rmst['control_mean_ps']:.2f} ps, mean paired "
        f"difference {rmst['mean_difference_ps']:+.2f} ps, sign-flip p = {_p(rmst['sign_flip'])}.",
    ]
    return lines


def _not_run_line(name: str, endpoint: dict[str, Any]) -> str:
    missing = ", ".join(endpoint.get("missing_cells", [])) or endpoint["status"]
    return f"- {name}: not run ({missing})."


def paired_line(name: str, endpoint: dict[str, Any], treatment: str, control: str) -> str:
    if endpoint["status"] != "complete":
        return _not_run_line(name, endpoint)
    fraction, flip = endpoint["failed_fraction"], endpoint["sign_flip"]
    counts = ", ".join(
        f"s{p['treatment'].split('-s')[-1]} {p['treatment_failed']}/{p['replicas']} vs "
        f"{p['control_failed']}/{p['replicas']}"
        for p in endpoint["pairs"]
    )
    return (
        f"- {name}: failed fraction {treatment} {fraction['treatment_mean']:.3f}, {control} "
        f"{fraction['control_mean']:.3f}, mean difference {fraction['mean_difference']:+.3f} "
        f"({_counts(flip)}; sign-flip p = {_p(flip)}); per base model {counts}."
    )


def counts_line(name: str, endpoint: dict[str, Any]) -> str:
    """A paired endpoint with too few base models for a test: counts, differences and RMST only."""
    if endpoint["status"] != "complete":
        return _not_run_line(name, endpoint)
    per_model = "; ".join(
        f"s{p['treatment'].split('-s')[-1]} upgrade {p['treatment_failed']}/{p['replicas']} vs control "
        f"{p['control_failed']}/{p['replicas']} failed (difference {p['difference']:+.2f}; RMST "
        f"{p['treatment_rmst_ps']:.2f} vs {p['control_rmst_ps']:.2f} ps)"
        for p in endpoint["pairs"]
    )
    return f"- {name} (counts only, too few base models for a test, as the protocol fixes): {per_model}."


def errors_lines(errors: dict[str, Any]) -> list[str]:
    if errors["status"] != "complete":
        return [f"Not run for: {', '.join(errors['missing'])}."]
    lines = [
        "| set | quantity | base | upgrade | control | upgrade - control | sign-flip p | upgrade lower/equal/higher |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in errors["summary"].items():
        name, quantity = key.split("/")
        unit = "E MAE (meV/atom)" if quantity.startswith("energy") else "F MAE (meV/Å)"
        flip = row["sign_flip"]
        lines.append(
            f"| {name} | {unit} | {row['base_mean']:.2f} | {row['upgrade_mean']:.2f} | {row['control_mean']:.2f} "
            f"| {row['mean_difference_upgrade_minus_control']:+.2f} | {_p(flip)} | "
            f"{flip['negative']}/{flip['zero']}/{flip['positive']} |"
        )
    return lines


def scans_lines(scans: dict[str, Any]) -> list[str]:
    if scans["status"] != "complete":
        return [f"Not run for: {', '.join(scans['missing'])}."]
    lines = [
        "| bond | stretched to (Å) | base (eV) | upgrade (eV) | control (eV) | upgrade - control (eV) "
        "| sign-flip p | upgrade lower/equal/higher |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in scans["summary"].items():
        bond, length = key.split("@")
        flip = row["sign_flip"]
        lines.append(
            f"| {bond} | {length} | {row['base_mean_eV']:.2f} | {row['upgrade_mean_eV']:.2f} | "
            f"{row['control_mean_eV']:.2f} | {row['mean_difference_eV']:+.2f} | {_p(flip)} | "
            f"{flip['negative']}/{flip['zero']}/{flip['positive']} |"
        )
    return lines


def cost_lines(models: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | epochs run | epoch kept (best on validation) | reached the cap | wall time (min) |",
        "|---|---|---|---|---|",
    ]
    for m in models:
        if m["status"] != "complete":
            lines.append(f"| {m['model']} | not run | | | |")
            continue
        minutes = "" if m.get("seconds") is None else f"{m['seconds'] / 60:.1f}"
        lines.append(
            f"| {m['model']} | {m['epochs_run']} | {m['best_epoch'] or 'not recorded'} | "
            f"{'yes' if m['reached_cap'] else 'no'} | {minutes} |"
        )
    return lines


def markdown(payload: dict[str, Any]) -> str:
    endpoints = payload["endpoints"]
    primary = endpoints["primary"]
    lines = [f"**Outcome.** {payload['outcome']}", "", f"Report status: {payload['status']}.", ""]
    lines += ["#### Primary endpoint and secondaries 1-3 (1200 K, 10 ps, 20 replicas per model)", ""]
    if primary["status"] == "complete":
        lines += primary_lines(primary, endpoints["control_vs_base"])
    else:
        lines.append(f"Not run: {', '.join(primary['missing_cells'])}.")
    lines += [
        "",
        "#### Secondaries 4, 7 and 9",
        "",
        paired_line(
            "Secondary 4, without the base models with an arm at the fine-tuning cap",
            endpoints["without_capped_finetunes"],
            "upgrade",
            "control",
        ),
    ]
    for key, value in endpoints.items():
        if key.startswith("cells_"):
            lines.append(counts_line(f"Secondary 7, {key[6:]}", value))
    lines.append(
        paired_line("Secondary 9, control against base", endpoints["control_vs_base"], "control", "base")
    )
    lines.append(
        paired_line("Secondary 9, upgrade against base", endpoints["upgrade_vs_base"], "upgrade", "base")
    )
    lines += ["", "#### Secondary 5: errors (mean over base models)", "", *errors_lines(endpoints["errors"])]
    lines += ["", "#### Secondary 6: cost of every fit and fine-tune", "", *cost_lines(payload["models"])]
    lines += [
        "",
        "#### Secondary 8: energy to stretch one bond (median over the bonds of a type; mean over base models)",
        "",
        *scans_lines(endpoints["bond_scans"]),
    ]
    lines += ["", "#### Deviations and events", ""]
    lines += [f"- {d['what']}" for d in payload["deviations"]] or ["- none"]
    return "\n".join(lines) + "\n"


def survival_plot(rows_by_arm: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ggnd_plugin.md.survival import kaplan_meier

    fig, ax = plt.subplots(figsize=(6, 4))
    for index, (arm, rows) in enumerate(rows_by_arm.items()):
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


def scan_plot(scans: dict[str, Any], path: Path) -> None:
    """Per bond type: the energy to stretch one bond to each reported length, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ggnd_plugin.bond_scan import REPORT_LENGTHS

    per_model = scans["per_model"]
    fig, axes = plt.subplots(1, len(SCAN_TYPES), figsize=(3 * len(SCAN_TYPES), 3.4), sharey=True)
    for ax, bond in zip(axes, SCAN_TYPES, strict=True):
        for index, arm in enumerate(("base", *ARMS)):
            values = np.array(
                [
                    [per_model[f"{arm}-s{s}"][bond][f"E_{r:g}"] for r in REPORT_LENGTHS]
                    for s in study.BASE_SEEDS
                ]
            )
            x = np.array(REPORT_LENGTHS) + (index - 1) * 0.05
            for row in values:
                ax.plot(x, row, "o", color=f"C{index}", alpha=0.35, markersize=3)
            ax.plot(x, values.mean(axis=0), "-", color=f"C{index}", label=arm)
        ax.set_title(bond)
        ax.set_xlabel("bond length (Å)")
    axes[0].set_ylabel("energy above the unstretched frame (eV)")
    axes[0].legend(fontsize=8)
    fig.suptitle("study 2: energy to stretch one bond (points: models; lines: arm means; arms offset 0.05 Å)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
