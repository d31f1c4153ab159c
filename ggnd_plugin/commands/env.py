"""``ggnd env``: what an environment needs beyond ``pip install``.

``ggnd env overrides`` prints the dependency overrides that put all three hosts into one environment
(mace-torch pins e3nn 0.4.4, nequip needs e3nn 0.6), for ``uv pip install --override``.
"""

from __future__ import annotations

import sys
from importlib import resources

from ggnd_plugin import validation as v

OVERRIDES_FILE = "all_hosts_overrides.txt"


def all_hosts_overrides() -> str:
    return resources.files("ggnd_plugin").joinpath("configs", OVERRIDES_FILE).read_text(encoding="utf-8")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "env",
        help="environment helpers: `ggnd env overrides` for installing all hosts together",
        description="`overrides` prints the uv override file that installs MACE, NequIP and SchNetPack "
        "into one environment: ggnd env overrides > ggnd-overrides.txt; "
        "uv pip install 'ggnd-plugin[all]' --override ggnd-overrides.txt",
    )
    v.one_line_errors(parser)
    env_commands = parser.add_subparsers(dest="env_command", metavar="SUBCOMMAND")
    parser.set_defaults(handler=lambda args: parser.print_help() or 1)
    overrides = env_commands.add_parser(
        "overrides", help="print the override file for installing all hosts into one environment"
    )
    v.one_line_errors(overrides)
    overrides.set_defaults(handler=run_overrides)


def run_overrides(args) -> int:
    sys.stdout.write(all_hosts_overrides())
    return 0
