"""Writing outputs so that nothing the user has is lost and no crash leaves a half-written file.

Four tools, used by every command that writes:

* :func:`atomic_path` / :func:`atomic_write_text` / :func:`atomic_torch_save`: the content goes to a
  file of the same name in a hidden temporary folder beside the target (``.ggnd-tmp-<pid>-<random>/``;
  writers that derive anything from the name, such as the format from the suffix or torch.save's
  archive name, see the real one), is flushed to disk (fsync), then renamed over the target. A reader
  sees the old file or the new one, never a mix; a killed writer leaves only its hidden temporary
  folder, which the next run in that folder removes (:func:`remove_stale_temporaries`).
* :func:`check_output_file` / :func:`check_output_dir`: refuse to replace an existing file, or to write
  into a non-empty folder that is not the run's own resumable output, unless ``--overwrite``; refuse an
  output that is one of the inputs, always.
* :func:`output_lock`: one run per output. A lock file next to the output holds the writer's pid and
  command; the lock itself is :mod:`filelock`'s (an ``flock`` on it on Unix), which the operating system
  drops when the process dies, so a lock left by a killed run never blocks the next one.
* :func:`verified_torch_load`: checkpoints are ``torch.save`` zip archives with a CRC-32 per record;
  every record is checked before unpickling, so a truncated or damaged checkpoint is reported
  (:class:`~ggnd_plugin.errors.CorruptFileError`) instead of loaded.

Fault injection (tests): with ``GGND_KILL_AT_WRITE=N`` in the environment the process kills itself
(SIGKILL) half-way through its N-th atomic write, the worst moment for a crash; the tests run every
command with several N and check that the resumed result equals an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ggnd_plugin.errors import CorruptFileError, OutputExistsError, OutputLockedError

TMP_PREFIX = ".ggnd-tmp-"
DIR_LOCK_NAME = ".ggnd.lock"
KILL_AT_WRITE_ENV = "GGND_KILL_AT_WRITE"

_writes = 0


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------
def _fault_point(tmp: Path) -> None:
    """SIGKILL this process at the N-th write when the tests ask for it (see the module docstring)."""
    global _writes
    _writes += 1
    wanted = os.environ.get(KILL_AT_WRITE_ENV)
    if wanted and int(wanted) == _writes:
        # Leave the temporary file half-written, as a kill during a large write would.
        if tmp.exists():
            size = tmp.stat().st_size
            with open(tmp, "r+b") as handle:
                handle.truncate(size // 2)
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform can open a folder (Windows), which is fine.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; it replaces ``path`` on success.

    The temporary path has the same file name, in a hidden folder beside ``path`` (same file system,
    so the final rename is atomic). On an exception it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent / f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir()
    tmp = folder / path.name
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written for {path}")
        _fsync_path(tmp)
        _fault_point(tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    folder.rmdir()
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any, **kwargs) -> Path:
    return atomic_write_text(path, json.dumps(value, **kwargs) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


@contextlib.contextmanager
def atomic_torch_saves() -> Iterator[None]:
    """Within the context, ``torch.save(obj, <path>)`` writes atomically (for host code we run).

    MACE's trainer writes its checkpoints and ``.model`` files with a plain ``torch.save``; a kill in the
    middle would leave a truncated file that ``--restart_latest`` or a later load trips over.
    """
    import torch

    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, str | os.PathLike):
            with atomic_path(Path(f)) as tmp:
                original(obj, tmp, *args, **kwargs)
            return None
        return original(obj, f, *args, **kwargs)

    torch.save = save
    try:
        yield
    finally:
        torch.save = original


def save_model(adapter, model, path: str | Path) -> Path:
    """``adapter.save(model, path)`` made atomic, whatever the adapter does inside.

    The adapter writes a file of the real name in a temporary folder (hosts that check the suffix still
    see it), and the finished file is renamed into place.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        written = Path(adapter.save(model, tmp))
        if written != tmp:  # an adapter that chose its own file name
            os.replace(written, tmp)
    return path


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Remove temporary folders that a killed writer left in ``folder`` (its process no longer runs)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not entry.name.startswith(TMP_PREFIX):
            continue
        try:
            pid = int(entry.name[len(TMP_PREFIX) :].split("-", 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not pid_alive(pid):
            with contextlib.suppress(OSError):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed.append(entry)
    return removed


# --------------------------------------------------------------------------------------------------
# Refusing to replace what the user has
# --------------------------------------------------------------------------------------------------
def same_file(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` name the same file (links and relative paths included)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def refuse_input_as_output(output: str | Path, inputs: Iterable[tuple[str, str | Path | None]], what: str):
    """Refuse an output that is one of the inputs (always, even with ``--overwrite``).

    ``inputs`` are (argument, path) pairs; paths may be None (argument not given).
    """
    for argument, path in inputs:
        if path is not None and same_file(output, path):
            raise OutputExistsError(
                f"{what} {output} is the {argument} input: writing it would destroy that input; "
                "choose another output"
            )


def check_output_file(
    path: str | Path,
    *,
    what: str,
    overwrite: bool = False,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
) -> Path:
    """Refuse an output file that is an input, a folder, or (without ``overwrite``) an existing file."""
    path = Path(path)
    refuse_input_as_output(path, inputs, what)
    if path.is_dir():
        raise OutputExistsError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{what} {path} already exists; pass --overwrite to replace it")
    return path


def ignorable(name: str) -> bool:
    """Entries a run's own bookkeeping leaves in an output folder (locks, temporary folders)."""
    return name.startswith(TMP_PREFIX) or name == DIR_LOCK_NAME


def foreign_entries(folder: Path, own: Iterable[str]) -> list[str]:
    """Names in ``folder`` that are neither ``own`` (the run's outputs) nor its bookkeeping."""
    own = set(own)
    if not folder.is_dir():
        return []
    return sorted(e.name for e in folder.iterdir() if not ignorable(e.name) and e.name not in own)


def check_output_dir(
    folder: str | Path,
    *,
    what: str,
    is_own: bool,
    overwrite: bool = False,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
) -> Path:
    """Refuse an output folder that is a file, holds an input's path, or is another program's folder.

    ``is_own``: the folder holds this command's own (resumable) output; the caller decides that from the
    files it writes. A non-empty folder that is not its own needs ``overwrite``.
    """
    folder = Path(folder)
    inputs = list(inputs)
    refuse_input_as_output(folder, inputs, what)
    if folder.exists() and not folder.is_dir():
        raise OutputExistsError(f"{what} {folder} is a file, not a folder; choose a folder")
    if folder.is_dir() and not is_own and not overwrite:
        entries = foreign_entries(folder, ())
        if entries:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise OutputExistsError(
                f"{what} {folder} is not empty ({shown}) and holds no run of this command; choose an empty "
                "or new folder, or pass --overwrite to write into it"
            )
    return folder


# --------------------------------------------------------------------------------------------------
# One run per output
# --------------------------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def lock_path(target: str | Path, folder: bool) -> Path:
    """The lock file of an output: ``DIR/.ggnd.lock`` for a folder, ``.NAME.ggnd.lock`` beside a file."""
    target = Path(target)
    if folder:
        return target / DIR_LOCK_NAME
    return target.parent / f".{target.name}.ggnd.lock"


def _holder(lock: Path) -> str:
    try:
        record = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        return "a process that left no details"
    command = record.get("command") or "?"
    started = record.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {record.get('pid', '?')} on {record.get('host', '?')}, started {when}: {command}"


def _lock_record() -> str:
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""
    return json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": command}
    )


@contextlib.contextmanager
def output_lock(target: str | Path, folder: bool = True) -> Iterator[Path]:
    """Hold the lock of an output folder (``folder=True``) or file for the duration of the context.

    Re-entrant within one process (the CLI and the library function it calls may both take it). A
    second process gets :class:`OutputLockedError` at once, with the holder's pid and command. Stale
    temporary files of killed writers in the output's folder are removed once the lock is held.
    """
    from filelock import FileLock, Timeout

    target = Path(target)
    directory = target if folder else target.parent
    directory.mkdir(parents=True, exist_ok=True)
    lock = lock_path(target, folder)
    # One instance per lock file in the process (keyed by its resolved path, however the output was named),
    # so that taking it again only counts up.
    file_lock = FileLock(lock.resolve(), is_singleton=True, thread_local=False)
    outermost = not file_lock.is_locked
    try:
        # A short wait, not none: a holder that is releasing right now unlinks the file, and filelock then
        # retries on the new one.
        file_lock.acquire(timeout=0.1)
    except Timeout:
        raise OutputLockedError(
            f"{target} is in use by another run ({_holder(lock)}); wait for it to finish or stop it "
            f"(lock file {lock})"
        ) from None
    try:
        if outermost:
            lock.write_text(_lock_record())  # who holds it, for the message a second run prints
            remove_stale_temporaries(directory)
        yield lock
    finally:
        if outermost:
            # Unlinked while still held: a run waiting on this file finds it gone and locks a new one.
            with contextlib.suppress(OSError):
                lock.unlink()
        file_lock.release()


# --------------------------------------------------------------------------------------------------
# Verified loading
# --------------------------------------------------------------------------------------------------
def verify_torch_file(path: str | Path, what: str = "checkpoint") -> None:
    """Raise :class:`CorruptFileError` unless ``path`` is a complete ``torch.save`` archive whose every
    record matches its CRC-32."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise CorruptFileError(
            f"{path}: the {what} is truncated or not a torch.save archive ({error}); it was not loaded. "
            "Delete it to start that run again"
        ) from error
    if bad is not None:
        raise CorruptFileError(
            f"{path}: the {what} is damaged (record {bad} fails its checksum); it was not loaded. "
            "Delete it to start that run again"
        )


def verified_torch_load(path: str | Path, what: str = "checkpoint", map_location="cpu") -> Any:
    """``torch.load`` of a checkpoint this package wrote, after :func:`verify_torch_file`."""
    import torch

    verify_torch_file(path, what)
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:
        raise CorruptFileError(
            f"{path}: the {what} cannot be read ({type(error).__name__}: {error}); it was not loaded. "
            "Delete it to start that run again"
        ) from error


def read_json_state(path: str | Path, what: str = "checkpoint") -> Any:
    """A JSON state file written by this package, or :class:`CorruptFileError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CorruptFileError(
            f"{path}: the {what} cannot be read ({type(error).__name__}: {error}); it was not used. "
            "Delete it to start that run again"
        ) from error


__all__ = [
    "atomic_path",
    "atomic_torch_save",
    "atomic_torch_saves",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "check_output_file",
    "output_lock",
    "read_json_state",
    "remove_stale_temporaries",
    "save_model",
    "verified_torch_load",
    "verify_torch_file",
]
