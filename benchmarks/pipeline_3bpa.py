"""What the 3BPA benchmark (``paper_3bpa.py``) and the pre-registered study (``study_3bpa.py``) share.

The seeded split of the DFT 3BPA data with its labelled tests and isolated-atom energies, the stage
cache of both pipelines, and the edit of MACE training command lines. Both scripts import this module;
it imports neither of them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ggnd_plugin.safe_io import atomic_path, atomic_write_text

LABELLED_TESTS = ("300K", "600K")


def say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"[paper_3bpa] {message}")


def stage_cache(out: Path, name: str):
    """The cached result of one step of a pipeline in ``out`` (the demo's stage cache)."""
    from ggnd_plugin.demo import _Stage

    return _Stage(out, name)


def prepare_data(args) -> dict[str, Path]:
    """Seeded train/valid split of train_300K; (subsets of) the labelled test sets; E0s."""
    from ase.io import read, write

    from ggnd_plugin.data import read_labelled

    folder = args.out / "data"
    paths = {name: folder / f"{name}.xyz" for name in ("train", "valid", "test_300K", "test_600K")}
    paths["e0s"] = folder / "e0s.json"
    if all(p.exists() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    frames = read_labelled(args.data / "train_300K.xyz")
    random.Random(args.seed).shuffle(frames)
    if args.train_frames:
        frames = frames[: args.train_frames]
    n_valid = max(2, round(args.valid_fraction * len(frames)))
    parts = {"valid": frames[:n_valid], "train": frames[n_valid:]}
    for t in LABELLED_TESTS:
        test = read_labelled(args.data / f"test_{t}.xyz")
        if args.test_frames and args.test_frames < len(test):
            test = random.Random(args.seed + 1).sample(test, args.test_frames)
        parts[f"test_{t}"] = test
    for name, part in parts.items():
        with atomic_path(paths[name]) as tmp:
            write(tmp, part, format="extxyz")
    e0s = {}
    for atoms in read(args.data / "iso_atoms.xyz", ":"):
        energy = atoms.info.get("energy")
        if energy is None:
            energy = atoms.get_potential_energy()
        e0s[int(atoms.numbers[0])] = float(energy)
    atomic_write_text(paths["e0s"], json.dumps(e0s))
    say(f"data: {len(frames) - n_valid} train, {n_valid} valid frames; E0s {e0s}")
    return paths


def set_option(command: list[str], key: str, value) -> list[str]:
    flag = f"--{key}"
    command = list(command)
    if flag in command:
        command[command.index(flag) + 1] = str(value)
    else:
        command += [flag, str(value)]
    return command
