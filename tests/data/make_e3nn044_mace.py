"""Write tests/data/mace_e3nn044.model and its predictions, pickled under e3nn 0.4.4.

Every model trained with a stock mace-torch 0.3.x install (which pins e3nn==0.4.4) is a file like this
one; e3nn 0.6 cannot unpickle it directly, and ggnd-plugin converts it exactly. Run it in a separate
environment (not the project's), e.g.:

    python3.12 -m venv /tmp/venv-e3nn044
    /tmp/venv-e3nn044/bin/python -m pip install uv
    /tmp/venv-e3nn044/bin/python -m uv pip install --python /tmp/venv-e3nn044/bin/python \
        torch==2.13.0 mace-torch==0.3.16 e3nn==0.4.4
    PYTHONPATH=. /tmp/venv-e3nn044/bin/python tests/data/make_e3nn044_mace.py

(run from the repository root: ``ggnd_plugin.testing`` builds the model; it imports no e3nn 0.6 API).
The predictions are MACE's own (MACECalculator) on three frames of the package's 3BPA data, in float64.
"""

import json
import os
from importlib.metadata import version
from pathlib import Path

# e3nn 0.4.4 reads its own constants with torch.load, which torch >= 2.6 refuses unless told (mace sets
# this on import too, but e3nn must see it first).
os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"

import torch  # noqa: E402
from ase.io import read  # noqa: E402
from mace.calculators import MACECalculator  # noqa: E402

from ggnd_plugin.default_data import default_data_path  # noqa: E402
from ggnd_plugin.testing import tiny_mace  # noqa: E402

HERE = Path(__file__).resolve().parent
FRAMES = {"file": "3bpa_300K_test.xyz", "index": ":3"}


def main() -> None:
    assert version("e3nn") == "0.4.4", f"run this under e3nn 0.4.4, found {version('e3nn')}"
    model = tiny_mace(
        seed=2024,
        max_ell=2,
        correlation=3,
        atomic_inter_scale=0.7,
        atomic_inter_shift=0.01,
    )
    torch.save(model, HERE / "mace_e3nn044.model")  # as mace_run_train saves *.model files

    calculator = MACECalculator(model_paths=str(HERE / "mace_e3nn044.model"), default_dtype="float64")
    energies, forces = [], []
    for atoms in read(default_data_path(FRAMES["file"]), FRAMES["index"]):
        atoms.calc = calculator
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces().tolist())
    record = {
        "written_by": "tests/data/make_e3nn044_mace.py",
        "versions": {name: version(name) for name in ("e3nn", "mace-torch", "torch")},
        "atomic_numbers": [1, 6, 7, 8],
        "frames": FRAMES,
        "energy": energies,
        "forces": forces,
    }
    (HERE / "mace_e3nn044_predictions.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
