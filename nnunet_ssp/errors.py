"""User-facing errors: one line that names the file and the problem."""

import argparse
import sys


class SSPError(Exception):
    """A problem the user can fix (bad input, missing file, incompatible checkpoint).

    Command-line entry points print it as a single ``error: ...`` line and exit with ``exit_code``, without a
    traceback.
    """

    exit_code = 2


class Interrupted(SSPError):
    """A run stopped by a signal after saving what it had; exits with 128 + the signal number, as shells expect."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def first_line(e: Exception) -> str:
    """The last non-empty line of an exception's message (where SimpleITK and nibabel put the useful part), or its
    type's name."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one ``error: ...`` line (exit code 2), like every other error."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def run_command(command, debug: bool = False) -> int:
    """Runs ``command()`` for a CLI: 0 on success; an SSPError becomes one ``error:`` line and its exit code, an
    OSError (no permission, disk full, ...) one line naming its file (``debug`` re-raises them to show the
    traceback)."""
    try:
        command()
        return 0
    except SSPError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
