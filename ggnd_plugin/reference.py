"""Reference labels the project makes itself: GFN2-xTB Langevin MD of a molecule given as SMILES.

RDKit builds a 3D geometry (hydrogens added, embedded with the seed, MMFF-optimised); tblite's GFN2-xTB
drives Langevin MD (ASE) at each temperature after an equilibration period, and every ``spacing_fs`` one
frame is written with its xTB energy and forces. Units: eV, Å, eV/Å, fs, K.

Reproducibility: every random number comes from one numpy Generator per temperature, seeded from
``(seed, temperature)``; each SCF starts from the same guess (tblite would otherwise reuse the last
wavefunction, which makes the labels depend on the history); tblite runs on one OpenMP thread. The same settings and package versions give byte-identical files.

Resumability: after every ``spacing_fs`` of MD the state (positions, momenta, the Generator's state, the
number of frames written and the size of the partial file) is saved as exact JSON, so a run stopped at
any point continues to the same files as an uninterrupted run. Every file is written atomically (the
partial trajectory is appended, flushed to disk, then its length recorded), ``generation.json`` is
written last and marks the run finished, and the output folder is locked for the run. A checkpoint that
does not match its partial trajectory is reported, not used.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from ggnd_plugin import provenance
from ggnd_plugin.errors import CorruptFileError, GGNDError, OutputExistsError
from ggnd_plugin.reference_settings import (
    GenerationSettings,
    output_files,
    split_files,
    temperature_tag,
    trajectory_file,
)
from ggnd_plugin.safe_io import (
    atomic_write_text,
    check_output_dir,
    foreign_entries,
    output_lock,
    read_json_state,
)
from ggnd_plugin.xtb import (
    molecule_from_smiles,
    one_openmp_thread,
    require_xtb,
    xtb_calculator,
)

CHECKPOINT_DIR = ".checkpoint"
RECORD_FILE = "generation.json"


def package_versions() -> dict[str, str]:
    """The versions a generation record names (the labelling stack); a missing one reads 'not installed'."""
    return provenance.package_versions(("tblite", "rdkit", "ase", "numpy"), missing="not installed")


def _rng_for(seed: int, temperature_K: float) -> np.random.Generator:
    # Independent of the order of --temperature, so adding a temperature never changes the others.
    return np.random.default_rng([seed, round(temperature_K * 1000)])


def _write_json_atomically(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True) + "\n")


def _label_frame(atoms, settings: GenerationSettings, temperature_K: float, time_fs: float):
    """A plain Atoms with the xTB labels of the current MD state (forces before any constraint)."""
    from ase import Atoms

    frame = Atoms(numbers=atoms.numbers, positions=atoms.get_positions())
    frame.info["energy"] = float(atoms.get_potential_energy())
    frame.info["temperature_K"] = float(temperature_K)
    frame.info["kinetic_temperature_K"] = float(atoms.get_temperature())
    frame.info["time_fs"] = float(time_fs)
    frame.info["method"] = settings.method
    frame.arrays["forces"] = np.array(atoms.get_forces(apply_constraint=False))
    return frame


class _Stop(Exception):
    """Raised internally after ``stop_after_frames`` frames (a simulated interruption for tests)."""


@dataclass
class GenerationResult:
    out_dir: Path
    files: list[Path]
    frame_counts: dict[str, int]
    statistics: dict[str, dict] = field(default_factory=dict)
    complete: bool = True


def _check_bonds(atoms, bonds, reference_lengths, settings, temperature_K, time_fs) -> float:
    if len(bonds) == 0:
        return 0.0
    positions = atoms.get_positions()
    lengths = np.linalg.norm(positions[bonds[:, 0]] - positions[bonds[:, 1]], axis=1)
    stretch = np.abs(lengths - reference_lengths)
    worst = int(np.argmax(stretch))
    if stretch[worst] > settings.max_bond_stretch:
        i, j = bonds[worst]
        raise GGNDError(
            f"at {temperature_K:g} K, t = {time_fs:g} fs the bond {atoms[i].symbol}{i}-{atoms[j].symbol}{j} "
            f"is {lengths[worst]:.2f} Å long ({reference_lengths[worst]:.2f} Å at the start): the molecule "
            f"broke apart. Lower --timestep-fs or the temperature (or raise --max-bond-stretch if intended)"
        )
    return float(stretch[worst])


def _run_temperature(
    temperature_K, settings, start, bonds, charge, unpaired, out_dir, progress, stop_after_frames, frames_done
):
    """MD and labelling at one temperature, resuming from its checkpoint when there is one.

    Returns the number of frames this call wrote (across all temperatures the caller counts them, so a
    simulated interruption can fall anywhere).
    """
    from ase import units
    from ase.calculators.calculator import CalculationFailed
    from ase.constraints import FixCom
    from ase.io import write
    from ase.md import velocitydistribution
    from ase.md.langevin import Langevin

    checkpoint_path = out_dir / CHECKPOINT_DIR / f"{temperature_tag(temperature_K)}.json"
    partial_path = out_dir / CHECKPOINT_DIR / trajectory_file(settings, temperature_K)
    n_frames = settings.frames_at(temperature_K)
    total_segments = settings.equilibration_segments + n_frames
    reference_lengths = (
        np.linalg.norm(start.positions[bonds[:, 0]] - start.positions[bonds[:, 1]], axis=1)
        if len(bonds)
        else np.zeros(0)
    )

    atoms = start.copy()
    rng = _rng_for(settings.seed, temperature_K)
    if checkpoint_path.exists():
        state = read_json_state(checkpoint_path, f"generation checkpoint at {temperature_K:g} K")
        written_bytes = partial_path.stat().st_size if partial_path.exists() else -1
        if written_bytes < state.get("partial_bytes", 0):
            raise CorruptFileError(
                f"{partial_path}: the partial trajectory is shorter ({written_bytes} bytes) than its "
                f"checkpoint {checkpoint_path.name} records ({state.get('partial_bytes')}); it was not used. "
                "Delete the output folder's .checkpoint to start that temperature again"
            )
        # Set before the FixCom constraint exists, so the stored values are taken exactly.
        atoms.set_positions(np.array(state["positions"]))
        atoms.set_momenta(np.array(state["momenta"]))
        rng.bit_generator.state = state["rng"]
        segments_done = state["segments_done"]
        with open(partial_path, "r+b") as handle:  # drop a frame written after the last checkpoint
            handle.truncate(state["partial_bytes"])
        max_stretch = state["max_bond_stretch_A"]
    else:
        # ASE 3.29 renamed MaxwellBoltzmannDistribution; both draw the same numbers from rng.
        thermalize = getattr(velocitydistribution, "thermalize_momenta", None)
        thermalize = thermalize or velocitydistribution.MaxwellBoltzmannDistribution
        thermalize(atoms, temperature_K=temperature_K, rng=rng)
        velocitydistribution.Stationary(atoms)
        segments_done = 0
        partial_path.write_bytes(b"")
        max_stretch = 0.0
    atoms.set_constraint(FixCom())
    atoms.calc = xtb_calculator(settings.method, charge, unpaired, settings.electronic_temperature_K)
    dynamics = Langevin(
        atoms,
        timestep=settings.timestep_fs * units.fs,
        temperature_K=temperature_K,
        friction=settings.friction_per_fs / units.fs,
        fixcm=False,  # FixCom does this correctly; Langevin's own fixcm is deprecated in ASE
        rng=rng,
    )
    if progress is not None:
        progress.set_description(f"{settings.name} {temperature_tag(temperature_K)}")
    written = 0
    while segments_done < total_segments:
        try:
            dynamics.run(settings.steps_per_frame)
        except CalculationFailed as error:  # tblite's ASE calculator raises ASE's own
            raise GGNDError(
                f"xTB failed at {temperature_K:g} K after {segments_done * settings.spacing_fs:g} fs of "
                f"MD ({error}); lower --timestep-fs or the temperature"
            ) from error
        segments_done += 1
        time_fs = segments_done * settings.spacing_fs
        max_stretch = max(
            max_stretch, _check_bonds(atoms, bonds, reference_lengths, settings, temperature_K, time_fs)
        )
        is_frame = segments_done > settings.equilibration_segments
        if is_frame:
            with open(partial_path, "a") as handle:
                write(handle, _label_frame(atoms, settings, temperature_K, time_fs), format="extxyz")
                handle.flush()
                os.fsync(handle.fileno())  # on disk before the checkpoint that counts it
        state = {
            "temperature_K": temperature_K,
            "segments_done": segments_done,
            "positions": atoms.get_positions().tolist(),
            "momenta": atoms.get_momenta().tolist(),
            "rng": rng.bit_generator.state,
            "partial_bytes": partial_path.stat().st_size,
            "max_bond_stretch_A": max_stretch,
        }
        _write_json_atomically(checkpoint_path, state)
        if progress is not None:
            progress.update(1)
        if is_frame:
            written += 1
            if stop_after_frames is not None and frames_done + written >= stop_after_frames:
                raise _Stop
    # The bond-stretch record first: once the trajectory is in place this temperature is never rerun.
    _record_max_stretch(out_dir, temperature_K, max_stretch)
    os.replace(partial_path, out_dir / trajectory_file(settings, temperature_K))
    checkpoint_path.unlink()
    return written, max_stretch


def _max_stretch_path(out_dir: Path) -> Path:
    return out_dir / CHECKPOINT_DIR / "max_bond_stretch.json"


def _record_max_stretch(out_dir: Path, temperature_K: float, value: float) -> None:
    path = _max_stretch_path(out_dir)
    record = read_json_state(path, "bond-stretch record") if path.exists() else {}
    record[temperature_tag(temperature_K)] = value
    _write_json_atomically(path, record)


def _extxyz_blocks(text: str) -> list[str]:
    """The frames of an extxyz text, each as its exact lines (atom count, comment, one line per atom)."""
    lines = text.splitlines(keepends=True)
    blocks, start = [], 0
    while start < len(lines):
        n_atoms = int(lines[start])
        blocks.append("".join(lines[start : start + n_atoms + 2]))
        start += n_atoms + 2
    return blocks


def _split(settings: GenerationSettings, out_dir: Path) -> None:
    """Random train/test split of one temperature's frames, copied byte for byte."""
    full_path = out_dir / trajectory_file(settings, settings.split_at())
    blocks = _extxyz_blocks(full_path.read_text())
    # Its own stream, so the split does not depend on how much MD came before.
    order = np.random.default_rng([settings.seed, 7_000_001]).permutation(len(blocks))
    train = sorted(order[: settings.split_train].tolist())
    test = sorted(order[settings.split_train :].tolist())
    train_name, test_name = split_files(settings)
    # The full trajectory stays until generation.json is written: a run stopped here splits again.
    atomic_write_text(out_dir / train_name, "".join(blocks[i] for i in train))
    atomic_write_text(out_dir / test_name, "".join(blocks[i] for i in test))


