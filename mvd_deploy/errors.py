"""The one error type users see: a problem with their input, reported as one line (exit code 2)."""


class MvdError(Exception):
    """Bad input (file, key or option). The CLI prints ``error: <message>`` and exits with code 2."""

    exit_code = 2


class ValidationFailed(MvdError):
    """A result fell below its threshold (e.g. an export's PSNR): exit code 1, nothing promoted."""

    exit_code = 1
