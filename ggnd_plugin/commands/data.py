"""``ggnd data``: reference data the project makes itself, and the data shipped with it (docs/data.md)."""

from __future__ import annotations

from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError


def _add_xtb_options(parser, note: str) -> None:
    """The reference method's options, shared by generate and label (keys of ggnd_plugin.xtb.METHODS,
    spelt out here so that ``ggnd --help`` does not import numpy)."""
    parser.add_argument(
        "--method",
        choices=("gfn2-xtb", "gfn1-xtb", "ipea1-xtb"),
        default="gfn2-xtb",
        help=f"tblite Hamiltonian; default gfn2-xtb{note}",
    )
    parser.add_argument(
        "--electronic-temperature",
        type=v.NON_NEGATIVE_FLOAT,
        default=300.0,
        help=f"xTB Fermi smearing (K); default 300{note}",
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="make xTB reference data from a SMILES or label structures with xTB; list the shipped data",
        description="Reference data: `generate` runs GFN2-xTB Langevin MD of a molecule and writes labelled "
        "extxyz files; `label` computes GFN2-xTB energies and forces for any structures (e.g. the failure "
        "frames of `ggnd stability`); `list` shows the datasets shipped inside the package.",
    )
    data_commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda args: parser.print_help() or 1)
    v.one_line_errors(parser)

    generate = data_commands.add_parser(
        "generate",
        help="GFN2-xTB MD of a molecule at several temperatures, labelled frames as extxyz",
        description="Build the molecule from SMILES (RDKit), run Langevin MD with GFN2-xTB forces (tblite) at each "
        "temperature after an equilibration period, and write one labelled frame every --spacing-fs to "
        "OUT/<name>_<T>K.xyz (energy in eV, forces in eV/Å), plus OUT/README.md and OUT/generation.json. "
        "Deterministic for a seed; stop at any time and continue with --resume. OUT must be new or empty "
        "unless it holds this command's run (--overwrite replaces it). "
        "Needs the xtb extra: pip install 'ggnd-plugin[xtb]'.",
    )
    generate.add_argument(
        "--smiles", required=True, type=v.TEXT, help="the molecule, e.g. 'Nc1ncccc1OCc1ccccc1' (3BPA)"
    )
    generate.add_argument(
        "--temperature",
        nargs="+",
        type=v.POSITIVE_FLOAT,
        required=True,
        metavar="K",
        help="MD temperatures (K)",
    )
    generate.add_argument(
        "--frames",
        nargs="+",
        type=v.POSITIVE_INT,
        required=True,
        metavar="N",
        help="labelled frames per temperature: one count for all, or one per --temperature",
    )
    generate.add_argument(
        "--name", default="molecule", type=v.FILE_STEM, help="file-name stem; default 'molecule'"
    )
    generate.add_argument(
        "--spacing-fs",
        type=v.POSITIVE_FLOAT,
        default=50.0,
        help="MD time between written frames (fs); default 50",
    )
    generate.add_argument(
        "--timestep-fs",
        type=v.POSITIVE_FLOAT,
        default=0.5,
        help="MD time step (fs); default 0.5, which keeps X-H vibrations stable at 1200 K",
    )
    generate.add_argument(
        "--friction", type=v.NON_NEGATIVE_FLOAT, default=0.01, help="Langevin friction (1/fs); default 0.01"
    )
    generate.add_argument(
        "--equilibration-ps",
        type=v.NON_NEGATIVE_FLOAT,
        default=1.0,
        help="MD before the first frame, not written (ps; rounded up to whole spacings); default 1",
    )
    _add_xtb_options(generate, "")
    generate.add_argument(
        "--seed", type=v.SEED, default=0, help="seeds the geometry, velocities, noise and split"
    )
    generate.add_argument(
        "--split",
        type=v.POSITIVE_INT,
        metavar="N_TRAIN",
        help="split one temperature's frames at random into N_TRAIN training frames "
        "(<name>_<T>K_train.xyz) and the rest (<name>_<T>K_test.xyz)",
    )
    generate.add_argument(
        "--split-temperature",
        type=v.POSITIVE_FLOAT,
        metavar="K",
        help="the temperature --split applies to; default the first",
    )
    generate.add_argument(
        "--max-bond-stretch",
        type=v.POSITIVE_FLOAT,
        default=1.0,
        metavar="Å",
        help="stop with an error when a bond of the SMILES stretches this far (the molecule broke); default 1.0",
    )
    generate.add_argument("-o", "--out", type=v.OUTPUT_DIR, required=True, help="output directory")
    generate.add_argument("--resume", action="store_true", help="continue the run stopped in --out")
    generate.add_argument("--no-progress", action="store_true", help="no progress bar")
    generate.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's files in --out and start again, or write into a folder holding other files",
    )
    generate.set_defaults(handler=run_generate)
    v.one_line_errors(generate)

    label = data_commands.add_parser(
        "label",
        help="GFN2-xTB energies and forces for any structures (e.g. failure frames), as labelled extxyz",
        description="Compute xTB energies and forces (tblite; the method and settings of the package's own "
        "data) for every frame of FRAMES, in order, and write them to -o as extxyz (info['energy'] in eV, "
        "arrays['forces'] in eV/Å; the frames' other info and arrays are kept). A frame's charge is "
        "info['charge'] (default 0), its unpaired electrons info['unpaired_electrons'] (default 0). Stop at "
        "any time and continue with --resume. Needs the xtb extra: pip install 'ggnd-plugin[xtb]'.",
    )
    label.add_argument("frames", nargs="+", type=v.STRUCTURE_FILE, metavar="FRAMES", help="structure files")
    label.add_argument("-o", "--output", type=v.OUTPUT_FILE, required=True, help="extxyz to write")
    _add_xtb_options(label, " (that of the shipped data)")
    label.add_argument("--resume", action="store_true", help="continue the labelling stopped in -o")
    label.add_argument("--no-progress", action="store_true", help="no progress bar")
    label.add_argument("--overwrite", action="store_true", help="replace -o (or its unfinished run)")
    label.set_defaults(handler=run_label)
    v.one_line_errors(label)

    reorder = data_commands.add_parser(
        "reorder",
        help="rewrite structures of a molecule in another file's atom order (e.g. start frames for MD)",
        description="Read every frame of INPUT, find the atom order of the reference molecule (the first frame "
        "of --like) by matching bond graphs with elements, and write the frames in that order to --output as "
        "extxyz, positions only (labels are dropped: they were computed for the other order, and often by "
        "another method). Use it to start `ggnd stability` from frames made by `ggnd data generate` for "
        "models trained on another dataset of the same molecule.",
    )
    reorder.add_argument("input", type=v.STRUCTURE_FILE, help="structures to rewrite")
    reorder.add_argument(
        "--like", type=v.STRUCTURE_FILE, required=True, help="a structure file in the wanted atom order"
    )
    reorder.add_argument("-o", "--output", type=v.OUTPUT_FILE, required=True, help="extxyz to write")
    reorder.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    reorder.set_defaults(handler=run_reorder)
    v.one_line_errors(reorder)

    listing = data_commands.add_parser(
        "list", help="the datasets shipped inside ggnd-plugin, with their paths"
    )
    listing.set_defaults(handler=run_list)
    v.one_line_errors(listing)


