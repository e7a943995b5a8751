"""The model recipes and device profiles shipped inside the package (``mvd_deploy/data/``).

They are package data, read with importlib.resources, so an installed mvd-deploy (a wheel, no
checkout) finds them by name: ``--model mobilevd``, ``--target xiaomi-14-pro``. A value that looks
like a file (ends in .yaml/.yml, has a directory part, or is an existing file; any Path object) is
a path instead.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from mvd_deploy.errors import MvdError

MODELS = "models"
DEVICE_PROFILES = "device_profiles"


def shipped_dir(kind: str) -> Traversable:
    return files("mvd_deploy") / "data" / kind


def shipped_names(kind: str) -> list[str]:
    return sorted(
        entry.name.removesuffix(".yaml") for entry in shipped_dir(kind).iterdir() if entry.name.endswith(".yaml")
    )


def looks_like_path(value: str | Path) -> bool:
    path = Path(value)
    return isinstance(value, Path) or path.suffix in (".yaml", ".yml") or len(path.parts) > 1 or path.is_file()


def shipped_file(kind: str, name: str) -> Traversable | None:
    entry = shipped_dir(kind) / f"{name}.yaml"
    return entry if entry.is_file() else None


def resolve_yaml(value: str | Path, kind: str, parameter: str, what: str, file_kind: str) -> Path | Traversable:
    """``value`` (the argument ``parameter``) as a path, or the shipped YAML of that name; an unknown
    name lists the known ones."""
    if looks_like_path(value):
        return Path(value)
    entry = shipped_file(kind, str(value))
    if entry is None:
        known = ", ".join(shipped_names(kind))
        raise MvdError(
            f"{parameter}: unknown {what} {str(value)!r}; known: {known} (or a path to a {file_kind} .yaml)",
            parameter=parameter,
        )
    return entry
