"""Shared fixtures: everything runs on the tiny recipe (MobileVD's structure at small widths)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny.yaml"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def write_recipe(path: Path, **mobilevd_overrides) -> Path:
    """A copy of the tiny recipe with some ``mobilevd`` settings changed."""
    data = yaml.safe_load(TINY.read_text())
    data["mobilevd"].update(mobilevd_overrides)
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_spec(**mobilevd_overrides):
    from mvd_deploy.flops import with_resolved_gates
    from mvd_deploy.recipe import load_recipe

    spec = load_recipe(TINY)
    spec = dataclasses.replace(spec, mobilevd=dataclasses.replace(spec.mobilevd, **mobilevd_overrides))
    return with_resolved_gates(spec)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from mvd_deploy.checkpoint import init_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    init_checkpoint(TINY, out, seed=0, quiet=True)
    return out


@pytest.fixture(scope="session")
def tiny_build(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported (fp32, UNet + decoder); copy it before changing it."""
    from mvd_deploy.export import export_build

    out = tmp_path_factory.mktemp("builds") / "tiny-fp32"
    export_build(tiny_checkpoint, out, quiet=True)
    return out


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())
