"""host_trainer.run_trainer: the one place the three adapters run their host's trainer (log, progress, errors)."""

from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr

import pytest

from ggnd_plugin.adapters.host_trainer import run_trainer
from ggnd_plugin.adapters.schnetpack.training import _EPOCH_LINE as SPK_EPOCH_LINE
from ggnd_plugin.errors import GGNDError


def _trainer(lines: list[str], exit_code: int) -> list[str]:
    script = "import sys\n" + "".join(f"print({line!r})\n" for line in lines) + f"sys.exit({exit_code})\n"
    return [sys.executable, "-c", script]


def test_log_and_progress_follow_the_trainers_epoch_lines(tmp_path):
    lines = [
        "setting up",
        "Epoch 0, global step 4: 'val_loss' reached 0.51 (best 0.51), saving",
        "Epoch 1, global step 8: 'val_loss' was not in top 1",
        "Epoch 2, global step 12: 'val_loss' reached 0.25 (best 0.25), saving",
    ]
    log = tmp_path / "fit.log"
    stderr = io.StringIO()
    with redirect_stderr(stderr):
        run_trainer(
            _trainer(lines, 0), log, trainer="spktrain", label="painn", epochs=5, epoch_line=SPK_EPOCH_LINE
        )
    written = log.read_text().splitlines()
    assert written[1:] == lines  # line 0 is the command
    progress = stderr.getvalue()
    assert "painn (spktrain)" in progress and "3/5" in progress and "valid_loss=0.25" in progress


def test_a_failed_trainer_raises_with_the_end_of_its_log(tmp_path):
    lines = [f"line {k}" for k in range(30)]
    log = tmp_path / "fit.log"
    with pytest.raises(
        GGNDError, match=r"(?s)nequip-train failed \(exit 3\); end of .*fit.log:\nline 10\n.*line 29$"
    ):
        run_trainer(
            _trainer(lines, 3),
            log,
            trainer="nequip-train",
            label="x",
            epochs=None,
            epoch_line=r"Epoch (\d+)",
            tail_lines=20,
        )
    assert log.read_text().splitlines()[-1] == "line 29"
