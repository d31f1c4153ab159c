"""``ggnd compare``: the paired, model-level comparison of stability runs (:mod:`ggnd_plugin.md.paired`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError


def model_pair(text: str) -> tuple[str, str]:
    treatment, sep, control = text.partition("=")
    if not sep or not treatment or not control or treatment == control:
        raise argparse.ArgumentTypeError(
            f"a pair is TREATMENT=CONTROL, two different model names; got {text!r}"
        )
    return treatment, control


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="paired, model-level comparison of stability runs (treatment vs control per base model)",
        description="Compare models pair by pair from the results.json of `ggnd stability` runs: each "
        "--pair names a treatment model and its control (e.g. a fitted model upgraded with GGND and the same "
        "model fine-tuned without it), both run with the same protocol (same start frames and velocity seeds). "
        "Per pair: the failed fractions and their difference, and the restricted mean survival times; over "
        "pairs: the exact sign-flip test and the Wilcoxon signed-rank test on the differences, and the "
        "Cochran-Mantel-Haenszel test on the replicas stratified by pair. The fitted model, not the replica, "
        "is the unit of replication.",
    )
    parser.add_argument(
        "results",
        nargs="+",
        type=v.arg_type(v.existing_file),
        metavar="RESULTS",
        help="results.json files written by `ggnd stability` (their rows are pooled; model names must be unique)",
    )
    parser.add_argument(
        "--pair",
        action="append",
        type=model_pair,
        required=True,
        metavar="TREATMENT=CONTROL",
        help="a treatment model and its control (repeat for each base model)",
    )
    parser.add_argument(
        "--temperature", type=v.POSITIVE_FLOAT, required=True, metavar="K", help="the temperature compared"
    )
    parser.add_argument("--json", type=v.OUTPUT_FILE, help="also write the comparison here")
    parser.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    parser.set_defaults(handler=run_compare)
    v.one_line_errors(parser)


def read_runs(paths: list[Path]) -> tuple[list[dict], float]:
    """The replica rows of every results.json (one horizon for all), with the file each model came from."""
    rows, horizons, origin = [], set(), {}
    for path in paths:
        if not path.is_file():
            raise GGNDError(f"{path}: no such file")
        try:
            payload = json.loads(path.read_text())
            replicas, protocol = payload["replicas"], payload["protocol"]
            horizons.add(float(protocol["time_ps"]))
        except (ValueError, KeyError, TypeError) as error:
            raise GGNDError(f"{path}: not a results.json of `ggnd stability` ({error})") from error
        for model in {row["model"] for row in replicas}:
            if model in origin:
                raise GGNDError(
                    f"model '{model}' is in both {origin[model]} and {path}: names must be unique"
                )
            origin[model] = path
        rows.extend(replicas)
    if len(horizons) > 1:
        raise GGNDError(f"the runs have different horizons ({sorted(horizons)} ps): they are not comparable")
    return rows, horizons.pop()


def run_compare(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from ggnd_plugin.md.paired import paired_comparison
    from ggnd_plugin.safe_io import atomic_write_text, check_output_file

    if args.json:
        check_output_file(
            args.json, what="--json", overwrite=args.overwrite, inputs=[("RESULTS", p) for p in args.results]
        )
    rows, horizon = read_runs(args.results)
    result = paired_comparison(rows, args.pair, args.temperature, horizon)
    table = Table(title=f"paired comparison at {args.temperature:g} K, {horizon:g} ps horizon")
    for column in (
        "treatment",
        "control",
        "replicas",
        "failed T",
        "failed C",
        "difference",
        "RMST T (ps)",
        "RMST C (ps)",
    ):
        table.add_column(column, justify="left" if column in ("treatment", "control") else "right")
    for pair in result["pairs"]:
        table.add_row(
            pair["treatment"],
            pair["control"],
            str(pair["replicas"]),
            str(pair["treatment_failed"]),
            str(pair["control_failed"]),
            f"{pair['difference']:+.3f}",
            f"{pair['treatment_rmst_ps']:.2f}",
            f"{pair['control_rmst_ps']:.2f}",
        )
    console = Console()
    console.print(table)
    flip, wilcoxon, cmh = result["sign_flip"], result["wilcoxon"], result["cochran_mantel_haenszel"]
    fraction = result["failed_fraction"]
    console.print(
        f"failed fraction, mean over {flip['pairs']} pairs: treatment {fraction['treatment_mean']:.3f}, control "
        f"{fraction['control_mean']:.3f}, difference {fraction['mean_difference']:+.3f} "
        f"({flip['negative']} pairs lower, {flip['positive']} higher, {flip['zero']} equal)"
    )
    console.print(
        f"exact sign-flip test p = {flip['p_value']:.4g} (smallest attainable {flip['smallest_attainable_p']:.3g}); "
        f"Wilcoxon signed-rank p = {wilcoxon['p_value']:.4g} ({wilcoxon['method']}); "
        f"Cochran-Mantel-Haenszel p = {cmh['p_value']:.4g}"
        + (f", common odds ratio {cmh['odds_ratio']:.3g}" if cmh["odds_ratio"] is not None else "")
    )
    rmst = result["rmst"]
    console.print(
        f"RMST: treatment {rmst['treatment_mean_ps']:.2f} ps, control {rmst['control_mean_ps']:.2f} ps, mean "
        f"difference {rmst['mean_difference_ps']:+.2f} ps (sign-flip p = {rmst['sign_flip']['p_value']:.4g})"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0
