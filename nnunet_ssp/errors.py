"""User-facing errors: one line that names the file and the problem."""


class SSPError(Exception):
    """A problem the user can fix (bad input, missing file, incompatible checkpoint).

    Command-line entry points print it as a single ``error: ...`` line and exit non-zero, without a traceback.
    """


def run_command(command, debug: bool = False) -> int:
    """Runs ``command()`` for a CLI: 0 on success; an SSPError becomes one ``error:`` line and exit code 2
    (``debug`` re-raises it to show the traceback)."""
    import sys
    try:
        command()
        return 0
    except SSPError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
