"""The one validation layer: the command line and the Python API reject bad input with the same words.

Three levels, each a set of small functions that return or raise with a message naming the culprit:

* values (``positive_int``, ``fraction``, ``device`` ...): :func:`check_value` raises
  :class:`~ggnd_plugin.errors.GGNDError` ``"<name>: <problem>"`` for the library (settings objects,
  ``run_stability``); :func:`arg_type` turns the same check into an ``argparse`` ``type=``, so the CLI
  says ``"argument --epochs: <problem>"`` before any work starts.
* structures (:func:`check_frames`): lists of ASE ``Atoms`` from a file or a caller, used by
  ``read_structures``, ``HostAdapter.check_structures`` / ``predict`` and ``run_stability``.
* tensors (:func:`validate_block_inputs`): what the GGND block is called with, cheap and skipped under
  tracing / ``torch.compile``.

Nothing here imports torch or ASE at module level (``ggnd --help`` stays fast).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ggnd_plugin.errors import GGNDError
from ggnd_plugin.tracing import is_tracing

# --------------------------------------------------------------------------------------------------
# Values: each check returns the parsed value or raises _Problem with the text after "<name>: "
# --------------------------------------------------------------------------------------------------


class _Problem(Exception):
    pass


def _number(text: Any, kind: type, description: str):
    if isinstance(text, bool):
        raise _Problem(f"must be {description}, got {text!r}")
    if isinstance(text, str):
        try:
            value = kind(text.strip())
        except ValueError:
            raise _Problem(f"must be {description}, got {text!r}") from None
    elif kind is int and isinstance(text, float):
        if not text.is_integer():
            raise _Problem(f"must be {description}, got {text!r}")
        value = int(text)
    else:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise _Problem(f"must be {description}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise _Problem(f"must be {description}, got {text!r}")
    return value


def positive_int(text: Any) -> int:
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise _Problem(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: Any) -> int:
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise _Problem(f"must be an integer >= 0, got {value}")
    return value


SEED_MAX = 2**32 - 1


def seed(text: Any) -> int:
    """Seeds feed numpy's SeedSequence and torch.manual_seed: 0 .. 2^32 - 1."""
    value = _number(text, int, f"an integer from 0 to {SEED_MAX}")
    if not 0 <= value <= SEED_MAX:
        raise _Problem(f"must be an integer from 0 to {SEED_MAX}, got {value}")
    return value


def positive_float(text: Any) -> float:
    value = _number(text, float, "a positive number")
    if value <= 0:
        raise _Problem(f"must be a positive number, got {value:g}")
    return value


def non_negative_float(text: Any) -> float:
    value = _number(text, float, "a number >= 0")
    if value < 0:
        raise _Problem(f"must be a number >= 0, got {value:g}")
    return value


def fraction(text: Any) -> float:
    """Strictly between 0 and 1 (a share of the data that must leave something on both sides)."""
    value = _number(text, float, "a fraction between 0 and 1")
    if not 0 < value < 1:
        raise _Problem(f"must be a fraction between 0 and 1 (exclusive), got {value:g}")
    return value


def non_empty_text(text: Any) -> str:
    value = str(text)
    if not value.strip():
        raise _Problem("must not be empty")
    return value


def file_stem(text: Any) -> str:
    value = non_empty_text(text)
    if any(c in value for c in "/\\ ") or value in (".", ".."):
        raise _Problem(f"must be a plain file-name stem (no '/', '\\' or spaces), got {value!r}")
    return value


def existing_file(text: Any) -> Path:
    path = Path(text)
    if not path.exists():
        raise _Problem(f"{path}: no such file")
    if path.is_dir():
        raise _Problem(f"{path} is a folder, not a file")
    return path


def model_file(text: Any) -> Path:
    """An existing model file; which host can read it is decided when it is loaded."""
    path = existing_file(text)
    if path.stat().st_size == 0:
        raise _Problem(f"{path} is empty, not a model file")
    if path.suffix in STRUCTURE_SUFFIXES:
        raise _Problem(f"{path} is a structure file ({path.suffix}), not a model file")
    return path


STRUCTURE_SUFFIXES = (".xyz", ".extxyz", ".traj", ".db", ".cif", ".pdb", ".vasp", ".json")


def structure_file(text: Any) -> Path:
    """An existing, non-empty file that is not a model or archive (ASE reads it when it is used)."""
    path = existing_file(text)
    if path.stat().st_size == 0:
        raise _Problem(f"{path} is empty: it holds no structures")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        raise _Problem(f"{path} is a model or archive file (zip/pickle), not a structure file")
    return path


def yaml_file(text: Any) -> Path:
    path = existing_file(text)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise _Problem(f"{path} is not a YAML file (.yaml or .yml)")
    return path


def output_file(text: Any) -> Path:
    """Where a file will be written: not an existing folder (existence is checked by the command)."""
    path = Path(text)
    if str(text).strip() == "":
        raise _Problem("must name a file")
    if path.is_dir():
        raise _Problem(f"{path} is a folder; give a file name")
    return path


