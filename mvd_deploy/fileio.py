"""Writing outputs whole or not at all, and reading user files with one-line errors."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mvd_deploy.errors import MvdError


@contextlib.contextmanager
def staged_dir(
    target: Path, *, staging: Path | None = None, label: str = "", swap: Callable[[Path, Path], object] | None = None
) -> Iterator[Path]:
    """Yield a new private directory; when the block completes, it becomes ``target`` in one step
    (``swap``, default :func:`swap_in`); on any failure or interruption it is removed and ``target``
    is untouched.

    The one way outputs are written: staged beside ``target`` (``.<name>.partial-…``), or in
    ``staging`` (on the same filesystem: the swap is a rename), never half in place.
    """
    if staging is None:
        tmp = owned_temp_dir(target.parent, f".{target.name}.partial-", label)
    else:
        staging.mkdir(exist_ok=True)
        tmp = owned_temp_dir(staging, "", label)
    try:
        yield tmp
        (swap or swap_in)(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(staged: Path, target: Path) -> None:
    """Move the completed directory ``staged`` to ``target``; an old ``target`` is moved aside first
    and removed after, so a reader sees the old directory or the new one, never a mix."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if target.exists():
        old = owned_temp_dir(target.parent, f".{target.name}.old-")
        os.replace(target, old / target.name)
    os.replace(staged, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: Path, parameter: str = "out") -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; move it to ``out`` only if the block completes.

    An existing non-empty ``out`` is refused (we never mix a new build with an old one); on any
    failure or interruption the temporary directory is removed and ``out`` is untouched.
    """
    out = check_output_dir(out, parameter)
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(staged_dir(out))
        except OSError as e:
            raise MvdError(f"{parameter} {out}: cannot write there ({e.strerror or e})", parameter=parameter) from None
        yield tmp
        umask_permissions(tmp)


# Temporary directories carry their owner (host and pid) in their name: a run killed outright
# (SIGKILL, the OOM killer, a lost machine) cannot clean up, so the next run writing the same output
# removes what such a run left, and only that: never a live process's, nor another host's (a shared
# filesystem), nor a directory named otherwise.
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"


def owned_temp_dir(parent: Path, prefix: str, label: str = "") -> Path:
    """A new private directory in ``parent`` named ``<prefix><host>-<pid>-[<label>-]<random>``, after
    removing the ones with that prefix whose owner process is gone (:func:`remove_stale`)."""
    remove_stale(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{_HOST}-{os.getpid()}-{label + '-' if label else ''}", dir=parent))


def remove_stale(parent: Path, prefix: str) -> None:
    """Remove the directories that :func:`owned_temp_dir` made in ``parent`` with ``prefix`` for a
    process of this host that no longer runs."""
    owned = re.compile(re.escape(prefix) + r"(?P<host>[A-Za-z0-9._]+)-(?P<pid>[0-9]+)-")
    for entry in Path(parent).glob(glob.escape(prefix) + "*"):
        match = owned.match(entry.name)
        if match and match["host"] == _HOST and not _running(int(match["pid"])) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: checks that the process exists, sends nothing
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; not a pid: keep the directory
        return True
    return True


def check_output_dir(out: Path, parameter: str = "out") -> Path:
    """Fail early (before any long work) when ``out`` (the argument ``parameter``) cannot become a
    new output directory."""
    out = Path(out)

    def refused(why: str) -> MvdError:
        return MvdError(f"{parameter} {out}: {why}", parameter=parameter)

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise refused("already exists and is not empty; choose a new directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise refused(f"cannot write there ({e.strerror or e})") from None
    if not os.access(out.parent, os.W_OK):
        raise refused(f"cannot write there (no write permission on {out.parent})")
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