def file_statistics(path: Path) -> dict:
    """Frame count and energy/force statistics of one labelled file (for the README and the report)."""
    from ggnd_plugin.data import read_labelled

    frames = read_labelled(path)
    energies = np.array([a.info["energy"] for a in frames])
    forces = np.concatenate([a.arrays["forces"] for a in frames])
    kinetic = np.array([a.info.get("kinetic_temperature_K", np.nan) for a in frames])
    return {
        "frames": len(frames),
        "atoms": len(frames[0]),
        "energy_mean_eV": float(energies.mean()),
        "energy_std_eV": float(energies.std()),
        "energy_min_eV": float(energies.min()),
        "energy_max_eV": float(energies.max()),
        "force_rms_eV_per_A": float(np.sqrt((forces**2).mean())),
        "force_max_abs_eV_per_A": float(np.abs(forces).max()),
        "kinetic_temperature_mean_K": float(np.nanmean(kinetic)),
        "bytes": path.stat().st_size,
    }


def _readme(settings: GenerationSettings, out_dir_as_given: str, record: dict) -> str:
    lines = [
        f"# {settings.name}: {settings.method} reference data made by ggnd-plugin",
        "",
        f"Molecule: SMILES `{settings.smiles}` ({record['atoms']} atoms with hydrogens), 3D geometry from "
        f"RDKit (seeded embedding, MMFF optimisation). Total charge {record['charge']}, "
        f"{record['unpaired_electrons']} unpaired electrons.",
        "",
        "Made with:",
        "",
        "```",
        settings.command(out_dir_as_given),
        "```",
        "",
        f"Langevin MD (ASE, centre of mass fixed) at each temperature: time step {settings.timestep_fs:g} fs, "
        f"friction {settings.friction_per_fs:g} 1/fs, {settings.equilibration_segments * settings.spacing_fs:g} fs "
        f"equilibration from Maxwell-Boltzmann velocities (not written), then one frame every "
        f"{settings.spacing_fs:g} fs. Labels: {settings.method} (tblite, electronic temperature "
        f"{settings.electronic_temperature_K:g} K, every SCF from the same guess, one OpenMP thread). "
        f"Seed {settings.seed}.",
        "",
        "Units: energy eV, positions Å, forces eV/Å. extxyz keys: `energy`, `temperature_K` (thermostat "
        "target), `kinetic_temperature_K`, `time_fs` (since the start of the MD, equilibration included), "
        "`method` in the frame info; `forces` per atom. `ase.io.read` and `ggnd_plugin.data.read_labelled` "
        "read them.",
        "",
    ]
    if settings.split_train is not None:
        train_name, test_name = split_files(settings)
        lines += [
            f"The {settings.split_at():g} K trajectory is split at random (seed {settings.seed}) into "
            f"`{train_name}` ({settings.split_train} frames) and `{test_name}` (the rest); frames keep their "
            "trajectory order.",
            "",
        ]
    lines += [
        "| file | frames | E mean (eV) | E std (eV) | force RMS (eV/Å) | max abs(F) (eV/Å) | mean kinetic T (K) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, stats in record["files"].items():
        lines.append(
            f"| {name} | {stats['frames']} | {stats['energy_mean_eV']:.4f} | {stats['energy_std_eV']:.4f} | "
            f"{stats['force_rms_eV_per_A']:.4f} | {stats['force_max_abs_eV_per_A']:.3f} | "
            f"{stats['kinetic_temperature_mean_K']:.0f} |"
        )
    lines += ["", "Package versions:", ""]
    lines += [f"- {package} {version}" for package, version in record["versions"].items()]
    return "\n".join(lines) + "\n"


def _own_outputs(out_dir: Path) -> list[Path]:
    """What a run of this command left in ``out_dir`` (for --overwrite), from its own records."""
    names = {RECORD_FILE, "README.md", CHECKPOINT_DIR}
    for record_file in (out_dir / RECORD_FILE, out_dir / CHECKPOINT_DIR / "settings.json"):
        try:
            record = json.loads(record_file.read_text())
            settings = GenerationSettings.from_json(record.get("settings", record))
        except (OSError, ValueError, KeyError, TypeError, GGNDError):
            continue
        names.update(output_files(settings))
        names.update(trajectory_file(settings, t) for t in settings.temperatures_K)
    return [out_dir / name for name in sorted(names) if (out_dir / name).exists()]


def _finish_cleanup(settings: GenerationSettings, out_dir: Path) -> None:
    """After generation.json: drop the split's full trajectory and the checkpoint folder (idempotent)."""
    if settings.split_train is not None:
        (out_dir / trajectory_file(settings, settings.split_at())).unlink(missing_ok=True)
    shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)