def output_dir(text: Any) -> Path:
    path = Path(text)
    if str(text).strip() == "":
        raise _Problem("must name a folder")
    if path.exists() and not path.is_dir():
        raise _Problem(f"{path} is a file, not a folder")
    return path


def device(text: Any) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``, and only a device that exists here."""
    name = str(text).strip()
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise _Problem(f"must be cpu, cuda or cuda:N, got {name!r}")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise _Problem(f"{name}: no CUDA device is available here (use cpu)")
        if index and int(index) >= torch.cuda.device_count():
            raise _Problem(f"{name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def host_name(text: Any, allow_auto: bool = True) -> str:
    """``auto`` or the name of a registered host adapter (read from the entry points, no host import)."""
    from importlib.metadata import entry_points

    name = non_empty_text(text).strip()
    if allow_auto and name == "auto":
        return name
    names = sorted(ep.name for ep in entry_points(group="ggnd_plugin.adapters"))
    if name not in names:
        raise _Problem(f"no adapter named {name!r}; registered adapters: {', '.join(names) or 'none'}")
    return name


def adapter_name(text: Any) -> str:
    return host_name(text, allow_auto=False)


def check_value(check: Callable[[Any], Any], value: Any, name: str) -> Any:
    """The library form of a value check: ``GGNDError("<name>: <problem>")``."""
    try:
        return check(value)
    except _Problem as problem:
        raise GGNDError(f"{name}: {problem}") from None


def arg_type(check: Callable[[Any], Any]) -> Callable[[str], Any]:
    """The argparse form of a value check (argparse prefixes the argument's name)."""

    def parse(text: str):
        try:
            return check(text)
        except _Problem as problem:
            raise argparse.ArgumentTypeError(str(problem)) from None

    parse.__name__ = check.__name__.replace("_", " ")
    return parse


# argparse ``type=`` functions, by what the argument holds
POSITIVE_INT = arg_type(positive_int)
NON_NEGATIVE_INT = arg_type(non_negative_int)
SEED = arg_type(seed)
POSITIVE_FLOAT = arg_type(positive_float)
NON_NEGATIVE_FLOAT = arg_type(non_negative_float)
FRACTION = arg_type(fraction)
TEXT = arg_type(non_empty_text)
FILE_STEM = arg_type(file_stem)
MODEL_FILE = arg_type(model_file)
STRUCTURE_FILE = arg_type(structure_file)
YAML_FILE = arg_type(yaml_file)
OUTPUT_FILE = arg_type(output_file)
OUTPUT_DIR = arg_type(output_dir)
DEVICE = arg_type(device)
HOST = arg_type(host_name)  # auto or an adapter
ADAPTER = arg_type(adapter_name)


class _ArgumentProblem(Exception):
    pass


def _refuse(message: str):
    def handler(args):
        raise GGNDError(message)

    return handler


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Report ``parser``'s usage errors like every other input error: one line, exit status 2.

    argparse would print the whole usage block and exit from inside the parser. Instead the error
    becomes the command's handler, so ``ggnd`` prints ``ggnd CMD: error: argument --x: <problem>``
    through its one error path (and ``cli.main`` returns 2 rather than raising ``SystemExit``) before
    any work starts. ``--help`` still shows the usage.
    """

    def error(message: str):
        raise _ArgumentProblem(message)

    original = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        try:
            return original(args, namespace)
        except _ArgumentProblem as problem:
            namespace = namespace if namespace is not None else argparse.Namespace()
            namespace.handler = _refuse(f"{problem} (see {parser.prog} --help)")
            return namespace, []

    parser.error = error  # type: ignore[method-assign]
    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    return parser


def check_settings(settings: Any, checks: dict[str, Callable[[Any], Any]]) -> None:
    """Check attributes of a settings object with the value checks (library callers)."""
    for name, check in checks.items():
        check_value(check, getattr(settings, name), name)


# --------------------------------------------------------------------------------------------------
# Structures
# --------------------------------------------------------------------------------------------------
def check_frames(
    frames: Sequence,
    source: str,
    known_numbers: Iterable[int] | None = None,
    model_name: str = "model",
) -> None:
    """Refuse a list of ASE ``Atoms`` a model cannot use, naming the frame and what is wrong.

    Empty list, something that is not an ``Atoms``, a frame without atoms, non-finite positions or
    cell, and (with ``known_numbers``) elements the model does not know.
    """
    import numpy as np
    from ase import Atoms

    if isinstance(frames, Atoms):
        raise GGNDError(f"{source}: expected a list of ase.Atoms, got a single Atoms (wrap it in a list)")
    if frames is None or len(frames) == 0:
        raise GGNDError(f"{source}: holds no frames")
    for number, atoms in enumerate(frames):
        if not isinstance(atoms, Atoms):
            raise GGNDError(f"{source}: frame {number} is a {type(atoms).__name__}, not an ase.Atoms")
        if len(atoms) == 0:
            raise GGNDError(f"{source}: frame {number} has no atoms")
        if not np.isfinite(atoms.get_positions()).all():
            raise GGNDError(f"{source}: frame {number} has non-finite positions")
        if atoms.pbc.any() and not np.isfinite(atoms.cell.array).all():
            raise GGNDError(f"{source}: frame {number} has a non-finite cell")
    if known_numbers is not None:
        check_elements(frames, known_numbers, source, model_name)


def check_elements(frames: Sequence, known: Iterable[int], source: str, model_name: str = "model") -> None:
    """Refuse frames with elements the model does not know, naming the first such frame."""
    from ase.data import chemical_symbols

    known_set = set(int(z) for z in known)
    for number, atoms in enumerate(frames):
        unknown = sorted(set(atoms.get_atomic_numbers().tolist()) - known_set)
        if unknown:
            raise GGNDError(
                f"{source}: frame {number} contains {', '.join(chemical_symbols[z] for z in unknown)}, "
                f"which the {model_name} does not know (it knows "
                f"{', '.join(chemical_symbols[z] for z in sorted(known_set))})"
            )


# --------------------------------------------------------------------------------------------------
# Tensors: the GGND block's inputs
# --------------------------------------------------------------------------------------------------
def validate_block_inputs(
    positions,
    species,
    batch=None,
    num_species: int | None = None,
    host=None,
    host_dim: int | None = None,
    enabled: bool = True,
) -> None:
    """Refuse tensors the GGND block cannot use, with a :class:`GGNDError` (a ``ValueError``).

    Checks shapes (positions ``(N, 3)`` floating, species ``(N,)`` integer, batch ``(N,)`` integer and
    non-decreasing, host features ``(N, host_dim)``), that there is at least one atom, finite positions
    (and host features), and species indices in ``0 .. num_species - 1``. Costs one device sync. Does
    nothing when ``enabled`` is False or under tracing / compilation (:func:`ggnd_plugin.tracing.is_tracing`).
    """
    import torch

    if not enabled or is_tracing():
        return
    if not isinstance(positions, torch.Tensor) or not torch.is_floating_point(positions):
        raise GGNDError(f"positions must be a floating-point tensor, got {_describe(positions)}")
    if positions.dim() != 2 or positions.shape[-1] != 3:
        raise GGNDError(f"positions must have shape (n_atoms, 3), got {tuple(positions.shape)}")
    n = positions.shape[0]
    if n == 0:
        raise GGNDError("the batch holds no atoms")
    if (
        not isinstance(species, torch.Tensor)
        or torch.is_floating_point(species)
        or species.dtype == torch.bool
    ):
        raise GGNDError(f"species must be an integer tensor, got {_describe(species)}")
    if tuple(species.shape) != (n,):
        raise GGNDError(f"species must have shape ({n},), got {tuple(species.shape)}")
    if batch is not None:
        if not isinstance(batch, torch.Tensor) or torch.is_floating_point(batch) or batch.dtype == torch.bool:
            raise GGNDError(f"batch must be an integer tensor, got {_describe(batch)}")
        if tuple(batch.shape) != (n,):
            raise GGNDError(f"batch must have shape ({n},), got {tuple(batch.shape)}")
    if host is not None and host_dim is not None and tuple(host.shape) != (n, host_dim):
        raise GGNDError(f"host features must have shape ({n}, {host_dim}), got {tuple(host.shape)}")
    # All value checks in one reduction, so the host waits for the device once.
    checks = [~torch.isfinite(positions).all()]
    if num_species is not None:
        checks += [(species < 0).any() | (species >= num_species).any()]
    if batch is not None:
        checks += [
            (batch < 0).any(),
            (batch[1:] < batch[:-1]).any() if n > 1 else positions.new_zeros((), dtype=torch.bool),
        ]
    if host is not None and torch.is_floating_point(host):
        checks += [~torch.isfinite(host).all()]
    flags = torch.stack([c.reshape(()) for c in checks]).tolist()
    if flags[0]:
        atom = int(torch.nonzero(~torch.isfinite(positions).all(dim=-1))[0])
        raise GGNDError(f"positions are not finite (first at atom {atom})")
    position = 1
    if num_species is not None:
        if flags[position]:
            raise GGNDError(
                f"species indices must lie in 0..{num_species - 1}, got "
                f"{int(species.min())}..{int(species.max())}"
            )
        position += 1
    if batch is not None:
        if flags[position]:
            raise GGNDError(f"batch indices must be >= 0, got {int(batch.min())}")
        if flags[position + 1]:
            raise GGNDError("atoms must be grouped by system: batch must be non-decreasing")
        position += 2
    if host is not None and torch.is_floating_point(host) and flags[position]:
        raise GGNDError("host features are not finite (NaN or inf from the host model)")


def _describe(value) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor"
    return f"a {type(value).__name__}"
