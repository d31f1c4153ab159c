"""Stability checkpoints: their file names, their format, writing them, and reading back every entry.

A checkpoint file holds one entry per replica (plain dicts, tensors and numbers; no class of
ggnd_plugin), with the protocol, plan and monitor it was written under. Under torchrun every rank
writes its own file; a resume reads all files of a model and continues each replica from its newest
entry, whichever process wrote it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ggnd_plugin.errors import GGNDError
from ggnd_plugin.md.failure_frames import FailureFrames, check_same_settings
from ggnd_plugin.md.protocol import ReplicaSpec, StabilityProtocol
from ggnd_plugin.safe_io import atomic_torch_save, verified_torch_load

# 2: one entry per replica (1: one batched state per model). Failure frames added optional keys (the
# payload's ``failure_frames`` settings, an entry's ``frames`` ring and ``failure_frames``): a version-2
# checkpoint written before them still resumes, its replicas in flight keeping frames from then on.
CHECKPOINT_VERSION = 2


def is_done(entry: dict | None) -> bool:
    return entry is not None and entry.get("status") == "done"


def entry_progress(entry: dict | None) -> float:
    """How far an entry got: done beats any step count, a newer step beats an older one."""
    if entry is None:
        return -1.0
    return math.inf if is_done(entry) else float(entry["step"])


def checkpoint_name(model: str, rank: int | None = None, world_size: int | None = None) -> str:
    """``MODEL.pt`` for a single process, ``MODEL.rankR-of-N.pt`` for rank R of an N-rank job."""
    if rank is None or not world_size or world_size == 1:
        return f"{model}.pt"
    return f"{model}.rank{rank}-of-{world_size}.pt"


def checkpoint_files(checkpoint_dir: Path, model: str) -> list[Path]:
    """Every checkpoint of ``model`` in ``checkpoint_dir``: the single-process one and those of ranks."""
    import re

    pattern = re.compile(re.escape(model) + r"\.rank\d+-of-\d+\.pt")
    files = [checkpoint_dir / f"{model}.pt"] if (checkpoint_dir / f"{model}.pt").is_file() else []
    if checkpoint_dir.is_dir():
        files += sorted(p for p in checkpoint_dir.iterdir() if pattern.fullmatch(p.name))
    return files


def read_checkpoints(
    checkpoint_dir: Path,
    name: str,
    protocol: StabilityProtocol,
    plan,
    monitor,
    failure_frames: FailureFrames | None = None,
) -> tuple[dict[int, dict], dict[Path, dict]]:
    """The newest entry of every replica of ``name`` over all its checkpoint files, and each file's entries."""
    merged: dict[int, dict] = {}
    by_file: dict[Path, dict] = {}
    for path in checkpoint_files(checkpoint_dir, name):
        payload = verified_torch_load(path, f"stability checkpoint of model '{name}'")
        check_checkpoint(payload, name, protocol, plan, monitor, path)
        check_same_settings(payload.get("failure_frames"), failure_frames or FailureFrames(), str(path))
        by_file[path] = payload["entries"]
        for index, entry in payload["entries"].items():
            if entry_progress(entry) > entry_progress(merged.get(index)):
                merged[index] = entry
    return merged, by_file


def check_checkpoint(
    payload: dict, name: str, protocol: StabilityProtocol, plan, monitor, path: Path
) -> None:
    if not isinstance(payload, dict) or not {"model", "protocol", "plan", "finished"} <= set(payload):
        raise GGNDError(f"{path}: not a stability checkpoint of ggnd-plugin; it was not loaded")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise GGNDError(
            f"{path}: checkpoint version {payload.get('version')} is not {CHECKPOINT_VERSION} (written by "
            "another ggnd-plugin version); start again with --overwrite or choose another --out"
        )
    if payload["model"] != name:
        raise GGNDError(f"{path}: checkpoint belongs to model '{payload['model']}', not '{name}'")
    saved = payload["protocol"]
    now = protocol.to_dict()
    changed = [key for key in now if saved.get(key) != now[key]]
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)} -> {now[key]}" for key in changed)
        raise GGNDError(f"{path}: cannot resume with a different protocol ({details})")
    if payload["plan"] != [asdict(spec) for spec in plan]:
        raise GGNDError(
            f"{path}: cannot resume: the start frames or replica seeds differ from the stopped run"
        )
    if payload["monitor_description"] != monitor.describe():
        raise GGNDError(f"{path}: cannot resume: the reference (bonds or RDF) differs from the stopped run")


def write_checkpoint(
    path: Path,
    model: str,
    protocol: StabilityProtocol,
    plan: Sequence[ReplicaSpec],
    monitor_description: dict,
    step: int,
    finished: bool,
    owned: Sequence[int],
    entries: Mapping[int, dict[str, Any]],
    failure_frames: FailureFrames | None = None,
) -> None:
    """Write (atomically) the checkpoint of the replicas ``owned`` by this process, and ``entries``."""
    payload = {
        "version": CHECKPOINT_VERSION,
        "model": model,
        "protocol": protocol.to_dict(),
        "plan": [asdict(spec) for spec in plan],
        "monitor_description": monitor_description,
        "step": step,
        "finished": finished,
        "owned": list(owned),
        "entries": entries,
        "failure_frames": (failure_frames or FailureFrames()).to_dict(),
    }
    atomic_torch_save(payload, path)