def generate(
    settings: GenerationSettings,
    out_dir: str | Path,
    resume: bool = False,
    show_progress: bool = True,
    stop_after_frames: int | None = None,
    overwrite: bool = False,
) -> GenerationResult:
    """Run (or continue) the MD and labelling; write the extxyz files, ``generation.json`` and README.md.

    ``out_dir`` must be new or empty, or hold this command's run: ``resume`` continues an unfinished
    one, ``overwrite`` removes an earlier run's files (and only those) and starts again, or writes into
    a folder holding other files. ``stop_after_frames`` stops after that many frames in total (as an
    interruption would), leaving a checkpoint that ``resume=True`` continues from; the result then has
    ``complete=False``. The folder is locked for the run.
    """
    require_xtb()
    out_dir_as_given = str(out_dir)
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise GGNDError("--resume continues a run and --overwrite starts it again: give one of them")
    own = (out_dir / RECORD_FILE).exists() or (out_dir / CHECKPOINT_DIR).exists()
    check_output_dir(out_dir, what="-o", is_own=own, overwrite=overwrite)
    with output_lock(out_dir):
        if overwrite:
            for path in _own_outputs(out_dir):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return _generate(
            settings, out_dir, out_dir_as_given, resume, show_progress, stop_after_frames, overwrite
        )


