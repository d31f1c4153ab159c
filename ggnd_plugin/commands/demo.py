"""``ggnd demo``: the whole story in one command (what ``make demo`` runs)."""

from __future__ import annotations

from pathlib import Path

from ggnd_plugin import validation as v


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fit, upgrade with GGND, evaluate and run batched stability on the shipped 3BPA data",
        description=(
            "On the package's own 3BPA data (GFN2-xTB): fit the host at 300 K through its own training "
            "command, train the same architecture with GGND, upgrade the fitted model with GGND and "
            "fine-tune it, evaluate all three at 300, 600 and 1200 K, run batched replica stability at 600 "
            "and 1200 K, and write a comparison table with plots to OUT/report.md. Stages are cached in "
            "OUT: run the same command again to continue a stopped demo. OUT must be new or empty, or hold "
            "a demo with the same options (--overwrite starts again)."
        ),
    )
    parser.add_argument(
        "--out", type=v.OUTPUT_DIR, default=Path("demo-output"), help="output folder (demo-output)"
    )
    parser.add_argument(
        "--host", default="mace", type=v.ADAPTER, help="host adapter: mace (default), nequip or schnetpack"
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes: the same story in a few minutes")
    parser.add_argument("--seed", type=v.SEED, default=0)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="remove an earlier demo's files in --out and start again, or write into a folder holding other files",
    )
    parser.set_defaults(handler=run)
    v.one_line_errors(parser)


def run(args) -> int:
    from ggnd_plugin.demo import DemoSettings, run_demo

    settings = DemoSettings.quick() if args.quick else DemoSettings()
    settings.seed = args.seed
    run_demo(args.out, host=args.host, settings=settings, overwrite=args.overwrite)
    return 0
