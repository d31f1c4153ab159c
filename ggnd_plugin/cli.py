"""The ``ggnd`` command line.

Each module in :mod:`ggnd_plugin.commands` adds its sub-commands through ``register(subparsers)``;
modules there import hosts, TorchSim and plotting only inside their command functions, so ``ggnd --help``
stays fast. Problems with the user's input (:class:`ggnd_plugin.errors.GGNDError`) are printed as one
line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ggnd_plugin import __version__
from ggnd_plugin.errors import GGNDError


def build_parser() -> argparse.ArgumentParser:
    import ggnd_plugin.commands as commands

    parser = argparse.ArgumentParser(
        prog="ggnd",
        description="Geometric Graph Neural Diffusion for interatomic potentials: upgrade, fine-tune, "
        "evaluate and stress-test MACE, NequIP and SchNetPack models.",
    )
    parser.add_argument("--version", action="version", version=f"ggnd-plugin {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 1
    try:
        result = args.handler(args)
    except GGNDError as error:
        print(f"ggnd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ggnd {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
