"""Study 2, after the fact (not pre-registered): is the energy error that fine-tuning added a constant offset?

For every model of the study (base, upgrade, control per base seed) this prints and writes the mean
signed per-atom energy error on the validation split and its spread (standard deviation); an offset
shows as a mean far from zero with the base model's spread. Reads the study's cache (``--out``, as
``benchmarks/study_upgrade.py``); writes ``benchmarks/results/study_upgrade_energy_offset.json``.

    .venv/bin/python benchmarks/study_upgrade_energy_offset.py --out build/study_upgrade
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import study_upgrade_protocol as study

RESULTS = study.ROOT / "benchmarks" / "results" / "study_upgrade_energy_offset.json"


def signed_errors(model_file: Path, frames) -> np.ndarray:
    """Per-atom energy error (meV/atom, predicted minus reference) of every frame."""
    from ggnd_plugin.registry import resolve

    adapter = resolve(None, model_file)
    model = adapter.load(model_file)
    errors = []
    for start in range(0, len(frames), 10):
        batch = frames[start : start + 10]
        predicted = adapter.predict(model, batch).energy.detach().double().numpy()
        reference = np.array([atoms.get_potential_energy() for atoms in batch])
        errors.append((predicted - reference) / np.array([len(atoms) for atoms in batch]))
    return np.concatenate(errors) * 1e3


def main(argv=None) -> int:
    import torch
    from ase.io import read

    from ggnd_plugin.safe_io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=study.ROOT / "build" / "study_upgrade")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    frames = read(args.out / "data" / "valid.xyz", ":")
    rows = []
    for seed in study.BASE_SEEDS:
        for arm in ("base", "upgrade", "control"):
            errors = signed_errors(study.model_path(args.out, arm, seed), frames)
            row = {
                "model": f"{arm}-s{seed}",
                "mean_signed_meV_per_atom": float(errors.mean()),
                "std_meV_per_atom": float(errors.std()),
                "mae_meV_per_atom": float(np.abs(errors).mean()),
            }
            rows.append(row)
            print(
                f"{row['model']:>12}: mean signed {row['mean_signed_meV_per_atom']:+6.2f}, spread "
                f"{row['std_meV_per_atom']:.2f}, MAE {row['mae_meV_per_atom']:.2f} meV/atom",
                flush=True,
            )
    payload = {
        "what": "signed per-atom energy error of every study-2 model on the validation split (post hoc)",
        "frames": len(frames),
        **{k: v for k, v in study.code_state().items() if k in ("code_commit", "code_dirty")},
        "models": rows,
    }
    atomic_write_text(args.results, json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
