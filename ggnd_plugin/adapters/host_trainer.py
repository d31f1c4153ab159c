"""A host's own training command, run as a subprocess for ``HostAdapter.fit``.

``fit`` is the same for every host (:meth:`ggnd_plugin.adapters.base.HostAdapter.fit`); what differs
is described here: the request (:class:`FitRequest`), the host's trainer (:class:`HostTrainer`: its
name, log file and the line it prints per epoch) and one run of it (:class:`TrainerCommand`: the
command line, where it runs, the model file it writes). :func:`run_trainer` runs the command with its
output going to a log file and its epoch lines driving a progress bar; the trainer dies with the
process that started it (:func:`die_with_parent`). The work folder a fit runs in is
:mod:`ggnd_plugin.host_fit`'s.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ggnd_plugin.block import GGNDConfig

__all__ = ["FitRequest", "HostTrainer", "TrainerCommand", "die_with_parent", "run_trainer"]


@dataclass(frozen=True)
class FitRequest:
    """What :meth:`HostAdapter.fit` was asked for (its arguments; ``work_dir`` absolute)."""

    train: Path
    valid: Path
    work_dir: Path
    config: GGNDConfig | None
    epochs: int
    seed: int
    size: str
    device: str = "cpu"
    patience: int | None = None


@dataclass(frozen=True)
class TrainerCommand:
    """One run of a host's trainer.

    Attributes:
        argv: the command line.
        model_path: the trained model the run writes (what ``fit`` loads).
        cwd: where it runs (None: here).
        env: its whole environment (None: this process's).
        header: the log's first line (None: the command line as JSON).
    """

    argv: list[str]
    model_path: Path
    cwd: Path | None = None
    env: dict[str, str] | None = None
    header: str | None = None


@dataclass(frozen=True)
class HostTrainer:
    """A host's training command as ``fit`` sees it.

    Attributes:
        name: how messages and the progress bar name it (``nequip-train``).
        log_name: its log file in the work folder; also what marks a folder as an earlier fit of an
            older ggnd-plugin.
        epoch_line: regular expression for its line at the end of an epoch (see :func:`run_trainer`).
        tail_lines: lines of the log a failure report shows.
    """

    name: str
    log_name: str
    epoch_line: str
    tail_lines: int = 15

    def run(
        self,
        argv: list[str],
        work_dir: Path,
        epochs: int | None,
        label: str,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        header: str | None = None,
    ) -> None:
        """Run ``argv`` with its output going to ``work_dir / log_name``; see :func:`run_trainer`."""
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        run_trainer(
            argv,
            work_dir / self.log_name,
            trainer=self.name,
            label=label,
            epochs=epochs,
            epoch_line=self.epoch_line,
            cwd=cwd,
            env=env,
            header=header,
            tail_lines=self.tail_lines,
        )


def die_with_parent() -> None:
    """``preexec_fn`` for trainer subprocesses: SIGKILL the child when its parent dies (Linux only).

    Without it a SIGKILLed ``ggnd`` (or demo) leaves the trainer running, still writing into the work
    folder while the user restarts the fit there.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def run_trainer(
    command: list[str],
    log: Path,
    *,
    trainer: str,
    label: str,
    epochs: int | None,
    epoch_line: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    header: str | None = None,
    tail_lines: int = 15,
) -> None:
    """Run a host's trainer with its output going to ``log`` and a progress bar of its epochs.

    ``epoch_line`` is a regular expression for the trainer's line at the end of an epoch: group 1 the
    epoch (counted from 0), and a group named ``loss``, when it matched, the validation figure shown next
    to the bar. A failed trainer raises :class:`GGNDError` with the end of its log; Ctrl-C stops it.
    The trainer runs unbuffered (added to ``env``, default this process's environment), so each epoch
    line arrives when it is logged rather than when a pipe buffer fills.
    """
    import os
    import subprocess

    from tqdm import tqdm

    from ggnd_plugin.errors import GGNDError

    pattern = re.compile(epoch_line)
    with open(log, "w") as handle, tqdm(total=epochs, desc=f"{label} ({trainer})", unit="epoch") as bar:
        handle.write((json.dumps(command) if header is None else header) + "\n")
        handle.flush()
        process = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(os.environ if env is None else env, PYTHONUNBUFFERED="1"),
            text=True,
            preexec_fn=die_with_parent,
        )
        assert process.stdout is not None
        try:
            for line in process.stdout:
                handle.write(line)
                match = pattern.search(line)
                if match:
                    bar.update(int(match.group(1)) + 1 - bar.n)
                    if "loss" in pattern.groupindex and match.group("loss"):
                        bar.set_postfix(valid_loss=float(match.group("loss")))
            returncode = process.wait()
        finally:
            if process.poll() is None:  # interrupted (Ctrl-C): do not leave the training running
                process.terminate()
                process.wait()
    if returncode != 0:
        tail = log.read_text().splitlines()[-tail_lines:]
        raise GGNDError(f"{trainer} failed (exit {returncode}); end of {log}:\n" + "\n".join(tail))
