"""Write model files with a GGND block as a release of ggnd-plugin wrote them, and their predictions.

Users keep model files written by every release; the compatibility tests
(tests/test_block_compatibility.py) load the files written by each release with the current code and
check that they predict what that release predicted, to 1e-10 in float64. Run this script once, on the
code of the release, into its folder:

- ``tests/data/v1/``: ggnd-plugin 0.1.0 (GGND numerics version 1), run on commit 2643144::

      git worktree add /tmp/ggnd-0.1.0 2643144
      cd /tmp/ggnd-0.1.0 && /path/to/.venv/bin/python tests/data/make_model_files.py OUT_DIR

  (0.1.0's GGNDConfig has no ``version``: drop ``version: 2`` from nequip_ggnd_train.yaml there.)
  Releases before 0.3 have no ``ggnd_plugin/testing.py`` (the tiny host models): copy it there too.
- ``tests/data/v0.2.0/``: ggnd-plugin 0.2.0 (numerics version 2, the module paths before the 0.3
  reorganisation), run on commit c8eef82 with ``--release 0.2.0``, which also re-saves the 0.1.0 files
  under 0.2.0 (a version-1 block pickled by 0.2.0 names ``ggnd_plugin.block_v1.LegacyGGNDBlock``).

Files (all float64, tiny, GGND weights perturbed so the block changes every prediction):
- ``mace_ggnd.model``: a random ScaleShiftMACE upgraded with GGND (``MACEAdapter.save``).
- ``nequip_ggnd.ckpt``: one epoch of ``nequip-train`` with ``GGNDNequIPModel`` on 10 frames, its GGND
  weights perturbed in the checkpoint's state dict; ``nequip_ggnd.nequip.zip``: that model packaged.
- ``schnetpack_ggnd_best_model``: a random PaiNN upgraded with GGND (``SchNetPackAdapter.save``).
- with ``--release 0.2.0``: ``mace_ggnd_v1_resaved.model``, ``nequip_ggnd_v1_resaved.nequip.zip`` and
  ``schnetpack_ggnd_v1_resaved_best_model``: the 0.1.0 files of ``tests/data/v1`` loaded and saved again.
- ``predictions.json``: energies and forces of each file (``adapter.predict``) on three frames of the
  package's own 3BPA data (``3bpa_300K_test.xyz``).
"""

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from ase.io import read, write

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO / "ggnd_plugin" / "default_data" / "3bpa"
FRAMES = (DEFAULT_DATA / "3bpa_300K_test.xyz", ":3")


def perturb_block(block, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def mace_file(out: Path) -> Path:
    from ggnd_plugin.adapters.mace import MACEAdapter
    from ggnd_plugin.block import GGNDConfig
    from ggnd_plugin.testing import tiny_mace

    model = tiny_mace()
    adapter = MACEAdapter()
    torch.manual_seed(1)
    upgraded = adapter.attach(model, GGNDConfig(channels=8, heads=2, steps=2, lmax=2))
    perturb_block(upgraded.ggnd, seed=11)
    return adapter.save(upgraded, out / "mace_ggnd.model")


def nequip_files(out: Path) -> tuple[Path, Path]:
    from ggnd_plugin.adapters.nequip import NequIPAdapter

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        frames = read(DEFAULT_DATA / "3bpa_300K_train.xyz", ":12")
        write(work / "train.xyz", frames[:10])
        write(work / "test.xyz", frames[10:])
        config = REPO / "tests" / "data" / "nequip_ggnd_train.yaml"
        subprocess.run(
            [
                str(Path(sys.executable).parent / "nequip-train"),
                "-cp",
                str(config.parent),
                "-cn",
                config.stem,
                f"hydra.run.dir={work / 'run'}",
                f"train_file={work / 'train.xyz'}",
                f"test_file={work / 'test.xyz'}",
            ],
            cwd=work,
            check=True,
            capture_output=True,
        )
        checkpoint = torch.load(work / "run" / "best.ckpt", map_location="cpu", weights_only=False)
    # Perturb the GGND parameters both where training keeps them and in the EMA copies that nequip loads
    # for evaluation (ema_weight_k follows the order of model.parameters()); buffers stay as they are.
    adapter = NequIPAdapter()
    torch.save(checkpoint, out / "nequip_ggnd.ckpt")
    names = [name for name, _ in adapter.load(out / "nequip_ggnd.ckpt").named_parameters()]
    generator = torch.Generator().manual_seed(12)
    state = checkpoint["state_dict"]
    for index, name in enumerate(names):
        if ".ggnd." in name:
            key = "model.sole_model." + name
            noise = 0.2 * torch.randn(state[key].shape, generator=generator, dtype=state[key].dtype)
            state[key] = state[key] + noise
            ema = f"ema.ema_weight_{index}"
            if ema in state:
                state[ema] = state[ema] + noise
    ckpt = out / "nequip_ggnd.ckpt"
    torch.save(checkpoint, ckpt)
    model = adapter.load(ckpt)
    package = adapter.save(model, out / "nequip_ggnd.nequip.zip")
    return ckpt, package


def schnetpack_file(out: Path) -> Path:
    from ggnd_plugin.adapters.schnetpack import SchNetPackAdapter
    from ggnd_plugin.block import GGNDConfig
    from ggnd_plugin.testing import tiny_schnetpack

    model = tiny_schnetpack("painn")
    adapter = SchNetPackAdapter()
    torch.manual_seed(3)
    upgraded = adapter.attach(model, GGNDConfig(channels=8, heads=2, steps=2, solver="rk4"))
    for block in adapter.ggnd_blocks(upgraded):
        perturb_block(block, seed=13)
    return adapter.save(upgraded, out / "schnetpack_ggnd_best_model")


def resaved_v1_files(out: Path) -> list[Path]:
    """The 0.1.0 files loaded and saved again by this release (their blocks stay version 1)."""
    from ggnd_plugin.registry import resolve

    v1 = REPO / "tests" / "data" / "v1"
    targets = {
        "mace_ggnd.model": "mace_ggnd_v1_resaved.model",
        "nequip_ggnd.ckpt": "nequip_ggnd_v1_resaved.nequip.zip",
        "schnetpack_ggnd_best_model": "schnetpack_ggnd_v1_resaved_best_model",
    }
    written = []
    for source, target in targets.items():
        adapter = resolve("auto", v1 / source)
        written.append(adapter.save(adapter.load(v1 / source), out / target))
    return written


def main(out: Path, release: str) -> None:
    from ggnd_plugin.registry import resolve

    torch.set_default_dtype(torch.float64)
    out.mkdir(parents=True, exist_ok=True)
    files = [mace_file(out), *nequip_files(out), schnetpack_file(out)]
    if release != "0.1.0":
        files += resaved_v1_files(out)
    frames = read(str(FRAMES[0]), FRAMES[1])
    predictions = {
        "release": release,
        "frames": f"ggnd_plugin/default_data/3bpa/{FRAMES[0].name}[{FRAMES[1]}]",
        "files": {},
    }
    for path in files:
        adapter = resolve("auto", path)
        model = adapter.load(path)
        prediction = adapter.predict(copy.deepcopy(model), frames)
        predictions["files"][path.name] = {
            "host": adapter.name,
            "energy": prediction.energy.tolist(),
            "forces": prediction.forces.tolist(),
        }
        print(path.name, adapter.name, prediction.energy.tolist())
    (out / "predictions.json").write_text(json.dumps(predictions, indent=1))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (e.g. tests/data/v0.2.0)")
    parser.add_argument("--release", default="0.1.0", help="the release whose code runs this script")
    arguments = parser.parse_args()
    main(arguments.out, arguments.release)
