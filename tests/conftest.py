"""Shared fixtures: everything runs on the tiny recipe (MobileVD's structure at small widths)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from helpers import TINY

# A test that needs an exported model (tens of seconds to build, shared per session) is slow.
_EXPORTED = {"tiny_checkpoint", "tiny_build", "tiny_compiled_build", "compiled_build"}


def pytest_collection_modifyitems(items):
    for item in items:
        if _EXPORTED & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from mvd_deploy.checkpoint import init_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    init_checkpoint(TINY, out=out, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_build(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported (fp32, UNet + decoder); copy it before changing it."""
    from mvd_deploy.export import export_build

    out = tmp_path_factory.mktemp("builds") / "tiny-fp32"
    export_build(tiny_checkpoint, out=out)
    return out


@pytest.fixture(scope="session")
def tiny_compiled_build(tiny_build, tmp_path_factory) -> Path:
    """The tiny build compiled for ort-cpu (fp32), once per session; copy it before changing it
    (the ``compiled_build`` fixture does)."""
    from mvd_deploy.cli import main

    build = Path(shutil.copytree(tiny_build, tmp_path_factory.mktemp("builds") / "tiny-compiled"))
    result = CliRunner().invoke(main, ["compile", str(build), "--target", "ort-cpu"])
    assert result.exit_code == 0, result.output
    return build


@pytest.fixture
def compiled_build(tiny_compiled_build, tmp_path) -> Path:
    """A private copy of the ort-cpu-compiled tiny build."""
    return Path(shutil.copytree(tiny_compiled_build, tmp_path / "build"))
