"""No import circles: in ggnd_plugin (imports at module level and inside functions alike) and among the
benchmark scripts, which share code through modules they import one way only.

The graph is read from the source (ast), so it sees the lazy imports that keep ``import ggnd_plugin``
light as well as the eager ones; a submodule importing its own package's ``__init__`` is not a circle
(Python finishes the package first).
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]


def module_names(folder: Path, package: str | None) -> dict[str, Path]:
    names = {}
    for path in folder.rglob("*.py"):
        parts = path.relative_to(folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(filter(None, (package, *parts)))] = path
    return names


def import_graph(folder: Path, package: str | None) -> nx.DiGraph:
    """Edges module -> module it imports, for modules of ``folder`` (a package, or a folder of scripts
    that import each other by bare name when ``package`` is None)."""
    modules = module_names(folder, package)
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join([*here, base] if base else here)
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(f"{target}."):
                    graph.add_edge(name, target)
    return graph


def test_the_package_has_no_import_circle():
    graph = import_graph(REPO / "ggnd_plugin", "ggnd_plugin")
    assert graph.number_of_nodes() > 60 and graph.number_of_edges() > 100  # the graph was read
    assert ("ggnd_plugin.block.ggnd_block", "ggnd_plugin.block.version1") in graph.edges
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import circles: {cycles[:5]}"


def test_the_benchmarks_have_no_import_circle():
    graph = import_graph(REPO / "benchmarks", None)
    assert ("study_upgrade", "study_upgrade_protocol") in graph.edges
    assert ("study_3bpa", "pipeline_3bpa") in graph.edges
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import circles among the benchmark scripts: {cycles[:5]}"


def test_a_circle_would_be_found(tmp_path):
    """The reader itself: two modules importing each other, one lazily, make a circle."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from . import a\n    return a\n")
    assert list(nx.simple_cycles(import_graph(package, "pkg"))) != []
