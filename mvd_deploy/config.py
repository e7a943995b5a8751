"""Reading YAML/JSON settings with errors that name the file and the key: recipes, checkpoint
configs and device profiles all go through :class:`ConfigSection`, YAML through :func:`load_yaml`."""

from __future__ import annotations

from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import yaml

from mvd_deploy.errors import MvdError

_MISSING = object()


def load_yaml(path: Path | Traversable, what: str) -> Any:
    """The YAML document at ``path``; a one-line error naming the file (and the line, when YAML knows it)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise MvdError(f"{path}: cannot read {what} ({e.strerror or e})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise MvdError(f"{path}: not valid YAML{where}") from None


class ConfigSection:
    """Reads one mapping of a recipe/config, naming ``source: key 'a.b'`` in every error."""

    def __init__(self, data: Any, source: str, prefix: str = ""):
        self.source, self.prefix = source, prefix
        if not isinstance(data, dict):
            raise self.error(prefix.rstrip(".") or "<top level>", f"must be a mapping, got {type(data).__name__}")
        self.data = data
        self.read: set[str] = set()

    def error(self, key: str, why: str) -> MvdError:
        return MvdError(f"{self.source}: key '{key}': {why}")

    def key(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def check(self, name: str, ok: bool, why: str) -> None:
        """Raise ``why`` for key ``name`` unless ``ok``."""
        if not ok:
            raise self.error(self.key(name), why)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = _MISSING) -> Any:
        self.read.add(name)
        if name not in self.data:
            if default is _MISSING:
                raise self.error(self.key(name), "is missing")
            return default
        value = self.data[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python; a recipe saying `frames: true` is a mistake.
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        else:
            ok = isinstance(value, kinds)
        if not ok:
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(self.key(name), f"must be {names}, got {value!r}")
        return value

    def section(self, name: str, default: Any = _MISSING) -> ConfigSection:
        value = self.get(name, dict, default)
        return ConfigSection(value, self.source, self.key(name) + ".")

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise self.error(self.key(unknown[0]), "is not a known setting (a typo?)")
