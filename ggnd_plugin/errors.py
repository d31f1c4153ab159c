"""Errors that the command line reports as one line, without a traceback."""


class GGNDError(Exception):
    """A problem with the user's input or environment, stated so the user can fix it.

    The message names the file, frame, key or element concerned.
    """
