"""Write tests/data/mace_e3nn044.model and its predictions, pickled under e3nn 0.4.4.

Every model trained with a stock mace-torch 0.3.x install (which pins e3nn==0.4.4) is a file like this
one; e3nn 0.6 cannot unpickle it directly, and ggnd-plugin converts it exactly. Run it in a separate
environment (not the project's), e.g.:

    python3.12 -m venv /tmp/venv-e3nn044
    /tmp/venv-e3nn044/bin/python -m pip install uv
    /tmp/venv-e3nn044/bin/python -m uv pip install --python /tmp/venv-e3nn044/bin/python \
        torch==2.13.0 mace-torch==0.3.16 e3nn==0.4.4
    /tmp/venv-e3nn044/bin/python tests/data/make_e3nn044_mace.py ../shared/data/3bpa

The predictions are MACE's own (MACECalculator) on three 3BPA frames, in float64.
"""

import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

# e3nn 0.4.4 reads its own constants with torch.load, which torch >= 2.6 refuses unless told (mace sets
# this on import too, but e3nn must see it first).
os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ase.io import read  # noqa: E402
from e3nn import o3  # noqa: E402
from mace import modules  # noqa: E402
from mace.calculators import MACECalculator  # noqa: E402
from mace.tools import torch_tools  # noqa: E402

HERE = Path(__file__).resolve().parent
FRAMES = {"file": "test_300K.xyz", "index": ":3"}


def main(data_dir: Path) -> None:
    assert version("e3nn") == "0.4.4", f"run this under e3nn 0.4.4, found {version('e3nn')}"
    with torch_tools.default_dtype(torch.float64):
        torch.manual_seed(2024)
        interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
        model = modules.ScaleShiftMACE(
            r_max=4.0,
            num_bessel=4,
            num_polynomial_cutoff=5,
            max_ell=2,
            interaction_cls=interaction,
            interaction_cls_first=interaction,
            num_interactions=2,
            num_elements=4,
            hidden_irreps=o3.Irreps("8x0e+8x1o"),
            MLP_irreps=o3.Irreps("4x0e"),
            atomic_energies=np.array([-13.6, -1029.5, -1485.0, -2042.0]),
            avg_num_neighbors=8.0,
            atomic_numbers=[1, 6, 7, 8],
            correlation=3,
            gate=torch.nn.functional.silu,
            atomic_inter_scale=0.7,
            atomic_inter_shift=0.01,
        )
    model = model.eval()
    torch.save(model, HERE / "mace_e3nn044.model")  # as mace_run_train saves *.model files

    calculator = MACECalculator(model_paths=str(HERE / "mace_e3nn044.model"), default_dtype="float64")
    energies, forces = [], []
    for atoms in read(Path(data_dir) / FRAMES["file"], FRAMES["index"]):
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
    beside_checkout = Path(__file__).resolve().parents[3] / "shared" / "data" / "3bpa"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else beside_checkout)
