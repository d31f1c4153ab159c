"""Fit the MACE+GGND model that ``benchmarks/gpu_pass.py`` runs in its batched-stability section.

A small MACE (the adapters' ``size="small"``: 16x0e+16x1o, L=1, 2 layers, r_max 5 Å) trained from
scratch with the default GGND block (``GGNDConfig()``, numerics version 2) through the package's own
training route (``MACEAdapter.fit``, i.e. ``ggnd-mace-train``) on the package's 3BPA data (GFN2-xTB,
``3bpa_300K_train.xyz``, validated on ``3bpa_300K_test.xyz``), float64, on the CPU. The GPU pass ships
the result instead of fitting on the device: device time comes in windows of minutes, and a fitted model
makes the stability figures those of a model that holds 3BPA together at 300 K, which a random one does
not (a random model is honest for throughput only).

    .venv/bin/python benchmarks/inputs/make_gpu_pass_model.py [--epochs 40] [--work-dir build/gpu_pass_fit]

Writes ``benchmarks/inputs/mace_ggnd_3bpa_small.model`` and ``mace_ggnd_3bpa_small.json`` (how it was
made, its energy and force errors on the test frames and at 600 K). Refuses to replace them without
``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INPUTS = Path(__file__).resolve().parent
MODEL = INPUTS / "mace_ggnd_3bpa_small.model"
RECORD = MODEL.with_suffix(".json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "build" / "gpu_pass_fit")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if (MODEL.exists() or RECORD.exists()) and not args.overwrite:
        parser.error(f"{MODEL.name} already exists; pass --overwrite to replace it")

    import shutil

    import torch

    from ggnd_plugin.block import GGNDConfig
    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.default_data import default_data_path
    from ggnd_plugin.md.stability import package_versions
    from ggnd_plugin.registry import get
    from ggnd_plugin.safe_io import atomic_write_text

    adapter = get("mace")
    train, valid = default_data_path("3bpa_300K_train"), default_data_path("3bpa_300K_test")
    config = GGNDConfig()
    began = time.perf_counter()
    model = adapter.fit(train, valid, args.work_dir, config=config, epochs=args.epochs, seed=args.seed)
    fit_seconds = time.perf_counter() - began
    errors = {}
    for name in ("3bpa_300K_test", "3bpa_600K"):
        frames = read_labelled(default_data_path(name))
        prediction = adapter.predict(model, frames)
        energy = torch.tensor([a.info["energy"] for a in frames], dtype=torch.float64)
        forces = torch.cat([torch.as_tensor(a.arrays["forces"]) for a in frames])
        n_atoms = len(frames[0])
        errors[name] = {
            "energy_rmse_mev_per_atom": float(((prediction.energy - energy) / n_atoms).pow(2).mean().sqrt())
            * 1e3,
            "force_rmse_mev_per_angstrom": float((prediction.forces - forces).pow(2).mean().sqrt()) * 1e3,
        }
    shutil.copyfile(args.work_dir / "mace-ggnd.model", MODEL)
    record = {
        "what": "MACE+GGND fitted from scratch on the package's 3BPA data, for the GPU pass's batched stability",
        "command": "benchmarks/inputs/make_gpu_pass_model.py " + " ".join(argv or sys.argv[1:]),
        "host_size": "small (16x0e+16x1o, L=1, 2 interactions, correlation 2, r_max 5 Å)",
        "ggnd_config": config.to_dict(),
        "train": "ggnd_plugin/default_data/3bpa/3bpa_300K_train.xyz (250 frames)",
        "valid": "ggnd_plugin/default_data/3bpa/3bpa_300K_test.xyz (100 frames)",
        "epochs": args.epochs,
        "seed": args.seed,
        "dtype": "float64",
        "fit_seconds_cpu_wall": round(fit_seconds, 1),
        "errors": errors,
        "versions": package_versions(),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    atomic_write_text(RECORD, json.dumps(record, indent=2) + "\n")
    print(json.dumps(errors, indent=2))
    print(f"wrote {MODEL.relative_to(ROOT)} and {RECORD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