def run_generate(args) -> int:
    from ggnd_plugin.reference import GenerationSettings, generate
    from ggnd_plugin.xtb import METHODS

    settings = GenerationSettings(
        smiles=args.smiles,
        temperatures_K=tuple(args.temperature),
        frames=tuple(args.frames),
        name=args.name,
        method=METHODS[args.method],
        seed=args.seed,
        spacing_fs=args.spacing_fs,
        timestep_fs=args.timestep_fs,
        friction_per_fs=args.friction,
        equilibration_ps=args.equilibration_ps,
        split_train=args.split,
        split_temperature_K=args.split_temperature,
        max_bond_stretch=args.max_bond_stretch,
        electronic_temperature_K=args.electronic_temperature,
    )
    result = generate(
        settings,
        args.out,
        resume=args.resume,
        show_progress=not args.no_progress,
        overwrite=args.overwrite,
    )
    for path in result.files:
        stats = result.statistics[path.name]
        print(
            f"{path}: {stats['frames']} frames, E mean {stats['energy_mean_eV']:.3f} eV "
            f"(std {stats['energy_std_eV']:.3f}), force RMS {stats['force_rms_eV_per_A']:.3f} eV/Å"
        )
    print(f"{args.out / 'README.md'}: how the data was made")
    return 0


def run_label(args) -> int:
    from ggnd_plugin.labelling import LabelSettings, label_files
    from ggnd_plugin.xtb import METHODS

    settings = LabelSettings(METHODS[args.method], args.electronic_temperature)
    result = label_files(
        args.frames,
        args.output,
        settings,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    print(
        f"{result.out}: {result.frames} frames labelled with {settings.method} "
        f"({result.labelled_now} now, {result.frames - result.labelled_now} before the resume)"
    )
    return 0


def run_reorder(args) -> int:
    from ase.io import write

    from ggnd_plugin.data import match_atom_order, read_structures
    from ggnd_plugin.safe_io import atomic_path, check_output_file

    check_output_file(
        args.output,
        what="--output",
        overwrite=args.overwrite,
        inputs=[("INPUT", args.input), ("--like", args.like)],
    )
    reference = read_structures(args.like, "0")[0]
    frames = match_atom_order(read_structures(args.input), reference, str(args.input))
    with atomic_path(args.output) as tmp:
        write(tmp, frames, format="extxyz")
    print(
        f"{args.output}: {len(frames)} frames of {args.input} in the atom order of {args.like} "
        f"({reference.get_chemical_formula()}), positions only"
    )
    return 0


def run_list(args) -> int:
    from ggnd_plugin.default_data import default_data_path, list_default_data

    names = list_default_data()
    if not names:
        raise GGNDError("no default data is installed with this copy of ggnd-plugin")
    for name in names:
        print(f"{name}\t{default_data_path(name)}")
    return 0
