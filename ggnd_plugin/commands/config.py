"""``ggnd config``: starter training configs with a GGND block, one per host's own training command."""

from __future__ import annotations

import argparse
import sys
import textwrap
from importlib import resources

from ggnd_plugin import validation as v

# name on the command line -> (file in ggnd_plugin/configs, what it is)
STARTER_CONFIGS = {
    "mace": ("mace_train.yaml", "ggnd-mace-train --config FILE (MACE + GGND from scratch)"),
    "nequip": ("nequip_train.yaml", "nequip-train config (NequIP + GGND from scratch)"),
    "nequip-finetune": (
        "nequip_finetune.yaml",
        "nequip-train config (GGND attached to a fitted NequIP checkpoint, fine-tuned)",
    ),
    "schnetpack": ("schnetpack_experiment.yaml", "spktrain experiment (PaiNN + GGND)"),
}


def starter_config(name: str) -> str:
    """The text of the starter config ``name`` (a key of :data:`STARTER_CONFIGS`)."""
    file_name, _ = STARTER_CONFIGS[name]
    return resources.files("ggnd_plugin").joinpath("configs", file_name).read_text(encoding="utf-8")


def register(subparsers) -> None:
    listing = "\n".join(f"  {name:16s} {what}" for name, (_, what) in STARTER_CONFIGS.items())
    parser = subparsers.add_parser(
        "config",
        help="print a starter training config with GGND for a host's own training command",
        description=textwrap.fill(
            "Print a ready training config with a GGND block for the host's own training command; "
            "its header says how to run it. Data paths are placeholders to fill in (nequip and "
            "schnetpack: `???`, set on the command line)."
        )
        + "\n\n"
        + listing,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.one_line_errors(parser)
    parser.add_argument("host", choices=sorted(STARTER_CONFIGS), help="which config to print")
    parser.set_defaults(handler=run)


def run(args) -> int:
    sys.stdout.write(starter_config(args.host))
    return 0
