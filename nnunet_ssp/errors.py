"""User-facing errors: one line that names the file and the problem."""


class SSPError(Exception):
    """A problem the user can fix (bad input, missing file, incompatible checkpoint).

    Command-line entry points print it as a single ``error: ...`` line and exit non-zero, without a traceback.
    """
