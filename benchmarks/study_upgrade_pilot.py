"""Pilot of the upgrade study (issue 19): how long must fine-tuning run? Not part of the study's analysis.

One base model, trained exactly as the study's base models will be (a tiny MACE through MACE's own
trainer on the 3BPA DFT split of the 0.2.0 study, patience 15, at most 150 epochs) but with a seed the
study does not use, is fine-tuned in both arms for a fixed number of epochs with the package defaults
(Adam, lr 1e-3, batch 4, energy weight 1, forces weight 10): (a) upgraded with the default GGND block,
(b) without a block. The validation force MAE of every epoch and the time per epoch decide the
fine-tuning rule of the protocol (docs/study2-protocol.md, "Pilot"). Writes ``--out/pilot.json``; resumes
(the base fit through MACE's checkpoints, each arm from its ``ggnd finetune`` checkpoint).

    .venv/bin/python benchmarks/study_upgrade_pilot.py --out build/study_upgrade_pilot
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DFT = ROOT.parent / "shared" / "data" / "3bpa"  # developer-only data beside the checkout
PILOT_SEED = 99  # not one of the study's base-model seeds
SPLIT_SEED, VALID_FRAMES = 0, 50


def one_thread() -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def split(out: Path) -> dict[str, Path]:
    from ase.io import read, write

    from ggnd_plugin.data import read_labelled

    folder = out / "data"
    paths = {"train": folder / "train.xyz", "valid": folder / "valid.xyz", "e0s": folder / "e0s.json"}
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    frames = read_labelled(DFT / "train_300K.xyz")
    random.Random(SPLIT_SEED).shuffle(frames)
    write(paths["valid"], frames[:VALID_FRAMES], format="extxyz")
    write(paths["train"], frames[VALID_FRAMES:], format="extxyz")
    e0s = {int(a.numbers[0]): float(a.get_potential_energy()) for a in read(DFT / "iso_atoms.xyz", ":")}
    paths["e0s"].write_text(json.dumps(e0s))
    return paths


def fit_base(out: Path, data: dict[str, Path]) -> dict:
    from ggnd_plugin.adapters.host_trainer import FitRequest
    from ggnd_plugin.adapters.mace.training import fit_command, run_fit

    record = out / "base.json"
    if record.exists():
        return json.loads(record.read_text())
    one_thread()
    work = out / "base"
    command, path = fit_command(
        FitRequest(data["train"], data["valid"], work, None, 150, PILOT_SEED, "tiny", patience=15)
    )
    e0s = json.loads(data["e0s"].read_text())
    flag = command.index("--E0s") if "--E0s" in command else None
    value = "{" + ", ".join(f"{z}: {e}" for z, e in e0s.items()) + "}"
    if flag is None:
        command += ["--E0s", value]
    else:
        command[flag + 1] = value
    command.append("--restart_latest")
    started = time.perf_counter()
    run_fit(command, work, 150, label="pilot-base")
    result = {"path": str(path), "seconds": time.perf_counter() - started}
    record.write_text(json.dumps(result))
    return result


def finetune_arm(out: str, base: str, data: dict, arm: str, epochs: int) -> dict:
    one_thread()
    import torch

    from ggnd_plugin.block import GGNDConfig
    from ggnd_plugin.data import read_labelled
    from ggnd_plugin.registry import resolve
    from ggnd_plugin.training import FinetuneSettings, finetune

    out = Path(out)
    adapter = resolve("auto", Path(base))
    model = adapter.load(Path(base))
    if arm == "upgrade":
        torch.manual_seed(0)
        model = adapter.attach(model, GGNDConfig())
    train, valid = read_labelled(Path(data["train"])), read_labelled(Path(data["valid"]))
    settings = FinetuneSettings(epochs=epochs, lr=1e-3, batch_size=4, seed=0)
    started = time.perf_counter()
    result = finetune(
        adapter, model, train, valid, out / f"{arm}.model", settings, resume=True, progress=False
    )
    return {
        "arm": arm,
        "seconds": time.perf_counter() - started,
        "history": [vars(r) for r in result.history],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "study_upgrade_pilot")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = split(args.out)
    base = fit_base(args.out, data)
    plain = {k: str(v) for k, v in data.items()}
    with ProcessPoolExecutor(2) as pool:
        futures = [
            pool.submit(finetune_arm, str(args.out), base["path"], plain, arm, args.epochs)
            for arm in ("upgrade", "control")
        ]
        arms = [f.result() for f in futures]
    payload = {"base": base, "epochs": args.epochs, "arms": arms}
    (args.out / "pilot.json").write_text(json.dumps(payload, indent=1))
    for arm in arms:
        maes = [round(r["valid_forces_mae"] * 1e3, 1) for r in arm["history"]]
        print(arm["arm"], f"{arm['seconds'] / max(1, len(maes)):.0f} s/epoch", maes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
