"""``ggnd config``: starter training configs with a GGND block, one per host's own training command.

The configs are the ones registered in the entry-point group ``ggnd_plugin.starter_configs``
(:func:`ggnd_plugin.registry.starter_configs`): each host's distribution declares those it ships. The
parser is built without reading that group (every ``ggnd`` command builds all parsers); the name is
checked, and the list shown, only when ``ggnd config`` itself runs.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from ggnd_plugin import validation as v


def starter_config(name: str) -> str:
    """The text of the starter config registered as ``name``."""
    from ggnd_plugin.registry import starter_config as registered

    return registered(name).text()


def _starter_config_name(text: str) -> str:
    from ggnd_plugin.registry import starter_config_names

    names = starter_config_names()
    if text not in names:
        shown = ", ".join(repr(name) for name in names) or "none registered"
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {shown})")
    return text


def _listing() -> str:
    from ggnd_plugin.registry import starter_configs

    lines = [f"  {name:16s} {config.summary}" for name, config in starter_configs().items()]
    return "starter configs:\n" + ("\n".join(lines) or "  (none registered)") + "\n"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "config",
        help="print a starter training config with GGND for a host's own training command",
        description=textwrap.fill(
            "Print a ready training config with a GGND block for the host's own training command; "
            "its header says how to run it. Data paths are placeholders to fill in (nequip and "
            "schnetpack: `???`, set on the command line)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.one_line_errors(parser)
    parser.add_argument("host", type=_starter_config_name, help="which config to print (listed below)")
    # The listing reads the registered configs: only when this command's help is shown.
    format_help = parser.format_help
    parser.format_help = lambda: format_help() + "\n" + _listing()  # type: ignore[method-assign]
    parser.set_defaults(handler=run)


def run(args) -> int:
    sys.stdout.write(starter_config(args.host))
    return 0
