"""What docs/study2-protocol.md fixes for study 2: its settings, and where its jobs keep their results.

The pipeline (``study_upgrade.py``) and its report (``study_upgrade_report.py``) import this module; it
imports neither.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = "docs/study2-protocol.md"
DFT = ROOT.parent / "shared" / "data" / "3bpa"  # developer-only data beside the checkout
SMILES = "Nc1ncccc1OCc1ccccc1"
BASE_SEEDS = tuple(range(10, 16))
SIZE = "tiny"
BASE_EPOCHS, BASE_PATIENCE = 150, 15
FT_PATIENCE, FT_CAP = 10, 60  # from the pilot (docs/study2-protocol.md, "Pilot")
FT_LR, FT_BATCH, FT_SEED, UPGRADE_SEED = 1e-3, 4, 0, 0
START_SEEDS, START_FRAMES, START_SPACING_FS = (1, 2, 3, 4), 5, 1000
REPLICAS, TIME_PS, MD_SEED = 20, 10.0, 0
SPLIT_SEED, VALID_FRAMES = 0, 50
# (cell, temperature, start frames, which base seeds, which arms)
CELLS = (
    ("1200K", 1200.0, "start_1200K", BASE_SEEDS, ("upgrade", "control")),
    ("1200K", 1200.0, "start_1200K", BASE_SEEDS, ("base",)),
    ("600K", 600.0, "test_600K", (10, 11), ("upgrade", "control")),
    ("300K", 300.0, "test_300K", (10,), ("upgrade", "control")),
)
EVALUATION_SETS = ("test_300K", "test_600K", "valid")
SMOKE = os.environ.get("GGND_STUDY_SMOKE") == "1"
if SMOKE:
    BASE_SEEDS, BASE_EPOCHS, BASE_PATIENCE, FT_PATIENCE, FT_CAP = (10, 11), 2, 1, 1, 2
    START_SEEDS, START_FRAMES, START_SPACING_FS, REPLICAS, TIME_PS = (1, 2), 2, 20, 2, 0.02
    CELLS = (
        ("1200K", 1200.0, "start_1200K", BASE_SEEDS, ("upgrade", "control")),
        ("1200K", 1200.0, "start_1200K", BASE_SEEDS, ("base",)),
        ("600K", 600.0, "test_600K", (10,), ("upgrade", "control")),
    )
    EVALUATION_SETS = ("valid",)


def say(message: str) -> None:
    print(f"[study_upgrade {time.strftime('%H:%M:%S')}] {message}", flush=True)


def job_file(out: Path, name: str) -> Path:
    return out / "jobs" / f"{name}.json"


def finished(out: Path, name: str) -> dict | None:
    path = job_file(out, name)
    return json.loads(path.read_text()) if path.exists() else None


def model_path(out: Path, arm: str, seed: int) -> Path:
    return out / "models" / f"{arm}-s{seed}.model"


def code_state() -> dict[str, Any]:
    """The commit of the code about to run, and whether the working tree differs from it."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    from ggnd_plugin import __version__

    return {
        "code_commit": git("rev-parse", "HEAD"),
        "code_dirty": bool(changed),
        "package_version": __version__,
        "device": "cpu",
        "cpu_count": os.cpu_count(),
    }
