"""The work folder of a host fit (``HostAdapter.fit``): who owns it, and what a restart removes.

A fit runs the host's own trainer (``ggnd-mace-train``, ``nequip-train``, ``spktrain``) in a subprocess
that writes into ``work_dir``. None of the three trainers saves the state of its data-order random
numbers in its checkpoints, so continuing from one would not give the model an uninterrupted fit gives.
A fit that was stopped (killed, out of memory, Ctrl-C) therefore *restarts from scratch* in the same
folder: the outputs of the earlier attempt (and only those) are removed first, so no stale or
half-written host file can be picked up, and the result equals an uninterrupted fit wherever the
host's training is deterministic (it is for the three hosts on the CPU; see tests/test_fault_injection.py).

The folder must be new or empty, or hold an earlier fit (a ``.ggnd-fit.json`` record, or the host's log
from an older ggnd-plugin); inputs inside it are allowed and never removed. It is locked while the fit
runs, and the trainer is killed with the process that started it (Linux,
:func:`ggnd_plugin.adapters.host_trainer.die_with_parent`), so a killed parent never leaves a trainer
writing into a folder that the next attempt is cleaning.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from ggnd_plugin.errors import OutputExistsError
from ggnd_plugin.safe_io import atomic_write_json, ignorable, output_lock, same_file

RECORD = ".ggnd-fit.json"


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


@contextlib.contextmanager
def fit_work_dir(
    work_dir: str | Path,
    host: str,
    outputs: Iterable[str],
    inputs: Iterable[str | Path],
    legacy_marks: Iterable[str] = (),
) -> Iterator[Path]:
    """Hold ``work_dir`` for one fit: check it, lock it, remove an earlier attempt's ``outputs``.

    ``outputs`` are names or glob patterns relative to ``work_dir`` that the host's trainer (or the
    adapter) writes; ``legacy_marks`` are files whose presence shows an earlier fit by an older
    ggnd-plugin. The record file says ``running`` during the fit and ``done`` after it.
    """
    work_dir = Path(work_dir)
    inputs = [Path(p) for p in inputs if p is not None]
    for path in inputs:
        if same_file(path, work_dir):
            raise OutputExistsError(f"the {host} fit work folder {work_dir} is an input; choose a folder")
    if work_dir.exists() and not work_dir.is_dir():
        raise OutputExistsError(f"the {host} fit work folder {work_dir} is a file; choose a folder")
    own = (work_dir / RECORD).exists() or any((work_dir / mark).exists() for mark in legacy_marks)
    if work_dir.is_dir() and not own:
        input_names = {p.name for p in inputs if p.parent.resolve() == work_dir.resolve()}
        foreign = sorted(
            e.name for e in work_dir.iterdir() if not ignorable(e.name) and e.name not in input_names
        )
        if foreign:
            shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
            raise OutputExistsError(
                f"the {host} fit work folder {work_dir} holds files of something else ({shown}); give a new "
                "or empty folder (an earlier fit's folder is restarted)"
            )
    with output_lock(work_dir):
        for pattern in outputs:
            for path in sorted(work_dir.glob(pattern)):
                if any(_inside(item, path) for item in inputs):
                    raise OutputExistsError(
                        f"{path} would be removed to restart the {host} fit, but it holds an input; move the "
                        "input out of the work folder"
                    )
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        record = {"host": host, "status": "running", "started": time.time()}
        atomic_write_json(work_dir / RECORD, record, indent=1)
        yield work_dir
        atomic_write_json(work_dir / RECORD, {**record, "status": "done", "finished": time.time()}, indent=1)


def fit_status(work_dir: str | Path) -> str | None:
    """``running`` (or stopped), ``done``, or None when ``work_dir`` holds no fit record."""
    try:
        return json.loads((Path(work_dir) / RECORD).read_text()).get("status")
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    """``python -m ggnd_plugin.host_fit MODULE:FUNCTION SCRIPT [ARGS...]``: run a host's command-line
    entry point with every ``torch.save(obj, path)`` made atomic.

    spktrain saves its ``best_model`` with a plain ``torch.save``; run through here, a kill during that
    save leaves the previous file, never a truncated one. ``SCRIPT`` becomes ``sys.argv[0]``.
    """
    import importlib

    from ggnd_plugin.safe_io import atomic_torch_saves

    argv = list(sys.argv[1:] if argv is None else argv)
    target, script, arguments = argv[0], argv[1], argv[2:]
    module_name, _, function_name = target.partition(":")
    function = getattr(importlib.import_module(module_name), function_name)
    sys.argv = [script, *arguments]
    with atomic_torch_saves():
        result = function()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
