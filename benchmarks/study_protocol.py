"""What docs/study-protocol.md fixes for the pre-registered 3BPA study: its settings and its models.

Everything the protocol fixes is a constant here; nothing of it is a command-line option. The study
(``study_3bpa.py``) and its report (``study_3bpa_report.py``) import it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = "docs/study-protocol.md"
HOSTS = ("mace", "nequip")
SEEDS = (0, 1)
SIZE = "tiny"
EPOCHS = 150
PATIENCE = 15
REPLICAS = 20
TIME_PS = 10.0
MD_SEED = 0
SPLIT_SEED = 0
VALID_FRAMES = 50
PACKAGE_1200K = ROOT / "ggnd_plugin" / "default_data" / "3bpa" / "3bpa_1200K.xyz"
# (cell, temperature, start set); run in this order: the primary cell first.
CELLS = (
    ("1200K-B", 1200.0, "start_1200K_xtb"),
    ("1200K-A", 1200.0, "test_600K"),
    ("600K", 600.0, "test_600K"),
    ("300K", 300.0, "test_300K"),
)
PRIMARY = "1200K-B"
ALPHA = 0.05
# GGND_STUDY_SMOKE=1: the same pipeline at toy size (2 epochs, 2 replicas, 0.02 ps) into its own --out, to
# check the machinery; never the study.
SMOKE = os.environ.get("GGND_STUDY_SMOKE") == "1"
if SMOKE:
    EPOCHS, PATIENCE, REPLICAS, TIME_PS = 2, 1, 2, 0.02


def study_models() -> list[dict[str, Any]]:
    return [
        {"name": f"{host}{'+ggnd' if ggnd else ''}-s{seed}", "host": host, "ggnd": ggnd, "seed": seed}
        for host in HOSTS
        for ggnd in (False, True)
        for seed in SEEDS
    ]


def git_commit_of(path: str) -> str | None:
    """The commit that last changed ``path`` (the protocol), to record with the results."""
    done = subprocess.run(
        ["git", "log", "-1", "--format=%H %cI", "--", path], cwd=ROOT, capture_output=True, text=True
    )
    return done.stdout.strip() or None
