"""``ggnd adapters``: the registered host adapters and whether each is usable here."""

from __future__ import annotations

import json

from ggnd_plugin import validation as v


def register(subparsers) -> None:
    parser = subparsers.add_parser("adapters", help="list host adapters (entry points) and their status")
    v.one_line_errors(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from ggnd_plugin.registry import list_adapters

    records = list_adapters()
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    table = Table(title="ggnd_plugin.adapters")
    for column in ("adapter", "host package", "version", "usable", "note"):
        table.add_column(column)
    for record in records:
        # Escaped: rich reads "[mace]" in "pip install 'ggnd-plugin[mace]'" as a markup tag and drops it.
        table.add_row(
            escape(record["name"]),
            escape(record["host"]),
            escape(record["version"] or "-"),
            "yes" if record["usable"] else "no",
            "" if record["usable"] else escape(record["reason"]),
        )
    Console().print(table)
    return 0
