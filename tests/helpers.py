"""Helpers shared by the tests (import them from here; conftest.py holds only fixtures)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny.yaml"


def write_recipe(path: Path, **mobilevd_overrides) -> Path:
    """A copy of the tiny recipe with some ``mobilevd`` settings changed."""
    data = yaml.safe_load(TINY.read_text())
    data["mobilevd"].update(mobilevd_overrides)
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_spec(**mobilevd_overrides):
    from mvd_deploy.pruning import with_resolved_gates
    from mvd_deploy.recipe import load_recipe

    spec = load_recipe(TINY)
    spec = dataclasses.replace(spec, mobilevd=dataclasses.replace(spec.mobilevd, **mobilevd_overrides))
    return with_resolved_gates(spec)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
