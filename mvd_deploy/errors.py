"""The one error type users see: a problem with their input, reported as one line (exit code 2)."""


class MvdError(Exception):
    """Bad input (file, key or option). The CLI prints ``error: <message>`` and exits with code 2."""
