"""Reference labels for any structures: GFN2-xTB energies and forces (``ggnd data label``).

The same method, code and settings as the package's own data (:mod:`ggnd_plugin.xtb`: tblite,
every SCF from the same guess, one OpenMP thread, electronic temperature 300 K), so a failure frame
labelled here and the shipped 3BPA training set are labels of one method and can be trained on
together. Recomputing a frame of the shipped data reproduces its stored labels (tests).

Every frame is checked before the first SCF: finite positions, elements xTB parametrises (H to Rn),
an integer charge (``info['charge']``, default 0) and a number of electrons that the spin allows
(``info['unpaired_electrons']``, default 0: closed shell). Errors name the file and the frame.

Output: the frames in input order with ``info['energy']`` (eV) and ``arrays['forces']`` (eV/Å), the
input's other info and arrays kept (a failure frame's model, replica, step, ``model_forces``), plus
``label_method`` and ``label_source`` (``file:frame``). Resumable: each labelled frame is appended to
``OUT.partial`` and flushed to disk before ``OUT.label-checkpoint.json`` counts it; ``resume``
continues after the last counted frame, and the finished file replaces OUT in one rename.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError, OutputExistsError

XTB_ELEMENTS = range(1, 87)  # GFN1/GFN2-xTB parametrise H (1) to Rn (86)
_LABEL_KEYS = ("energy", "free_energy", "forces", "stress")


@dataclass(frozen=True)
class LabelSettings:
    method: str = "GFN2-xTB"
    electronic_temperature_K: float = 300.0

    def __post_init__(self):
        from ggnd_plugin.xtb import METHODS

        if self.method not in METHODS.values():
            raise GGNDError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        v.check_value(v.non_negative_float, self.electronic_temperature_K, "electronic_temperature_K")


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".label-checkpoint.json")


def _spin(atoms, where: str) -> tuple[int, int]:
    """(charge, unpaired electrons) of a frame, refused where xTB cannot do them."""
    from ase.data import chemical_symbols

    numbers = atoms.get_atomic_numbers()
    outside = sorted({int(z) for z in numbers if z not in XTB_ELEMENTS})
    if outside:
        names = ", ".join(
            f"{chemical_symbols[z] if 0 <= z < len(chemical_symbols) else '?'} (Z={z})" for z in outside
        )
        raise GGNDError(f"{where}: element(s) {names} beyond xTB's elements (H to Rn)")
    if not np.isfinite(atoms.get_positions()).all():
        raise GGNDError(f"{where}: positions are not finite")
    values = {}
    for key, default in (("charge", 0), ("unpaired_electrons", 0)):
        value = atoms.info.get(key, default)
        try:
            whole = not isinstance(value, bool) and float(value).is_integer()
        except (TypeError, ValueError):  # a word, a list, None
            whole = False
        if not whole:
            shown = repr(value) if isinstance(value, str) else value
            raise GGNDError(f"{where}: info['{key}'] must be a whole number, got {shown}")
        values[key] = int(value)
    charge, unpaired = values["charge"], values["unpaired_electrons"]
    electrons = int(numbers.sum()) - charge
    if unpaired < 0 or electrons < max(unpaired, 1):
        raise GGNDError(
            f"{where}: charge {charge} and {unpaired} unpaired electron(s) leave {electrons} electron(s)"
        )
    if (electrons - unpaired) % 2:
        raise GGNDError(
            f"{where}: {electrons} electrons with charge {charge} cannot have {unpaired} unpaired electron(s); "
            "set info['unpaired_electrons'] (or info['charge']) in the file"
        )
    return charge, unpaired


def _fingerprint(paths: Sequence[Path]) -> list[dict[str, str]]:
    """Each input by path and content hash: a resume must label the same frames."""
    record = []
    for path in paths:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        record.append({"path": str(Path(path).resolve()), "sha256": digest})
    return record


def check_label_output(out: Path, inputs, resume: bool, overwrite: bool) -> None:
    """OUT is new, or (``resume``) this command's unfinished output, or (``overwrite``) replaced."""
    from ggnd_plugin.safe_io import refuse_input_as_output

    for target, what in (
        (out, "-o"),
        (partial_path(out), "-o's partial file"),
        (checkpoint_path(out), "-o's checkpoint"),
    ):
        refuse_input_as_output(target, inputs, what)
    if resume and overwrite:
        raise GGNDError("--resume continues a run and --overwrite starts it again: give one of them")
    if out.is_dir():
        raise OutputExistsError(f"-o {out} is a folder; give a file name")
    if overwrite:
        return
    if checkpoint_path(out).exists() and not resume:
        raise OutputExistsError(
            f"-o {out} has an unfinished labelling ({checkpoint_path(out).name}); pass --resume to continue it "
            "or --overwrite to start again"
        )
    if not checkpoint_path(out).exists():
        for path in (out, partial_path(out)):
            if path.exists():
                raise OutputExistsError(f"-o: {path} already exists; pass --overwrite to replace it")


@dataclass
class LabelResult:
    out: Path
    frames: int
    labelled_now: int
    complete: bool = True


