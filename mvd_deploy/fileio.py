"""Writing outputs whole or not at all, and reading user files with one-line errors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mvd_deploy.errors import MvdError


@contextlib.contextmanager
def atomic_output_dir(out: Path, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; move it to ``out`` only if the block completes.

    An existing non-empty ``out`` is refused (we never mix a new build with an old one); on any
    failure or interruption the temporary directory is removed and ``out`` is untouched.
    """
    out = check_output_dir(out, option)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise MvdError(f"{option} {out}: cannot write there ({e.strerror or e})") from None
    try:
        yield tmp
        umask_permissions(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out: Path, option: str = "--out") -> Path:
    """Fail early (before any long work) when ``out`` cannot become a new output directory."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MvdError(f"{option} {out}: already exists and is not empty; choose a new directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MvdError(f"{option} {out}: cannot write there ({e.strerror or e})") from None
    if not os.access(out.parent, os.W_OK):
        raise MvdError(f"{option} {out}: cannot write there (no write permission on {out.parent})")
    return out


def umask_permissions(root: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the finished output the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for path in root.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MvdError(f"{path}: {what} not found") from None
    except OSError as e:
        raise MvdError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MvdError(f"{path}: {what} is not valid JSON ({e})") from None
