"""Model files written by earlier releases load and predict as they did when they were written.

tests/data/v1/ holds files of ggnd-plugin 0.1.0 (GGND numerics version 1), tests/data/v0.2.0/ files of
0.2.0 (numerics version 2, and 0.1.0 files re-saved by 0.2.0), each written by that release's code
(tests/data/make_model_files.py) together with its predictions; every GGND weight in them is perturbed,
so the block changes every number compared.
"""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from ase.io import read

from ggnd_plugin.block import GGNDBlock, GGNDConfig, GGNDVersionWarning, TensorFilter

REPO = Path(__file__).resolve().parents[1]
FILES = REPO / "tests" / "data" / "v1"
PREDICTIONS = json.loads((FILES / "predictions.json").read_text())
RELEASES = {"0.1.0": FILES, "0.2.0": REPO / "tests" / "data" / "v0.2.0"}
RELEASE_FILES = [
    (release, name)
    for release, folder in RELEASES.items()
    for name in sorted(json.loads((folder / "predictions.json").read_text())["files"])
]
FRAMES = read(REPO / "ggnd_plugin" / "default_data" / "3bpa" / "3bpa_300K_test.xyz", ":3")


def _load(name: str, release: str = "0.1.0"):
    from ggnd_plugin.registry import resolve

    folder = RELEASES[release]
    expected = json.loads((folder / "predictions.json").read_text())["files"][name]
    adapter = resolve("auto", folder / name)
    assert adapter.name == expected["host"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = adapter.load(folder / name)
    return adapter, model, expected, caught


@pytest.mark.parametrize("release, name", RELEASE_FILES)
def test_files_of_earlier_releases_predict_as_before(release, name):
    adapter, model, expected, caught = _load(name, release)
    blocks = adapter.ggnd_blocks(model)
    version = 1 if release == "0.1.0" or "_v1_resaved" in name else 2
    assert blocks and all(block.config.version == version for block in blocks)
    # A version-1 block holds 0.1.0's modules (e3nn's spherical harmonics module, the TensorFilter).
    assert all(hasattr(block, "harmonics") == (version == 1) for block in blocks)
    prediction = adapter.predict(copy.deepcopy(model), FRAMES)
    energy = torch.tensor(expected["energy"], dtype=torch.float64)
    forces = torch.tensor(expected["forces"], dtype=torch.float64)
    assert (prediction.energy.double() - energy).abs().max() < 1e-10
    assert (prediction.forces.double() - forces).abs().max() < 1e-10
    # The NequIP checkpoint rebuilds the model from its stored config, whose GGND options name no version:
    # it is read as version 1 and says so; pickled files carry their version silently.
    versionless = [w for w in caught if issubclass(w.category, GGNDVersionWarning)]
    assert bool(versionless) == (release == "0.1.0" and name.endswith(".ckpt"))


def test_a_resaved_0_1_0_model_stays_version_1(tmp_path):
    adapter, model, expected, _ = _load("mace_ggnd.model")
    path = adapter.save(model, tmp_path / "again.model")
    again = adapter.load(path)
    assert again.ggnd.config.version == 1 and hasattr(again.ggnd, "harmonics")
    prediction = adapter.predict(again, FRAMES)
    assert (prediction.energy - torch.tensor(expected["energy"])).abs().max() < 1e-10


def test_a_0_1_0_model_predicts_as_before_in_a_fresh_process():
    """Nothing of this test session (imports, e3nn state) helps the old file load."""
    name = "schnetpack_ggnd_best_model"
    code = (
        "import json, sys; from pathlib import Path; from ase.io import read; "
        "from ggnd_plugin.registry import resolve; "
        f"path = Path({str(FILES / name)!r}); adapter = resolve('auto', path); "
        "model = adapter.load(path); "
        f"frames = read({str(REPO / 'ggnd_plugin' / 'default_data' / '3bpa' / '3bpa_300K_test.xyz')!r}, ':3'); "
        "print(json.dumps(adapter.predict(model, frames).energy.tolist()))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    energy = json.loads(result.stdout.strip().splitlines()[-1])
    reference = PREDICTIONS["files"][name]["energy"]
    assert max(abs(a - b) for a, b in zip(energy, reference, strict=True)) < 1e-10


def test_config_versions_read_from_mappings_pickles_and_state_dicts():
    from ggnd_plugin.block import FeatureSpec

    assert GGNDConfig().version == 2
    with pytest.warns(GGNDVersionWarning, match="version 1"):
        assert GGNDConfig.from_dict({"channels": 8, "heads": 2}).version == 1
    assert GGNDConfig.from_dict({"channels": 8, "heads": 2, "version": 2}).version == 2
    # A config pickled by 0.1.0 has no version attribute at all.
    old = GGNDConfig(channels=8, heads=2)
    del old.__dict__["version"]
    assert pickle.loads(pickle.dumps(old)).version == 1
    spec = FeatureSpec({"x": "4x0e+4x1o"}, num_species=2)
    legacy = GGNDBlock(spec, GGNDConfig(channels=8, heads=2, version=1))
    assert isinstance(legacy.filter, TensorFilter) and not hasattr(legacy, "numerics_version")
    assert int(GGNDBlock(spec, GGNDConfig(channels=8, heads=2)).numerics_version) == 2
    # 0.2.0 pickled version-1 blocks as ggnd_plugin.block_v1.LegacyGGNDBlock: the name still resolves.
    from ggnd_plugin.block_v1 import LegacyGGNDBlock

    assert LegacyGGNDBlock is GGNDBlock
    # Weights of one version never load silently into a block of the other.
    new = GGNDBlock(spec, GGNDConfig(channels=8, heads=2))
    legacy = GGNDBlock(spec, GGNDConfig(channels=8, heads=2, version=1))
    with pytest.raises(RuntimeError, match="version-1 GGND block.*built as version 2"):
        new.load_state_dict(legacy.state_dict())
    with pytest.raises(RuntimeError, match="version-2 GGND block.*built as version 1"):
        legacy.load_state_dict(new.state_dict())
