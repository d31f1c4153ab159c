"""The command line starts without torch: `import ggnd_plugin`, `ggnd --help` and `ggnd --version`."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
import time
from pathlib import Path

import pytest

GGND = Path(sys.executable).parent / "ggnd"
HEAVY = ("torch", "e3nn", "numpy", "ase", "mace", "nequip", "schnetpack", "torch_sim", "matplotlib", "rich")


def modules_loaded_by(code: str) -> list[str]:
    """Heavy top-level modules that a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_import_ggnd_plugin_loads_no_heavy_module():
    assert modules_loaded_by("import ggnd_plugin") == []


def test_building_the_parser_loads_no_heavy_module():
    # Every sub-command module is imported to register its parser; none may import torch at the top.
    assert modules_loaded_by("import ggnd_plugin.cli as cli\ncli.build_parser()") == []


def test_block_names_are_still_importable_from_the_package():
    import ggnd_plugin
    from ggnd_plugin import block

    assert ggnd_plugin.GGNDBlock is block.GGNDBlock
    assert ggnd_plugin.GGNDConfig is block.GGNDConfig
    assert ggnd_plugin.FeatureSpec is block.FeatureSpec
    assert set(ggnd_plugin.__all__) <= set(dir(ggnd_plugin))
    with pytest.raises(AttributeError):
        ggnd_plugin.NoSuchName  # noqa: B018


def test_version_is_the_distribution_version():
    result = subprocess.run([str(GGND), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"ggnd-plugin {importlib.metadata.version('ggnd-plugin')}"


@pytest.mark.parametrize("option", ["--version", "--help"])
def test_startup_time(option):
    """Best of three warm runs. Measured here: ~0.1 s (it was ~12 s when the CLI imported torch first).

    The bound is the one the issue sets (1 s), ten times the measured value, so a busy machine does not
    fail it; the import tests above are what catch a heavy import.
    """
    times = []
    for _ in range(3):
        started = time.perf_counter()
        subprocess.run([str(GGND), option], capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    print(f"ggnd {option}: best {min(times):.3f} s of {[round(t, 3) for t in times]}")
    assert min(times) < 1.0


def test_adapters_table_shows_install_hints_with_brackets(monkeypatch, capsys):
    """rich reads "[mace]" as markup; the note must show `pip install 'ggnd-plugin[mace]'` whole."""
    from ggnd_plugin.adapters.mace import MACEAdapter
    from ggnd_plugin.commands import adapters as adapters_command

    monkeypatch.setattr(MACEAdapter, "module", "ggnd_test_no_such_host")  # MACE looks uninstalled
    monkeypatch.setenv("COLUMNS", "300")  # one line per note
    assert adapters_command.run(argparse.Namespace(json=False)) == 0
    output = capsys.readouterr().out
    assert "pip install 'ggnd-plugin[mace]'" in output
