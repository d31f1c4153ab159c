"""The classes a pickle names, read from its opcodes: no object is built and no code runs.

Adapters recognise their hosts' model files this way (``torch.save`` of a whole model is a zip archive
whose ``data.pkl`` names the model's class first), so ``--host auto`` can look at a file it was not
told the host of, and a file that does not hold a model of that host is refused before it is unpickled.
The tests read the files of earlier releases the same way, to check that every class they name still
imports.
"""

from __future__ import annotations

import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TorchFileClasses", "pickle_globals", "torch_file_classes"]

_MEMO_PUT = ("PUT", "BINPUT", "LONG_BINPUT")
_MEMO_GET = ("GET", "BINGET", "LONG_BINGET")


def pickle_globals(raw: bytes) -> list[tuple[str, str]]:
    """``(module, name)`` of every global (class or function) the pickle ``raw`` refers to, in order.

    Protocols 0-2 name globals in the opcode (``GLOBAL``); protocols 4 and 5 push the two strings first
    (``STACK_GLOBAL``), possibly from the memo, which is followed here as far as strings go. Raises
    ``ValueError`` (or another exception of :mod:`pickletools`) for data that is not a pickle.
    """
    found: list[tuple[str, str]] = []
    strings: list[str | None] = []  # what the last opcodes pushed, as far as it is a string
    memo: dict[int, str | None] = {}
    for opcode, argument, _ in pickletools.genops(raw):
        name = opcode.name
        if name in ("GLOBAL", "INST") and isinstance(argument, str):
            module, _, attribute = argument.partition(" ")
            found.append((module, attribute))
            strings.append(None)
        elif name == "STACK_GLOBAL":
            if len(strings) >= 2 and strings[-2] is not None and strings[-1] is not None:
                found.append((strings[-2], strings[-1]))
            strings.append(None)
        elif name == "MEMOIZE":
            memo[len(memo)] = strings[-1] if strings else None
        elif name in _MEMO_PUT and isinstance(argument, int):
            memo[argument] = strings[-1] if strings else None
        elif name in _MEMO_GET and isinstance(argument, int):
            strings.append(memo.get(argument))
        else:
            strings.append(argument if isinstance(argument, str) else None)
    return found


@dataclass(frozen=True)
class TorchFileClasses:
    """What a ``torch.save`` (or ``torch.jit.save``) zip archive's pickle names.

    Attributes:
        kind: ``"torchscript"`` for a TorchScript archive (it holds compiled code), else ``"pickle"``.
        globals: ``(module, name)`` of every global in ``data.pkl``, in order; the first is the class of
            the saved object when that is an instance (a model), not a plain container.
    """

    kind: str
    globals: list[tuple[str, str]]

    @property
    def root(self) -> tuple[str, str] | None:
        return self.globals[0] if self.globals else None


def torch_file_classes(path: str | Path) -> TorchFileClasses | None:
    """The classes ``path``'s ``data.pkl`` names, or None for anything that is not a readable
    ``torch.save`` / ``torch.jit.save`` archive (a missing file, another format, a damaged pickle)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            kind = "torchscript" if any(name.split("/", 2)[1:2] == ["code"] for name in names) else "pickle"
            data = next((name for name in names if name == "data.pkl" or name.endswith("/data.pkl")), None)
            if data is None:
                return None
            raw = archive.read(data)
    except (zipfile.BadZipFile, OSError, IndexError):
        return None
    try:
        found = pickle_globals(raw)
    except Exception:  # a damaged pickle is simply not a model file
        return None
    return TorchFileClasses(kind=kind, globals=found)
