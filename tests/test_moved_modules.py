"""Old module paths stay importable (ggnd_plugin.moved_modules), and every name that the model files of
earlier releases store still resolves: the classes their pickles name, and the dotted paths they keep
as strings (a NequIP checkpoint's model builder, the extension module NequIP records).

tests/data/v1 holds files of 0.1.0, tests/data/v0.2.0 files of 0.2.0 (see test_block_compatibility.py,
which loads them); here they are only read, opcode by opcode, without unpickling anything.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ggnd_plugin.adapters.pickled_classes import pickle_globals
from ggnd_plugin.moved_modules import MOVED

FIXTURES = sorted(
    path
    for release in ("v1", "v0.2.0")
    for path in (Path(__file__).parent / "data" / release).iterdir()
    if zipfile.is_zipfile(path)
)
HOSTS = ("mace", "nequip", "schnetpack")


def _needs_host(path: str) -> None:
    """Skip when resolving ``path`` needs a host that is not installed here."""
    for host in HOSTS:
        if f".{host}" in path and importlib.util.find_spec(host) is None:
            pytest.skip(f"{host} not installed")


def _pickles(path: Path) -> list[bytes]:
    with zipfile.ZipFile(path) as archive:
        return [archive.read(name) for name in archive.namelist() if name.endswith(".pkl")]


def _stored_dotted_paths(raw: bytes) -> set[str]:
    """Strings in a pickle that name something of ggnd_plugin by its dotted path."""
    return {
        argument
        for _, argument, _ in pickletools.genops(raw)
        if isinstance(argument, str)
        and argument.startswith("ggnd_plugin.")
        and all(part.isidentifier() for part in argument.split("."))
    }


def _locate(path: str):
    """What ``path`` names: a module, or an attribute of the longest importable module prefix (the way
    pickle, hydra's ``_target_`` and entry points look names up)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(path)


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_every_moved_module_resolves_to_its_new_home(old, new):
    _needs_host(new)
    target = importlib.import_module(new)
    alias = importlib.import_module(old)
    assert dir(alias) == dir(target)
    names = [name for name, value in vars(target).items() if getattr(value, "__module__", None) == new]
    for name in names:  # none for the nequip.extension module, which must stay empty
        assert getattr(alias, name) is getattr(target, name)
    if names:
        exec(f"from {old} import {names[0]}", {})  # the form users' code and console scripts use


@pytest.mark.parametrize("path", FIXTURES, ids=lambda path: f"{path.parent.name}/{path.name}")
def test_every_name_the_files_of_earlier_releases_store_resolves(path):
    pickles = _pickles(path)
    classes = {(module, name) for raw in pickles for module, name in pickle_globals(raw)}
    ours = sorted((module, name) for module, name in classes if module.split(".")[0] == "ggnd_plugin")
    dotted = sorted(set().union(*(_stored_dotted_paths(raw) for raw in pickles)))
    assert ours or dotted, f"{path} names nothing of ggnd_plugin"
    for module, name in ours:
        _needs_host(module)
        assert isinstance(getattr(importlib.import_module(module), name), type), (module, name)
    for name in dotted:
        _needs_host(name)
        assert _locate(name) is not None, name


@pytest.mark.parametrize("package", ["ggnd_plugin.adapters", *(f"ggnd_plugin.adapters.{h}" for h in HOSTS)])
def test_package_exports_are_what_their_modules_define(package):
    """Also once every submodule is imported: a submodule named like an export would shadow it."""
    _needs_host(package)
    module = importlib.import_module(package)
    exports = dict(module._EXPORTS)
    for name in set(exports.values()):
        importlib.import_module(name)
    for name, defining in exports.items():
        assert getattr(module, name) is getattr(importlib.import_module(defining), name), name


def test_host_packages_and_old_paths_import_no_host():
    """The entry points and nequip's extension hook import these; only using a name loads a host."""
    modules = [
        "ggnd_plugin.adapters.mace",
        "ggnd_plugin.adapters.nequip",
        "ggnd_plugin.adapters.nequip.extension",
        "ggnd_plugin.adapters.schnetpack",
        *MOVED,
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(' '.join(m for m in ('torch', *{HOSTS!r}, 'torch_sim') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == []


def test_a_nequip_package_of_0_1_0_is_saved_again_with_its_own_graph_modules(tmp_path):
    """The package's interned ggnd_plugin.adapters.nequip_modules is packaged again under that name."""
    pytest.importorskip("nequip")
    from ase.io import read

    from ggnd_plugin.adapters.nequip import NequIPAdapter

    frames = read(Path(__file__).parents[1] / "ggnd_plugin/default_data/3bpa/3bpa_300K_test.xyz", ":2")
    adapter = NequIPAdapter()
    old = adapter.load(Path(__file__).parent / "data" / "v1" / "nequip_ggnd.nequip.zip")
    before = adapter.predict(copy.deepcopy(old), frames)
    path = adapter.save(old, tmp_path / "again.nequip.zip")
    with zipfile.ZipFile(path) as archive:
        interned = [name for name in archive.namelist() if name.endswith(".py") and "ggnd_plugin" in name]
    assert [name.split("/", 1)[1] for name in interned] == ["ggnd_plugin/adapters/nequip_modules.py"]
    after = adapter.predict(adapter.load(path), frames)
    assert (before.energy - after.energy).abs().max() == 0 and (before.forces - after.forces).abs().max() == 0
