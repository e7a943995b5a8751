"""Recipes and device profiles ship in the package: they work by name from any directory, and from a
wheel installed outside the checkout; paths keep working."""

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from click.testing import CliRunner

from helpers import ROOT
from mvd_deploy.cli import main
from mvd_deploy.device_profiles import resolve_target
from mvd_deploy.recipe import load_recipe
from mvd_deploy.shipped import DEVICE_PROFILES, MODELS, shipped_dir, shipped_names

SHIPPED = {
    MODELS: ["mobilevd", "mobilevd-hd", "svd", "tiny"],
    DEVICE_PROFILES: ["galaxy-s24", "ort-cpu", "snapdragon-8-elite", "xiaomi-14-pro"],
}


def test_shipped_names():
    assert {kind: shipped_names(kind) for kind in SHIPPED} == SHIPPED


def test_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe("mobilevd").source == str(shipped_dir(MODELS) / "mobilevd.yaml")
    assert resolve_target("xiaomi-14-pro").source == str(shipped_dir(DEVICE_PROFILES) / "xiaomi-14-pro.yaml")


def test_repository_paths_keep_working(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert load_recipe("models/mobilevd.yaml") == load_recipe("mobilevd")
    assert load_recipe("models/mobilevd.yaml").source == "models/mobilevd.yaml"
    assert resolve_target("device_profiles/xiaomi-14-pro.yaml").name == resolve_target("xiaomi-14-pro").name


def test_a_path_is_never_taken_for_a_name(tmp_path, monkeypatch):
    """A value with a directory part or a .yaml suffix is a file, even when a shipped name matches."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["init-checkpoint", "--model", "mobilevd.yaml", "--out", "ck"])
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1].startswith("error: mobilevd.yaml: cannot read recipe")


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["init-checkpoint", "--model", "mobilvd", "--out", "ck"],
            "error: --model: unknown model 'mobilvd'; known: mobilevd, mobilevd-hd, svd, tiny "
            "(or a path to a recipe .yaml)",
        ),
        (
            ["inspect", "mobilvd"],
            "error: mobilvd: no such recipe file or checkpoint directory, nor a model name "
            "(known: mobilevd, mobilevd-hd, svd, tiny)",
        ),
        (
            ["compile", "BUILD", "--target", "xiaomi-14"],
            "error: --target: unknown target 'xiaomi-14'; known: galaxy-s24, ort-cpu, snapdragon-8-elite, "
            "xiaomi-14-pro (or a path to a profile .yaml)",
        ),
    ],
)
def test_unknown_names_list_the_known_ones(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    if "BUILD" in args:
        build = tmp_path / "build"
        build.mkdir()
        (build / "build.json").write_text(json.dumps({"format": "mvd-deploy-build", "components": {}}))
        args = [str(build) if a == "BUILD" else a for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.stderr.splitlines()[-1] == message  # after any progress lines
    assert not (tmp_path / "ck").exists()


@pytest.mark.slow
def test_inspect_by_name_matches_inspect_by_path():
    by_name = CliRunner().invoke(main, ["inspect", "tiny", "--json"])
    by_path = CliRunner().invoke(main, ["inspect", str(ROOT / "models" / "tiny.yaml"), "--json"])
    assert by_name.exit_code == by_path.exit_code == 0, by_name.output + by_path.output
    assert {**json.loads(by_name.stdout), "source": None} == {**json.loads(by_path.stdout), "source": None}


@pytest.mark.slow
def test_installed_wheel_works_outside_the_checkout(tmp_path):
    """Build the wheel from a copy of the sources, install it alone (dependencies: this interpreter's),
    and run it from a directory with no checkout: names come from the installed package data."""
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "mvd_deploy", source / "mvd_deploy", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("mvd_deploy-*.whl")
    data = sorted(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".yaml"))
    assert data == sorted(f"mvd_deploy/data/{kind}/{name}.yaml" for kind, names in SHIPPED.items() for name in names)

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the installed copy on the path: not the checkout (PYTHONPATH, cwd), and ahead of any
    # editable install of the project in this interpreter's site-packages.
    env = {**os.environ, "PYTHONPATH": str(site)}

    def run(*args):
        return subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True)

    where = run(
        sys.executable,
        "-c",
        "import mvd_deploy; from mvd_deploy.device_profiles import resolve_target; "
        "print(mvd_deploy.__file__); print(resolve_target('xiaomi-14-pro').source)",
    )
    assert where.returncode == 0, where.stderr
    package, profile = where.stdout.splitlines()
    assert package == str(site / "mvd_deploy" / "__init__.py")
    assert profile == str(site / "mvd_deploy" / "data" / "device_profiles" / "xiaomi-14-pro.yaml")

    inspected = run(str(site / "bin" / "mvd-deploy"), "inspect", "mobilevd", "--json")
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["latent_shape"] == [1, 14, 8, 32, 64]
    assert os.listdir(elsewhere) == []