def _generate(settings, out_dir, out_dir_as_given, resume, show_progress, stop_after_frames, overwrite):
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    settings_path = checkpoint_dir / "settings.json"
    record_path = out_dir / RECORD_FILE

    if record_path.exists():
        record = read_json_state(record_path, "generation record")
        previous = GenerationSettings.from_json(record["settings"])
        if resume and previous == settings:
            _finish_cleanup(settings, out_dir)
            files = [out_dir / name for name in output_files(settings)]
            counts = {name: stats["frames"] for name, stats in record["files"].items()}
            return GenerationResult(out_dir, files, counts, record["files"])
        raise OutputExistsError(
            f"{out_dir} already holds a finished generation ({RECORD_FILE}); choose another -o or pass "
            "--overwrite to replace it"
        )
    if settings_path.exists():
        if not resume:
            raise OutputExistsError(
                f"{out_dir} holds an unfinished generation; pass --resume to continue it, --overwrite to "
                "start again, or choose another -o"
            )
        stored = GenerationSettings.from_json(read_json_state(settings_path, "generation settings"))
        if stored != settings:
            changed = [
                f"{f.name} ({getattr(stored, f.name)!r} -> {getattr(settings, f.name)!r})"
                for f in fields(GenerationSettings)
                if getattr(stored, f.name) != getattr(settings, f.name)
            ]
            raise GGNDError(
                f"--resume: the settings differ from those of the run in {out_dir}: {', '.join(changed)}"
            )
    elif foreign_entries(out_dir, ()):
        if resume:
            raise OutputExistsError(f"--resume: {out_dir} holds no generation checkpoint to continue from")
        if not overwrite and any((out_dir / name).exists() for name in output_files(settings)):
            raise OutputExistsError(
                f"{out_dir} already holds output files; choose another -o or pass --overwrite"
            )

    start, bonds, charge, unpaired = molecule_from_smiles(settings.smiles, settings.seed)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if not settings_path.exists():
        _write_json_atomically(settings_path, settings.to_json())

    progress = None
    if show_progress:
        from tqdm.auto import tqdm

        segments = sum(
            settings.equilibration_segments + settings.frames_at(t) for t in settings.temperatures_K
        )
        progress = tqdm(total=segments, unit="segment", desc=settings.name, dynamic_ncols=True)
        for temperature in settings.temperatures_K:
            done_path = out_dir / trajectory_file(settings, temperature)
            checkpoint_path = checkpoint_dir / f"{temperature_tag(temperature)}.json"
            if done_path.exists():
                progress.update(settings.equilibration_segments + settings.frames_at(temperature))
            elif checkpoint_path.exists():
                progress.update(read_json_state(checkpoint_path)["segments_done"])

    frames_done = 0
    try:
        with one_openmp_thread():
            for temperature in settings.temperatures_K:
                if (out_dir / trajectory_file(settings, temperature)).exists():
                    continue
                written, _ = _run_temperature(
                    temperature,
                    settings,
                    start,
                    bonds,
                    charge,
                    unpaired,
                    out_dir,
                    progress,
                    stop_after_frames,
                    frames_done,
                )
                frames_done += written
    except _Stop:
        return GenerationResult(out_dir, [], {}, complete=False)
    finally:
        if progress is not None:
            progress.close()

    max_stretches = read_json_state(_max_stretch_path(out_dir), "bond-stretch record")
    if settings.split_train is not None:
        _split(settings, out_dir)
    files = [out_dir / name for name in output_files(settings)]
    statistics = {path.name: file_statistics(path) for path in files}
    record = {
        "settings": settings.to_json(),
        "command": settings.command(out_dir_as_given),
        "versions": package_versions(),
        "atoms": len(start),
        "charge": int(charge),
        "unpaired_electrons": int(unpaired),
        "units": {"energy": "eV", "positions": "Å", "forces": "eV/Å", "time": "fs", "temperature": "K"},
        "max_bond_stretch_A": max_stretches,
        "files": statistics,
    }
    atomic_write_text(out_dir / "README.md", _readme(settings, out_dir_as_given, record))
    _write_json_atomically(record_path, record)  # last: from here on the run is finished
    _finish_cleanup(settings, out_dir)
    counts = {name: stats["frames"] for name, stats in statistics.items()}
    return GenerationResult(out_dir, files, counts, statistics)
