"""Errors that the command line reports as one line, without a traceback."""


class GGNDError(ValueError):
    """A problem with the user's input or environment, stated so the user can fix it.

    The message names the file, frame, key, element or argument concerned. It is a ``ValueError`` so
    library callers that catch ``ValueError`` for bad input (as the GGND block raised before the shared
    validation layer) keep working.
    """


class OutputExistsError(GGNDError):
    """An output would replace a file or folder the run did not write itself (``--overwrite`` allows it)."""


class OutputLockedError(GGNDError):
    """Another live process is writing the same output (its lock file names it)."""


class CorruptFileError(GGNDError):
    """A checkpoint or state file fails its checksum or cannot be read back: it is reported, never used."""
