"""What a ``ggnd data generate`` run is: its settings, checked, and the files it writes."""

from __future__ import annotations

import math
import shlex
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ggnd_plugin import validation as v
from ggnd_plugin.errors import GGNDError
from ggnd_plugin.xtb import METHODS

# A covalent bond stretched this far means the molecule broke (or the time step is too long):
# such frames are not what a user wants to train on, so the run stops and says so.
DEFAULT_MAX_BOND_STRETCH = 1.0


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that determines the generated files (and nothing that does not)."""

    smiles: str
    temperatures_K: tuple[float, ...]
    frames: tuple[int, ...]
    name: str = "molecule"
    method: str = "GFN2-xTB"
    seed: int = 0
    spacing_fs: float = 50.0
    timestep_fs: float = 0.5
    friction_per_fs: float = 0.01
    equilibration_ps: float = 1.0
    split_train: int | None = None
    split_temperature_K: float | None = None
    max_bond_stretch: float = DEFAULT_MAX_BOND_STRETCH
    electronic_temperature_K: float = 300.0

    def __post_init__(self):
        if not self.temperatures_K:
            raise GGNDError("give at least one --temperature")
        if len(set(self.temperatures_K)) != len(self.temperatures_K):
            raise GGNDError(f"--temperature lists a temperature twice: {list(self.temperatures_K)}")
        if any(not (math.isfinite(t) and t > 0) for t in self.temperatures_K):
            raise GGNDError(f"temperatures must be positive (K), got {list(self.temperatures_K)}")
        if len(self.frames) not in (1, len(self.temperatures_K)):
            raise GGNDError(
                f"--frames takes one count or one per temperature ({len(self.temperatures_K)}), "
                f"got {len(self.frames)}"
            )
        if any(n < 1 for n in self.frames):
            raise GGNDError(f"--frames must be at least 1, got {list(self.frames)}")
        for name, check in (
            ("seed", v.seed),
            ("timestep_fs", v.positive_float),
            ("spacing_fs", v.positive_float),
            ("equilibration_ps", v.non_negative_float),
            ("friction_per_fs", v.non_negative_float),
            ("max_bond_stretch", v.positive_float),
            ("electronic_temperature_K", v.non_negative_float),
        ):
            v.check_value(check, getattr(self, name), name)
        steps = self.spacing_fs / self.timestep_fs
        if abs(steps - round(steps)) > 1e-9:
            raise GGNDError(
                f"--spacing-fs ({self.spacing_fs}) must be a whole number of time steps "
                f"(--timestep-fs {self.timestep_fs})"
            )
        if self.friction_per_fs < 0:
            raise GGNDError(f"--friction must be >= 0, got {self.friction_per_fs}")
        if self.method not in METHODS.values():
            raise GGNDError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.name or any(c in self.name for c in "/\\ "):
            raise GGNDError(f"--name must be a plain file-name stem, got {self.name!r}")
        if self.split_train is not None:
            total = self.frames_at(self.split_at())
            if not 0 < self.split_train < total:
                raise GGNDError(
                    f"--split {self.split_train}: must be between 1 and {total - 1}, the frames at "
                    f"{self.split_at():g} K"
                )

    @property
    def steps_per_frame(self) -> int:
        return round(self.spacing_fs / self.timestep_fs)

    @property
    def equilibration_segments(self) -> int:
        """Equilibration rounded up to whole frame spacings, so a checkpoint always falls on one."""
        return math.ceil(self.equilibration_ps * 1000.0 / self.spacing_fs - 1e-9)

    def frames_at(self, temperature_K: float) -> int:
        if len(self.frames) == 1:
            return self.frames[0]
        return self.frames[self.temperatures_K.index(temperature_K)]

    def split_at(self) -> float:
        if self.split_temperature_K is None:
            return self.temperatures_K[0]
        if self.split_temperature_K not in self.temperatures_K:
            raise GGNDError(
                f"--split-temperature {self.split_temperature_K:g} K is not one of the --temperature values"
            )
        return self.split_temperature_K

    def to_json(self) -> dict:
        record = asdict(self)
        record["temperatures_K"] = list(self.temperatures_K)
        record["frames"] = list(self.frames)
        return record

    @classmethod
    def from_json(cls, record: dict) -> GenerationSettings:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        values["temperatures_K"] = tuple(float(t) for t in values["temperatures_K"])
        values["frames"] = tuple(int(n) for n in values["frames"])
        return cls(**values)

    def command(self, out_dir: str | Path) -> str:
        """The ``ggnd data generate`` command line that reproduces these settings."""
        method = next(k for k, v in METHODS.items() if v == self.method)
        words = ["ggnd", "data", "generate", "--smiles", self.smiles, "--name", self.name]
        words += ["--temperature", *(f"{t:g}" for t in self.temperatures_K)]
        words += ["--frames", *(str(n) for n in self.frames)]
        words += ["--spacing-fs", f"{self.spacing_fs:g}", "--timestep-fs", f"{self.timestep_fs:g}"]
        words += [
            "--friction",
            f"{self.friction_per_fs:g}",
            "--equilibration-ps",
            f"{self.equilibration_ps:g}",
        ]
        words += ["--method", method, "--seed", str(self.seed)]
        if self.max_bond_stretch != DEFAULT_MAX_BOND_STRETCH:
            words += ["--max-bond-stretch", f"{self.max_bond_stretch:g}"]
        if self.electronic_temperature_K != 300.0:
            words += ["--electronic-temperature", f"{self.electronic_temperature_K:g}"]
        if self.split_train is not None:
            words += ["--split", str(self.split_train)]
            if self.split_temperature_K is not None:
                words += ["--split-temperature", f"{self.split_temperature_K:g}"]
        words += ["-o", str(out_dir)]
        return shlex.join(words)


def temperature_tag(temperature_K: float) -> str:
    return f"{temperature_K:g}K"


def trajectory_file(settings: GenerationSettings, temperature_K: float) -> str:
    return f"{settings.name}_{temperature_tag(temperature_K)}.xyz"


def split_files(settings: GenerationSettings) -> tuple[str, str]:
    stem = f"{settings.name}_{temperature_tag(settings.split_at())}"
    return f"{stem}_train.xyz", f"{stem}_test.xyz"


def output_files(settings: GenerationSettings) -> list[str]:
    """The labelled files a finished run leaves, in temperature order."""
    names = []
    for temperature in settings.temperatures_K:
        if settings.split_train is not None and temperature == settings.split_at():
            names.extend(split_files(settings))
        else:
            names.append(trajectory_file(settings, temperature))
    return names
