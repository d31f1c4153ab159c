"""``ggnd scan``: bond-stretch scans of one or more models (:mod:`ggnd_plugin.bond_scan`)."""

from __future__ import annotations

import json
from pathlib import Path

from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "scan",
        help="bond-stretch scans: the energy to pull each bond apart, every model on one plot per bond type",
        description="For each bond of a molecule, stretch it from its length in --structure to --max-length "
        "by moving one atom along the bond (the H of an X-H bond, else the less-bonded atom), the rest fixed, "
        "and record each model's energy relative to the unstretched structure. Writes scan.json, scan.md (a "
        "table of the energy at 1.4, 1.8 and 2.6 Å per bond type, median over the type's bonds) and "
        "scan_<type>.png into --out (new or empty, or --overwrite). Tells a soft dissociation curve (an atom "
        "that leaves with ordinary forces) from a collision.",
    )
    parser.add_argument("models", nargs="+", type=v.MODEL_FILE, metavar="MODEL", help="model files")
    parser.add_argument(
        "--structure", type=v.STRUCTURE_FILE, required=True, help="the molecule (extxyz, ...)"
    )
    parser.add_argument(
        "--frame", type=v.NON_NEGATIVE_INT, default=0, help="frame of --structure (default 0)"
    )
    parser.add_argument(
        "--types",
        nargs="+",
        type=v.TEXT,
        metavar="TYPE",
        help="bond types to scan, e.g. C-H N-H (default: all)",
    )
    parser.add_argument("--max-length", type=v.POSITIVE_FLOAT, default=3.0, help="last bond length (Å)")
    parser.add_argument("--step", type=v.POSITIVE_FLOAT, default=0.05, help="grid step (Å)")
    parser.add_argument(
        "--host", default="auto", type=v.HOST, help="host of the MODELs (auto: from each file)"
    )
    parser.add_argument("--out", type=v.OUTPUT_DIR, required=True, help="folder for the outputs")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that holds other files")
    parser.set_defaults(handler=run_scan)
    v.one_line_errors(parser)


def model_names(paths: list[Path]) -> list[str]:
    """File stems, made unique (as ``ggnd stability`` names its models)."""
    names = []
    for path in paths:
        name = path.stem
        while name in names:
            name = f"{name}_{len(names)}"
        names.append(name)
    return names


def table_markdown(rows: list[dict], lengths=None) -> str:
    from ggnd_plugin.bond_scan import REPORT_LENGTHS

    lengths = lengths or REPORT_LENGTHS
    header = (
        "| bond type | model | bonds | length (Å) | " + " | ".join(f"E({r:g} Å) (eV)" for r in lengths) + " |"
    )
    lines = [header, "|" + "---|" * (4 + len(lengths))]
    for row in rows:
        cells = [
            "–"
            if row[f"E_{r:g}"] is None
            else f"{row[f'E_{r:g}']:.2f} [{row[f'E_{r:g}_min']:.2f}, {row[f'E_{r:g}_max']:.2f}]"
            for r in lengths
        ]
        lines.append(
            f"| {row['bond_type']} | {row['model']} | {row['bonds']} | {row['equilibrium_A']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def run_scan(args) -> int:
    from ggnd_plugin.bond_scan import plot_scans, scan_bonds, scan_table
    from ggnd_plugin.data import read_structures
    from ggnd_plugin.registry import resolve
    from ggnd_plugin.safe_io import atomic_path, atomic_write_text, check_output_dir, output_lock

    inputs = [("MODEL", p) for p in args.models] + [("--structure", args.structure)]
    check_output_dir(args.out, what="--out", is_own=False, overwrite=args.overwrite, inputs=inputs)
    frames = read_structures(args.structure)
    if args.frame >= len(frames):
        raise GGNDError(f"--frame {args.frame}: {args.structure} holds {len(frames)} frame(s)")
    structure = frames[args.frame]
    if structure.pbc.any():
        raise GGNDError(f"{args.structure}: frame {args.frame} is periodic; bond scans are for molecules")
    models = {}
    for name, path in zip(model_names(args.models), args.models, strict=True):
        adapter = resolve(args.host, path)
        models[name] = (adapter, adapter.load(path))
    scans = scan_bonds(
        models, structure, args.max_length, args.step, args.types, progress=not args.no_progress
    )
    rows = scan_table(scans)
    with output_lock(args.out):
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "structure": f"{args.structure.name}[{args.frame}]",
            "models": {name: str(path.name) for name, path in zip(models, args.models, strict=True)},
            "max_length_A": args.max_length,
            "step_A": args.step,
            "table": rows,
            "scans": [scan.to_dict() for scan in scans],
        }
        atomic_write_text(args.out / "scan.json", json.dumps(record, indent=1))
        atomic_write_text(args.out / "scan.md", table_markdown(rows))
        if not args.no_plots:
            for bond_type in dict.fromkeys(s.bond_type for s in scans):
                with atomic_path(args.out / f"scan_{bond_type}.png") as tmp:
                    plot_scans(scans, tmp, bond_type)
    print(table_markdown(rows), end="")
    print(f"bond scans of {len(models)} model(s), {len(scans)} bond(s) -> {args.out}")
    return 0
