"""What the install routes rely on, checked in the development environment.

The routes themselves (fresh venvs from a built wheel) are checked by `make check-install`
(.ci/check_install.py); these tests cover the pieces that can be checked without installing anything.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]

# A stand-in for e3nn 0.4.4: its `o3` loads a file of slices with a bare torch.load at import.
FAKE_E3NN_O3 = """
import os, torch
_constants = torch.load(os.path.join(os.path.dirname(__file__), "constants.pt"))
def marker():
    return "fake e3nn.o3"
"""


def run_python(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {"PATH": str(BIN), "HOME": str(Path.home())}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env
    )


@pytest.fixture
def fake_e3nn(tmp_path):
    import torch

    package = tmp_path / "e3nn"
    (package / "o3").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "o3" / "__init__.py").write_text(FAKE_E3NN_O3)
    torch.save([slice(0, 3), slice(3, 8)], package / "o3" / "constants.pt")
    return tmp_path


def test_fake_e3nn_fails_to_import_like_e3nn_044(fake_e3nn):
    result = run_python("import e3nn.o3", pythonpath=fake_e3nn)
    assert result.returncode != 0
    assert "Unsupported global: GLOBAL slice" in result.stderr


def test_e3nn_compat_imports_an_e3nn_that_torch_load_refuses(fake_e3nn):
    result = run_python(
        """
        from ggnd_plugin.e3nn_compat import o3
        print(o3.marker())
        """,
        pythonpath=fake_e3nn,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fake e3nn.o3"


def test_e3nn_compat_keeps_torch_load_strict_for_other_files(tmp_path):
    """After the import, a user's file with a slice is refused as before, and no variable is set."""
    path = tmp_path / "user_file.pt"
    result = run_python(
        f"""
        import os, pickle, torch
        import ggnd_plugin.e3nn_compat
        torch.save({{"rows": slice(0, 2)}}, {str(path)!r})
        assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
        assert slice not in torch.serialization.get_safe_globals()
        try:
            torch.load({str(path)!r})
        except pickle.UnpicklingError as error:
            print("refused:", "GLOBAL slice" in str(error))
        else:
            print("loaded")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "refused: True"


def test_e3nn_compat_gives_the_real_o3():
    import e3nn.o3

    from ggnd_plugin.e3nn_compat import import_e3nn, o3

    assert o3 is e3nn.o3 and import_e3nn() is e3nn.o3


# ---- the hydra search-path plugin -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("primary", "added"),
    [
        ("pkg://schnetpack/configs", True),  # spktrain (@hydra.main in schnetpack.cli)
        ("pkg://schnetpack.configs", True),  # hydra's compose API
        ("file:///home/user/project", False),  # nequip-train (config_path=os.getcwd())
        ("pkg://schnetpack_extras/configs", False),
        ("pkg://my_app.conf", False),
    ],
)
def test_search_path_plugin_adds_groups_only_for_schnetpack(primary, added):
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    from hydra_plugins.ggnd_plugin_searchpath import CONFIG_PACKAGE, GGNDSchNetPackSearchPath

    search_path = ConfigSearchPathImpl()
    search_path.append("hydra", "pkg://hydra.conf")
    search_path.append("main", primary)
    GGNDSchNetPackSearchPath().manipulate_search_path(search_path)
    paths = [element.path for element in search_path.get_path()]
    assert (CONFIG_PACKAGE in paths) is added


@pytest.mark.skipif(not (BIN / "nequip-train").exists(), reason="nequip not installed")
def test_nequip_train_help_does_not_list_schnetpack_groups(tmp_path):
    from ggnd_plugin.commands.config import starter_config

    # nequip-train's help needs a primary config; the help then lists every config group it can see.
    (tmp_path / "run.yaml").write_text(starter_config("nequip"))
    result = subprocess.run(
        [str(BIN / "nequip-train"), "-cp", str(tmp_path), "-cn", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "Configuration groups" in result.stdout
        and "_target_: nequip.train.EMALightningModule" in result.stdout
    )
    assert "ggnd_painn_3bpa" not in result.stdout and "schnet" not in result.stdout


# ---- tested version ranges --------------------------------------------------------------------------
def declared_requirements() -> dict[str, Requirement]:
    """pyproject.toml's requirements by name (the installed metadata of an editable install can lag)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    texts = project["dependencies"] + [
        t for extra in project["optional-dependencies"].values() for t in extra
    ]
    requirements = {}
    for text in texts:
        requirement = Requirement(text)
        requirements.setdefault(requirement.name, requirement)
    return requirements


@pytest.mark.parametrize(
    "distribution", ["torch", "e3nn", "torch-sim-atomistic", "mace-torch", "nequip", "schnetpack"]
)
def test_development_environment_is_inside_the_declared_ranges(distribution):
    requirement = declared_requirements()[distribution]
    installed = importlib.metadata.version(distribution)
    assert requirement.specifier.contains(installed, prereleases=True), f"{installed} not in {requirement}"


def test_torch_range_has_both_bounds():
    specifier = declared_requirements()["torch"].specifier
    assert {spec.operator for spec in specifier} == {">=", "<"}
