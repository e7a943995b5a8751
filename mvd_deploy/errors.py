"""The one error type users see: a problem with their input, reported as one line (exit code 2)."""

from __future__ import annotations


class MvdError(Exception):
    """Bad input (file, key or argument). The CLI prints ``error: <message>`` and exits with code 2.

    ``parameter``: the Python API argument the message names (``out``, ``targets``, ...); the CLI says
    its command-line option there instead (``--out``, ``--target``, ...).
    """

    exit_code = 2

    def __init__(self, message: str, *, parameter: str | None = None):
        super().__init__(message)
        self.parameter = parameter


class ValidationFailed(MvdError):
    """A result fell below its threshold (e.g. an export's PSNR): exit code 1, nothing promoted."""

    exit_code = 1