class _Stop(Exception):
    """Raised after ``stop_after`` frames (a simulated interruption for tests)."""


def label_files(
    inputs: Sequence[str | Path],
    out: str | Path,
    settings: LabelSettings | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> LabelResult:
    """Label every frame of ``inputs`` (in order) with xTB energies and forces into the extxyz ``out``.

    ``resume`` continues an unfinished run of the same inputs and settings; ``overwrite`` starts again
    over OUT or an unfinished run. ``stop_after`` stops after that many newly labelled frames (as an
    interruption would; the result has ``complete=False``). OUT is locked for the run.
    """
    from ggnd_plugin.data import read_structures
    from ggnd_plugin.safe_io import output_lock
    from ggnd_plugin.xtb import require_xtb

    settings = settings or LabelSettings()
    out = Path(out)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise GGNDError("give at least one structure file to label")
    require_xtb()
    named = [("FRAMES", p) for p in paths]
    check_label_output(out, named, resume, overwrite)
    frames, sources = [], []
    for path in paths:
        for index, atoms in enumerate(read_structures(path)):
            frames.append((atoms, *_spin(atoms, f"{path}: frame {index}")))
            sources.append(f"{path.name}:{index}")
    with output_lock(out, folder=False):
        check_label_output(out, named, resume, overwrite)
        return _label(frames, sources, paths, out, settings, resume, overwrite, progress, stop_after)


def _label(frames, sources, paths, out, settings, resume, overwrite, progress, stop_after) -> LabelResult:
    from ase.io import write
    from tqdm.auto import tqdm

    from ggnd_plugin.safe_io import atomic_write_text, read_json_state
    from ggnd_plugin.xtb import one_openmp_thread

    partial, checkpoint = partial_path(out), checkpoint_path(out)
    identity = {"settings": asdict(settings), "inputs": _fingerprint(paths), "frames": len(frames)}
    done = 0
    if checkpoint.exists() and resume:
        state = read_json_state(checkpoint, "labelling checkpoint")
        if state.get("identity") != identity:
            raise GGNDError(
                f"--resume: {checkpoint} was written for other inputs or settings; pass --overwrite"
            )
        done = int(state["frames_done"])
        size = int(state["partial_bytes"])
        if not partial.exists() or partial.stat().st_size < size:
            raise GGNDError(f"--resume: {partial} is shorter than its checkpoint says; pass --overwrite")
        with open(partial, "r+b") as handle:
            handle.truncate(size)  # drop a frame written after the last checkpoint
    else:
        if overwrite:
            checkpoint.unlink(missing_ok=True)
        partial.write_bytes(b"")
        atomic_write_text(
            checkpoint, json.dumps({"identity": identity, "frames_done": 0, "partial_bytes": 0})
        )
    labelled_now = 0
    with (
        one_openmp_thread(),
        tqdm(total=len(frames), initial=done, desc="xTB labels", unit="frame", disable=not progress) as bar,
    ):
        for k in range(done, len(frames)):
            if stop_after is not None and labelled_now >= stop_after:
                return LabelResult(out, len(frames), labelled_now, complete=False)
            atoms, charge, unpaired = frames[k]
            labelled = _labelled(atoms, charge, unpaired, settings, sources[k])
            with open(partial, "a") as handle:
                write(handle, labelled, format="extxyz")
                handle.flush()
                os.fsync(handle.fileno())  # on disk before the checkpoint that counts it
            state = {"identity": identity, "frames_done": k + 1, "partial_bytes": partial.stat().st_size}
            atomic_write_text(checkpoint, json.dumps(state))
            labelled_now += 1
            bar.update(1)
    os.replace(partial, out)
    checkpoint.unlink()
    return LabelResult(out, len(frames), labelled_now)


def _labelled(atoms, charge: int, unpaired: int, settings: LabelSettings, source: str):
    """A copy of ``atoms`` with xTB energy and forces, the input's other info and arrays kept."""
    from ase import Atoms

    from ggnd_plugin.xtb import xtb_calculator

    frame = Atoms(numbers=atoms.numbers, positions=atoms.get_positions(), cell=atoms.cell, pbc=atoms.pbc)
    frame.info.update({k: value for k, value in atoms.info.items() if k not in _LABEL_KEYS})
    for name, values in atoms.arrays.items():
        if name not in ("numbers", "positions", *_LABEL_KEYS):
            frame.arrays[name] = np.array(values)
    calculator = xtb_calculator(settings.method, charge, unpaired, settings.electronic_temperature_K)
    work = frame.copy()
    work.calc = calculator
    try:
        energy = float(work.get_potential_energy())
        forces = np.array(work.get_forces(apply_constraint=False))
    except Exception as error:
        raise GGNDError(
            f"{source}: {settings.method} failed on this frame ({type(error).__name__}: {error})"
        ) from error
    if not (np.isfinite(energy) and np.isfinite(forces).all()):
        raise GGNDError(f"{source}: {settings.method} gave a non-finite energy or force")
    frame.info["energy"] = energy
    frame.arrays["forces"] = forces
    frame.info["label_method"] = settings.method
    frame.info["label_source"] = source
    return frame
